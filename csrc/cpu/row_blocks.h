// Walking an [N, ...] problem in blocks of rows on the CPU.
//
// The adapter ops do several small products per row block (rank-r GEMMs,
// mask regeneration) that are memory-bound at full size; done block by block
// they run while the block is in cache, so x and grad_out are read from memory
// once. Rows are split into one contiguous chunk per thread, in a fixed order,
// so per-chunk partial sums reduce to the same result on every run.
#pragma once

#include <ATen/Parallel.h>

#include "pypeft/parallel.h"

#include <algorithm>
#include <cstdint>

namespace pypeft::cpu {

// Rows per block so that one block of the widest operand is about 1 MiB (the
// L2 of the CPUs we measure on). Measured on 2 cores at N=4096, in=out=1024,
// r=16: 256 KiB blocks cost ~1.5 ms more per step than 1 MiB ones, in
// per-call overhead of the many small GEMMs; 4 MiB ones gained nothing more.
inline int64_t rows_per_block(int64_t widest_cols, int64_t element_size) {
  const int64_t target_bytes = 1024 * 1024;
  return std::clamp<int64_t>(target_bytes / std::max<int64_t>(1, widest_cols * element_size), 8,
                             1024);
}

inline int64_t num_row_chunks(int64_t rows, int64_t block) {
  const int64_t blocks = (rows + block - 1) / block;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
}

// fn(chunk, begin, end) is called once per block, chunk in [0, num_row_chunks).
template <typename Fn>
void for_each_row_block(int64_t rows, int64_t block, const Fn& fn) {
  const int64_t chunks = num_row_chunks(rows, block);
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  // fn runs ATen ops (small GEMMs): the workers need the caller's dispatch state.
  parallel_for_with_caller_state(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t end = std::min(rows, (c + 1) * per_chunk);
      for (int64_t b = c * per_chunk; b < end; b += block) fn(c, b, std::min(end, b + block));
    }
  });
}

}  // namespace pypeft::cpu
