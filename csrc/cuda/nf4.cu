// NF4 and 8-bit blockwise (de)quantisation on CUDA: the per-value math is
// pypeft/nf4.h's, the same the CPU kernels run (and the CPU tests check).
// Quantisation is one thread per block (a storage step, run once per weight);
// dequantisation, on the hot path of every NF4 product, one thread per byte.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "pypeft/nf4.h"
#include "pypeft/nf4_args.h"

namespace pypeft::cuda {
namespace {

constexpr const char* kQuantizeOp = "pypeft.nf4_quantize";
constexpr const char* kDequantizeOp = "pypeft.nf4_dequantize";
constexpr const char* kQuantize8Op = "pypeft.quantize_blockwise_8bit";
constexpr const char* kDequantize8Op = "pypeft.dequantize_blockwise_8bit";
constexpr int kThreads = 256;

int grid_for(int64_t work) {
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(1, ceil_div(work, kThreads)), 65535));
}

template <typename T>
__device__ float block_absmax(const T* v, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = fmaxf(m, fabsf(static_cast<float>(v[i])));
  return m;
}

template <typename scalar_t>
__global__ void nf4_quantize_kernel(const scalar_t* __restrict__ v, int64_t n, int64_t blocksize,
                                    uint8_t* __restrict__ out, float* __restrict__ absmax) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < blocks;
       b += int64_t(blockDim.x) * gridDim.x) {
    const int64_t begin = b * blocksize, end = min(n, begin + blocksize);
    const bool partial = end - begin < blocksize;
    float m = block_absmax(v + begin, end - begin);
    if (partial) m = fmaxf(m, nf4::kTinyAbsmax);
    absmax[b] = m;
    for (int64_t i = begin; i < end; i += 2) {
      const uint8_t hi = nf4::quantize(static_cast<float>(v[i]), m, partial);
      const uint8_t lo =
          i + 1 < end ? nf4::quantize(static_cast<float>(v[i + 1]), m, partial) : nf4::kZeroCode;
      out[i / 2] = nf4::pack(hi, lo);
    }
  }
}

template <typename scalar_t>
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ codes,
                                      const float* __restrict__ absmax, int64_t n,
                                      int64_t blocksize, scalar_t* __restrict__ out) {
  const int64_t bytes = (n + 1) / 2;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < bytes;
       k += int64_t(blockDim.x) * gridDim.x) {
    const uint8_t byte = codes[k];
    const float s = absmax[(2 * k) / blocksize];  // an even blocksize keeps a byte in one block
    out[2 * k] = static_cast<scalar_t>(nf4::value(nf4::high(byte)) * s);
    if (2 * k + 1 < n) out[2 * k + 1] = static_cast<scalar_t>(nf4::value(nf4::low(byte)) * s);
  }
}

template <typename scalar_t>
__global__ void quantize_8bit_kernel(const scalar_t* __restrict__ v, int64_t n, int64_t blocksize,
                                     const uint8_t* __restrict__ table, uint8_t* __restrict__ out,
                                     float* __restrict__ absmax) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < blocks;
       b += int64_t(blockDim.x) * gridDim.x) {
    const int64_t begin = b * blocksize, end = min(n, begin + blocksize);
    const float m = block_absmax(v + begin, end - begin);
    absmax[b] = m;
    const float inv = m == 0.0f ? 0.0f : 1.0f / m;
    for (int64_t i = begin; i < end; ++i)
      out[i] = m == 0.0f ? 0 : table[blockwise8::table_slot(static_cast<float>(v[i]) * inv)];
  }
}

__global__ void dequantize_8bit_kernel(const uint8_t* __restrict__ codes,
                                       const float* __restrict__ absmax,
                                       const float* __restrict__ map, int64_t n, int64_t blocksize,
                                       float* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x)
    out[i] = map[codes[i]] * absmax[i / blocksize];
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& w, int64_t blocksize) {
  check_nf4_quantize_args(kQuantizeOp, w, blocksize);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor src = w.contiguous();
  const int64_t n = src.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  at::Tensor codes = at::empty({ceil_div(n, 2)}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, w.options().dtype(at::kFloat));
  if (n == 0) return {codes, absmax};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "nf4_quantize", [&] {
    nf4_quantize_kernel<scalar_t><<<grid_for(blocks), kThreads, 0, stream>>>(
        src.const_data_ptr<scalar_t>(), n, blocksize, codes.data_ptr<uint8_t>(),
        absmax.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, absmax};
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& codes, const at::Tensor& absmax, int64_t blocksize,
                               at::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t n = check_nf4_dequantize_args(kDequantizeOp, codes, absmax, blocksize, shape, dtype);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor c = codes.contiguous(), a = absmax.contiguous();
  at::Tensor out = at::empty(shape, codes.options().dtype(dtype));
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nf4_dequantize", [&] {
    nf4_dequantize_kernel<scalar_t><<<grid_for(ceil_div(n, 2)), kThreads, 0, stream>>>(
        c.const_data_ptr<uint8_t>(), a.const_data_ptr<float>(), n, blocksize,
        out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cuda(const at::Tensor& x,
                                                                const at::Tensor& code,
                                                                int64_t blocksize) {
  check_quantize_8bit_args(kQuantize8Op, x, code, blocksize);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor src = x.contiguous();
  const int64_t n = src.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, x.options().dtype(at::kFloat));
  if (n == 0) return {codes, absmax};
  // The 64 KiB slot table is built on the host, as the CPU kernel builds it.
  const at::Tensor code_cpu = code.to(at::kCPU).contiguous();
  at::Tensor table = at::empty({blockwise8::kTableSize}, code_cpu.options().dtype(at::kByte));
  blockwise8::build_table(code_cpu.const_data_ptr<float>(), table.data_ptr<uint8_t>());
  const at::Tensor table_dev = table.to(x.device(), /*non_blocking=*/false);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "quantize_8bit", [&] {
    quantize_8bit_kernel<scalar_t><<<grid_for(blocks), kThreads, 0, stream>>>(
        src.const_data_ptr<scalar_t>(), n, blocksize, table_dev.const_data_ptr<uint8_t>(),
        codes.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_8bit_cuda(const at::Tensor& codes, const at::Tensor& absmax,
                                          const at::Tensor& code, int64_t blocksize) {
  check_dequantize_8bit_args(kDequantize8Op, codes, absmax, code, blocksize);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor c = codes.contiguous(), a = absmax.contiguous(), cm = code.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const int64_t n = c.numel();
  if (n == 0) return out;
  dequantize_8bit_kernel<<<grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      c.const_data_ptr<uint8_t>(), a.const_data_ptr<float>(), cm.const_data_ptr<float>(), n,
      blocksize, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pypeft, CUDA, m) {
  m.impl("nf4_quantize", &nf4_quantize_cuda);
  m.impl("nf4_dequantize", &nf4_dequantize_cuda);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cuda);
  m.impl("dequantize_blockwise_8bit", &dequantize_blockwise_8bit_cuda);
}

}  // namespace pypeft::cuda
