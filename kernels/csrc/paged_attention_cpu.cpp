// Fused CPU paged attention: reads K/V straight from the paged cache through the block tables (no gather), one call
// for a whole mixed batch (prefill chunks, prefix-cache hits, decodes), GQA, sliding window, online softmax in fp32.
//
// Work is split into items (sequence, query tile, KV heads): a decode is one tile; a prefill chunk is cut into tiles
// of QUERY_TILE tokens so that a long chunk spreads over threads. An item covers every KV head (its reads of each
// block are then one contiguous stream) unless that leaves too few items for the threads, when it covers one. It
// holds the tile's rows (tokens x query heads) and walks the key blocks the tile can see, prefetching ahead. The
// rows of one token and one KV head (its GQA group) are computed together, up to three at a time: each K/V vector
// loaded (and converted from bf16/fp16) serves all of them. Measured on the 2-vCPU EPYC (AVX2), 64 decodes of ~300
// tokens, all 30 layers of the default model: a bf16 cache 41.3 -> 32.7 ms, fp32 52.7 -> 53.6 (bound by DRAM).
// Items run under OpenMP, longest first, dynamically scheduled.
//
// SIMD is chosen at compile time: AVX-512 (16 lanes), AVX2+FMA (8 lanes), or a portable scalar path. The cache
// element type is a template parameter (float, BFloat16, Half), converted to fp32 as it is loaded.
//
// Ops (registered with the dispatcher, so they show by name in the torch profiler):
//   paged_cpu::paged_attention(query fp32|bf16 [T,H,D], key_cache, value_cache [NB,BS,KVH,D],
//                              query_start_loc int32 [S+1], seq_lens int32 [S], block_tables int32 [S,MB], scale,
//                              sliding_window (0: none), out [T,H,D] in the query's dtype)
//   paged_cpu::write_kv_cache(key, value [T,KVH,D] in the cache dtype, key_cache, value_cache, slot_mapping int64 [T])

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_vec.h"

// The op namespace; the tests' scalar build registers under another one so that both load in one process.
#ifndef PAGED_CPU_LIBRARY
#define PAGED_CPU_LIBRARY paged_cpu
#endif

namespace {

constexpr int QUERY_TILE = 16;  // prefill tokens per work item
#ifndef PAGED_CPU_PREFETCH_BLOCKS
// How many blocks ahead to prefetch (0: none). Measured on a 2-vCPU EPYC (AVX2), 64 decodes of ~150 tokens, default
// model geometry: no prefetch 1.56 ms a layer; a whole block ahead at its start 1.54; sliced per row (below), one
// block ahead 1.31, two 1.27 (medians of 12, shared machine). On a 2-vCPU Xeon (AVX-512, AMX), 64 decodes of 300
// tokens, 30 layers: one block ahead 42.7 ms, two 44.7, three 46.0, none 60.9 (fp32 cache; bf16 24.1 / 25.5 / 26.5;
// best of 6 alternating runs; in the engine's decode profile 42.8-43.7 against 45.2-45.4). So: per SIMD path.
#if defined(__AVX512F__)
#define PAGED_CPU_PREFETCH_BLOCKS 1
#else
#define PAGED_CPU_PREFETCH_BLOCKS 2
#endif
#endif
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------------------------
// Row kernels over head_dim: each has a SIMD body and a scalar tail (the whole row when kWidth == 0).
// ---------------------------------------------------------------------------------------------------------------

// scores[j] = q . k_j for j < count, where k_j = keys + j * stride.
template <typename KV>
inline void dot_keys(const float* q, const KV* keys, int64_t stride, int count, int dim, float* scores) {
  int j = 0;
#if defined(PAGED_CPU_SIMD)
  if (dim % kWidth == 0) {
    // Eight keys at a time: eight independent FMA chains share each load of q.
    for (; j + 8 <= count; j += 8) {
      Vec acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = vzero();
      for (int d = 0; d < dim; d += kWidth) {
        const Vec qd = vload(q + d);
        for (int i = 0; i < 8; ++i) acc[i] = vfma(qd, vload(keys + (j + i) * stride + d), acc[i]);
      }
      vsum8(acc, scores + j);
    }
  }
#endif
  for (; j < count; ++j) {
    const KV* k = keys + j * stride;
    float sum = 0.0f;
    int d = 0;
#if defined(PAGED_CPU_SIMD)
    Vec acc = vzero();
    for (; d + kWidth <= dim; d += kWidth) acc = vfma(vload(q + d), vload(k + d), acc);
    sum = vsum(acc);
#endif
    for (; d < dim; ++d) sum += q[d] * static_cast<float>(k[d]);
    scores[j] = sum;
  }
}

// acc += sum_j weights[j] * v_j over j < count, where v_j = values + j * stride.
template <typename KV>
inline void accumulate_values(float* acc, const float* weights, const KV* values, int64_t stride, int count, int dim) {
  int d = 0;
#if defined(PAGED_CPU_SIMD)
  // Four vectors of the row at a time: four independent FMA chains over the keys.
  for (; d + 4 * kWidth <= dim; d += 4 * kWidth) {
    Vec a0 = vload(acc + d), a1 = vload(acc + d + kWidth), a2 = vload(acc + d + 2 * kWidth),
        a3 = vload(acc + d + 3 * kWidth);
    for (int j = 0; j < count; ++j) {
      const Vec w = vset1(weights[j]);
      const KV* v = values + j * stride + d;
      a0 = vfma(w, vload(v), a0);
      a1 = vfma(w, vload(v + kWidth), a1);
      a2 = vfma(w, vload(v + 2 * kWidth), a2);
      a3 = vfma(w, vload(v + 3 * kWidth), a3);
    }
    vstore(acc + d, a0);
    vstore(acc + d + kWidth, a1);
    vstore(acc + d + 2 * kWidth, a2);
    vstore(acc + d + 3 * kWidth, a3);
  }
  for (; d + kWidth <= dim; d += kWidth) {
    Vec a = vload(acc + d);
    for (int j = 0; j < count; ++j) a = vfma(vset1(weights[j]), vload(values + j * stride + d), a);
    vstore(acc + d, a);
  }
#endif
  for (; d < dim; ++d) {
    float a = acc[d];
    for (int j = 0; j < count; ++j) a += weights[j] * static_cast<float>(values[j * stride + d]);
    acc[d] = a;
  }
}

// dot_keys for R query rows (q: R rows of dim, scores: R rows of score_stride) sharing one KV head: each key vector
// loaded (and converted) once serves all R rows.
template <int R, typename KV>
inline void dot_keys_rows(const float* q, const KV* keys, int64_t stride, int count, int dim, float* scores,
                          int score_stride) {
  int j = 0;
#if defined(PAGED_CPU_SIMD)
  if (dim % kWidth == 0) {
    for (; j + 4 <= count; j += 4) {
      Vec acc[R * 4];
      for (int i = 0; i < R * 4; ++i) acc[i] = vzero();
      for (int d = 0; d < dim; d += kWidth) {
        Vec qd[R];
        for (int i = 0; i < R; ++i) qd[i] = vload(q + i * dim + d);
        for (int k = 0; k < 4; ++k) {
          const Vec kv = vload(keys + (j + k) * stride + d);
          for (int i = 0; i < R; ++i) acc[i * 4 + k] = vfma(qd[i], kv, acc[i * 4 + k]);
        }
      }
      float sums[R * 4];
      int b = 0;
      for (; b + 8 <= R * 4; b += 8) vsum8(acc + b, sums + b);
      if (b < R * 4) vsum4(acc + b, sums + b);
      for (int i = 0; i < R; ++i)
        for (int k = 0; k < 4; ++k) scores[i * score_stride + j + k] = sums[i * 4 + k];
    }
  }
#endif
  for (int i = 0; j < count && i < R; ++i) {
    dot_keys(q + i * dim, keys + j * stride, stride, count - j, dim, scores + i * score_stride + j);
  }
}

// accumulate_values for R rows (acc: R rows of dim, weights: R rows of weight_stride) sharing one KV head.
template <int R, typename KV>
inline void accumulate_values_rows(float* acc, const float* weights, int weight_stride, const KV* values,
                                   int64_t stride, int count, int dim) {
  int d = 0;
#if defined(PAGED_CPU_SIMD)
  for (; d + 4 * kWidth <= dim; d += 4 * kWidth) {
    Vec a[R * 4];
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < 4; ++c) a[i * 4 + c] = vload(acc + i * dim + d + c * kWidth);
    for (int j = 0; j < count; ++j) {
      Vec w[R];
      for (int i = 0; i < R; ++i) w[i] = vset1(weights[i * weight_stride + j]);
      for (int c = 0; c < 4; ++c) {
        const Vec v = vload(values + j * stride + d + c * kWidth);
        for (int i = 0; i < R; ++i) a[i * 4 + c] = vfma(w[i], v, a[i * 4 + c]);
      }
    }
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < 4; ++c) vstore(acc + i * dim + d + c * kWidth, a[i * 4 + c]);
  }
#endif
  if (d < dim) {
    for (int i = 0; i < R; ++i)
      accumulate_values(acc + i * dim + d, weights + i * weight_stride, values + d, stride, count, dim - d);
  }
}

// Rows [0, rows) sharing a KV head, in sub-groups of at most 3 (what fits the 16 AVX2 registers).
template <typename KV>
inline void dot_keys_group(const float* q, const KV* keys, int64_t stride, int count, int dim, float* scores,
                           int score_stride, int rows) {
  for (int i = 0; i < rows; i += 3) {
    const float* qi = q + i * dim;
    float* si = scores + i * score_stride;
    switch (std::min(3, rows - i)) {
      case 3: dot_keys_rows<3>(qi, keys, stride, count, dim, si, score_stride); break;
      case 2: dot_keys_rows<2>(qi, keys, stride, count, dim, si, score_stride); break;
      default: dot_keys_rows<1>(qi, keys, stride, count, dim, si, score_stride);
    }
  }
}

template <typename KV>
inline void accumulate_values_group(float* acc, const float* weights, int weight_stride, const KV* values,
                                    int64_t stride, int count, int dim, int rows) {
  for (int i = 0; i < rows; i += 3) {
    float* ai = acc + i * dim;
    const float* wi = weights + i * weight_stride;
    switch (std::min(3, rows - i)) {
      case 3: accumulate_values_rows<3>(ai, wi, weight_stride, values, stride, count, dim); break;
      case 2: accumulate_values_rows<2>(ai, wi, weight_stride, values, stride, count, dim); break;
      default: accumulate_values_rows<1>(ai, wi, weight_stride, values, stride, count, dim);
    }
  }
}

inline void scale_row(float* row, float factor, int dim) {
  int d = 0;
#if defined(PAGED_CPU_SIMD)
  const Vec f = vset1(factor);
  for (; d + kWidth <= dim; d += kWidth) vstore(row + d, vmul(vload(row + d), f));
#endif
  for (; d < dim; ++d) row[d] *= factor;
}

inline float max_of(const float* x, int count) {
  float m = NEG_INF;
  int j = 0;
#if defined(PAGED_CPU_SIMD)
  if (count >= kWidth) {
    Vec mv = vload(x);
    for (j = kWidth; j + kWidth <= count; j += kWidth) mv = vmaxv(mv, vload(x + j));
    m = vmax(mv);
  }
#if defined(PAGED_CPU_MASKED_TAIL)
  if (j < count) {
    m = std::max(m, vmax(vload_tail(x + j, count - j, NEG_INF)));
    j = count;
  }
#endif
#endif
  for (; j < count; ++j) m = std::max(m, x[j]);
  return m;
}

// x[j] = exp(x[j] - shift) in place; returns their sum. x has room for count rounded up to kWidth (the lanes past
// count are overwritten with 0).
inline float exp_shifted(float* x, int count, float shift) {
  float sum = 0.0f;
  int j = 0;
#if defined(PAGED_CPU_SIMD)
  const Vec s = vset1(shift);
  Vec total = vzero();
  for (; j + kWidth <= count; j += kWidth) {
    const Vec e = vexp(vsub(vload(x + j), s));
    vstore(x + j, e);
    total = vadd(total, e);
  }
#if defined(PAGED_CPU_MASKED_TAIL)
  if (j < count) {  // the lanes past count load -inf: exp gives 0 there
    const Vec e = vexp(vsub(vload_tail(x + j, count - j, NEG_INF), s));
    // A whole store: the values step loads these weights right away, and a masked store does not forward to them
    // (an 8-key block was ~20% slower in cache than on the AVX2 path with a masked store here).
    vstore(x + j, e);
    total = vadd(total, e);
    j = count;
  }
#endif
  sum = vsum(total);
#endif
  for (; j < count; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}


// ---------------------------------------------------------------------------------------------------------------
// The attention kernel.
// ---------------------------------------------------------------------------------------------------------------

// One unit of parallel work: query tokens [token_begin, token_end) of a sequence's new tokens, KV heads
// [kv_head_begin, kv_head_end).
struct WorkItem {
  int seq;
  int token_begin;
  int token_end;
  int kv_head_begin;
  int kv_head_end;
  int64_t cost;  // keys visited x rows, to schedule the longest items first
};

// KV: the cache's element type; Q: the query's and output's (float, or BFloat16 for a bf16 model).
template <typename KV, typename Q>
struct Problem {
  const Q* query;
  int64_t query_stride_token, query_stride_head;
  const KV* key_cache;
  const KV* value_cache;
  int64_t cache_stride_block, cache_stride_slot, cache_stride_head;  // shared by K and V (checked)
  const int32_t* query_start_loc;
  const int32_t* seq_lens;
  const int32_t* block_tables;
  int64_t block_table_stride;
  Q* out;
  int64_t out_stride_token, out_stride_head;
  int block_size, head_dim, group;
  float scale;
  int sliding_window;  // 0: none
};

// Per-thread buffers, grown as needed and reused across items.
struct Scratch {
  std::vector<float> query, acc, row_max, row_sum, scores;
};

// Ask for a physical block's K and V before they are needed: blocks sit at random addresses, where the hardware
// prefetcher (which stops at page boundaries) cannot follow.
template <typename KV>
inline void prefetch_block(const KV* keys, const KV* values, int64_t elements) {
#if defined(PAGED_CPU_SIMD)
  const char* k = reinterpret_cast<const char*>(keys);
  const char* v = reinterpret_cast<const char*>(values);
  const int64_t bytes = elements * static_cast<int64_t>(sizeof(KV));
  for (int64_t offset = 0; offset < bytes; offset += 64) {
    _mm_prefetch(k + offset, _MM_HINT_T0);
    _mm_prefetch(v + offset, _MM_HINT_T0);
  }
#endif
}

// Row r's slice of the span of the block `next` starts (none when span is 0).
template <typename KV, typename Q>
inline void prefetch_slice(const Problem<KV, Q>& p, int64_t next, int64_t slice, int64_t span, int r) {
  if (r * slice < span) {
    const int64_t offset = next + r * slice;
    prefetch_block(p.key_cache + offset, p.value_cache + offset, std::min(slice, span - r * slice));
  }
}

template <typename KV, typename Q>
void attend(const Problem<KV, Q>& p, const WorkItem& item, Scratch& scratch) {
  const int dim = p.head_dim, group = p.group, block_size = p.block_size, window = p.sliding_window;
  const int q_len = p.query_start_loc[item.seq + 1] - p.query_start_loc[item.seq];
  const int seq_len = p.seq_lens[item.seq];
  const int context = seq_len - q_len;  // positions before the first new token
  const int first_token_row = p.query_start_loc[item.seq];
  const int head_begin = item.kv_head_begin * group;
  const int heads = (item.kv_head_end - item.kv_head_begin) * group;
  const int num_rows = (item.token_end - item.token_begin) * heads;

  // Row r is token token_begin + r / heads, query head head_begin + r % heads (KV head: that / group); queries are
  // pre-scaled. A block's rows of one slot are contiguous over KV heads, so an item's K/V reads stream.
  scratch.query.resize(static_cast<size_t>(num_rows) * dim);
  scratch.acc.assign(static_cast<size_t>(num_rows) * dim, 0.0f);
  scratch.row_max.assign(num_rows, NEG_INF);
  scratch.row_sum.assign(num_rows, 0.0f);
  for (int r = 0; r < num_rows; ++r) {
    const int token = first_token_row + item.token_begin + r / heads;
    const int head = head_begin + r % heads;
    const Q* q = p.query + token * p.query_stride_token + head * p.query_stride_head;
    float* dst = scratch.query.data() + static_cast<size_t>(r) * dim;
    for (int d = 0; d < dim; ++d) dst[d] = static_cast<float>(q[d]) * p.scale;
  }

  // Keys the tile can see: from the first row's window start to the last row's own position.
  const int key_end = context + item.token_end;
  const int key_begin = window > 0 ? std::max(0, context + item.token_begin - window + 1) : 0;
  const int32_t* block_table = p.block_tables + item.seq * p.block_table_stride;
  const int first_block = key_begin / block_size, end_block = (key_end + block_size - 1) / block_size;
  // The span of one block this item reads: every slot, its KV heads.
  const int64_t head_offset = item.kv_head_begin * p.cache_stride_head;
  const int64_t span = (block_size - 1) * p.cache_stride_slot + (item.kv_head_end - item.kv_head_begin) * p.cache_stride_head;
  // Rows come in runs of `group` (one token, one KV head): each run shares its keys, values and key range.
  // Each row's scores padded to whole vectors, for exp_shifted's whole-vector stores.
  const int score_stride = kWidth > 0 ? (block_size + kWidth - 1) / kWidth * kWidth : block_size;
  scratch.scores.resize(static_cast<size_t>(group) * score_stride);
  float* scores = scratch.scores.data();
  for (int block = first_block; block < end_block; ++block) {
    const int block_start = block * block_size;
    const int64_t base = block_table[block] * p.cache_stride_block;
    const bool prefetch = PAGED_CPU_PREFETCH_BLOCKS > 0 && block + PAGED_CPU_PREFETCH_BLOCKS < end_block;
    const int64_t next = prefetch ? block_table[block + PAGED_CPU_PREFETCH_BLOCKS] * p.cache_stride_block + head_offset : 0;
    // That block's span, cut into one slice per row, so that the prefetches interleave with the compute rather than
    // queue up at the block's start (where they wait on the core's few outstanding-miss slots).
    const int64_t slice = (span + num_rows - 1) / num_rows;
    const int tile_lo = std::max(key_begin, block_start) - block_start;
    const int tile_hi = std::min(key_end, block_start + block_size) - block_start;
    // Row r's slice of the prefetch, issued at one of three points of its run's work (before the dot products, in
    // the softmax, before the values): a run's slices at once fill the core's outstanding-miss slots and stall.
    const int64_t prefetch_span = prefetch ? span : 0;
    for (int r0 = 0; r0 < num_rows; r0 += group) {
      prefetch_slice(p, next, slice, prefetch_span, r0);
      const int position = context + item.token_begin + r0 / heads;
      // Causal: keys up to the row's own position; window: keys after position - window.
      const int hi = std::min(tile_hi, position + 1 - block_start);
      const int lo = window > 0 ? std::max(tile_lo, position - window + 1 - block_start) : tile_lo;
      if (lo >= hi) {
        for (int r = r0 + 1; r < r0 + group; ++r) prefetch_slice(p, next, slice, prefetch_span, r);
        continue;
      }
      const int count = hi - lo;
      const int kv_head = (head_begin + r0 % heads) / group;
      const KV* keys = p.key_cache + base + kv_head * p.cache_stride_head + lo * p.cache_stride_slot;
      const KV* values = p.value_cache + base + kv_head * p.cache_stride_head + lo * p.cache_stride_slot;
      const float* q = scratch.query.data() + static_cast<size_t>(r0) * dim;
      float* acc = scratch.acc.data() + static_cast<size_t>(r0) * dim;
      dot_keys_group(q, keys, p.cache_stride_slot, count, dim, scores, score_stride, group);
      for (int i = 0; i < group; ++i) {
        // Online softmax: rescale what was accumulated when the running max grows.
        const int r = r0 + i;
        if (i > 0 && i < group - 1) prefetch_slice(p, next, slice, prefetch_span, r);
        float* row_scores = scores + i * score_stride;
        const float new_max = std::max(scratch.row_max[r], max_of(row_scores, count));
        if (new_max > scratch.row_max[r]) {
          const float correction = std::exp(scratch.row_max[r] - new_max);  // 0 for the first block
          scratch.row_sum[r] *= correction;
          scale_row(acc + static_cast<size_t>(i) * dim, correction, dim);
          scratch.row_max[r] = new_max;
        }
        scratch.row_sum[r] += exp_shifted(row_scores, count, new_max);
      }
      if (group > 1) prefetch_slice(p, next, slice, prefetch_span, r0 + group - 1);
      accumulate_values_group(acc, scores, score_stride, values, p.cache_stride_slot, count, dim, group);
    }
  }

  for (int r = 0; r < num_rows; ++r) {
    const int token = first_token_row + item.token_begin + r / heads;
    const int head = head_begin + r % heads;
    Q* dst = p.out + token * p.out_stride_token + head * p.out_stride_head;
    const float* acc = scratch.acc.data() + static_cast<size_t>(r) * dim;
    const float inverse = 1.0f / scratch.row_sum[r];  // every row sees at least its own key: row_sum >= 1
    for (int d = 0; d < dim; ++d) dst[d] = static_cast<Q>(acc[d] * inverse);  // bf16: nearest even, as .to() does
  }
}

// Items: one per (sequence, query tile), covering all KV heads, so each block is read once, front to back; split
// per KV head too when that gives too few items to keep every thread busy (a few long decodes).
std::vector<WorkItem> plan_work(const int32_t* query_start_loc, const int32_t* seq_lens, int num_seqs,
                                int num_kv_heads, int group, int sliding_window, int threads) {
  int64_t num_tiles = 0;
  for (int seq = 0; seq < num_seqs; ++seq) {
    num_tiles += (query_start_loc[seq + 1] - query_start_loc[seq] + QUERY_TILE - 1) / QUERY_TILE;
  }
  const int kv_heads_per_item = num_tiles >= 4 * threads ? num_kv_heads : 1;
  std::vector<WorkItem> items;
  items.reserve(static_cast<size_t>(num_tiles) * (num_kv_heads / kv_heads_per_item));
  for (int seq = 0; seq < num_seqs; ++seq) {
    const int q_len = query_start_loc[seq + 1] - query_start_loc[seq];
    const int context = seq_lens[seq] - q_len;
    for (int begin = 0; begin < q_len; begin += QUERY_TILE) {
      const int end = std::min(q_len, begin + QUERY_TILE);
      int64_t keys = context + end;
      if (sliding_window > 0) keys = std::min<int64_t>(keys, sliding_window + end - begin);
      const int64_t cost = keys * (end - begin) * group * kv_heads_per_item;
      for (int kv_head = 0; kv_head < num_kv_heads; kv_head += kv_heads_per_item) {
        items.push_back({seq, begin, end, kv_head, kv_head + kv_heads_per_item, cost});
      }
    }
  }
  // Longest first, so that the dynamic schedule does not end on one long prefill tile.
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  return items;
}

template <typename KV, typename Q>
void run_attention(const Problem<KV, Q>& problem, const std::vector<WorkItem>& items) {
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), num_items));
  if (threads <= 1) {
    Scratch scratch;
    for (const WorkItem& item : items) attend(problem, item, scratch);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_items; ++i) attend(problem, items[i], scratch);
  }
}

void check_int32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.is_contiguous(), name,
              " must be a contiguous int32 CPU tensor");
}

void paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                     const at::Tensor& query_start_loc, const at::Tensor& seq_lens, const at::Tensor& block_tables,
                     double scale, int64_t sliding_window, const at::Tensor& out) {
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3 && key_cache.dim() == 4, "query/out are [T, H, D], caches [NB, BS, KVH, D]");
  TORCH_CHECK((query.scalar_type() == at::kFloat || query.scalar_type() == at::kBFloat16) &&
                  out.scalar_type() == query.scalar_type(), "query and out must both be float32 or both bfloat16");
  TORCH_CHECK(query.device().is_cpu() && key_cache.device().is_cpu() && value_cache.device().is_cpu() &&
                  out.device().is_cpu(), "paged_cpu::paged_attention runs on CPU tensors");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1 && key_cache.stride(3) == 1 && value_cache.stride(3) == 1,
              "query, out and the caches must be contiguous in head_dim");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes() && key_cache.strides() == value_cache.strides() &&
                  key_cache.scalar_type() == value_cache.scalar_type(), "key and value caches must match");
  TORCH_CHECK(out.sizes() == query.sizes(), "out must have the query's shape");
  check_int32_cpu(query_start_loc, "query_start_loc");
  check_int32_cpu(seq_lens, "seq_lens");
  TORCH_CHECK(block_tables.device().is_cpu() && block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.stride(1) == 1, "block_tables must be an int32 CPU tensor [S, max_blocks]");
  const int num_heads = static_cast<int>(query.size(1)), head_dim = static_cast<int>(query.size(2));
  const int num_kv_heads = static_cast<int>(key_cache.size(2));
  TORCH_CHECK(key_cache.size(3) == head_dim && num_heads % num_kv_heads == 0,
              "num_heads must be a multiple of num_kv_heads and head dims must match");
  const int num_seqs = static_cast<int>(seq_lens.size(0));
  TORCH_CHECK(query_start_loc.size(0) == num_seqs + 1, "query_start_loc must have num_seqs + 1 entries");
  if (query.size(0) == 0) return;

  const int group = num_heads / num_kv_heads;
  // NOTE: at::get_num_threads(), not omp_get_max_threads(): torch's thread count is per calling thread (the engine
  // sets it on its own), and this keeps the kernel on the same threads as torch's own ops.
  const auto items = plan_work(query_start_loc.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(), num_seqs,
                               num_kv_heads, group, static_cast<int>(sliding_window), at::get_num_threads());
  auto run_typed = [&](auto* key_ptr, auto* value_ptr, auto* query_tag) {
    using KV = std::remove_const_t<std::remove_pointer_t<decltype(key_ptr)>>;
    using Q = std::remove_pointer_t<decltype(query_tag)>;
    Problem<KV, Q> problem{query.data_ptr<Q>(), query.stride(0), query.stride(1), key_ptr, value_ptr,
                           key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
                           query_start_loc.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
                           block_tables.data_ptr<int32_t>(), block_tables.stride(0), out.data_ptr<Q>(), out.stride(0),
                           out.stride(1), static_cast<int>(key_cache.size(1)), head_dim, group,
                           static_cast<float>(scale), static_cast<int>(sliding_window)};
    run_attention(problem, items);
  };
  // A bf16 model's queries are read and its outputs written as bf16 here: no conversion passes around the call.
  auto run = [&](auto* key_ptr, auto* value_ptr) {
    if (query.scalar_type() == at::kBFloat16) {
      run_typed(key_ptr, value_ptr, static_cast<at::BFloat16*>(nullptr));
    } else {
      run_typed(key_ptr, value_ptr, static_cast<float*>(nullptr));
    }
  };
  switch (key_cache.scalar_type()) {
    case at::kFloat:
      run(key_cache.data_ptr<float>(), value_cache.data_ptr<float>());
      break;
    case at::kBFloat16:
      run(key_cache.data_ptr<at::BFloat16>(), value_cache.data_ptr<at::BFloat16>());
      break;
    case at::kHalf:
      run(key_cache.data_ptr<at::Half>(), value_cache.data_ptr<at::Half>());
      break;
    default:
      TORCH_CHECK(false, "unsupported KV cache dtype ", key_cache.scalar_type(), " (float32, bfloat16, float16)");
  }
}

// Scatter the step's new K/V rows into their slots (slot -1: skipped). Rows must already be in the cache dtype.
void write_kv_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                    const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && key_cache.dim() == 4, "key/value are [T, KVH, D]");
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type() && value.scalar_type() == value_cache.scalar_type(),
              "key/value must already be in the cache dtype");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1 && key_cache.stride(3) == 1 && value_cache.stride(3) == 1,
              "rows and caches must be contiguous in head_dim");
  TORCH_CHECK(slot_mapping.device().is_cpu() && slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == key.size(0), "slot_mapping must be an int64 CPU tensor [T]");
  const int64_t num_tokens = key.size(0), num_kv_heads = key.size(1), block_size = key_cache.size(1);
  const int64_t num_slots = key_cache.size(0) * block_size;
  const int64_t row_bytes = key.size(2) * key.element_size();
  const auto* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t slot_stride = slot_mapping.stride(0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(slots[t * slot_stride] < num_slots, "slot ", slots[t * slot_stride], " is past the cache's ", num_slots);
  }
  auto* key_base = static_cast<char*>(key_cache.data_ptr());
  auto* value_base = static_cast<char*>(value_cache.data_ptr());
  const auto* key_src = static_cast<const char*>(key.data_ptr());
  const auto* value_src = static_cast<const char*>(value.data_ptr());
  const int64_t element = key.element_size();
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t slot = slots[t * slot_stride];
    if (slot < 0) continue;
    const int64_t block = slot / block_size, offset = slot % block_size;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      std::memcpy(key_base + (block * key_cache.stride(0) + offset * key_cache.stride(1) + h * key_cache.stride(2)) * element,
                  key_src + (t * key.stride(0) + h * key.stride(1)) * element, row_bytes);
      std::memcpy(value_base + (block * value_cache.stride(0) + offset * value_cache.stride(1) + h * value_cache.stride(2)) * element,
                  value_src + (t * value.stride(0) + h * value.stride(1)) * element, row_bytes);
    }
  }
}

const char* simd_path() {
#if defined(PAGED_CPU_SIMD) && defined(__AVX512F__)
  return "avx512";
#elif defined(PAGED_CPU_SIMD)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

TORCH_LIBRARY(PAGED_CPU_LIBRARY, m) {
  m.def("paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor query_start_loc, Tensor seq_lens, "
        "Tensor block_tables, float scale, int sliding_window, Tensor(a!) out) -> ()");
  m.def("write_kv_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping) -> ()");
  // Which SIMD path this build compiled (avx512, avx2 or scalar), for logs and tests.
  m.def("simd_path() -> str", [] { return std::string(simd_path()); });
}

TORCH_LIBRARY_IMPL(PAGED_CPU_LIBRARY, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("write_kv_cache", &write_kv_cache);
}
