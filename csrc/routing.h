// Host entry points of the routing kernels: top-1 routing with capacity, its backward, and the
// stable counting sort by expert (no PyTorch: raw pointers, shapes, strides).
//
// The entries (tokens, or the flattened slots of a (T, k) index) are cut into chunks of
// `rows_per_chunk` consecutive entries. A chunk pass writes per-chunk, per-expert counts (and,
// routing, probability sums and a Σ logsumexp² partial) to the workspace; one block per expert
// turns the counts into exclusive prefixes over the chunks and sums the probabilities in chunk
// order; one block derives offs, the counts and the losses; a last chunk pass ranks each entry
// within its expert (the prefix of the chunks before plus a warp-synchronous count in position
// order) and writes perm. Every reduction has a fixed order: the results are deterministic, and
// nothing is read back to the host. All launches go to `stream`; errors throw.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace modekernels {

// Chunk length for `entries` entries when the caller does not choose one (at most ~1024 chunks).
int64_t routing_rows_per_chunk(int64_t entries);

// Bytes of workspace for `entries` entries, E experts and the given chunk length.
size_t routing_workspace_size(int64_t entries, int64_t E, int64_t rows_per_chunk);

// The largest E the routing kernels take (their per-block shared memory grows with E).
int64_t routing_max_experts();

struct RouteTop1Args {
  const void* logits;  // (T, E), element strides (stride_t, stride_e)
  int64_t T, E, stride_t, stride_e;
  Dtype dtype;
  int64_t capacity;  // tokens kept per expert, in position order
  int64_t rows_per_chunk;
  // Outputs (see modekernels.reference.routing.route_top1).
  void* gate;                  // (T,) in the logits' dtype
  float* aux_loss;             // ()
  float* z_loss;               // ()
  float* lse;                  // (T,)
  int64_t* expert_idx;         // (T,)
  int64_t* perm;               // (T,)
  int32_t* offs;               // (E,)
  int32_t* tokens_per_expert;  // (E,)
  uint8_t* dropped;            // (T,) bool
  int32_t* routed;             // (E,)
  void* workspace;
  size_t workspace_bytes;
  cudaStream_t stream;
};

void route_top1(const RouteTop1Args& args);

// perm (n,) = the entries stably sorted by expert; offs (E,) int32 cumulative ends. Entries whose
// index lies outside [0, E) (never after the Python checks) go after all others in position
// order and are counted by no expert. idx is int64 or int32 (idx_is_int64), contiguous.
void sort_by_expert(const void* idx, bool idx_is_int64, int64_t n, int64_t E,
                    int64_t rows_per_chunk, int64_t* perm, int32_t* offs, void* workspace,
                    size_t workspace_bytes, cudaStream_t stream);

struct RouteTop1BackwardArgs {
  const void* logits;  // (T, E), element strides (stride_t, stride_e)
  int64_t T, E, stride_t, stride_e;
  Dtype dtype;
  const float* lse;         // (T,)
  const int64_t* expert_idx;  // (T,)
  const uint8_t* dropped;   // (T,) bool
  const int32_t* routed;    // (E,)
  const float* grad_gate;   // (T,) contiguous
  const float* grad_aux;    // ()
  const float* grad_z;      // ()
  void* grad;               // (T, E) contiguous, the logits' dtype
  cudaStream_t stream;
};

void route_top1_backward(const RouteTop1BackwardArgs& args);

}  // namespace modekernels
