// Fast CPU attention, forward and backward: FlashAttention-2 style tiling with online softmax in
// fp32, OpenMP over independent work items, AVX-512 micro-kernels (cpu_fast_microkernels.hpp).
//
// Layout of the per-thread scratch (why "transposed scores"): scores are computed as S^T [keys][queries]
// so that the softmax statistics of a query (max, sum) are element-wise operations down the key rows
// (vertical, no horizontal reductions), and P^T feeds O += P V by broadcasting P values against V
// rows. K and V tiles are packed row-major in fp32 (converted once per tile, head dim padded to 16);
// Q is packed transposed once per query block and pre-scaled by scale * log2(e) so softmax uses exp2.
//
// Backward runs two passes so that nothing needs atomics and results do not depend on the thread
// count: pass 1 is parallel over (sequence, kv head, key block) and owns dK/dV of that block (the
// group's query heads are looped inside); pass 2 is parallel over (sequence, query head, query
// block) and owns dQ. Pass 2 recomputes S and dP (7 tile products instead of 5) in exchange.
// GCC 12 reports its own AVX-512 intrinsics (_mm512_undefined_* inside cvtph/cvtepu16) as
// maybe-uninitialized once inlined here; the values are fully defined.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "kernels/cpu_fast_microkernels.hpp"
#include "kernels/cpu_kernels.hpp"
#include "kernels/validate.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/host_buffer.hpp"

namespace longattn::kernels {
namespace {

using fast::tile_gemm;

// Tile sizes. kBq = 64 queries = 4 zmm vectors, the micro-kernel's full width for S^T; kBk = 64 keys
// keeps a K and a V tile at head dim 128 in 64 KiB (L2-resident, half of the L1 for the B panels),
// and diagonal tiles of causal attention waste at most one 64 x 64 block per query block.
constexpr int kBq = 64;
constexpr int kBk = 64;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();

int round_up16(int d) { return (d + 15) / 16 * 16; }

// One query block or key tile of a sequence: packed start, length, min/max of its positions.
struct Tile {
  std::int64_t start = 0;
  int n = 0;
  int pmin = 0, pmax = 0;
};

struct Tiling {
  std::vector<Tile> tiles;
  std::vector<int> first;  // tiles of sequence b are [first[b], first[b + 1])
};

Tiling make_tiling(const std::vector<std::int32_t>& cu, const std::int32_t* pos, int block) {
  Tiling t;
  const int batch = static_cast<int>(cu.size()) - 1;
  for (int b = 0; b < batch; ++b) {
    t.first.push_back(static_cast<int>(t.tiles.size()));
    for (std::int64_t s = cu[b]; s < cu[b + 1]; s += block) {
      Tile tile;
      tile.start = s;
      tile.n = static_cast<int>(std::min<std::int64_t>(block, cu[b + 1] - s));
      tile.pmin = std::numeric_limits<int>::max();
      tile.pmax = std::numeric_limits<int>::min();
      for (int i = 0; i < tile.n; ++i) {
        const int p = token_position(pos, s + i, s + i - cu[b]);
        tile.pmin = std::min(tile.pmin, p);
        tile.pmax = std::max(tile.pmax, p);
      }
      t.tiles.push_back(tile);
    }
  }
  t.first.push_back(static_cast<int>(t.tiles.size()));
  return t;
}

enum class Vis { hidden, partial, full };

// Decided from the positions' extremes, so it holds for any positions (zigzag, striped, shifted).
Vis classify(const Tile& q, const Tile& k, bool causal) {
  if (!causal) return Vis::full;
  if (k.pmin > q.pmax) return Vis::hidden;
  if (k.pmax <= q.pmin) return Vis::full;
  return Vis::partial;
}

// Row [D] of a [T, H, D] tensor, converted to fp32, times mul, zero-padded to Dp.
void load_row(const void* base, DType t, std::size_t off, int D, int Dp, float mul, float* dst) {
  int d = 0;
#if defined(__AVX512F__)
  const __m512 vm = _mm512_set1_ps(mul);
  for (; d + 16 <= D; d += 16) {
    __m512 x;
    if (t == DType::f32) {
      x = _mm512_loadu_ps(static_cast<const float*>(base) + off + d);
    } else {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const std::uint16_t*>(base) + off + d));
      x = t == DType::bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
    }
    _mm512_storeu_ps(dst + d, _mm512_mul_ps(x, vm));
  }
#endif
  for (; d < D; ++d) dst[d] = load_as_f32(base, t, off + static_cast<std::size_t>(d)) * mul;
  for (; d < Dp; ++d) dst[d] = 0.0f;
}

// n rows of head h starting at token t0, row-major [rows][Dp]; rows n..rows-1 zeroed.
void pack_rows(const TensorView& x, std::int64_t t0, int n, int rows, int h, int Dp, float mul, float* dst) {
  const int H = static_cast<int>(x.dim(1)), D = static_cast<int>(x.dim(2));
  for (int r = 0; r < n; ++r)
    load_row(x.data, x.dtype, (static_cast<std::size_t>(t0 + r) * H + h) * D, D, Dp, mul, dst + static_cast<std::size_t>(r) * Dp);
  std::fill(dst + static_cast<std::size_t>(n) * Dp, dst + static_cast<std::size_t>(rows) * Dp, 0.0f);
}

// Transposed: dst[d][r] for r < kBq (columns n..kBq-1 zeroed), d < Dp. `row` is a Dp scratch.
void pack_cols(const TensorView& x, std::int64_t t0, int n, int h, int Dp, float mul, float* row, float* dst) {
  const int H = static_cast<int>(x.dim(1)), D = static_cast<int>(x.dim(2));
  for (int r = 0; r < n; ++r) {
    load_row(x.data, x.dtype, (static_cast<std::size_t>(t0 + r) * H + h) * D, D, Dp, mul, row);
    for (int d = 0; d < Dp; ++d) dst[d * kBq + r] = row[d];
  }
  for (int d = 0; d < Dp; ++d)
    for (int r = n; r < kBq; ++r) dst[d * kBq + r] = 0.0f;
}

// Writes n rows [Dp] of src into head h of x at token t0 (first D columns); adds into fp32 with accumulate.
void store_rows(const TensorView& x, std::int64_t t0, int n, int h, int Dp, const float* src, bool accumulate) {
  const int H = static_cast<int>(x.dim(1)), D = static_cast<int>(x.dim(2));
  for (int r = 0; r < n; ++r) {
    const std::size_t off = (static_cast<std::size_t>(t0 + r) * H + h) * D;
    const float* s = src + static_cast<std::size_t>(r) * Dp;
    if (x.dtype == DType::f32) {
      float* d = x.as<float>() + off;
      if (accumulate) {
        for (int c = 0; c < D; ++c) d[c] += s[c];
      } else {
        std::memcpy(d, s, sizeof(float) * static_cast<std::size_t>(D));
      }
    } else {
      for (int c = 0; c < D; ++c) store_from_f32(x.data, x.dtype, off + static_cast<std::size_t>(c), s[c]);
    }
  }
}

// Query positions of a block, padded to kBq by repeating the last (pad rows are never stored).
void block_positions(const std::int32_t* pos, const Tile& t, std::int64_t seq_start, int* out) {
  for (int i = 0; i < kBq; ++i) {
    const std::int64_t p = t.start + std::min(i, t.n - 1);
    out[i] = token_position(pos, p, p - seq_start);
  }
}

// S^T[j][i] = -inf where key j is after query i.
void apply_mask(float* st, int nk, const int* kpos, const int* qpos) {
  for (int j = 0; j < nk; ++j) {
    float* row = st + j * kBq;
    const int kp = kpos[j];
#pragma omp simd
    for (int i = 0; i < kBq; ++i) row[i] = kp > qpos[i] ? -kInf : row[i];
  }
}

void key_positions(const std::int32_t* pos, const Tile& t, std::int64_t seq_start, int* out) {
  for (int j = 0; j < t.n; ++j) out[j] = token_position(pos, t.start + j, t.start + j - seq_start);
}

// Per-thread scratch, 64-byte aligned: a few tiles and per-query vectors, about 200 KiB at head dim 128.
struct Scratch {
  HostBuffer buf;
  float *qt, *dot, *qr, *dor;  // query block: Q^T, dO^T [Dp][kBq]; Q, dO [kBq][Dp]
  float *kp, *vp;              // key tile [kBk][Dp]
  float *st, *pt2;             // S^T / P^T and dP^T / dS^T [kBk][kBq]
  float *acc, *acc2;           // O or dQ [kBq][Dp]; dK, dV [kBk][Dp]
  float *row;                  // [Dp]
  float *m, *l, *alpha, *muse, *mnew, *colsum, *lse2, *delta;  // per query [kBq]
  int *qpos, *kpos;
  explicit Scratch(int Dp) {
    const std::size_t tq = static_cast<std::size_t>(kBq) * Dp, tk = static_cast<std::size_t>(kBk) * Dp;
    const std::size_t ts = static_cast<std::size_t>(kBk) * kBq, ta = std::max(tq, tk);
    const std::pair<float**, std::size_t> slots[] = {
        {&qt, tq},  {&dot, tq}, {&qr, tq},    {&dor, tq},  {&kp, tk},   {&vp, tk},     {&st, ts},
        {&pt2, ts}, {&acc, ta}, {&acc2, ta},  {&row, static_cast<std::size_t>(Dp)},   {&m, kBq},
        {&l, kBq},  {&alpha, kBq}, {&muse, kBq}, {&mnew, kBq}, {&colsum, kBq}, {&lse2, kBq}, {&delta, kBq}};
    auto padded = [](std::size_t n) { return (n + 15) / 16 * 16; };
    std::size_t total = padded(kBq) + padded(kBk);  // the two int position vectors
    for (const auto& [ptr, n] : slots) total += padded(n);
    buf = HostBuffer(total * sizeof(float));
    float* p = buf.as<float>();
    for (const auto& [ptr, n] : slots) {
      *ptr = p;
      p += padded(n);
    }
    qpos = reinterpret_cast<int*>(p);
    kpos = reinterpret_cast<int*>(p + padded(kBq));
  }
};

struct Common {
  ProblemShape sh;
  std::vector<std::int32_t> cq, ck;
  Tiling qt, kt;
  int Dp = 0;
  float scale = 0, scale2 = 0;  // scale2 = scale * log2(e)
};

Common make_common(const AttentionArgs& a, const ProblemShape& sh) {
  Common c;
  c.sh = sh;
  c.cq = host_cu_seqlens(a.cu_seqlens_q, a.batch, sh.tq, "cu_seqlens_q");
  c.ck = host_cu_seqlens(a.cu_seqlens_k, a.batch, sh.tk, "cu_seqlens_k");
  c.qt = make_tiling(c.cq, a.q_positions, kBq);
  c.kt = make_tiling(c.ck, a.k_positions, kBk);
  c.Dp = round_up16(sh.d);
  c.scale = a.effective_scale();
  c.scale2 = c.scale * kLog2e;
  return c;
}

// Work items sorted by an estimate of their cost (most expensive first), so dynamic scheduling
// does not end with one thread finishing a long causal row alone.
struct Item {
  int b, head, tile;
  std::int64_t cost;
};

void sort_items(std::vector<Item>& items) {
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
}

int count_visible(const Tile& t, const Tiling& other, int b, bool causal, bool t_is_query) {
  int n = 0;
  for (int i = other.first[b]; i < other.first[b + 1]; ++i)
    n += (t_is_query ? classify(t, other.tiles[i], causal) : classify(other.tiles[i], t, causal)) != Vis::hidden;
  return n;
}

// S^T for key tile (kp, nk) against the packed query block; masked when partial.
void scores_t(Scratch& w, int nk, int Dp, Vis vis) {
  tile_gemm(nk, kBq, Dp, w.kp, Dp, 1, w.qt, kBq, w.st, kBq, false);
  if (vis == Vis::partial) apply_mask(w.st, nk, w.kpos, w.qpos);
}

}  // namespace

void cpu_fast_forward(const AttentionArgs& a, const ForwardOutputs& out) {
  const auto sh = validate_call(a, out);
  const Common c = make_common(a, sh);
  const int Dp = c.Dp, group = sh.group();

  std::vector<Item> items;
  for (int b = 0; b < a.batch; ++b)
    for (int qi = c.qt.first[b]; qi < c.qt.first[b + 1]; ++qi) {
      const std::int64_t cost = count_visible(c.qt.tiles[qi], c.kt, b, a.causal, true) + 1;
      for (int h = 0; h < sh.hq; ++h) items.push_back({b, h, qi, cost});
    }
  sort_items(items);
  float* lse_out = out.lse.as<float>();

#pragma omp parallel
  {
    Scratch w(Dp);
#pragma omp for schedule(dynamic, 1)
    for (std::size_t it = 0; it < items.size(); ++it) {
      const auto [b, h, qi, cost] = items[it];
      const Tile& qb = c.qt.tiles[qi];
      const int hk = h / group;
      pack_cols(a.q, qb.start, qb.n, h, Dp, c.scale2, w.row, w.qt);
      block_positions(a.q_positions, qb, c.cq[b], w.qpos);
      std::fill_n(w.acc, kBq * Dp, 0.0f);
      std::fill_n(w.m, kBq, -kInf);
      std::fill_n(w.l, kBq, 0.0f);
      for (int ki = c.kt.first[b]; ki < c.kt.first[b + 1]; ++ki) {
        const Tile& kb = c.kt.tiles[ki];
        const Vis vis = classify(qb, kb, a.causal);
        if (vis == Vis::hidden) continue;
        const int nk = kb.n;
        pack_rows(a.k, kb.start, nk, nk, hk, Dp, 1.0f, w.kp);
        pack_rows(a.v, kb.start, nk, nk, hk, Dp, 1.0f, w.vp);
        if (vis == Vis::partial) key_positions(a.k_positions, kb, c.ck[b], w.kpos);
        scores_t(w, nk, Dp, vis);
        // Online softmax, column-wise over S^T (one column per query): new max, then
        // alpha = 2^(m_old - m_use) rescales the running sum and output. m_use is the new max, or 0
        // for queries that have seen nothing yet (so -inf - -inf never happens: those get p = 0).
        std::copy_n(w.m, kBq, w.mnew);
        for (int j = 0; j < nk; ++j) {
          const float* row = w.st + j * kBq;
#pragma omp simd
          for (int i = 0; i < kBq; ++i) w.mnew[i] = std::max(w.mnew[i], row[i]);
        }
        for (int i = 0; i < kBq; ++i) {
          w.muse[i] = w.mnew[i] == -kInf ? 0.0f : w.mnew[i];
          w.alpha[i] = w.m[i];
          w.m[i] = w.mnew[i];
          w.colsum[i] = 0.0f;
        }
        fast::exp2_sub(w.alpha, w.muse, kBq);
        for (int j = 0; j < nk; ++j) {
          float* row = w.st + j * kBq;
          fast::exp2_sub(row, w.muse, kBq);
#pragma omp simd
          for (int i = 0; i < kBq; ++i) w.colsum[i] += row[i];
        }
        for (int i = 0; i < kBq; ++i) {
          w.l[i] = w.l[i] * w.alpha[i] + w.colsum[i];
          if (w.alpha[i] != 1.0f) {
            float* o = w.acc + static_cast<std::size_t>(i) * Dp;
            const float s = w.alpha[i];
#pragma omp simd
            for (int d = 0; d < Dp; ++d) o[d] *= s;
          }
        }
        // O[i][:] += sum_j P^T[j][i] V[j][:]
        tile_gemm(kBq, Dp, nk, w.st, 1, kBq, w.vp, Dp, w.acc, Dp, true);
      }
      for (int i = 0; i < qb.n; ++i) {
        const float l = w.l[i];
        float* o = w.acc + static_cast<std::size_t>(i) * Dp;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int d = 0; d < Dp; ++d) o[d] *= inv;
        lse_out[static_cast<std::size_t>(h) * sh.tq + qb.start + i] = l > 0.0f ? (w.m[i] + std::log2(l)) * kLn2 : -kInf;
      }
      store_rows(out.o, qb.start, qb.n, h, Dp, w.acc, false);
    }
  }
}

namespace {

// Packs what both backward passes need of one query block: Q^T (scaled for exp2 scores), dO^T, the
// log2-domain lse (+inf for rows that saw nothing and for padding, so P = 0 there) and delta;
// with rows, also Q and dO row-major (B operands of dK and dV).
void pack_query_block(Scratch& w, const AttentionArgs& a, const BackwardArgs& g, const Common& c, int b, int h,
                      const Tile& qb, const float* delta, bool rows) {
  const int Dp = c.Dp;
  pack_cols(a.q, qb.start, qb.n, h, Dp, c.scale2, w.row, w.qt);
  pack_cols(g.d_o, qb.start, qb.n, h, Dp, 1.0f, w.row, w.dot);
  if (rows) {
    pack_rows(a.q, qb.start, qb.n, kBq, h, Dp, 1.0f, w.qr);
    pack_rows(g.d_o, qb.start, qb.n, kBq, h, Dp, 1.0f, w.dor);
  }
  const float* lse = g.lse.as<const float>() + static_cast<std::size_t>(h) * c.sh.tq + qb.start;
  const float* dl = delta + static_cast<std::size_t>(h) * c.sh.tq + qb.start;
  for (int i = 0; i < kBq; ++i) {
    const bool real = i < qb.n && lse[i] != -kInf;
    w.lse2[i] = real ? lse[i] * kLog2e : kInf;
    w.delta[i] = real ? dl[i] : 0.0f;
  }
  block_positions(a.q_positions, qb, c.cq[b], w.qpos);
}

// With S^T in w.st: P^T = 2^(S^T - lse) in place, dP^T = V dO^T, and dS^T = P (dP - delta) scale in w.pt2.
void probs_and_ds(Scratch& w, int nk, int Dp, float scale) {
  for (int j = 0; j < nk; ++j) fast::exp2_sub(w.st + j * kBq, w.lse2, kBq);
  tile_gemm(nk, kBq, Dp, w.vp, Dp, 1, w.dot, kBq, w.pt2, kBq, false);
  for (int j = 0; j < nk; ++j) {
    const float* p = w.st + j * kBq;
    float* ds = w.pt2 + j * kBq;
#pragma omp simd
    for (int i = 0; i < kBq; ++i) ds[i] = p[i] * (ds[i] - w.delta[i]) * scale;
  }
}

}  // namespace

void cpu_fast_backward(const AttentionArgs& a, const BackwardArgs& g) {
  const auto sh = validate_call(a, g);
  const Common c = make_common(a, sh);
  const int Dp = c.Dp, group = sh.group();

  std::vector<float> delta_buf;
  const float* delta = nullptr;
  if (!g.delta.empty()) {
    delta = g.delta.as<const float>();
  } else {
    delta_buf.resize(static_cast<std::size_t>(sh.hq) * sh.tq);
    const std::int64_t tq = sh.tq;
#pragma omp parallel for schedule(static)
    for (std::int64_t t = 0; t < tq; ++t) {
      for (int h = 0; h < sh.hq; ++h) {
        const std::size_t off = (static_cast<std::size_t>(t) * sh.hq + h) * sh.d;
        float s = 0.0f;
        for (int d = 0; d < sh.d; ++d)
          s += load_as_f32(g.o.data, g.o.dtype, off + d) * load_as_f32(g.d_o.data, g.d_o.dtype, off + d);
        delta_buf[static_cast<std::size_t>(h) * tq + t] = s;
      }
    }
    delta = delta_buf.data();
  }

  // Fused single pass when there are enough (sequence, kv head) items to keep every thread busy and
  // their dQ fits a per-thread buffer: each item walks its key blocks in order and also accumulates dQ
  // (no recomputation: 5 tile products instead of 7). Its dQ sums are the very operations of pass 2,
  // in the same order, so both paths give bitwise identical results whatever the thread count.
  const int threads = omp_get_max_threads();
  std::size_t max_seq_blocks = 0;
  for (int b = 0; b < a.batch; ++b)
    max_seq_blocks = std::max<std::size_t>(max_seq_blocks, static_cast<std::size_t>(c.qt.first[b + 1] - c.qt.first[b]));
  const std::size_t dq_floats = max_seq_blocks * kBq * Dp * group;
  const bool fused = static_cast<std::int64_t>(a.batch) * sh.hkv >= 2 * threads && dq_floats * 4 <= (std::size_t{256} << 20);

  // Pass 1: dK and dV, one key block of one kv head per item, the group's query heads inside.
  std::vector<Item> items;
  if (fused) {
    for (int b = 0; b < a.batch; ++b) {
      std::int64_t cost = 1;
      for (int ki = c.kt.first[b]; ki < c.kt.first[b + 1]; ++ki) cost += count_visible(c.kt.tiles[ki], c.qt, b, a.causal, false);
      for (int hk = 0; hk < sh.hkv; ++hk) items.push_back({b, hk, -1, cost});
    }
  } else {
    for (int b = 0; b < a.batch; ++b)
      for (int ki = c.kt.first[b]; ki < c.kt.first[b + 1]; ++ki) {
        const std::int64_t cost = static_cast<std::int64_t>(group) * count_visible(c.kt.tiles[ki], c.qt, b, a.causal, false) + 1;
        for (int hk = 0; hk < sh.hkv; ++hk) items.push_back({b, hk, ki, cost});
      }
  }
  sort_items(items);
#pragma omp parallel
  {
    Scratch w(Dp);
    HostBuffer dq_buf(fused ? dq_floats * sizeof(float) : 0);
#pragma omp for schedule(dynamic, 1)
    for (std::size_t it = 0; it < items.size(); ++it) {
      const auto [b, hk, item_ki, cost] = items[it];
      const int q_first = c.qt.first[b], nqb = c.qt.first[b + 1] - q_first;
      float* dqb = fused ? dq_buf.as<float>() : nullptr;
      if (fused) std::fill_n(dqb, static_cast<std::size_t>(nqb) * kBq * Dp * group, 0.0f);
      const int k_begin = fused ? c.kt.first[b] : item_ki, k_end = fused ? c.kt.first[b + 1] : item_ki + 1;
      for (int ki = k_begin; ki < k_end; ++ki) {
        const Tile& kb = c.kt.tiles[ki];
        const int nk = kb.n;
        pack_rows(a.k, kb.start, nk, nk, hk, Dp, 1.0f, w.kp);
        pack_rows(a.v, kb.start, nk, nk, hk, Dp, 1.0f, w.vp);
        key_positions(a.k_positions, kb, c.ck[b], w.kpos);
        std::fill_n(w.acc, static_cast<std::size_t>(nk) * Dp, 0.0f);   // dK
        std::fill_n(w.acc2, static_cast<std::size_t>(nk) * Dp, 0.0f);  // dV
        for (int gi = 0; gi < group; ++gi) {
          const int h = hk * group + gi;
          for (int qi = q_first; qi < q_first + nqb; ++qi) {
            const Tile& qb = c.qt.tiles[qi];
            const Vis vis = classify(qb, kb, a.causal);
            if (vis == Vis::hidden) continue;
            pack_query_block(w, a, g, c, b, h, qb, delta, true);
            scores_t(w, nk, Dp, vis);
            probs_and_ds(w, nk, Dp, c.scale);
            tile_gemm(nk, Dp, kBq, w.st, kBq, 1, w.dor, Dp, w.acc2, Dp, true);  // dV += P^T dO
            tile_gemm(nk, Dp, kBq, w.pt2, kBq, 1, w.qr, Dp, w.acc, Dp, true);   // dK += dS^T Q
            if (fused) {
              float* dq_tile = dqb + (static_cast<std::size_t>(gi) * nqb + (qi - q_first)) * kBq * Dp;
              tile_gemm(kBq, Dp, nk, w.pt2, 1, kBq, w.kp, Dp, dq_tile, Dp, true);  // dQ += dS K
            }
          }
        }
        store_rows(g.dk, kb.start, nk, hk, Dp, w.acc, g.accumulate);
        store_rows(g.dv, kb.start, nk, hk, Dp, w.acc2, g.accumulate);
      }
      if (fused) {
        for (int gi = 0; gi < group; ++gi)
          for (int qi = q_first; qi < q_first + nqb; ++qi) {
            const Tile& qb = c.qt.tiles[qi];
            store_rows(g.dq, qb.start, qb.n, hk * group + gi, Dp,
                       dqb + (static_cast<std::size_t>(gi) * nqb + (qi - q_first)) * kBq * Dp, g.accumulate);
          }
      }
    }
  }
  if (fused) return;

  // Pass 2: dQ, one query block of one query head per item, key tiles in a fixed order.
  items.clear();
  for (int b = 0; b < a.batch; ++b)
    for (int qi = c.qt.first[b]; qi < c.qt.first[b + 1]; ++qi) {
      const std::int64_t cost = count_visible(c.qt.tiles[qi], c.kt, b, a.causal, true) + 1;
      for (int h = 0; h < sh.hq; ++h) items.push_back({b, h, qi, cost});
    }
  sort_items(items);
#pragma omp parallel
  {
    Scratch w(Dp);
#pragma omp for schedule(dynamic, 1)
    for (std::size_t it = 0; it < items.size(); ++it) {
      const auto [b, h, qi, cost] = items[it];
      const Tile& qb = c.qt.tiles[qi];
      const int hk = h / group;
      pack_query_block(w, a, g, c, b, h, qb, delta, false);
      std::fill_n(w.acc, static_cast<std::size_t>(kBq) * Dp, 0.0f);
      for (int ki = c.kt.first[b]; ki < c.kt.first[b + 1]; ++ki) {
        const Tile& kb = c.kt.tiles[ki];
        const Vis vis = classify(qb, kb, a.causal);
        if (vis == Vis::hidden) continue;
        const int nk = kb.n;
        pack_rows(a.k, kb.start, nk, nk, hk, Dp, 1.0f, w.kp);
        pack_rows(a.v, kb.start, nk, nk, hk, Dp, 1.0f, w.vp);
        if (vis == Vis::partial) key_positions(a.k_positions, kb, c.ck[b], w.kpos);
        scores_t(w, nk, Dp, vis);
        probs_and_ds(w, nk, Dp, c.scale);
        tile_gemm(kBq, Dp, nk, w.pt2, 1, kBq, w.kp, Dp, w.acc, Dp, true);  // dQ += dS K
      }
      store_rows(g.dq, qb.start, qb.n, h, Dp, w.acc, g.accumulate);
    }
  }
}

}  // namespace longattn::kernels
