// The C++ training entries of full pre-activation residual units and of single fused layers (unit.cpp), bound to
// Python in ops.cpp as fastresnet._C.UnitPlan / preact_units_train and fastresnet._C.LayerPlan / preact_layer_train.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace fastresnet_ext {

// A unit's per-layer configuration (fastresnet/ops/unit_ops.py documents the meanings): eps per BN, flattened
// (h, w) stride and padding pairs per conv, the shortcut kind and its stride.
struct UnitConfig {
  std::vector<double> eps;
  std::vector<int64_t> strides, paddings;
  std::string shortcut;
  int64_t shortcut_stride;
};

// The running buffers of a unit's BNs, one entry per BN in order (counts: N·H·W of each BN's input); all empty:
// leave them alone (a recomputation's replay).
struct RunningStats {
  std::vector<at::Tensor> means, vars, num_batches_tracked;
  std::vector<int64_t> counts;
  double momentum;
};

// Everything a unit's training call needs besides its input: built once per unit and input shape (bound to Python
// as fastresnet._C.UnitPlan), so a step passes one object per unit instead of converting sixteen arguments.
struct UnitPlan {
  std::vector<at::Tensor> weights, bn_weights, bn_biases;  // every BN's γ and β: all present
  UnitConfig cfg;
  RunningStats running;
};

UnitPlan make_unit_plan(std::vector<at::Tensor> weights, std::vector<at::Tensor> bn_weights,
                        std::vector<at::Tensor> bn_biases, std::vector<double> eps, std::vector<int64_t> strides,
                        std::vector<int64_t> paddings, std::string shortcut, int64_t shortcut_stride,
                        std::vector<at::Tensor> running_means, std::vector<at::Tensor> running_vars,
                        std::vector<at::Tensor> num_batches_tracked, std::vector<int64_t> counts, double momentum);

// BatchNorm's running-statistics update of several BNs at once (one entry of `running` per BN, with its batch
// statistics means[i], vars[i]): fastresnet.reference.update_running_stats_many's arithmetic, bitwise, for BNs with
// num_batches_tracked and a numeric momentum. Bound as fastresnet._C.update_running_stats.
void update_running_stats(const RunningStats& running, const std::vector<at::Tensor>& means,
                          const std::vector<at::Tensor>& vars);

// Units in training, one after another, each as one autograd node whose backward is C++: x_{l+1} = h + F(x_l) from
// x and its batch statistics (mean, var); each unit hands its output's statistics to the next. Returns [x_out, its
// mean, its var]. Bound as fastresnet._C.preact_units_train.
std::vector<at::Tensor> preact_units_train(at::Tensor x, at::Tensor mean, at::Tensor var,
                                           const std::vector<std::shared_ptr<UnitPlan>>& plans);

// One fused layer of a converted model — BN → ReLU (BNReLU2d) or BN → ReLU → conv (PreActConv2d) — for its training
// calls (bound as fastresnet._C.LayerPlan): the conv weight (undefined for BN → ReLU), γ, β, eps, the conv's stride
// and padding, and the BN's running buffers (one entry, or none: no update; counts[0] is set by each call).
struct LayerPlan {
  at::Tensor weight, bn_weight, bn_bias;
  double eps;
  std::vector<int64_t> stride, padding;
  RunningStats running;
};

LayerPlan make_layer_plan(std::optional<at::Tensor> weight, at::Tensor bn_weight, at::Tensor bn_bias, double eps,
                          std::vector<int64_t> stride, std::vector<int64_t> padding,
                          std::optional<at::Tensor> running_mean, std::optional<at::Tensor> running_var,
                          std::optional<at::Tensor> num_batches_tracked, double momentum);

// The layer in training on x (batch statistics: `mean`/`var` when given, else computed from x), its running buffers
// updated, as one autograd node whose backward is C++ (saved: x, the weight, mean, rstd, γ, β). `weight_dtype`: the
// conv's compute dtype under autocast (the weight is cast to it, and its gradient cast back, as autograd would for
// `weight.to(dtype)`); the cast copy is what is saved. Returns its output. Bound as fastresnet._C.preact_layer_train.
at::Tensor preact_layer_train(const at::Tensor& x, const std::optional<at::Tensor>& mean,
                              const std::optional<at::Tensor>& var, const std::shared_ptr<LayerPlan>& plan,
                              std::optional<at::ScalarType> weight_dtype);

}  // namespace fastresnet_ext
