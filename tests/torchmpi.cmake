# Python client tests that need more than one process:
# - svc_pyc: the same script through the C client library
#   (tests/svc_pyc_driver.c) and the Python client
#   (src/python/syncbn/client.py) gives bit-identical outputs;
# - python_torch_mpi: examples/python/torch_mpi_example.py trained by
#   `mpirun -np 2` against `mpirun -np 2 syncbnd` (tests/torch_mpi.sh) equals
#   torch.nn.BatchNorm2d on the whole batch; skipped (77) without torch.
# Both use Debian's python (SBN_PYTHON, see tests/python.cmake).
if(NOT TARGET syncbnd OR NOT TARGET syncbn_client OR NOT MPIEXEC_EXECUTABLE)
  message(STATUS "Python/MPI client tests disabled: no syncbnd, client or mpiexec")
  return()
endif()

set(SBN_PYTHON /usr/bin/python3 CACHE FILEPATH
  "Python with msgpack and numpy for the client test")
if(NOT EXISTS ${SBN_PYTHON})
  message(STATUS "Python/MPI client tests disabled: no ${SBN_PYTHON}")
  return()
endif()

# The MPI tests' environment (root allowed; under the sanitizers the Open
# MPI leak suppressions) when tests/mpi.cmake has set it.
set(torchmpi_env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
if(DEFINED SBN_MPI_RUN_ENV)
  set(torchmpi_env ${SBN_MPI_RUN_ENV})
endif()

add_executable(svc_pyc_driver ${CMAKE_CURRENT_LIST_DIR}/svc_pyc_driver.c)
target_link_libraries(svc_pyc_driver PRIVATE syncbn_client syncbn_svc syncbn
  PkgConfig::MSGPACK)
add_test(NAME svc_pyc
  COMMAND ${SBN_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/svc_pyc.py
    --mpirun ${MPIEXEC_EXECUTABLE} --syncbnd $<TARGET_FILE:syncbnd>
    --driver $<TARGET_FILE:svc_pyc_driver>)
set_tests_properties(svc_pyc PROPERTIES TIMEOUT 120 LABELS "svc;python"
  SKIP_RETURN_CODE 77 ENVIRONMENT "${torchmpi_env}")

# Python and torch under the sanitizers would need the ASan runtime
# preloaded into the interpreter, hence nosan.
add_test(NAME python_torch_mpi
  COMMAND sh ${CMAKE_CURRENT_LIST_DIR}/torch_mpi.sh ${MPIEXEC_EXECUTABLE}
    $<TARGET_FILE:syncbnd> ${SBN_PYTHON}
    ${CMAKE_SOURCE_DIR}/examples/python/torch_mpi_example.py)
set_tests_properties(python_torch_mpi PROPERTIES TIMEOUT 180
  LABELS "svc;python;torch;nosan" SKIP_RETURN_CODE 77
  ENVIRONMENT "${torchmpi_env}")
