// Argument validation of pypeft's recurrent ops (rnn_cell, gru_cell,
// lstm_cell, recurrent_scan and their backward ops), shared by every backend.
//
// Shapes, for a cell with G gates (rnn 1, gru 3, lstm 4) and hidden size H:
//   cell:  x [N, in],     h, c [N, H]
//   scan:  xs [L, N, in], h0, c0 [N, H], hs [L, N, H]
//   w_ih [G·H, in], w_hh [G·H, H], b_ih, b_hh [G·H] (optional, each)
// c / c0 is required for lstm and rejected for rnn / gru. Every tensor has
// one dtype (float32, float64, bfloat16; float16 on CUDA) and one device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <string>
#include <vector>

#include "pypeft/checks.h"
#include "pypeft/recurrent_cell.h"

namespace pypeft {

inline RecurrentCell parse_cell(const char* op, c10::string_view cell) {
  if (cell == "rnn") return RecurrentCell::kRnn;
  if (cell == "gru") return RecurrentCell::kGru;
  if (cell == "lstm") return RecurrentCell::kLstm;
  PYPEFT_CHECK_VALUE(false, op, "cell", "one of 'rnn', 'gru', 'lstm'",
                     "'" + std::string(cell) + "'");
  return RecurrentCell::kRnn;  // unreachable
}

inline const char* cell_name(RecurrentCell cell) {
  switch (cell) {
    case RecurrentCell::kRnn: return "rnn";
    case RecurrentCell::kGru: return "gru";
    default: return "lstm";
  }
}

struct RecurrentDims {
  int64_t steps;   // L (1 for a cell)
  int64_t rows;    // N
  int64_t in;      // input features
  int64_t hidden;  // H
  int64_t gates;   // G
};

// The names the arguments carry in the cell ops and in the scan ops.
struct RecurrentArgNames {
  const char* x;
  const char* h;
  const char* c;
};
constexpr RecurrentArgNames kCellArgs{"x", "h", "c"};
constexpr RecurrentArgNames kScanArgs{"xs", "h0", "c0"};

inline void check_like(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                       const at::Tensor& ref) {
  check_same_device(op, arg, t, ref_arg, ref);
  check_same_dtype(op, arg, t, ref_arg, ref);
}

// A [rows, H]-shaped tensor (h, c and their gradients).
inline void check_state(const char* op, const char* arg, const at::Tensor& t,
                        const RecurrentDims& d, const char* x_arg, const at::Tensor& x) {
  check_dim(op, arg, t, 2);
  check_size(op, arg, t, 0, d.rows,
             (std::string("rows N, from '") + x_arg + "'").c_str());
  check_size(op, arg, t, 1, d.hidden, "hidden size H, from w_hh [G·H, H]");
  check_like(op, arg, t, x_arg, x);
}

// The [L, N, H]-shaped tensors of the scan (hs and its gradient).
inline void check_sequence(const char* op, const char* arg, const at::Tensor& t,
                           const RecurrentDims& d, const at::Tensor& xs) {
  check_defined(op, arg, t);
  const std::vector<int64_t> want{d.steps, d.rows, d.hidden};
  PYPEFT_CHECK_VALUE(t.sizes() == at::IntArrayRef(want), op, arg,
                     "shape " + shape_str(want) + " ([L, N, H] from 'xs' and w_hh)",
                     "shape " + shape_str(t.sizes()));
  check_like(op, arg, t, "xs", xs);
}

// Everything a forward op reads; sequence: xs [L, N, in] (scan) or x [N, in] (cell).
inline RecurrentDims check_recurrent_args(const char* op, RecurrentCell cell,
                                          const RecurrentArgNames& names, bool sequence,
                                          const at::Tensor& x, const at::Tensor& h,
                                          const c10::optional<at::Tensor>& c,
                                          const at::Tensor& w_ih, const at::Tensor& w_hh,
                                          const c10::optional<at::Tensor>& b_ih,
                                          const c10::optional<at::Tensor>& b_hh) {
  check_dim(op, names.x, x, sequence ? 3 : 2);
  check_activation_dtype(op, names.x, x);
  const int64_t G = gate_count(cell);
  const std::string gates_what = std::to_string(G) + "·H rows for cell '" + cell_name(cell) +
                                 "' (" + std::to_string(G) + " gates), H = hidden size";

  check_dim(op, "w_hh", w_hh, 2);
  check_like(op, "w_hh", w_hh, names.x, x);
  const int64_t H = w_hh.size(1);
  PYPEFT_CHECK_VALUE(w_hh.size(0) == G * H, op, "w_hh",
                     "shape [" + std::to_string(G) + "·H, H] (" + gates_what + ")",
                     "shape " + shape_str(w_hh.sizes()));
  check_dim(op, "w_ih", w_ih, 2);
  check_like(op, "w_ih", w_ih, names.x, x);
  check_size(op, "w_ih", w_ih, 0, G * H, (gates_what + ", from w_hh [G·H, H]").c_str());
  const int64_t in = w_ih.size(1);
  check_size(op, names.x, x, x.dim() - 1, in, "input features, from w_ih [G·H, in]");
  const auto check_bias = [&](const char* arg, const c10::optional<at::Tensor>& b) {
    if (!has_value(b)) return;
    check_dim(op, arg, *b, 1);
    check_size(op, arg, *b, 0, G * H, (gates_what + ", from w_hh [G·H, H]").c_str());
    check_like(op, arg, *b, names.x, x);
  };
  check_bias("b_ih", b_ih);
  check_bias("b_hh", b_hh);

  const RecurrentDims d{sequence ? x.size(0) : 1, x.size(sequence ? 1 : 0), in, H, G};
  check_state(op, names.h, h, d, names.x, x);
  if (cell == RecurrentCell::kLstm) {
    PYPEFT_CHECK_VALUE(has_value(c), op, names.c, "a tensor [N, H] for cell 'lstm'", "None");
    check_state(op, names.c, *c, d, names.x, x);
  } else {
    PYPEFT_CHECK_VALUE(!has_value(c), op, names.c,
                       std::string("None for cell '") + cell_name(cell) +
                           "' (only 'lstm' has a cell state)",
                       "a tensor");
  }
  return d;
}

}  // namespace pypeft
