// The recurrent ops' elementwise gate kernels on the CPU, and the ops' CPU
// registration (the driver is csrc/recurrent_scan.cpp). Rows are split across
// threads; within a row, a loop over the hidden units runs the math of
// csrc/include/pypeft/recurrent_cell.h, which is written branch- and
// call-free so that the loop vectorises (checked with -fopt-info-vec: every
// row loop, float32 also in 8-wide AVX2 clones). With libm's scalar
// expf / tanhf the gate kernels cost several times the step's GEMMs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "pypeft/macros.h"
#include "pypeft/recurrent_cell.h"
#include "pypeft/recurrent_scan.h"

namespace pypeft::cpu {
namespace {

using Tensor = at::Tensor;

// Rows per task: about 16k values of work.
int64_t row_grain(int64_t per_row) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_row));
}

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

// The units of one row in a loop the compiler vectorises: iteration j
// touches only unit j's values (k·H + j), so buffers updated in place (c,
// dh, dc, dgi = gi) carry no dependence from one iteration to the next.
#if defined(__clang__)
#define PYPEFT_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define PYPEFT_IVDEP _Pragma("GCC ivdep")
#else
#define PYPEFT_IVDEP
#endif
#if defined(__GNUC__)
#define PYPEFT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PYPEFT_ALWAYS_INLINE inline
#endif

template <RecurrentCell C, typename scalar_t>
PYPEFT_ALWAYS_INLINE void forward_row(const scalar_t* gi, const scalar_t* gh, const scalar_t* h_prev,
                                      scalar_t* c, scalar_t* h_out, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  PYPEFT_IVDEP
  for (int64_t j = 0; j < H; ++j) step_forward_unit<C, acc_t>(gi, gh, h_prev, c, h_out, H, j);
}

template <typename scalar_t>
PYPEFT_ALWAYS_INLINE void lstm_state_row(const scalar_t* gi, const scalar_t* gh,
                                         const scalar_t* c_prev, scalar_t* c_out, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  PYPEFT_IVDEP
  for (int64_t j = 0; j < H; ++j) lstm_state_unit<acc_t>(gi, gh, c_prev, c_out, H, j);
}

template <RecurrentCell C, typename scalar_t>
PYPEFT_ALWAYS_INLINE void backward_row(const scalar_t* gi, const scalar_t* gh,
                                       const scalar_t* h_prev, const scalar_t* c_prev,
                                       const scalar_t* grad_h, scalar_t* dh, scalar_t* dc,
                                       scalar_t* dgi, scalar_t* dgh, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  PYPEFT_IVDEP
  for (int64_t j = 0; j < H; ++j)
    step_backward_unit<C, acc_t>(gi, gh, h_prev, c_prev, grad_h, dh, dc, dgi, dgh, H, j);
}

// float32, the hot path, also in an AVX2 clone picked at run time. Other
// dtypes run the template directly.
PYPEFT_CPU_CLONES void forward_row_f32(RecurrentCell cell, const float* gi, const float* gh,
                                       const float* h_prev, float* c, float* h_out, int64_t H) {
  switch (cell) {
    case RecurrentCell::kRnn: forward_row<RecurrentCell::kRnn>(gi, gh, h_prev, c, h_out, H); break;
    case RecurrentCell::kGru: forward_row<RecurrentCell::kGru>(gi, gh, h_prev, c, h_out, H); break;
    case RecurrentCell::kLstm: forward_row<RecurrentCell::kLstm>(gi, gh, h_prev, c, h_out, H); break;
  }
}

PYPEFT_CPU_CLONES void lstm_state_row_f32(const float* gi, const float* gh, const float* c_prev,
                                          float* c_out, int64_t H) {
  lstm_state_row(gi, gh, c_prev, c_out, H);
}

PYPEFT_CPU_CLONES void backward_row_f32(RecurrentCell cell, const float* gi, const float* gh,
                                        const float* h_prev, const float* c_prev,
                                        const float* grad_h, float* dh, float* dc, float* dgi,
                                        float* dgh, int64_t H) {
  switch (cell) {
    case RecurrentCell::kRnn:
      backward_row<RecurrentCell::kRnn>(gi, gh, h_prev, c_prev, grad_h, dh, dc, dgi, dgh, H);
      break;
    case RecurrentCell::kGru:
      backward_row<RecurrentCell::kGru>(gi, gh, h_prev, c_prev, grad_h, dh, dc, dgi, dgh, H);
      break;
    case RecurrentCell::kLstm:
      backward_row<RecurrentCell::kLstm>(gi, gh, h_prev, c_prev, grad_h, dh, dc, dgi, dgh, H);
      break;
  }
}

// The row loops of any dtype; float32 goes through its clones.
template <RecurrentCell C, typename scalar_t>
inline void run_forward_row(const scalar_t* gi, const scalar_t* gh, const scalar_t* h_prev,
                            scalar_t* c, scalar_t* h_out, int64_t H) {
  forward_row<C>(gi, gh, h_prev, c, h_out, H);
}
template <RecurrentCell C>
inline void run_forward_row(const float* gi, const float* gh, const float* h_prev, float* c,
                            float* h_out, int64_t H) {
  forward_row_f32(C, gi, gh, h_prev, c, h_out, H);
}

template <typename scalar_t>
inline void run_lstm_state_row(const scalar_t* gi, const scalar_t* gh, const scalar_t* c_prev,
                               scalar_t* c_out, int64_t H) {
  lstm_state_row(gi, gh, c_prev, c_out, H);
}
inline void run_lstm_state_row(const float* gi, const float* gh, const float* c_prev,
                               float* c_out, int64_t H) {
  lstm_state_row_f32(gi, gh, c_prev, c_out, H);
}

template <RecurrentCell C, typename scalar_t>
inline void run_backward_row(const scalar_t* gi, const scalar_t* gh, const scalar_t* h_prev,
                             const scalar_t* c_prev, const scalar_t* grad_h, scalar_t* dh,
                             scalar_t* dc, scalar_t* dgi, scalar_t* dgh, int64_t H) {
  backward_row<C>(gi, gh, h_prev, c_prev, grad_h, dh, dc, dgi, dgh, H);
}
template <RecurrentCell C>
inline void run_backward_row(const float* gi, const float* gh, const float* h_prev,
                             const float* c_prev, const float* grad_h, float* dh, float* dc,
                             float* dgi, float* dgh, int64_t H) {
  backward_row_f32(C, gi, gh, h_prev, c_prev, grad_h, dh, dc, dgi, dgh, H);
}

void step_forward(RecurrentCell cell, const Tensor& gi, const Tensor& gh, const Tensor& h_prev,
                  const Tensor& c, const Tensor& h_out) {
  const int64_t N = h_out.size(0), H = h_out.size(1), GH = gate_count(cell) * H;
  if (N == 0 || H == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h_out.scalar_type(), "recurrent_step_forward", [&] {
    const scalar_t* gi_p = cptr<scalar_t>(gi);
    const scalar_t* gh_p = cptr<scalar_t>(gh);
    const scalar_t* hp_p = cptr<scalar_t>(h_prev);
    scalar_t* c_p = mptr<scalar_t>(c);
    scalar_t* out_p = mptr<scalar_t>(h_out);
    with_cell(cell, [&](auto C) {
      at::parallel_for(0, N, row_grain(GH), [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          run_forward_row<decltype(C)::value>(row(gi_p, n, GH), row(gh_p, n, GH),
                                              row(hp_p, n, H), row(c_p, n, H), row(out_p, n, H),
                                              H);
        }
      });
    });
  });
}

void lstm_states(const Tensor& gi, const Tensor& gh, const Tensor& c0, const Tensor& cs) {
  const int64_t S = cs.size(0), N = cs.size(1), H = cs.size(2), GH = 4 * H;
  if (S == 0 || N == 0 || H == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, cs.scalar_type(), "recurrent_lstm_states", [&] {
    const scalar_t* gi_p = cptr<scalar_t>(gi);
    const scalar_t* gh_p = cptr<scalar_t>(gh);
    const scalar_t* c0_p = cptr<scalar_t>(c0);
    scalar_t* cs_p = mptr<scalar_t>(cs);
    at::parallel_for(0, N, row_grain(GH * S), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n)
        for (int64_t t = 0; t < S; ++t) {
          const scalar_t* c_prev = t == 0 ? c0_p + n * H : cs_p + ((t - 1) * N + n) * H;
          scalar_t* c_out = cs_p + (t * N + n) * H;
          const scalar_t* gi_t = gi_p + (t * N + n) * GH;
          const scalar_t* gh_t = gh_p + (t * N + n) * GH;
          run_lstm_state_row(gi_t, gh_t, c_prev, c_out, H);
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
          run_backward_row<decltype(C)::value>(row(gi_p, n, GH), row(gh_p, n, GH),
                                               row(hp_p, n, H), row(cp_p, n, H), row(g_p, n, H),
                                               row(dh_p, n, H), row(dc_p, n, H),
                                               row(dgi_p, n, GH), row(dgh_p, n, GH), H);
        }
      });
    });
  });
}

constexpr RecurrentGateKernels kCpuGates{&step_forward, &lstm_states, &step_backward};

}  // namespace

TORCH_LIBRARY_IMPL(pypeft, CPU, m) { register_recurrent_ops<kCpuGates>(m); }

}  // namespace pypeft::cpu
