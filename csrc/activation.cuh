// The activations of the fused epilogues and their derivatives, in float32, by the codes the
// Python side passes: 0 identity, 1 silu, 2 gelu (exact erf), 3 relu. Gates of the gated residue
// block: 0 none (g = 1), 1 relu, 2 sigmoid.
#pragma once

namespace modekernels {

enum ActivationCode : int { kIdentity = 0, kSilu = 1, kGelu = 2, kRelu = 3 };
enum GateCode : int { kGateNone = 0, kGateRelu = 1, kGateSigmoid = 2 };

constexpr float kSqrtHalf = 0.70710678118654752f;      // 1 / sqrt(2)
constexpr float kInvSqrtTwoPi = 0.39894228040143268f;  // 1 / sqrt(2 pi)

__device__ __forceinline__ float activate(float z, int activation) {
  switch (activation) {
    case kSilu: return z / (1.0f + expf(-z));
    case kGelu: return 0.5f * z * (1.0f + erff(z * kSqrtHalf));
    case kRelu: return z > 0.0f ? z : 0.0f;
    default: return z;
  }
}

__device__ __forceinline__ float activation_derivative(float z, int activation) {
  switch (activation) {
    case kSilu: {
      const float s = 1.0f / (1.0f + expf(-z));
      return s * (1.0f + z * (1.0f - s));
    }
    case kGelu: {
      const float cdf = 0.5f * (1.0f + erff(z * kSqrtHalf));
      return cdf + z * expf(-0.5f * z * z) * kInvSqrtTwoPi;
    }
    case kRelu: return z > 0.0f ? 1.0f : 0.0f;
    default: return 1.0f;
  }
}

__device__ __forceinline__ float apply_gate(float z, int gate) {
  switch (gate) {
    case kGateRelu: return z > 0.0f ? z : 0.0f;
    case kGateSigmoid: return 1.0f / (1.0f + expf(-z));
    default: return 1.0f;
  }
}

// dg/dz from the gate's value g.
__device__ __forceinline__ float gate_derivative(float g, int gate) {
  switch (gate) {
    case kGateRelu: return g > 0.0f ? 1.0f : 0.0f;
    case kGateSigmoid: return g * (1.0f - g);
    default: return 0.0f;
  }
}

}  // namespace modekernels
