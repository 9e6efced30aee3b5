// CUDA kernels of the tier-A primitives (launchers and contract: bn_kernels.h). Only CUDA toolkit headers here.
//
// Reductions (batch_stats, add_stats, bn_relu_backward's Σdz, Σdz·(x − mean)) run in two kernels:
//   1. partial: one thread block per (tile, channel group). NHWC: block (32 channels × 8 row-groups) over a tile of
//      kRowsNHWC rows, so a warp reads 32 consecutive channels of a row; NCHW: 256 threads over a run of at most
//      kChunkNCHW elements of one (n, c) plane. Each thread accumulates sequentially (Welford for moments), the
//      block combines its threads in a fixed tree order (Chan's formula for moments) and writes the tile's partial
//      to partial[tile·C + c].
//   2. finalize: one thread per channel merges the tiles' partials in tile order.
// Both steps have a fixed order, so results are bitwise reproducible (no atomics).
// Elementwise kernels (bn_relu, dx) are grid-stride loops; the channel of element i is i % C (NHWC) or
// (i / HW) % C (NCHW).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "bn_kernels.h"

namespace fastresnet_cuda {
namespace {

constexpr int kRowsNHWC = 256;    // rows per NHWC tile (8 row-groups × 32 rows)
constexpr int kChunkNCHW = 4096;  // elements per NCHW tile (within one plane)
constexpr int kThreads = 256;

// ---- conversions between storage and accumulation types --------------------------------------------------------
template <typename A> __device__ inline A to_acc(float v) { return static_cast<A>(v); }
template <typename A> __device__ inline A to_acc(double v) { return static_cast<A>(v); }
template <typename A> __device__ inline A to_acc(__half v) { return static_cast<A>(__half2float(v)); }
template <typename A> __device__ inline A to_acc(__nv_bfloat16 v) { return static_cast<A>(__bfloat162float(v)); }

template <typename T> struct Store;
template <> struct Store<float> { template <typename A> __device__ static float of(A v) { return static_cast<float>(v); } };
template <> struct Store<double> { template <typename A> __device__ static double of(A v) { return static_cast<double>(v); } };
template <> struct Store<__half> { __device__ static __half of(float v) { return __float2half_rn(v); } };
template <> struct Store<__nv_bfloat16> { __device__ static __nv_bfloat16 of(float v) { return __float2bfloat16_rn(v); } };

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// ---- tiling ------------------------------------------------------------------------------------------------------
struct Tiles {
  int64_t tiles;   // per channel
  int64_t chunks;  // NCHW: tiles per plane
  int64_t chunk;   // NCHW: elements per tile
};

__host__ __device__ inline Tiles tiling(const Geom& g) {
  Tiles t{};
  if (g.nhwc) {
    t.tiles = (g.N * g.HW + kRowsNHWC - 1) / kRowsNHWC;
  } else {
    t.chunk = g.HW < kChunkNCHW ? g.HW : kChunkNCHW;
    t.chunks = (g.HW + t.chunk - 1) / t.chunk;
    t.tiles = g.N * t.chunks;
  }
  return t;
}

// Chan's merge of (nb, mb, m2b) into (n, m, m2).
template <typename A>
__device__ inline void chan_merge(A& n, A& m, A& m2, A nb, A mb, A m2b) {
  const A tot = n + nb;
  if (nb == A(0)) return;
  const A delta = mb - m, f = nb / tot;
  m += delta * f;
  m2 += m2b + delta * delta * n * f;
  n = tot;
}

// The element range of thread (lane, group) in a tile: NHWC rows r0 + group + 8·k of channel c; NCHW elements
// start + lane + 256·k of one plane. visit(i) is called with the element index, in increasing order per thread.
template <typename F>
__device__ inline bool visit_tile(const Geom& g, const Tiles& t, int64_t tile, int64_t& c, const F& visit) {
  if (g.nhwc) {
    c = static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x;
    if (c >= g.C) return false;
    const int64_t M = g.N * g.HW, r0 = tile * kRowsNHWC;
    const int64_t r1 = r0 + kRowsNHWC < M ? r0 + kRowsNHWC : M;
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) visit(r * g.C + c);
  } else {
    c = blockIdx.y;
    const int64_t n = tile / t.chunks, k = tile % t.chunks;
    const int64_t h0 = k * t.chunk, h1 = h0 + t.chunk < g.HW ? h0 + t.chunk : g.HW;
    const int64_t base = (n * g.C + c) * g.HW;
    for (int64_t h = h0 + threadIdx.x; h < h1; h += blockDim.x) visit(base + h);
  }
  return true;
}

// Index of this thread within the block's fixed reduction order, and the number of entries combined per channel.
// NHWC: the 8 row-groups of one channel lane (entries lane + 32·group); NCHW: all 256 threads.
__device__ inline int slot() { return threadIdx.y * blockDim.x + threadIdx.x; }

// Fixed-order tree combine over shared arrays of `width` entries per channel lane (stride between entries: lanes).
template <typename A, typename Combine>
__device__ inline void tree_combine(A (*sh)[kThreads], int width, int lanes, const Combine& combine) {
  const int s = slot(), lane = s % lanes, idx = s / lanes;
  for (int half = width / 2; half > 0; half /= 2) {
    __syncthreads();
    if (idx < half) combine(sh, lane + idx * lanes, lane + (idx + half) * lanes);
  }
  __syncthreads();
}

// Partial (count, mean, M2) per (tile, channel) of y; with ADD, y = a + b is computed and stored first.
template <typename T, bool ADD>
__global__ void moments_partial_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, Geom g,
                                       typename Acc<T>::type* __restrict__ partial) {
  using A = typename Acc<T>::type;
  __shared__ A sh[3][kThreads];
  const Tiles t = tiling(g);
  const int64_t tile = blockIdx.x;
  A n = 0, m = 0, m2 = 0;
  int64_t c = 0;
  const bool active = visit_tile(g, t, tile, c, [&](int64_t i) {
    A v;
    if (ADD) {
      const T s = Store<T>::of(to_acc<A>(a[i]) + to_acc<A>(b[i]));
      y[i] = s;
      v = to_acc<A>(s);  // statistics of the rounded output
    } else {
      v = to_acc<A>(a[i]);
    }
    n += A(1);
    const A d = v - m;
    m += d / n;
    m2 += d * (v - m);
  });
  const int s = slot();
  sh[0][s] = n; sh[1][s] = m; sh[2][s] = m2;
  const int lanes = g.nhwc ? 32 : 1, width = g.nhwc ? blockDim.y : blockDim.x;
  tree_combine(sh, width, lanes, [](A (*p)[kThreads], int dst, int src) {
    chan_merge(p[0][dst], p[1][dst], p[2][dst], p[0][src], p[1][src], p[2][src]);
  });
  if (active && s < lanes) {
    const int64_t tiles = t.tiles, o = tile * g.C + c;
    partial[o] = sh[0][s];
    partial[tiles * g.C + o] = sh[1][s];
    partial[2 * tiles * g.C + o] = sh[2][s];
  }
}

template <typename A>
__global__ void moments_finalize_kernel(const A* __restrict__ partial, Geom g, A* __restrict__ mean,
                                        A* __restrict__ var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  const int64_t tiles = tiling(g).tiles;
  A n = 0, m = 0, m2 = 0;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t o = tile * g.C + c;
    chan_merge(n, m, m2, partial[o], partial[tiles * g.C + o], partial[2 * tiles * g.C + o]);
  }
  mean[c] = m;
  var[c] = m2 / n;
}

// Partial Σdz and Σdz·(x − mean) per (tile, channel); dz = dy·[x·scale + shift > 0].
template <typename T, typename G>
__global__ void bwd_partial_kernel(const G* __restrict__ dy, const T* __restrict__ x,
                                   const typename Acc<T>::type* __restrict__ scale,
                                   const typename Acc<T>::type* __restrict__ shift,
                                   const typename Acc<T>::type* __restrict__ mean, Geom g,
                                   typename Acc<T>::type* __restrict__ partial) {
  using A = typename Acc<T>::type;
  __shared__ A sh[2][kThreads];
  const Tiles t = tiling(g);
  const int64_t tile = blockIdx.x;
  A sdz = 0, sdzx = 0;
  int64_t c = 0;
  // c is set by visit_tile before the first visit; read the per-channel constants lazily through it.
  const bool active = visit_tile(g, t, tile, c, [&](int64_t i) {
    const A xv = to_acc<A>(x[i]);
    const A dz = xv * scale[c] + shift[c] > A(0) ? to_acc<A>(dy[i]) : A(0);
    sdz += dz;
    sdzx += dz * (xv - mean[c]);
  });
  const int s = slot();
  sh[0][s] = sdz; sh[1][s] = sdzx;
  const int lanes = g.nhwc ? 32 : 1, width = g.nhwc ? blockDim.y : blockDim.x;
  tree_combine(sh, width, lanes, [](A (*p)[kThreads], int dst, int src) {
    p[0][dst] += p[0][src];
    p[1][dst] += p[1][src];
  });
  if (active && s < lanes) {
    const int64_t o = tile * g.C + c;
    partial[o] = sh[0][s];
    partial[t.tiles * g.C + o] = sh[1][s];
  }
}

template <typename A>
__global__ void bwd_finalize_kernel(const A* __restrict__ partial, const A* __restrict__ scale,
                                    const A* __restrict__ mean, const A* __restrict__ rstd, bool training, Geom g,
                                    A* __restrict__ sum_dz, A* __restrict__ sum_dz_xhat, A* __restrict__ coef) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  const int64_t tiles = tiling(g).tiles;
  A sa = 0, sb = 0;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    sa += partial[tile * g.C + c];
    sb += partial[tiles * g.C + tile * g.C + c];
  }
  const A inv_m = A(1) / static_cast<A>(g.N * g.HW), s = scale[c], r = rstd[c];
  sum_dz[c] = sa;
  sum_dz_xhat[c] = sb * r;
  const A B = training ? -s * r * r * sb * inv_m : A(0);
  coef[c] = s;
  coef[g.C + c] = B;
  coef[2 * g.C + c] = training ? -s * sa * inv_m : A(0);
}

__device__ inline int64_t channel_of(int64_t i, const Geom& g) { return g.nhwc ? i % g.C : (i / g.HW) % g.C; }

template <typename T, typename O>
__global__ void bn_relu_kernel(const T* __restrict__ x, O* __restrict__ out, const typename Acc<T>::type* scale,
                               const typename Acc<T>::type* shift, Geom g) {
  using A = typename Acc<T>::type;
  const int64_t total = g.N * g.C * g.HW;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of(i, g);
    const A v = to_acc<A>(x[i]) * scale[c] + shift[c];
    out[i] = Store<O>::of(v > A(0) ? v : A(0));
  }
}

template <typename T, typename G>
__global__ void bwd_dx_kernel(const G* __restrict__ dy, const G* __restrict__ dres, const T* __restrict__ x,
                              const typename Acc<T>::type* __restrict__ scale,
                              const typename Acc<T>::type* __restrict__ shift,
                              const typename Acc<T>::type* __restrict__ mean,
                              const typename Acc<T>::type* __restrict__ coef, Geom g, T* __restrict__ dx) {
  using A = typename Acc<T>::type;
  const int64_t total = g.N * g.C * g.HW;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of(i, g);
    const A xv = to_acc<A>(x[i]);
    const A dz = xv * scale[c] + shift[c] > A(0) ? to_acc<A>(dy[i]) : A(0);
    A v = coef[c] * dz + coef[g.C + c] * (xv - mean[c]) + coef[2 * g.C + c];
    if (dres != nullptr) v += to_acc<A>(dres[i]);
    dx[i] = Store<T>::of(v);
  }
}

// ---- launch helpers ----------------------------------------------------------------------------------------------
dim3 reduce_grid(const Geom& g) {
  const Tiles t = tiling(g);
  return dim3(static_cast<unsigned>(t.tiles), static_cast<unsigned>(g.nhwc ? (g.C + 31) / 32 : g.C));
}
dim3 reduce_block(const Geom& g) { return g.nhwc ? dim3(32, 8) : dim3(kThreads); }
unsigned finalize_blocks(const Geom& g) { return static_cast<unsigned>((g.C + 127) / 128); }
unsigned elementwise_blocks(const Geom& g) {
  const int64_t want = (g.N * g.C * g.HW + kThreads - 1) / kThreads;
  return static_cast<unsigned>(want < 65536 ? want : 65536);
}

// Calls f(T{}) with the storage type of dt.
template <typename F>
cudaError_t with_type(DType dt, const F& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorNotSupported;
}

template <typename T, bool ADD>
cudaError_t moments(const T* a, const T* b, T* y, const Geom& g, void* partial, void* mean, void* var,
                    cudaStream_t stream) {
  using A = typename Acc<T>::type;
  moments_partial_kernel<T, ADD><<<reduce_grid(g), reduce_block(g), 0, stream>>>(a, b, y, g, static_cast<A*>(partial));
  moments_finalize_kernel<A><<<finalize_blocks(g), 128, 0, stream>>>(static_cast<const A*>(partial), g,
                                                                     static_cast<A*>(mean), static_cast<A*>(var));
  return cudaGetLastError();
}

template <typename T, typename G>
cudaError_t backward(const void* dy, const void* dres, const void* x, const void* scale, const void* shift,
                     const void* mean, const void* rstd, bool training, const Geom& g, void* partial, void* coef,
                     void* sum_dz, void* sum_dz_xhat, void* dx, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const A *s = static_cast<const A*>(scale), *t = static_cast<const A*>(shift), *m = static_cast<const A*>(mean);
  bwd_partial_kernel<T, G><<<reduce_grid(g), reduce_block(g), 0, stream>>>(
      static_cast<const G*>(dy), static_cast<const T*>(x), s, t, m, g, static_cast<A*>(partial));
  bwd_finalize_kernel<A><<<finalize_blocks(g), 128, 0, stream>>>(
      static_cast<const A*>(partial), s, m, static_cast<const A*>(rstd), training, g, static_cast<A*>(sum_dz),
      static_cast<A*>(sum_dz_xhat), static_cast<A*>(coef));
  bwd_dx_kernel<T, G><<<elementwise_blocks(g), kThreads, 0, stream>>>(
      static_cast<const G*>(dy), static_cast<const G*>(dres), static_cast<const T*>(x), s, t, m,
      static_cast<const A*>(coef), g, static_cast<T*>(dx));
  return cudaGetLastError();
}

}  // namespace

int64_t num_tiles(const Geom& g) { return tiling(g).tiles; }

cudaError_t batch_stats(const void* x, DType dt, const Geom& g, void* partial, void* mean, void* var,
                        cudaStream_t stream) {
  return with_type(dt, [&](auto tag) {
    using T = decltype(tag);
    return moments<T, false>(static_cast<const T*>(x), nullptr, nullptr, g, partial, mean, var, stream);
  });
}

cudaError_t add_stats(const void* a, const void* b, void* y, DType dt, const Geom& g, void* partial, void* mean,
                      void* var, cudaStream_t stream) {
  return with_type(dt, [&](auto tag) {
    using T = decltype(tag);
    return moments<T, true>(static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(y), g, partial, mean,
                            var, stream);
  });
}

cudaError_t bn_relu(const void* x, DType x_dt, void* out, DType out_dt, const void* scale, const void* shift,
                    const Geom& g, cudaStream_t stream) {
  const unsigned blocks = elementwise_blocks(g);
  if (out_dt != x_dt) {  // autocast: fp32 x, low-precision activation
    if (x_dt != DType::kFloat32) return cudaErrorNotSupported;
    const float *xs = static_cast<const float*>(x), *s = static_cast<const float*>(scale),
                *t = static_cast<const float*>(shift);
    if (out_dt == DType::kFloat16)
      bn_relu_kernel<float, __half><<<blocks, kThreads, 0, stream>>>(xs, static_cast<__half*>(out), s, t, g);
    else if (out_dt == DType::kBFloat16)
      bn_relu_kernel<float, __nv_bfloat16><<<blocks, kThreads, 0, stream>>>(xs, static_cast<__nv_bfloat16*>(out), s,
                                                                            t, g);
    else
      return cudaErrorNotSupported;
    return cudaGetLastError();
  }
  return with_type(x_dt, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    bn_relu_kernel<T, T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(out),
                                                          static_cast<const A*>(scale), static_cast<const A*>(shift), g);
    return cudaGetLastError();
  });
}

cudaError_t bn_relu_backward(const void* dy, const void* dres, DType g_dt, const void* x, DType x_dt,
                             const void* scale, const void* shift, const void* mean, const void* rstd, bool training,
                             const Geom& g, void* partial, void* coef, void* sum_dz, void* sum_dz_xhat, void* dx,
                             cudaStream_t stream) {
  if (g_dt == x_dt) {
    return with_type(x_dt, [&](auto tag) {
      using T = decltype(tag);
      return backward<T, T>(dy, dres, x, scale, shift, mean, rstd, training, g, partial, coef, sum_dz, sum_dz_xhat,
                            dx, stream);
    });
  }
  if (g_dt != DType::kFloat32) return cudaErrorNotSupported;
  if (x_dt == DType::kFloat16)
    return backward<__half, float>(dy, dres, x, scale, shift, mean, rstd, training, g, partial, coef, sum_dz,
                                   sum_dz_xhat, dx, stream);
  if (x_dt == DType::kBFloat16)
    return backward<__nv_bfloat16, float>(dy, dres, x, scale, shift, mean, rstd, training, g, partial, coef, sum_dz,
                                          sum_dz_xhat, dx, stream);
  return cudaErrorNotSupported;
}

}  // namespace fastresnet_cuda
