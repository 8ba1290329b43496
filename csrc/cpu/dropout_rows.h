// Applying a counter-based dropout mask to a block of rows on the CPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "pypeft/dropout_mask.h"

namespace pypeft::cpu {

// dst = drop(src) for a [rows, cols] block whose first row is global row
// `row0` (the mask depends on global indices, never on how rows are blocked).
// With row_ids, block row i is masked as global row row_ids[row0 + i] (rows
// gathered out of a larger matrix). Both need unit column stride; dst may be
// src (in place).
void dropout_rows(const at::Tensor& src, const at::Tensor& dst, int64_t row0, uint64_t seed,
                  const DropoutParams& d, const int64_t* row_ids = nullptr);

}  // namespace pypeft::cpu
