// Registration: every kernel is a torch custom op `torch.ops.mini_claude.<name>` (so torch.compile can trace
// it; the fake implementations live in kernels/__init__.py), and the same functions are plain Python
// functions of this extension module, which eager code calls directly: a pybind call costs about a
// microsecond less than a trip through the dispatcher, and a decode step makes a few hundred of them. The long
// calls (the low-bit linear layers, the decode stack) run without the GIL, as PyTorch's own ops do, so another
// Python thread (a server's event loop) is not blocked behind them.
#include <torch/extension.h>
#include <torch/library.h>

#include "kernels.h"

using namespace mini_claude;

TORCH_LIBRARY(mini_claude, m) {
  m.def("q4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins, Tensor? bias, int out_features, "
        "ScalarType? out_dtype=None) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int out_features, "
        "ScalarType? out_dtype=None) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor lengths, "
        "float scale) -> Tensor");
  m.def("rope_kv_write(Tensor qkv, Tensor positions, Tensor? cos, Tensor? sin, Tensor(a!) k_pool, "
        "Tensor(b!) v_pool, Tensor block_tables, int n_head, int n_kv_head) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(mini_claude, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("q8_linear", &q8_linear);
  m.impl("decode_attention", &decode_attention);
  m.impl("rope_kv_write", &rope_kv_write);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
}

namespace {
c10::optional<at::ScalarType> out_type(bool float_out) {
  return float_out ? c10::optional<at::ScalarType>(at::kFloat) : c10::nullopt;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_linear", [](const at::Tensor& x, const at::Tensor& qw, const at::Tensor& s, const at::Tensor& mins,
                        const c10::optional<at::Tensor>& bias, int64_t n, bool float_out) {
    return q4_linear(x, qw, s, mins, bias, n, out_type(float_out));
  }, py::call_guard<py::gil_scoped_release>());
  m.def("q8_linear", [](const at::Tensor& x, const at::Tensor& qw, const at::Tensor& s,
                        const c10::optional<at::Tensor>& bias, int64_t n, bool float_out) {
    return q8_linear(x, qw, s, bias, n, out_type(float_out));
  }, py::call_guard<py::gil_scoped_release>());
  m.def("decode_attention", &decode_attention);
  m.def("rope_kv_write", &rope_kv_write);
  m.def("rms_norm", &rms_norm);
  m.def("silu_mul", &silu_mul);
  m.def("row_argmax", &row_argmax);
  py::class_<StackLinear>(m, "StackLinear", "one linear layer of a DecodeStack: dense, int4 or int8")
      .def(py::init([](int64_t kind, at::Tensor weight, c10::optional<at::Tensor> scales,
                       c10::optional<at::Tensor> mins, c10::optional<at::Tensor> bias, c10::optional<at::Tensor> dense,
                       int64_t in_features, int64_t out_features, int64_t dense_rows) {
             StackLinear l;
             l.kind = kind;
             l.weight = std::move(weight);
             if (scales) l.scales = *scales;
             if (mins) l.mins = *mins;
             l.bias = std::move(bias);
             if (dense) l.dense = *dense;
             l.in_features = in_features;
             l.out_features = out_features;
             l.dense_rows = dense_rows;
             return l;
           }),
           py::arg("kind"), py::arg("weight"), py::arg("scales"), py::arg("mins"), py::arg("bias"), py::arg("dense"),
           py::arg("in_features"), py::arg("out_features"), py::arg("dense_rows") = 0)
      .def("__call__", &StackLinear::operator());
  py::class_<DecodeStack>(m, "DecodeStack", "one decode step through every block in one call (stack.cpp)")
      .def(py::init<std::vector<StackLinear>, std::vector<at::Tensor>, double, int64_t, int64_t, int64_t, double>())
      // Without the GIL: a server's event loop (another thread) streams the previous token meanwhile.
      .def("forward", &DecodeStack::forward, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("layers", &DecodeStack::layers);
  m.def("quantize_activations", &quantize_activations);
  m.def("set_portable", &set_portable, "force the portable C++ kernels (tests compare them with the vector ones)");
  m.def("portable", &portable);
  m.def("isa", &isa, "which implementation the kernels run");
}
