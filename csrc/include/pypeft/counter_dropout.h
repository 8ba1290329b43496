// Argument checks for pypeft::counter_dropout, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include "pypeft/checks.h"

namespace pypeft {

// x viewed as [rows, cols]: its last dim is the column; a 0-dim x is one element.
struct CounterDropoutDims {
  int64_t rows;
  int64_t cols;
};

inline CounterDropoutDims check_counter_dropout_args(const char* op, const at::Tensor& x, double p,
                                                     const c10::optional<at::Tensor>& seed,
                                                     const c10::optional<at::Tensor>& row_ids) {
  check_defined(op, "x", x);
  check_activation_dtype(op, "x", x);
  check_probability(op, "p", p);
  check_seed(op, "seed", seed, p > 0.0, x);
  const int64_t cols = x.dim() == 0 ? 1 : x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  check_row_ids(op, row_ids, x, rows);
  return {rows, cols};
}

}  // namespace pypeft
