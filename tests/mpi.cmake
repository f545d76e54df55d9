# MPI tests: each tests/mpi_<name>.c program (linked with libsyncbn_mpi)
# runs under mpirun with 1, 2, 3 and 4 processes, oversubscribed (the CI
# machine has 2 cores) and over Open MPI's shared-memory and TCP transports.
# mpirun's own --timeout kills a hung job; ctest's TIMEOUT is the backstop.
if(NOT TARGET syncbn_mpi OR NOT MPIEXEC_EXECUTABLE)
  message(STATUS "MPI tests disabled: no libsyncbn_mpi or no mpiexec")
  return()
endif()

set(SBN_MPI_TEST_DIR ${CMAKE_CURRENT_LIST_DIR})
set(SBN_MPI_RUN_ENV
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
if(SBN_SANITIZE)
  # Open MPI keeps its start-up allocations until exit; the suppressions
  # name only its libraries. Slow unwinding lets them match frames below
  # plugins that MPI_Finalize has already unloaded.
  list(APPEND SBN_MPI_RUN_ENV ASAN_OPTIONS=fast_unwind_on_malloc=0
    LSAN_OPTIONS=suppressions=${CMAKE_CURRENT_LIST_DIR}/lsan.supp)
endif()
set(SBN_MPIRUN_FLAGS --oversubscribe --bind-to none --timeout 100
  --mca pml ob1 --mca btl self,vader,tcp)

# name: program; extra sources after it (mpi_pmpi.c counts collectives).
set(SBN_MPI_TESTS mpi_bn mpi_errors mpi_count mpi_fused mpi_dropout
  mpi_overlap)
set(SBN_MPI_PMPI_TESTS mpi_count mpi_fused mpi_overlap)

foreach(prog ${SBN_MPI_TESTS})
  if(NOT EXISTS ${SBN_MPI_TEST_DIR}/${prog}.c)
    continue()
  endif()
  set(srcs ${SBN_MPI_TEST_DIR}/${prog}.c ${SBN_MPI_TEST_DIR}/mpi_util.c
    ${SBN_MPI_TEST_DIR}/ref64.c)
  if(prog IN_LIST SBN_MPI_PMPI_TESTS)
    list(APPEND srcs ${SBN_MPI_TEST_DIR}/mpi_pmpi.c)
  endif()
  add_executable(${prog} ${srcs})
  target_include_directories(${prog} PRIVATE ${SBN_MPI_TEST_DIR})
  target_link_libraries(${prog} PRIVATE syncbn_mpi syncbn MPI::MPI_C ${M_LIB})
  foreach(np 1 2 3 4)
    add_test(NAME ${prog}_np${np}
      COMMAND ${MPIEXEC_EXECUTABLE} ${SBN_MPIRUN_FLAGS}
        ${MPIEXEC_NUMPROC_FLAG} ${np} $<TARGET_FILE:${prog}>)
    set_tests_properties(${prog}_np${np} PROPERTIES TIMEOUT 120 LABELS mpi
      ENVIRONMENT "${SBN_MPI_RUN_ENV}")
  endforeach()
endforeach()

# Two "hosts" (network namespaces joined by a veth pair) running one job over
# TCP. Needs root and `ip netns`; exits 77 (skipped) where those are missing.
add_test(NAME mpi_netns
  COMMAND ${SBN_MPI_TEST_DIR}/../scripts/netns-test
    --mpirun ${MPIEXEC_EXECUTABLE} --prog $<TARGET_FILE:mpi_bn>
    --prog $<TARGET_FILE:mpi_fused>)
set_tests_properties(mpi_netns PROPERTIES TIMEOUT 180 LABELS "mpi;netns"
  ENVIRONMENT "${SBN_MPI_RUN_ENV}"
  SKIP_RETURN_CODE 77 RUN_SERIAL TRUE)
