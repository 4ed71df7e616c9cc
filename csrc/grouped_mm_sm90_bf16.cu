// The Hopper grouped GEMMs for bfloat16 (see grouped_mm_sm90.cuh).
#include "grouped_mm_sm90.cuh"

namespace modekernels {
template size_t sm90_workspace_size<Dtype::kBFloat16>(int64_t, int);
template void grouped_mm_sm90<Dtype::kBFloat16>(const GroupedMmArgs&, int);
template void grouped_mm_weight_grad_sm90<Dtype::kBFloat16>(const WeightGradArgs&, int);
}  // namespace modekernels
