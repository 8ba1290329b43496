// Typed dispatcher handles of pypeft's ops, for ops built on top of them
// (vera_linear, the token-subset ops). Calling through the
// dispatcher, not a kernel function, keeps those ops backend-generic: the
// call lands on the CPU or CUDA kernel of the arguments' device.
//
// Each signature spells out the op's schema in csrc/ops.cpp; a mismatch
// throws on first use.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <tuple>

namespace pypeft::ops {

using OptTensor = c10::optional<at::Tensor>;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using FiveTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, weight_absmax,
//  weight_blocksize) -> (y, u)
inline const auto& lora_linear() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pypeft::lora_linear", "")
          .typed<TensorPair(const at::Tensor&, const at::Tensor&, const OptTensor&,
                            const at::Tensor&, const at::Tensor&, double, double,
                            const OptTensor&, const OptTensor&, int64_t)>();
  return op;
}

// (grad_out, grad_u, x, weight, lora_a, lora_b, u, scale, dropout_p, seed,
//  output_mask, row_ids, weight_absmax, weight_blocksize) -> (grad_x, grad_weight,
//  grad_bias, grad_lora_a, grad_lora_b)
inline const auto& lora_linear_backward() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pypeft::lora_linear_backward", "")
          .typed<FiveTensors(const at::Tensor&, const OptTensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, double, double, const OptTensor&,
                             std::array<bool, 5>, const OptTensor&, const OptTensor&, int64_t)>();
  return op;
}

// (x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, dropout_p, seed,
//  weight_absmax, weight_blocksize) -> (y, u)
inline const auto& vera_linear() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pypeft::vera_linear", "")
          .typed<TensorPair(const at::Tensor&, const at::Tensor&, const OptTensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double, const OptTensor&, const OptTensor&,
                            int64_t)>();
  return op;
}

// (grad_out, grad_u, x, weight, vera_a, vera_b, lambda_d, lambda_b, u, dropout_p,
//  seed, output_mask, row_ids, weight_absmax, weight_blocksize) -> (grad_x, grad_weight,
//  grad_bias, grad_lambda_d, grad_lambda_b)
inline const auto& vera_linear_backward() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pypeft::vera_linear_backward", "")
          .typed<FiveTensors(const at::Tensor&, const OptTensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                             const OptTensor&, std::array<bool, 5>, const OptTensor&,
                             const OptTensor&, int64_t)>();
  return op;
}

// drop(x) with counter_dropout's mask (row ids optional).
inline const auto& counter_dropout() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pypeft::counter_dropout", "")
                             .typed<at::Tensor(const at::Tensor&, double, const OptTensor&,
                                               const OptTensor&)>();
  return op;
}

// (codes, absmax, blocksize, shape, dtype) -> values of `shape` (NF4 dequantisation).
inline const auto& nf4_dequantize() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pypeft::nf4_dequantize", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                               c10::SymIntArrayRef, at::ScalarType)>();
  return op;
}

}  // namespace pypeft::ops
