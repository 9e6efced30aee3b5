// Full pre-activation residual units and single fused layers in training as C++ autograd nodes, for the "ext"
// backend: the training forward and backward that fastresnet/ops/unit_ops.py composes in Python (`_unit_forward`,
// `_unit_backward`) and fastresnet/ops/bn_ops.py runs per layer. The same primitives (this library's batch_stats /
// bn_relu / add_stats / bn_relu_backward, called through the dispatcher, so one code path runs the CPU and the CUDA
// kernels), the same ATen convolutions and the same operations in the same order (rstd, scale and shift by
// bn_affine / scale_shift, bitwise their ATen composition): results are bitwise those of the Python composition
// (tests/test_unit_op.py and tests/test_host_path.py check it). What it removes is host time: one call per unit
// instead of ~40 Python-level op calls, a backward without Python, and with preact_units_train one call for a whole
// chain of units (docs/architecture.md §8: the execution paths and the benchmark rows that measure them).
//
// Conventions (as in unit_ops.py): a unit has k BN-ReLU-conv layers; weights[k] is the projection of a
// "shared_projection" shortcut; strides/paddings are flattened (h, w) pairs per layer; rstd_i = 1/sqrt(var_i + eps_i)
// and scale/shift fold BN_i into one affine map (fastresnet.reference.scale_shift).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "bn_common.h"
#include "unit.h"

namespace fastresnet_ext {
namespace {

using at::Tensor;
using Tensors = std::vector<Tensor>;

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

// t in dtype; t itself when it already is (a no-op `to` still costs a dispatcher call).
Tensor cast(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

struct Affine {
  Tensor scale, shift;
};

// BN's folded affine map (ops.cpp): the CompositeExplicitAutograd kernels, i.e. `torch.rsqrt(var + eps)` and
// fastresnet.reference.scale_shift — scale = γ·rstd, shift = β − mean·scale (γ = 1, β = 0 when absent) — as ATen
// calls: the definition, and the kernel of devices without their own (meta tensors: shapes); CPU and CUDA
// tensors take the one-pass kernels of bn_cpu.cpp and cuda/bn_kernels.cu (the same bits).
std::tuple<Tensor, Tensor> scale_shift_composite(const Tensor& mean, const Tensor& rstd,
                                                 const std::optional<Tensor>& gamma,
                                                 const std::optional<Tensor>& beta) {
  Tensor scale = gamma.has_value() ? cast(*gamma, rstd.scalar_type()) * rstd : rstd.clone();
  Tensor shift = beta.has_value() ? cast(*beta, rstd.scalar_type()) - mean * scale : -mean * scale;
  return {scale, shift};
}

std::tuple<Tensor, Tensor, Tensor> bn_affine_composite(const Tensor& mean, const Tensor& var, double eps,
                                                       const std::optional<Tensor>& gamma,
                                                       const std::optional<Tensor>& beta) {
  Tensor rstd = at::rsqrt(var + eps);
  auto [scale, shift] = scale_shift_composite(mean, rstd, gamma, beta);
  return {rstd, scale, shift};
}

// The same through the dispatcher (the CPU or the composite kernel).
Affine scale_shift(const Tensor& mean, const Tensor& rstd, const std::optional<Tensor>& gamma,
                   const std::optional<Tensor>& beta) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastresnet_ext::scale_shift", "")
          .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                            const std::optional<Tensor>&)>();
  auto [scale, shift] = op.call(mean, rstd, gamma, beta);
  return {scale, shift};
}

std::pair<Tensor, Affine> bn_affine(const Tensor& mean, const Tensor& var, double eps,
                                    const std::optional<Tensor>& gamma, const std::optional<Tensor>& beta) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastresnet_ext::bn_affine", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, double,
                                                    const std::optional<Tensor>&, const std::optional<Tensor>&)>();
  auto [rstd, scale, shift] = op.call(mean, var, eps, gamma, beta);
  return {rstd, Affine{scale, shift}};
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
  return {dx, cast(dweight, weight.scalar_type()), sum_dz, sum_dz_xhat};
}

// unit_ops._plain_conv: an nn.Conv2d on the shared activation (cast to the weight's dtype, as autocast does).
Tensor plain_conv(const Tensor& a, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding) {
  return conv(cast(a, weight.scalar_type()), weight, stride, padding);
}

std::tuple<Tensor, Tensor> plain_conv_backward(const Tensor& dy, const Tensor& a, const Tensor& weight,
                                               at::IntArrayRef stride, at::IntArrayRef padding) {
  auto [da, dweight] = conv_backward(dy, cast(a, weight.scalar_type()), weight, stride, padding);
  return {cast(da, a.scalar_type()), dweight};
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
// var_k], from x, its batch statistics and the plan's weights and configuration.
Tensors preact_unit_forward(const Tensor& x, const Tensor& x_mean, const Tensor& x_var, const UnitPlan& plan) {
  const Tensors& weights = plan.weights;
  const UnitConfig& cfg = plan.cfg;
  const std::string& shortcut = cfg.shortcut;
  const int64_t shortcut_stride = cfg.shortcut_stride;
  const size_t k = plan.bn_weights.size();
  Tensors ys, rstds, stats;
  auto affine = [&](size_t i, const Tensor& mean, const Tensor& var) {
    auto [rstd, bn] = bn_affine(mean, var, cfg.eps[i], plan.bn_weights[i], plan.bn_biases[i]);
    rstds.push_back(rstd);
    return bn;
  };
  Tensor y = x, mean = x_mean, var = x_var, h;
  size_t first = 0;
  if (shortcut == "shared_identity" || shortcut == "shared_projection") {
    // one activation feeds conv 1 and the shortcut: plain convs on it
    const Affine bn = affine(0, mean, var);
    const Tensor a = bn_relu(x, bn.scale, bn.shift, x.scalar_type());
    h = shortcut == "shared_identity" ? a : plain_conv(a, weights[k], {shortcut_stride, shortcut_stride}, {0, 0});
    y = plain_conv(a, weights[0], pair(cfg.strides, 0), pair(cfg.paddings, 0));
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
    std::tie(y, mean, var) =
        bn_relu_conv_stats(y, bn, weights[i], pair(cfg.strides, i), pair(cfg.paddings, i), last ? h : Tensor());
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
                             at::TensorList means, at::TensorList rstds, at::TensorList gammas, at::TensorList betas,
                             const UnitConfig& cfg) {
  const std::string& shortcut = cfg.shortcut;
  const int64_t shortcut_stride = cfg.shortcut_stride;
  const size_t k = means.size();
  Tensors dweights(weights.size()), dgammas(k), dbetas(k);
  const bool shared = shortcut == "shared_identity" || shortcut == "shared_projection";
  Tensor dy = dout;
  for (size_t n = k; n-- > 0;) {
    const Tensor& xi = n == 0 ? x : ys[n - 1];
    const Affine bn = scale_shift(means[n], rstds[n], gammas[n], betas[n]);
    const auto stride = pair(cfg.strides, n), padding = pair(cfg.paddings, n);
    dy = dy.contiguous(layout(xi));
    if (n == 0 && shared) {
      const Tensor a = bn_relu(x, bn.scale, bn.shift, x.scalar_type());
      Tensor da, dh;
      std::tie(da, dweights[0]) = plain_conv_backward(dy, a, weights[0], stride, padding);
      if (shortcut == "shared_identity") {
        dh = cast(dout, a.scalar_type());
      } else {
        std::tie(dh, dweights[k]) = plain_conv_backward(cast(dout, weights[k].scalar_type()), a, weights[k],
                                                        {shortcut_stride, shortcut_stride}, {0, 0});
      }
      std::tie(dy, dbetas[0], dgammas[0]) =
          bn_relu_backward(da + dh, x, bn.scale, bn.shift, means[0], rstds[0], std::nullopt);
    } else {
      std::optional<Tensor> dres;
      if (n == 0) {
        dres = shortcut == "identity" ? cast(dout, x.scalar_type()).contiguous(layout(x))
                                      : zero_pad_backward(cast(dout, x.scalar_type()), x, shortcut_stride);
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
// unit_ops._PreactUnit without Python: forward runs preact_unit_forward and queues the running-statistics updates
// (RunningUpdates), backward runs preact_unit_backward; the autograd engine calls backward directly. Same saved
// tensors: x, the inner BN inputs, the weights, and per BN its mean and rstd (plus γ, β).
using torch::autograd::variable_list;

// The running-statistics updates of the units of one preact_units_train call, made together once every unit's
// forward has run (no unit reads a running buffer in a training forward): fastresnet.reference.
// update_running_stats_many for BNs that all have buffers (means of one dtype, variances of one dtype per unit) —
// num_batches_tracked += 1; running = (1 − m)·running + m·batch for the mean and the unbiased var·M/(M − 1), skipped
// for an empty batch (M = 0) as nn.BatchNorm2d skips it — so the buffers are
// bitwise those of the Python update, with one multi-tensor op per kind and momentum for the whole chain instead of
// six per unit (on a GPU: six kernels per step, not per unit). On CPU, dense float32/float64 variances are
// unbiased and int64 counters incremented by a loop (per element the multiply ATen's `mul` by a Python float does,
// by the factor rounded to the variance's dtype) instead of dispatcher calls that each wrap a scalar. The updates are
// ATen's multiply and add everywhere: the add's CPU kernel may use FMA, whose bits a portable loop cannot promise.
class RunningUpdates {
 public:
  void add(const RunningStats& running, at::TensorList means, at::TensorList vars) {
    if (running.means.empty()) return;  // one buffer set per BN: make_unit_plan checked it
    Group& group = group_of(running.momentum);
    for (size_t i = 0; i < vars.size(); ++i) {
      const Tensor& nbt = running.num_batches_tracked[i];
      (nbt.is_cpu() && nbt.scalar_type() == at::kLong && nbt.numel() == 1 ? cpu_counters_ : counters_).push_back(nbt);
      if (running.counts[i] == 0) continue;  // an empty batch counts, but leaves the running statistics as they are
      const double factor = static_cast<double>(running.counts[i]) / (running.counts[i] - 1);
      const Tensor& v = vars[i];
      group.running_means.push_back(running.means[i]);
      group.means.push_back(cast(means[i], running.means[i].scalar_type()));
      group.running_vars.push_back(running.vars[i]);
      if (v.is_cpu() && (v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble) && v.is_contiguous()) {
        group.vars.push_back(cast(unbiased(v, factor), running.vars[i].scalar_type()));
      } else {  // filled in by apply()
        group.vars.emplace_back();
        group.pending.push_back(group.vars.size() - 1);
        pending_vars_.push_back(v);
        pending_factors_.emplace_back(factor);
      }
    }
  }

  void apply() {
    for (const Tensor& nbt : cpu_counters_) {
      ++*nbt.data_ptr<int64_t>();
      torch::autograd::impl::bump_version(nbt);  // as the in-place add would
    }
    if (!counters_.empty()) at::_foreach_add_(counters_, 1);
    Tensors unbiased_vars = pending_vars_.empty() ? Tensors() : at::_foreach_mul(pending_vars_, pending_factors_);
    size_t next = 0;
    for (Group& group : groups_) {
      if (group.running_means.empty()) continue;  // only empty batches: no statistics to fold in
      for (size_t j : group.pending) {
        group.vars[j] = cast(unbiased_vars[next++], group.running_vars[j].scalar_type());
      }
      at::_foreach_mul_(group.running_means, 1 - group.momentum);
      at::_foreach_add_(group.running_means, group.means, group.momentum);
      at::_foreach_mul_(group.running_vars, 1 - group.momentum);
      at::_foreach_add_(group.running_vars, group.vars, group.momentum);
    }
  }

 private:
  struct Group {
    double momentum;
    Tensors running_means, means, running_vars, vars;
    std::vector<size_t> pending;  // entries of vars that apply() computes
  };

  Group& group_of(double momentum) {
    for (Group& group : groups_)
      if (group.momentum == momentum) return group;
    groups_.push_back(Group{momentum, {}, {}, {}, {}, {}});
    return groups_.back();
  }

  static Tensor unbiased(const Tensor& v, double factor) {
    Tensor u = at::empty_like(v);
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "unbiased_var", [&] {
      const scalar_t f = static_cast<scalar_t>(factor);
      const scalar_t* vp = v.data_ptr<scalar_t>();
      scalar_t* up = u.data_ptr<scalar_t>();
      for (int64_t c = 0; c < v.numel(); ++c) up[c] = vp[c] * f;
    });
    return u;
  }

  std::vector<Group> groups_;
  Tensors cpu_counters_, counters_, pending_vars_;
  std::vector<at::Scalar> pending_factors_;
};

// The unit's backward node: the saved tensors as SavedVariables (so in-place changes are caught and saved-tensor
// hooks apply, as for any node), the configuration by reference to the plan. Written as a Node rather than a
// torch::autograd::Function, whose apply converts every argument, keeps the configuration in a string-keyed map of
// IValues and the saved tensors in one list: host time paid by every unit of every step.
class NativeUnitBackward final : public torch::autograd::Node {
 public:
  NativeUnitBackward(std::shared_ptr<const UnitPlan> plan, const Tensor& x, at::TensorList ys, at::TensorList means,
                     at::TensorList rstds)
      : plan_(std::move(plan)), x_(x, false) {
    save(ys_, ys);
    save(weights_, plan_->weights);
    save(means_, means);
    save(rstds_, rstds);
    save(gammas_, plan_->bn_weights);
    save(betas_, plan_->bn_biases);
  }

  std::string name() const override { return "NativeUnitBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x_.reset_data();
    for (auto* list : {&ys_, &weights_, &means_, &rstds_, &gammas_, &betas_})
      for (SavedVariable& v : *list) v.reset_data();
  }

  // grads: the gradient of x_{l+1}; returns one per next edge: x, the weights, the γs, the βs
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined()) return variable_list(num_outputs());  // x_{l+1} got no gradient
    const Tensors ys = unpack(ys_), weights = unpack(weights_), means = unpack(means_), rstds = unpack(rstds_),
                  gammas = unpack(gammas_), betas = unpack(betas_);
    Tensors res = preact_unit_backward(grads[0], x_.unpack(), ys, weights, means, rstds, gammas, betas, plan_->cfg);
    // res: [dx, dW…, Σdz·x̂ per BN (dγ), Σdz per BN (dβ)]
    const size_t n = weights.size(), k = means.size();
    variable_list out(res.begin(), res.begin() + 1 + n);
    for (size_t i = 0; i < k; ++i) out.push_back(cast(res[1 + n + i], gammas[i].scalar_type()));
    for (size_t i = 0; i < k; ++i) out.push_back(cast(res[1 + n + k + i], betas[i].scalar_type()));
    return out;
  }

 private:
  using SavedVariable = torch::autograd::SavedVariable;

  static void save(std::vector<SavedVariable>& to, at::TensorList tensors) {
    to.reserve(tensors.size());
    for (const Tensor& t : tensors) to.emplace_back(t, false);
  }

  static Tensors unpack(const std::vector<SavedVariable>& saved) {
    Tensors out;
    out.reserve(saved.size());
    for (const SavedVariable& v : saved) out.push_back(v.unpack());
    return out;
  }

  std::shared_ptr<const UnitPlan> plan_;
  SavedVariable x_;
  std::vector<SavedVariable> ys_, weights_, means_, rstds_, gammas_, betas_;
};

// A new node, held the way this torch's autograd holds nodes (std::shared_ptr in older releases,
// c10::intrusive_ptr in newer ones).
template <class N, class... Args>
auto make_node(Args&&... args) {
  using NodePtr = decltype(std::declval<torch::autograd::Edge&>().function);
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<N>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<N>(std::forward<Args>(args)...);
  }
}

// Whether any defined tensor of `lists` satisfies `pred`.
template <class Pred>
bool any_of(std::initializer_list<at::TensorList> lists, Pred pred) {
  for (at::TensorList list : lists)
    for (const Tensor& t : list)
      if (t.defined() && pred(t)) return true;
  return false;
}

// Whether a call on these inputs records a node: gradients enabled and one of them requires one.
bool records_node(std::initializer_list<at::TensorList> inputs) {
  return at::GradMode::is_enabled() && any_of(inputs, [](const Tensor& t) { return t.requires_grad(); });
}

// Forward-mode AD (dual tensors) is refused rather than silently dropped: the nodes have no forward derivative.
void check_no_forward_grad(std::initializer_list<at::TensorList> inputs, const char* fn, const char* what) {
  TORCH_CHECK(!any_of(inputs, [](const Tensor& t) { return t._fw_grad(/*level=*/0).defined(); }), fn,
              ": forward-mode AD is not supported by the fused ", what, "'s C++ node");
}

// One unit in training: preact_unit_forward (below autograd, as ATen's own autograd kernels run their forward), its
// running-statistics updates queued, and with gradients required its NativeUnitBackward node. Returns x_{l+1} and
// its statistics (never differentiable: the next BN's backward already contains their dependence on x_{l+1}).
std::array<Tensor, 3> unit_train(const Tensor& x, const Tensor& mean, const Tensor& var,
                                 const std::shared_ptr<UnitPlan>& plan, RunningUpdates& updates) {
  const std::initializer_list<at::TensorList> inputs{x, mean, var, plan->weights, plan->bn_weights, plan->bn_biases};
  check_no_forward_grad(inputs, "preact_units_train", "unit");
  const size_t k = plan->bn_weights.size();
  Tensors res;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    res = preact_unit_forward(x, mean, var, *plan);
  }
  // res: [out, out_mean, out_var, y_1 … y_{k−1}, rstd_1 … rstd_k, mean_2, var_2, …]
  Tensors means{mean}, vars{var};
  for (size_t i = 2 + 2 * k; i + 1 < res.size(); i += 2) {
    means.push_back(res[i]);
    vars.push_back(res[i + 1]);
  }
  updates.add(plan->running, means, vars);
  if (records_node(inputs)) {
    const at::TensorList all(res);
    auto node = make_node<NativeUnitBackward>(plan, x, all.slice(3, k - 1), means, all.slice(2 + k, k));
    node->set_next_edges(torch::autograd::collect_next_edges(x, at::TensorList(plan->weights),
                                                            at::TensorList(plan->bn_weights),
                                                            at::TensorList(plan->bn_biases)));
    torch::autograd::set_history(res[0], node);
  }
  return {res[0], res[1], res[2]};
}

// ---- one fused layer ------------------------------------------------------------------------------------------
// The backward node of a converted model's fused layer in training (what ops.bn_ops' bn_relu / bn_relu_conv nodes
// are in Python, bitwise): BN → ReLU gives (dx, dγ, dβ), BN → ReLU → conv (dx, dW, dγ, dβ), recomputing the
// activation from x.
class NativeLayerBackward final : public torch::autograd::Node {
 public:
  // weight: the conv weight the forward used (the plan's, or its autocast copy); undefined for BN → ReLU
  NativeLayerBackward(std::shared_ptr<const LayerPlan> plan, const Tensor& x, const Tensor& weight, const Tensor& mean,
                      const Tensor& rstd)
      : plan_(std::move(plan)), x_(x, false), weight_(weight, false), mean_(mean, false), rstd_(rstd, false),
        gamma_(plan_->bn_weight, false), beta_(plan_->bn_bias, false) {}

  std::string name() const override { return "NativeLayerBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&x_, &weight_, &mean_, &rstd_, &gamma_, &beta_}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined()) return variable_list(num_outputs());
    const Tensor x = x_.unpack(), mean = mean_.unpack(), rstd = rstd_.unpack(), gamma = gamma_.unpack(),
                 beta = beta_.unpack();
    const Affine bn = scale_shift(mean, rstd, gamma, beta);
    variable_list out;
    Tensor sum_dz, sum_dz_xhat;
    if (plan_->weight.defined()) {
      Tensor dx, dweight;
      std::tie(dx, dweight, sum_dz, sum_dz_xhat) =
          bn_relu_conv_backward(grads[0].contiguous(layout(x)), x, bn, mean, rstd, weight_.unpack(), plan_->stride,
                                plan_->padding, std::nullopt);
      out = {dx, cast(dweight, plan_->weight.scalar_type())};  // an autocast copy's gradient, as `to` passes it back
    } else {
      Tensor dx;
      std::tie(dx, sum_dz, sum_dz_xhat) = bn_relu_backward(grads[0], x, bn.scale, bn.shift, mean, rstd, std::nullopt);
      out = {dx};
    }
    out.push_back(cast(sum_dz_xhat, gamma.scalar_type()));
    out.push_back(cast(sum_dz, beta.scalar_type()));
    return out;
  }

 private:
  using SavedVariable = torch::autograd::SavedVariable;
  std::shared_ptr<const LayerPlan> plan_;
  SavedVariable x_, weight_, mean_, rstd_, gamma_, beta_;
};

}  // namespace

UnitPlan make_unit_plan(std::vector<at::Tensor> weights, std::vector<at::Tensor> bn_weights,
                        std::vector<at::Tensor> bn_biases, std::vector<double> eps, std::vector<int64_t> strides,
                        std::vector<int64_t> paddings, std::string shortcut, int64_t shortcut_stride,
                        std::vector<at::Tensor> running_means, std::vector<at::Tensor> running_vars,
                        std::vector<at::Tensor> num_batches_tracked, std::vector<int64_t> counts, double momentum) {
  const size_t k = bn_weights.size();
  TORCH_CHECK_VALUE(k >= 1 && bn_biases.size() == k && eps.size() == k && strides.size() == 2 * k &&
                        paddings.size() == 2 * k && (weights.size() == k || weights.size() == k + 1),
                    "UnitPlan: inconsistent per-layer argument lengths (", k, " BNs)");
  const size_t r = running_means.size();
  TORCH_CHECK_VALUE((r == 0 || r == k) && running_vars.size() == r && num_batches_tracked.size() == r &&
                        counts.size() == r,
                    "UnitPlan: expected one running buffer set and count per BN (", k, ") or none");
  for (int64_t count : counts)
    TORCH_CHECK_VALUE(count == 0 || count > 1, "UnitPlan: counts: expected N·H·W = 0 or > 1, got ", count);
  return UnitPlan{std::move(weights),
                  std::move(bn_weights),
                  std::move(bn_biases),
                  {std::move(eps), std::move(strides), std::move(paddings), std::move(shortcut), shortcut_stride},
                  {std::move(running_means), std::move(running_vars), std::move(num_batches_tracked),
                   std::move(counts), momentum}};
}

void update_running_stats(const RunningStats& running, const std::vector<at::Tensor>& means,
                          const std::vector<at::Tensor>& vars) {
  const size_t n = running.means.size();
  TORCH_CHECK_VALUE(running.vars.size() == n && running.num_batches_tracked.size() == n &&
                        running.counts.size() == n && means.size() == n && vars.size() == n,
                    "update_running_stats: expected one running buffer set, count, mean and var per BN");
  for (int64_t count : running.counts)
    TORCH_CHECK_VALUE(count == 0 || count > 1, "update_running_stats: counts: expected N·H·W = 0 or > 1, got ",
                      count);
  RunningUpdates updates;
  updates.add(running, means, vars);
  updates.apply();
}

std::vector<at::Tensor> preact_units_train(at::Tensor x, at::Tensor mean, at::Tensor var,
                                           const std::vector<std::shared_ptr<UnitPlan>>& plans) {
  RunningUpdates updates;
  for (const auto& plan : plans) {
    TORCH_CHECK_VALUE(plan != nullptr, "preact_units_train: plans: expected UnitPlan objects, got None");
    auto out = unit_train(x, mean, var, plan, updates);
    x = std::move(out[0]);
    mean = std::move(out[1]);
    var = std::move(out[2]);
  }
  updates.apply();
  return {x, mean, var};
}

LayerPlan make_layer_plan(std::optional<at::Tensor> weight, at::Tensor bn_weight, at::Tensor bn_bias, double eps,
                          std::vector<int64_t> stride, std::vector<int64_t> padding,
                          std::optional<at::Tensor> running_mean, std::optional<at::Tensor> running_var,
                          std::optional<at::Tensor> num_batches_tracked, double momentum) {
  TORCH_CHECK_VALUE(bn_weight.defined() && bn_bias.defined(), "LayerPlan: bn_weight, bn_bias: expected tensors");
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2, "LayerPlan: stride, padding: expected (h, w) pairs");
  const bool running = running_mean.has_value();
  TORCH_CHECK_VALUE(running_var.has_value() == running && num_batches_tracked.has_value() == running,
                    "LayerPlan: running_mean, running_var, num_batches_tracked: expected all three or none");
  RunningStats stats{{}, {}, {}, {}, momentum};
  if (running) stats = RunningStats{{*running_mean}, {*running_var}, {*num_batches_tracked}, {0}, momentum};
  return LayerPlan{weight.value_or(Tensor()), std::move(bn_weight), std::move(bn_bias), eps, std::move(stride),
                   std::move(padding), std::move(stats)};
}

at::Tensor preact_layer_train(const at::Tensor& x, const std::optional<at::Tensor>& mean_in,
                              const std::optional<at::Tensor>& var_in, const std::shared_ptr<LayerPlan>& plan,
                              std::optional<at::ScalarType> weight_dtype) {
  TORCH_CHECK_VALUE(plan != nullptr, "preact_layer_train: plan: expected a LayerPlan, got None");
  const int64_t channels = plan->bn_weight.size(0);
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) == channels, "preact_layer_train: x: expected [N, ", channels,
                    ", H, W], got ", x.sizes());
  const int64_t count = x.numel() / channels;
  TORCH_CHECK_VALUE(count != 1, "preact_layer_train: x: batch-norm training needs more than one value per channel");
  TORCH_CHECK_VALUE(mean_in.has_value() == var_in.has_value(),
                    "preact_layer_train: mean, var: expected both or neither");
  const Tensor no_stats;
  const std::initializer_list<at::TensorList> inputs{x, mean_in.has_value() ? *mean_in : no_stats,
                                                     var_in.has_value() ? *var_in : no_stats, plan->weight,
                                                     plan->bn_weight, plan->bn_bias};
  check_no_forward_grad(inputs, "preact_layer_train", "layer");
  Tensor mean, var, rstd, out;
  if (mean_in.has_value()) {
    mean = *mean_in;
    var = *var_in;
  } else {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(mean, var) = batch_stats(x);
  }
  if (!plan->running.means.empty()) {  // before the statistics are used, as functional.bn_statistics orders it
    plan->running.counts[0] = count;
    update_running_stats(plan->running, {mean}, {var});
  }
  Tensor w;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    Affine bn;
    std::tie(rstd, bn) = bn_affine(mean, var, plan->eps, plan->bn_weight, plan->bn_bias);
    if (plan->weight.defined()) w = weight_dtype.has_value() ? cast(plan->weight, *weight_dtype) : plan->weight;
    out = w.defined() ? conv(bn_relu(x, bn.scale, bn.shift, w.scalar_type()), w, plan->stride, plan->padding)
                      : bn_relu(x, bn.scale, bn.shift, x.scalar_type());
  }
  if (records_node(inputs)) {
    auto node = make_node<NativeLayerBackward>(plan, x, w, mean, rstd);
    node->set_next_edges(plan->weight.defined()
                             ? torch::autograd::collect_next_edges(x, plan->weight, plan->bn_weight, plan->bn_bias)
                             : torch::autograd::collect_next_edges(x, plan->bn_weight, plan->bn_bias));
    torch::autograd::set_history(out, node);
  }
  return out;
}

// The affine map's composition, the kernel of every device without its own (bn_affine_composite above).
TORCH_LIBRARY_IMPL(fastresnet_ext, CompositeExplicitAutograd, m) {
  m.impl("bn_affine", &bn_affine_composite);
  m.impl("scale_shift", &scale_shift_composite);
}

}  // namespace fastresnet_ext
