#include "dropout_rows.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "pypeft/checks.h"

namespace pypeft::cuda {
namespace {

// One block row of threads per matrix row (grid-strided), so the row key is
// derived once per thread and row rather than per element.
template <typename scalar_t>
__global__ void dropout_rows_kernel(const scalar_t* __restrict__ src, int64_t src_stride,
                                    scalar_t* dst, int64_t dst_stride, int64_t rows,
                                    int64_t cols, SeedSource seed, const int64_t* row_ids,
                                    uint32_t threshold, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const uint64_t s = seed.device_ptr ? static_cast<uint64_t>(*seed.device_ptr) : seed.value;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t global_row = row_ids ? row_ids[row] : row;
    const DropoutRowKey key = dropout_row_key(s, static_cast<uint64_t>(global_row));
    for (int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; col < cols;
         col += int64_t(blockDim.x) * gridDim.x) {
      const acc_t m = dropout_bits(key, static_cast<uint32_t>(col)) >= threshold ? scale : acc_t(0);
      dst[row * dst_stride + col] =
          static_cast<scalar_t>(static_cast<acc_t>(src[row * src_stride + col]) * m);
    }
  }
}

}  // namespace

SeedSource seed_source(const c10::optional<at::Tensor>& seed) {
  SeedSource s;
  if (!has_value(seed)) return s;
  if (seed->is_cuda())
    s.device_ptr = seed->const_data_ptr<int64_t>();
  else
    s.value = static_cast<uint64_t>(seed->item<int64_t>());
  return s;
}

void dropout_rows(const at::Tensor& src, const at::Tensor& dst, SeedSource seed,
                  const DropoutParams& d, const int64_t* row_ids) {
  TORCH_INTERNAL_ASSERT(src.dim() == 2 && dst.sizes() == src.sizes());
  const int64_t rows = src.size(0), cols = src.size(1);
  if (rows == 0 || cols == 0) return;
  TORCH_INTERNAL_ASSERT(src.stride(1) == 1 && dst.stride(1) == 1);
  const c10::cuda::CUDAGuard guard(src.device());
  constexpr int threads = 256;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((cols + threads - 1) / threads, 1024)),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "dropout_rows", [&] {
    dropout_rows_kernel<scalar_t><<<grid, threads, 0, stream>>>(
        src.const_data_ptr<scalar_t>(), src.stride(0), dst.data_ptr<scalar_t>(), dst.stride(0),
        rows, cols, seed, row_ids, d.threshold, static_cast<at::opmath_type<scalar_t>>(d.scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace pypeft::cuda
