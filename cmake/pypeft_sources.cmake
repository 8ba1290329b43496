# Which files under csrc/ make up the native ops: the one list that the CMake
# build reads (setup.py globs the same directories for the pip build).
#
#   include(cmake/pypeft_sources.cmake)
#   pypeft_sources(<root> <cpu_var> <cuda_var>)
#
# <cpu_var>: csrc/*.cpp and csrc/cpu/*.cpp, minus csrc/python_module.cpp (the
# Python extension's module init, which needs Python.h and has no ops).
# <cuda_var>: csrc/cuda/*.cu. Globbed with CONFIGURE_DEPENDS, so a new op's
# files join the build without touching any CMake file.
function(pypeft_sources root cpu_var cuda_var)
  file(GLOB cpu CONFIGURE_DEPENDS "${root}/csrc/*.cpp" "${root}/csrc/cpu/*.cpp")
  list(FILTER cpu EXCLUDE REGEX "/csrc/python_module\\.cpp$")
  file(GLOB cuda CONFIGURE_DEPENDS "${root}/csrc/cuda/*.cu")
  list(SORT cpu)
  list(SORT cuda)
  if(NOT cpu)
    message(FATAL_ERROR "pypeft: no C++ sources under ${root}/csrc")
  endif()
  set(${cpu_var} "${cpu}" PARENT_SCOPE)
  set(${cuda_var} "${cuda}" PARENT_SCOPE)
endfunction()
