# syncbnd over TCP with a token (tests/svc_tcp_e2e.py): `mpirun -np 2
# syncbnd --tcp 127.0.0.1:PORT --token-file F` with the right, a wrong and
# no token, a first request that is not hello, the pre-authentication frame
# cap, a token file open to others, and the warning for a non-loopback
# bind. It uses Debian's python with msgpack; without it the test is
# skipped (exit 77). mpirun's --timeout inside and ctest's TIMEOUT bound it.
if(NOT TARGET syncbnd OR NOT MPIEXEC_EXECUTABLE)
  message(STATUS "TCP service test disabled: no syncbnd or mpiexec")
  return()
endif()

set(SBN_PYTHON /usr/bin/python3 CACHE FILEPATH
  "Python with msgpack and numpy for the client test")
if(NOT EXISTS ${SBN_PYTHON})
  message(STATUS "TCP service test disabled: no ${SBN_PYTHON}")
  return()
endif()

set(SBN_SVCTCP_ENV OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
if(SBN_SANITIZE)
  # Open MPI keeps its start-up allocations until exit (see mpi.cmake).
  list(APPEND SBN_SVCTCP_ENV ASAN_OPTIONS=fast_unwind_on_malloc=0
    LSAN_OPTIONS=suppressions=${CMAKE_CURRENT_LIST_DIR}/lsan.supp)
endif()

add_test(NAME svc_tcp
  COMMAND ${SBN_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/svc_tcp_e2e.py
    --mpirun ${MPIEXEC_EXECUTABLE} --syncbnd $<TARGET_FILE:syncbnd>)
set_tests_properties(svc_tcp PROPERTIES TIMEOUT 120 LABELS "mpi;svc;python"
  SKIP_RETURN_CODE 77 ENVIRONMENT "${SBN_SVCTCP_ENV}")
