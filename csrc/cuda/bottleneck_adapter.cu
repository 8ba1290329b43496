// pypeft::bottleneck_adapter on CUDA: cuBLAS GEMMs (through ATen) for the
// four products, and elementwise kernels for what lies between them — the
// activation, the epilogue (residual + mask · scale · (u + b_up), in place on
// the up-projection), the masked scaled gradient, and grad_p = grad_a ·
// act'(p). The per-element math is pypeft/bottleneck_adapter.h, the same code
// the CPU kernel (csrc/cpu/bottleneck_adapter.cpp) runs, with the same mask.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "dropout_rows.cuh"
#include "pypeft/bottleneck_adapter.h"

namespace pypeft::cuda {
namespace {

constexpr const char* kOp = "pypeft.bottleneck_adapter";
constexpr const char* kBackwardOp = "pypeft.bottleneck_adapter_backward";

using Tensor = at::Tensor;

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)));
}

// A [rows, cols] operand's row stride (unit column stride asserted); 0 for
// the one-row zero operand standing in for an absent one.
int64_t row_stride(const Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 2 && t.is_cuda());
  TORCH_INTERNAL_ASSERT(t.size(0) == 0 || t.size(1) == 0 || t.stride(1) == 1);
  return t.size(0) == 1 ? 0 : t.stride(0);
}

// --- [N, m]: the bottleneck ----------------------------------------------------------

template <AdapterActivation A, typename scalar_t>
__global__ void activation_kernel(const scalar_t* __restrict__ p, int64_t p_stride,
                                  scalar_t* __restrict__ a, int64_t rows, int64_t m) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < rows * m;
       k += int64_t(blockDim.x) * gridDim.x) {
    const int64_t i = k / m, j = k - i * m;
    a[k] = static_cast<scalar_t>(adapter_activation<acc_t>(A, static_cast<acc_t>(p[i * p_stride + j])));
  }
}

// g = g · act'(p) + g_p, in place on g (contiguous).
template <AdapterActivation A, typename scalar_t>
__global__ void activation_grad_kernel(scalar_t* g, const scalar_t* __restrict__ p, int64_t p_stride,
                                       const scalar_t* __restrict__ g_p, int64_t g_p_stride,
                                       int64_t rows, int64_t m) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < rows * m;
       k += int64_t(blockDim.x) * gridDim.x) {
    const int64_t i = k / m, j = k - i * m;
    const acc_t d = adapter_activation_grad<acc_t>(A, static_cast<acc_t>(p[i * p_stride + j]));
    g[k] = static_cast<scalar_t>(static_cast<acc_t>(g[k]) * d + static_cast<acc_t>(g_p[i * g_p_stride + j]));
  }
}

// a = act(p), a fresh contiguous [N, m].
Tensor activate(AdapterActivation act, const Tensor& p) {
  Tensor a = at::empty(p.sizes(), p.options());
  const int64_t rows = p.size(0), m = p.size(1);
  if (rows == 0) return a;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "bottleneck_activation", [&] {
    with_adapter_activation(act, [&](auto A) {
      activation_kernel<decltype(A)::value, scalar_t><<<blocks_for(rows * m), kThreads, 0, stream>>>(
          p.const_data_ptr<scalar_t>(), row_stride(p), a.data_ptr<scalar_t>(), rows, m);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return a;
}

// g = g · act'(p) + g_p in place (g contiguous); g_p may be a [1, m] zero row.
void activation_grad(AdapterActivation act, const Tensor& g, const Tensor& p, const Tensor& g_p) {
  const int64_t rows = g.size(0), m = g.size(1);
  if (rows == 0) return;
  TORCH_INTERNAL_ASSERT(g.is_contiguous());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "bottleneck_activation_grad", [&] {
    with_adapter_activation(act, [&](auto A) {
      activation_grad_kernel<decltype(A)::value, scalar_t><<<blocks_for(rows * m), kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(), row_stride(p), g_p.const_data_ptr<scalar_t>(),
          row_stride(g_p), rows, m);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// --- [N, d]: the output and its gradient ------------------------------------------------

// What the output's and the gradient's kernels need of the scale and the mask.
struct OutputScaling {
  bool drop;
  SeedSource seed;
  uint32_t threshold;
  double kept;  // scale / (1 - p): the factor of a kept element

  static OutputScaling of(double scale, double dropout_p, const c10::optional<Tensor>& seed) {
    const auto d = DropoutParams::from_probability(dropout_p);
    return {d.active, d.active ? seed_source(seed) : SeedSource{}, d.threshold, scale * d.scale};
  }
};

// Calls fn(i, j, factor) for every element (i, j) of an [rows, d] matrix,
// factor = kept where the mask keeps the element, 0 where it drops it. Thread
// rows of a 2-D grid walk the matrix rows (grid-strided), so a row's mask key
// is derived once per thread and row, as in dropout_rows.cu.
template <bool kDrop, typename acc_t, typename Fn>
__device__ __forceinline__ void for_each_scaled_element(int64_t rows, int64_t d, const SeedSource& seed,
                                                        uint32_t threshold, acc_t kept, Fn fn) {
  const uint64_t s = kDrop ? (seed.device_ptr ? static_cast<uint64_t>(*seed.device_ptr) : seed.value) : 0;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const DropoutRowKey key = kDrop ? dropout_row_key(s, static_cast<uint64_t>(i)) : DropoutRowKey{0, 0};
    for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < d;
         j += int64_t(blockDim.x) * gridDim.x)
      fn(i, j, kDrop ? adapter_output_factor<acc_t>(key, static_cast<uint32_t>(j), threshold, kept) : kept);
  }
}

// out = residual + factor · (out + b_up), in place on out (contiguous).
template <bool kDrop, typename scalar_t>
__global__ void output_kernel(scalar_t* out, const scalar_t* __restrict__ res, int64_t res_stride,
                              const at::opmath_type<scalar_t>* __restrict__ b_up, int64_t rows,
                              int64_t d, SeedSource seed, uint32_t threshold,
                              at::opmath_type<scalar_t> kept) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_scaled_element<kDrop>(rows, d, seed, threshold, kept, [&](int64_t i, int64_t j, acc_t f) {
    scalar_t* o = out + i * d + j;
    *o = static_cast<scalar_t>(
        adapter_output<acc_t>(static_cast<acc_t>(res[i * res_stride + j]), static_cast<acc_t>(*o), b_up[j], f));
  });
}

// g = factor · grad_out, g a fresh contiguous [N, d].
template <bool kDrop, typename scalar_t>
__global__ void masked_grad_kernel(const scalar_t* __restrict__ grad_out, int64_t gy_stride,
                                   scalar_t* __restrict__ g, int64_t rows, int64_t d, SeedSource seed,
                                   uint32_t threshold, at::opmath_type<scalar_t> kept) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_scaled_element<kDrop>(rows, d, seed, threshold, kept, [&](int64_t i, int64_t j, acc_t f) {
    g[i * d + j] = static_cast<scalar_t>(static_cast<acc_t>(grad_out[i * gy_stride + j]) * f);
  });
}

dim3 row_grid(int64_t rows, int64_t d) {
  return dim3(static_cast<unsigned>(std::min<int64_t>((d + kThreads - 1) / kThreads, 1024)),
              static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
}

void output_epilogue(const Tensor& out, const Tensor& res, const Tensor& b_up, double scale,
                     double dropout_p, const c10::optional<Tensor>& seed) {
  const int64_t rows = out.size(0), d = out.size(1);
  if (rows == 0) return;
  TORCH_INTERNAL_ASSERT(out.is_contiguous());
  const auto s = OutputScaling::of(scale, dropout_p, seed);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "bottleneck_output", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<row_grid(rows, d), kThreads, 0, stream>>>(
          out.data_ptr<scalar_t>(), res.const_data_ptr<scalar_t>(), row_stride(res),
          b_up.const_data_ptr<acc_t>(), rows, d, s.seed, s.threshold, static_cast<acc_t>(s.kept));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (s.drop)
      launch(output_kernel<true, scalar_t>);
    else
      launch(output_kernel<false, scalar_t>);
  });
}

Tensor masked_grad(const Tensor& grad_out, double scale, double dropout_p,
                   const c10::optional<Tensor>& seed) {
  const int64_t rows = grad_out.size(0), d = grad_out.size(1);
  Tensor g = at::empty({rows, d}, grad_out.options());
  if (rows == 0) return g;
  const auto s = OutputScaling::of(scale, dropout_p, seed);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "bottleneck_masked_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<row_grid(rows, d), kThreads, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), row_stride(grad_out), g.data_ptr<scalar_t>(), rows, d,
          s.seed, s.threshold, static_cast<acc_t>(s.kept));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (s.drop)
      launch(masked_grad_kernel<true, scalar_t>);
    else
      launch(masked_grad_kernel<false, scalar_t>);
  });
  return g;
}

// --- the ops ------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> bottleneck_adapter_cuda(
    const Tensor& z, const c10::optional<Tensor>& residual, const Tensor& w_down,
    const c10::optional<Tensor>& b_down, const Tensor& w_up, const c10::optional<Tensor>& b_up,
    double scale, c10::string_view activation, double dropout_p,
    const c10::optional<Tensor>& seed) {
  const auto dims = check_bottleneck_adapter_args(kOp, z, residual, w_down, b_down, w_up, b_up,
                                                  scale, activation, dropout_p, seed);
  // The math inside is not itself differentiated (the autograd formula is
  // the backward op), also when called from C++ on tensors requiring grad.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(z.device());
  const auto ops = bottleneck_operands(z, w_down, b_down, w_up, b_up);
  const Tensor z2 = as_rows(z, dims.d);
  const Tensor res2 = has_value(residual) ? as_rows(*residual, dims.d) : at::zeros({1, dims.d}, z.options());

  Tensor p2 = ops.b_down.defined() ? at::addmm(ops.b_down, z2, ops.w_down.t()) : at::mm(z2, ops.w_down.t());
  Tensor out2 = at::mm(activate(dims.act, p2), ops.w_up.t());  // act(p) is a temporary
  output_epilogue(out2, res2, ops.b_up, scale, dropout_p, seed);
  return {out2.view(z.sizes()), p2.view(with_last_dim(z.sizes(), dims.m))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bottleneck_adapter_backward_cuda(
    const Tensor& grad_out, const c10::optional<Tensor>& grad_p, const Tensor& z, const Tensor& p,
    const Tensor& w_down, const Tensor& w_up, double scale, c10::string_view activation,
    double dropout_p, const c10::optional<Tensor>& seed, std::array<bool, 5> output_mask) {
  const auto dims = check_bottleneck_adapter_backward_args(kBackwardOp, grad_out, grad_p, z, p,
                                                           w_down, w_up, scale, activation,
                                                           dropout_p, seed);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(z.device());
  const BottleneckGrads need(output_mask);
  Tensor grad_z, grad_w_down, grad_b_down, grad_w_up, grad_b_up;
  if (!need.any()) return {grad_z, grad_w_down, grad_b_down, grad_w_up, grad_b_up};

  const auto w_dtype = w_down.scalar_type();
  const auto math = adapter_math_type(z.scalar_type());
  const Tensor z2 = as_rows(z, dims.d);
  const Tensor p2 = as_rows(p, dims.m);
  const Tensor g = masked_grad(as_rows(grad_out, dims.d), scale, dropout_p, seed);  // dL/du
  if (need.w_up) grad_w_up = at::mm(g.t(), activate(dims.act, p2)).to(w_dtype);
  if (need.b_up) grad_b_up = g.sum(0, false, math).to(w_dtype);
  if (need.p()) {
    Tensor gp = at::mm(g, w_up.to(z.scalar_type()));  // dL/da, then dL/dp in place
    const Tensor extra = has_value(grad_p) ? as_rows(*grad_p, dims.m) : at::zeros({1, dims.m}, z.options());
    activation_grad(dims.act, gp, p2, extra);
    if (need.b_down) grad_b_down = gp.sum(0, false, math).to(w_dtype);
    if (need.w_down) grad_w_down = at::mm(gp.t(), z2).to(w_dtype);
    if (need.z) grad_z = at::mm(gp, w_down.to(z.scalar_type())).view(z.sizes());
  }
  return {grad_z, grad_w_down, grad_b_down, grad_w_up, grad_b_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(pypeft, CUDA, m) {
  m.impl("bottleneck_adapter", &bottleneck_adapter_cuda);
  m.impl("bottleneck_adapter_backward", &bottleneck_adapter_backward_cuda);
}

}  // namespace pypeft::cuda
