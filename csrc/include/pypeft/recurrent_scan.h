// pypeft's recurrent ops (rnn_cell, gru_cell, lstm_cell, recurrent_scan and
// their backward ops): one driver (csrc/recurrent_scan.cpp) that does the
// GEMMs and the loop over steps through ATen, and per backend only the fused
// elementwise gate kernels, handed to it as a RecurrentGateKernels. Each
// backend registers the ops with register_recurrent_ops<its kernels>(m).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "pypeft/recurrent_cell.h"

namespace pypeft {

// A backend's elementwise kernels, over every (row, hidden unit) pair. All
// tensors are contiguous, of one dtype and device; gi, gh, dgi, dgh are
// [N, G·H], the others [N, H] (see recurrent_cell.h for what each computes).
struct RecurrentGateKernels {
  // One step: h_out = cell(gi, gh, h_prev, c); lstm updates c in place.
  // h_prev is read by gru only, c by lstm only (undefined otherwise).
  void (*step_forward)(RecurrentCell cell, const at::Tensor& gi, const at::Tensor& gh,
                       const at::Tensor& h_prev, const at::Tensor& c, const at::Tensor& h_out);
  // LSTM cell states of S steps: gi, gh [S·N, 4H] (step-major), c0 [N, H],
  // cs [S, N, H] out, cs[t] = c after step t.
  void (*lstm_states)(const at::Tensor& gi, const at::Tensor& gh, const at::Tensor& c0,
                      const at::Tensor& cs);
  // One step backward (step_backward_unit): dgi may be gi itself and dgh gh
  // itself; dgh is written for gru only (rnn, lstm: both sides' gradients are dgi).
  void (*step_backward)(RecurrentCell cell, const at::Tensor& gi, const at::Tensor& gh,
                        const at::Tensor& h_prev, const at::Tensor& c_prev,
                        const at::Tensor& grad_h, const at::Tensor& dh, const at::Tensor& dc,
                        const at::Tensor& dgi, const at::Tensor& dgh);
};

using OptTensor = c10::optional<at::Tensor>;
using SevenTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor, at::Tensor>;

// The ops (schemas in csrc/ops.cpp), on a backend's gate kernels.
at::Tensor rnn_cell(const RecurrentGateKernels& k, const at::Tensor& x, const at::Tensor& h,
                    const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                    const OptTensor& b_hh);
at::Tensor gru_cell(const RecurrentGateKernels& k, const at::Tensor& x, const at::Tensor& h,
                    const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                    const OptTensor& b_hh);
std::tuple<at::Tensor, at::Tensor> lstm_cell(const RecurrentGateKernels& k, const at::Tensor& x,
                                             const at::Tensor& h, const at::Tensor& c,
                                             const at::Tensor& w_ih, const at::Tensor& w_hh,
                                             const OptTensor& b_ih, const OptTensor& b_hh);
SevenTensors recurrent_cell_backward(const RecurrentGateKernels& k, const at::Tensor& grad_h,
                                     const OptTensor& grad_c, const at::Tensor& x,
                                     const at::Tensor& h, const OptTensor& c,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const OptTensor& b_ih, const OptTensor& b_hh,
                                     c10::string_view cell, std::array<bool, 7> output_mask);
at::Tensor recurrent_scan(const RecurrentGateKernels& k, const at::Tensor& xs,
                          const at::Tensor& h0, const OptTensor& c0, const at::Tensor& w_ih,
                          const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                          c10::string_view cell);
SevenTensors recurrent_scan_backward(const RecurrentGateKernels& k, const at::Tensor& grad_hs,
                                     const at::Tensor& xs, const at::Tensor& hs,
                                     const at::Tensor& h0, const OptTensor& c0,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const OptTensor& b_ih, const OptTensor& b_hh,
                                     c10::string_view cell, std::array<bool, 7> output_mask);

// Registers the six ops for one backend (inside its TORCH_LIBRARY_IMPL).
template <const RecurrentGateKernels& K>
void register_recurrent_ops(torch::Library& m) {
  using T = at::Tensor;
  m.impl("rnn_cell", [](const T& x, const T& h, const T& w_ih, const T& w_hh,
                        const OptTensor& b_ih, const OptTensor& b_hh) {
    return rnn_cell(K, x, h, w_ih, w_hh, b_ih, b_hh);
  });
  m.impl("gru_cell", [](const T& x, const T& h, const T& w_ih, const T& w_hh,
                        const OptTensor& b_ih, const OptTensor& b_hh) {
    return gru_cell(K, x, h, w_ih, w_hh, b_ih, b_hh);
  });
  m.impl("lstm_cell", [](const T& x, const T& h, const T& c, const T& w_ih, const T& w_hh,
                         const OptTensor& b_ih, const OptTensor& b_hh) {
    return lstm_cell(K, x, h, c, w_ih, w_hh, b_ih, b_hh);
  });
  m.impl("recurrent_cell_backward",
         [](const T& grad_h, const OptTensor& grad_c, const T& x, const T& h, const OptTensor& c,
            const T& w_ih, const T& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
            c10::string_view cell, std::array<bool, 7> output_mask) {
           return recurrent_cell_backward(K, grad_h, grad_c, x, h, c, w_ih, w_hh, b_ih, b_hh,
                                          cell, output_mask);
         });
  m.impl("recurrent_scan", [](const T& xs, const T& h0, const OptTensor& c0, const T& w_ih,
                              const T& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                              c10::string_view cell) {
    return recurrent_scan(K, xs, h0, c0, w_ih, w_hh, b_ih, b_hh, cell);
  });
  m.impl("recurrent_scan_backward",
         [](const T& grad_hs, const T& xs, const T& hs, const T& h0, const OptTensor& c0,
            const T& w_ih, const T& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
            c10::string_view cell, std::array<bool, 7> output_mask) {
           return recurrent_scan_backward(K, grad_hs, xs, hs, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                          cell, output_mask);
         });
}

}  // namespace pypeft
