// Plain launchers of the CUDA kernels in bn_kernels.cu: raw device pointers, sizes and a cudaStream_t, no torch
// headers (docs/architecture.md §6), so the kernels compile standalone with nvcc. Semantics: fastresnet/reference.py.
//
// Tensors are dense 4-D [N, C, H, W] in NHWC (channels_last) or NCHW (contiguous) order, per Geom::nhwc. Statistics,
// scale/shift/mean/rstd and all workspaces use the accumulation type: double for kFloat64 data, float otherwise.
// Reductions are deterministic: per-tile partials (tile boundaries depend on the shape only) written to a
// [tiles, C] workspace and merged per channel in a fixed order (each of 32 lanes merges every 32nd tile, then a fixed
// tree over the lanes) — no atomics.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastresnet_cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct Geom {
  int64_t N, C, HW;  // M = N·HW elements per channel
  bool nhwc;
};

// Rows of the [tiles, C] partial workspaces of batch_stats, add_stats and bn_relu_backward: at most 1024 (tiles grow
// with M = N·H·W beyond that), so no merge walks more than 32 partials serially.
int64_t num_tiles(const Geom& g);

// mean, var [C] (biased) of x. partial: 3·num_tiles(g)·C accumulators (count, mean − the
// channel's first element, M2 per tile).
cudaError_t batch_stats(const void* x, DType dt, const Geom& g, void* partial, void* mean, void* var,
                        cudaStream_t stream);

// y = a + b (added in the accumulation type, rounded once to dt) and mean, var [C] of the rounded y, in one pass.
cudaError_t add_stats(const void* a, const void* b, void* y, DType dt, const Geom& g, void* partial, void* mean,
                      void* var, cudaStream_t stream);

// out = max(x·scale + shift, 0), scale/shift [C]. out_dt: x_dt, or kFloat16 / kBFloat16 for kFloat32 x (autocast).
// Returns cudaErrorNotSupported for other dtype pairs.
cudaError_t bn_relu(const void* x, DType x_dt, void* out, DType out_dt, const void* scale, const void* shift,
                    const Geom& g, cudaStream_t stream);

// Backward of a = relu(x·scale + shift): dz = x·scale + shift ≤ 0 ? 0 : dy (a NaN x·scale + shift passes dy);
// sum_dz = Σdz, sum_dz_xhat = rstd·Σdz·(x − mean) [C]; dx = A·dz + B·(x − mean) + C' (+ dres) rounded to x_dt, with
// A = scale and, in training,
// B = −scale·rstd²·Σdz(x−mean)/M, C' = −scale·Σdz/M (eval: B = C' = 0). dy and dres (may be null) have dtype g_dt: x_dt, or kFloat32 for
// kFloat16 / kBFloat16 x. partial: 2·num_tiles(g)·C accumulators; coef: 3·C accumulators.
cudaError_t bn_relu_backward(const void* dy, const void* dres, DType g_dt, const void* x, DType x_dt,
                             const void* scale, const void* shift, const void* mean, const void* rstd, bool training,
                             const Geom& g, void* partial, void* coef, void* sum_dz, void* sum_dz_xhat, void* dx,
                             cudaStream_t stream);

// BN's folded affine map per channel (bn_affine): rstd = rsqrt(var + eps), scale = γ·rstd, shift = β − mean·scale
// (γ = 1, β = 0 when gamma / beta are null), every operation rounded to dt (kFloat32 or kFloat64; no multiply is
// fused into an add): bitwise ATen's CUDA composition `torch.rsqrt(var + eps)`, `γ·rstd`, `β − mean·scale`. var null
// (scale_shift): rstd is read instead of written. All vectors [C] of dt, dense.
cudaError_t bn_affine(const void* mean, const void* var, double eps, const void* gamma, const void* beta, void* rstd,
                      void* scale, void* shift, int64_t C, DType dt, cudaStream_t stream);

}  // namespace fastresnet_cuda
