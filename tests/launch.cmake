# The one-command launch and the Python package:
# - syncbnd_launch: exit codes, the children's environment, directories,
#   SIGTERM (tests/launch_test.sh);
# - python_pkg_install: pip install into a fresh venv, used from /
#   (tests/python_pkg_test.sh; skipped without python3-venv);
# - python_torch_module: `mpirun -np 2 syncbnd -- python3
#   tests/torch_module_test.py`, syncbn.torch against torch.nn.BatchNorm*
#   on the concatenated shards (skipped without torch);
# - install_tree: cmake --install into a temporary prefix, used from /;
# - syncbnd_observe: log lines, timelines, `syncbn metrics`.
if(NOT TARGET syncbnd OR NOT MPIEXEC_EXECUTABLE)
  message(STATUS "launch tests disabled: no syncbnd or mpiexec")
  return()
endif()
# The MPI tests' environment (tests/mpi.cmake, which is read after this
# file): root allowed and, under the sanitizers, Open MPI's leak
# suppressions with the slow unwinding they need.
set(launch_env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
if(SBN_SANITIZE)
  list(APPEND launch_env ASAN_OPTIONS=fast_unwind_on_malloc=0
    LSAN_OPTIONS=suppressions=${CMAKE_CURRENT_LIST_DIR}/lsan.supp)
endif()

add_test(NAME syncbnd_launch
  COMMAND sh ${CMAKE_CURRENT_LIST_DIR}/launch_test.sh ${MPIEXEC_EXECUTABLE}
    $<TARGET_FILE:syncbnd>)
set_tests_properties(syncbnd_launch PROPERTIES TIMEOUT 120 LABELS "svc;launch"
  ENVIRONMENT "${launch_env}")

# Option and rank-count messages of syncbnd and syncbn apply.
if(TARGET syncbn_cli)
  add_test(NAME cli_warnings
    COMMAND sh ${CMAKE_CURRENT_LIST_DIR}/cli_warn_test.sh ${MPIEXEC_EXECUTABLE}
      $<TARGET_FILE:syncbnd> $<TARGET_FILE:syncbn_cli>)
  set_tests_properties(cli_warnings PROPERTIES TIMEOUT 60 LABELS "cli"
    ENVIRONMENT "${launch_env}")
endif()

if(NOT EXISTS ${SBN_PYTHON})
  message(STATUS "Python package tests disabled: no ${SBN_PYTHON}")
  return()
endif()

# syncbnd --log-level/--timeline and `syncbn metrics` (tests/obs_test.sh).
if(TARGET syncbn_cli)
  add_test(NAME syncbnd_observe
    COMMAND sh ${CMAKE_CURRENT_LIST_DIR}/obs_test.sh ${MPIEXEC_EXECUTABLE}
      $<TARGET_FILE:syncbnd> $<TARGET_FILE:syncbn_cli> ${SBN_PYTHON})
  set_tests_properties(syncbnd_observe PROPERTIES TIMEOUT 120
    LABELS "svc;python" SKIP_RETURN_CODE 77 ENVIRONMENT "${launch_env}")
endif()
# Python (and torch) under the sanitizers would need the ASan runtime
# preloaded into the interpreter, hence nosan.
add_test(NAME python_pkg_install
  COMMAND sh ${CMAKE_CURRENT_LIST_DIR}/python_pkg_test.sh ${SBN_PYTHON}
    ${CMAKE_SOURCE_DIR}/src/python)
set_tests_properties(python_pkg_install PROPERTIES TIMEOUT 120
  LABELS "python;nosan" SKIP_RETURN_CODE 77)

add_test(NAME python_torch_module
  COMMAND ${MPIEXEC_EXECUTABLE} --oversubscribe --bind-to none --mca pml ob1
    --mca btl self,vader,tcp --timeout 150 -np 2 $<TARGET_FILE:syncbnd> --
    ${SBN_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/torch_module_test.py)
set_tests_properties(python_torch_module PROPERTIES TIMEOUT 180
  LABELS "svc;python;torch;nosan" SKIP_RETURN_CODE 77
  ENVIRONMENT "${launch_env}")

add_test(NAME install_tree
  COMMAND sh ${CMAKE_CURRENT_LIST_DIR}/install_test.sh ${CMAKE_COMMAND}
    ${CMAKE_BINARY_DIR} ${MPIEXEC_EXECUTABLE} ${SBN_PYTHON})
set_tests_properties(install_tree PROPERTIES TIMEOUT 120
  LABELS "install;nosan" ENVIRONMENT "${launch_env}")

# The README's PyTorch example, as a user runs it: one command, uneven
# shards, then an empty shard; every rank must pass its checks against
# single-process torch (exit 0). Skipped (77) without torch.
foreach(case "30,18;8" "0,20;3")
  list(GET case 0 counts)
  list(GET case 1 steps)
  string(REPLACE "," "_" tag ${counts})
  add_test(NAME python_torch_train_${tag}
    COMMAND sh -c "\"$0\" -c 'import torch, torch.distributed' 2>/dev/null || { echo 'SKIP: no torch'; exit 77; }; exec \"$1\" --oversubscribe --bind-to none --mca pml ob1 --mca btl self,vader,tcp --timeout 150 -np 2 \"$2\" -- \"$0\" \"$3\" --steps $4 --counts $5"
      ${SBN_PYTHON} ${MPIEXEC_EXECUTABLE} $<TARGET_FILE:syncbnd>
      ${CMAKE_SOURCE_DIR}/examples/python/train_fashion_mnist.py ${steps} ${counts})
  set_tests_properties(python_torch_train_${tag} PROPERTIES TIMEOUT 180
    LABELS "svc;python;torch;nosan" SKIP_RETURN_CODE 77
    PASS_REGULAR_EXPRESSION "rank 1: PASS" FAIL_REGULAR_EXPRESSION "FAIL"
    ENVIRONMENT "${launch_env}")
endforeach()
