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
  if (has_value(row_ids)) {
    PYPEFT_CHECK_TYPE(row_ids->scalar_type() == at::kLong, op, "row_ids", "an int64 tensor",
                      c10::toString(row_ids->scalar_type()));
    check_same_device(op, "row_ids", *row_ids, "x", x);
    PYPEFT_CHECK_VALUE(row_ids->numel() == rows, op, "row_ids",
                       "one id per row of x (" + std::to_string(rows) + ")",
                       "shape " + shape_str(row_ids->sizes()));
  }
  return {rows, cols};
}

}  // namespace pypeft
