// adapter_fusion's per-row loops on CUDA, and the ops' CUDA registration (the
// driver with every GEMM, cuBLAS through ATen, is csrc/adapter_fusion.cpp).
// One warp per row: lanes stride over an adapter's m bottleneck units and
// reduce its score with shuffles; the row's N scores (and their gradients)
// sit in shared memory for the softmax. The activation, mask and dropout
// math are the CPU's (pypeft/activation.h, pypeft/dropout_mask.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "dropout_rows.cuh"
#include "pypeft/activation.h"
#include "pypeft/adapter_fusion.h"
#include "pypeft/checks.h"

namespace pypeft::cuda {
namespace {

using Tensor = at::Tensor;

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

// Row t of a [rows, cols] matrix with unit column stride (null stays null).
template <typename scalar_t>
struct Rows {
  scalar_t* base;
  int64_t stride;
  __device__ scalar_t* operator[](int64_t t) const { return base ? base + t * stride : nullptr; }
};

template <typename scalar_t>
Rows<scalar_t> rows_of(const Tensor& t) {
  if (!t.defined() || t.numel() == 0) return Rows<scalar_t>{nullptr, 0};
  TORCH_INTERNAL_ASSERT(t.dim() == 1 || t.stride(1) == 1);
  return Rows<scalar_t>{static_cast<scalar_t*>(t.data_ptr()), t.stride(0)};
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

struct RowParams {
  int64_t rows, n, m;
  Activation act;
  SeedSource seed;
  uint32_t threshold;
  bool drop;
  double drop_scale, inv_temperature;
};

template <typename acc_t>
__device__ __forceinline__ acc_t dropped(acc_t v, const RowParams& r, DropoutRowKey key, int64_t i) {
  if (!r.drop) return v;
  return dropout_bits(key, static_cast<uint32_t>(i)) >= r.threshold ? v * acc_t(r.drop_scale) : acc_t(0);
}

__device__ __forceinline__ uint64_t seed_of(const SeedSource& s) {
  return s.device_ptr ? static_cast<uint64_t>(*s.device_ptr) : s.value;
}

// a'_i · v over one adapter's K = m + 1 columns (the last one is a' = 1), summed over the warp.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t augmented_dot(const RowParams& r, const scalar_t* h,
                                               const scalar_t* v, int lane) {
  acc_t dot = 0;
  for (int64_t j = lane; j < r.m; j += kWarp)
    dot += static_cast<acc_t>(v[j]) * activation(r.act, static_cast<acc_t>(h[j]));
  return warp_sum(dot) + static_cast<acc_t>(v[r.m]);
}

// This warp's N values of shared memory (the launch gives each warp N).
template <typename acc_t>
__device__ __forceinline__ acc_t* warp_scratch(int64_t n) {
  extern __shared__ unsigned char smem_raw[];
  return reinterpret_cast<acc_t*>(smem_raw) + (threadIdx.x / kWarp) * n;
}

// The first row of this warp; the warps of the grid then stride by row_step().
__device__ __forceinline__ int64_t first_row() {
  return int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
}
__device__ __forceinline__ int64_t row_step() { return int64_t(gridDim.x) * kWarpsPerBlock; }

template <typename scalar_t>
__global__ void forward_rows_kernel(RowParams r, Rows<const scalar_t> pre, Rows<const scalar_t> scores,
                                    Rows<scalar_t> probs, Rows<scalar_t> weighted) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* x = warp_scratch<acc_t>(r.n);
  const int lane = threadIdx.x % kWarp;
  const int64_t K = r.m + 1;
  const uint64_t seed = seed_of(r.seed);
  for (int64_t t = first_row(); t < r.rows; t += row_step()) {
    const scalar_t* h = pre[t];
    const scalar_t* s = scores[t];
    const DropoutRowKey key = dropout_row_key(seed, static_cast<uint64_t>(t));
    const acc_t key_bias = static_cast<acc_t>(s[r.n * K]);
    acc_t top = -INFINITY;
    for (int64_t i = 0; i < r.n; ++i) {
      const acc_t dot = augmented_dot<scalar_t, acc_t>(r, h + i * r.m, s + i * K, lane);
      const acc_t xi = dropped(dot + key_bias, r, key, i) * acc_t(r.inv_temperature);
      if (lane == 0) x[i] = xi;
      top = max(top, xi);
    }
    __syncwarp();
    acc_t total = 0;
    for (int64_t i = 0; i < r.n; ++i) total += act_exp(x[i] - top);
    scalar_t* p = probs[t];
    scalar_t* w = weighted[t];
    for (int64_t i = 0; i < r.n; ++i) {
      const acc_t pi = act_exp(x[i] - top) / total;
      if (lane == 0) p[i] = static_cast<scalar_t>(pi);
      const scalar_t* hi = h + i * r.m;
      for (int64_t j = lane; j < K; j += kWarp)
        w[i * K + j] = static_cast<scalar_t>(
            j < r.m ? pi * activation(r.act, static_cast<acc_t>(hi[j])) : pi);
    }
    __syncwarp();  // x is rewritten by the warp's next row
  }
}

template <typename scalar_t>
__global__ void backward_rows_kernel(RowParams r, Rows<const scalar_t> pre, Rows<const scalar_t> probs,
                                     Rows<const scalar_t> value, Rows<const scalar_t> scores,
                                     Rows<const scalar_t> grad_probs, Rows<const scalar_t> grad_pre_in,
                                     Rows<scalar_t> grad_pre, Rows<scalar_t> weighted,
                                     Rows<scalar_t> dweighted, Rows<scalar_t> dsum) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* ds = warp_scratch<acc_t>(r.n);
  const int lane = threadIdx.x % kWarp;
  const int64_t K = r.m + 1;
  const uint64_t seed = seed_of(r.seed);
  const bool with_scores = value.base != nullptr;
  for (int64_t t = first_row(); t < r.rows; t += row_step()) {
    const scalar_t* h = pre[t];
    const scalar_t* p = probs[t];
    const scalar_t* v = value[t];
    if (with_scores) {
      // dp_i = g_c · u_i, then the softmax's and dropout's backward.
      const scalar_t* gp = grad_probs[t];
      acc_t pdp = 0;
      for (int64_t i = 0; i < r.n; ++i) {
        acc_t dot = augmented_dot<scalar_t, acc_t>(r, h + i * r.m, v + i * K, lane);
        if (gp) dot += static_cast<acc_t>(gp[i]);
        if (lane == 0) ds[i] = dot;
        pdp += static_cast<acc_t>(p[i]) * dot;
      }
      __syncwarp();
      const DropoutRowKey key = dropout_row_key(seed, static_cast<uint64_t>(t));
      acc_t sum = 0;
      for (int64_t i = 0; i < r.n; ++i) {
        const acc_t d = dropped(static_cast<acc_t>(p[i]) * (ds[i] - pdp) * acc_t(r.inv_temperature),
                                r, key, i);
        sum += d;
        __syncwarp();
        if (lane == 0) ds[i] = d;
      }
      __syncwarp();
      scalar_t* dsum_t = dsum[t];
      if (dsum_t && lane == 0) dsum_t[0] = static_cast<scalar_t>(sum);
    }
    scalar_t* gpre = grad_pre[t];
    const scalar_t* gpre_in = grad_pre_in[t];
    const scalar_t* s = scores[t];
    scalar_t* w = weighted[t];
    scalar_t* dw = dweighted[t];
    for (int64_t i = 0; i < r.n; ++i) {
      const acc_t pi = static_cast<acc_t>(p[i]);
      const acc_t dsi = with_scores ? ds[i] : acc_t(0);
      const scalar_t* hi = h + i * r.m;
      for (int64_t j = lane; j < K; j += kWarp) {
        if (j == r.m) {
          if (w) w[i * K + j] = static_cast<scalar_t>(pi);
          if (dw) dw[i * K + j] = static_cast<scalar_t>(dsi);
          continue;
        }
        const auto a = activation_and_derivative(r.act, static_cast<acc_t>(hi[j]));
        if (w) w[i * K + j] = static_cast<scalar_t>(pi * a.value);
        if (dw) dw[i * K + j] = static_cast<scalar_t>(dsi * a.value);
        if (gpre) {
          acc_t g = (pi * static_cast<acc_t>(v[i * K + j]) + dsi * static_cast<acc_t>(s[i * K + j])) *
                    a.derivative;
          if (gpre_in) g += static_cast<acc_t>(gpre_in[i * r.m + j]);
          gpre[i * r.m + j] = static_cast<scalar_t>(g);
        }
      }
    }
    __syncwarp();  // ds is rewritten by the warp's next row
  }
}

RowParams row_params(const AdapterFusionRows& r, int64_t rows) {
  return RowParams{rows,        r.n,           r.m,
                   r.act,       seed_source(*r.seed), r.drop.threshold,
                   r.drop.active, r.drop.scale, r.inv_temperature};
}

struct Launch {
  dim3 grid, block;
  size_t smem;
};

template <typename acc_t>
Launch launch_for(int64_t rows, int64_t n) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return Launch{dim3(static_cast<unsigned>(std::min<int64_t>(blocks, 65535))),
                dim3(kWarpsPerBlock * kWarp), sizeof(acc_t) * kWarpsPerBlock * n};
}

void forward_rows(const AdapterFusionRows& r, const Tensor& pre, const Tensor& scores,
                  const Tensor& probs, const Tensor& weighted) {
  const c10::cuda::CUDAGuard guard(pre.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = pre.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pre.scalar_type(), "adapter_fusion_rows", [&] {
    const Launch l = launch_for<at::opmath_type<scalar_t>>(rows, r.n);
    forward_rows_kernel<scalar_t><<<l.grid, l.block, l.smem, stream>>>(
        row_params(r, rows), rows_of<const scalar_t>(pre), rows_of<const scalar_t>(scores),
        rows_of<scalar_t>(probs), rows_of<scalar_t>(weighted));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_rows(const AdapterFusionRows& r, const Tensor& pre, const Tensor& probs,
                   const Tensor& value, const Tensor& scores, const Tensor& grad_probs,
                   const Tensor& grad_pre_in, const Tensor& grad_pre, const Tensor& weighted,
                   const Tensor& dweighted, const Tensor& dsum) {
  const c10::cuda::CUDAGuard guard(pre.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = pre.size(0);
  // dsum [rows] as a column: row t's entry at t * stride.
  const Tensor dsum_col = dsum.defined() ? dsum.unsqueeze(1) : dsum;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pre.scalar_type(), "adapter_fusion_rows_backward", [&] {
    const Launch l = launch_for<at::opmath_type<scalar_t>>(rows, r.n);
    backward_rows_kernel<scalar_t><<<l.grid, l.block, l.smem, stream>>>(
        row_params(r, rows), rows_of<const scalar_t>(pre), rows_of<const scalar_t>(probs),
        rows_of<const scalar_t>(value), rows_of<const scalar_t>(scores),
        rows_of<const scalar_t>(grad_probs), rows_of<const scalar_t>(grad_pre_in),
        rows_of<scalar_t>(grad_pre), rows_of<scalar_t>(weighted), rows_of<scalar_t>(dweighted),
        rows_of<scalar_t>(dsum_col));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

constexpr AdapterFusionRowKernels kCudaRows{&forward_rows, &backward_rows};

}  // namespace

TORCH_LIBRARY_IMPL(pypeft, CUDA, m) { register_adapter_fusion_ops<kCudaRows>(m); }

}  // namespace pypeft::cuda
