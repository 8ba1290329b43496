// pypeft::adapter_fusion, one driver for every backend: argument checks and
// every product through ATen (MKL / cuBLAS); the fused per-row loops
// (activation, scores, dropout, softmax and its backward) come from the
// backend's AdapterFusionRowKernels (csrc/cpu/adapter_fusion_rows.cpp,
// csrc/cuda/adapter_fusion_rows.cu), which also register the ops.
//
// Forward (T rows, K = m + 1, U = the scaled, bias-augmented up-projections
// [d, N·K], see adapter_fusion.h):
//   pre = z W_downᵀ + b_down        [T, N·m]   one GEMM for all adapters; saved
//   q   = query W_qᵀ + b_q          [T, d]
//   S   = q [W_k U | b_k]           [T, N·K+1] (or (q W_k) U when T < N·K)
//   rows: p = softmax(drop(S_i · a'_i + S_last) / temperature), P = p_i a'_i
//   out = residual + (P Uᵀ) W_vᵀ    nothing of size T·N·d exists at any time
// Backward recomputes q, the context and the activations; saved are z,
// query, pre [T, N·m] and p [T, N] only. With g_c the gradient at the
// context and dS at the scores (from the rows):
//   grad U  = g_cᵀ P + W_kᵀ (qᵀ Q),  Q = dS_i a'_i   (u_i's gradient is p_i g_c + dS_i W_kᵀ q)
//   e = Q Uᵀ = Σ_i dS_i u_i:  grad W_k = qᵀ e,  grad q = e W_kᵀ + (Σ_i dS_i) b_k
#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "pypeft/adapter_fusion.h"
#include "pypeft/checks.h"
#include "pypeft/lora_linear.h"

namespace pypeft {
namespace {

using Tensor = at::Tensor;

constexpr const char* kOp = "pypeft.adapter_fusion";
constexpr const char* kBackwardOp = "pypeft.adapter_fusion_backward";

std::string what(const char* why) { return std::string(" (") + why + ")"; }

void check_shape(const char* op, const char* arg, const Tensor& t, at::IntArrayRef expected,
                 const std::string& why) {
  check_defined(op, arg, t);
  PYPEFT_CHECK_VALUE(t.sizes() == expected, op, arg, "shape " + shape_str(expected) + why,
                     "shape " + shape_str(t.sizes()));
}

void check_like_z(const char* op, const char* arg, const Tensor& t, const Tensor& z) {
  check_same_device(op, arg, t, "z", z);
  check_same_dtype(op, arg, t, "z", z);
}

// A [..., d]-shaped tensor of z's shape, device and dtype.
void check_like_z_shaped(const char* op, const char* arg, const Tensor& t, const Tensor& z) {
  check_shape(op, arg, t, z.sizes(), " (the shape of 'z')");
  check_like_z(op, arg, t, z);
}

// Everything the forward and backward ops share. b_down is the forward's only.
AdapterFusionDims check_args(const char* op, const Tensor& z, const Tensor& query,
                             const Tensor& w_down, const Tensor& w_up, const Tensor& b_up,
                             at::ArrayRef<double> scales, c10::string_view activation,
                             const Tensor& w_query, const OptTensor& b_query,
                             const Tensor& w_key, const OptTensor& b_key,
                             const OptTensor& w_value, double temperature, double dropout_p,
                             const OptTensor& seed) {
  check_defined(op, "z", z);
  PYPEFT_CHECK_VALUE(z.dim() >= 1, op, "z", "a tensor of shape [..., d]", "a 0-D tensor");
  check_activation_dtype(op, "z", z);
  const int64_t d = z.size(-1);
  PYPEFT_CHECK_VALUE(d >= 1, op, "z", "a tensor of shape [..., d] with d >= 1",
                     "shape " + shape_str(z.sizes()));
  check_like_z_shaped(op, "query", query, z);
  check_dim(op, "w_down", w_down, 3);
  const int64_t n = w_down.size(0), m = w_down.size(1);
  PYPEFT_CHECK_VALUE(n >= 1 && m >= 1, op, "w_down",
                     "shape [N, m, d] with N >= 1 adapters and bottleneck m >= 1",
                     "shape " + shape_str(w_down.sizes()));
  check_size(op, "w_down", w_down, 2, d, "d, from z [..., d]");
  check_like_z(op, "w_down", w_down, z);
  const std::string from_down = what("N, m from w_down [N, m, d]");
  check_shape(op, "w_up", w_up, {n, d, m}, from_down);
  check_like_z(op, "w_up", w_up, z);
  check_shape(op, "b_up", b_up, {n, d}, what("N from w_down [N, m, d]"));
  check_like_z(op, "b_up", b_up, z);
  PYPEFT_CHECK_VALUE(static_cast<int64_t>(scales.size()) == n, op, "scales",
                     std::to_string(n) + " values (one per adapter, N from w_down [N, m, d])",
                     std::to_string(scales.size()) + " values");
  for (double s : scales) PYPEFT_CHECK_VALUE(std::isfinite(s), op, "scales", "finite numbers", s);
  const Activation act = parse_activation(op, "activation", activation);
  const std::string square = what("d, from z [..., d]");
  check_shape(op, "w_query", w_query, {d, d}, square);
  check_like_z(op, "w_query", w_query, z);
  if (has_value(b_query)) {
    check_shape(op, "b_query", *b_query, {d}, square);
    check_like_z(op, "b_query", *b_query, z);
  }
  check_shape(op, "w_key", w_key, {d, d}, square);
  check_like_z(op, "w_key", w_key, z);
  if (has_value(b_key)) {
    check_shape(op, "b_key", *b_key, {d}, square);
    check_like_z(op, "b_key", *b_key, z);
  }
  if (has_value(w_value)) {
    check_shape(op, "w_value", *w_value, {d, d}, square);
    check_like_z(op, "w_value", *w_value, z);
  }
  PYPEFT_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, op, "temperature",
                     "a finite number > 0", temperature);
  check_probability(op, "dropout_p", dropout_p);
  check_seed(op, "seed", seed, dropout_p > 0.0, z);
  // The mask generator counts columns (adapters) in 32 bits.
  PYPEFT_CHECK_VALUE(n < (int64_t(1) << 31), op, "w_down", "fewer than 2^31 adapters", n);
  return AdapterFusionDims{z.numel() / d, d, n, m, act};
}

std::vector<int64_t> lead_with(at::IntArrayRef sizes, std::initializer_list<int64_t> tail) {
  std::vector<int64_t> s(sizes.begin(), sizes.end() - 1);
  s.insert(s.end(), tail);
  return s;
}

// U [d, N·K]: adapter i's columns s_i [W_up_i | b_up_i].
Tensor up_operand(const Tensor& w_up, const Tensor& b_up, at::ArrayRef<double> scales) {
  Tensor u = at::cat({w_up, b_up.unsqueeze(2)}, 2);  // [N, d, K], a fresh tensor
  // One multiply per adapter: a scales tensor would be a host-to-device copy.
  for (size_t i = 0; i < scales.size(); ++i)
    if (scales[i] != 1.0) u.select(0, static_cast<int64_t>(i)).mul_(scales[i]);
  return u.permute({1, 0, 2}).reshape({w_up.size(1), -1});
}

Tensor project(const Tensor& x, const Tensor& w, const OptTensor& b) {
  return has_value(b) ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
}

// S [T, N·K + 1] = q [W_k U | b_k]. Folding W_k into U first costs d·d·N·K
// once instead of T·d·d: it pays when there are more rows than U has columns.
Tensor score_products(const Tensor& q, const Tensor& w_key, const OptTensor& b_key,
                      const Tensor& up) {
  const int64_t rows = q.size(0), cols = up.size(1);
  Tensor bias_col = has_value(b_key) ? b_key->unsqueeze(1) : at::zeros({q.size(1), 1}, q.options());
  if (rows >= cols) return at::mm(q, at::cat({at::mm(w_key, up), bias_col}, 1));
  Tensor s = at::empty({rows, cols + 1}, q.options());
  Tensor products = s.narrow(1, 0, cols), key_bias = s.narrow(1, cols, 1);
  at::mm_out(products, at::mm(q, w_key), up);
  at::mm_out(key_bias, q, bias_col);
  return s;
}

AdapterFusionRows row_params(const AdapterFusionDims& dims, double temperature, double dropout_p,
                             const OptTensor& seed) {
  return AdapterFusionRows{dims.n, dims.m, dims.act, 1.0 / temperature,
                           DropoutParams::from_probability(dropout_p), &seed};
}

}  // namespace

AdapterFusionOutputs adapter_fusion(const AdapterFusionRowKernels& k, const Tensor& z,
                                    const Tensor& query, const OptTensor& residual,
                                    const Tensor& w_down, const Tensor& b_down, const Tensor& w_up,
                                    const Tensor& b_up, at::ArrayRef<double> scales,
                                    c10::string_view activation, const Tensor& w_query,
                                    const OptTensor& b_query, const Tensor& w_key,
                                    const OptTensor& b_key, const OptTensor& w_value,
                                    double temperature, double dropout_p, const OptTensor& seed) {
  const auto dims = check_args(kOp, z, query, w_down, w_up, b_up, scales, activation, w_query,
                               b_query, w_key, b_key, w_value, temperature, dropout_p, seed);
  check_shape(kOp, "b_down", b_down, {dims.n, dims.m}, what("N, m from w_down [N, m, d]"));
  check_like_z(kOp, "b_down", b_down, z);
  if (has_value(residual)) check_like_z_shaped(kOp, "residual", *residual, z);
  // The math inside is not itself differentiated (the autograd formula is
  // the backward op), also when called from C++ on tensors requiring grad.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = dims.rows, d = dims.d, nm = dims.n * dims.m, nk = dims.n * (dims.m + 1);
  const Tensor z2 = as_rows(z, d);
  const Tensor pre = at::addmm(b_down.reshape({nm}), z2, w_down.reshape({nm, d}).t());
  const Tensor q = project(as_rows(query, d), w_query, b_query);
  const Tensor up = up_operand(w_up, b_up, scales);
  const Tensor scores = score_products(q, w_key, b_key, up);
  Tensor probs = at::empty({T, dims.n}, z.options());
  Tensor weighted = at::empty({T, nk}, z.options());
  if (T > 0) k.forward(row_params(dims, temperature, dropout_p, seed), pre, scores, probs, weighted);
  Tensor out = at::mm(weighted, up.t());  // the context Σ p_i u_i
  if (has_value(w_value))
    out = has_value(residual) ? at::addmm(as_rows(*residual, d), out, w_value->t())
                              : at::mm(out, w_value->t());
  else if (has_value(residual))
    out.add_(as_rows(*residual, d));
  return {out.view(z.sizes()), pre.view(lead_with(z.sizes(), {dims.n, dims.m})),
          probs.view(lead_with(z.sizes(), {dims.n}))};
}

AdapterFusionGrads adapter_fusion_backward(
    const AdapterFusionRowKernels& k, const Tensor& grad_out, const OptTensor& grad_pre_act,
    const OptTensor& grad_probs, const Tensor& z, const Tensor& query, const Tensor& pre_act,
    const Tensor& probs, const Tensor& w_down, const Tensor& w_up, const Tensor& b_up,
    at::ArrayRef<double> scales, c10::string_view activation, const Tensor& w_query,
    const OptTensor& b_query, const Tensor& w_key, const OptTensor& b_key,
    const OptTensor& w_value, double temperature, double dropout_p, const OptTensor& seed,
    std::array<bool, 12> output_mask) {
  const auto dims = check_args(kBackwardOp, z, query, w_down, w_up, b_up, scales, activation,
                               w_query, b_query, w_key, b_key, w_value, temperature, dropout_p,
                               seed);
  const auto pre_shape = lead_with(z.sizes(), {dims.n, dims.m});
  const auto probs_shape = lead_with(z.sizes(), {dims.n});
  const std::string pre_why = what("[..., N, m]: z's leading dims, N, m from w_down");
  const std::string probs_why = what("[..., N]: z's leading dims, N from w_down");
  check_like_z_shaped(kBackwardOp, "grad_out", grad_out, z);
  if (has_value(grad_pre_act)) {
    check_shape(kBackwardOp, "grad_pre_act", *grad_pre_act, pre_shape, pre_why);
    check_like_z(kBackwardOp, "grad_pre_act", *grad_pre_act, z);
  }
  if (has_value(grad_probs)) {
    check_shape(kBackwardOp, "grad_probs", *grad_probs, probs_shape, probs_why);
    check_like_z(kBackwardOp, "grad_probs", *grad_probs, z);
  }
  check_shape(kBackwardOp, "pre_act", pre_act, pre_shape, pre_why);
  check_like_z(kBackwardOp, "pre_act", pre_act, z);
  check_shape(kBackwardOp, "probs", probs, probs_shape, probs_why);
  check_like_z(kBackwardOp, "probs", probs, z);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [need_z, need_query, need_residual, need_w_down, need_b_down, need_w_up, need_b_up,
        need_w_query, need_b_query, need_w_key, need_b_key, need_w_value] = output_mask;
  // An absent argument has no gradient (undefined), whatever the mask says.
  need_b_query = need_b_query && has_value(b_query);
  need_b_key = need_b_key && has_value(b_key);
  need_w_value = need_w_value && has_value(w_value);
  const int64_t T = dims.rows, d = dims.d, n = dims.n, m = dims.m, nm = n * m, nk = n * (m + 1);
  const bool need_pre = need_z || need_w_down || need_b_down;
  const bool need_q = need_query || need_w_query || need_b_query;
  const bool need_e = need_q || need_w_key;
  const bool need_up = need_w_up || need_b_up;
  const bool need_scores = need_pre || need_e || need_up || need_b_key;
  const bool need_weighted = need_w_value || need_up;
  const bool need_dsum = need_b_key || (need_q && has_value(b_key));

  const Tensor gy = as_rows(grad_out, d);
  const Tensor query2 = as_rows(query, d);
  const Tensor up = up_operand(w_up, b_up, scales);
  const Tensor gc = has_value(w_value) ? at::mm(gy, *w_value) : gy;  // at the context
  const Tensor q = need_scores ? project(query2, w_query, b_query) : Tensor();
  const Tensor value = need_scores ? at::mm(gc, up) : Tensor();
  const Tensor scores = need_pre ? score_products(q, w_key, b_key, up) : Tensor();
  const auto opts = z.options();
  Tensor grad_pre = need_pre ? at::empty({T, nm}, opts) : Tensor();
  Tensor weighted = need_weighted ? at::empty({T, nk}, opts) : Tensor();
  Tensor dweighted = need_e || need_up ? at::empty({T, nk}, opts) : Tensor();
  Tensor dsum = need_dsum ? at::empty({T}, opts) : Tensor();
  if (T > 0 && (need_scores || need_weighted)) {
    k.backward(row_params(dims, temperature, dropout_p, seed), as_rows(pre_act, nm),
               as_rows(probs, n), value, scores,
               has_value(grad_probs) ? as_rows(*grad_probs, n) : Tensor(),
               has_value(grad_pre_act) ? as_rows(*grad_pre_act, nm) : Tensor(), grad_pre, weighted,
               dweighted, dsum);
  } else {  // no rows: every sum over rows is zero
    for (Tensor* t : {&grad_pre, &weighted, &dweighted, &dsum})
      if (t->defined()) t->zero_();
  }

  Tensor grad_z, grad_query, grad_residual, grad_w_down, grad_b_down, grad_w_up, grad_b_up, grad_w_query,
      grad_b_query, grad_w_key, grad_b_key, grad_w_value;
  // A copy, not grad_out itself: an op's outputs may not alias its inputs,
  // and a second-order gradient through it then raises as for every input.
  if (need_residual) grad_residual = grad_out.clone(at::MemoryFormat::Contiguous);
  if (need_z) grad_z = at::mm(grad_pre, w_down.reshape({nm, d})).view(z.sizes());
  if (need_w_down) grad_w_down = at::mm(grad_pre.t(), as_rows(z, d)).view({n, m, d});
  if (need_b_down) grad_b_down = grad_pre.sum(0).view({n, m});
  if (need_w_value) grad_w_value = at::mm(gy.t(), at::mm(weighted, up.t()));
  if (need_e) {
    const Tensor e = at::mm(dweighted, up.t());  // Σ_i dS_i u_i
    if (need_w_key) grad_w_key = at::mm(q.t(), e);
    if (need_q) {
      Tensor grad_q = at::mm(e, w_key.t());
      if (has_value(b_key)) grad_q.addr_(dsum, *b_key);
      if (need_query) grad_query = at::mm(grad_q, w_query).view(query.sizes());
      if (need_w_query) grad_w_query = at::mm(grad_q.t(), query2);
      if (need_b_query) grad_b_query = grad_q.sum(0);
    }
  }
  if (need_b_key) grad_b_key = at::mv(q.t(), dsum);
  if (need_up) {
    Tensor g = at::mm(gc.t(), weighted).addmm_(w_key.t(), at::mm(q.t(), dweighted));  // [d, N·K]
    g = g.view({d, n, m + 1}).permute({1, 0, 2}).contiguous();  // [N, d, K], per unscaled U_i
    for (int64_t i = 0; i < n; ++i)
      if (scales[i] != 1.0) g.select(0, i).mul_(scales[i]);
    if (need_w_up) grad_w_up = g.narrow(2, 0, m).contiguous();
    if (need_b_up) grad_b_up = g.select(2, m).contiguous();
  }
  return {grad_z,      grad_query,   grad_residual, grad_w_down, grad_b_down, grad_w_up,
          grad_b_up,   grad_w_query, grad_b_query,  grad_w_key,  grad_b_key,  grad_w_value};
}

}  // namespace pypeft
