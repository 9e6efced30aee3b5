// CUDA kernels of the tier-A primitives (launchers and contract: bn_kernels.h). Only CUDA toolkit headers here.
//
// Reductions (batch_stats, add_stats, bn_relu_backward's Σdz, Σdz·(x − mean)) run in two kernels:
//   1. partial: the M = N·H·W elements of a channel are cut into at most kMaxTiles tiles of tiling(g).len elements
//      (a multiple of the base tile; boundaries depend on the shape only). One thread block per (tile, channel
//      group). NHWC: block (32 channels × 8 row-groups), a warp reads 32 consecutive channels of a row, each thread
//      walks len / 8 rows; NCHW: 256 threads over the tile's elements of one channel (runs of consecutive (n, c)
//      planes), each thread walks len / 256 elements. Each thread accumulates sequentially (Welford for moments,
//      of the data less the channel's pivot, its first element: the moments of data with |mean| ≫ std keep their
//      precision), the block combines its threads in a fixed tree order (Chan's formula for moments) and writes
//      the tile's partial to partial[tile·C + c].
//   2. finalize: one block per 32 channels, 32 tile lanes per channel. Lane y merges tiles y, y + 32, y + 64, … in
//      order, so no thread walks more than kMaxTiles / kFinalizeLanes = 32 partials; the 32 lanes then combine in a
//      fixed 5-level shared-memory tree (Chan's formula for moments, plus the pivot for the mean; plain sums for the
//      backward sums).
// Every step has a fixed order, so results are bitwise reproducible (no atomics).
// Elementwise kernels (bn_relu, dx) view the tensor as a [rows, cols] matrix: NHWC rows = N·H·W, cols = C (the
// channel is the column, fixed per thread, so its constants are loaded once); NCHW rows = N·C planes, cols = H·W
// (the channel is row mod C, advanced per row step without a division). A block covers a 2-D tile of V-element
// vectors (16-byte loads of x when the row length is a multiple of V and every pointer is aligned, else V = 1).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "bn_kernels.h"

// Every launch site: FASTRESNET_LAUNCH(grid, block, shared bytes, stream, kernel)(arguments). Under nvcc it is the
// triple-chevron launch; the host emulator of the tests (tests/cuda_emu) defines it as its own launch.
#ifndef FASTRESNET_LAUNCH
#define FASTRESNET_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace fastresnet_cuda {
namespace {

constexpr int kRowsNHWC = 256;    // rows per NHWC base tile (8 row-groups × 32 rows)
constexpr int kChunkNCHW = 4096;  // elements per NCHW base tile (256 threads × 16)
constexpr int64_t kMaxTiles = 1024;
constexpr int kThreads = 256;
constexpr int kFinalizeLanes = 32;  // tile lanes per channel in a finalize block (blockDim.y)
constexpr int kFinalizeThreads = 32 * kFinalizeLanes;  // __launch_bounds__(kFinalizeThreads, 1): without the explicit
                                                       // one block per SM, ptxas (sm_80) squeezes registers and spills
constexpr int64_t kMaxElementwiseBlocks = 4096;  // ≈ 4 waves of 8 blocks on 132 SMs; larger tensors grid-stride
static_assert((kFinalizeLanes & (kFinalizeLanes - 1)) == 0, "the finalize tree needs a power-of-two lane count");
static_assert(kMaxTiles / kFinalizeLanes <= 32, "a finalize lane merges at most 32 partials");

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

// ---- tiling of the reductions ------------------------------------------------------------------------------------
struct Tiles {
  int64_t tiles;  // per channel, at most kMaxTiles
  int64_t len;    // elements of a channel per tile (the last tile may be shorter)
};

// len is the smallest multiple of the base tile that cuts M into at most kMaxTiles tiles: M ≤ base·⌈M/base⌉ ≤
// len·kMaxTiles. Below kMaxTiles base tiles (NHWC: M ≤ 262,144, every CIFAR shape) len is the base tile.
__host__ __device__ inline Tiles tiling(const Geom& g) {
  const int64_t M = g.N * g.HW, base = g.nhwc ? kRowsNHWC : kChunkNCHW;
  const int64_t base_tiles = (M + base - 1) / base;
  const int64_t len = base * ((base_tiles + kMaxTiles - 1) / kMaxTiles);
  return Tiles{(M + len - 1) / len, len};
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

// The elements of thread (lane, group) in a tile, in increasing order: NHWC rows j0 + group + 8·k of channel c;
// NCHW per-channel indices j0 + lane + 256·k of channel c, at (j / HW)·C·HW + c·HW + j mod HW (the offset is
// advanced per step, two divisions per thread). visit(i) gets the element index.
template <typename F>
__device__ inline bool visit_tile(const Geom& g, const Tiles& t, int64_t tile, int64_t& c, const F& visit) {
  const int64_t M = g.N * g.HW, j0 = tile * t.len, j1 = j0 + t.len < M ? j0 + t.len : M;
  if (g.nhwc) {
    c = static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x;
    if (c >= g.C) return false;
    for (int64_t r = j0 + threadIdx.y; r < j1; r += blockDim.y) visit(r * g.C + c);
  } else {
    c = blockIdx.y;
    const int64_t plane = g.C * g.HW, step = blockDim.x / g.HW, carry_h = blockDim.x % g.HW;
    int64_t j = j0 + threadIdx.x, h = j % g.HW, off = (j / g.HW) * plane + c * g.HW + h;
    for (; j < j1; j += blockDim.x) {
      visit(off);
      off += step * plane + carry_h;
      h += carry_h;
      if (h >= g.HW) {
        h -= g.HW;
        off += plane - g.HW;
      }
    }
  }
  return true;
}

// Index of this thread within the block's fixed reduction order: entry lane + lanes·idx of a shared array holds the
// idx-th accumulator of channel lane (partial NHWC: 32 lanes × 8 row-groups; partial NCHW: 1 × 256; finalize:
// 32 lanes × kFinalizeLanes).
__device__ inline int slot() { return threadIdx.y * blockDim.x + threadIdx.x; }

// Fixed-order tree combine over shared arrays of `width` (a power of two) entries per channel lane.
template <typename A, int S, typename Combine>
__device__ inline void tree_combine(A (*sh)[S], int width, int lanes, const Combine& combine) {
  const int s = slot(), lane = s % lanes, idx = s / lanes;
  for (int half = width / 2; half > 0; half /= 2) {
    __syncthreads();
    if (idx < half) combine(sh, lane + idx * lanes, lane + (idx + half) * lanes);
  }
  __syncthreads();
}

// Stores this thread's (n, m, m2) and combines the block's entries per lane; the result is in sh[·][lane].
template <typename A, int S>
__device__ inline void block_moments(A (*sh)[S], A n, A m, A m2, int width, int lanes) {
  const int s = slot();
  sh[0][s] = n; sh[1][s] = m; sh[2][s] = m2;
  tree_combine(sh, width, lanes, [](A (*p)[S], int dst, int src) {
    chan_merge(p[0][dst], p[1][dst], p[2][dst], p[0][src], p[1][src], p[2][src]);
  });
}

// Stores this thread's (a, b) and sums the block's entries per lane; the result is in sh[·][lane].
template <typename A, int S>
__device__ inline void block_sums(A (*sh)[S], A a, A b, int width, int lanes) {
  const int s = slot();
  sh[0][s] = a; sh[1][s] = b;
  tree_combine(sh, width, lanes, [](A (*p)[S], int dst, int src) {
    p[0][dst] += p[0][src];
    p[1][dst] += p[1][src];
  });
}

// The element that moments_partial_kernel reads: a, or with ADD, y = a + b added in A and rounded once to T.
template <typename T, bool ADD, typename A>
__device__ inline T moments_input(const T* __restrict__ a, const T* __restrict__ b, int64_t i) {
  return ADD ? Store<T>::of(to_acc<A>(a[i]) + to_acc<A>(b[i])) : a[i];
}

// The pivot of channel c: its first element (n = h = w = 0), which the moments are accumulated relative to.
template <typename T, bool ADD, typename A>
__device__ inline A pivot(const T* __restrict__ a, const T* __restrict__ b, const Geom& g, int64_t c) {
  return to_acc<A>(moments_input<T, ADD, A>(a, b, g.nhwc ? c : c * g.HW));
}

// Partial (count, mean − pivot, M2) per (tile, channel) of y; with ADD, y = a + b is computed and stored first.
template <typename T, bool ADD>
__global__ void moments_partial_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, Geom g,
                                       typename Acc<T>::type* __restrict__ partial) {
  using A = typename Acc<T>::type;
  __shared__ A sh[3][kThreads];
  const Tiles t = tiling(g);
  const int64_t tile = blockIdx.x;
  A n = 0, m = 0, m2 = 0, p = 0;
  int64_t c = 0;
  const bool active = visit_tile(g, t, tile, c, [&](int64_t i) {
    if (n == A(0)) p = pivot<T, ADD, A>(a, b, g, c);  // c is set before the first visit
    const T s = moments_input<T, ADD, A>(a, b, i);
    if (ADD) y[i] = s;
    const A v = to_acc<A>(s) - p;  // with ADD, statistics of the rounded output
    n += A(1);
    const A d = v - m;
    m += d / n;
    m2 += d * (v - m);
  });
  const int lanes = g.nhwc ? 32 : 1;
  block_moments(sh, n, m, m2, g.nhwc ? blockDim.y : blockDim.x, lanes);
  const int s = slot();
  if (active && s < lanes) {
    const int64_t tiles = t.tiles, o = tile * g.C + c;
    partial[o] = sh[0][s];
    partial[tiles * g.C + o] = sh[1][s];
    partial[2 * tiles * g.C + o] = sh[2][s];
  }
}

// Channel c = 32·blockIdx.x + threadIdx.x of a finalize block, and whether it exists.
__device__ inline int64_t finalize_channel(const Geom& g, bool& active) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  active = c < g.C;
  return c;
}

template <typename T, bool ADD>
__global__ void __launch_bounds__(kFinalizeThreads, 1)
moments_finalize_kernel(const T* __restrict__ a, const T* __restrict__ b,
                        const typename Acc<T>::type* __restrict__ partial, Geom g,
                        typename Acc<T>::type* __restrict__ mean, typename Acc<T>::type* __restrict__ var) {
  using A = typename Acc<T>::type;
  __shared__ A sh[3][kFinalizeThreads];
  const int64_t tiles = tiling(g).tiles;
  bool active;
  const int64_t c = finalize_channel(g, active);
  A n = 0, m = 0, m2 = 0;
  if (active) {
    for (int64_t tile = threadIdx.y; tile < tiles; tile += kFinalizeLanes) {  // ≤ kMaxTiles / kFinalizeLanes
      const int64_t o = tile * g.C + c;
      chan_merge(n, m, m2, partial[o], partial[tiles * g.C + o], partial[2 * tiles * g.C + o]);
    }
  }
  block_moments(sh, n, m, m2, kFinalizeLanes, 32);
  if (active && threadIdx.y == 0) {
    mean[c] = pivot<T, ADD, A>(a, b, g, c) + sh[1][threadIdx.x];
    var[c] = sh[2][threadIdx.x] / sh[0][threadIdx.x];
  }
}

// Partial Σdz and Σdz·(x − mean) per (tile, channel); dz = 0 where x·scale + shift ≤ 0, else dy (PyTorch's ReLU
// backward: a NaN pre-activation passes dy).
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
    const A dz = xv * scale[c] + shift[c] <= A(0) ? A(0) : to_acc<A>(dy[i]);
    sdz += dz;
    sdzx += dz * (xv - mean[c]);
  });
  const int lanes = g.nhwc ? 32 : 1;
  block_sums(sh, sdz, sdzx, g.nhwc ? blockDim.y : blockDim.x, lanes);
  const int s = slot();
  if (active && s < lanes) {
    const int64_t o = tile * g.C + c;
    partial[o] = sh[0][s];
    partial[t.tiles * g.C + o] = sh[1][s];
  }
}

template <typename A>
__global__ void __launch_bounds__(kFinalizeThreads, 1)
bwd_finalize_kernel(const A* __restrict__ partial, const A* __restrict__ scale, const A* __restrict__ mean,
                    const A* __restrict__ rstd, bool training, Geom g, A* __restrict__ sum_dz,
                    A* __restrict__ sum_dz_xhat, A* __restrict__ coef) {
  __shared__ A sh[2][kFinalizeThreads];
  const int64_t tiles = tiling(g).tiles;
  bool active;
  const int64_t c = finalize_channel(g, active);
  A sa = 0, sb = 0;
  if (active) {
    for (int64_t tile = threadIdx.y; tile < tiles; tile += kFinalizeLanes) {  // ≤ kMaxTiles / kFinalizeLanes
      sa += partial[tile * g.C + c];
      sb += partial[tiles * g.C + tile * g.C + c];
    }
  }
  block_sums(sh, sa, sb, kFinalizeLanes, 32);
  if (!active || threadIdx.y != 0) return;
  sa = sh[0][threadIdx.x];
  sb = sh[1][threadIdx.x];
  const A inv_m = A(1) / static_cast<A>(g.N * g.HW), s = scale[c], r = rstd[c];
  sum_dz[c] = sa;
  sum_dz_xhat[c] = sb * r;
  const A B = training ? -s * r * r * sb * inv_m : A(0);
  coef[c] = s;
  coef[g.C + c] = B;
  coef[2 * g.C + c] = training ? -s * sa * inv_m : A(0);
}

// ---- elementwise kernels -----------------------------------------------------------------------------------------
// V consecutive elements of one row, loaded and stored as one aligned access (V·sizeof(T) bytes, a power of two).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T>
__device__ inline Vec<T, V> load_vec(const T* __restrict__ p, int64_t i) {
  return reinterpret_cast<const Vec<T, V>*>(p)[i];
}

// K per-channel constants of the V elements of a vector: element e has channel c + e·stride (NHWC: stride 1, the
// vector spans V channels; NCHW: stride 0, one channel).
template <typename A, int V, int K>
struct PerChannel {
  A v[K][V];
};

template <int V, typename A, int K>
__device__ inline PerChannel<A, V, K> per_channel(const A* const (&p)[K], int64_t c, int stride) {
  PerChannel<A, V, K> out;
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int e = 0; e < V; ++e) out.v[k][e] = p[k][c + e * stride];
  return out;
}

// [rows, cols] view of the elementwise kernels (cols in V-element vectors).
struct Matrix {
  int64_t rows, cols;
};

__host__ __device__ inline Matrix matrix(const Geom& g, int V) {
  return g.nhwc ? Matrix{g.N * g.HW, g.C / V} : Matrix{g.N * g.C, g.HW / V};
}

// Calls body(i, k) for every vector i (element index i·V) of this thread, with k = per_channel<V>(p, channel, ·).
// Block: blockDim.x vectors of a row × blockDim.y rows; grid.y strides over column blocks, grid.x over rows.
// NHWC: the channel is fixed per column, k is loaded once per column block. NCHW: the channel of row r is r mod C,
// advanced by the row step mod C (two divisions per thread and column block, none per element).
template <int V, typename A, int K, typename Body>
__device__ inline void for_each_vector(const Geom& g, const A* const (&p)[K], const Body& body) {
  const Matrix mx = matrix(g, V);
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y, i_step = row_step * mx.cols;
  for (int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; col < mx.cols;
       col += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const int64_t r0 = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
    int64_t i = r0 * mx.cols + col;
    const int64_t end = mx.rows * mx.cols;
    if (g.nhwc) {
      const PerChannel<A, V, K> k = per_channel<V>(p, col * V, 1);
      for (; i < end; i += i_step) body(i, k);
    } else {
      const int64_t c_step = row_step % g.C;
      for (int64_t c = r0 % g.C; i < end; i += i_step) {
        body(i, per_channel<V>(p, c, 0));
        c += c_step;
        if (c >= g.C) c -= g.C;
      }
    }
  }
}

template <typename T, typename O, int V>
__global__ void bn_relu_kernel(const T* __restrict__ x, O* __restrict__ out,
                               const typename Acc<T>::type* __restrict__ scale,
                               const typename Acc<T>::type* __restrict__ shift, Geom g) {
  using A = typename Acc<T>::type;
  const A* const consts[2] = {scale, shift};
  for_each_vector<V>(g, consts, [&](int64_t i, const PerChannel<A, V, 2>& k) {
    const Vec<T, V> xv = load_vec<V>(x, i);
    Vec<O, V> o;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const A v = to_acc<A>(xv.v[e]) * k.v[0][e] + k.v[1][e];
      o.v[e] = Store<O>::of(v < A(0) ? A(0) : v);  // torch.relu: NaN stays NaN (fmaxf would give 0)
    }
    reinterpret_cast<Vec<O, V>*>(out)[i] = o;
  });
}

// coef: [A | B | C'] per channel (bn_kernels.h), written by bwd_finalize_kernel.
template <typename T, typename G, int V>
__global__ void bwd_dx_kernel(const G* __restrict__ dy, const G* __restrict__ dres, const T* __restrict__ x,
                              const typename Acc<T>::type* __restrict__ scale,
                              const typename Acc<T>::type* __restrict__ shift,
                              const typename Acc<T>::type* __restrict__ mean,
                              const typename Acc<T>::type* __restrict__ coef, Geom g, T* __restrict__ dx) {
  using A = typename Acc<T>::type;
  const A* const consts[6] = {scale, shift, mean, coef, coef + g.C, coef + 2 * g.C};
  for_each_vector<V>(g, consts, [&](int64_t i, const PerChannel<A, V, 6>& k) {
    const Vec<T, V> xv = load_vec<V>(x, i);
    const Vec<G, V> dyv = load_vec<V>(dy, i);
    A v[V];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const A xe = to_acc<A>(xv.v[e]);
      const A dz = xe * k.v[0][e] + k.v[1][e] <= A(0) ? A(0) : to_acc<A>(dyv.v[e]);
      // B = 0 in eval (dx = A·dz): the term is dropped, so a NaN or ±Inf x does not make 0·(x − mean) a NaN
      v[e] = k.v[3][e] * dz + (k.v[4][e] == A(0) ? A(0) : k.v[4][e] * (xe - k.v[2][e])) + k.v[5][e];
    }
    if (dres != nullptr) {
      const Vec<G, V> rv = load_vec<V>(dres, i);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] += to_acc<A>(rv.v[e]);
    }
    Vec<T, V> o;
#pragma unroll
    for (int e = 0; e < V; ++e) o.v[e] = Store<T>::of(v[e]);
    reinterpret_cast<Vec<T, V>*>(dx)[i] = o;
  });
}

// ---- BN's folded affine map ---------------------------------------------------------------------------------------
// Each operation as its own IEEE-rounded intrinsic (no contraction into an FMA, which would round once where the
// composition rounds twice); rsqrt is the CUDA math library's, the function ATen's rsqrt kernel calls.
__device__ inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename A>
__global__ void affine_kernel(const A* __restrict__ mean, const A* __restrict__ var, A eps,
                              const A* __restrict__ gamma, const A* __restrict__ beta, A* __restrict__ rstd,
                              A* __restrict__ scale, A* __restrict__ shift, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  A r;
  if (var != nullptr) {
    r = ::rsqrt(add_rn(var[c], eps));
    rstd[c] = r;
  } else {
    r = rstd[c];
  }
  const A sc = gamma != nullptr ? mul_rn(gamma[c], r) : r;
  const A ms = mul_rn(mean[c], sc);  // the composition's (−mean)·scale without β is −(mean·scale), the same bits
  scale[c] = sc;
  shift[c] = beta != nullptr ? add_rn(beta[c], -ms) : -ms;
}

// ---- launch helpers ----------------------------------------------------------------------------------------------
dim3 reduce_grid(const Geom& g) {
  return dim3(static_cast<unsigned>(tiling(g).tiles), static_cast<unsigned>(g.nhwc ? (g.C + 31) / 32 : g.C));
}
dim3 reduce_block(const Geom& g) { return g.nhwc ? dim3(32, 8) : dim3(kThreads); }
dim3 finalize_grid(const Geom& g) { return dim3(static_cast<unsigned>((g.C + 31) / 32)); }
dim3 finalize_block() { return dim3(32, kFinalizeLanes); }

struct Launch {
  dim3 grid, block;
};

// Elementwise blocks: min(cols, 256) vectors of a row × 256 / that many rows (a warp reads consecutive memory, as
// rows are contiguous); grid.y over column blocks, grid.x over row blocks, at most kMaxElementwiseBlocks in all.
Launch elementwise_launch(const Geom& g, int V) {
  const Matrix mx = matrix(g, V);
  const int64_t bx = mx.cols < kThreads ? mx.cols : kThreads, by = kThreads / bx;
  const int64_t col_blocks = (mx.cols + bx - 1) / bx, gy = col_blocks < 65535 ? col_blocks : 65535;
  const int64_t row_blocks = (mx.rows + by - 1) / by;
  const int64_t max_gx = gy < kMaxElementwiseBlocks ? kMaxElementwiseBlocks / gy : 1;
  const int64_t gx = row_blocks < max_gx ? row_blocks : max_gx;
  return Launch{dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
                dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by))};
}

// Elements per 16-byte vector of x.
template <typename T> constexpr int kVec = static_cast<int>(16 / sizeof(T));

bool aligned(const void* p, size_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Calls f(std::integral_constant<int, V>{}): V = kVec<T> when every row holds whole vectors and the pointers are
// aligned (`vectors_aligned`, checked by the caller for V = kVec<T>), else the scalar V = 1.
template <typename T, typename F>
cudaError_t with_width(const Geom& g, bool vectors_aligned, const F& f) {
  if (vectors_aligned && (g.nhwc ? g.C : g.HW) % kVec<T> == 0) return f(std::integral_constant<int, kVec<T>>{});
  return f(std::integral_constant<int, 1>{});
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
  FASTRESNET_LAUNCH(reduce_grid(g), reduce_block(g), 0, stream, moments_partial_kernel<T, ADD>)(
      a, b, y, g, static_cast<A*>(partial));
  FASTRESNET_LAUNCH(finalize_grid(g), finalize_block(), 0, stream, moments_finalize_kernel<T, ADD>)(
      a, b, static_cast<const A*>(partial), g, static_cast<A*>(mean), static_cast<A*>(var));
  return cudaGetLastError();
}

template <typename T, typename O>
cudaError_t bn_relu_typed(const void* x, void* out, const void* scale, const void* shift, const Geom& g,
                          cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const bool vec = aligned(x, sizeof(T) * kVec<T>) && aligned(out, sizeof(O) * kVec<T>);
  return with_width<T>(g, vec, [&](auto width) {
    constexpr int V = decltype(width)::value;
    const Launch l = elementwise_launch(g, V);
    FASTRESNET_LAUNCH(l.grid, l.block, 0, stream, bn_relu_kernel<T, O, V>)(
        static_cast<const T*>(x), static_cast<O*>(out), static_cast<const A*>(scale), static_cast<const A*>(shift), g);
    return cudaGetLastError();
  });
}

template <typename T, typename G>
cudaError_t backward(const void* dy, const void* dres, const void* x, const void* scale, const void* shift,
                     const void* mean, const void* rstd, bool training, const Geom& g, void* partial, void* coef,
                     void* sum_dz, void* sum_dz_xhat, void* dx, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const A *s = static_cast<const A*>(scale), *t = static_cast<const A*>(shift), *m = static_cast<const A*>(mean);
  FASTRESNET_LAUNCH(reduce_grid(g), reduce_block(g), 0, stream, bwd_partial_kernel<T, G>)(
      static_cast<const G*>(dy), static_cast<const T*>(x), s, t, m, g, static_cast<A*>(partial));
  FASTRESNET_LAUNCH(finalize_grid(g), finalize_block(), 0, stream, bwd_finalize_kernel<A>)(
      static_cast<const A*>(partial), s, m, static_cast<const A*>(rstd), training, g, static_cast<A*>(sum_dz),
      static_cast<A*>(sum_dz_xhat), static_cast<A*>(coef));
  const bool vec = aligned(x, sizeof(T) * kVec<T>) && aligned(dx, sizeof(T) * kVec<T>) &&
                   aligned(dy, sizeof(G) * kVec<T>) && aligned(dres, sizeof(G) * kVec<T>);
  return with_width<T>(g, vec, [&](auto width) {
    constexpr int V = decltype(width)::value;
    const Launch l = elementwise_launch(g, V);
    FASTRESNET_LAUNCH(l.grid, l.block, 0, stream, bwd_dx_kernel<T, G, V>)(
        static_cast<const G*>(dy), static_cast<const G*>(dres), static_cast<const T*>(x), s, t, m,
        static_cast<const A*>(coef), g, static_cast<T*>(dx));
    return cudaGetLastError();
  });
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
  if (out_dt != x_dt) {  // autocast: fp32 x, low-precision activation
    if (x_dt != DType::kFloat32) return cudaErrorNotSupported;
    if (out_dt == DType::kFloat16) return bn_relu_typed<float, __half>(x, out, scale, shift, g, stream);
    if (out_dt == DType::kBFloat16) return bn_relu_typed<float, __nv_bfloat16>(x, out, scale, shift, g, stream);
    return cudaErrorNotSupported;
  }
  return with_type(x_dt, [&](auto tag) {
    using T = decltype(tag);
    return bn_relu_typed<T, T>(x, out, scale, shift, g, stream);
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

cudaError_t bn_affine(const void* mean, const void* var, double eps, const void* gamma, const void* beta, void* rstd,
                      void* scale, void* shift, int64_t C, DType dt, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);
  auto launch = [&](auto tag) {
    using A = decltype(tag);
    FASTRESNET_LAUNCH(blocks, kThreads, 0, stream, affine_kernel<A>)(
        static_cast<const A*>(mean), static_cast<const A*>(var), static_cast<A>(eps), static_cast<const A*>(gamma),
        static_cast<const A*>(beta), static_cast<A*>(rstd), static_cast<A*>(scale), static_cast<A*>(shift), C);
    return cudaGetLastError();
  };
  if (dt == DType::kFloat32) return launch(float{});
  if (dt == DType::kFloat64) return launch(double{});
  return cudaErrorNotSupported;
}

}  // namespace fastresnet_cuda
