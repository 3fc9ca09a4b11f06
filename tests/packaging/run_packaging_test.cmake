# Installs torchrev from TORCHREV_SOURCE_DIR into WORK_DIR/prefix, then
# configures, builds and runs the consumer project against that install.
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(run_step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "packaging step failed (${result}): ${ARGN}")
  endif()
endfunction()

set(launcher "")
if(CXX_COMPILER_LAUNCHER)
  set(launcher "-DCMAKE_CXX_COMPILER_LAUNCHER=${CXX_COMPILER_LAUNCHER}")
endif()

run_step("${CMAKE_COMMAND}" -S "${TORCHREV_SOURCE_DIR}" -B "${WORK_DIR}/torchrev"
  -DTORCHREV_BUILD_TESTS=OFF -DTORCHREV_BUILD_EXAMPLES=OFF
  -DTORCHREV_BUILD_BENCHMARKS=OFF "-DTorch_DIR=${Torch_DIR}"
  "-DCaffe2_DIR=${Torch_DIR}/../Caffe2")
run_step("${CMAKE_COMMAND}" --install "${WORK_DIR}/torchrev"
  --prefix "${WORK_DIR}/prefix")
# TorchConfig looks for its Caffe2 package with PATHS, which CMake searches
# after the default locations: with Torch_DIR alone, a LibTorch from a wheel
# would be paired with the system's Caffe2 (Debian's 1.13). Name both.
run_step("${CMAKE_COMMAND}" -S "${TORCHREV_SOURCE_DIR}/tests/packaging/consumer"
  -B "${WORK_DIR}/consumer" "-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix"
  "-DTorch_DIR=${Torch_DIR}" "-DCaffe2_DIR=${Torch_DIR}/../Caffe2"
  -DCMAKE_BUILD_TYPE=Release ${launcher})
run_step("${CMAKE_COMMAND}" --build "${WORK_DIR}/consumer")
run_step("${WORK_DIR}/consumer/consumer")
