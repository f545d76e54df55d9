# Reliability (issue 17): the regressions hostile testing found, against a
# real `mpirun -np 2 syncbnd` (tests/svc_rely_e2e.py, Debian's python with
# msgpack and numpy).
if(TARGET syncbnd AND MPIEXEC_EXECUTABLE AND EXISTS /usr/bin/python3)
  set(rely_env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
  if(DEFINED SBN_MPI_RUN_ENV)
    set(rely_env ${SBN_MPI_RUN_ENV})
  endif()
  set(rely_san "")
  if(SBN_SANITIZE)
    set(rely_san --sanitized)
  endif()
  add_test(NAME svc_rely_e2e
    COMMAND /usr/bin/python3 ${CMAKE_CURRENT_LIST_DIR}/svc_rely_e2e.py
      --mpirun ${MPIEXEC_EXECUTABLE} --syncbnd $<TARGET_FILE:syncbnd>
      ${rely_san})
  set_tests_properties(svc_rely_e2e PROPERTIES TIMEOUT 120
    LABELS "mpi;svc;python" SKIP_RETURN_CODE 77 ENVIRONMENT "${rely_env}")
endif()

# `syncbn apply` replaces its outputs all together or not at all, refuses
# a FIFO without blocking and an eps below FLT_MIN (tests/cli_rely_test.sh).
# npygen comes from tests/cli.cmake, included before this file.
if(TARGET syncbn_cli AND TARGET npygen)
  add_test(NAME cli_rely COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/cli_rely_test.sh
    --syncbn $<TARGET_FILE:syncbn_cli> --npygen $<TARGET_FILE:npygen>)
  set_tests_properties(cli_rely PROPERTIES TIMEOUT 120 LABELS cli
    ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
endif()

# Hostile clients (tests/svc_hostile_e2e.py): bombs, slow-loris, a slow
# reader, desync, a reset during a collective, kill -9 of a rank and during
# checkpoint_save, another uid. Each case is bounded; the whole well under
# two minutes. Not under the sanitizers: the slow-loris latency bound and
# the memory figures measure the normal build.
if(TARGET syncbnd AND MPIEXEC_EXECUTABLE AND EXISTS /usr/bin/python3)
  add_test(NAME svc_hostile_e2e
    COMMAND /usr/bin/python3 ${CMAKE_CURRENT_LIST_DIR}/svc_hostile_e2e.py
      --mpirun ${MPIEXEC_EXECUTABLE} --syncbnd $<TARGET_FILE:syncbnd>)
  set_tests_properties(svc_hostile_e2e PROPERTIES TIMEOUT 240
    LABELS "mpi;svc;python;nosan" SKIP_RETURN_CODE 77
    ENVIRONMENT "${rely_env}")
endif()
