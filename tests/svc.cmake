# The syncbnd service tests: the codec and worker unit tests (no sockets),
# and the end-to-end test that runs `mpirun -np 2 syncbnd` and talks to it
# through the client library. The service is optional (mpi/service adds
# it), so this group steps aside when it is not built.
if(NOT TARGET syncbn_svc)
  message(STATUS "service tests disabled: no syncbn_svc")
  return()
endif()

# The environment of every test that starts `mpirun ... syncbnd`: the MPI
# tests' (root allowed; under the sanitizers slow unwinding and the Open
# MPI leak suppressions).
set(svc_env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
if(DEFINED SBN_MPI_RUN_ENV)
  set(svc_env ${SBN_MPI_RUN_ENV})
endif()

# A C test that starts its own syncbnd job (tests/svc_job.c) and talks to
# it through the client library.
function(sbn_svc_job_exe name)
  add_executable(${name} ${CMAKE_CURRENT_LIST_DIR}/${name}.c
    ${CMAKE_CURRENT_LIST_DIR}/svc_job.c)
  target_link_libraries(${name} PRIVATE syncbn_client syncbn_svc syncbn
    PkgConfig::MSGPACK m)
  target_compile_definitions(${name} PRIVATE
    SBN_MPIEXEC="${MPIEXEC_EXECUTABLE}"
    SBN_SYNCBND="$<TARGET_FILE:syncbnd>")
endfunction()

add_executable(svc_codec_test ${CMAKE_CURRENT_LIST_DIR}/svc_codec_test.c
  ${CMAKE_CURRENT_LIST_DIR}/svc_testutil.c)
target_link_libraries(svc_codec_test PRIVATE syncbn_svc syncbn
  PkgConfig::CMOCKA PkgConfig::MSGPACK)
add_test(NAME svc_codec_test COMMAND svc_codec_test)
set_tests_properties(svc_codec_test PROPERTIES TIMEOUT 120 LABELS "unit;svc")

if(TARGET syncbn_client)
  # The C client's stats `want` against a scripted worker thread.
  add_executable(svc_client_want_test
    ${CMAKE_CURRENT_LIST_DIR}/svc_client_want_test.c)
  target_link_libraries(svc_client_want_test PRIVATE syncbn_client
    syncbn_proto syncbn PkgConfig::CMOCKA PkgConfig::MSGPACK)
  add_test(NAME svc_client_want_test COMMAND svc_client_want_test)
  set_tests_properties(svc_client_want_test PROPERTIES TIMEOUT 60
    LABELS "unit;svc")
endif()

if(TARGET syncbn_client AND TARGET syncbnd AND MPIEXEC_EXECUTABLE
   AND EXISTS ${CMAKE_CURRENT_LIST_DIR}/svc_server_e2e.c)
  add_executable(svc_server_e2e ${CMAKE_CURRENT_LIST_DIR}/svc_server_e2e.c)
  target_link_libraries(svc_server_e2e PRIVATE syncbn_client syncbn_svc syncbn
    PkgConfig::MSGPACK)
  target_compile_definitions(svc_server_e2e PRIVATE
    SBN_MPIEXEC="${MPIEXEC_EXECUTABLE}"
    SBN_SYNCBND="$<TARGET_FILE:syncbnd>")
  # The test starts the job itself (it needs the workers' ready lines and
  # their pids); mpirun's --timeout inside and ctest's TIMEOUT bound it.
  add_test(NAME svc_server_e2e_np2 COMMAND svc_server_e2e)
  set_tests_properties(svc_server_e2e_np2 PROPERTIES TIMEOUT 180 LABELS "mpi;svc"
    ENVIRONMENT "${svc_env}" SKIP_RETURN_CODE 77)
endif()

# syncbatchnorm across workers (protocol version 2).
if(TARGET syncbn_client AND TARGET syncbnd AND MPIEXEC_EXECUTABLE
   AND EXISTS ${CMAKE_CURRENT_LIST_DIR}/svc_sync_e2e.c)
  sbn_svc_job_exe(svc_sync_e2e)
  foreach(np 2 3)
    add_test(NAME svc_sync_e2e_np${np} COMMAND svc_sync_e2e ${np})
    set_tests_properties(svc_sync_e2e_np${np} PROPERTIES TIMEOUT 180
      LABELS "mpi;svc" ENVIRONMENT "${svc_env}")
  endforeach()
endif()

# The worker's get_state, set_state and metrics requests (no sockets).
add_executable(svc_state_metrics_test ${CMAKE_CURRENT_LIST_DIR}/svc_state_metrics_test.c
  ${CMAKE_CURRENT_LIST_DIR}/svc_testutil.c)
target_link_libraries(svc_state_metrics_test PRIVATE syncbn_svc syncbn
  PkgConfig::CMOCKA PkgConfig::MSGPACK m)
add_test(NAME svc_state_metrics_test COMMAND svc_state_metrics_test)
set_tests_properties(svc_state_metrics_test PROPERTIES TIMEOUT 60 LABELS "unit;svc")

# Batches, fusion, the stats path, sync groups, mismatches and checkpoints
# across workers (tests/svc_cross_rank.py, Debian's python with msgpack+numpy).
if(TARGET syncbnd AND MPIEXEC_EXECUTABLE AND EXISTS /usr/bin/python3)
  foreach(np 2 3)
    add_test(NAME svc_cross_rank_np${np}
      COMMAND /usr/bin/python3 ${CMAKE_CURRENT_LIST_DIR}/svc_cross_rank.py
        --np ${np} --mpirun ${MPIEXEC_EXECUTABLE}
        --syncbnd $<TARGET_FILE:syncbnd>)
    set_tests_properties(svc_cross_rank_np${np} PROPERTIES TIMEOUT 180
      LABELS "mpi;svc;python" SKIP_RETURN_CODE 77 ENVIRONMENT "${svc_env}")
  endforeach()
endif()

# Batches, stats, checkpoints and the hello token on one worker without
# the cross-rank transport (no sockets, no MPI).
add_executable(svc_worker_test ${CMAKE_CURRENT_LIST_DIR}/svc_worker_test.c
  ${CMAKE_CURRENT_LIST_DIR}/svc_testutil.c)
target_link_libraries(svc_worker_test PRIVATE syncbn_svc syncbn
  PkgConfig::CMOCKA PkgConfig::MSGPACK m)
add_test(NAME svc_worker_test COMMAND svc_worker_test)
set_tests_properties(svc_worker_test PROPERTIES TIMEOUT 60 LABELS "unit;svc")

# The agreement engine on a simulated communicator of up to 1024 ranks in
# one process: event-driven rounds, the response cache, its bytes per rank.
add_executable(svc_agree_sim_test ${CMAKE_CURRENT_LIST_DIR}/svc_agree_sim_test.c
  ${CMAKE_CURRENT_LIST_DIR}/svc_testutil.c)
target_link_libraries(svc_agree_sim_test PRIVATE syncbn_svc syncbn
  PkgConfig::CMOCKA PkgConfig::MSGPACK m)
add_test(NAME svc_agree_sim_test COMMAND svc_agree_sim_test)
set_tests_properties(svc_agree_sim_test PROPERTIES TIMEOUT 120 LABELS "unit;svc")

# The client library's protocol 3 calls (batch, stats, state, checkpoints,
# metrics, TCP) against `mpirun -np 2 syncbnd`.
if(TARGET syncbn_client AND TARGET syncbnd AND MPIEXEC_EXECUTABLE
   AND EXISTS ${CMAKE_CURRENT_LIST_DIR}/svc_client_e2e.c)
  sbn_svc_job_exe(svc_client_e2e)
  add_test(NAME svc_client_e2e COMMAND svc_client_e2e)
  set_tests_properties(svc_client_e2e PROPERTIES TIMEOUT 180
    LABELS "mpi;svc" ENVIRONMENT "${svc_env}")
endif()

# Zero-copy shared memory (protocol 6): sealed memfd regions over the
# Unix socket, the happy path bit for bit against the socket path and
# every refusal.
if(TARGET syncbnd AND TARGET syncbn_client
   AND EXISTS ${CMAKE_CURRENT_LIST_DIR}/svc_shm_e2e.c)
  sbn_svc_job_exe(svc_shm_e2e)
  add_test(NAME svc_shm_e2e COMMAND svc_shm_e2e)
  set_tests_properties(svc_shm_e2e PROPERTIES TIMEOUT 180
    LABELS "mpi;svc" ENVIRONMENT "${svc_env}")
endif()

# Tensor replies written from the result buffer, results in place, and the
# copy counters of metrics (no sockets).
add_executable(svc_zero_copy_test ${CMAKE_CURRENT_LIST_DIR}/svc_zero_copy_test.c
  ${CMAKE_CURRENT_LIST_DIR}/svc_testutil.c)
target_link_libraries(svc_zero_copy_test PRIVATE syncbn_svc syncbn
  PkgConfig::CMOCKA PkgConfig::MSGPACK m)
add_test(NAME svc_zero_copy_test COMMAND svc_zero_copy_test)
set_tests_properties(svc_zero_copy_test PROPERTIES TIMEOUT 60 LABELS "unit;svc")
