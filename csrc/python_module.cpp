// The Python extension module pypeft._C. It holds no functions: importing it
// runs the static TORCH_LIBRARY registrations of the ops linked into it, and
// the ops are then reached as torch.ops.pypeft.*. (Plain CPython init rather
// than pybind11 keeps the module free of Python-binding code.)
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
