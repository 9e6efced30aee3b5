// A whole full pre-activation residual unit driven from C++: the training forward and backward that
// fastresnet/ops/unit_ops.py composes in Python (`_unit_forward`, `_unit_backward`), for the "cuda" backend. The
// same primitives (this library's batch_stats / bn_relu / add_stats / bn_relu_backward, called through the
// dispatcher, so one driver runs the CPU and the CUDA kernels), the same ATen convolutions and the same operations
// in the same order: results are bitwise those of the Python composition (tests/test_unit_op.py checks it). What it
// removes is host time: one call per unit and direction instead of ~40 Python-level op calls (docs/architecture.md
// §3 has the numbers).
//
// Conventions (as in unit_ops.py): a unit has k BN-ReLU-conv layers; weights[k] is the projection of a
// "shared_projection" shortcut; strides/paddings are flattened (h, w) pairs per layer; rstd_i = 1/sqrt(var_i + eps_i)
// and scale/shift fold BN_i into one affine map (fastresnet.reference.scale_shift).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "bn_common.h"
#include "unit.h"

namespace fastresnet_ext {
namespace {

using at::Tensor;
using Tensors = std::vector<Tensor>;
using OptionalTensors = c10::List<std::optional<Tensor>>;

// ---- the primitives, through the dispatcher ----------------------------------------------------------------------
std::tuple<Tensor, Tensor> batch_stats(const Tensor& x) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastresnet_ext::batch_stats", "")
                             .typed<std::tuple<Tensor, Tensor>(const Tensor&)>();
  return op.call(x);
}

Tensor bn_relu(const Tensor& x, const Tensor& scale, const Tensor& shift, at::ScalarType out_dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastresnet_ext::bn_relu", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, at::ScalarType)>();
  return op.call(x, scale, shift, out_dtype);
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_backward(const Tensor& dy, const Tensor& x, const Tensor& scale,
                                                    const Tensor& shift, const Tensor& mean, const Tensor& rstd,
                                                    const std::optional<Tensor>& dres) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastresnet_ext::bn_relu_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                    const Tensor&, const Tensor&, bool,
                                                    const std::optional<Tensor>&)>();
  return op.call(dy, x, scale, shift, mean, rstd, /*training=*/true, dres);
}

std::tuple<Tensor, Tensor, Tensor> add_stats(const Tensor& a, const Tensor& b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastresnet_ext::add_stats", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&)>();
  return op.call(a, b);
}

// ---- the layers (fastresnet.backends.base.Backend's tier-A conv ops; unit_ops' plain convs) -----------------------
at::MemoryFormat layout(const Tensor& x) { return memory_format(is_nhwc(x)); }

std::vector<int64_t> pair(at::IntArrayRef flat, size_t i) { return {flat[2 * i], flat[2 * i + 1]}; }

struct Affine {
  Tensor scale, shift;
};

// fastresnet.reference.scale_shift: scale = γ·rstd, shift = β − mean·scale (γ = 1, β = 0 when absent).
Affine scale_shift(const Tensor& mean, const Tensor& rstd, const std::optional<Tensor>& gamma,
                   const std::optional<Tensor>& beta) {
  const Tensor scale = gamma.has_value() ? gamma->to(rstd.scalar_type()) * rstd : rstd;
  const Tensor shift = beta.has_value() ? beta->to(rstd.scalar_type()) - mean * scale : -mean * scale;
  return {scale, shift};
}

Tensor conv(const Tensor& a, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding) {
  return at::conv2d(a, weight, {}, stride, padding);
}

// (da, dweight) of conv(a, weight); what autograd computes for an nn.Conv2d.
std::tuple<Tensor, Tensor> conv_backward(const Tensor& dy, const Tensor& a, const Tensor& weight,
                                         at::IntArrayRef stride, at::IntArrayRef padding) {
  auto grads = at::convolution_backward(dy, a, weight, std::nullopt, stride, padding, {1, 1}, false, {0, 0}, 1,
                                        {true, true, false});
  return {std::get<0>(grads), std::get<1>(grads)};
}

// Backend.bn_relu_conv_stats: y = conv(relu(BN(x)), weight) (+ residual) and y's batch statistics.
std::tuple<Tensor, Tensor, Tensor> bn_relu_conv_stats(const Tensor& x, const Affine& bn, const Tensor& weight,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      const Tensor& residual) {
  const Tensor y = conv(bn_relu(x, bn.scale, bn.shift, weight.scalar_type()), weight, stride, padding);
  if (!residual.defined()) {
    auto [mean, var] = batch_stats(y);
    return {y, mean, var};
  }
  return add_stats(y, residual);
}

// Backend.bn_relu_conv_backward in training, with the weight gradient: (dx, dweight, Σdz, Σdz·x̂). bf16 on CPU
// runs the conv backward in fp32 (the reason is in that method's docstring).
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_relu_conv_backward(const Tensor& dy, const Tensor& x,
                                                                 const Affine& bn, const Tensor& mean,
                                                                 const Tensor& rstd, const Tensor& weight,
                                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                                 const std::optional<Tensor>& dres) {
  Tensor a = bn_relu(x, bn.scale, bn.shift, weight.scalar_type());
  const bool widen = dy.device().is_cpu() && weight.scalar_type() == at::kBFloat16;
  auto [da, dweight] = widen ? conv_backward(dy.to(at::kFloat), a.to(at::kFloat), weight.to(at::kFloat), stride,
                                             padding)
                             : conv_backward(dy, a, weight, stride, padding);
  a.reset();
  auto [dx, sum_dz, sum_dz_xhat] = bn_relu_backward(da, x, bn.scale, bn.shift, mean, rstd, dres);
  return {dx, dweight.to(weight.scalar_type()), sum_dz, sum_dz_xhat};
}

// unit_ops._plain_conv: an nn.Conv2d on the shared activation (cast to the weight's dtype, as autocast does).
Tensor plain_conv(const Tensor& a, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding) {
  return conv(a.to(weight.scalar_type()), weight, stride, padding);
}

std::tuple<Tensor, Tensor> plain_conv_backward(const Tensor& dy, const Tensor& a, const Tensor& weight,
                                               at::IntArrayRef stride, at::IntArrayRef padding) {
  auto [da, dweight] = conv_backward(dy, a.to(weight.scalar_type()), weight, stride, padding);
  return {da.to(a.scalar_type()), dweight};
}

// Option A: stride-s subsampling, zero channels appended (unit_ops._zero_pad and its backward).
Tensor zero_pad(const Tensor& x, int64_t stride, int64_t out_channels) {
  const Tensor sub = stride > 1 ? x.slice(2, 0, x.size(2), stride).slice(3, 0, x.size(3), stride) : x;
  return at::pad(sub, {0, 0, 0, 0, 0, out_channels - x.size(1)});
}

Tensor zero_pad_backward(const Tensor& dh, const Tensor& x, int64_t stride) {
  Tensor dx = at::zeros_like(x, x.options(), layout(x));
  dx.slice(2, 0, x.size(2), stride).slice(3, 0, x.size(3), stride).copy_(dh.slice(1, 0, x.size(1)));
  return dx;
}

void append(Tensors& out, const Tensors& more) { out.insert(out.end(), more.begin(), more.end()); }

// ---- the unit -----------------------------------------------------------------------------------------------------
// unit_ops._unit_forward: [x_{l+1}, its mean, its var, y_1 … y_{k−1}, rstd_1 … rstd_k, mean_2, var_2, …, mean_k,
// var_k]; without through_last the last conv and the shortcut add are skipped and the first three left out.
Tensors preact_unit_forward(const Tensor& x, const Tensor& x_mean, const Tensor& x_var, at::TensorList weights,
                            const OptionalTensors& bn_weights, const OptionalTensors& bn_biases,
                            at::ArrayRef<double> eps, at::IntArrayRef strides, at::IntArrayRef paddings,
                            c10::string_view shortcut, int64_t shortcut_stride, bool through_last) {
  const size_t k = bn_weights.size();
  TORCH_CHECK(k >= 1 && bn_biases.size() == k && eps.size() == k && strides.size() == 2 * k &&
                  paddings.size() == 2 * k && weights.size() >= k,
              "preact_unit_forward: inconsistent per-layer argument lengths");
  Tensors ys, rstds, stats;
  auto affine = [&](size_t i, const Tensor& mean, const Tensor& var) {
    rstds.push_back(at::rsqrt(var + eps[i]));
    return scale_shift(mean, rstds.back(), bn_weights.get(i), bn_biases.get(i));
  };
  Tensor y = x, mean = x_mean, var = x_var, h;
  size_t first = 0;
  if (shortcut == "shared_identity" || shortcut == "shared_projection") {
    // one activation feeds conv 1 and the shortcut: plain convs on it
    const Affine bn = affine(0, mean, var);
    if (k == 1 && !through_last) return rstds;
    const Tensor a = bn_relu(x, bn.scale, bn.shift, x.scalar_type());
    h = shortcut == "shared_identity" ? a : plain_conv(a, weights[k], {shortcut_stride, shortcut_stride}, {0, 0});
    y = plain_conv(a, weights[0], pair(strides, 0), pair(paddings, 0));
    if (k == 1) {
      auto [out, out_mean, out_var] = add_stats(y, h);
      Tensors res{out, out_mean, out_var};
      append(res, rstds);
      return res;
    }
    std::tie(mean, var) = batch_stats(y);
    ys = {y};
    stats = {mean, var};
    first = 1;
  } else {
    h = shortcut == "identity" ? x : zero_pad(x, shortcut_stride, weights[k - 1].size(0));
  }
  for (size_t i = first; i < k; ++i) {
    const bool last = i == k - 1;
    const Affine bn = affine(i, mean, var);
    if (last && !through_last) {
      append(ys, rstds);
      append(ys, stats);
      return ys;
    }
    std::tie(y, mean, var) =
        bn_relu_conv_stats(y, bn, weights[i], pair(strides, i), pair(paddings, i), last ? h : Tensor());
    if (!last) {
      ys.push_back(y);
      stats.push_back(mean);
      stats.push_back(var);
    }
  }
  Tensors res{y, mean, var};
  append(res, ys);
  append(res, rstds);
  append(res, stats);
  return res;
}

// unit_ops._unit_backward: [dx, dW_1 … dW_k (dW_shortcut), Σdz·x̂ per BN (dγ), Σdz per BN (dβ)]; the shortcut
// gradient joins dx inside the BN backward kernel.
Tensors preact_unit_backward(const Tensor& dout, const Tensor& x, at::TensorList ys, at::TensorList weights,
                             at::TensorList means, at::TensorList rstds, const OptionalTensors& bn_weights,
                             const OptionalTensors& bn_biases, at::IntArrayRef strides, at::IntArrayRef paddings,
                             c10::string_view shortcut, int64_t shortcut_stride) {
  const size_t k = means.size();
  TORCH_CHECK(k >= 1 && ys.size() == k - 1 && rstds.size() == k && bn_weights.size() == k &&
                  bn_biases.size() == k && strides.size() == 2 * k && paddings.size() == 2 * k &&
                  weights.size() >= k,
              "preact_unit_backward: inconsistent per-layer argument lengths");
  Tensors dweights(weights.size()), dgammas(k), dbetas(k);
  const bool shared = shortcut == "shared_identity" || shortcut == "shared_projection";
  Tensor dy = dout;
  for (size_t n = k; n-- > 0;) {
    const Tensor& xi = n == 0 ? x : ys[n - 1];
    const Affine bn = scale_shift(means[n], rstds[n], bn_weights.get(n), bn_biases.get(n));
    const auto stride = pair(strides, n), padding = pair(paddings, n);
    dy = dy.contiguous(layout(xi));
    if (n == 0 && shared) {
      const Tensor a = bn_relu(x, bn.scale, bn.shift, x.scalar_type());
      Tensor da, dh;
      std::tie(da, dweights[0]) = plain_conv_backward(dy, a, weights[0], stride, padding);
      if (shortcut == "shared_identity") {
        dh = dout.to(a.scalar_type());
      } else {
        std::tie(dh, dweights[k]) = plain_conv_backward(dout.to(weights[k].scalar_type()), a, weights[k],
                                                        {shortcut_stride, shortcut_stride}, {0, 0});
      }
      std::tie(dy, dbetas[0], dgammas[0]) =
          bn_relu_backward(da + dh, x, bn.scale, bn.shift, means[0], rstds[0], std::nullopt);
    } else {
      std::optional<Tensor> dres;
      if (n == 0) {
        dres = shortcut == "identity" ? dout.to(x.scalar_type()).contiguous(layout(x))
                                      : zero_pad_backward(dout.to(x.scalar_type()), x, shortcut_stride);
      }
      std::tie(dy, dweights[n], dbetas[n], dgammas[n]) =
          bn_relu_conv_backward(dy, xi, bn, means[n], rstds[n], weights[n], stride, padding, dres);
    }
  }
  Tensors res{dy};
  append(res, dweights);
  append(res, dgammas);
  append(res, dbetas);
  return res;
}

// ---- the unit as one C++ autograd node ---------------------------------------------------------------------------
// unit_ops._PreactUnit without Python: forward runs preact_unit_forward and updates the running statistics, backward
// runs preact_unit_backward; the autograd engine calls backward directly. Same saved tensors: x, the inner BN inputs,
// the weights, and per BN its mean and rstd (plus γ, β).
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The running buffers of a unit's BNs, one entry per BN in order (all empty: leave them alone).
struct RunningStats {
  std::vector<Tensor> means, vars, num_batches_tracked;
  std::vector<int64_t> counts;
  double momentum;
};

// fastresnet.reference.update_running_stats_many for BNs that all have buffers (means of one dtype, variances of one
// dtype) and one numeric momentum: the same four multi-tensor ops (num_batches_tracked += 1; running_mean.lerp_(mean,
// m); running_var.lerp_(var·M/(M − 1), m)), so the buffers are bitwise those of the Python update.
void update_running_stats(const RunningStats& running, at::TensorList means, at::TensorList vars) {
  if (running.means.empty()) return;
  TORCH_CHECK(running.means.size() == means.size() && running.vars.size() == means.size() &&
                  running.num_batches_tracked.size() == means.size() && running.counts.size() == means.size(),
              "running statistics: expected one buffer set per BN (", means.size(), ")");
  std::vector<at::Scalar> unbias;
  for (int64_t count : running.counts) unbias.emplace_back(static_cast<double>(count) / (count - 1));
  at::_foreach_add_(running.num_batches_tracked, 1);
  Tensors unbiased = at::_foreach_mul(vars, unbias);
  Tensors batch_means(means.begin(), means.end());
  for (size_t i = 0; i < means.size(); ++i) {  // in the buffers' dtype (a no-op when they hold the statistics dtype)
    batch_means[i] = batch_means[i].to(running.means[i].scalar_type());
    unbiased[i] = unbiased[i].to(running.vars[i].scalar_type());
  }
  at::_foreach_lerp_(running.means, batch_means, running.momentum);
  at::_foreach_lerp_(running.vars, unbiased, running.momentum);
}

struct UnitConfig {
  std::vector<double> eps;
  std::vector<int64_t> strides, paddings;
  std::string shortcut;
  int64_t shortcut_stride;
};

class PreactUnitFunction : public torch::autograd::Function<PreactUnitFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& x_mean, const Tensor& x_var,
                               at::TensorList weights, at::TensorList gammas, at::TensorList betas,
                               const UnitConfig& cfg, const RunningStats& running) {
    const size_t k = gammas.size();
    const OptionalTensors g(std::vector<std::optional<Tensor>>(gammas.begin(), gammas.end()));
    const OptionalTensors b(std::vector<std::optional<Tensor>>(betas.begin(), betas.end()));
    Tensors res = preact_unit_forward(x, x_mean, x_var, weights, g, b, cfg.eps, cfg.strides, cfg.paddings,
                                      cfg.shortcut, cfg.shortcut_stride, true);
    // res: [out, out_mean, out_var, y_1 … y_{k−1}, rstd_1 … rstd_k, mean_2, var_2, …]
    Tensors means{x_mean}, vars{x_var};
    for (size_t i = 2 + 2 * k; i + 1 < res.size(); i += 2) {
      means.push_back(res[i]);
      vars.push_back(res[i + 1]);
    }
    update_running_stats(running, means, vars);
    Tensors saved{x};
    saved.insert(saved.end(), res.begin() + 3, res.begin() + 2 + k);  // y_1 … y_{k−1}
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), means.begin(), means.end());
    saved.insert(saved.end(), res.begin() + 2 + k, res.begin() + 2 + 2 * k);  // rstds
    saved.insert(saved.end(), gammas.begin(), gammas.end());
    saved.insert(saved.end(), betas.begin(), betas.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["k"] = static_cast<int64_t>(k);
    ctx->saved_data["num_weights"] = static_cast<int64_t>(weights.size());
    ctx->saved_data["strides"] = cfg.strides;
    ctx->saved_data["paddings"] = cfg.paddings;
    ctx->saved_data["shortcut"] = cfg.shortcut;
    ctx->saved_data["shortcut_stride"] = cfg.shortcut_stride;
    variable_list outs{res[0], res[1], res[2]};
    ctx->mark_non_differentiable({res[1], res[2]});
    ctx->set_materialize_grads(false);  // no zero tensors made for the statistics outputs' (absent) gradients
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t k = ctx->saved_data["k"].toInt(), n = ctx->saved_data["num_weights"].toInt();
    if (!grads[0].defined()) return variable_list(3 + n + 2 * k + 2);  // x_{l+1} got no gradient: none flows back
    const variable_list saved = ctx->get_saved_variables();
    auto slice = [&](int64_t begin, int64_t len) { return at::TensorList(saved).slice(begin, len); };
    const at::TensorList ys = slice(1, k - 1), weights = slice(k, n), means = slice(k + n, k),
                         rstds = slice(2 * k + n, k), gammas = slice(3 * k + n, k), betas = slice(4 * k + n, k);
    const OptionalTensors g(std::vector<std::optional<Tensor>>(gammas.begin(), gammas.end()));
    const OptionalTensors b(std::vector<std::optional<Tensor>>(betas.begin(), betas.end()));
    const auto strides = ctx->saved_data["strides"].toIntVector(), paddings = ctx->saved_data["paddings"].toIntVector();
    const std::string shortcut = ctx->saved_data["shortcut"].toStringRef();
    Tensors res = preact_unit_backward(grads[0], saved[0], ys, weights, means, rstds, g, b, strides, paddings,
                                       shortcut, ctx->saved_data["shortcut_stride"].toInt());
    // one gradient per forward argument, in order: x, x_mean, x_var, weights, γs, βs, the config, the buffers
    variable_list out{res[0], Tensor(), Tensor()};
    out.insert(out.end(), res.begin() + 1, res.begin() + 1 + n);
    for (int64_t i = 0; i < k; ++i) out.push_back(res[1 + n + i].to(gammas[i].scalar_type()));
    for (int64_t i = 0; i < k; ++i) out.push_back(res[1 + n + k + i].to(betas[i].scalar_type()));
    out.emplace_back();
    out.emplace_back();
    return out;
  }
};

}  // namespace

std::vector<at::Tensor> preact_unit_train(const at::Tensor& x, const at::Tensor& x_mean, const at::Tensor& x_var,
                                          const std::vector<at::Tensor>& weights,
                                          const std::vector<at::Tensor>& bn_weights,
                                          const std::vector<at::Tensor>& bn_biases, std::vector<double> eps,
                                          std::vector<int64_t> strides, std::vector<int64_t> paddings,
                                          std::string shortcut, int64_t shortcut_stride,
                                          std::vector<at::Tensor> running_means, std::vector<at::Tensor> running_vars,
                                          std::vector<at::Tensor> num_batches_tracked, std::vector<int64_t> counts,
                                          double momentum) {
  const UnitConfig cfg{std::move(eps), std::move(strides), std::move(paddings), std::move(shortcut),
                       shortcut_stride};
  const RunningStats running{std::move(running_means), std::move(running_vars), std::move(num_batches_tracked),
                             std::move(counts), momentum};
  return PreactUnitFunction::apply(x, x_mean, x_var, at::TensorList(weights), at::TensorList(bn_weights),
                                   at::TensorList(bn_biases), cfg, running);
}

// One kernel for every device: the driver only calls other operators, which dispatch on the tensors' device.
TORCH_LIBRARY_IMPL(fastresnet_ext, CompositeExplicitAutograd, m) {
  m.impl("preact_unit_forward", &preact_unit_forward);
  m.impl("preact_unit_backward", &preact_unit_backward);
}

}  // namespace fastresnet_ext
