# Checkpoints through PyTorch: scripts/state_torch.py converts files written
# by tests/state_test.c (which doubles as the C side: --write-sample,
# --check-sample, --list) to state_dicts and back, and checks bit-exact
# round trips both ways. The script exits 77 where its python lacks torch or
# numpy, so the test shows as skipped rather than passed on such machines.
if(NOT TARGET state_test)
  return()
endif()

set(SBN_TORCH_PYTHON /usr/bin/python3 CACHE FILEPATH
  "Python with torch and numpy for the PyTorch checkpoint round trip")

if(EXISTS ${SBN_TORCH_PYTHON})
  add_test(NAME state_torch
    COMMAND ${SBN_TORCH_PYTHON} ${CMAKE_SOURCE_DIR}/scripts/state_torch.py
      check --tool $<TARGET_FILE:state_test>)
else()
  add_test(NAME state_torch
    COMMAND sh -c "echo 'SKIP: ${SBN_TORCH_PYTHON} does not exist'; exit 77")
endif()
set_tests_properties(state_torch PROPERTIES TIMEOUT 300 LABELS "unit;torch"
  SKIP_RETURN_CODE 77)
