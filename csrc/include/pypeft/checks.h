// Argument validation shared by every op and backend. Every failure names the
// op, the argument, what was expected and what came, and raises a Python
// ValueError / TypeError (never a crash, never a silent wrong answer).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace pypeft {

inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << "]";
  return s.str();
}

#define PYPEFT_CHECK_VALUE(cond, op, arg, expected, got)                      \
  TORCH_CHECK_VALUE((cond), op, ": argument '", arg, "': expected ", expected, \
                    ", got ", got)

#define PYPEFT_CHECK_TYPE(cond, op, arg, expected, got)                       \
  TORCH_CHECK_TYPE((cond), op, ": argument '", arg, "': expected ", expected, \
                   ", got ", got)

// An optional tensor argument that was given (not None).
inline bool has_value(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_defined(const char* op, const char* arg, const at::Tensor& t) {
  PYPEFT_CHECK_VALUE(t.defined(), op, arg, "a tensor", "None");
}

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  check_defined(op, arg, t);
  PYPEFT_CHECK_VALUE(t.dim() == dim, op, arg, std::to_string(dim) + "-D tensor",
                     std::to_string(t.dim()) + "-D tensor of shape " + shape_str(t.sizes()));
}

inline void check_size(const char* op, const char* arg, const at::Tensor& t, int64_t d,
                       int64_t expected, const char* what) {
  PYPEFT_CHECK_VALUE(t.size(d) == expected, op, arg,
                     std::string("size ") + std::to_string(expected) + " in dim " +
                         std::to_string(d) + " (" + what + ")",
                     "shape " + shape_str(t.sizes()));
}

inline void check_same_device(const char* op, const char* arg, const at::Tensor& t,
                              const char* ref_arg, const at::Tensor& ref) {
  PYPEFT_CHECK_VALUE(t.device() == ref.device(), op, arg,
                     std::string("a tensor on ") + ref.device().str() + " (the device of '" +
                         ref_arg + "')",
                     "a tensor on " + t.device().str());
}

inline void check_same_dtype(const char* op, const char* arg, const at::Tensor& t,
                             const char* ref_arg, const at::Tensor& ref) {
  PYPEFT_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, arg,
                    std::string("dtype ") + c10::toString(ref.scalar_type()) + " (the dtype of '" +
                        ref_arg + "')",
                    c10::toString(t.scalar_type()));
}

inline void check_dtype_in(const char* op, const char* arg, const at::Tensor& t,
                           std::initializer_list<at::ScalarType> allowed) {
  for (auto s : allowed)
    if (t.scalar_type() == s) return;
  std::string names;
  for (auto s : allowed) names += (names.empty() ? "" : ", ") + std::string(c10::toString(s));
  PYPEFT_CHECK_TYPE(false, op, arg, "one of dtypes {" + names + "} on " + t.device().str(),
                    c10::toString(t.scalar_type()));
}

// Floating dtypes an op accepts for activations: float16 only on CUDA, where
// it is a first-class GEMM type (DESIGN.md: the op contract, item 6).
inline void check_activation_dtype(const char* op, const char* arg, const at::Tensor& t) {
  if (t.is_cuda())
    check_dtype_in(op, arg, t, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  else
    check_dtype_in(op, arg, t, {at::kFloat, at::kDouble, at::kBFloat16});
}

inline void check_probability(const char* op, const char* arg, double p) {
  PYPEFT_CHECK_VALUE(p >= 0.0 && p < 1.0, op, arg, "a probability in [0, 1)", p);
}

// Seeds travel as tensors so that torch.compile does not specialise (and
// recompile) on a value that changes every step (BUILD-NOTES.md).
inline void check_seed(const char* op, const char* arg, const c10::optional<at::Tensor>& seed,
                       bool required, const at::Tensor& ref) {
  if (!has_value(seed)) {
    PYPEFT_CHECK_VALUE(!required, op, arg, "a 0-dim int64 tensor when dropout_p > 0", "None");
    return;
  }
  PYPEFT_CHECK_TYPE(seed->scalar_type() == at::kLong, op, arg, "an int64 tensor",
                    c10::toString(seed->scalar_type()));
  PYPEFT_CHECK_VALUE(seed->numel() == 1, op, arg, "a tensor with one element",
                     "shape " + shape_str(seed->sizes()));
  PYPEFT_CHECK_VALUE(seed->device().is_cpu() || seed->device() == ref.device(), op, arg,
                     "a tensor on cpu or " + ref.device().str(),
                     "a tensor on " + seed->device().str());
}

// Optional per-row ids (int64, one per row of `x` viewed as [rows, C], on x's
// device): they name the global row whose dropout mask a gathered row keeps.
inline void check_row_ids(const char* op, const c10::optional<at::Tensor>& row_ids,
                          const at::Tensor& x, int64_t rows) {
  if (!has_value(row_ids)) return;
  PYPEFT_CHECK_TYPE(row_ids->scalar_type() == at::kLong, op, "row_ids", "an int64 tensor",
                    c10::toString(row_ids->scalar_type()));
  check_same_device(op, "row_ids", *row_ids, "x", x);
  PYPEFT_CHECK_VALUE(row_ids->numel() == rows, op, "row_ids",
                     "one id per row of x (" + std::to_string(rows) + ")",
                     "shape " + shape_str(row_ids->sizes()));
}

}  // namespace pypeft
