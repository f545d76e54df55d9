# Fuzz targets (tests/fuzz/fuzz_*.c): the frame + msgpack decoder with the
# worker's request validation, the checkpoint decoder and the .npy reader.
# Every build replays the seed corpora and the crash inputs kept in
# tests/fuzz/regress/ through each target (fuzz_*_replay, a plain main).
# With -DSBN_FUZZ=ON and clang, the libFuzzer binaries fuzz_* are built too
# (scripts/test runs each for about a minute under ASan + UBSan).
if(NOT TARGET syncbn_svc)
  return()
endif()
set(SBN_FUZZ_DIR ${CMAKE_CURRENT_LIST_DIR}/fuzz)
foreach(t frame ckpt npy)
  set(libs syncbn)
  if(t STREQUAL "frame")
    set(libs syncbn_svc syncbn_proto syncbn)
  endif()
  add_executable(fuzz_${t}_replay ${SBN_FUZZ_DIR}/fuzz_${t}.c
    ${SBN_FUZZ_DIR}/replay.c)
  target_link_libraries(fuzz_${t}_replay PRIVATE ${libs})
  add_test(NAME fuzz_${t}_replay COMMAND fuzz_${t}_replay
    ${SBN_FUZZ_DIR}/corpus/${t} ${SBN_FUZZ_DIR}/regress/${t})
  set_tests_properties(fuzz_${t}_replay PROPERTIES TIMEOUT 60
    LABELS "unit;fuzz")
  if(SBN_FUZZ)
    add_executable(fuzz_${t} ${SBN_FUZZ_DIR}/fuzz_${t}.c)
    target_link_libraries(fuzz_${t} PRIVATE ${libs})
    target_link_options(fuzz_${t} PRIVATE -fsanitize=fuzzer)
  endif()
endforeach()
