// The ext backend's autograd node in C++: what cov_pool runs in eager mode when a gradient is needed (the Python
// layer, threeg_kernels/_registration.py, calls it for plain tensors outside torch.compile; traced code gets the
// registered ops and their formula instead). The same formula as the registered one, without a Python frame in the
// forward's bookkeeping or in the backward: the engine calls CovPoolExt::backward directly, and the Python that runs
// around the op after its kernels have filled the core's caches is what a call of a small shape waits on
// (docs/ext.md, "Per-call cost").
//
//   threeg_kernels._C.pool(x, weight, iters, eps, order, keep_iterates, precision) -> out
//       out of threeg::cov_pool_ext_forward, differentiable in x and weight;
//   threeg_kernels._C.fast_pool(x, weight, iters, eps, order, backend, precision, keep_iterates) -> out or None
//       cov_pool(backend='ext')'s common eager case on CPU in one call (fast_pool below; cov_pool passes 'auto'
//       as 'ext' where it runs ext), None where the Python layer decides;
//   threeg_kernels._C.set_reference_gradient(fn)
//       fn(x, weight, grad_out, iters, eps, order) -> (dx or None, dweight or None): the gradient as a differentiable
//       function, taken where the backward itself is differentiated (create_graph=True); the Python layer registers
//       the reference math's (the backward op has no derivative of its own).
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/autocast_mode.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <cfloat>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "autograd.h"

namespace threeg {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOp = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&, int64_t,
                                                              double, c10::string_view, bool, c10::string_view);
using BackwardOp = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                              const Tensor&, const Tensor&, const Tensor&, int64_t, c10::string_view,
                                              c10::string_view);

// The ops through the dispatcher (so that each device's kernel runs), looked up once.
const c10::TypedOperatorHandle<ForwardOp>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("threeg::cov_pool_ext_forward", "").typed<ForwardOp>();
  return op;
}

const c10::TypedOperatorHandle<BackwardOp>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("threeg::cov_pool_ext_backward", "").typed<BackwardOp>();
  return op;
}

PyObject* reference_gradient = nullptr;  // set_reference_gradient's fn (a strong reference, kept for the process)

}  // namespace

// (outside the anonymous namespace: the node's name, out.grad_fn.name(), is
// "torch::autograd::CppNode<threeg::CovPoolExt>")
struct CovPoolExt : public torch::autograd::Function<CovPoolExt> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& weight, int64_t iters,
                        double eps, const std::string& order, bool keep_iterates, const std::string& precision) {
    // Below Autograd: the op's kernel, not its registered (Python) autograd formula.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, A, tr, iterates] = forward_op().call(x, weight, iters, eps, order, keep_iterates, precision);
    const bool weighted = weight.has_value() && weight->defined();
    ctx->save_for_backward({x, weighted ? *weight : Tensor(), out, A, tr, iterates});
    ctx->saved_data["weighted"] = weighted;
    ctx->saved_data["iters"] = iters;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["order"] = order;
    ctx->saved_data["precision"] = precision;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const bool weighted = ctx->saved_data["weighted"].toBool();
    const std::optional<Tensor> weight = weighted ? std::optional<Tensor>(saved[1]) : std::nullopt;
    const int64_t iters = ctx->saved_data["iters"].toInt();
    const std::string order = ctx->saved_data["order"].toStringRef();
    Tensor dx, dweight;
    if (at::GradMode::is_enabled()) {  // create_graph=True: the gradient is itself differentiated
      pybind11::gil_scoped_acquire gil;
      TORCH_CHECK(reference_gradient != nullptr, "threeg_kernels._C.pool: the gradient is differentiated "
                  "(create_graph=True) but no reference gradient is registered "
                  "(threeg_kernels._C.set_reference_gradient)");
      try {
        const pybind11::object result = pybind11::reinterpret_borrow<pybind11::object>(reference_gradient)(
            saved[0], weight, grads[0], iters, ctx->saved_data["eps"].toDouble(), order);
        std::tuple<std::optional<Tensor>, std::optional<Tensor>> pair;
        try {
          pair = result.cast<std::tuple<std::optional<Tensor>, std::optional<Tensor>>>();
        } catch (const pybind11::cast_error&) {
          TORCH_CHECK(false, "threeg_kernels._C.pool: the reference gradient (set_reference_gradient's fn) must return "
                      "(dx or None, dweight or None), a pair of tensors or None; got ",
                      pybind11::str(pybind11::repr(result)).cast<std::string>().substr(0, 200));
        }
        dx = std::get<0>(pair).value_or(Tensor());  // None for an input that needs no gradient
        dweight = std::get<1>(pair).value_or(Tensor());
      } catch (pybind11::error_already_set& e) {
        e.restore();  // the Python exception, as it is, to the caller of backward() (as torch's own Python nodes do)
        python_error err;
        err.persist();
        throw std::move(err);
      }
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(dx, dweight) = backward_op().call(grads[0].contiguous(), saved[0], weight, saved[2], saved[3], saved[4],
                                                 saved[5], iters, order, ctx->saved_data["precision"].toStringRef());
    }
    return {dx, weighted ? dweight : Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

namespace {

const char* const kPoolArgs = "pool(x, weight, iters, eps, order, keep_iterates, precision)";

// `what`: the types the argument may have, for the message.
const Tensor& tensor_arg(PyObject* obj, const char* name, const char* what = "a torch.Tensor") {
  if (!THPVariable_Check(obj)) {
    throw torch::TypeError(c10::str(kPoolArgs, ": ", name, " must be ", what, "; got ", Py_TYPE(obj)->tp_name));
  }
  return THPVariable_Unpack(obj);
}

// An object with __index__ (int, numpy integers) as int64; *overflow set where it does not fit.
int64_t index_as_int64(PyObject* obj, int* overflow) {
  PyObject* index = PyNumber_Index(obj);
  if (index == nullptr) throw python_error();
  const long long value = PyLong_AsLongLongAndOverflow(index, overflow);
  Py_DECREF(index);
  if (value == -1 && PyErr_Occurred()) throw python_error();
  return value;
}

std::string str_arg(PyObject* obj, const char* name) {
  if (!PyUnicode_Check(obj)) {
    throw torch::TypeError(c10::str(kPoolArgs, ": ", name, " must be a str; got ", Py_TYPE(obj)->tp_name));
  }
  Py_ssize_t size = 0;
  const char* s = PyUnicode_AsUTF8AndSize(obj, &size);
  if (s == nullptr) throw python_error();
  return std::string(s, static_cast<size_t>(size));
}

}  // namespace

PyObject* pool_autograd(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7) throw torch::TypeError(c10::str(kPoolArgs, " takes 7 positional arguments; got ", nargs));
  const Tensor& x = tensor_arg(args[0], "x");
  std::optional<Tensor> weight;
  if (args[1] != Py_None) weight = tensor_arg(args[1], "weight", "a torch.Tensor or None");
  if (PyBool_Check(args[2]) || !PyIndex_Check(args[2])) {
    throw torch::TypeError(c10::str(kPoolArgs, ": iters must be an int; got ", Py_TYPE(args[2])->tp_name));
  }
  int overflow = 0;
  const int64_t iters = index_as_int64(args[2], &overflow);
  TORCH_CHECK_VALUE(overflow == 0, kPoolArgs, ": iters is out of range");
  if (PyBool_Check(args[3]) || !(PyFloat_Check(args[3]) || PyLong_Check(args[3]))) {
    throw torch::TypeError(c10::str(kPoolArgs, ": eps must be a float; got ", Py_TYPE(args[3])->tp_name));
  }
  const double eps = PyFloat_AsDouble(args[3]);
  if (eps == -1.0 && PyErr_Occurred()) throw python_error();
  const std::string order = str_arg(args[4], "order");
  if (!PyBool_Check(args[5])) {
    throw torch::TypeError(c10::str(kPoolArgs, ": keep_iterates must be a bool; got ", Py_TYPE(args[5])->tp_name));
  }
  const bool keep_iterates = args[5] == Py_True;
  const std::string precision = str_arg(args[6], "precision");
  Tensor out;
  {
    pybind11::gil_scoped_release no_gil;  // the kernels run without the GIL, as a registered op's do
    out = CovPoolExt::apply(x, weight, iters, eps, order, keep_iterates, precision);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// cov_pool(x, weight, iters=, eps=, order=, backend=, precision=, keep_iterates=) (threeg_kernels/api.py) for the case
// most calls are: plain float32 / float64 CPU tensors, backend 'ext' by name (cov_pool passes 'auto' as 'ext' where it
// resolves to that: THREEG_BACKEND, dispatch.AUTO_ORDER and the autoselect tables are the Python layer's to read at
// each call), options of the exact types and in range, no transform, mode or autocast region active. It takes the same
// steps as the Python layer (the checks, the views of x as (B, C, N) and of weight as (B, N), keep_iterates' default,
// the C++ node or, without a gradient to come, the forward op below autograd), so the result is the same; every other
// case returns None and the Python layer runs as it does for any call (its checks raise the errors): this function only
// accepts, it never raises for a user's mistake. After a call's kernels have filled the core's caches, the Python
// layer's frames and checks cost ~8-10% of a call at C = 64, N = 196 (docs/ext.md, "Per-call cost").
namespace {

// The Python object is a torch.Tensor or an nn.Parameter (THPVariable_CheckExact; the Python layer's _plain), no
// other subclass, and its tensor is plain: strided, on the CPU, with no dispatch key but a dense CPU tensor's (so
// no functorch wrapper, functionalization, Python subclass, nested tensor, conjugate / negative / zero view), no
// forward-mode tangent.
bool plain_cpu(PyObject* obj, const Tensor** out) {
  if (!THPVariable_CheckExact(obj)) return false;
  const Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || t.layout() != at::kStrided || t.device().type() != c10::DeviceType::CPU) return false;
  using c10::DispatchKey;
  constexpr auto kPlain = c10::DispatchKeySet(
      {DispatchKey::CPU, DispatchKey::ADInplaceOrView, DispatchKey::AutogradCPU, DispatchKey::AutocastCPU});
  if ((t.key_set() | kPlain) != kPlain || t.is_nested()) return false;
  if (t._fw_grad(/*level=*/0).defined()) return false;
  *out = &t;
  return true;
}

bool str_is(PyObject* obj, const char* value) {
  if (!PyUnicode_CheckExact(obj)) return false;
  return PyUnicode_CompareWithASCIIString(obj, value) == 0;
}

}  // namespace

PyObject* fast_pool(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8) Py_RETURN_NONE;
  PyObject *x_obj = args[0], *w_obj = args[1], *iters_obj = args[2], *eps_obj = args[3], *order_obj = args[4],
           *backend_obj = args[5], *precision_obj = args[6], *keep_obj = args[7];
  // the backend, the options (exact types: bool is not an int here, an int is not a float eps)
  if (!str_is(backend_obj, "ext")) Py_RETURN_NONE;
  if (!PyLong_CheckExact(iters_obj) || !PyFloat_CheckExact(eps_obj) || !str_is(precision_obj, "ieee")) Py_RETURN_NONE;
  const bool lower = str_is(order_obj, "3g");
  if (!lower && !str_is(order_obj, "mpncov")) Py_RETURN_NONE;
  if (keep_obj != Py_None && keep_obj != Py_True && keep_obj != Py_False) Py_RETURN_NONE;
  int overflow = 0;
  const long long iters = PyLong_AsLongLongAndOverflow(iters_obj, &overflow);
  if (overflow != 0 || iters < 1 || iters > 20) Py_RETURN_NONE;  // cov_pool's MAX_ITERS (tests/test_fast_path.py)
  const double eps = PyFloat_AS_DOUBLE(eps_obj);
  if (!(eps >= 0 && eps < HUGE_VAL)) Py_RETURN_NONE;
  // no transform, mode or autocast region: the Python layer knows what to do there
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python) || at::impl::torch_function_mode_enabled() ||
      at::autocast::is_autocast_enabled(c10::DeviceType::CPU)) {
    Py_RETURN_NONE;
  }
  // x: (B, C, N) or (B, C, H, W), float32 (iters <= 5: the spectral route's limit, ext_impl.py) or float64
  const Tensor* x = nullptr;
  if (!plain_cpu(x_obj, &x)) Py_RETURN_NONE;
  const auto dtype = x->scalar_type();
  if (!(dtype == at::kDouble || (dtype == at::kFloat && iters <= 5))) Py_RETURN_NONE;
  const int64_t dim = x->dim();
  if (dim != 3 && dim != 4) Py_RETURN_NONE;
  const int64_t b = x->size(0), c = x->size(1), n = dim == 3 ? x->size(2) : x->size(2) * x->size(3);
  if (c < 1 || n < 2) Py_RETURN_NONE;
  const double tiny = dtype == at::kFloat ? FLT_MIN : DBL_MIN, largest = dtype == at::kFloat ? FLT_MAX : DBL_MAX;
  if (eps != 0 && !(tiny <= eps && eps <= largest)) Py_RETURN_NONE;  // representable in the compute dtype
  // weight: None, or the dtype of x with one of the shapes cov_pool accepts
  std::optional<Tensor> weight;
  if (w_obj != Py_None) {
    const Tensor* w = nullptr;
    if (!plain_cpu(w_obj, &w) || w->scalar_type() != dtype) Py_RETURN_NONE;
    const auto ws = w->sizes();
    bool accepted = false;
    if (dim == 3) {
      accepted = (ws.size() == 3 && ws[0] == b && ws[1] == 1 && ws[2] == n) ||
                 (ws.size() == 2 && ws[0] == b && ws[1] == n);
    } else {
      const int64_t h = x->size(2), wd = x->size(3);
      accepted = (ws.size() == 4 && ws[0] == b && ws[1] == 1 && ws[2] == h && ws[3] == wd) ||
                 (ws.size() == 3 && ws[0] == b && ws[1] == h && ws[2] == wd) ||
                 (ws.size() == 2 && ws[0] == b && ws[1] == n);
    }
    if (!accepted) Py_RETURN_NONE;
    weight = ws.size() == 2 ? *w : w->reshape({b, n});
  }
  const Tensor x3 = dim == 3 ? *x : x->reshape({b, c, n});
  const bool needs_grad = at::GradMode::is_enabled() && (x->requires_grad() || (weight && weight->requires_grad()));
  const bool keep = needs_grad && keep_obj != Py_False;  // None: ext's default, keep
  const std::string order = lower ? "3g" : "mpncov";
  Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    if (needs_grad) {
      out = CovPoolExt::apply(x3, weight, iters, eps, order, keep, "ieee");
    } else {
      at::AutoDispatchBelowAutograd below_autograd;  // as pool_op's eager call without a gradient
      out = std::get<0>(forward_op().call(x3, weight, iters, eps, order, keep, "ieee"));
    }
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* set_reference_gradient(PyObject*, PyObject* fn) {
  HANDLE_TH_ERRORS
  if (!PyCallable_Check(fn)) {
    throw torch::TypeError(c10::str("set_reference_gradient: fn must be callable; got ", Py_TYPE(fn)->tp_name));
  }
  Py_INCREF(fn);
  Py_XDECREF(reference_gradient);
  reference_gradient = fn;
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

}  // namespace threeg
