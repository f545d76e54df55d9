# The SBN_KERNELS environment variable forces a kernel set when the CPU can
# run it and is ignored otherwise (syncbn --version names the set in use).
if(NOT TARGET syncbn_cli)
  return()
endif()
add_test(NAME kernels_env_ref COMMAND syncbn_cli --version)
set_tests_properties(kernels_env_ref PROPERTIES LABELS unit TIMEOUT 30
  ENVIRONMENT "SBN_KERNELS=ref" PASS_REGULAR_EXPRESSION "kernels: ref\\)")
add_test(NAME kernels_env_unknown COMMAND syncbn_cli --version)
set_tests_properties(kernels_env_unknown PROPERTIES LABELS unit TIMEOUT 30
  ENVIRONMENT "SBN_KERNELS=sse9"
  PASS_REGULAR_EXPRESSION "kernels: (avx512|avx2|ref)\\)")
