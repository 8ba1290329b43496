// The recurrent ops' elementwise gate kernels on CUDA (one thread per
// (row, hidden unit), the math of csrc/include/pypeft/recurrent_cell.h, on the
// current stream), and the ops' CUDA registration (the driver, with its
// cuBLAS GEMMs through ATen, is csrc/recurrent_scan.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "pypeft/recurrent_cell.h"
#include "pypeft/recurrent_scan.h"

namespace pypeft::cuda {
namespace {

using Tensor = at::Tensor;

constexpr int kThreads = 256;

unsigned blocks_for(int64_t units) {
  return static_cast<unsigned>(std::min<int64_t>((units + kThreads - 1) / kThreads, 65535));
}

template <typename scalar_t>
const scalar_t* cptr(const Tensor& t) {
  if (!t.defined()) return nullptr;
  TORCH_INTERNAL_ASSERT(t.is_contiguous() && t.is_cuda());
  return t.const_data_ptr<scalar_t>();
}

template <typename scalar_t>
scalar_t* mptr(const Tensor& t) {
  if (!t.defined()) return nullptr;
  TORCH_INTERNAL_ASSERT(t.is_contiguous() && t.is_cuda());
  return t.data_ptr<scalar_t>();
}

// Offset of row n in a [N, width] buffer (null stays null).
template <typename P>
__device__ __forceinline__ P row(P base, int64_t n, int64_t width) {
  return base ? base + n * width : nullptr;
}

template <RecurrentCell C, typename scalar_t>
__global__ void step_forward_kernel(const scalar_t* gi, const scalar_t* gh, const scalar_t* h_prev,
                                    scalar_t* c, scalar_t* h_out, int64_t N, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t G = gate_count(C);
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < N * H;
       u += int64_t(blockDim.x) * gridDim.x) {
    const int64_t n = u / H, j = u - n * H;
    step_forward_unit<C, acc_t>(gi + n * G * H, gh + n * G * H, row(h_prev, n, H), row(c, n, H),
                                h_out + n * H, H, j);
  }
}

// One thread per (row, unit) walks the S steps.
template <typename scalar_t>
__global__ void lstm_states_kernel(const scalar_t* gi, const scalar_t* gh, const scalar_t* c0,
                                   scalar_t* cs, int64_t S, int64_t N, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < N * H;
       u += int64_t(blockDim.x) * gridDim.x) {
    const int64_t n = u / H, j = u - n * H;
    for (int64_t t = 0; t < S; ++t) {
      const scalar_t* c_prev = t == 0 ? c0 + n * H : cs + ((t - 1) * N + n) * H;
      lstm_state_unit<acc_t>(gi + (t * N + n) * 4 * H, gh + (t * N + n) * 4 * H, c_prev,
                             cs + (t * N + n) * H, H, j);
    }
  }
}

// dgi may alias gi and dgh gh or dgi: no __restrict__ here.
template <RecurrentCell C, typename scalar_t>
__global__ void step_backward_kernel(const scalar_t* gi, const scalar_t* gh,
                                     const scalar_t* h_prev, const scalar_t* c_prev,
                                     const scalar_t* grad_h, scalar_t* dh, scalar_t* dc,
                                     scalar_t* dgi, scalar_t* dgh, int64_t N, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t G = gate_count(C);
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < N * H;
       u += int64_t(blockDim.x) * gridDim.x) {
    const int64_t n = u / H, j = u - n * H;
    step_backward_unit<C, acc_t>(gi + n * G * H, gh + n * G * H, row(h_prev, n, H),
                                 row(c_prev, n, H), grad_h + n * H, dh + n * H, row(dc, n, H),
                                 dgi + n * G * H, dgh + n * G * H, H, j);
  }
}

void step_forward(RecurrentCell cell, const Tensor& gi, const Tensor& gh, const Tensor& h_prev,
                  const Tensor& c, const Tensor& h_out) {
  const int64_t N = h_out.size(0), H = h_out.size(1);
  if (N == 0 || H == 0) return;
  const c10::cuda::CUDAGuard guard(h_out.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h_out.scalar_type(),
                                  "recurrent_step_forward", [&] {
    with_cell(cell, [&](auto C) {
      step_forward_kernel<decltype(C)::value, scalar_t><<<blocks_for(N * H), kThreads, 0, stream>>>(
          cptr<scalar_t>(gi), cptr<scalar_t>(gh), cptr<scalar_t>(h_prev), mptr<scalar_t>(c),
          mptr<scalar_t>(h_out), N, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void lstm_states(const Tensor& gi, const Tensor& gh, const Tensor& c0, const Tensor& cs) {
  const int64_t S = cs.size(0), N = cs.size(1), H = cs.size(2);
  if (S == 0 || N == 0 || H == 0) return;
  const c10::cuda::CUDAGuard guard(cs.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cs.scalar_type(),
                                  "recurrent_lstm_states", [&] {
    lstm_states_kernel<scalar_t><<<blocks_for(N * H), kThreads, 0, stream>>>(
        cptr<scalar_t>(gi), cptr<scalar_t>(gh), cptr<scalar_t>(c0), mptr<scalar_t>(cs), S, N, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void step_backward(RecurrentCell cell, const Tensor& gi, const Tensor& gh, const Tensor& h_prev,
                   const Tensor& c_prev, const Tensor& grad_h, const Tensor& dh, const Tensor& dc,
                   const Tensor& dgi, const Tensor& dgh) {
  const int64_t N = dh.size(0), H = dh.size(1);
  if (N == 0 || H == 0) return;
  const c10::cuda::CUDAGuard guard(dh.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dh.scalar_type(),
                                  "recurrent_step_backward", [&] {
    with_cell(cell, [&](auto C) {
      step_backward_kernel<decltype(C)::value, scalar_t><<<blocks_for(N * H), kThreads, 0, stream>>>(
          cptr<scalar_t>(gi), cptr<scalar_t>(gh), cptr<scalar_t>(h_prev), cptr<scalar_t>(c_prev),
          cptr<scalar_t>(grad_h), mptr<scalar_t>(dh), mptr<scalar_t>(dc), mptr<scalar_t>(dgi),
          mptr<scalar_t>(dgh), N, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

constexpr RecurrentGateKernels kCudaGates{&step_forward, &lstm_states, &step_backward};

}  // namespace

TORCH_LIBRARY_IMPL(pypeft, CUDA, m) { register_recurrent_ops<kCudaGates>(m); }

}  // namespace pypeft::cuda
