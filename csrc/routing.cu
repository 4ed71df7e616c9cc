// Top-1 routing with capacity, its backward, and the stable counting sort by expert (see
// routing.h for the passes). Kernels:
//
// - route_rows_kernel: one block per chunk, one warp per token row (rows dealt round-robin to
//   the warps): first maximum (NaN counts as the largest, ties to the lowest index, as
//   torch.argmax), Σ exp(x - max) by an xor butterfly, logsumexp, gate = 1 / Σ exp; the warp's
//   probability sums per expert in shared memory (each lane owns the experts ≡ lane mod 32), the
//   block's counts by shared-memory integer atomics; the block sums its warps in warp order.
// - count_kernel: the same chunking, counts only (sort_by_expert).
// - scan_kernel: one block per expert: exclusive prefixes of the counts over the chunks, the
//   probability sums in chunk order.
// - finalize_kernel: one block: kept = min(routed, capacity), offs, kept_start, the losses.
// - scatter_kernel: one warp per chunk, 32 entries per step in position order: the rank within
//   the expert is the chunk prefix plus __match_any_sync peers before the lane; ranks at or past
//   the capacity are dropped and go after all kept entries in position order.
// - route_backward_kernel: one warp per row, the formula of the reference backward.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda_check.h"
#include "elements.cuh"
#include "launch_shape.h"
#include "reduce.cuh"
#include "routing.h"

namespace modekernels {
namespace {

constexpr int64_t kMaxExperts = 4096;
// The default per-block shared memory (48 KiB) in floats, less a margin for the kernels' static
// shared arrays.
constexpr int64_t kSharedFloats = (48 * 1024 - 256) / 4;
constexpr int kMaxRowWarps = 8;
constexpr int kScanThreads = 256;
constexpr int kFinalizeThreads = 1024;
constexpr int kBackwardThreads = 256;
constexpr int64_t kTargetChunks = 1024;
constexpr int64_t kMinRowsPerChunk = 256;
constexpr size_t kAlignment = 256;

size_t align_up(size_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

// Warps of route_rows_kernel: as many as fit their per-warp probability sums (warps·E floats)
// beside the block's E + 1 counts in shared memory, at most kMaxRowWarps.
int row_warps(int64_t E) {
  const int64_t fit = (kSharedFloats - (E + 1)) / E;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxRowWarps, fit)));
}

size_t row_shared_bytes(int warps, int64_t E) {
  return static_cast<size_t>(warps * E + E + 1) * sizeof(float);
}

// The workspace: counts (E + 1, chunks + 1) int32 (row E: entries with an index outside
// [0, E)), probability sums (E, chunks + 1) float, Σ logsumexp² partials (chunks,) float, and
// kept_start (E + 1,) int32 (kept_start[E]: the number kept). Column `chunks` of counts and sums
// gets the totals.
struct Workspace {
  int32_t* counts;
  float* probs;
  float* z_parts;
  int32_t* kept_start;
  int64_t chunks;
  int64_t ld;

  static size_t bytes(int64_t n, int64_t E, int64_t rows_per_chunk) {
    const int64_t chunks = ceil_div(n, rows_per_chunk);
    const size_t ld = static_cast<size_t>(chunks + 1);
    return align_up((E + 1) * ld * sizeof(int32_t)) + align_up(E * ld * sizeof(float)) +
           align_up(chunks * sizeof(float)) + align_up((E + 1) * sizeof(int32_t));
  }

  static Workspace carve(void* base, int64_t n, int64_t E, int64_t rows_per_chunk) {
    Workspace w;
    w.chunks = ceil_div(n, rows_per_chunk);
    w.ld = w.chunks + 1;
    char* p = static_cast<char*>(base);
    w.counts = reinterpret_cast<int32_t*>(p);
    p += align_up((E + 1) * w.ld * sizeof(int32_t));
    w.probs = reinterpret_cast<float*>(p);
    p += align_up(E * w.ld * sizeof(float));
    w.z_parts = reinterpret_cast<float*>(p);
    p += align_up(w.chunks * sizeof(float));
    w.kept_start = reinterpret_cast<int32_t*>(p);
    return w;
  }
};

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// a > b, NaN above every number (torch.argmax picks a NaN).
__device__ __forceinline__ bool beats(float a, float b) {
  return a > b || (isnan(a) && !isnan(b));
}

template <typename T>
__global__ void route_rows_kernel(const T* logits, int64_t num_tokens, int64_t E,
                                  int64_t stride_t, int64_t stride_e, int64_t rows_per_chunk,
                                  int64_t* expert_idx, T* gate, float* lse_out, int32_t* counts,
                                  float* probs, float* z_parts, int64_t ld) {
  extern __shared__ float shared[];
  __shared__ float warp_z[kMaxRowWarps];
  const int warps = blockDim.x / kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  float* warp_probs = shared;                                             // (warps, E)
  int32_t* block_counts = reinterpret_cast<int32_t*>(shared + warps * E);  // (E + 1,)
  for (int64_t i = threadIdx.x; i < warps * E; i += blockDim.x) warp_probs[i] = 0.0f;
  for (int64_t i = threadIdx.x; i <= E; i += blockDim.x) block_counts[i] = 0;
  __syncthreads();

  const int64_t chunk = blockIdx.x;
  const int64_t first = chunk * rows_per_chunk;
  const int64_t last = min64(first + rows_per_chunk, num_tokens);
  float* own_probs = warp_probs + warp * E;
  float z = 0.0f;
  for (int64_t row = first + warp; row < last; row += warps) {
    const T* x = logits + row * stride_t;
    float best = -INFINITY;
    int64_t best_col = -1;  // none yet (a lane with no column keeps it)
    for (int64_t c = lane; c < E; c += kWarpSize) {
      const float v = to_float(x[c * stride_e]);
      if (best_col < 0 || beats(v, best)) {
        best = v;
        best_col = c;
      }
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(kFullMask, best, offset);
      const int64_t other_col = __shfl_xor_sync(kFullMask, best_col, offset);
      const bool take = other_col >= 0 &&
                        (best_col < 0 || beats(other, best) ||
                         (!beats(best, other) && other_col < best_col));
      if (take) {
        best = other;
        best_col = other_col;
      }
    }
    float sum_exp = 0.0f;
    for (int64_t c = lane; c < E; c += kWarpSize) sum_exp += expf(to_float(x[c * stride_e]) - best);
    sum_exp = warp_sum(sum_exp);
    const float inv_sum = 1.0f / sum_exp;
    // torch.logsumexp's rule: an infinite max is the row's logsumexp (-inf for a row of -inf)
    const float lse = isinf(best) ? best : best + logf(sum_exp);
    for (int64_t c = lane; c < E; c += kWarpSize) {
      own_probs[c] += expf(to_float(x[c * stride_e]) - best) * inv_sum;
    }
    if (lane == 0) {
      expert_idx[row] = best_col;
      gate[row] = from_float<T>(inv_sum);
      lse_out[row] = lse;
      atomicAdd(&block_counts[best_col], 1);
      z += lse * lse;
    }
  }
  if (lane == 0) warp_z[warp] = z;
  __syncthreads();
  for (int64_t c = threadIdx.x; c <= E; c += blockDim.x) {
    counts[c * ld + chunk] = block_counts[c];
    if (c == E) continue;
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += warp_probs[w * E + c];
    probs[c * ld + chunk] = total;
  }
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += warp_z[w];
    z_parts[chunk] = total;
  }
}

template <typename Index>
__global__ void count_kernel(const Index* idx, int64_t n, int64_t E, int64_t rows_per_chunk,
                             int32_t* counts, int64_t ld) {
  extern __shared__ int32_t block_counts[];  // (E + 1,): E counts indices outside [0, E)
  for (int64_t i = threadIdx.x; i <= E; i += blockDim.x) block_counts[i] = 0;
  __syncthreads();
  const int64_t chunk = blockIdx.x;
  const int64_t first = chunk * rows_per_chunk;
  const int64_t last = min64(first + rows_per_chunk, n);
  for (int64_t row = first + threadIdx.x; row < last; row += blockDim.x) {
    const int64_t e = static_cast<int64_t>(idx[row]);
    atomicAdd(&block_counts[e >= 0 && e < E ? e : E], 1);
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c <= E; c += blockDim.x) counts[c * ld + chunk] = block_counts[c];
}

// Block e (of E + 1): counts[e, :chunks] become exclusive prefixes, counts[e, chunks] the total;
// for e < E and probs given, probs[e, chunks] = Σ of probs[e, :chunks] in chunk order.
__global__ void scan_kernel(int32_t* counts, float* probs, int64_t chunks, int64_t ld, int64_t E) {
  __shared__ int32_t int_scratch[kWarpSize + 1];
  __shared__ float float_scratch[kWarpSize + 1];
  const int64_t e = blockIdx.x;
  int32_t* row = counts + e * ld;
  float* prob_row = probs != nullptr && e < E ? probs + e * ld : nullptr;
  int32_t seen = 0;
  float prob_total = 0.0f;
  for (int64_t base = 0; base < chunks; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const int32_t v = i < chunks ? row[i] : 0;
    int32_t total;
    const int32_t before = block_exclusive_scan(v, int_scratch, total);
    if (i < chunks) row[i] = seen + before;
    seen += total;
    if (prob_row != nullptr) {
      prob_total += block_sum(i < chunks ? prob_row[i] : 0.0f, float_scratch);
    }
  }
  if (threadIdx.x == 0) {
    row[chunks] = seen;
    if (prob_row != nullptr) prob_row[chunks] = prob_total;
  }
}

// One block. Routing outputs (tokens, routed, aux, z) may be null for a plain sort.
__global__ void finalize_kernel(const int32_t* counts, const float* probs, const float* z_parts,
                                int64_t chunks, int64_t ld, int64_t E, int64_t n,
                                int64_t capacity, int32_t* kept_start, int32_t* offs,
                                int32_t* tokens, int32_t* routed_out, float* aux, float* z) {
  __shared__ int32_t int_scratch[kWarpSize + 1];
  __shared__ float float_scratch[kWarpSize + 1];
  const float inv_n = 1.0f / static_cast<float>(n);
  int32_t kept_before = 0;
  float balance = 0.0f;
  for (int64_t base = 0; base < E; base += blockDim.x) {
    const int64_t e = base + threadIdx.x;
    const int32_t routed = e < E ? counts[e * ld + chunks] : 0;
    const int32_t kept = static_cast<int32_t>(min64(routed, capacity));
    int32_t total;
    const int32_t before = kept_before + block_exclusive_scan(kept, int_scratch, total);
    if (e < E) {
      kept_start[e] = before;
      offs[e] = before + kept;
      if (tokens != nullptr) tokens[e] = kept;
      if (routed_out != nullptr) routed_out[e] = routed;
      if (probs != nullptr) {
        balance += (static_cast<float>(routed) * inv_n) * (probs[e * ld + chunks] * inv_n);
      }
    }
    kept_before += total;
  }
  if (threadIdx.x == 0) kept_start[E] = kept_before;
  if (aux != nullptr) {
    const float balance_total = block_sum(balance, float_scratch);
    float z_total = 0.0f;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) z_total += z_parts[c];
    z_total = block_sum(z_total, float_scratch);
    if (threadIdx.x == 0) {
      *aux = static_cast<float>(E) * balance_total;
      *z = z_total * inv_n;
    }
  }
}

// One warp per chunk. dropped and gate (element size gate_bytes, 2 or 4) may be null.
template <typename Index>
__global__ void scatter_kernel(const Index* idx, int64_t n, int64_t E, int64_t capacity,
                               int64_t rows_per_chunk, const int32_t* counts, int64_t ld,
                               const int32_t* kept_start, int64_t* perm, uint8_t* dropped,
                               void* gate, int gate_bytes) {
  extern __shared__ int32_t seen[];  // (E,): entries of each expert before the current step
  const int lane = threadIdx.x;
  const int64_t chunk = blockIdx.x;
  const int64_t first = chunk * rows_per_chunk;
  const int64_t last = min64(first + rows_per_chunk, n);
  long long dropped_before = 0;  // entries dropped before the current step, in all chunks
  for (int64_t e = lane; e < E; e += kWarpSize) {
    const int32_t s = counts[e * ld + chunk];
    seen[e] = s;
    dropped_before += s > capacity ? s - capacity : 0;
  }
  dropped_before = warp_sum(dropped_before) + counts[E * ld + chunk];
  __syncwarp();
  const int64_t num_kept = kept_start[E];
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t base = first; base < last; base += kWarpSize) {
    const int64_t row = base + lane;
    const bool in_chunk = row < last;
    const int64_t e = in_chunk ? static_cast<int64_t>(idx[row]) : -1;
    const bool valid = in_chunk && e >= 0 && e < E;
    const unsigned peers = __match_any_sync(kFullMask, valid ? static_cast<int>(e) : -1);
    const int peers_below = __popc(peers & lanes_below);
    const int64_t rank = valid ? static_cast<int64_t>(seen[e]) + peers_below : 0;
    __syncwarp();
    if (valid && peers_below == 0) seen[e] += __popc(peers);
    __syncwarp();
    const bool drop = in_chunk && (!valid || rank >= capacity);
    const unsigned drops = __ballot_sync(kFullMask, drop);
    const int64_t dest = drop ? num_kept + dropped_before + __popc(drops & lanes_below)
                              : (valid ? kept_start[e] + rank : -1);
    dropped_before += __popc(drops);
    if (!in_chunk) continue;
    if (dest >= 0 && dest < n) perm[dest] = row;
    if (dropped != nullptr) dropped[row] = drop ? 1 : 0;
    if (gate != nullptr && drop) {
      if (gate_bytes == 2) {
        static_cast<uint16_t*>(gate)[row] = 0;
      } else {
        static_cast<uint32_t*>(gate)[row] = 0;
      }
    }
  }
}

template <typename T>
__global__ void route_backward_kernel(const T* logits, int64_t num_tokens, int64_t E,
                                      int64_t stride_t, int64_t stride_e, const float* lse,
                                      const int64_t* expert_idx, const uint8_t* dropped,
                                      const int32_t* routed, const float* grad_gate,
                                      const float* grad_aux, const float* grad_z, T* grad) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  const float inv_n = 1.0f / static_cast<float>(num_tokens);
  const float aux_scale = static_cast<float>(E) * inv_n * *grad_aux;
  const float z_scale = 2.0f * inv_n * *grad_z;
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
       row < num_tokens; row += warps) {
    const T* x = logits + row * stride_t;
    const float l = lse[row];
    const int64_t e = expert_idx[row];
    const bool kept = e >= 0 && e < E && dropped[row] == 0;
    const float gate = kept ? expf(to_float(x[e * stride_e]) - l) : 0.0f;
    const float gate_term = grad_gate[row] * gate;
    float mean_fraction = 0.0f;  // Σ_c f_c·p_c
    for (int64_t c = lane; c < E; c += kWarpSize) {
      mean_fraction += static_cast<float>(routed[c]) * inv_n * expf(to_float(x[c * stride_e]) - l);
    }
    mean_fraction = warp_sum(mean_fraction);
    const float row_term = z_scale * l - gate_term;
    for (int64_t c = lane; c < E; c += kWarpSize) {
      const float p = expf(to_float(x[c * stride_e]) - l);
      const float fraction = static_cast<float>(routed[c]) * inv_n;
      float g = p * (aux_scale * (fraction - mean_fraction) + row_term);
      if (c == e) g += gate_term;
      grad[row * E + c] = from_float<T>(g);
    }
  }
}

void check_sizes(int64_t n, int64_t E, int64_t rows_per_chunk, const char* what) {
  require(n >= 0 && n <= INT32_MAX,
          std::string(what) + ": the number of entries must lie in [0, 2^31)");
  require(E >= 1 && E <= kMaxExperts,
          std::string(what) + ": the number of experts must lie in [1, " +
              std::to_string(kMaxExperts) + "]");
  require(rows_per_chunk >= 1, std::string(what) + ": rows_per_chunk must be positive");
}

// The passes after the chunk pass: scan, finalize, scatter.
template <typename Index>
void sort_passes(const Workspace& w, const Index* idx, int64_t n, int64_t E, int64_t capacity,
                 int64_t rows_per_chunk, bool routing, int64_t* perm, int32_t* offs,
                 int32_t* tokens, int32_t* routed, float* aux, float* z, uint8_t* dropped,
                 void* gate, int gate_bytes, cudaStream_t stream) {
  scan_kernel<<<static_cast<unsigned>(E + 1), kScanThreads, 0, stream>>>(
      w.counts, routing ? w.probs : nullptr, w.chunks, w.ld, E);
  check_launch("routing scan_kernel");
  finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(
      w.counts, routing ? w.probs : nullptr, w.z_parts, w.chunks, w.ld, E, n, capacity,
      w.kept_start, offs, tokens, routed, aux, z);
  check_launch("routing finalize_kernel");
  const size_t seen_bytes = E * sizeof(int32_t);
  scatter_kernel<Index><<<static_cast<unsigned>(w.chunks), kWarpSize, seen_bytes, stream>>>(
      idx, n, E, capacity, rows_per_chunk, w.counts, w.ld, w.kept_start, perm, dropped, gate,
      gate_bytes);
  check_launch("routing scatter_kernel");
}

size_t element_bytes(Dtype dtype) { return dtype == Dtype::kFloat32 ? 4 : 2; }

}  // namespace

int64_t routing_rows_per_chunk(int64_t entries) {
  int64_t rows = kMinRowsPerChunk;
  while (ceil_div(entries, rows) > kTargetChunks) rows *= 2;
  return rows;
}

size_t routing_workspace_size(int64_t entries, int64_t E, int64_t rows_per_chunk) {
  check_sizes(entries, E, rows_per_chunk, "routing_workspace_size");
  return Workspace::bytes(entries, E, rows_per_chunk);
}

int64_t routing_max_experts() { return kMaxExperts; }

void route_top1(const RouteTop1Args& a) {
  check_sizes(a.T, a.E, a.rows_per_chunk, "route_top1");
  require(a.capacity >= 0, "route_top1: capacity must be non-negative");
  const size_t small_bytes = a.E * sizeof(int32_t);
  if (a.T == 0) {
    for (void* p : {static_cast<void*>(a.offs), static_cast<void*>(a.tokens_per_expert),
                    static_cast<void*>(a.routed)}) {
      check_cuda(cudaMemsetAsync(p, 0, small_bytes, a.stream), "cudaMemsetAsync");
    }
    check_cuda(cudaMemsetAsync(a.aux_loss, 0, sizeof(float), a.stream), "cudaMemsetAsync");
    check_cuda(cudaMemsetAsync(a.z_loss, 0, sizeof(float), a.stream), "cudaMemsetAsync");
    return;
  }
  require(a.workspace_bytes >= Workspace::bytes(a.T, a.E, a.rows_per_chunk),
          "route_top1: workspace too small (use routing_workspace_size)");
  const Workspace w = Workspace::carve(a.workspace, a.T, a.E, a.rows_per_chunk);
  require(w.chunks <= INT32_MAX, "route_top1: too many chunks");
  const int warps = row_warps(a.E);
  with_element_type(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    route_rows_kernel<T><<<static_cast<unsigned>(w.chunks), warps * kWarpSize,
                           row_shared_bytes(warps, a.E), a.stream>>>(
        static_cast<const T*>(a.logits), a.T, a.E, a.stride_t, a.stride_e, a.rows_per_chunk,
        a.expert_idx, static_cast<T*>(a.gate), a.lse, w.counts, w.probs, w.z_parts, w.ld);
  });
  check_launch("route_rows_kernel");
  sort_passes<int64_t>(w, a.expert_idx, a.T, a.E, a.capacity, a.rows_per_chunk, true, a.perm,
                       a.offs, a.tokens_per_expert, a.routed, a.aux_loss, a.z_loss, a.dropped,
                       a.gate, static_cast<int>(element_bytes(a.dtype)), a.stream);
}

void sort_by_expert(const void* idx, bool idx_is_int64, int64_t n, int64_t E,
                    int64_t rows_per_chunk, int64_t* perm, int32_t* offs, void* workspace,
                    size_t workspace_bytes, cudaStream_t stream) {
  check_sizes(n, E, rows_per_chunk, "sort_by_expert");
  if (n == 0) {
    check_cuda(cudaMemsetAsync(offs, 0, E * sizeof(int32_t), stream), "cudaMemsetAsync");
    return;
  }
  require(workspace_bytes >= Workspace::bytes(n, E, rows_per_chunk),
          "sort_by_expert: workspace too small (use routing_workspace_size)");
  const Workspace w = Workspace::carve(workspace, n, E, rows_per_chunk);
  require(w.chunks <= INT32_MAX, "sort_by_expert: too many chunks");
  auto run = [&](auto* typed_idx) {
    using Index = std::remove_const_t<std::remove_pointer_t<decltype(typed_idx)>>;
    count_kernel<Index><<<static_cast<unsigned>(w.chunks), kScanThreads,
                          (E + 1) * sizeof(int32_t), stream>>>(typed_idx, n, E, rows_per_chunk,
                                                               w.counts, w.ld);
    check_launch("sort_by_expert count_kernel");
    sort_passes<Index>(w, typed_idx, n, E, n, rows_per_chunk, false, perm, offs, nullptr,
                       nullptr, nullptr, nullptr, nullptr, nullptr, 0, stream);
  };
  if (idx_is_int64) {
    run(static_cast<const int64_t*>(idx));
  } else {
    run(static_cast<const int32_t*>(idx));
  }
}

void route_top1_backward(const RouteTop1BackwardArgs& a) {
  require(a.T >= 0 && a.E >= 1, "route_top1_backward: bad sizes");
  if (a.T == 0) return;
  const int64_t rows_per_block = kBackwardThreads / kWarpSize;
  const int64_t blocks = std::min<int64_t>(ceil_div(a.T, rows_per_block), INT32_MAX);
  with_element_type(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    route_backward_kernel<T><<<static_cast<unsigned>(blocks), kBackwardThreads, 0, a.stream>>>(
        static_cast<const T*>(a.logits), a.T, a.E, a.stride_t, a.stride_e, a.lse, a.expert_idx,
        a.dropped, a.routed, a.grad_gate, a.grad_aux, a.grad_z, static_cast<T*>(a.grad));
  });
  check_launch("route_backward_kernel");
}

}  // namespace modekernels
