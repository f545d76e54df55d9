# The layout's rules (tests/layout_check.py): no MPI in src/, file and
# function sizes, include arrows that point one way.
if(EXISTS /usr/bin/python3)
  add_test(NAME layout
    COMMAND /usr/bin/python3 ${CMAKE_CURRENT_LIST_DIR}/layout_check.py
      ${CMAKE_SOURCE_DIR})
  set_tests_properties(layout PROPERTIES TIMEOUT 30 LABELS unit)
endif()
