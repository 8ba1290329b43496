// Elementwise activations of the bottleneck adapters (the `adapters`
// library's non_linearity), written once for the CPU and CUDA kernels:
// forward value and derivative as PYPEFT_HOST_DEVICE functions of the
// pre-activation, so the CPU tests check what a GPU computes.
//
//   relu, silu, gelu (erf), gelu_tanh, tanh, sigmoid, leaky_relu (slope 0.01,
//   torch's default), identity
//
// Derivatives at the kinks follow torch's backward formulas: relu' (0) = 0,
// leaky_relu' (0) = 0.01.
#pragma once

#include <cmath>
#include <string>

#include <c10/util/string_view.h>

#include "pypeft/checks.h"
#include "pypeft/macros.h"

namespace pypeft {

enum class Activation { kRelu, kSilu, kGelu, kGeluTanh, kTanh, kSigmoid, kLeakyRelu, kIdentity };

constexpr const char* kActivationNames =
    "one of 'relu', 'silu', 'gelu', 'gelu_tanh', 'tanh', 'sigmoid', 'leaky_relu', 'identity'";

inline Activation parse_activation(const char* op, const char* arg, c10::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "tanh") return Activation::kTanh;
  if (name == "sigmoid") return Activation::kSigmoid;
  if (name == "leaky_relu") return Activation::kLeakyRelu;
  if (name == "identity") return Activation::kIdentity;
  PYPEFT_CHECK_VALUE(false, op, arg, kActivationNames, "'" + std::string(name) + "'");
  return Activation::kIdentity;  // unreachable
}

// libm by name per precision: callable from host and device code alike.
PYPEFT_HOST_DEVICE float act_exp(float x) { return expf(x); }
PYPEFT_HOST_DEVICE double act_exp(double x) { return exp(x); }
PYPEFT_HOST_DEVICE float act_erf(float x) { return erff(x); }
PYPEFT_HOST_DEVICE double act_erf(double x) { return erf(x); }
PYPEFT_HOST_DEVICE float act_tanh(float x) { return tanhf(x); }
PYPEFT_HOST_DEVICE double act_tanh(double x) { return tanh(x); }

template <typename T>
PYPEFT_HOST_DEVICE T act_sigmoid(T x) {
  return T(1) / (T(1) + act_exp(-x));
}

constexpr double kLeakyReluSlope = 0.01;
constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kGeluTanhCubic = 0.044715;

// act(h) and act'(h) together (the backward needs both; most share terms).
template <typename T>
struct ActivationValue {
  T value;
  T derivative;
};

template <typename T>
PYPEFT_HOST_DEVICE ActivationValue<T> activation_and_derivative(Activation a, T h) {
  switch (a) {
    case Activation::kRelu:
      return {h > T(0) ? h : T(0), h > T(0) ? T(1) : T(0)};
    case Activation::kLeakyRelu:
      return {h > T(0) ? h : h * T(kLeakyReluSlope), h > T(0) ? T(1) : T(kLeakyReluSlope)};
    case Activation::kSilu: {
      const T s = act_sigmoid(h);
      return {h * s, s * (T(1) + h * (T(1) - s))};
    }
    case Activation::kGelu: {
      const T cdf = T(0.5) * (T(1) + act_erf(h * T(kInvSqrt2)));
      return {h * cdf, cdf + h * T(kInvSqrt2Pi) * act_exp(T(-0.5) * h * h)};
    }
    case Activation::kGeluTanh: {
      const T inner = T(kSqrt2OverPi) * (h + T(kGeluTanhCubic) * h * h * h);
      const T t = act_tanh(inner);
      const T dinner = T(kSqrt2OverPi) * (T(1) + T(3 * kGeluTanhCubic) * h * h);
      return {T(0.5) * h * (T(1) + t), T(0.5) * (T(1) + t) + T(0.5) * h * (T(1) - t * t) * dinner};
    }
    case Activation::kTanh: {
      const T t = act_tanh(h);
      return {t, T(1) - t * t};
    }
    case Activation::kSigmoid: {
      const T s = act_sigmoid(h);
      return {s, s * (T(1) - s)};
    }
    case Activation::kIdentity:
    default:
      return {h, T(1)};
  }
}

template <typename T>
PYPEFT_HOST_DEVICE T activation(Activation a, T h) {
  switch (a) {
    case Activation::kRelu: return h > T(0) ? h : T(0);
    case Activation::kLeakyRelu: return h > T(0) ? h : h * T(kLeakyReluSlope);
    case Activation::kIdentity: return h;
    default: return activation_and_derivative(a, h).value;
  }
}

}  // namespace pypeft
