// The Python module sa_cuda._C. Importing it loads this shared library, whose static initializers
// register the ops with torch's dispatcher (ops.cpp; cuda/register_cuda.cpp); Python reaches the
// ops through torch.ops.sa_cuda. The module itself holds only build information, for
// `python -m sa_cuda` and the tests. Python's C API alone, no pybind11: torch/extension.h (pybind11
// and torch's Python bindings) made this the slowest file of the build.
#include <Python.h>

namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
#if defined(CPU_CAPABILITY_AVX2)
  return PyUnicode_FromString("AVX2");
#else
  return PyUnicode_FromString("DEFAULT");
#endif
}

PyObject* cuda_built(PyObject*, PyObject*) {
#if defined(SA_CUDA_WITH_CUDA)
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The vector ISA the CPU kernels were built for: 'AVX2' or 'DEFAULT'."},
    {"cuda_built", cuda_built, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "sa_cuda's compiled ops (torch.ops.sa_cuda)", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
