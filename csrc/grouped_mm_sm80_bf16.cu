// The Ampere grouped GEMMs for bfloat16 (see grouped_mm_sm80.cuh).
#include "grouped_mm_sm80.cuh"

namespace modekernels {
template size_t sm80_workspace_size<Dtype::kBFloat16>(int64_t);
template void grouped_mm_sm80<Dtype::kBFloat16>(const GroupedMmArgs&, int);
template void grouped_mm_weight_grad_sm80<Dtype::kBFloat16>(const WeightGradArgs&, int);
}  // namespace modekernels
