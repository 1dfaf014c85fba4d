// The Python entry points of csrc/autograd.cpp (the module's methods, csrc/ops.cpp).
#pragma once
#include <Python.h>

namespace threeg {
PyObject* pool_autograd(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* set_reference_gradient(PyObject* self, PyObject* fn);
PyObject* fast_pool(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
}  // namespace threeg
