// Shared by the CPU kernels (bn_cpu.cpp) and the CUDA binding (bn_cuda.cpp): argument checks whose messages name
// the argument, and the layout rule every backend follows (fastresnet.ops.bn_ops.layout).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>

#include <limits>
#include <optional>
#include <tuple>
#include <utility>

namespace fastresnet_ext {

// Dense 4-D geometry of a tensor viewed as NCHW: either NHWC (channels_last: element (n, c, h, w) at
// ((n·H + h)·W + w)·C + c) or NCHW (contiguous: ((n·C + c)·H + h)·W + w). M = N·H·W elements per channel.
struct Geometry {
  bool nhwc;
  int64_t N, C, HW, M;
};

// channels_last (and not also NCHW-contiguous, e.g. H = W = 1) -> NHWC; everything else computes NCHW.
inline bool is_nhwc(const at::Tensor& x) {
  return x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

inline at::MemoryFormat memory_format(bool nhwc) {
  return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline Geometry geometry(const at::Tensor& x, bool nhwc) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  return Geometry{nhwc, n, c, hw, n * hw};
}

// The accumulation / statistics dtype of x: float64 stays float64, every other dtype computes in float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(x.dim() == 4, name, ": expected a 4-D tensor [N, C, H, W], got shape ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, name,
              ": expected dtype float16, bfloat16, float32 or float64, got ", t);
}

// (mean, biased var) [C] in the statistics dtype of a channel without values (N·H·W = 0): NaN, the 0/0 of
// torch.mean of an empty tensor (fastresnet.reference.batch_stats).
inline std::tuple<at::Tensor, at::Tensor> no_value_moments(const at::Tensor& x) {
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  return {at::full({x.size(1)}, nan, opts), at::full({x.size(1)}, nan, opts)};
}

// other must match ref's shape and device (dtype is checked by the caller, whose rule differs per op).
inline void check_like(const at::Tensor& other, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(other.sizes() == ref.sizes(), name, ": expected the shape of ", ref_name, " ", ref.sizes(), ", got ",
              other.sizes());
  TORCH_CHECK(other.device() == ref.device(), name, ": expected device ", ref.device(), " (the device of ", ref_name,
              "), got ", other.device());
}

// A per-channel vector [C] of x's statistics dtype on x's device.
inline void check_channel_vec(const at::Tensor& v, const char* name, const at::Tensor& x) {
  TORCH_CHECK(v.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), name, ": expected shape [", x.size(1),
              "] (one value per channel of x), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == acc_dtype(x.scalar_type()), name, ": expected dtype ",
              acc_dtype(x.scalar_type()), " (the statistics dtype for x of dtype ", x.scalar_type(), "), got ",
              v.scalar_type());
  TORCH_CHECK(v.device() == x.device(), name, ": expected device ", x.device(), " (the device of x), got ",
              v.device());
  TORCH_CHECK(v.is_contiguous(), name, ": expected a contiguous vector, got stride ", v.strides());
}

// The dtype dy and dres are read in by bn_relu_backward: x's dtype when both already have it, else the
// accumulation dtype (dy/dres are then upcast first; bf16/fp16 -> fp32 is exact, so no rounding is added).
inline at::ScalarType grad_dtype(const at::Tensor& dy, const c10::optional<at::Tensor>& dres,
                                 const at::Tensor& x) {
  const auto t = x.scalar_type();
  const bool same = dy.scalar_type() == t && (!dres.has_value() || dres->scalar_type() == t);
  return same ? t : acc_dtype(t);
}

// ---- argument preparation shared by the CPU and CUDA implementations --------------------------------------------
// Each checks its arguments (errors name them) and returns dense tensors in the layout the kernels compute in
// (NHWC for channels_last x, else NCHW; a strided view becomes a dense copy).

inline at::Tensor dense(const at::Tensor& t, bool nhwc) { return t.contiguous(memory_format(nhwc)); }

inline at::Tensor prepare_batch_stats(const at::Tensor& x) {
  check_input(x, "x");
  return dense(x, is_nhwc(x));
}

inline at::Tensor prepare_bn_relu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  check_input(x, "x");
  check_channel_vec(scale, "scale", x);
  check_channel_vec(shift, "shift", x);
  return dense(x, is_nhwc(x));
}

struct BackwardArgs {
  at::Tensor dy, x, dres;  // dense, one layout; dy and dres (undefined if absent) in dtype grad_dtype(...)
};

inline BackwardArgs prepare_bn_relu_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale,
                                             const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& rstd,
                                             const c10::optional<at::Tensor>& dres) {
  check_input(x, "x");
  check_input(dy, "dy");
  check_like(dy, "dy", x, "x");
  if (dres.has_value()) {
    check_input(*dres, "dres");
    check_like(*dres, "dres", x, "x");
  }
  check_channel_vec(scale, "scale", x);
  check_channel_vec(shift, "shift", x);
  check_channel_vec(mean, "mean", x);
  check_channel_vec(rstd, "rstd", x);
  TORCH_CHECK(dy.scalar_type() != at::kDouble || x.scalar_type() == at::kDouble,
              "dy: float64 gradients need float64 x, got x of dtype ", x.scalar_type());
  TORCH_CHECK(!dres.has_value() || dres->scalar_type() != at::kDouble || x.scalar_type() == at::kDouble,
              "dres: float64 gradients need float64 x, got x of dtype ", x.scalar_type());
  const bool nhwc = is_nhwc(x);
  const auto gtype = grad_dtype(dy, dres, x);
  BackwardArgs out{dense(dy.to(gtype), nhwc), dense(x, nhwc), at::Tensor()};
  if (dres.has_value()) out.dres = dense(dres->to(gtype), nhwc);
  return out;
}

// (a, b) dense in a's layout and in their promoted dtype (widening is exact, so the sum is still rounded once);
// b must have a's shape and device.
inline std::pair<at::Tensor, at::Tensor> prepare_add_stats(const at::Tensor& a, const at::Tensor& b) {
  check_input(a, "a");
  check_input(b, "b");
  check_like(b, "b", a, "a");
  const bool nhwc = is_nhwc(a);
  const auto t = c10::promoteTypes(a.scalar_type(), b.scalar_type());
  return {dense(a.to(t), nhwc), dense(b.to(t), nhwc)};
}

// BN's folded affine map (bn_affine, scale_shift): mean and var (or rstd) float32/float64 vectors [C] of one
// dtype and device.
inline void check_stats_pair(const at::Tensor& mean, const at::Tensor& v, const char* v_name) {
  TORCH_CHECK(mean.dim() == 1 && (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble),
              "mean: expected a float32 or float64 vector [C], got ", mean.scalar_type(), " of shape ", mean.sizes());
  TORCH_CHECK(v.sizes() == mean.sizes() && v.scalar_type() == mean.scalar_type() && v.device() == mean.device(),
              v_name, ": expected ", mean.scalar_type(), " of shape ", mean.sizes(), " on ", mean.device(),
              " (as mean), got ", v.scalar_type(), " of shape ", v.sizes(), " on ", v.device());
}

// γ or β as a contiguous vector of the statistics dtype (undefined when absent).
inline at::Tensor affine_param(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& mean) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->sizes() == mean.sizes() && t->is_floating_point() && t->device() == mean.device(), name,
              ": expected a floating vector of shape ", mean.sizes(), " on ", mean.device(), ", got ",
              t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
  return (t->scalar_type() == mean.scalar_type() ? *t : t->to(mean.scalar_type())).contiguous();
}

}  // namespace fastresnet_ext
