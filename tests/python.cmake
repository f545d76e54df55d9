# The Python client of the syncbnd service (src/python/syncbn): a self-test
# that starts `mpirun -np 1 syncbnd`, drives it through the client, compares
# with `syncbn apply` (the C library) and, when torch is there, trains the
# torch example against torch's own modules. It uses Debian's python, which
# has msgpack and numpy; without them the test is skipped (exit 77).
if(NOT TARGET syncbnd OR NOT TARGET syncbn_cli OR NOT MPIEXEC_EXECUTABLE)
  message(STATUS "Python client test disabled: no syncbnd, syncbn or mpiexec")
  return()
endif()

set(SBN_PYTHON /usr/bin/python3 CACHE FILEPATH
  "Python with msgpack and numpy for the client test")
if(NOT EXISTS ${SBN_PYTHON})
  message(STATUS "Python client test disabled: no ${SBN_PYTHON}")
  return()
endif()

add_test(NAME python_client
  COMMAND ${SBN_PYTHON} ${CMAKE_SOURCE_DIR}/src/python/syncbn/client.py
    --mpirun ${MPIEXEC_EXECUTABLE} --syncbnd $<TARGET_FILE:syncbnd>
    --syncbn $<TARGET_FILE:syncbn_cli>)
set_tests_properties(python_client PROPERTIES TIMEOUT 60 LABELS "svc;python"
  SKIP_RETURN_CODE 77
  ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
