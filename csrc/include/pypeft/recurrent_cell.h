// The per-element math of pypeft's recurrent cells (tanh RNN, GRU, LSTM, as
// torch.nn.RNNCell / GRUCell / LSTMCell), forward and backward, written once
// for the CPU loop (csrc/cpu/recurrent_gates.cpp) and the CUDA kernel
// (csrc/cuda/recurrent_gates.cu), so the CPU tests check what a GPU computes.
//
// Layout: one row of pre-activations holds G·H values, gate k of hidden unit j
// at k·H + j (torch's gate order: GRU r, z, n; LSTM i, f, g, o):
//   gi = x W_ihᵀ + b_ih,  gh = h W_hhᵀ + b_hh.
// A *_unit function handles hidden unit j of one row: every pointer points at
// that row (G·H values for gi, gh, dgi, dgh; H for h, c and their grads). The
// units of a row are independent, so any split of (row, unit) pairs over
// threads gives the same result.
//
// acc_t is the math type (float for bfloat16 / float16, else the scalar type);
// values are read and written in scalar_t.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "pypeft/macros.h"

// PYPEFT_HOST_DEVICE, and on the CPU always inlined: the row loops vectorise
// only with every call inlined, which GCC's heuristics decline for the larger
// cells.
#if defined(__CUDACC__) || defined(__HIPCC__) || !defined(__GNUC__)
#define PYPEFT_CELL_MATH PYPEFT_HOST_DEVICE
#else
#define PYPEFT_CELL_MATH inline __attribute__((always_inline))
#endif

namespace pypeft {

enum class RecurrentCell : int { kRnn = 0, kGru = 1, kLstm = 2 };

// G: gate blocks in the weights' rows (w_ih, w_hh are [G·H, ...]).
PYPEFT_HOST_DEVICE constexpr int64_t gate_count(RecurrentCell cell) {
  return cell == RecurrentCell::kRnn ? 1 : cell == RecurrentCell::kGru ? 3 : 4;
}

// Calls fn(std::integral_constant<RecurrentCell, cell>{}): the cell becomes a
// compile-time constant inside the loops and kernels (host code only).
template <typename Fn>
decltype(auto) with_cell(RecurrentCell cell, Fn&& fn) {
  switch (cell) {
    case RecurrentCell::kRnn:
      return fn(std::integral_constant<RecurrentCell, RecurrentCell::kRnn>{});
    case RecurrentCell::kGru:
      return fn(std::integral_constant<RecurrentCell, RecurrentCell::kGru>{});
    default:
      return fn(std::integral_constant<RecurrentCell, RecurrentCell::kLstm>{});
  }
}

namespace recurrent_math {

PYPEFT_CELL_MATH float float_from_bits(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

PYPEFT_CELL_MATH int32_t bits_of_float(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
#endif
}

// cond ? a : b on the bits: mask is all ones (cond) or 0. Written so, not as
// a ?: on floats, which GCC turns into a branch (see below).
PYPEFT_CELL_MATH float select_bits(int32_t mask, float a, float b) {
  return float_from_bits((bits_of_float(a) & mask) | (bits_of_float(b) & ~mask));
}

PYPEFT_CELL_MATH int32_t mask_of(bool cond) { return -static_cast<int32_t>(cond); }

// float σ and tanh without calls or floating-point branches, so that the CPU
// loops over hidden units vectorise (with libm's scalar expf / tanhf the gate
// kernel cost several times its GEMMs); the GPU runs the same code. Within
// 2.5 ulp of the true values over [-100, 100] (Cephes' expf and tanhf
// polynomials); NaN stays NaN, ±inf saturates.
//
// e^y for y <= 0: y = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-6
// polynomial, 2^n through the exponent bits. |y| is clamped to 87 (n >= -126:
// no denormal scale) on the float's bits. Every choice in these functions is
// made on bits with masks: GCC turns a ?: or a compare of floats into a
// branch around floating-point work (-ftrapping-math), and a loop with a
// branch does not vectorise. Only non-positive arguments are needed: σ and
// tanh are written with e^-|x|, which never overflows.
PYPEFT_CELL_MATH float exp_nonpositive(float y) {
  constexpr int32_t kBits87 = 0x42AE0000;     // 87.0f
  constexpr int32_t kBitsInf = 0x7F800000;    // above: NaN, kept
  constexpr int32_t kBitsMagic = 0x4B400000;  // 1.5 · 2^23
  int32_t m = bits_of_float(y) & 0x7FFFFFFF;
  const int32_t clamp = mask_of((m > kBits87) & (m <= kBitsInf));
  m = (kBits87 & clamp) | (m & ~clamp);
  const float x = -float_from_bits(m);
  // Rounded to an integer by adding 1.5 · 2^23, whose low mantissa bits then hold n.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const int32_t n_bits = bits_of_float(shifted) - kBitsMagic;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  const float p =
      (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
         4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * (r * r) + r + 1.0f;
  return p * float_from_bits(static_cast<int32_t>(static_cast<uint32_t>(n_bits + 127) << 23));
}

// σ(x) = 1 / (1 + e^-|x|) at x >= 0, e^-|x| / (1 + e^-|x|) below (no
// cancellation for either sign).
PYPEFT_CELL_MATH float sigmoid(float x) {
  const float e = exp_nonpositive(-::fabsf(x));
  const float s = 1.0f / (1.0f + e);
  return s * select_bits(mask_of(bits_of_float(x) < 0), e, 1.0f);  // sign bit set: x < 0
}

// tanh: an odd polynomial below |x| = 0.625, (1 - e^-2|x|) / (1 + e^-2|x|)
// with x's sign above; both computed, one picked.
PYPEFT_CELL_MATH float tanh_(float x) {
  const float a = ::fabsf(x);
  const float s = x * x;
  const float small = ((((-5.70498872745e-3f * s + 2.06390887954e-2f) * s - 5.37397155531e-2f) * s +
                        1.33314422036e-1f) * s - 3.33332819422e-1f) * s * x + x;
  const float e = exp_nonpositive(-2.0f * a);
  const float big = ::copysignf((1.0f - e) / (1.0f + e), x);
  constexpr int32_t kBits0625 = 0x3F200000;  // 0.625f
  return select_bits(mask_of(bits_of_float(a) < kBits0625), small, big);
}

PYPEFT_CELL_MATH double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }
PYPEFT_CELL_MATH double tanh_(double x) { return ::tanh(x); }

template <typename acc_t, typename scalar_t>
PYPEFT_CELL_MATH acc_t ld(const scalar_t* p, int64_t i) {
  return static_cast<acc_t>(p[i]);
}

// Gate k's pre-activation of unit j: gi + gh.
template <typename acc_t, typename scalar_t>
PYPEFT_CELL_MATH acc_t pre(const scalar_t* gi, const scalar_t* gh, int64_t k, int64_t H,
                             int64_t j) {
  return ld<acc_t>(gi, k * H + j) + ld<acc_t>(gh, k * H + j);
}

template <typename acc_t>
struct LstmGates {
  acc_t i, f, g, o;
};

template <typename acc_t, typename scalar_t>
PYPEFT_CELL_MATH LstmGates<acc_t> lstm_gates(const scalar_t* gi, const scalar_t* gh, int64_t H,
                                               int64_t j) {
  return {sigmoid(pre<acc_t>(gi, gh, 0, H, j)), sigmoid(pre<acc_t>(gi, gh, 1, H, j)),
          tanh_(pre<acc_t>(gi, gh, 2, H, j)), sigmoid(pre<acc_t>(gi, gh, 3, H, j))};
}

}  // namespace recurrent_math

// One step forward for unit j:
//   rnn:  h' = tanh(gi + gh)
//   gru:  r = σ(gi_r + gh_r), z = σ(gi_z + gh_z), n = tanh(gi_n + r ⊙ gh_n),
//         h' = n + z ⊙ (h - n)                       (= (1 - z) ⊙ n + z ⊙ h)
//   lstm: i, f, o = σ(·), g = tanh(·); c' = f ⊙ c + i ⊙ g, h' = o ⊙ tanh(c')
// h_prev: read by gru only; c: lstm only, c_prev in, c' out (in place).
template <RecurrentCell C, typename acc_t, typename scalar_t>
PYPEFT_CELL_MATH void step_forward_unit(const scalar_t* gi, const scalar_t* gh,
                                          const scalar_t* h_prev, scalar_t* c, scalar_t* h_out,
                                          int64_t H, int64_t j) {
  using namespace recurrent_math;
  if constexpr (C == RecurrentCell::kRnn) {
    h_out[j] = static_cast<scalar_t>(tanh_(pre<acc_t>(gi, gh, 0, H, j)));
  } else if constexpr (C == RecurrentCell::kGru) {
    const acc_t r = sigmoid(pre<acc_t>(gi, gh, 0, H, j));
    const acc_t z = sigmoid(pre<acc_t>(gi, gh, 1, H, j));
    const acc_t n = tanh_(ld<acc_t>(gi, 2 * H + j) + r * ld<acc_t>(gh, 2 * H + j));
    h_out[j] = static_cast<scalar_t>(n + z * (ld<acc_t>(h_prev, j) - n));
  } else {
    const LstmGates<acc_t> a = lstm_gates<acc_t>(gi, gh, H, j);
    const acc_t c_new = a.f * ld<acc_t>(c, j) + a.i * a.g;
    c[j] = static_cast<scalar_t>(c_new);
    h_out[j] = static_cast<scalar_t>(a.o * tanh_(c_new));
  }
}

// The LSTM cell state alone: c' = f ⊙ c_prev + i ⊙ g (backward recomputes the
// c sequence from c0 and the gates instead of saving it).
template <typename acc_t, typename scalar_t>
PYPEFT_CELL_MATH void lstm_state_unit(const scalar_t* gi, const scalar_t* gh,
                                        const scalar_t* c_prev, scalar_t* c_out, int64_t H,
                                        int64_t j) {
  using namespace recurrent_math;
  const acc_t i = sigmoid(pre<acc_t>(gi, gh, 0, H, j));
  const acc_t f = sigmoid(pre<acc_t>(gi, gh, 1, H, j));
  const acc_t g = tanh_(pre<acc_t>(gi, gh, 2, H, j));
  c_out[j] = static_cast<scalar_t>(f * ld<acc_t>(c_prev, j) + i * g);
}

// One step backward for unit j, from the step's pre-activations (gi, gh), its
// inputs h_prev (gru) / c_prev (lstm), and the gradient reaching h':
// grad_h[j] + dh[j] (the step's own output gradient plus what later steps
// sent back). Writes the gradients of the pre-activations: dgi (input side)
// and dgh (hidden side, GRU only: d gh_n = r ⊙ d gi_n; for rnn and lstm both
// sides' gradients are dgi, and dgh is not written), so that
//   d x = dgi W_ih,  d h_prev = dh_direct + dgh W_hh,  d W_ih = dgiᵀ x, ...
// and in place:
//   dh: gru: the direct term z ⊙ dh'; rnn, lstm: left as it is (no direct
//       term; the caller overwrites it with dgh W_hh);
//   dc: lstm: in, the gradient reaching c'; out, the gradient of c_prev.
// dgi may alias gi and dgh gh (every value of the unit is read before any is
// written): backward overwrites the recomputed pre-activations.
template <RecurrentCell C, typename acc_t, typename scalar_t>
PYPEFT_CELL_MATH void step_backward_unit(const scalar_t* gi, const scalar_t* gh,
                                           const scalar_t* h_prev, const scalar_t* c_prev,
                                           const scalar_t* grad_h, scalar_t* dh, scalar_t* dc,
                                           scalar_t* dgi, scalar_t* dgh, int64_t H, int64_t j) {
  using namespace recurrent_math;
  const acc_t d_out = ld<acc_t>(grad_h, j) + ld<acc_t>(dh, j);
  if constexpr (C == RecurrentCell::kRnn) {
    const acc_t y = tanh_(pre<acc_t>(gi, gh, 0, H, j));
    const acc_t d = d_out * (acc_t(1) - y * y);
    dgi[j] = static_cast<scalar_t>(d);
  } else if constexpr (C == RecurrentCell::kGru) {
    const acc_t r = sigmoid(pre<acc_t>(gi, gh, 0, H, j));
    const acc_t z = sigmoid(pre<acc_t>(gi, gh, 1, H, j));
    const acc_t gh_n = ld<acc_t>(gh, 2 * H + j);
    const acc_t n = tanh_(ld<acc_t>(gi, 2 * H + j) + r * gh_n);
    const acc_t h = ld<acc_t>(h_prev, j);
    const acc_t d_n = d_out * (acc_t(1) - z) * (acc_t(1) - n * n);  // d of n's pre-activation
    const acc_t d_z = d_out * (h - n) * z * (acc_t(1) - z);
    const acc_t d_r = d_n * gh_n * r * (acc_t(1) - r);
    dgi[j] = static_cast<scalar_t>(d_r);
    dgi[H + j] = static_cast<scalar_t>(d_z);
    dgi[2 * H + j] = static_cast<scalar_t>(d_n);
    dgh[j] = static_cast<scalar_t>(d_r);
    dgh[H + j] = static_cast<scalar_t>(d_z);
    dgh[2 * H + j] = static_cast<scalar_t>(d_n * r);
    dh[j] = static_cast<scalar_t>(d_out * z);
  } else {
    const LstmGates<acc_t> a = lstm_gates<acc_t>(gi, gh, H, j);
    const acc_t cp = ld<acc_t>(c_prev, j);
    const acc_t tc = tanh_(a.f * cp + a.i * a.g);
    const acc_t d_c = ld<acc_t>(dc, j) + d_out * a.o * (acc_t(1) - tc * tc);
    const acc_t d_i = d_c * a.g * a.i * (acc_t(1) - a.i);
    const acc_t d_f = d_c * cp * a.f * (acc_t(1) - a.f);
    const acc_t d_g = d_c * a.i * (acc_t(1) - a.g * a.g);
    const acc_t d_o = d_out * tc * a.o * (acc_t(1) - a.o);
    dgi[j] = static_cast<scalar_t>(d_i);
    dgi[H + j] = static_cast<scalar_t>(d_f);
    dgi[2 * H + j] = static_cast<scalar_t>(d_g);
    dgi[3 * H + j] = static_cast<scalar_t>(d_o);
    dc[j] = static_cast<scalar_t>(d_c * a.f);
  }
}

}  // namespace pypeft
