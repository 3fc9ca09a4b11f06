# Builds and runs a tiny consumer of torchrev in WORK_DIR, by ROUTE:
#   install       install torchrev into a scratch prefix, then
#                 find_package(torchrev CONFIG) from the consumer
#   buildtree     configure torchrev (no install), then find_package with
#                 torchrev_DIR set to that build directory
#   subdirectory  add_subdirectory(torchrev) and nothing else
#   fetchcontent  FetchContent from TORCHREV_SOURCE_DIR's git repository at
#                 its HEAD commit (skipped where it is not a git checkout)
# Every route passes only Torch_DIR (and Caffe2_DIR, see below).
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(run_step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "packaging (${ROUTE}) step failed (${result}): ${ARGN}")
  endif()
endfunction()

set(common "-DTorch_DIR=${Torch_DIR}" "-DCMAKE_BUILD_TYPE=Release"
  # TorchConfig looks for its Caffe2 package with PATHS, which CMake searches
  # after the default locations: with Torch_DIR alone, a LibTorch from a
  # wheel would be paired with the system's Caffe2 (Debian's 1.13).
  "-DCaffe2_DIR=${Torch_DIR}/../Caffe2")
if(CXX_COMPILER_LAUNCHER)
  list(APPEND common "-DCMAKE_CXX_COMPILER_LAUNCHER=${CXX_COMPILER_LAUNCHER}")
endif()
set(packaging "${TORCHREV_SOURCE_DIR}/tests/packaging")

if(ROUTE STREQUAL "install" OR ROUTE STREQUAL "buildtree")
  # Installing needs only LibTorch: configure at the defaults as if the
  # tests', examples' and benchmarks' dependencies were not installed.
  set(parts "")
  if(ROUTE STREQUAL "install")
    foreach(package GTest fmt ZLIB nlohmann_json CLI11)
      list(APPEND parts "-DCMAKE_DISABLE_FIND_PACKAGE_${package}=ON")
    endforeach()
  else()
    set(parts -DTORCHREV_BUILD_TESTS=OFF -DTORCHREV_BUILD_EXAMPLES=OFF
      -DTORCHREV_BUILD_BENCHMARKS=OFF)
  endif()
  run_step("${CMAKE_COMMAND}" -S "${TORCHREV_SOURCE_DIR}"
    -B "${WORK_DIR}/torchrev" ${parts} ${common})
  if(ROUTE STREQUAL "install")
    run_step("${CMAKE_COMMAND}" --install "${WORK_DIR}/torchrev"
      --prefix "${WORK_DIR}/prefix")
    set(locate "-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix")
  else()
    set(locate "-Dtorchrev_DIR=${WORK_DIR}/torchrev")
  endif()
  run_step("${CMAKE_COMMAND}" -S "${packaging}/consumer"
    -B "${WORK_DIR}/consumer" ${locate} ${common})
elseif(ROUTE STREQUAL "subdirectory")
  run_step("${CMAKE_COMMAND}" -S "${packaging}/subdirectory"
    -B "${WORK_DIR}/consumer" "-DTORCHREV_SOURCE_DIR=${TORCHREV_SOURCE_DIR}"
    ${common})
elseif(ROUTE STREQUAL "fetchcontent")
  execute_process(COMMAND git -C "${TORCHREV_SOURCE_DIR}" rev-parse HEAD
    RESULT_VARIABLE not_git OUTPUT_VARIABLE head
    OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(not_git)
    message("torchrev packaging: skipped: ${TORCHREV_SOURCE_DIR} is not a "
      "git checkout")
    return()
  endif()
  run_step("${CMAKE_COMMAND}" -S "${packaging}/fetchcontent"
    -B "${WORK_DIR}/consumer" "-DTORCHREV_GIT_URL=file://${TORCHREV_SOURCE_DIR}"
    "-DTORCHREV_GIT_TAG=${head}" ${common})
else()
  message(FATAL_ERROR "unknown ROUTE '${ROUTE}'")
endif()
run_step("${CMAKE_COMMAND}" --build "${WORK_DIR}/consumer")
run_step("${WORK_DIR}/consumer/consumer")
