// pypeft::bottleneck_adapter — what the CPU and CUDA kernels share: argument
// validation and the per-element math (activations and their derivatives,
// the epilogue, the masked scaled gradient), written once so that the CPU
// tests check what a GPU computes.
//
//   p   = z W_downᵀ + b_down                       [N, m], returned, saved for backward
//   out = residual + drop(scale · (act(p) W_upᵀ + b_up))
//
// the `adapters` library's Adapter block: its dropout sits on the scaled
// up-projection (the d-wide output) and its scaling multiplies b_up too.
//
// dtypes: z and residual share one dtype (float32, float64, bfloat16; float16
// on CUDA). w_down, b_down, w_up, b_up share one dtype: z's, or float32 when z
// is bfloat16/float16 (fp32 master weights beside low-precision activations):
// the products then run in z's dtype and the weights' gradients come back in
// float32.
#pragma once

#include <ATen/ATen.h>
#include <math.h>

#include <array>
#include <cmath>
#include <string>
#include <type_traits>

#include "pypeft/checks.h"
#include "pypeft/dropout_mask.h"
#include "pypeft/lora_linear.h"  // as_rows, with_last_dim
#include "pypeft/macros.h"

namespace pypeft {

// --- activations -----------------------------------------------------------------

enum class AdapterActivation : int {
  kRelu = 0,
  kSilu,
  kGelu,      // erf
  kGeluTanh,  // tanh approximation
  kTanh,
  kSigmoid,
  kLeakyRelu,  // negative slope 0.01, torch's default
  kIdentity,
};

constexpr const char* kAdapterActivationChoices =
    "one of 'relu', 'silu', 'gelu', 'gelu_tanh', 'tanh', 'sigmoid', 'leaky_relu', 'identity'";

// Parsed in every call (not cached): the string is what the schema carries,
// and a bad one must fail before any work.
inline AdapterActivation parse_adapter_activation(const char* op, c10::string_view name) {
  if (name == "relu") return AdapterActivation::kRelu;
  if (name == "silu") return AdapterActivation::kSilu;
  if (name == "gelu") return AdapterActivation::kGelu;
  if (name == "gelu_tanh") return AdapterActivation::kGeluTanh;
  if (name == "tanh") return AdapterActivation::kTanh;
  if (name == "sigmoid") return AdapterActivation::kSigmoid;
  if (name == "leaky_relu") return AdapterActivation::kLeakyRelu;
  if (name == "identity") return AdapterActivation::kIdentity;
  PYPEFT_CHECK_VALUE(false, op, "activation", kAdapterActivationChoices,
                     "'" + std::string(name) + "'");
  return AdapterActivation::kIdentity;  // unreachable
}

namespace adapter_math {

// float and double overloads that name the C functions, which exist on the
// host and in CUDA device code alike.
PYPEFT_HOST_DEVICE float erf_(float x) { return ::erff(x); }
PYPEFT_HOST_DEVICE double erf_(double x) { return ::erf(x); }
PYPEFT_HOST_DEVICE float exp_(float x) { return ::expf(x); }
PYPEFT_HOST_DEVICE double exp_(double x) { return ::exp(x); }
PYPEFT_HOST_DEVICE float tanh_(float x) { return ::tanhf(x); }
PYPEFT_HOST_DEVICE double tanh_(double x) { return ::tanh(x); }

// The constants of torch's own GELU kernels (aten/src/ATen/native/cpu/Activation.cpp).
template <typename T>
PYPEFT_HOST_DEVICE T sqrt1_2() { return T(0.70710678118654752440); }  // 1/√2
template <typename T>
PYPEFT_HOST_DEVICE T inv_sqrt_2pi() { return T(0.39894228040143267794); }  // 1/√(2π)
template <typename T>
PYPEFT_HOST_DEVICE T sqrt_2_over_pi() { return T(0.79788456080286535588); }  // √(2/π)
template <typename T>
PYPEFT_HOST_DEVICE T gelu_kappa() { return T(0.044715); }
template <typename T>
PYPEFT_HOST_DEVICE T leaky_slope() { return T(0.01); }

PYPEFT_HOST_DEVICE float sigmoid(float x) { return 1.0f / (1.0f + ::expf(-x)); }
PYPEFT_HOST_DEVICE double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }

}  // namespace adapter_math

// act(x), in the math type T (float for bfloat16 / float16).
template <typename T>
PYPEFT_HOST_DEVICE T adapter_activation(AdapterActivation act, T x) {
  using namespace adapter_math;
  switch (act) {
    case AdapterActivation::kRelu: return x > T(0) ? x : T(0);
    case AdapterActivation::kSilu: return x * sigmoid(x);
    case AdapterActivation::kGelu: return T(0.5) * x * (T(1) + erf_(x * sqrt1_2<T>()));
    case AdapterActivation::kGeluTanh: {
      const T inner = sqrt_2_over_pi<T>() * (x + gelu_kappa<T>() * x * x * x);
      return T(0.5) * x * (T(1) + tanh_(inner));
    }
    case AdapterActivation::kTanh: return tanh_(x);
    case AdapterActivation::kSigmoid: return sigmoid(x);
    case AdapterActivation::kLeakyRelu: return x > T(0) ? x : leaky_slope<T>() * x;
    case AdapterActivation::kIdentity: break;
  }
  return x;
}

// d act(x) / dx, the formulas of torch's autograd for each activation (relu
// and leaky_relu: the slope right of 0 only for x > 0, as torch's backward).
template <typename T>
PYPEFT_HOST_DEVICE T adapter_activation_grad(AdapterActivation act, T x) {
  using namespace adapter_math;
  switch (act) {
    case AdapterActivation::kRelu: return x > T(0) ? T(1) : T(0);
    case AdapterActivation::kSilu: {
      const T s = sigmoid(x);
      return s * (T(1) + x * (T(1) - s));
    }
    case AdapterActivation::kGelu: {
      const T cdf = T(0.5) * (T(1) + erf_(x * sqrt1_2<T>()));
      const T pdf = inv_sqrt_2pi<T>() * exp_(T(-0.5) * x * x);
      return cdf + x * pdf;
    }
    case AdapterActivation::kGeluTanh: {
      const T x_sq = x * x;
      const T t = tanh_(sqrt_2_over_pi<T>() * (x + gelu_kappa<T>() * x_sq * x));
      const T left = T(0.5) * x;
      const T right = T(1) + t;
      return T(0.5) * right +
             left * (T(1) - t * t) * sqrt_2_over_pi<T>() * (T(1) + T(3) * gelu_kappa<T>() * x_sq);
    }
    case AdapterActivation::kTanh: {
      const T t = tanh_(x);
      return T(1) - t * t;
    }
    case AdapterActivation::kSigmoid: {
      const T s = sigmoid(x);
      return s * (T(1) - s);
    }
    case AdapterActivation::kLeakyRelu: return x > T(0) ? T(1) : leaky_slope<T>();
    case AdapterActivation::kIdentity: break;
  }
  return T(1);
}

// --- the epilogue and its gradient ------------------------------------------------

// The factor element (row, col) of the up-projection is multiplied by:
// scale / (1 - p) where the mask keeps it, 0 where it drops it (scale alone
// without dropout).
template <typename T>
PYPEFT_HOST_DEVICE T adapter_output_factor(DropoutRowKey key, uint32_t col, uint32_t threshold,
                                           T kept_factor) {
  return dropout_bits(key, col) >= threshold ? kept_factor : T(0);
}

// out = residual + factor · (u + b_up), one element; residual and b_up are 0
// when absent.
template <typename T>
PYPEFT_HOST_DEVICE T adapter_output(T residual, T u, T b_up, T factor) {
  return residual + factor * (u + b_up);
}

// --- argument checks ------------------------------------------------------------------

struct BottleneckDims {
  int64_t rows;           // N, the product of z's leading dims
  int64_t d;              // z's features
  int64_t m;              // bottleneck width
  AdapterActivation act;  // parsed from the `activation` argument
};

// Which gradients the backward op computes (its output_mask).
struct BottleneckGrads {
  bool z, w_down, b_down, w_up, b_up;

  explicit BottleneckGrads(std::array<bool, 5> mask)
      : z(mask[0]), w_down(mask[1]), b_down(mask[2]), w_up(mask[3]), b_up(mask[4]) {}
  // dL/dp, the gradient at the bottleneck, feeds z's and the down projection's.
  bool p() const { return z || w_down || b_down; }
  bool any() const { return p() || w_up || b_up; }
};

// The weights' dtype: z's, or float32 beside bfloat16 / float16 activations.
inline void check_adapter_weight_dtype(const char* op, const char* arg, const at::Tensor& w,
                                       const at::Tensor& z) {
  const bool low_precision = z.scalar_type() == at::kBFloat16 || z.scalar_type() == at::kHalf;
  PYPEFT_CHECK_TYPE(w.scalar_type() == z.scalar_type() ||
                        (low_precision && w.scalar_type() == at::kFloat),
                    op, arg,
                    std::string("dtype ") + c10::toString(z.scalar_type()) + " (the dtype of 'z')" +
                        (low_precision ? " or float32" : ""),
                    c10::toString(w.scalar_type()));
}

// What forward and backward both read: activation, z [..., d], w_down [m, d],
// w_up [d, m], scale, dropout.
inline BottleneckDims check_bottleneck_core(const char* op, const at::Tensor& z,
                                            const at::Tensor& w_down, const at::Tensor& w_up,
                                            double scale, c10::string_view activation,
                                            double dropout_p,
                                            const c10::optional<at::Tensor>& seed) {
  const AdapterActivation act = parse_adapter_activation(op, activation);
  check_defined(op, "z", z);
  PYPEFT_CHECK_VALUE(z.dim() >= 1, op, "z", "a tensor of shape [..., d]", "a 0-D tensor");
  check_activation_dtype(op, "z", z);
  check_dim(op, "w_down", w_down, 2);
  const int64_t m = w_down.size(0), d = w_down.size(1);
  PYPEFT_CHECK_VALUE(m >= 1 && d >= 1, op, "w_down", "shape [m, d], both >= 1",
                     "shape " + shape_str(w_down.sizes()));
  check_size(op, "z", z, z.dim() - 1, d, "d, from w_down [m, d]");
  check_same_device(op, "w_down", w_down, "z", z);
  check_adapter_weight_dtype(op, "w_down", w_down, z);
  check_dim(op, "w_up", w_up, 2);
  check_size(op, "w_up", w_up, 0, d, "d, from w_down [m, d]");
  check_size(op, "w_up", w_up, 1, m, "m, from w_down [m, d]");
  check_same_device(op, "w_up", w_up, "z", z);
  check_same_dtype(op, "w_up", w_up, "w_down", w_down);
  PYPEFT_CHECK_VALUE(std::isfinite(scale), op, "scale", "a finite number", scale);
  check_probability(op, "dropout_p", dropout_p);
  check_seed(op, "seed", seed, dropout_p > 0.0, z);
  // The mask generator counts columns in 32 bits.
  PYPEFT_CHECK_VALUE(d < (int64_t(1) << 31), op, "z", "d < 2^31", d);
  return BottleneckDims{z.numel() / d, d, m, act};
}

inline void check_adapter_bias(const char* op, const char* arg, const c10::optional<at::Tensor>& b,
                               int64_t size, const char* what, const at::Tensor& w_down,
                               const at::Tensor& z) {
  if (!has_value(b)) return;
  check_dim(op, arg, *b, 1);
  check_size(op, arg, *b, 0, size, what);
  check_same_device(op, arg, *b, "z", z);
  check_same_dtype(op, arg, *b, "w_down", w_down);
}

inline BottleneckDims check_bottleneck_adapter_args(
    const char* op, const at::Tensor& z, const c10::optional<at::Tensor>& residual,
    const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
    const c10::optional<at::Tensor>& b_up, double scale, c10::string_view activation,
    double dropout_p, const c10::optional<at::Tensor>& seed) {
  const auto dims = check_bottleneck_core(op, z, w_down, w_up, scale, activation, dropout_p, seed);
  if (has_value(residual)) {
    PYPEFT_CHECK_VALUE(residual->sizes() == z.sizes(), op, "residual",
                       "shape " + shape_str(z.sizes()) + " (the shape of 'z')",
                       "shape " + shape_str(residual->sizes()));
    check_same_device(op, "residual", *residual, "z", z);
    check_same_dtype(op, "residual", *residual, "z", z);
  }
  check_adapter_bias(op, "b_down", b_down, dims.m, "m, from w_down [m, d]", w_down, z);
  check_adapter_bias(op, "b_up", b_up, dims.d, "d, from w_down [m, d]", w_down, z);
  return dims;
}

inline BottleneckDims check_bottleneck_adapter_backward_args(
    const char* op, const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_p,
    const at::Tensor& z, const at::Tensor& p, const at::Tensor& w_down, const at::Tensor& w_up,
    double scale, c10::string_view activation, double dropout_p,
    const c10::optional<at::Tensor>& seed) {
  const auto dims = check_bottleneck_core(op, z, w_down, w_up, scale, activation, dropout_p, seed);
  check_defined(op, "grad_out", grad_out);
  PYPEFT_CHECK_VALUE(grad_out.sizes() == z.sizes(), op, "grad_out",
                     "shape " + shape_str(z.sizes()) + " (the shape of 'z')",
                     "shape " + shape_str(grad_out.sizes()));
  check_same_device(op, "grad_out", grad_out, "z", z);
  check_same_dtype(op, "grad_out", grad_out, "z", z);
  const auto p_shape = with_last_dim(z.sizes(), dims.m);
  check_defined(op, "p", p);
  PYPEFT_CHECK_VALUE(p.sizes() == at::IntArrayRef(p_shape), op, "p", "shape " + shape_str(p_shape),
                     "shape " + shape_str(p.sizes()));
  check_same_device(op, "p", p, "z", z);
  check_same_dtype(op, "p", p, "z", z);
  if (has_value(grad_p)) {
    PYPEFT_CHECK_VALUE(grad_p->sizes() == at::IntArrayRef(p_shape), op, "grad_p",
                       "shape " + shape_str(p_shape), "shape " + shape_str(grad_p->sizes()));
    check_same_device(op, "grad_p", *grad_p, "z", z);
    check_same_dtype(op, "grad_p", *grad_p, "z", z);
  }
  return dims;
}

}  // namespace pypeft

namespace pypeft {

// Calls fn(std::integral_constant<AdapterActivation, act>{}): the activation
// becomes a compile-time constant inside the loops and kernels (host code only).
template <typename Fn>
decltype(auto) with_adapter_activation(AdapterActivation act, Fn&& fn) {
  using A = AdapterActivation;
  switch (act) {
    case A::kRelu: return fn(std::integral_constant<A, A::kRelu>{});
    case A::kSilu: return fn(std::integral_constant<A, A::kSilu>{});
    case A::kGelu: return fn(std::integral_constant<A, A::kGelu>{});
    case A::kGeluTanh: return fn(std::integral_constant<A, A::kGeluTanh>{});
    case A::kTanh: return fn(std::integral_constant<A, A::kTanh>{});
    case A::kSigmoid: return fn(std::integral_constant<A, A::kSigmoid>{});
    case A::kLeakyRelu: return fn(std::integral_constant<A, A::kLeakyRelu>{});
    default: return fn(std::integral_constant<A, A::kIdentity>{});
  }
}

// The weights and biases as the kernels use them: the matrices in z's dtype
// (they are tiny; the products run in z's dtype), b_up in the math type
// (the epilogue adds it in float for bfloat16 / float16), zeros when absent
// so that the epilogue has no branch.
struct BottleneckOperands {
  at::Tensor w_down;  // [m, d]
  at::Tensor b_down;  // [m] or undefined
  at::Tensor w_up;    // [d, m]
  at::Tensor b_up;    // [d], math type
};

inline at::ScalarType adapter_math_type(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf ? at::kFloat : t;
}

inline BottleneckOperands bottleneck_operands(const at::Tensor& z, const at::Tensor& w_down,
                                              const c10::optional<at::Tensor>& b_down,
                                              const at::Tensor& w_up,
                                              const c10::optional<at::Tensor>& b_up) {
  const auto dtype = z.scalar_type();
  const auto math = adapter_math_type(dtype);
  return {w_down.to(dtype).contiguous(),
          has_value(b_down) ? b_down->to(dtype) : at::Tensor(),
          w_up.to(dtype).contiguous(),
          has_value(b_up) ? b_up->to(math).contiguous()
                          : at::zeros({w_up.size(0)}, z.options().dtype(math))};
}

}  // namespace pypeft
