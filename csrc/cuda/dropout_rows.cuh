// Applying a counter-based dropout mask to rows of a matrix on the GPU. The
// per-element math is pypeft/dropout_mask.h, the same code the CPU runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "pypeft/dropout_mask.h"

namespace pypeft::cuda {

// Where a kernel reads its seed: from device memory (a CUDA seed tensor, read
// in the kernel, no host sync) or by value (a CPU seed tensor).
struct SeedSource {
  const int64_t* device_ptr = nullptr;
  uint64_t value = 0;
};

SeedSource seed_source(const c10::optional<at::Tensor>& seed);

// dst = drop(src) for [rows, cols] matrices with unit column stride whose
// first row is global row 0, or whose row i is global row row_ids[i] (a device
// pointer); dst may be src. Launches on the current stream.
void dropout_rows(const at::Tensor& src, const at::Tensor& dst, SeedSource seed,
                  const DropoutParams& d, const int64_t* row_ids = nullptr);

}  // namespace pypeft::cuda
