// C++ CPU kernels of the four tier-A primitives (fastresnet/reference.py semantics) and of BN's folded affine map,
// registered for the CPU key of the fastresnet_ext library (schemas in ops.cpp).
//
// Layouts: NHWC (channels_last) and NCHW (contiguous); any other strided view is first copied to NCHW. Dtypes: x in
// float32 / float64 / bfloat16 / float16; arithmetic in float32 (float64 for float64), outputs rounded once.
//
// Determinism: every reduction is split into tiles whose boundaries depend on the shape only (never on the thread
// count); each tile writes its partial to a [tiles, C] buffer, and the partials are merged per channel in tile
// order. Results are bitwise identical for any number of threads.
//   * statistics: per tile (count, mean, M2) of the data shifted by a per-channel pivot (the channel's first value,
//     so tile means are small even when |mean| ≫ std), by two passes over the (cache-resident) tile, merged with
//     Chan's formula: n = na + nb, δ = mb − ma, mean = ma + δ·nb/n, M2 = M2a + M2b + δ²·na·nb/n; var = M2 / M,
//     mean = pivot + merged mean.
//   * backward sums: per tile Σdz and Σdz·(x − mean), summed in tile order; Σdz·x̂ = rstd·Σdz·(x − mean).
// Tiles: NHWC — kTileElems/C rows × all C channels (inner loops run over contiguous channels and vectorise);
//        NCHW — one channel, a run of at most kTileElems contiguous elements of one (n, c) plane (reduced in SIMD
//        lanes, lane_sums: a fixed order).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>

#include "bn_common.h"

namespace fastresnet_ext {
namespace {

// A type as a value (std::type_identity is C++20; extensions of older torch builds compile as C++17).
template <typename T>
struct TypeTag {
  using type = T;
};

constexpr int64_t kTileElems = 8192;  // elements per reduction tile (≈ 32 KiB fp32: stays in L1/L2)
constexpr int64_t kLanes = 8;         // accumulator lanes of the NCHW reductions (lane_sums)

using NHWC = std::true_type;
using NCHW = std::false_type;

// The fixed tiling of a reduction over M = N·H·W per channel.
struct Tiling {
  int64_t rows;      // NHWC: rows (of C channels) per tile
  int64_t chunk;     // NCHW: elements per tile within one (n, c) plane
  int64_t chunks;    // NCHW: tiles per plane
  int64_t tiles;     // tiles per channel (rows of the [tiles, C] partial buffer)
  int64_t tasks;     // independent work items: NHWC one per tile, NCHW one per (tile, channel)
};

Tiling tiling(const Geometry& g) {
  Tiling t{};
  if (g.nhwc) {
    t.rows = std::max<int64_t>(1, kTileElems / g.C);
    t.tiles = (g.M + t.rows - 1) / t.rows;
    t.tasks = t.tiles;
  } else {
    t.chunk = std::min<int64_t>(g.HW, kTileElems);
    t.chunks = (g.HW + t.chunk - 1) / t.chunk;
    t.tiles = g.N * t.chunks;
    t.tasks = t.tiles * g.C;
  }
  return t;
}

// Runs body(tag, tile, start, len, c) for every tile, in parallel. NHWC: elements [start, start + len·C) are `len`
// rows of all channels (c = 0). NCHW: [start, start + len) is one run of channel c. The partial slot of a tile is
// [tile·C + c] (NHWC: [tile·C, tile·C + C)).
template <typename F>
void for_each_tile(const Geometry& g, const Tiling& t, const F& body) {
  at::parallel_for(0, t.tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      if (g.nhwc) {
        const int64_t r0 = q * t.rows;
        body(NHWC{}, q, r0 * g.C, std::min(t.rows, g.M - r0), int64_t{0});
      } else {
        // q enumerates (n, c, k) with k fastest, i.e. memory order; the tile index is n·chunks + k.
        const int64_t k = q % t.chunks, plane = q / t.chunks, n = plane / g.C, c = plane % g.C;
        const int64_t off = k * t.chunk;
        body(NCHW{}, n * t.chunks + k, plane * g.HW + off, std::min(t.chunk, g.HW - off), c);
      }
    }
  });
}

// Runs body(tag, start, len, c) over every element, in parallel, for elementwise kernels. NHWC: one row of C
// channels (c = 0, the channel of element j is j); NCHW: one (n, c) plane of HW elements of channel c.
template <typename F>
void for_each_row(const Geometry& g, const F& body) {
  if (g.nhwc) {
    at::parallel_for(0, g.M, std::max<int64_t>(1, kTileElems / g.C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) body(NHWC{}, r * g.C, g.C, int64_t{0});
    });
  } else {
    at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, kTileElems / g.HW), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) body(NCHW{}, p * g.HW, g.HW, p % g.C);
    });
  }
}

// A 16-byte SIMD vector of acc_t (4 float / 2 double lanes: the SSE2 / NEON width every x86-64 / arm64 build has),
// as a GCC/Clang vector extension. The reductions and the ReLU mask use these explicitly: compilers vectorise neither
// an in-order float reduction nor (reliably) a select on the mask, and turn a scalar select into a branch, which a
// random ReLU mask mispredicts half the time.
template <typename acc_t>
struct VecOf {
  typedef acc_t type __attribute__((vector_size(16)));
};
template <typename acc_t>
using Vec = typename VecOf<acc_t>::type;
template <typename acc_t>
constexpr int64_t kVecLanes = 16 / sizeof(acc_t);

// The n ≤ kVecLanes elements p[0, n) converted to acc_t, in lanes 0..n-1; lanes n.. are 0.
template <typename acc_t, typename T>
inline Vec<acc_t> load_vec(const T* p, int64_t n) {
  Vec<acc_t> v{};
  for (int64_t l = 0; l < kVecLanes<acc_t>; ++l)
    if (l < n) v[l] = static_cast<acc_t>(p[l]);
  return v;
}

// Sums over i in [0, len) of K quantities, each with kLanes accumulator lanes (kLanes / W vectors of W = kVecLanes
// lanes, so consecutive adds do not wait on each other): element i goes to lane i mod kLanes, and the lanes are then
// added in order 0..kLanes-1 — a fixed order. f(i, n) returns the K quantities of elements [i, i + n) (n ≤ W) as
// vectors; lanes n.. are dropped.
template <typename acc_t, size_t K, typename F>
inline std::array<acc_t, K> lane_sums(int64_t len, const F& f) {
  constexpr int64_t W = kVecLanes<acc_t>, P = kLanes / W;
  Vec<acc_t> acc[K][P] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int64_t p = 0; p < P; ++p) {
      const std::array<Vec<acc_t>, K> v = f(i + p * W, W);
      for (size_t k = 0; k < K; ++k) acc[k][p] += v[k];
    }
  Vec<acc_t> lane{};
  for (int64_t l = 0; l < W; ++l) lane[l] = static_cast<acc_t>(l);
  for (int64_t p = 0; i < len; ++p, i += W) {  // the last < kLanes elements
    const int64_t n = std::min(W, len - i);
    const std::array<Vec<acc_t>, K> v = f(i, n);
    for (size_t k = 0; k < K; ++k) acc[k][p] += lane < static_cast<acc_t>(n) ? v[k] : Vec<acc_t>{};
  }
  std::array<acc_t, K> s{};
  for (size_t k = 0; k < K; ++k)
    for (int64_t p = 0; p < P; ++p)
      for (int64_t l = 0; l < W; ++l) s[k] += acc[k][p][l];
  return s;
}

template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t len, const F& f) {
  return lane_sums<acc_t, 1>(len, [&](int64_t i, int64_t n) { return std::array<Vec<acc_t>, 1>{f(i, n)}; })[0];
}

// (mean, M2) of one tile of the dense tensor y, shifted by the channel's pivot (mean of y − pivot), into its slot of
// pmean/pm2 [tiles, C] (two passes: the tile is in cache). Arguments as passed to for_each_tile's body; the count is
// the tile's rows (NHWC) or run length (NCHW).
template <typename scalar_t, typename acc_t, typename Tag>
inline void tile_moments(const Geometry& g, Tag, int64_t tile, int64_t start, int64_t len, int64_t c,
                         const scalar_t* y, const acc_t* pivot, acc_t* pmean, acc_t* pm2) {
  const scalar_t* p = y + start;
  if constexpr (Tag::value) {  // NHWC: len rows × C channels, accumulators per channel
    acc_t* mean = pmean + tile * g.C;
    acc_t* m2 = pm2 + tile * g.C;
    std::fill(mean, mean + g.C, acc_t(0));
    std::fill(m2, m2 + g.C, acc_t(0));
    for (int64_t r = 0; r < len; ++r)
      for (int64_t j = 0; j < g.C; ++j) mean[j] += static_cast<acc_t>(p[r * g.C + j]) - pivot[j];
    for (int64_t j = 0; j < g.C; ++j) mean[j] /= static_cast<acc_t>(len);
    for (int64_t r = 0; r < len; ++r)
      for (int64_t j = 0; j < g.C; ++j) {
        const acc_t d = static_cast<acc_t>(p[r * g.C + j]) - pivot[j] - mean[j];
        m2[j] += d * d;
      }
  } else {  // NCHW: one contiguous run of channel c
    const acc_t k = pivot[c];
    const acc_t mean =
        lane_sum<acc_t>(len, [&](int64_t i, int64_t n) { return load_vec<acc_t>(p + i, n) - k; }) /
        static_cast<acc_t>(len);
    pmean[tile * g.C + c] = mean;
    pm2[tile * g.C + c] = lane_sum<acc_t>(len, [&](int64_t i, int64_t n) {
      const Vec<acc_t> d = load_vec<acc_t>(p + i, n) - k - mean;
      return d * d;
    });
  }
}

// Chan's merge of the tile partials, per channel in tile order: mean = pivot + merged mean [C], biased
// var = M2 / M [C].
template <typename acc_t>
void merge_moments(const Geometry& g, const Tiling& t, const acc_t* pivot, const acc_t* pmean, const acc_t* pm2,
                   acc_t* mean, acc_t* var) {
  at::parallel_for(0, g.C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      acc_t n = 0, m = 0, m2 = 0;
      for (int64_t tile = 0; tile < t.tiles; ++tile) {
        // count of this tile: NHWC rows (the last tile may be short); NCHW run length (last run of a plane short)
        const int64_t nb_i = g.nhwc ? std::min(t.rows, g.M - tile * t.rows)
                                    : std::min(t.chunk, g.HW - (tile % t.chunks) * t.chunk);
        const acc_t nb = static_cast<acc_t>(nb_i), tot = n + nb;
        const acc_t delta = pmean[tile * g.C + c] - m;
        m += delta * (nb / tot);
        m2 += pm2[tile * g.C + c] + delta * delta * (n * nb / tot);
        n = tot;
      }
      mean[c] = pivot[c] + m;
      var[c] = m2 / n;
    }
  });
}

// Per-call working memory of n values, uninitialised as at::empty leaves it, without a tensor's dispatch and
// bookkeeping (a few hundred nanoseconds per temporary, which small inputs pay on every call).
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(n)]);
}

// Element offset of the first element (n = h = w = 0) of channel c.
inline int64_t first_of(const Geometry& g, int64_t c) { return g.nhwc ? c : c * g.HW; }

// Per-channel (mean, biased var) of the dense tensor y. Every channel is shifted by a pivot, pivot(i) = the value y
// will hold at its first element i, so tile means are small and Chan's merge keeps full precision even when
// |mean| ≫ std. produce(tag, start, len) runs first on each tile (it may write the tile, e.g. add_stats computing
// y = a + b), so the tile is read back while still in cache.
template <typename scalar_t, typename acc_t, typename P, typename F>
std::tuple<at::Tensor, at::Tensor> moments(const Geometry& g, const scalar_t* y, const at::TensorOptions& opts,
                                           const P& pivot_at, const F& produce) {
  const Tiling t = tiling(g);
  auto mean = at::empty({g.C}, opts), var = at::empty({g.C}, opts);  // separate storages: outputs must not alias
  const auto work = scratch<acc_t>((2 * t.tiles + 1) * g.C);  // tile partials (mean, M2) and the pivots
  acc_t* pmean = work.get();
  acc_t* pm2 = pmean + t.tiles * g.C;
  acc_t* pivot = pm2 + t.tiles * g.C;
  for (int64_t c = 0; c < g.C; ++c) pivot[c] = static_cast<acc_t>(pivot_at(first_of(g, c)));
  for_each_tile(g, t, [&](auto tag, int64_t tile, int64_t start, int64_t len, int64_t c) {
    produce(tag, start, len);
    tile_moments<scalar_t, acc_t>(g, tag, tile, start, len, c, y, pivot, pmean, pm2);
  });
  merge_moments<acc_t>(g, t, pivot, pmean, pm2, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
  return {mean, var};
}

// ---- ops ----------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> batch_stats_cpu(const at::Tensor& x_in) {
  const at::Tensor x = prepare_batch_stats(x_in);
  if (x.numel() == 0) return no_value_moments(x);
  const Geometry g = geometry(x, is_nhwc(x_in));
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    out = moments<scalar_t, acc_t>(g, xp, x.options().dtype(acc_dtype(x.scalar_type())),
                                   [&](int64_t i) { return xp[i]; }, [](auto, int64_t, int64_t) {});
  });
  return out;
}

at::Tensor bn_relu_cpu(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
                       at::ScalarType out_dtype) {
  const at::Tensor x = prepare_bn_relu(x_in, scale, shift);
  const bool nhwc = is_nhwc(x_in);
  const Geometry g = geometry(x, nhwc);
  auto a = at::empty(x.sizes(), x.options().dtype(out_dtype).memory_format(memory_format(nhwc)));
  if (x.numel() == 0) return a;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_cpu", [&] {
    using in_t = scalar_t;
    using acc_t = at::opmath_type<in_t>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "bn_relu_cpu_out", [&] {
      const in_t* xp = x.data_ptr<in_t>();
      scalar_t* ap = a.data_ptr<scalar_t>();
      const acc_t* sp = scale.data_ptr<acc_t>();
      const acc_t* tp = shift.data_ptr<acc_t>();
      for_each_row(g, [&](auto tag, int64_t start, int64_t len, int64_t c) {
        constexpr bool kNHWC = decltype(tag)::value;
        const acc_t* s = sp + c;
        const acc_t* t = tp + c;
        for (int64_t j = 0; j < len; ++j) {
          const acc_t v = static_cast<acc_t>(xp[start + j]) * s[kNHWC ? j : 0] + t[kNHWC ? j : 0];
          ap[start + j] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);  // torch.relu: NaN stays NaN
        }
      });
    });
  });
  return a;
}

// ---- bn_relu_backward ---------------------------------------------------------------------------------------------
// dz = dy·[x·s + t > 0]; per channel dx = A·dz + B·(x − μ) + C (+ dres), centred at μ (B·x and C would cancel when
// |μ| ≫ σ). Training: A = s, B = −s·rstd²·Σdz(x−μ)/M, C = −s·Σdz/M (from dx = s·(dz − Σdz/M − x̂·Σdz·x̂/M)), so dx
// needs the merged sums: a second pass over the tiles writes it. Eval: A = s, B = C = 0 are known up front, so the
// one pass writes dx right after a tile's sums, while the tile is in cache.
//
// The NHWC and dx kernels take __restrict__ pointers so the compiler vectorises their loops over channels / elements
// (it cannot prove that the outputs do not alias the inputs otherwise); the NCHW sums use explicit vectors.

// The per-channel vectors of the op (scale s, shift t, mean μ and the dx coefficients A, B, C), from channel c on.
template <typename acc_t>
struct BackwardChannels {
  const acc_t *s, *t, *mu, *A, *B, *C;
  BackwardChannels from(int64_t c) const { return {s + c, t + c, mu + c, A + c, B + c, C + c}; }
};

// dz = 0 where x·s + t ≤ 0, else dy: PyTorch's threshold_backward(dy, relu(v), 0), under which a NaN v passes dy;
// V is acc_t or Vec<acc_t> (a lane-wise select).
template <typename V, typename acc_t>
inline V relu_grad(V x, V dy, acc_t s, acc_t t) {
  return x * s + t <= acc_t(0) ? V{} : dy;
}

// NHWC tile of `rows` rows × C channels: Σdz and Σdz·(x − μ) per channel, into sdz[C] and sdzx[C].
template <typename x_t, typename g_t, typename acc_t>
void nhwc_tile_sums(const x_t* __restrict__ x, const g_t* __restrict__ dy, int64_t rows, int64_t C,
                    const acc_t* __restrict__ s, const acc_t* __restrict__ t, const acc_t* __restrict__ mu,
                    acc_t* __restrict__ sdz, acc_t* __restrict__ sdzx) {
  std::fill(sdz, sdz + C, acc_t(0));
  std::fill(sdzx, sdzx + C, acc_t(0));
  for (int64_t r = 0; r < rows; ++r, x += C, dy += C)
    for (int64_t j = 0; j < C; ++j) {
      const acc_t xv = static_cast<acc_t>(x[j]);
      const acc_t dz = relu_grad(xv, static_cast<acc_t>(dy[j]), s[j], t[j]);
      sdz[j] += dz;
      sdzx[j] += dz * (xv - mu[j]);
    }
}

// NCHW tile, a run of `len` elements of one channel: {Σdz, Σdz·(x − μ)}.
template <typename x_t, typename g_t, typename acc_t>
std::array<acc_t, 2> nchw_tile_sums(const x_t* __restrict__ x, const g_t* __restrict__ dy, int64_t len, acc_t s,
                                    acc_t t, acc_t mu) {
  return lane_sums<acc_t, 2>(len, [&](int64_t i, int64_t n) {
    const Vec<acc_t> xv = load_vec<acc_t>(x + i, n);
    const Vec<acc_t> dz = relu_grad(xv, load_vec<acc_t>(dy + i, n), s, t);
    return std::array<Vec<acc_t>, 2>{dz, dz * (xv - mu)};
  });
}

// dx of one tile, `rows` rows of `cols` elements: NHWC rows of C channels (element j of a row is channel j); NCHW one
// run of one channel (rows = 1, ch starts at that channel). dres is read and added when kDres.
template <bool kNHWC, bool kDres, typename x_t, typename g_t, typename acc_t>
void tile_dx(const x_t* __restrict__ x, const g_t* __restrict__ dy, const g_t* __restrict__ dres,
             x_t* __restrict__ dx, int64_t rows, int64_t cols, const acc_t* __restrict__ s,
             const acc_t* __restrict__ t, const acc_t* __restrict__ mu, const acc_t* __restrict__ A,
             const acc_t* __restrict__ B, const acc_t* __restrict__ C) {
  for (int64_t i = 0; i < rows * cols; i += cols)
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t k = kNHWC ? j : 0;
      const acc_t xv = static_cast<acc_t>(x[i + j]);
      const acc_t dz = relu_grad(xv, static_cast<acc_t>(dy[i + j]), s[k], t[k]);
      // B = 0 in eval (dx = s·dz): the term is dropped, so a NaN or ±Inf x does not make 0·(x − μ) a NaN
      acc_t v = A[k] * dz + (B[k] == acc_t(0) ? acc_t(0) : B[k] * (xv - mu[k])) + C[k];
      if constexpr (kDres) v += static_cast<acc_t>(dres[i + j]);
      dx[i + j] = static_cast<x_t>(v);
    }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& mean, const at::Tensor& rstd, bool training, const c10::optional<at::Tensor>& dres_in) {
  const BackwardArgs args = prepare_bn_relu_backward(dy_in, x_in, scale, shift, mean, rstd, dres_in);
  const at::Tensor &x = args.x, &dy = args.dy, &dres = args.dres;
  const bool nhwc = is_nhwc(x_in);
  const auto acc_type = acc_dtype(x.scalar_type());
  const Geometry g = geometry(x, nhwc);
  const auto opts = x.options().dtype(acc_type);
  auto dx = at::empty(x.sizes(), x.options().memory_format(memory_format(nhwc)));
  auto sum_dz_t = at::empty({g.C}, opts), sum_dzxhat_t = at::empty({g.C}, opts);  // outputs must not alias
  if (x.numel() == 0) return {dx, sum_dz_t.zero_(), sum_dzxhat_t.zero_()};  // sums over no values
  const Tiling t = tiling(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward_cpu", [&] {
    using x_t = scalar_t;
    using acc_t = at::opmath_type<x_t>;
    auto run = [&](auto g_type) {  // dy and dres are in x's dtype or in acc_t (grad_dtype)
      using g_t = typename decltype(g_type)::type;
      const x_t* xp = x.data_ptr<x_t>();
      const g_t* dyp = dy.data_ptr<g_t>();
      const g_t* drp = dres.defined() ? dres.data_ptr<g_t>() : nullptr;
      x_t* dxp = dx.data_ptr<x_t>();
      const acc_t* sp = scale.data_ptr<acc_t>();
      const acc_t* tp = shift.data_ptr<acc_t>();
      const acc_t* mp = mean.data_ptr<acc_t>();
      const acc_t* rp = rstd.data_ptr<acc_t>();
      const auto work = scratch<acc_t>((2 * t.tiles + 3) * g.C);  // tile partials (Σdz, Σdz·(x − μ)), A, B, C
      acc_t* A = work.get();
      acc_t* B = A + g.C;
      acc_t* Cc = B + g.C;
      std::copy(sp, sp + g.C, A);
      std::fill(B, B + 2 * g.C, acc_t(0));  // B = C = 0 (eval; training sets them after the sums)
      const BackwardChannels<acc_t> chans{sp, tp, mp, A, B, Cc};
      auto write_dx = [&](auto tag, int64_t start, int64_t len, int64_t c) {
        constexpr bool kNHWC = decltype(tag)::value;
        const int64_t rows = kNHWC ? len : 1, cols = kNHWC ? g.C : len;
        const BackwardChannels<acc_t> ch = chans.from(c);
        if (drp != nullptr)
          tile_dx<kNHWC, true>(xp + start, dyp + start, drp + start, dxp + start, rows, cols, ch.s, ch.t, ch.mu,
                               ch.A, ch.B, ch.C);
        else
          tile_dx<kNHWC, false>(xp + start, dyp + start, drp, dxp + start, rows, cols, ch.s, ch.t, ch.mu, ch.A,
                                ch.B, ch.C);
      };
      // Pass 1: per-tile Σdz and Σdz·(x − μ); eval also writes the tile's dx.
      acc_t* p_dz = Cc + g.C;
      acc_t* p_dzx = p_dz + t.tiles * g.C;
      for_each_tile(g, t, [&](auto tag, int64_t tile, int64_t start, int64_t len, int64_t c) {
        if constexpr (decltype(tag)::value) {
          nhwc_tile_sums(xp + start, dyp + start, len, g.C, sp, tp, mp, p_dz + tile * g.C, p_dzx + tile * g.C);
        } else {
          const std::array<acc_t, 2> sums = nchw_tile_sums(xp + start, dyp + start, len, sp[c], tp[c], mp[c]);
          p_dz[tile * g.C + c] = sums[0];
          p_dzx[tile * g.C + c] = sums[1];
        }
        if (!training) write_dx(tag, start, len, c);
      });
      // Merge in tile order; Σdz·x̂ = rstd·Σdz·(x − μ).
      acc_t* sum_dz = sum_dz_t.data_ptr<acc_t>();
      acc_t* sum_dzxhat = sum_dzxhat_t.data_ptr<acc_t>();
      const acc_t inv_m = acc_t(1) / static_cast<acc_t>(g.M);
      for (int64_t c = 0; c < g.C; ++c) {
        acc_t a = 0, b = 0;
        for (int64_t tile = 0; tile < t.tiles; ++tile) {
          a += p_dz[tile * g.C + c];
          b += p_dzx[tile * g.C + c];
        }
        sum_dz[c] = a;
        sum_dzxhat[c] = b * rp[c];
        if (training) {
          B[c] = -sp[c] * rp[c] * rp[c] * b * inv_m;
          Cc[c] = -sp[c] * a * inv_m;
        }
      }
      // Pass 2 (training): dx, rounded once to x's dtype.
      if (training)
        for_each_tile(g, t, [&](auto tag, int64_t, int64_t start, int64_t len, int64_t c) {
          write_dx(tag, start, len, c);
        });
    };
    if (dy.scalar_type() == x.scalar_type())
      run(TypeTag<x_t>{});
    else
      run(TypeTag<acc_t>{});
  });
  return {dx, sum_dz_t, sum_dzxhat_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_stats_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  const auto ab = prepare_add_stats(a_in, b_in);
  const at::Tensor &a = ab.first, &b = ab.second;
  const bool nhwc = is_nhwc(a_in);
  const Geometry g = geometry(a, nhwc);
  auto y = at::empty(a.sizes(), a.options().memory_format(memory_format(nhwc)));
  if (a.numel() == 0) return std::tuple_cat(std::make_tuple(y), no_value_moments(a));
  std::tuple<at::Tensor, at::Tensor> st;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "add_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    // y = a + b, tile by tile, each tile's statistics taken from the rounded y right after it is written.
    auto add = [&](int64_t i) { return static_cast<scalar_t>(static_cast<acc_t>(ap[i]) + static_cast<acc_t>(bp[i])); };
    st = moments<scalar_t, acc_t>(g, yp, a.options().dtype(acc_dtype(a.scalar_type())), add,
                                  [&](auto tag, int64_t start, int64_t len) {
                                    const int64_t n = decltype(tag)::value ? len * g.C : len;
                                    for (int64_t i = start; i < start + n; ++i) yp[i] = add(i);
                                  });
  });
  return {y, std::get<0>(st), std::get<1>(st)};
}

// ---- BN's folded affine map (bn_affine, scale_shift; ops.cpp) ------------------------------------------------------
// One pass over the C channels instead of five ATen calls (each wrapping a scalar or allocating), with the
// composition's operations on the same values in the same order, each rounded to the statistics dtype: IEEE add,
// multiply and subtract give the same bits in any vector width (setup.py builds with -ffp-contract=off, so no
// multiply-subtract is fused into an FMA). rsqrt is ATen's own kernel applied in place: its AVX-512 version is not
// correctly rounded, and calling it keeps the composition's bits.
std::tuple<at::Tensor, at::Tensor> scale_shift_cpu(const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                                   const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& bias) {
  check_stats_pair(mean_in, rstd_in, "rstd");
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor gamma = affine_param(weight, "weight", mean), beta = affine_param(bias, "bias", mean);
  at::Tensor scale = at::empty_like(mean), shift = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "scale_shift_cpu", [&] {
    const scalar_t* mp = mean.data_ptr<scalar_t>();
    const scalar_t* rp = rstd.data_ptr<scalar_t>();
    const scalar_t* gp = gamma.defined() ? gamma.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = beta.defined() ? beta.data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = scale.data_ptr<scalar_t>();
    scalar_t* hp = shift.data_ptr<scalar_t>();
    for (int64_t c = 0; c < mean.numel(); ++c) {
      const scalar_t sc = gp ? gp[c] * rp[c] : rp[c];
      const scalar_t ms = bp ? mp[c] * sc : -mp[c] * sc;  // −mean·scale is (−mean)·scale, as in the composition
      sp[c] = sc;
      hp[c] = bp ? bp[c] - ms : ms;
    }
  });
  return {scale, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_affine_cpu(const at::Tensor& mean, const at::Tensor& var_in,
                                                             double eps, const std::optional<at::Tensor>& weight,
                                                             const std::optional<at::Tensor>& bias) {
  check_stats_pair(mean, var_in, "var");
  const at::Tensor var = var_in.contiguous();
  at::Tensor rstd = at::empty_like(var);
  AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "bn_affine_cpu", [&] {
    const scalar_t e = static_cast<scalar_t>(eps);  // ATen adds a Python float in the tensor's dtype
    const scalar_t* vp = var.data_ptr<scalar_t>();
    scalar_t* rp = rstd.data_ptr<scalar_t>();
    for (int64_t c = 0; c < var.numel(); ++c) rp[c] = vp[c] + e;
  });
  rstd.rsqrt_();
  auto [scale, shift] = scale_shift_cpu(mean, rstd, weight, bias);
  return {rstd, scale, shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastresnet_ext, CPU, m) {
  m.impl("batch_stats", &batch_stats_cpu);
  m.impl("bn_relu", &bn_relu_cpu);
  m.impl("bn_relu_backward", &bn_relu_backward_cpu);
  m.impl("add_stats", &add_stats_cpu);
  m.impl("bn_affine", &bn_affine_cpu);
  m.impl("scale_shift", &scale_shift_cpu);
}

}  // namespace fastresnet_ext
