# The shared libraries export only their public API (tests/exports_test.sh).
if(SBN_STATIC_LIBS)
  message(STATUS "exports test disabled: static libraries (SBN_STATIC_LIBS)")
  return()
endif()
add_test(NAME exports
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/exports_test.sh
    ${CMAKE_SOURCE_DIR}/src ${CMAKE_SOURCE_DIR}/mpi --
    $<TARGET_FILE:syncbn> $<TARGET_FILE:syncbn_mpi>)
set_tests_properties(exports PROPERTIES TIMEOUT 30 LABELS unit)
