// pypeft::adapter_fusion (AdapterFusion, Pfeiffer et al. 2021, as the
// `adapters` library computes it) over N bottleneck adapters sharing d, m and
// the activation; per token (row t):
//
//   a_i = act(W_down_i z + b_down_i)                  [m]  (pre-activation h_i saved)
//   u_i = s_i (W_up_i a_i + b_up_i)                   [d]  (never materialised)
//   q   = W_q query + b_q,   k_i = W_k u_i + b_k
//   p   = softmax_i(drop(q·k_i) / temperature)        [N]  (saved)
//   out = residual + W_v Σ_i p_i u_i                  (W_v: identity when None)
//
// One driver (csrc/adapter_fusion.cpp) does the checks and every GEMM through
// ATen; each backend supplies only the fused per-row loops (softmax, dropout,
// activation), as an AdapterFusionRowKernels, and registers the ops with
// register_adapter_fusion_ops<its kernels>(m).
//
// The N up-projections are folded into one [d, N·(m+1)] matrix
// U = [s_1 [W_up_1 | b_up_1], ..., s_N [W_up_N | b_up_N]], so that with the
// augmented activation a'_i = [a_i, 1]:
//   q·k_i = (q W_k U)_(i, ·) · a'_i + q·b_k           (scores: one [T,d]x[d,N(m+1)] GEMM)
//   Σ p_i u_i = [p_1 a'_1, ..., p_N a'_N] Uᵀ           (context: one GEMM with K = N(m+1))
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "pypeft/activation.h"
#include "pypeft/dropout_mask.h"

namespace pypeft {

using OptTensor = c10::optional<at::Tensor>;

struct AdapterFusionDims {
  int64_t rows;  // product of z's leading dims
  int64_t d;     // model width
  int64_t n;     // adapters
  int64_t m;     // bottleneck width
  Activation act;
};

// What the row loops need besides their tensors.
struct AdapterFusionRows {
  int64_t n;
  int64_t m;
  Activation act;
  double inv_temperature;
  DropoutParams drop;
  const OptTensor* seed;  // the dropout seed (CPU, or on the rows' device), or none
};

// A backend's fused loops over rows. Every tensor is [rows, ...] with unit
// column stride (row strides may differ), of one dtype and device; K = m + 1,
// adapter i's columns are i·K .. i·K + m (the last one its bias column).
struct AdapterFusionRowKernels {
  // pre [T, N·m]: pre-activations; scores [T, N·K + 1]: q W_k U with q·b_k in
  // the last column. Writes probs [T, N] and weighted [T, N·K] = p_i a'_i.
  void (*forward)(const AdapterFusionRows& r, const at::Tensor& pre, const at::Tensor& scores,
                  const at::Tensor& probs, const at::Tensor& weighted);
  // value [T, N·K] = g_c U (g_c: the gradient at the context Σ p_i u_i);
  // scores as in forward (read only when grad_pre is written). grad_probs,
  // grad_pre_in: gradients reaching the auxiliary outputs, or undefined.
  // Writes, each only where defined:
  //   grad_pre [T, N·m]  = (p_i value_i + dS_i scores_i) ⊙ act'(pre) (+ grad_pre_in)
  //   weighted [T, N·K]  = p_i a'_i
  //   dscore_weighted [T, N·K] = dS_i a'_i  (dS: the gradient at the scores q·k_i)
  //   dscore_sum [T]     = Σ_i dS_i
  // With value undefined only `weighted` is written.
  void (*backward)(const AdapterFusionRows& r, const at::Tensor& pre, const at::Tensor& probs,
                   const at::Tensor& value, const at::Tensor& scores, const at::Tensor& grad_probs,
                   const at::Tensor& grad_pre_in, const at::Tensor& grad_pre,
                   const at::Tensor& weighted, const at::Tensor& dscore_weighted,
                   const at::Tensor& dscore_sum);
};

using AdapterFusionOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// grad_z, grad_query, grad_residual, grad_w_down, grad_b_down, grad_w_up,
// grad_b_up, grad_w_query, grad_b_query, grad_w_key, grad_b_key, grad_w_value
using AdapterFusionGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The ops (schemas in csrc/ops.cpp) on a backend's row kernels.
AdapterFusionOutputs adapter_fusion(const AdapterFusionRowKernels& k, const at::Tensor& z,
                                    const at::Tensor& query, const OptTensor& residual,
                                    const at::Tensor& w_down, const at::Tensor& b_down,
                                    const at::Tensor& w_up, const at::Tensor& b_up,
                                    at::ArrayRef<double> scales, c10::string_view activation,
                                    const at::Tensor& w_query, const OptTensor& b_query,
                                    const at::Tensor& w_key, const OptTensor& b_key,
                                    const OptTensor& w_value, double temperature,
                                    double dropout_p, const OptTensor& seed);
AdapterFusionGrads adapter_fusion_backward(
    const AdapterFusionRowKernels& k, const at::Tensor& grad_out, const OptTensor& grad_pre_act,
    const OptTensor& grad_probs, const at::Tensor& z, const at::Tensor& query,
    const at::Tensor& pre_act, const at::Tensor& probs, const at::Tensor& w_down,
    const at::Tensor& w_up, const at::Tensor& b_up, at::ArrayRef<double> scales,
    c10::string_view activation, const at::Tensor& w_query, const OptTensor& b_query,
    const at::Tensor& w_key, const OptTensor& b_key, const OptTensor& w_value, double temperature,
    double dropout_p, const OptTensor& seed, std::array<bool, 12> output_mask);

// Registers both ops for one backend (inside its TORCH_LIBRARY_IMPL).
template <const AdapterFusionRowKernels& K>
void register_adapter_fusion_ops(torch::Library& m) {
  using T = at::Tensor;
  m.impl("adapter_fusion",
         [](const T& z, const T& query, const OptTensor& residual, const T& w_down,
            const T& b_down, const T& w_up, const T& b_up, at::ArrayRef<double> scales,
            c10::string_view activation, const T& w_query, const OptTensor& b_query,
            const T& w_key, const OptTensor& b_key, const OptTensor& w_value, double temperature,
            double dropout_p, const OptTensor& seed) {
           return adapter_fusion(K, z, query, residual, w_down, b_down, w_up, b_up, scales,
                                 activation, w_query, b_query, w_key, b_key, w_value, temperature,
                                 dropout_p, seed);
         });
  m.impl("adapter_fusion_backward",
         [](const T& grad_out, const OptTensor& grad_pre_act, const OptTensor& grad_probs,
            const T& z, const T& query, const T& pre_act, const T& probs, const T& w_down,
            const T& w_up, const T& b_up, at::ArrayRef<double> scales,
            c10::string_view activation, const T& w_query, const OptTensor& b_query,
            const T& w_key, const OptTensor& b_key, const OptTensor& w_value, double temperature,
            double dropout_p, const OptTensor& seed, std::array<bool, 12> output_mask) {
           return adapter_fusion_backward(K, grad_out, grad_pre_act, grad_probs, z, query, pre_act,
                                          probs, w_down, w_up, b_up, scales, activation, w_query,
                                          b_query, w_key, b_key, w_value, temperature, dropout_p,
                                          seed, output_mask);
         });
}

}  // namespace pypeft
