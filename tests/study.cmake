# End-to-end tests of `syncbn study` (tests/study_test.sh) on Debian's
# dataset-fashion-mnist, which scripts/test installs; without it they are
# not registered. The checks of the CSV and JSON files use Debian's python
# (only its standard library).
set(SBN_STUDY_DATA /usr/share/datasets/fashion-mnist)
if(NOT TARGET syncbn_cli OR NOT MPIEXEC_EXECUTABLE)
  message(STATUS "study tests disabled: no syncbn program or no mpiexec")
  return()
endif()
if(NOT EXISTS ${SBN_STUDY_DATA}/train-images-idx3-ubyte.gz)
  message(STATUS "study tests disabled: install dataset-fashion-mnist")
  return()
endif()
set(SBN_STUDY_ENV OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader,tcp)
if(SBN_SANITIZE)
  list(APPEND SBN_STUDY_ENV ASAN_OPTIONS=fast_unwind_on_malloc=0
    LSAN_OPTIONS=suppressions=${CMAKE_CURRENT_LIST_DIR}/lsan.supp)
endif()
foreach(group bookkeeping stats errors)
  add_test(NAME study_${group}
    COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/study_test.sh
      --syncbn $<TARGET_FILE:syncbn_cli> --mpirun ${MPIEXEC_EXECUTABLE}
      --data ${SBN_STUDY_DATA}
      --check ${CMAKE_CURRENT_LIST_DIR}/study_check.py ${group})
  set_tests_properties(study_${group} PROPERTIES TIMEOUT 300
    LABELS "cli;mpi;study" ENVIRONMENT "${SBN_STUDY_ENV}")
endforeach()
