// pypeft::nf4_linear (y = x · deq(W)ᵀ + b over an NF4 weight) and the tiled
// NF4 products of pypeft/nf4_linear.h, for every backend at once: the
// dequantisation runs in pypeft::nf4_dequantize's CPU or CUDA kernel, the
// products in ATen's GEMMs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <numeric>
#include <string>

#include "pypeft/lora_linear.h"
#include "pypeft/nf4_args.h"
#include "pypeft/nf4_linear.h"
#include "pypeft/op_handles.h"

namespace pypeft {

Nf4Weight check_nf4_weight(const char* op, const Nf4ArgNames& names, const at::Tensor& codes,
                           const at::Tensor& absmax, int64_t blocksize, const at::Tensor& x,
                           const char* x_arg) {
  const char* codes_arg = names.codes;
  check_dim(op, codes_arg, codes, 2);
  PYPEFT_CHECK_TYPE(codes.scalar_type() == at::kByte, op, codes_arg,
                    "uint8 NF4 codes [out, in / 2]", c10::toString(codes.scalar_type()));
  check_same_device(op, codes_arg, codes, x_arg, x);
  check_nf4_blocksize(op, blocksize, names.blocksize);
  const int64_t out = codes.size(0), in = codes.size(1) * 2;
  const int64_t x_in = x.dim() == 0 ? 1 : x.size(-1);
  PYPEFT_CHECK_VALUE(x_in == in, op, x_arg,
                     "last dim " + std::to_string(in) + " (in_features: twice " + codes_arg +
                         "'s " + std::to_string(codes.size(1)) + " bytes per row)",
                     "shape " + shape_str(x.sizes()));
  check_absmax(op, absmax, ceil_div(out * in, blocksize), codes_arg, codes, names.absmax);
  return {codes, absmax, blocksize, out, in};
}

namespace {

constexpr const char* kOp = "pypeft.nf4_linear";
constexpr const char* kBackwardOp = "pypeft.nf4_linear_backward";

// Rows per tile: about `target` values of scratch, a multiple of the rows that
// make whole blocks. Each tile is one GEMM, and each GEMM streams the other
// operand (x, or grad_x as an accumulator) once more: on a 2-core CPU, 4096 x
// 4096 in tiles of 256 rows made the products 11% slower than one GEMM, in
// tiles of 1024 rows 3.5% (16 MB of float32 scratch, a quarter of that W).
int64_t tile_rows(const Nf4Weight& w, bool cuda) {
  const int64_t target = cuda ? (int64_t{1} << 24) : (int64_t{1} << 22);
  const int64_t align = w.blocksize / std::gcd(w.in, w.blocksize);
  const int64_t rows = std::max<int64_t>(1, target / std::max<int64_t>(1, w.in));
  return std::max(align, rows / align * align);
}

template <typename Fn>
void for_each_tile(const Nf4Weight& w, at::ScalarType dtype, bool cuda, const Fn& fn) {
  const int64_t rows = tile_rows(w, cuda);
  const at::Tensor codes = w.codes.contiguous();
  for (int64_t o0 = 0; o0 < w.out; o0 += rows) {
    const int64_t t = std::min(rows, w.out - o0);
    const int64_t first_block = o0 * w.in / w.blocksize;
    const int64_t blocks = ceil_div(t * w.in, w.blocksize);
    const std::vector<c10::SymInt> shape{c10::SymInt(t), c10::SymInt(w.in)};
    const at::Tensor tile = ops::nf4_dequantize().call(
        codes.narrow(0, o0, t), w.absmax.narrow(0, first_block, blocks), w.blocksize, shape, dtype);
    fn(o0, t, tile);
  }
}

bool low_precision(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

}  // namespace

at::Tensor nf4_matmul_wt(const at::Tensor& x2, const Nf4Weight& w,
                         const c10::optional<at::Tensor>& bias) {
  at::Tensor y = at::empty({x2.size(0), w.out}, x2.options());
  for_each_tile(w, x2.scalar_type(), x2.is_cuda(), [&](int64_t o0, int64_t t, const at::Tensor& tile) {
    at::Tensor yt = y.narrow(1, o0, t);
    if (has_value(bias))
      at::addmm_out(yt, bias->narrow(0, o0, t), x2, tile.t());
    else
      at::mm_out(yt, x2, tile.t());
  });
  return y;
}

void nf4_matmul_w(at::Tensor& grad_x2, const at::Tensor& gy2, const Nf4Weight& w, bool accumulate) {
  // Each tile is one term of a sum over out: in bfloat16/float16 the terms are
  // added in float32, or every tile would round the running sum again.
  const bool wide = low_precision(grad_x2.scalar_type());
  at::Tensor acc = wide ? (accumulate ? grad_x2.to(at::kFloat) : at::zeros_like(grad_x2, at::kFloat))
                        : grad_x2;
  bool first = !accumulate && !wide;
  for_each_tile(w, gy2.scalar_type(), gy2.is_cuda(), [&](int64_t o0, int64_t t, const at::Tensor& tile) {
    const at::Tensor g = gy2.narrow(1, o0, t);
    if (wide)
      acc.add_(at::mm(g, tile));
    else if (first)
      at::mm_out(acc, g, tile);
    else
      acc.addmm_(g, tile);
    first = false;
  });
  if (first) acc.zero_();  // out == 0: no tile ran
  if (wide) grad_x2.copy_(acc);
}

namespace {

at::Tensor nf4_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& absmax,
                      int64_t blocksize, const c10::optional<at::Tensor>& bias) {
  check_defined(kOp, "x", x);
  PYPEFT_CHECK_VALUE(x.dim() >= 1, kOp, "x", "a tensor of shape [..., in_features]", "a 0-D tensor");
  check_activation_dtype(kOp, "x", x);
  const Nf4Weight w = check_nf4_weight(kOp, "weight", weight, absmax, blocksize, x);
  if (has_value(bias)) {
    check_dim(kOp, "bias", *bias, 1);
    check_size(kOp, "bias", *bias, 0, w.out, "out_features, from weight [out, in / 2]");
    check_same_device(kOp, "bias", *bias, "x", x);
    check_same_dtype(kOp, "bias", *bias, "x", x);
  }
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x2 = x.reshape({-1, w.in}).contiguous();
  return nf4_matmul_wt(x2, w, bias).view(with_last_dim(x.sizes(), w.out));
}

std::tuple<at::Tensor, at::Tensor> nf4_linear_backward(const at::Tensor& grad_y,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& absmax, int64_t blocksize,
                                                       std::array<bool, 2> output_mask) {
  check_defined(kBackwardOp, "grad_y", grad_y);
  check_activation_dtype(kBackwardOp, "grad_y", grad_y);
  check_dim(kBackwardOp, "weight", weight, 2);
  PYPEFT_CHECK_VALUE(grad_y.dim() >= 1 && grad_y.size(-1) == weight.size(0), kBackwardOp, "grad_y",
                     "last dim " + std::to_string(weight.size(0)) + " (out_features, from weight)",
                     "shape " + shape_str(grad_y.sizes()));
  // The checks of the weight read in_features off an x of the right width.
  const at::Tensor x_like = at::empty({0, weight.size(1) * 2}, grad_y.options());
  const Nf4Weight w =
      check_nf4_weight(kBackwardOp, "weight", weight, absmax, blocksize, x_like, "grad_y");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto [need_x, need_bias] = output_mask;
  const at::Tensor gy2 = grad_y.reshape({-1, w.out}).contiguous();
  at::Tensor grad_x, grad_bias;
  if (need_x) {
    at::Tensor gx2 = at::empty({gy2.size(0), w.in}, grad_y.options());
    nf4_matmul_w(gx2, gy2, w, /*accumulate=*/false);
    grad_x = gx2.view(with_last_dim(grad_y.sizes(), w.in));
  }
  if (need_bias) grad_bias = gy2.sum(0);
  return {grad_x, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pypeft, CompositeExplicitAutograd, m) {
  m.impl("nf4_linear", &nf4_linear);
  m.impl("nf4_linear_backward", &nf4_linear_backward);
}

}  // namespace pypeft
