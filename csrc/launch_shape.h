// Launch shapes shared by the elementwise kernels: blocks that walk rows (one row per block,
// striding by the grid past kMaxRowBlocks rows) and threads that walk a row's columns.
#pragma once

#include <algorithm>
#include <cstdint>

namespace modekernels {

constexpr int64_t kMaxRowBlocks = 1 << 16;
constexpr int kMaxColumnThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for `rows` rows, one row per block: at least 1, at most kMaxRowBlocks.
inline unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, kMaxRowBlocks)));
}

// Threads of a block that walks `columns` columns: a multiple of 32 in [32, kMaxColumnThreads].
inline int column_threads(int64_t columns) {
  const int64_t rounded = std::max<int64_t>(32, ceil_div(columns, 32) * 32);
  return static_cast<int>(std::min<int64_t>(kMaxColumnThreads, rounded));
}

}  // namespace modekernels
