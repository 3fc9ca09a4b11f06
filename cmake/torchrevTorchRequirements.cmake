# What code that includes and links LibTorch needs beyond the imported `torch`
# target, for the LibTorch that find_package(Torch) found in this scope.
# Applied to torchrev's INTERFACE target in the build tree and again by the
# installed package config (so it follows the consumer's LibTorch, not the one
# torchrev was installed with).
#
# - The C++ standard: C++20 for LibTorch 2.13 and later (2.14 stops C++17
#   with an #error), C++17 before. The `torch` target sets CXX_STANDARD on
#   itself only, which does not reach the targets that link it.
# - For a LibTorch from a `torch` wheel: the wheel's CUDA libraries find
#   their own dependencies (cuDNN, NCCL, ...) in site-packages/nvidia through
#   $ORIGIN run paths, but the linker looks in the CUDA toolkit's directories
#   first, whose older NCCL lacks symbols libtorch_cuda needs. -rpath-link
#   points the linker at the wheel's copies; it changes nothing at run time.
function(torchrev_apply_torch_requirements target)
  if(DEFINED Torch_VERSION AND Torch_VERSION VERSION_GREATER_EQUAL 2.13)
    set(cxx_feature cxx_std_20)
  else()
    set(cxx_feature cxx_std_17)
  endif()
  set_property(TARGET ${target}
    PROPERTY INTERFACE_COMPILE_FEATURES ${cxx_feature})

  set(link_options "")
  if(Torch_DIR)
    get_filename_component(site_packages "${Torch_DIR}/../../../.." ABSOLUTE)
    file(GLOB wheel_lib_dirs LIST_DIRECTORIES true
      "${site_packages}/nvidia/*/lib")
    if(wheel_lib_dirs)
      list(JOIN wheel_lib_dirs ":" joined)
      set(link_options "LINKER:-rpath-link,${joined}")
    endif()
  endif()
  set_property(TARGET ${target} PROPERTY INTERFACE_LINK_OPTIONS ${link_options})
  set(TORCHREV_CXX_FEATURE ${cxx_feature} PARENT_SCOPE)
endfunction()
