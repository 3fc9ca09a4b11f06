# Fails when a C++ source of torchrev's is not formatted as .clang-format
# says (the Lint.ClangFormat test). Fix with:
#   clang-format -i $(git ls-files '*.h' '*.cpp')
#
#   cmake -DCLANG_FORMAT=<clang-format> -DSOURCE_DIR=<torchrev> -P check_format.cmake
set(_files "")
foreach(_dir include examples tests benchmarks fuzz)
  file(GLOB_RECURSE _found "${SOURCE_DIR}/${_dir}/*.h" "${SOURCE_DIR}/${_dir}/*.cpp")
  list(APPEND _files ${_found})
endforeach()
list(LENGTH _files _count)
if(_count EQUAL 0)
  message(FATAL_ERROR "torchrev format check: no sources under ${SOURCE_DIR}")
endif()
execute_process(
  COMMAND "${CLANG_FORMAT}" --dry-run --Werror ${_files}
  RESULT_VARIABLE _result
  ERROR_VARIABLE _errors)
if(NOT _result EQUAL 0)
  message(FATAL_ERROR "${_errors}\ntorchrev format check: the files above "
    "are not formatted as .clang-format says; run clang-format -i on them")
endif()
message(STATUS "torchrev format check: ${_count} files formatted")
