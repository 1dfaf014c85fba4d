// The op schemas of the "ext" backend; each device file registers its kernels (csrc/cpu/cov_pool_ext.cpp,
// csrc/cuda/cov_pool_ext.cu). The contract is declared in threeg_kernels/_registration.py (FORWARD_SCHEMA,
// BACKWARD_SCHEMA), which checks these declarations against it when the backend loads.
//
// FRAGMENT, not TORCH_LIBRARY: the Python backends define ops in the same `threeg` namespace.
//
// This file is also the Python module `threeg_kernels._C`: importing it loads the library (and with it
// the registrations); `_C.cuda_built()` says whether the CUDA kernels were compiled in, `_C.small_eigh_max()`
// up to which size the CPU kernels use their own eigensolver, `_C.cpu_variants()` which instruction-set variants of
// them this CPU runs and `_C.cpu_variant()` the one the ops call; `_C.pool` is the ops' autograd node in C++
// (csrc/autograd.cpp).
#include <Python.h>
#include <torch/library.h>

#include "autograd.h"
#include "cov_pool_ext.h"

TORCH_LIBRARY_FRAGMENT(threeg, m) {
  m.def(
      "cov_pool_ext_forward(Tensor x, Tensor? weight, int iters, float eps, str order, bool keep_iterates,"
      " str precision) -> (Tensor out, Tensor A, Tensor tr, Tensor iterates)");
  m.def(
      "cov_pool_ext_backward(Tensor grad, Tensor x, Tensor? weight, Tensor out, Tensor A, Tensor tr,"
      " Tensor iterates, int iters, str order, str precision) -> (Tensor dx, Tensor dweight)");
}

namespace {

PyObject* cuda_built(PyObject*, PyObject*) {
#ifdef THREEG_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// f() (a new reference), with a c10::Error raised as RuntimeError (its message without the C++ backtrace): what
// the CPU kernels' queries raise where THREEG_EXT_ISA names a variant this CPU or build does not run.
template <typename F>
PyObject* raising_runtime_error(F f) {
  try {
    return f();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* small_eigh_max(PyObject*, PyObject*) {
  return raising_runtime_error([] {
    const long long f32 = threeg::small_eigh_max(false), f64 = threeg::small_eigh_max(true);
    return Py_BuildValue("{s:L,s:L}", "float32", f32, "float64", f64);
  });
}

PyObject* cpu_variants(PyObject*, PyObject*) {
  const std::vector<std::string> names = threeg::cpu_variants();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) {
    PyObject* name = PyUnicode_FromString(names[i].c_str());
    if (name == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), name);
  }
  return list;
}

PyObject* cpu_variant(PyObject*, PyObject*) {
  return raising_runtime_error([] { return PyUnicode_FromString(threeg::cpu_variant().c_str()); });
}

PyMethodDef methods[] = {
    {"cuda_built", cuda_built, METH_NOARGS, "True if the CUDA kernels of the ext backend were compiled in."},
    {"small_eigh_max", small_eigh_max, METH_NOARGS,
     "{dtype name: n}: the CPU kernels eigendecompose n x n matrices up to n with their own solver, above with syevd."},
    {"cpu_variants", cpu_variants, METH_NOARGS,
     "The instruction-set variants of the CPU kernels this build has and this CPU runs, best last; the ops run the "
     "best unless THREEG_EXT_ISA names another."},
    {"cpu_variant", cpu_variant, METH_NOARGS,
     "The variant the ops call now: the one THREEG_EXT_ISA names, or the best; RuntimeError where the ops would raise."},
    {"pool", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(threeg::pool_autograd)), METH_FASTCALL,
     "pool(x, weight, iters, eps, order, keep_iterates, precision) -> out: threeg::cov_pool_ext_forward's out, "
     "differentiable in x and weight by the op's formula in a C++ autograd node (csrc/autograd.cpp)."},
    {"fast_pool", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(threeg::fast_pool)), METH_FASTCALL,
     "fast_pool(x, weight, iters, eps, order, backend, precision, keep_iterates) -> out or None: "
     "cov_pool(backend='ext')'s common eager CPU case in one call (csrc/autograd.cpp; cov_pool passes 'auto' as "
     "'ext' where it runs ext); None where the Python layer decides."},
    {"set_reference_gradient", threeg::set_reference_gradient, METH_O,
     "set_reference_gradient(fn): fn(x, weight, grad_out, iters, eps, order) -> (dx or None, dweight or None), "
     "what pool's backward returns where the gradient is itself differentiated (create_graph=True)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "Compiled kernels of the 'ext' backend (threeg::cov_pool_ext_*).",
                      -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
