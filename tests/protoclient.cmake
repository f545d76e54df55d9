# An outside client of syncbnd, written from mpi/service/PROTOCOL.md alone
# (tests/protocol_client): SyncBN training through `mpirun -np P syncbnd`
# with uneven and empty per-rank batches, compared with `mpirun -np P
# syncbn apply --sync` and a float64 reference. It uses Debian's python,
# which has msgpack and numpy; without them the test is skipped (exit 77).
if(NOT TARGET syncbnd OR NOT TARGET syncbn_cli OR NOT MPIEXEC_EXECUTABLE)
  message(STATUS "Protocol client test disabled: no syncbnd, syncbn or mpiexec")
  return()
endif()

set(SBN_PYTHON /usr/bin/python3 CACHE FILEPATH
  "Python with msgpack and numpy for the client test")
if(NOT EXISTS ${SBN_PYTHON})
  message(STATUS "Protocol client test disabled: no ${SBN_PYTHON}")
  return()
endif()

set(SBN_PCLIENT_ENV OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
if(SBN_SANITIZE)
  # Open MPI keeps its start-up allocations until exit (see mpi.cmake).
  list(APPEND SBN_PCLIENT_ENV ASAN_OPTIONS=fast_unwind_on_malloc=0
    LSAN_OPTIONS=suppressions=${CMAKE_CURRENT_LIST_DIR}/lsan.supp)
endif()

foreach(np 2 3)
  add_test(NAME svc_protocol_client_np${np}
    COMMAND ${SBN_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/protocol_client/vs_apply.py
      --np ${np} --mpirun ${MPIEXEC_EXECUTABLE} --syncbnd $<TARGET_FILE:syncbnd>
      --syncbn $<TARGET_FILE:syncbn_cli>)
  set_tests_properties(svc_protocol_client_np${np} PROPERTIES TIMEOUT 120
    LABELS "mpi;svc;python" SKIP_RETURN_CODE 77
    ENVIRONMENT "${SBN_PCLIENT_ENV}")
endforeach()
