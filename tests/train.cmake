# End-to-end tests of `syncbn train` (tests/train_test.sh) on Debian's
# dataset-fashion-mnist, which scripts/test installs; without it they are
# not registered (a configure message says so).
set(SBN_TRAIN_DATA /usr/share/datasets/fashion-mnist)
if(NOT TARGET syncbn_cli OR NOT MPIEXEC_EXECUTABLE)
  message(STATUS "train tests disabled: no syncbn program or no mpiexec")
  return()
endif()
if(NOT EXISTS ${SBN_TRAIN_DATA}/train-images-idx3-ubyte.gz)
  message(STATUS "train tests disabled: install dataset-fashion-mnist")
  return()
endif()
set(SBN_TRAIN_ENV OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader,tcp)
if(SBN_SANITIZE)
  # Open MPI keeps its start-up allocations until exit (see mpi.cmake).
  list(APPEND SBN_TRAIN_ENV ASAN_OPTIONS=fast_unwind_on_malloc=0
    LSAN_OPTIONS=suppressions=${CMAKE_CURRENT_LIST_DIR}/lsan.supp)
endif()
foreach(group learns equal repeat errors)
  add_test(NAME train_${group}
    COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/train_test.sh
      --syncbn $<TARGET_FILE:syncbn_cli> --mpirun ${MPIEXEC_EXECUTABLE}
      --data ${SBN_TRAIN_DATA} ${group})
  set_tests_properties(train_${group} PROPERTIES TIMEOUT 300
    LABELS "cli;mpi;train" ENVIRONMENT "${SBN_TRAIN_ENV}")
endforeach()
