// A frozen linear layer whose weight is stored in NF4: the products every op
// over such a base needs (pypeft::nf4_linear itself, and the adapter ops that
// accept an NF4 base), computed tile by tile of the weight's rows.
//
// A tile of T rows is dequantised into a scratch [T, in] in the activations'
// dtype and multiplied out at once (one GEMM per tile); the full-precision
// weight never exists, in forward or backward, and nothing of it is saved.
// Tiles start on quantisation-block boundaries, so each tile's absmax is a
// slice of the weight's and the dequantisation is pypeft::nf4_dequantize's
// (CPU or CUDA, through the dispatcher).
#pragma once

#include <ATen/ATen.h>

#include "pypeft/checks.h"

namespace pypeft {

// An NF4 weight: codes [out, in / 2] (uint8, two per byte, row-major order,
// first element in the high nibble), absmax float32 [ceil(out * in / blocksize)].
struct Nf4Weight {
  at::Tensor codes;
  at::Tensor absmax;
  int64_t blocksize;
  int64_t out;
  int64_t in;
};

// The names an NF4 weight's three arguments have in messages: nf4_linear's,
// or those of the adapter ops over an NF4 base (weight, weight_absmax,
// weight_blocksize, beside their own arguments).
struct Nf4ArgNames {
  const char* codes;
  const char* absmax;
  const char* blocksize;
};
constexpr Nf4ArgNames kNf4BaseArgs{"weight", "weight_absmax", "weight_blocksize"};

// Validates an NF4 weight against activations x [..., in] (device, sizes) and
// returns it with its dims; `names` and `x_arg` name the arguments in messages.
Nf4Weight check_nf4_weight(const char* op, const Nf4ArgNames& names, const at::Tensor& codes,
                           const at::Tensor& absmax, int64_t blocksize, const at::Tensor& x,
                           const char* x_arg = "x");

// The same, the absmax and block size named "absmax" and "blocksize".
inline Nf4Weight check_nf4_weight(const char* op, const char* codes_arg, const at::Tensor& codes,
                                  const at::Tensor& absmax, int64_t blocksize,
                                  const at::Tensor& x, const char* x_arg = "x") {
  return check_nf4_weight(op, Nf4ArgNames{codes_arg, "absmax", "blocksize"}, codes, absmax,
                          blocksize, x, x_arg);
}

// x2 [N, in] · deq(W)ᵀ + bias -> [N, out], in x2's dtype.
at::Tensor nf4_matmul_wt(const at::Tensor& x2, const Nf4Weight& w,
                         const c10::optional<at::Tensor>& bias);

// grad_x2 [N, in] (+)= gy2 [N, out] · deq(W); with accumulate=false grad_x2's
// contents are overwritten. Low-precision dtypes sum the tiles in float32.
void nf4_matmul_w(at::Tensor& grad_x2, const at::Tensor& gy2, const Nf4Weight& w, bool accumulate);

}  // namespace pypeft
