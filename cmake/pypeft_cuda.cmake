# CUDA for the CMake build: the fixes setup.py applies for the pip build, in
# CMake (see BUILD-NOTES "CUDA without a GPU").
#
#   pypeft_prepare_cuda()        before find_package(Torch)
#   pypeft_add_cuda_sources(<target> <cu files>...)   after it and enable_language(CUDA)

# A CUDA build of torch sets up CUDA in its own CMake config (FindCUDA,
# enable_language(CUDA), nvcc -gencode flags from TORCH_CUDA_ARCH_LIST, which
# it uses instead of CMAKE_CUDA_ARCHITECTURES). Two things it gets wrong on
# the machines we build on are settled here, before find_package(Torch):
function(pypeft_prepare_cuda)
  # Without a visible GPU torch falls back to a list of architectures that
  # starts at 5.0, which CUDA 13 no longer compiles. Unless told otherwise
  # (TORCH_CUDA_ARCH_LIST, variable or environment): Ampere and Hopper, as
  # setup.py compiles when no GPU is visible.
  if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(TORCH_CUDA_ARCH_LIST "8.0;9.0" CACHE STRING "GPU architectures to compile for")
  endif()
  pypeft_resolve_cuda_toolkit_root()
endfunction()

# On some machines the nvcc on PATH is a small wrapper script that execs the
# real compiler inside the toolkit. FindCUDA derives the toolkit root from the
# wrapper's location and then finds neither headers nor libraries. nvcc's dry
# run prints the real root (its TOP= line): use it when the user has not named
# a toolkit.
function(pypeft_resolve_cuda_toolkit_root)
  if(CUDA_TOOLKIT_ROOT_DIR OR CUDAToolkit_ROOT OR CMAKE_CUDA_COMPILER
     OR DEFINED ENV{CUDA_HOME} OR DEFINED ENV{CUDA_PATH} OR DEFINED ENV{CUDAToolkit_ROOT}
     OR DEFINED ENV{CUDACXX})
    return()
  endif()
  find_program(PYPEFT_NVCC nvcc)
  if(NOT PYPEFT_NVCC)
    return()
  endif()
  set(probe "${CMAKE_BINARY_DIR}/CMakeFiles/pypeft_cuda_probe.cu")
  file(WRITE "${probe}" "\n")
  execute_process(COMMAND "${PYPEFT_NVCC}" -dryrun -c "${probe}" -o "${probe}.o"
                  OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 60)
  if(NOT "${out}${err}" MATCHES "#\\$ TOP=([^\n]*)")
    return()
  endif()
  string(STRIP "${CMAKE_MATCH_1}" top)
  get_filename_component(root "${top}" REALPATH)
  if(NOT EXISTS "${root}/include/cuda_runtime.h" OR NOT EXISTS "${root}/bin/nvcc")
    return()
  endif()
  message(STATUS "pypeft: CUDA toolkit at ${root} (from ${PYPEFT_NVCC} -dryrun)")
  set(CUDA_TOOLKIT_ROOT_DIR "${root}" CACHE PATH "CUDA toolkit root")
  set(CUDAToolkit_ROOT "${root}" CACHE PATH "CUDA toolkit root")
  set(CMAKE_CUDA_COMPILER "${root}/bin/nvcc" CACHE FILEPATH "CUDA compiler")
endfunction()

# Adds the CUDA kernels to target. Call after find_package(Torch) and
# enable_language(CUDA) (which only the top-level file may call).
function(pypeft_add_cuda_sources target)
  target_sources(${target} PRIVATE ${ARGN})
  target_compile_definitions(${target} PRIVATE PYPEFT_WITH_CUDA=1)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>)
  # A runtime-only toolkit lacks cublas_v2.h and friends; the nvidia-* wheels
  # beside a pip-installed CUDA torch carry them.
  file(GLOB headers "${TORCH_INSTALL_PREFIX}/../nvidia/*/include/cublas_v2.h")
  foreach(header IN LISTS headers)
    get_filename_component(dir "${header}" DIRECTORY)
    # SYSTEM AFTER: searched after the toolkit's own headers (cuda_runtime.h,
    # crt/), which must match its nvcc; the wheel only fills in what is missing.
    target_include_directories(${target} SYSTEM AFTER PRIVATE "${dir}")
  endforeach()
endfunction()
