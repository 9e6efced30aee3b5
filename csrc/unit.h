// The C++ training entry of a full pre-activation residual unit (unit.cpp), bound to Python in ops.cpp as
// fastresnet._C.preact_unit_train.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace fastresnet_ext {

// x_{l+1} = h + F(x) in training as one autograd node whose backward is C++ (fastresnet/ops/unit_ops.py documents
// the unit's arguments; bn_weights/bn_biases: every BN's γ and β, all present). Returns [x_{l+1}, its mean, its var].
// The running buffers of the unit's BNs (one entry per BN in order; counts: N·H·W of each BN's input) are updated
// with momentum; all empty: left alone (a recomputation's replay).
std::vector<at::Tensor> preact_unit_train(const at::Tensor& x, const at::Tensor& x_mean, const at::Tensor& x_var,
                                          const std::vector<at::Tensor>& weights,
                                          const std::vector<at::Tensor>& bn_weights,
                                          const std::vector<at::Tensor>& bn_biases, std::vector<double> eps,
                                          std::vector<int64_t> strides, std::vector<int64_t> paddings,
                                          std::string shortcut, int64_t shortcut_stride,
                                          std::vector<at::Tensor> running_means, std::vector<at::Tensor> running_vars,
                                          std::vector<at::Tensor> num_batches_tracked, std::vector<int64_t> counts,
                                          double momentum);

}  // namespace fastresnet_ext
