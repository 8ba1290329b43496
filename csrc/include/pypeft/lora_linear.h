// pypeft::lora_linear — what the CPU and CUDA kernels share: argument
// validation and shape helpers. The math lives in cpu/ and cuda/.
//
//   y = x Wᵀ + b + scale · (drop(x) Aᵀ) Bᵀ,   u = drop(x) Aᵀ  (returned, saved for backward)
//
// dtypes: x, weight, bias share one dtype (float32, float64, bfloat16; float16
// on CUDA). lora_a and lora_b share one dtype: x's, or float32 when x is
// bfloat16/float16 (fp32 master adapter weights beside low-precision
// activations). The adapter products then run in x's dtype (GEMMs accumulate
// in fp32) and the adapter gradients come back in the adapter's dtype.
//
// The frozen weight may be stored in NF4 (QLoRA): weight_absmax given, weight
// holds uint8 codes [out, in / 2] (pypeft/nf4_linear.h). Every frozen product
// (x Wᵀ, grad_out W) then runs tile by tile of W's rows, dequantised into x's
// dtype; W in full precision never exists, and its gradient is refused.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "pypeft/checks.h"
#include "pypeft/nf4_linear.h"

namespace pypeft {

struct LoraLinearDims {
  int64_t rows;  // product of x's leading dims
  int64_t in;
  int64_t out;
  int64_t r;
};

inline std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> s(sizes.begin(), sizes.end());
  s.back() = last;
  return s;
}

// The adapter matrices' names in messages: lora_linear's own, or the shared
// matrices' when vera_linear checks its slices of them.
struct AdapterArgNames {
  const char* a;
  const char* b;
};
constexpr AdapterArgNames kLoraArgs{"lora_a", "lora_b"};
constexpr AdapterArgNames kVeraArgs{"vera_a", "vera_b"};

inline void check_lora_adapter_dtype(const char* op, const at::Tensor& x,
                                     const at::Tensor& lora_a, const at::Tensor& lora_b,
                                     const AdapterArgNames& names = kLoraArgs) {
  const bool low_precision_x = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  PYPEFT_CHECK_TYPE(lora_a.scalar_type() == x.scalar_type() ||
                        (low_precision_x && lora_a.scalar_type() == at::kFloat),
                    op, names.a,
                    std::string("dtype ") + c10::toString(x.scalar_type()) + " (the dtype of 'x')" +
                        (low_precision_x ? " or float32" : ""),
                    c10::toString(lora_a.scalar_type()));
  check_same_dtype(op, names.b, lora_b, names.a, lora_a);
}

// How the frozen weight is stored: dense ([out, in] in x's dtype), or NF4 when
// absmax is given (the ops' trailing arguments weight_absmax, weight_blocksize).
struct BaseWeight {
  c10::optional<at::Tensor> absmax;
  int64_t blocksize = 64;

  bool nf4() const { return has_value(absmax); }
};

// in_features of a weight [out, in] or of NF4 codes [out, in / 2].
inline int64_t weight_in_features(const at::Tensor& weight, const BaseWeight& base) {
  return base.nf4() ? weight.size(1) * 2 : weight.size(1);
}

// The NF4 operand of nf4_matmul_wt / nf4_matmul_w (arguments already checked).
inline Nf4Weight nf4_operand(const at::Tensor& weight, const BaseWeight& base) {
  return {weight, *base.absmax, base.blocksize, weight.size(0), weight.size(1) * 2};
}

// The frozen weight's dtype: x's, or (NF4) uint8 codes beside weight_absmax.
inline void check_dense_weight_dtype(const char* op, const at::Tensor& weight, const at::Tensor& x,
                                     const char* x_arg = "x") {
  PYPEFT_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, "weight",
                    std::string("dtype ") + c10::toString(x.scalar_type()) + " (the dtype of '" +
                        x_arg + "')" +
                        (weight.scalar_type() == at::kByte
                             ? "; uint8 NF4 codes need weight_absmax (and weight_blocksize)"
                             : ""),
                    c10::toString(weight.scalar_type()));
}

// With weight_absmax given, weight must hold NF4 codes before in_features is
// read off it (twice its bytes per row).
inline void check_weight_form(const char* op, const at::Tensor& weight, const BaseWeight& base) {
  if (base.nf4())
    PYPEFT_CHECK_TYPE(weight.scalar_type() == at::kByte, op, "weight",
                      "uint8 NF4 codes [out, in / 2]", c10::toString(weight.scalar_type()));
}

// The frozen layer's part, x [..., in] · weight [out, in]ᵀ + bias [out]: what
// every linear op checks, with an adapter or without (token_subset_linear).
// Returns in_features (twice the bytes per row of NF4 codes).
inline int64_t check_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias,
                                 const BaseWeight& base = {}) {
  check_defined(op, "x", x);
  PYPEFT_CHECK_VALUE(x.dim() >= 1, op, "x", "a tensor of shape [..., in_features]",
                     "a 0-D tensor");
  check_activation_dtype(op, "x", x);
  check_dim(op, "weight", weight, 2);
  check_weight_form(op, weight, base);
  const int64_t in = weight_in_features(weight, base), out = weight.size(0);
  PYPEFT_CHECK_VALUE(in >= 1 && out >= 1, op, "weight",
                     base.nf4() ? "NF4 codes [out_features, in_features / 2], both >= 1"
                                : "shape [out_features, in_features], both >= 1",
                     "shape " + shape_str(weight.sizes()));
  if (base.nf4()) {
    check_nf4_weight(op, kNf4BaseArgs, weight, *base.absmax, base.blocksize, x);
  } else {
    // uint8 codes without their absmax: say so before their width misleads.
    if (weight.scalar_type() == at::kByte) check_dense_weight_dtype(op, weight, x);
    check_size(op, "x", x, x.dim() - 1, in, "in_features, from weight [out, in]");
    check_same_device(op, "weight", weight, "x", x);
    check_dense_weight_dtype(op, weight, x);
  }
  if (has_value(bias)) {
    check_dim(op, "bias", *bias, 1);
    check_size(op, "bias", *bias, 0, out, "out_features, from weight [out, in]");
    check_same_device(op, "bias", *bias, "x", x);
    check_same_dtype(op, "bias", *bias, "x", x);
  }
  return in;
}

// A backward op over an NF4 weight computes no gradient for it: it is frozen.
inline void check_no_nf4_weight_grad(const char* op, const BaseWeight& base, bool need_weight) {
  PYPEFT_CHECK_VALUE(!(base.nf4() && need_weight), op, "output_mask",
                     "no gradient asked for weight (output_mask[1] false): an NF4 weight is "
                     "frozen",
                     "output_mask[1] true with weight_absmax given");
}

// x2 [N, in] · Wᵀ + bias -> [N, out]. Dense: exactly as nn.Linear computes it,
// so that a fresh adapter (B = 0) gives the base layer's output bit for bit.
// NF4: tile by tile of W's rows (no full-precision W).
inline at::Tensor frozen_product(const at::Tensor& x2, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, const BaseWeight& base) {
  if (base.nf4()) return nf4_matmul_wt(x2, nf4_operand(weight, base), bias);
  return has_value(bias) ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
}

// grad_x2 [N, in] += gy2 [N, out] · W (the frozen path of grad_x).
inline void add_frozen_grad(at::Tensor& grad_x2, const at::Tensor& gy2, const at::Tensor& weight,
                            const BaseWeight& base) {
  if (base.nf4())
    nf4_matmul_w(grad_x2, gy2, nf4_operand(weight, base), /*accumulate=*/true);
  else
    grad_x2.addmm_(gy2, weight);
}

inline LoraLinearDims check_lora_linear_args(const char* op, const at::Tensor& x,
                                             const at::Tensor& weight,
                                             const c10::optional<at::Tensor>& bias,
                                             const at::Tensor& lora_a, const at::Tensor& lora_b,
                                             double scale, double dropout_p,
                                             const c10::optional<at::Tensor>& seed,
                                             const AdapterArgNames& names = kLoraArgs,
                                             const BaseWeight& base = {}) {
  const int64_t in = check_linear_args(op, x, weight, bias, base), out = weight.size(0);
  check_dim(op, names.a, lora_a, 2);
  const int64_t r = lora_a.size(0);
  PYPEFT_CHECK_VALUE(r >= 1, op, names.a, "shape [r, in_features] with rank r >= 1",
                     "shape " + shape_str(lora_a.sizes()));
  check_size(op, names.a, lora_a, 1, in, "in_features, from weight [out, in]");
  check_dim(op, names.b, lora_b, 2);
  check_size(op, names.b, lora_b, 0, out, "out_features, from weight [out, in]");
  check_size(op, names.b, lora_b, 1, r, (std::string("rank r, from ") + names.a + " [r, in]").c_str());
  check_same_device(op, names.a, lora_a, "x", x);
  check_same_device(op, names.b, lora_b, "x", x);
  check_lora_adapter_dtype(op, x, lora_a, lora_b, names);
  PYPEFT_CHECK_VALUE(std::isfinite(scale), op, "scale", "a finite number", scale);
  check_probability(op, "dropout_p", dropout_p);
  check_seed(op, "seed", seed, dropout_p > 0.0, x);
  // The mask generator counts columns in 32 bits.
  PYPEFT_CHECK_VALUE(in < (int64_t(1) << 31), op, "x", "in_features < 2^31", in);
  return LoraLinearDims{x.numel() / std::max<int64_t>(in, 1), in, out, r};
}

inline LoraLinearDims check_lora_linear_backward_args(
    const char* op, const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_u,
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& u, double scale, double dropout_p,
    const c10::optional<at::Tensor>& seed, const c10::optional<at::Tensor>& row_ids,
    const AdapterArgNames& names = kLoraArgs, const BaseWeight& base = {}) {
  const auto dims = check_lora_linear_args(op, x, weight, c10::nullopt, lora_a, lora_b, scale,
                                           dropout_p, seed, names, base);
  check_row_ids(op, row_ids, x, dims.rows);
  check_defined(op, "grad_out", grad_out);
  const auto y_shape = with_last_dim(x.sizes(), dims.out);
  const auto u_shape = with_last_dim(x.sizes(), dims.r);
  PYPEFT_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(y_shape), op, "grad_out",
                     "shape " + shape_str(y_shape), "shape " + shape_str(grad_out.sizes()));
  check_same_device(op, "grad_out", grad_out, "x", x);
  check_same_dtype(op, "grad_out", grad_out, "x", x);
  check_defined(op, "u", u);
  PYPEFT_CHECK_VALUE(u.sizes() == at::IntArrayRef(u_shape), op, "u", "shape " + shape_str(u_shape),
                     "shape " + shape_str(u.sizes()));
  check_same_device(op, "u", u, "x", x);
  check_same_dtype(op, "u", u, "x", x);
  if (has_value(grad_u)) {
    PYPEFT_CHECK_VALUE(grad_u->sizes() == at::IntArrayRef(u_shape), op, "grad_u",
                       "shape " + shape_str(u_shape), "shape " + shape_str(grad_u->sizes()));
    check_same_device(op, "grad_u", *grad_u, "x", x);
    check_same_dtype(op, "grad_u", *grad_u, "x", x);
  }
  return dims;
}

// Row-major [rows, cols] view of a [..., cols] tensor whose rows the kernels
// can walk with one stride: a free view when possible, a copy otherwise.
inline at::Tensor as_rows(const at::Tensor& t, int64_t cols) {
  at::Tensor m = t.reshape({-1, cols});
  if (m.size(0) > 0 && cols > 0 && m.stride(1) != 1) m = m.contiguous();
  return m;
}

// The adapter matrices in x's dtype (they are tiny), the scale folded into B.
struct LoraAdapterOperands {
  at::Tensor a;         // [r, in]
  at::Tensor b_scaled;  // [out, r]
};

inline LoraAdapterOperands lora_adapter_operands(const at::Tensor& lora_a,
                                                 const at::Tensor& lora_b, double scale,
                                                 at::ScalarType dtype) {
  return {lora_a.to(dtype).contiguous(), lora_b.mul(scale).to(dtype).contiguous()};
}

}  // namespace pypeft
