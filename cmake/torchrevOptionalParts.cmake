# Helpers for torchrev's optional parts (tests, examples, benchmarks) and for
# being consumed with add_subdirectory or FetchContent.

# option(NAME DOC ${PROJECT_IS_TOP_LEVEL}), remembering whether the user set
# it (on the command line or in the cache) in NAME_EXPLICIT.
macro(torchrev_part_option name doc)
  if(DEFINED CACHE{${name}})
    set(${name}_EXPLICIT ON)
  else()
    set(${name}_EXPLICIT OFF)
  endif()
  option(${name} "${doc}" ${PROJECT_IS_TOP_LEVEL})
endmacro()

# torchrev_find_part_dependencies(<option> <result var> <package>...)
# Looks up each package (a name, or NAME:CONFIG for config-only packages).
# Sets <result var> to TRUE when all are found. When one is missing: a fatal
# error naming it if <option> was set explicitly, else a status message and
# FALSE, so that the part is skipped.
function(torchrev_find_part_dependencies option result)
  set(missing "")
  foreach(spec IN LISTS ARGN)
    string(REPLACE ":" ";" parts "${spec}")
    list(GET parts 0 package)
    list(LENGTH parts n)
    if(n GREATER 1)
      find_package(${package} CONFIG QUIET)
    else()
      find_package(${package} QUIET)
    endif()
    if(NOT ${package}_FOUND)
      list(APPEND missing ${package})
    endif()
  endforeach()
  if(missing)
    string(REPLACE ";" ", " missing_text "${missing}")
    if(${option}_EXPLICIT)
      message(FATAL_ERROR "torchrev: ${option}=ON needs ${missing_text}, "
        "which CMake did not find (on Debian: bash scripts/setup.sh installs "
        "them; or pass -D${option}=OFF)")
    endif()
    message(STATUS "torchrev: ${option}: skipped, ${missing_text} not found "
      "(pass -D${option}=ON to require them)")
    set(${result} FALSE PARENT_SCOPE)
  else()
    set(${result} TRUE PARENT_SCOPE)
  endif()
endfunction()

# Makes the imported targets created in the calling directory (LibTorch's,
# and those its package config imported: Caffe2, CUDA, ...) global.
function(torchrev_promote_imported_targets)
  if(CMAKE_VERSION VERSION_GREATER_EQUAL 3.21)
    get_property(targets DIRECTORY PROPERTY IMPORTED_TARGETS)
  else()
    set(targets torch torch_library torch_cpu torch_cuda torch_cuda_linalg
      c10 c10_cuda caffe2::mkl caffe2::mkldnn caffe2::cudart caffe2::cuda
      caffe2::nvrtc caffe2::cublas caffe2::cudnn caffe2::curand caffe2::cufft
      caffe2::nvToolsExt torch::cudart torch::cufft torch::curand
      torch::cublas torch::nvtoolsext torch::nvrtc)
  endif()
  foreach(target IN LISTS targets)
    if(TARGET ${target})
      get_target_property(global ${target} IMPORTED_GLOBAL)
      get_target_property(imported ${target} IMPORTED)
      if(imported AND NOT global)
        set_property(TARGET ${target} PROPERTY IMPORTED_GLOBAL TRUE)
      endif()
    endif()
  endforeach()
endfunction()

# torchrev_link_allocator(<target>): links tcmalloc (gperftools' minimal
# build) into an executable when TORCHREV_USE_TCMALLOC is on and it was
# found. Measured on revnet110 training (batch 128, 2 threads): peak RSS
# 328-338 MiB instead of 472 MiB with glibc's malloc, for the same 104 MiB of
# activations; step times within the machine's noise (median 1.51 s against
# 1.83 s; benchmarks/results/cpu_allocator.txt). --no-as-needed: nothing
# calls it by name, so the linker would otherwise drop it.
function(torchrev_link_allocator target)
  if(TORCHREV_USE_TCMALLOC AND TORCHREV_TCMALLOC_LIBRARY)
    target_link_libraries(${target} PRIVATE
      "-Wl,--push-state,--no-as-needed" "${TORCHREV_TCMALLOC_LIBRARY}"
      "-Wl,--pop-state")
    target_compile_definitions(${target} PRIVATE TORCHREV_TCMALLOC)
  endif()
endfunction()
