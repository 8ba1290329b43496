// The recurrent ops' elementwise gate kernels on the CPU (rows split across
// threads, the math of csrc/include/pypeft/recurrent_cell.h per unit), and
// the ops' CPU registration (the driver is csrc/recurrent_scan.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "pypeft/recurrent_cell.h"
#include "pypeft/recurrent_scan.h"

namespace pypeft::cpu {
namespace {

using Tensor = at::Tensor;

// Rows per task: about 16k units of work.
int64_t row_grain(int64_t per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_row)); }

template <typename scalar_t>
const scalar_t* cptr(const Tensor& t) {
  if (!t.defined()) return nullptr;
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  return t.const_data_ptr<scalar_t>();
}

template <typename scalar_t>
scalar_t* mptr(const Tensor& t) {
  if (!t.defined()) return nullptr;
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  return t.data_ptr<scalar_t>();
}

// Offset of row n in a [N, width] buffer (null stays null).
template <typename P>
P row(P base, int64_t n, int64_t width) {
  return base ? base + n * width : nullptr;
}

void step_forward(RecurrentCell cell, const Tensor& gi, const Tensor& gh, const Tensor& h_prev,
                  const Tensor& c, const Tensor& h_out) {
  const int64_t N = h_out.size(0), H = h_out.size(1), GH = gate_count(cell) * H;
  if (N == 0 || H == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h_out.scalar_type(), "recurrent_step_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gi_p = cptr<scalar_t>(gi);
    const scalar_t* gh_p = cptr<scalar_t>(gh);
    const scalar_t* hp_p = cptr<scalar_t>(h_prev);
    scalar_t* c_p = mptr<scalar_t>(c);
    scalar_t* out_p = mptr<scalar_t>(h_out);
    with_cell(cell, [&](auto C) {
      at::parallel_for(0, N, row_grain(GH), [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          const scalar_t* gi_n = row(gi_p, n, GH);
          const scalar_t* gh_n = row(gh_p, n, GH);
          const scalar_t* hp_n = row(hp_p, n, H);
          scalar_t* c_n = row(c_p, n, H);
          scalar_t* out_n = row(out_p, n, H);
          for (int64_t j = 0; j < H; ++j)
            step_forward_unit<decltype(C)::value, acc_t>(gi_n, gh_n, hp_n, c_n, out_n, H, j);
        }
      });
    });
  });
}

void lstm_states(const Tensor& gi, const Tensor& gh, const Tensor& c0, const Tensor& cs) {
  const int64_t S = cs.size(0), N = cs.size(1), H = cs.size(2), GH = 4 * H;
  if (S == 0 || N == 0 || H == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, cs.scalar_type(), "recurrent_lstm_states", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gi_p = cptr<scalar_t>(gi);
    const scalar_t* gh_p = cptr<scalar_t>(gh);
    const scalar_t* c0_p = cptr<scalar_t>(c0);
    scalar_t* cs_p = mptr<scalar_t>(cs);
    at::parallel_for(0, N, row_grain(GH * S), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n)
        for (int64_t t = 0; t < S; ++t) {
          const scalar_t* c_prev = t == 0 ? c0_p + n * H : cs_p + ((t - 1) * N + n) * H;
          scalar_t* c_out = cs_p + (t * N + n) * H;
          for (int64_t j = 0; j < H; ++j)
            lstm_state_unit<acc_t>(gi_p + (t * N + n) * GH, gh_p + (t * N + n) * GH, c_prev,
                                   c_out, H, j);
        }
    });
  });
}

void step_backward(RecurrentCell cell, const Tensor& gi, const Tensor& gh, const Tensor& h_prev,
                   const Tensor& c_prev, const Tensor& grad_h, const Tensor& dh, const Tensor& dc,
                   const Tensor& dgi, const Tensor& dgh) {
  const int64_t N = dh.size(0), H = dh.size(1), GH = gate_count(cell) * H;
  if (N == 0 || H == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dh.scalar_type(), "recurrent_step_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gi_p = cptr<scalar_t>(gi);
    const scalar_t* gh_p = cptr<scalar_t>(gh);
    const scalar_t* hp_p = cptr<scalar_t>(h_prev);
    const scalar_t* cp_p = cptr<scalar_t>(c_prev);
    const scalar_t* g_p = cptr<scalar_t>(grad_h);
    scalar_t* dh_p = mptr<scalar_t>(dh);
    scalar_t* dc_p = mptr<scalar_t>(dc);
    scalar_t* dgi_p = mptr<scalar_t>(dgi);
    scalar_t* dgh_p = mptr<scalar_t>(dgh);
    with_cell(cell, [&](auto C) {
      at::parallel_for(0, N, row_grain(GH), [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          const scalar_t* gi_n = row(gi_p, n, GH);
          const scalar_t* gh_n = row(gh_p, n, GH);
          const scalar_t* hp_n = row(hp_p, n, H);
          const scalar_t* cp_n = row(cp_p, n, H);
          const scalar_t* g_n = row(g_p, n, H);
          scalar_t* dh_n = row(dh_p, n, H);
          scalar_t* dc_n = row(dc_p, n, H);
          scalar_t* dgi_n = row(dgi_p, n, GH);
          scalar_t* dgh_n = row(dgh_p, n, GH);
          for (int64_t j = 0; j < H; ++j)
            step_backward_unit<decltype(C)::value, acc_t>(gi_n, gh_n, hp_n, cp_n, g_n, dh_n, dc_n,
                                                          dgi_n, dgh_n, H, j);
        }
      });
    });
  });
}

constexpr RecurrentGateKernels kCpuGates{&step_forward, &lstm_states, &step_backward};

}  // namespace

TORCH_LIBRARY_IMPL(pypeft, CPU, m) { register_recurrent_ops<kCpuGates>(m); }

}  // namespace pypeft::cpu
