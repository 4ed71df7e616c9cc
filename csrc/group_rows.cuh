// The rows of one group, read from the device-side cumulative end offsets.
#pragma once

#include <cstdint>

namespace modekernels {

// Rows [start, end) of group e: offs[e-1] (0 for e == 0) to offs[e], clamped so that
// 0 <= start <= end <= S whatever the offsets hold (invalid offsets never reach memory).
__device__ __forceinline__ void group_rows(const int32_t* offs, int64_t e, int64_t S,
                                           int64_t& start, int64_t& end) {
  const int64_t first = e == 0 ? 0 : static_cast<int64_t>(offs[e - 1]);
  const int64_t last = static_cast<int64_t>(offs[e]);
  start = first < 0 ? 0 : (first > S ? S : first);
  end = last < start ? start : (last > S ? S : last);
}

}  // namespace modekernels
