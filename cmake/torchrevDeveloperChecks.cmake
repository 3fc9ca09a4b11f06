# Checks on torchrev's own code, for its tests, examples and benchmarks (not
# for projects that use torchrev: its targets carry no warning flags).
#
#   torchrev_target_warnings(<target>)  the compiler warnings torchrev's code
#                                       is kept free of; errors with
#                                       TORCHREV_WERROR (CI sets it)
#
# LibTorch's, GoogleTest's, fmt's and CLI11's headers come from imported
# targets, which CMake includes as system headers: their warnings stay quiet.

option(TORCHREV_WERROR "Treat warnings in torchrev's own code as errors" OFF)

function(torchrev_target_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE
      -Wall -Wextra -Wpedantic -Wshadow -Woverloaded-virtual)
    if(TORCHREV_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
      # GCC's flow analysis of sanitizer-instrumented code reports
      # maybe-uninitialized inside libstdc++ (<regex>, 24 times in the 1.13
      # build), so in such builds that one warning is not an error.
      if(TORCHREV_SANITIZE AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
        target_compile_options(${target} PRIVATE
          -Wno-error=maybe-uninitialized)
      endif()
    endif()
  endif()
endfunction()
