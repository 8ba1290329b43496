// pypeft's recurrent ops, one driver for every backend: ATen GEMMs and the
// loop over steps here; the fused elementwise gate math comes from the
// backend's RecurrentGateKernels (csrc/cpu/recurrent_gates.cpp,
// csrc/cuda/recurrent_gates.cu), which also register the ops.
//
// Forward scan (xs [L, N, in] -> hs [L, N, H]):
//   gi = xs W_ihᵀ + b_ih for all steps in one GEMM ([L·N, G·H]); per step one
//   GEMM gh = h_{t-1} W_hhᵀ + b_hh and one gate kernel writing hs[t] (LSTM: a
//   running c in a scratch buffer). Only hs is returned; autograd saves xs,
//   hs, h0, c0 and the weights, nothing of size L·N·G·H.
// Backward scan: every state is known, so both projections come back in one
//   GEMM each (gi from xs, gh from [h0, hs[:-1]]); LSTM recomputes its c
//   sequence elementwise; then, in reverse, one gate-backward kernel and one
//   GEMM (d h_{t-1} = dh_direct + dgh_t W_hh) per step. The gate gradients
//   overwrite gi / gh in place. Weight gradients and grad_xs take one GEMM
//   each over all steps.
// Sparse rows: every row is its own recurrence, so a row whose output
//   gradient is zero at every step adds exactly zero to every gradient (for
//   finite forward values). Backward runs on the rows with a nonzero gradient
//   only and scatters their xs / h0 / c0 gradients back (on CUDA, finding them
//   costs one device sync). A cell is a scan of one step.
#include "pypeft/recurrent_scan.h"

#include <ATen/ATen.h>

#include "pypeft/recurrent.h"

namespace pypeft {
namespace {

using Tensor = at::Tensor;

// out = x wᵀ + b, without a bias when b is None.
void project_out(Tensor out, const Tensor& x, const Tensor& w, const OptTensor& b) {
  if (has_value(b))
    at::addmm_out(out, *b, x, w.t());
  else
    at::mm_out(out, x, w.t());
}

Tensor project(const Tensor& x, const Tensor& w, const OptTensor& b) {
  return has_value(b) ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
}

struct ScanResult {
  Tensor hs;      // [L, N, H]
  Tensor c_last;  // lstm: c after the last step ([N, H]); undefined otherwise
};

ScanResult scan_forward(const RecurrentGateKernels& k, RecurrentCell cell, const RecurrentDims& d,
                        const Tensor& xs, const Tensor& h0, const OptTensor& c0, const Tensor& w_ih,
                        const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  const int64_t L = d.steps, N = d.rows, H = d.hidden;
  ScanResult r;
  r.hs = at::empty({L, N, H}, xs.options());
  if (cell == RecurrentCell::kLstm) r.c_last = c0->clone(at::MemoryFormat::Contiguous);
  if (L == 0 || N == 0 || H == 0) return r;
  const Tensor gi = project(xs.reshape({L * N, d.in}), w_ih, b_ih);
  const Tensor gh = at::empty({N, d.gates * H}, xs.options());
  const Tensor h_first = h0.contiguous();
  for (int64_t t = 0; t < L; ++t) {
    const Tensor h_prev = t == 0 ? h_first : r.hs[t - 1];
    project_out(gh, h_prev, w_hh, b_hh);
    k.step_forward(cell, gi.narrow(0, t * N, N), gh, h_prev, r.c_last, r.hs[t]);
  }
  return r;
}

// Backward over all N rows. hs_prev [L - 1, N, H]: the states h_1 .. h_{L-1}
// that steps 1 .. L-1 read (a cell has none); grad_c_last: the gradient
// reaching the last c (lstm cell) or undefined.
SevenTensors scan_backward_dense(const RecurrentGateKernels& k, RecurrentCell cell,
                                 const RecurrentDims& d, const Tensor& grad_hs,
                                 const Tensor& grad_c_last, const Tensor& xs, const Tensor& h0,
                                 const Tensor& hs_prev, const Tensor& c0, const Tensor& w_ih,
                                 const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                 std::array<bool, 7> mask) {
  const int64_t L = d.steps, N = d.rows, H = d.hidden, GH = d.gates * H;
  const bool lstm = cell == RecurrentCell::kLstm, gru = cell == RecurrentCell::kGru;
  const auto opts = xs.options();
  const Tensor xs2 = xs.reshape({L * N, d.in});
  const Tensor h_first = h0.contiguous();
  const Tensor hp = hs_prev.contiguous();
  const Tensor hs_prev2 = hp.view({std::max<int64_t>(L - 1, 0) * N, H});
  const Tensor g = grad_hs.contiguous();

  // The pre-activations of every step, recomputed; overwritten below by their gradients.
  const Tensor gi = project(xs2, w_ih, b_ih);
  const Tensor gh = at::empty({L * N, GH}, opts);
  if (L > 0) project_out(gh.narrow(0, 0, N), h_first, w_hh, b_hh);
  if (L > 1) project_out(gh.narrow(0, N, (L - 1) * N), hs_prev2, w_hh, b_hh);
  Tensor c_first, cs;  // lstm: c0, and cs[t] = c after step t (t < L - 1)
  if (lstm) {
    c_first = c0.contiguous();
    cs = at::empty({std::max<int64_t>(L - 1, 0), N, H}, opts);
    if (L > 1 && N > 0 && H > 0) k.lstm_states(gi, gh, c_first, cs);
  }
  const Tensor& dgi = gi;
  const Tensor& dgh = gru ? gh : gi;

  Tensor dh = at::zeros({N, H}, opts);  // gradient reaching h_t from the steps after t
  Tensor dc;                            // lstm: gradient reaching c_t
  if (lstm) dc = grad_c_last.defined() ? grad_c_last.contiguous().clone() : at::zeros({N, H}, opts);
  const bool need_h0 = mask[1];
  for (int64_t t = L - 1; t >= 0 && N > 0 && H > 0; --t) {
    const Tensor gi_t = gi.narrow(0, t * N, N), gh_t = gh.narrow(0, t * N, N);
    const Tensor dgi_t = dgi.narrow(0, t * N, N), dgh_t = dgh.narrow(0, t * N, N);
    const Tensor h_prev = t == 0 ? h_first : hp[t - 1];
    const Tensor c_prev = !lstm ? Tensor() : t == 0 ? c_first : cs[t - 1];
    k.step_backward(cell, gi_t, gh_t, h_prev, c_prev, g[t], dh, dc, dgi_t, dgh_t);
    if (t == 0 && !need_h0) break;
    if (gru)
      dh.addmm_(dgh_t, w_hh);  // dh held the direct term z ⊙ dh'
    else
      at::mm_out(dh, dgh_t, w_hh);
  }

  Tensor grad_xs, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh;
  if (mask[0]) grad_xs = at::mm(dgi, w_ih).view({L, N, d.in});
  if (mask[1]) grad_h0 = dh;
  if (mask[2] && lstm) grad_c0 = dc;
  if (mask[3]) grad_w_ih = at::mm(dgi.t(), xs2);
  if (mask[4]) {
    if (L == 0) {
      grad_w_hh = at::zeros({GH, H}, opts);
    } else {
      grad_w_hh = at::mm(dgh.narrow(0, 0, N).t(), h_first);
      if (L > 1) grad_w_hh.addmm_(dgh.narrow(0, N, (L - 1) * N).t(), hs_prev2);
    }
  }
  if (mask[5] && has_value(b_ih)) grad_b_ih = dgi.sum(0);
  if (mask[6] && has_value(b_hh))
    grad_b_hh = gru || !grad_b_ih.defined() ? dgh.sum(0) : grad_b_ih.clone();
  return {grad_xs, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

// Backward on the rows with a nonzero output gradient only (all rows: no gather).
SevenTensors scan_backward(const RecurrentGateKernels& k, RecurrentCell cell,
                           const RecurrentDims& d, const Tensor& grad_hs,
                           const Tensor& grad_c_last, const Tensor& xs, const Tensor& h0,
                           const Tensor& hs_prev, const OptTensor& c0, const Tensor& w_ih,
                           const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                           std::array<bool, 7> mask) {
  bool any_needed = false;
  for (bool m : mask) any_needed |= m;
  if (!any_needed) return {};
  const Tensor c_first = cell == RecurrentCell::kLstm ? *c0 : Tensor();
  const int64_t N = d.rows;
  if (N > 0) {
    Tensor active = d.steps > 0 && d.hidden > 0
                        ? grad_hs.ne(0).any(2).any(0)
                        : at::zeros({N}, grad_hs.options().dtype(at::kBool));
    if (grad_c_last.defined() && d.hidden > 0) active.logical_or_(grad_c_last.ne(0).any(1));
    const Tensor rows = active.nonzero().squeeze(1);
    const int64_t n_active = rows.size(0);
    if (n_active < N) {
      RecurrentDims sub = d;
      sub.rows = n_active;
      auto [gx, gh0, gc0, gw_ih, gw_hh, gb_ih, gb_hh] = scan_backward_dense(
          k, cell, sub, grad_hs.index_select(1, rows),
          grad_c_last.defined() ? grad_c_last.index_select(0, rows) : Tensor(),
          xs.index_select(1, rows), h0.index_select(0, rows), hs_prev.index_select(1, rows),
          c_first.defined() ? c_first.index_select(0, rows) : Tensor(), w_ih, w_hh, b_ih, b_hh,
          mask);
      const auto scatter = [&](const Tensor& part, const Tensor& like, int64_t dim) {
        if (!part.defined()) return part;
        return at::zeros(like.sizes(), like.options()).index_copy_(dim, rows, part);
      };
      return {scatter(gx, xs, 1), scatter(gh0, h0, 0), scatter(gc0, h0, 0), gw_ih, gw_hh, gb_ih,
              gb_hh};
    }
  }
  return scan_backward_dense(k, cell, d, grad_hs, grad_c_last, xs, h0, hs_prev, c_first, w_ih,
                             w_hh, b_ih, b_hh, mask);
}

constexpr const char* kScanOp = "pypeft.recurrent_scan";
constexpr const char* kScanBackwardOp = "pypeft.recurrent_scan_backward";
constexpr const char* kCellBackwardOp = "pypeft.recurrent_cell_backward";

Tensor one_cell(const RecurrentGateKernels& k, const char* op, RecurrentCell cell,
                const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                const OptTensor& b_ih, const OptTensor& b_hh) {
  const auto d =
      check_recurrent_args(op, cell, kCellArgs, false, x, h, c10::nullopt, w_ih, w_hh, b_ih, b_hh);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return scan_forward(k, cell, d, x.unsqueeze(0), h, c10::nullopt, w_ih, w_hh, b_ih, b_hh)
      .hs.view({d.rows, d.hidden});
}

}  // namespace

Tensor rnn_cell(const RecurrentGateKernels& k, const Tensor& x, const Tensor& h,
                const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                const OptTensor& b_hh) {
  return one_cell(k, "pypeft.rnn_cell", RecurrentCell::kRnn, x, h, w_ih, w_hh, b_ih, b_hh);
}

Tensor gru_cell(const RecurrentGateKernels& k, const Tensor& x, const Tensor& h,
                const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                const OptTensor& b_hh) {
  return one_cell(k, "pypeft.gru_cell", RecurrentCell::kGru, x, h, w_ih, w_hh, b_ih, b_hh);
}

std::tuple<Tensor, Tensor> lstm_cell(const RecurrentGateKernels& k, const Tensor& x,
                                     const Tensor& h, const Tensor& c, const Tensor& w_ih,
                                     const Tensor& w_hh, const OptTensor& b_ih,
                                     const OptTensor& b_hh) {
  const auto cell = RecurrentCell::kLstm;
  const auto d = check_recurrent_args("pypeft.lstm_cell", cell, kCellArgs, false, x, h, c, w_ih,
                                      w_hh, b_ih, b_hh);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto r = scan_forward(k, cell, d, x.unsqueeze(0), h, c, w_ih, w_hh, b_ih, b_hh);
  return {r.hs.view({d.rows, d.hidden}), r.c_last};
}

SevenTensors recurrent_cell_backward(const RecurrentGateKernels& k, const Tensor& grad_h,
                                     const OptTensor& grad_c, const Tensor& x, const Tensor& h,
                                     const OptTensor& c, const Tensor& w_ih, const Tensor& w_hh,
                                     const OptTensor& b_ih, const OptTensor& b_hh,
                                     c10::string_view cell_str, std::array<bool, 7> output_mask) {
  const char* op = kCellBackwardOp;
  const RecurrentCell cell = parse_cell(op, cell_str);
  const auto d = check_recurrent_args(op, cell, kCellArgs, false, x, h, c, w_ih, w_hh, b_ih, b_hh);
  check_state(op, "grad_h", grad_h, d, "x", x);
  if (has_value(grad_c)) {
    PYPEFT_CHECK_VALUE(cell == RecurrentCell::kLstm, op, "grad_c",
                       std::string("None for cell '") + cell_name(cell) + "'", "a tensor");
    check_state(op, "grad_c", *grad_c, d, "x", x);
  }
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [gx, gh, gc, gw_ih, gw_hh, gb_ih, gb_hh] =
      scan_backward(k, cell, d, grad_h.unsqueeze(0), has_value(grad_c) ? *grad_c : Tensor(),
                    x.unsqueeze(0), h, h.new_empty({0, d.rows, d.hidden}), c, w_ih, w_hh, b_ih,
                    b_hh, output_mask);
  if (gx.defined()) gx = gx.view({d.rows, d.in});
  return {gx, gh, gc, gw_ih, gw_hh, gb_ih, gb_hh};
}

Tensor recurrent_scan(const RecurrentGateKernels& k, const Tensor& xs, const Tensor& h0,
                      const OptTensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                      const OptTensor& b_ih, const OptTensor& b_hh, c10::string_view cell_str) {
  const RecurrentCell cell = parse_cell(kScanOp, cell_str);
  const auto d =
      check_recurrent_args(kScanOp, cell, kScanArgs, true, xs, h0, c0, w_ih, w_hh, b_ih, b_hh);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return scan_forward(k, cell, d, xs, h0, c0, w_ih, w_hh, b_ih, b_hh).hs;
}

SevenTensors recurrent_scan_backward(const RecurrentGateKernels& k, const Tensor& grad_hs,
                                     const Tensor& xs, const Tensor& hs, const Tensor& h0,
                                     const OptTensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                                     const OptTensor& b_ih, const OptTensor& b_hh,
                                     c10::string_view cell_str, std::array<bool, 7> output_mask) {
  const char* op = kScanBackwardOp;
  const RecurrentCell cell = parse_cell(op, cell_str);
  const auto d = check_recurrent_args(op, cell, kScanArgs, true, xs, h0, c0, w_ih, w_hh, b_ih, b_hh);
  check_sequence(op, "grad_hs", grad_hs, d, xs);
  check_sequence(op, "hs", hs, d, xs);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return scan_backward(k, cell, d, grad_hs, Tensor(), xs, h0,
                       hs.narrow(0, 0, std::max<int64_t>(d.steps - 1, 0)), c0, w_ih, w_hh, b_ih,
                       b_hh, output_mask);
}

}  // namespace pypeft
