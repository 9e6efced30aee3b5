// Torch binding of the CUDA kernels (cuda/bn_kernels.cu): argument checks and layout (bn_common.h), output and
// workspace allocation through the caching allocator, the current stream, and registration for the CUDA key.
// Built only when torch has CUDA (setup.py defines FASTRESNET_WITH_CUDA and compiles this file).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bn_common.h"
#include "cuda/bn_kernels.h"

namespace fastresnet_ext {
namespace {

namespace fc = fastresnet_cuda;

fc::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return fc::DType::kFloat32;
    case at::kDouble: return fc::DType::kFloat64;
    case at::kHalf: return fc::DType::kFloat16;
    case at::kBFloat16: return fc::DType::kBFloat16;
    default: TORCH_CHECK(false, "fastresnet_ext: unsupported dtype ", t);
  }
}

fc::Geom geom_of(const at::Tensor& x, bool nhwc) {
  const Geometry g = geometry(x, nhwc);
  return fc::Geom{g.N, g.C, g.HW, g.nhwc};
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastresnet_ext::", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<at::Tensor, at::Tensor> batch_stats_cuda(const at::Tensor& x_in) {
  const at::Tensor x = prepare_batch_stats(x_in);
  if (x.numel() == 0) return no_value_moments(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const fc::Geom g = geom_of(x, is_nhwc(x_in));
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  auto partial = at::empty({3 * fc::num_tiles(g) * g.C}, opts);
  auto mean = at::empty({g.C}, opts), var = at::empty({g.C}, opts);
  check_launch(fc::batch_stats(x.data_ptr(), dtype_of(x.scalar_type()), g, partial.data_ptr(), mean.data_ptr(),
                               var.data_ptr(), stream()),
               "batch_stats");
  return {mean, var};
}

at::Tensor bn_relu_cuda(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
                        at::ScalarType out_dtype) {
  // The kernel writes x's dtype, or fp16/bf16 from fp32 x: an x narrower than its accumulation dtype for out_dtype
  // is widened first (exact, so the activation is still rounded once); a wider x than out_dtype is refused below.
  at::Tensor x_src = x_in;
  const auto t = x_in.scalar_type();
  if (out_dtype != t && !(t == at::kFloat && (out_dtype == at::kHalf || out_dtype == at::kBFloat16))) {
    const auto wide = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
    if (x_in.element_size() < static_cast<int64_t>(c10::elementSize(wide))) x_src = x_in.to(wide);
  }
  const at::Tensor x = prepare_bn_relu(x_src, scale, shift);
  TORCH_CHECK(out_dtype == x.scalar_type() ||
                  (x.scalar_type() == at::kFloat && (out_dtype == at::kHalf || out_dtype == at::kBFloat16)),
              "out_dtype: expected the dtype of x (", x.scalar_type(), ") or float16/bfloat16 for float32 x, got ",
              out_dtype);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool nhwc = is_nhwc(x_in);
  auto a = at::empty(x.sizes(), x.options().dtype(out_dtype).memory_format(memory_format(nhwc)));
  if (x.numel() == 0) return a;
  check_launch(fc::bn_relu(x.data_ptr(), dtype_of(x.scalar_type()), a.data_ptr(), dtype_of(out_dtype),
                           scale.data_ptr(), shift.data_ptr(), geom_of(x, nhwc), stream()),
               "bn_relu");
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& mean, const at::Tensor& rstd, bool training, const c10::optional<at::Tensor>& dres_in) {
  const BackwardArgs args = prepare_bn_relu_backward(dy_in, x_in, scale, shift, mean, rstd, dres_in);
  const c10::cuda::CUDAGuard guard(args.x.device());
  const bool nhwc = is_nhwc(x_in);
  const fc::Geom g = geom_of(args.x, nhwc);
  const auto opts = args.x.options().dtype(acc_dtype(args.x.scalar_type()));
  auto dx = at::empty(args.x.sizes(), args.x.options().memory_format(memory_format(nhwc)));
  if (args.x.numel() == 0) return {dx, at::zeros({g.C}, opts), at::zeros({g.C}, opts)};  // sums over no values
  auto partial = at::empty({2 * fc::num_tiles(g) * g.C}, opts);
  auto coef = at::empty({3 * g.C}, opts);
  auto sum_dz = at::empty({g.C}, opts), sum_dz_xhat = at::empty({g.C}, opts);
  check_launch(fc::bn_relu_backward(args.dy.data_ptr(), args.dres.defined() ? args.dres.data_ptr() : nullptr,
                                    dtype_of(args.dy.scalar_type()), args.x.data_ptr(),
                                    dtype_of(args.x.scalar_type()), scale.data_ptr(), shift.data_ptr(),
                                    mean.data_ptr(), rstd.data_ptr(), training, g, partial.data_ptr(),
                                    coef.data_ptr(), sum_dz.data_ptr(), sum_dz_xhat.data_ptr(), dx.data_ptr(),
                                    stream()),
               "bn_relu_backward");
  return {dx, sum_dz, sum_dz_xhat};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_stats_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  const auto ab = prepare_add_stats(a_in, b_in);
  const at::Tensor &a = ab.first, &b = ab.second;
  const c10::cuda::CUDAGuard guard(a.device());
  const bool nhwc = is_nhwc(a_in);
  const fc::Geom g = geom_of(a, nhwc);
  const auto opts = a.options().dtype(acc_dtype(a.scalar_type()));
  auto y = at::empty(a.sizes(), a.options().memory_format(memory_format(nhwc)));
  if (a.numel() == 0) return std::tuple_cat(std::make_tuple(y), no_value_moments(a));
  auto partial = at::empty({3 * fc::num_tiles(g) * g.C}, opts);
  auto mean = at::empty({g.C}, opts), var = at::empty({g.C}, opts);
  check_launch(fc::add_stats(a.data_ptr(), b.data_ptr(), y.data_ptr(), dtype_of(a.scalar_type()), g,
                             partial.data_ptr(), mean.data_ptr(), var.data_ptr(), stream()),
               "add_stats");
  return {y, mean, var};
}

// BN's folded affine map as one kernel (the ATen composition is five kernels forward, three backward); its bits.
std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_cuda(const at::Tensor& mean_in, const at::Tensor& var_or_rstd,
                                                           bool from_var, double eps,
                                                           const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& bias) {
  check_stats_pair(mean_in, var_or_rstd, from_var ? "var" : "rstd");
  const at::Tensor mean = mean_in.contiguous(), v = var_or_rstd.contiguous();
  const at::Tensor gamma = affine_param(weight, "weight", mean), beta = affine_param(bias, "bias", mean);
  const c10::cuda::CUDAGuard guard(mean.device());
  at::Tensor rstd = from_var ? at::empty_like(mean) : v, scale = at::empty_like(mean), shift = at::empty_like(mean);
  check_launch(fc::bn_affine(mean.data_ptr(), from_var ? v.data_ptr() : nullptr, eps,
                             gamma.defined() ? gamma.data_ptr() : nullptr, beta.defined() ? beta.data_ptr() : nullptr,
                             rstd.data_ptr(), scale.data_ptr(), shift.data_ptr(), mean.numel(),
                             dtype_of(mean.scalar_type()), stream()),
               from_var ? "bn_affine" : "scale_shift");
  return {rstd, scale, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_affine_cuda(const at::Tensor& mean, const at::Tensor& var, double eps,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias) {
  return affine_cuda(mean, var, true, eps, weight, bias);
}

std::tuple<at::Tensor, at::Tensor> scale_shift_cuda(const at::Tensor& mean, const at::Tensor& rstd,
                                                    const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& bias) {
  const auto res = affine_cuda(mean, rstd, false, 0.0, weight, bias);
  return {std::get<1>(res), std::get<2>(res)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastresnet_ext, CUDA, m) {
  m.impl("batch_stats", &batch_stats_cuda);
  m.impl("bn_relu", &bn_relu_cuda);
  m.impl("bn_relu_backward", &bn_relu_backward_cuda);
  m.impl("add_stats", &add_stats_cuda);
  m.impl("bn_affine", &bn_affine_cuda);
  m.impl("scale_shift", &scale_shift_cuda);
}

}  // namespace fastresnet_ext
