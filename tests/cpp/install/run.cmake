# cmake -DBUILD_DIR=<lora_ops build> -DSOURCE_DIR=<this folder> -DWORK_DIR=<scratch>
#       -DC_COMPILER=<cc> [-DC_FLAGS=...] [-DLINKER_FLAGS=...] -P run.cmake
# Installs the built library under WORK_DIR/prefix, configures and builds the consumer project
# against it, and runs both consumers. Any failure stops with the step's output.
foreach(var BUILD_DIR SOURCE_DIR WORK_DIR C_COMPILER)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run.cmake: -D${var}= is required")
  endif()
endforeach()
file(REMOVE_RECURSE "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")

function(step name)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "test_install: ${name} failed (${rc}):\n${out}")
  endif()
  message(STATUS "test_install: ${name}: ok")
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

step(install ${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${prefix}")
# lib or lib64, as GNUInstallDirs chose.
file(GLOB pc_files "${prefix}/lib*/pkgconfig/lora_ops.pc")
list(LENGTH pc_files found)
if(NOT found EQUAL 1)
  message(FATAL_ERROR "test_install: no single lora_ops.pc under ${prefix}: ${pc_files}")
endif()
get_filename_component(pc_dir "${pc_files}" DIRECTORY)
set(ENV{PKG_CONFIG_PATH} "${pc_dir}")
step(configure ${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${WORK_DIR}/build"
     -DCMAKE_C_COMPILER=${C_COMPILER} -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_BUILD_TYPE=Release
     "-DCMAKE_C_FLAGS=${C_FLAGS}" "-DCMAKE_EXE_LINKER_FLAGS=${LINKER_FLAGS}")
step(build ${CMAKE_COMMAND} --build "${WORK_DIR}/build")
foreach(consumer consumer_cmake consumer_pkgconfig)
  step(${consumer} "${WORK_DIR}/build/${consumer}")
  message(STATUS "${step_output}")
endforeach()
