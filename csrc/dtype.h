// The element types of the kernels' tensors, as the dtype codes the Python side passes.
#pragma once

namespace modekernels {

enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace modekernels
