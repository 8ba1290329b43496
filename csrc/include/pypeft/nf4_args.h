// Argument checks of the NF4 and 8-bit blockwise (de)quantisation ops, shared by
// the CPU and CUDA kernels (the fake kernels in pypeft/ops/nf4.py mirror them).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "pypeft/checks.h"

namespace pypeft {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// NF4 blocks hold an even number of values, so a block never splits a byte.
// arg: the argument's name (ops over an NF4 base weight call it weight_blocksize).
inline void check_nf4_blocksize(const char* op, int64_t blocksize, const char* arg = "blocksize") {
  PYPEFT_CHECK_VALUE(blocksize >= 2 && blocksize % 2 == 0, op, arg,
                     "an even block size >= 2 (bitsandbytes uses 32 ... 4096; QLoRA 64)", blocksize);
}

inline void check_blocksize_8bit(const char* op, int64_t blocksize) {
  PYPEFT_CHECK_VALUE(blocksize >= 1, op, "blocksize", "a block size >= 1 (double quantisation uses 256)",
                     blocksize);
}

// Values to quantise: any shape; float16 too on the CPU (checkpoints come in it).
inline void check_quantize_input(const char* op, const char* arg, const at::Tensor& t) {
  check_defined(op, arg, t);
  check_dtype_in(op, arg, t, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
}

// arg: the argument's name (ops over an NF4 base weight call it weight_absmax).
inline void check_absmax(const char* op, const at::Tensor& absmax, int64_t blocks,
                         const char* ref_arg, const at::Tensor& ref, const char* arg = "absmax") {
  check_defined(op, arg, absmax);
  PYPEFT_CHECK_TYPE(absmax.scalar_type() == at::kFloat, op, arg, "a float32 tensor",
                    c10::toString(absmax.scalar_type()));
  PYPEFT_CHECK_VALUE(absmax.numel() == blocks, op, arg,
                     std::to_string(blocks) + " values (one per block)",
                     "shape " + shape_str(absmax.sizes()));
  check_same_device(op, arg, absmax, ref_arg, ref);
}

inline void check_codes(const char* op, const char* arg, const at::Tensor& codes, int64_t count,
                        const char* what) {
  check_defined(op, arg, codes);
  PYPEFT_CHECK_TYPE(codes.scalar_type() == at::kByte, op, arg, "a uint8 tensor",
                    c10::toString(codes.scalar_type()));
  PYPEFT_CHECK_VALUE(codes.numel() == count, op, arg, std::to_string(count) + " bytes (" + what + ")",
                     "shape " + shape_str(codes.sizes()));
}

inline void check_output_dtype(const char* op, at::ScalarType dtype) {
  PYPEFT_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                        dtype == at::kHalf,
                    op, "dtype", "one of float32, float64, bfloat16, float16", c10::toString(dtype));
}

// nf4_dequantize(codes, absmax, blocksize, shape, dtype): returns numel of shape.
inline int64_t check_nf4_dequantize_args(const char* op, const at::Tensor& codes,
                                         const at::Tensor& absmax, int64_t blocksize,
                                         at::IntArrayRef shape, at::ScalarType dtype) {
  check_nf4_blocksize(op, blocksize);
  int64_t n = 1;
  for (auto s : shape) {
    PYPEFT_CHECK_VALUE(s >= 0, op, "shape", "non-negative sizes", shape_str(shape));
    n *= s;
  }
  check_codes(op, "codes", codes, ceil_div(n, 2), "two 4-bit codes per byte of the shape's values");
  check_absmax(op, absmax, ceil_div(n, blocksize), "codes", codes);
  check_output_dtype(op, dtype);
  return n;
}

// The 8-bit code: 256 sorted float32 values in [-1, 1] (bitsandbytes' dynamic map).
inline void check_code_map(const char* op, const at::Tensor& code, const char* ref_arg,
                           const at::Tensor& ref) {
  check_defined(op, "code", code);
  PYPEFT_CHECK_TYPE(code.scalar_type() == at::kFloat, op, "code", "a float32 tensor",
                    c10::toString(code.scalar_type()));
  PYPEFT_CHECK_VALUE(code.numel() == 256, op, "code", "256 values (an 8-bit code map)",
                     "shape " + shape_str(code.sizes()));
  check_same_device(op, "code", code, ref_arg, ref);
}

// quantize_blockwise_8bit(x, code, blocksize), nf4_quantize(w, blocksize) and
// dequantize_blockwise_8bit(codes, absmax, code, blocksize): every backend's checks.
inline void check_quantize_8bit_args(const char* op, const at::Tensor& x, const at::Tensor& code,
                                     int64_t blocksize) {
  check_quantize_input(op, "x", x);
  check_code_map(op, code, "x", x);
  check_blocksize_8bit(op, blocksize);
}

inline void check_nf4_quantize_args(const char* op, const at::Tensor& w, int64_t blocksize) {
  check_quantize_input(op, "w", w);
  check_nf4_blocksize(op, blocksize);
}

inline void check_dequantize_8bit_args(const char* op, const at::Tensor& codes,
                                       const at::Tensor& absmax, const at::Tensor& code,
                                       int64_t blocksize) {
  check_codes(op, "codes", codes, codes.numel(), "8-bit codes");
  check_blocksize_8bit(op, blocksize);
  check_absmax(op, absmax, ceil_div(codes.numel(), blocksize), "codes", codes);
  check_code_map(op, code, "codes", codes);
}

}  // namespace pypeft
