// NF4 and 8-bit blockwise (de)quantisation on the CPU: blocks split across
// threads; every value's math is pypeft/nf4.h's, shared with the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "pypeft/nf4.h"
#include "pypeft/nf4_args.h"

namespace pypeft::cpu {
namespace {

constexpr const char* kQuantizeOp = "pypeft.nf4_quantize";
constexpr const char* kDequantizeOp = "pypeft.nf4_dequantize";
constexpr const char* kQuantize8Op = "pypeft.quantize_blockwise_8bit";
constexpr const char* kDequantize8Op = "pypeft.dequantize_blockwise_8bit";

// Blocks per parallel task: enough work per task that scheduling is noise.
int64_t block_grain(int64_t blocksize) { return std::max<int64_t>(1, 16384 / blocksize); }

template <typename T>
float block_absmax(const T* v, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(static_cast<float>(v[i])));
  return m;
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& w, int64_t blocksize) {
  check_nf4_quantize_args(kQuantizeOp, w, blocksize);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor src = w.contiguous();
  const int64_t n = src.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  at::Tensor codes = at::empty({ceil_div(n, 2)}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, w.options().dtype(at::kFloat));
  uint8_t* out = codes.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "nf4_quantize", [&] {
    const scalar_t* v = src.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
        const bool partial = end - begin < blocksize;
        float m = block_absmax(v + begin, end - begin);
        // bitsandbytes returns a partial block's absmax clamped, a full one's as is.
        if (partial) m = std::max(m, nf4::kTinyAbsmax);
        am[b] = m;
        for (int64_t i = begin; i < end; i += 2) {
          const uint8_t hi = nf4::quantize(static_cast<float>(v[i]), m, partial);
          const uint8_t lo =
              i + 1 < end ? nf4::quantize(static_cast<float>(v[i + 1]), m, partial) : nf4::kZeroCode;
          out[i / 2] = nf4::pack(hi, lo);
        }
      }
    });
  });
  return {codes, absmax};
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& codes, const at::Tensor& absmax, int64_t blocksize,
                              at::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t n = check_nf4_dequantize_args(kDequantizeOp, codes, absmax, blocksize, shape, dtype);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor c = codes.contiguous();
  const at::Tensor a = absmax.contiguous();
  at::Tensor out = at::empty(shape, codes.options().dtype(dtype));
  const uint8_t* in = c.const_data_ptr<uint8_t>();
  const float* am = a.const_data_ptr<float>();
  // Both values of every byte at once: one 8-byte load per byte instead of two
  // nibble lookups (this loop runs over W in every NF4 product, forward and backward).
  float pairs[256][2];
  for (int b = 0; b < 256; ++b) {
    pairs[b][0] = nf4::value(nf4::high(static_cast<uint8_t>(b)));
    pairs[b][1] = nf4::value(nf4::low(static_cast<uint8_t>(b)));
  }
  const int64_t blocks = ceil_div(n, blocksize);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nf4_dequantize", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
        const float s = am[b];
        const int64_t pairs_end = begin + (end - begin) / 2 * 2;
        for (int64_t i = begin; i < pairs_end; i += 2) {
          const float* p = pairs[in[i / 2]];
          o[i] = static_cast<scalar_t>(p[0] * s);
          o[i + 1] = static_cast<scalar_t>(p[1] * s);
        }
        if (pairs_end < end) o[end - 1] = static_cast<scalar_t>(pairs[in[(end - 1) / 2]][0] * s);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cpu(const at::Tensor& x,
                                                               const at::Tensor& code,
                                                               int64_t blocksize) {
  check_quantize_8bit_args(kQuantize8Op, x, code, blocksize);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor src = x.contiguous();
  const at::Tensor cm = code.contiguous();
  const int64_t n = src.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, x.options().dtype(at::kFloat));
  std::vector<uint8_t> table(blockwise8::kTableSize);
  blockwise8::build_table(cm.const_data_ptr<float>(), table.data());
  uint8_t* out = codes.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "quantize_8bit", [&] {
    const scalar_t* v = src.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, block_grain(blocksize), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
        const float m = block_absmax(v + begin, end - begin);
        am[b] = m;
        // An all-zero block: bitsandbytes writes code 0 (its scale 0 makes it 0 again).
        const float inv = m == 0.0f ? 0.0f : 1.0f / m;
        for (int64_t i = begin; i < end; ++i)
          out[i] = m == 0.0f ? 0 : table[blockwise8::table_slot(static_cast<float>(v[i]) * inv)];
      }
    });
  });
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_8bit_cpu(const at::Tensor& codes, const at::Tensor& absmax,
                                         const at::Tensor& code, int64_t blocksize) {
  check_dequantize_8bit_args(kDequantize8Op, codes, absmax, code, blocksize);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor c = codes.contiguous(), a = absmax.contiguous(), cm = code.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const uint8_t* in = c.const_data_ptr<uint8_t>();
  const float* am = a.const_data_ptr<float>();
  const float* map = cm.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t n = c.numel();
  at::parallel_for(0, ceil_div(n, blocksize), block_grain(blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t i = b * blocksize, end = std::min(n, i + blocksize); i < end; ++i)
        o[i] = map[in[i]] * am[b];
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pypeft, CPU, m) {
  m.impl("nf4_quantize", &nf4_quantize_cpu);
  m.impl("nf4_dequantize", &nf4_dequantize_cpu);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cpu);
  m.impl("dequantize_blockwise_8bit", &dequantize_blockwise_8bit_cpu);
}

}  // namespace pypeft::cpu
