// The rows of one group, and the group of one row, read from the device-side cumulative end
// offsets.
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

// The group whose rows (as group_rows clamps them) hold row r, or E when none does (rows at or
// past offs[E-1]). A binary search over the non-decreasing offsets; offsets that are not
// non-decreasing give E or some group holding r, never an index outside [0, E].
__device__ __forceinline__ int64_t group_of_row(const int32_t* offs, int64_t E, int64_t S,
                                                int64_t r) {
  int64_t low = 0, high = E;
  while (low < high) {
    const int64_t mid = low + (high - low) / 2;
    int64_t start, end;
    group_rows(offs, mid, S, start, end);
    if (end > r) {
      high = mid;
    } else {
      low = mid + 1;
    }
  }
  if (low < E) {
    int64_t start, end;
    group_rows(offs, low, S, start, end);
    if (r < start || r >= end) return E;
  }
  return low;
}

}  // namespace modekernels
