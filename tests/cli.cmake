# End-to-end tests of `syncbn apply` (tests/cli_test.sh). CI has no NumPy,
# so two small C tools make and check the .npy files: npygen writes inputs
# (and malformed files), npycmp compares outputs and checks their moments.
if(NOT TARGET syncbn_cli)
  message(STATUS "CLI tests disabled: no syncbn program (mpi/cli/syncbn_main.c)")
  return()
endif()

foreach(tool npygen npycmp)
  add_executable(${tool} ${CMAKE_CURRENT_LIST_DIR}/${tool}.c)
  target_link_libraries(${tool} PRIVATE syncbn ${M_LIB})
endforeach()

set(SBN_CLI_TEST_ARGS ${CMAKE_CURRENT_LIST_DIR}/cli_test.sh
  --syncbn $<TARGET_FILE:syncbn_cli> --npygen $<TARGET_FILE:npygen>
  --npycmp $<TARGET_FILE:npycmp>)
set(SBN_CLI_ENV OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
if(SBN_SANITIZE)
  # Open MPI keeps its start-up allocations until exit (see mpi.cmake).
  list(APPEND SBN_CLI_ENV ASAN_OPTIONS=fast_unwind_on_malloc=0
    LSAN_OPTIONS=suppressions=${CMAKE_CURRENT_LIST_DIR}/lsan.supp)
endif()

foreach(group basic errors bench)
  add_test(NAME cli_${group} COMMAND bash ${SBN_CLI_TEST_ARGS} ${group})
  set_tests_properties(cli_${group} PROPERTIES TIMEOUT 120 LABELS cli
    ENVIRONMENT "${SBN_CLI_ENV}")
endforeach()

if(MPIEXEC_EXECUTABLE)
  foreach(np 1 2 3)
    add_test(NAME cli_sync_np${np}
      COMMAND bash ${SBN_CLI_TEST_ARGS} --mpirun ${MPIEXEC_EXECUTABLE}
        sync ${np})
    set_tests_properties(cli_sync_np${np} PROPERTIES TIMEOUT 400
      LABELS "cli;mpi" ENVIRONMENT "${SBN_CLI_ENV}")
  endforeach()
  # `syncbn bench MODE --quick` at np 2, one test per mode (each well under
  # a minute; the records' schema and derived columns are checked, never
  # the timings). The service mode starts its own syncbnd job.
  foreach(mode layer network sizes service)
    add_test(NAME cli_bench_${mode}_np2
      COMMAND bash ${SBN_CLI_TEST_ARGS} --mpirun ${MPIEXEC_EXECUTABLE}
        benchmpi 2 ${mode})
    set_tests_properties(cli_bench_${mode}_np2 PROPERTIES TIMEOUT 120
      LABELS "cli;mpi" ENVIRONMENT "${SBN_CLI_ENV}")
  endforeach()
endif()
