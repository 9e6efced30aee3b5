// The fastresnet_ext operator library: schemas of the four tier-A primitives (semantics: fastresnet/reference.py) and
// of BN's folded affine map, and the Python module fastresnet._C, whose import loads the library and binds the C++
// training entries of units and layers (unit.h). Kernels register per dispatch key in bn_cpu.cpp (CPU) and
// bn_cuda.cpp (CUDA, only in builds with CUDA); the affine map's composition (unit.cpp) registers once for every
// device.
//
// Layout rule of every output tensor: channels_last if x (a for add_stats) is channels_last and not also
// NCHW-contiguous, else contiguous. Statistics are float32 ([C]); float64 for float64 inputs.
#include <torch/python.h>
#include <torch/library.h>

#include "unit.h"

TORCH_LIBRARY(fastresnet_ext, m) {
  // x [N, C, H, W] -> (mean [C], biased var [C]); deterministic per-tile partials merged with Chan's formula.
  m.def("batch_stats(Tensor x) -> (Tensor mean, Tensor var)");
  // a = max(x·scale + shift, 0) rounded once to out_dtype; scale/shift [C] in x's statistics dtype.
  m.def("bn_relu(Tensor x, Tensor scale, Tensor shift, ScalarType out_dtype) -> Tensor");
  // (dx, Σdz, Σdz·x̂) of a = relu(BN(x)) given dy = dL/da; dz = x·scale + shift ≤ 0 ? 0 : dy; dx in x's dtype,
  // training: dx = scale·(dz − Σdz/M − x̂·Σdz·x̂/M), eval: dx = scale·dz; plus dres if given.
  m.def("bn_relu_backward(Tensor dy, Tensor x, Tensor scale, Tensor shift, Tensor mean, Tensor rstd, bool training, "
        "Tensor? dres=None) -> (Tensor dx, Tensor sum_dz, Tensor sum_dz_xhat)");
  // y = a + b (fp32 add, rounded once to the promoted dtype of a and b) and the batch statistics of the rounded y.
  m.def("add_stats(Tensor a, Tensor b) -> (Tensor y, Tensor mean, Tensor var)");
  // BN folded into one affine map from the batch statistics (float32/float64 [C]): rstd = rsqrt(var + eps),
  // scale = γ·rstd, shift = β − mean·scale (γ = 1, β = 0 when absent), every operation rounded to the statistics
  // dtype: bitwise the ATen composition `torch.rsqrt(var + eps)`, `reference.scale_shift` (the
  // CompositeExplicitAutograd kernel in unit.cpp is that composition; the CPU and CUDA kernels do it in one pass,
  // bn_cpu.cpp and cuda/bn_kernels.cu). scale_shift: the same from a saved rstd.
  m.def("bn_affine(Tensor mean, Tensor var, float eps, Tensor? weight, Tensor? bias) -> (Tensor rstd, Tensor scale, "
        "Tensor shift)");
  m.def("scale_shift(Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias) -> (Tensor scale, Tensor shift)");
}

#define FASTRESNET_STR_(x) #x
#define FASTRESNET_STR(x) FASTRESNET_STR_(x)

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastresnet's C++/CUDA kernels: importing it registers torch.ops.fastresnet_ext.*";
#ifdef FASTRESNET_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = FASTRESNET_STR(FASTRESNET_CUDA_ARCHS);
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
  // with_cuda: whether the CUDA kernels were compiled in (else only the CPU kernels are registered).
  // cuda_archs: their compute capabilities as setup.py passed them ("80_90"; "" without CUDA).
  namespace py = pybind11;
  py::class_<fastresnet_ext::UnitPlan, std::shared_ptr<fastresnet_ext::UnitPlan>>(
      m, "UnitPlan", "One full pre-activation residual unit's weights, configuration and running buffers (csrc/unit.h)")
      .def(py::init(&fastresnet_ext::make_unit_plan), py::arg("weights"), py::arg("bn_weights"),
           py::arg("bn_biases"), py::arg("eps"), py::arg("strides"), py::arg("paddings"), py::arg("shortcut"),
           py::arg("shortcut_stride"), py::arg("running_means"), py::arg("running_vars"),
           py::arg("num_batches_tracked"), py::arg("counts"), py::arg("momentum"));
  m.def(
      "update_running_stats",
      [](std::vector<at::Tensor> running_means, std::vector<at::Tensor> running_vars,
         std::vector<at::Tensor> num_batches_tracked, std::vector<int64_t> counts, double momentum,
         const std::vector<at::Tensor>& means, const std::vector<at::Tensor>& vars) {
        const fastresnet_ext::RunningStats running{std::move(running_means), std::move(running_vars),
                                                   std::move(num_batches_tracked), std::move(counts), momentum};
        fastresnet_ext::update_running_stats(running, means, vars);
      },
      py::arg("running_means"), py::arg("running_vars"), py::arg("num_batches_tracked"), py::arg("counts"),
      py::arg("momentum"), py::arg("means"), py::arg("vars"),
      "BatchNorm running-statistics updates of several BNs, in place (csrc/unit.h)");
  py::class_<fastresnet_ext::LayerPlan, std::shared_ptr<fastresnet_ext::LayerPlan>>(
      m, "LayerPlan", "One fused BN → ReLU (→ conv) layer's weights, configuration and running buffers (csrc/unit.h)")
      .def(py::init(&fastresnet_ext::make_layer_plan), py::arg("weight"), py::arg("bn_weight"), py::arg("bn_bias"),
           py::arg("eps"), py::arg("stride"), py::arg("padding"), py::arg("running_mean"), py::arg("running_var"),
           py::arg("num_batches_tracked"), py::arg("momentum"));
  m.def("preact_layer_train", &fastresnet_ext::preact_layer_train, py::arg("x"), py::arg("mean"), py::arg("var"),
        py::arg("plan"), py::arg("weight_dtype"), "A fused layer in training as one C++ autograd node (csrc/unit.h)");
  m.def("preact_units_train", &fastresnet_ext::preact_units_train, py::arg("x"), py::arg("mean"), py::arg("var"),
        py::arg("plans"),
        "Full pre-activation residual units in training, one C++ autograd node each, one after another "
        "(csrc/unit.h)");
}
