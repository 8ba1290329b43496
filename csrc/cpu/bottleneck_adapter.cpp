// pypeft::bottleneck_adapter on the CPU.
//
// The rows are walked in cache-sized blocks, each thread its own (see
// row_blocks.h): within a block the down GEMM, the activation, the up GEMM
// into the output and the epilogue (residual + mask · scale · (u + b_up)) run
// while the block is in cache, so z, residual and the output cross memory
// once, and no N × d temporary exists besides the output. Backward likewise:
// the masked, scaled gradient and the recomputed activation exist one block
// at a time. The per-element math is pypeft/bottleneck_adapter.h, shared with
// the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "pypeft/bottleneck_adapter.h"
#include "row_blocks.h"

namespace pypeft::cpu {
namespace {

constexpr const char* kOp = "pypeft.bottleneck_adapter";
constexpr const char* kBackwardOp = "pypeft.bottleneck_adapter_backward";

using Tensor = at::Tensor;

uint64_t seed_value(const c10::optional<Tensor>& seed) {
  if (!has_value(seed)) return 0;
  return static_cast<uint64_t>(seed->item<int64_t>());
}

// acc += lhs @ rhs, where acc (a per-thread partial sum of a weight's
// gradient) may be a wider dtype than lhs and rhs.
void add_product(Tensor& acc, const Tensor& lhs, const Tensor& rhs) {
  if (acc.scalar_type() == lhs.scalar_type())
    acc.addmm_(lhs, rhs);
  else
    acc.add_(at::mm(lhs, rhs));
}

// What the output's and the gradient's loops need of the dropout mask and
// the scale: element (row, col) is multiplied by `kept` where the mask keeps
// it (scale / (1 - p)), by 0 where it drops it.
struct OutputScaling {
  bool drop;
  uint32_t threshold;
  double kept;
  uint64_t seed;

  static OutputScaling of(double scale, double dropout_p, const c10::optional<Tensor>& seed) {
    const auto d = DropoutParams::from_probability(dropout_p);
    return {d.active, d.threshold, scale * d.scale, d.active ? seed_value(seed) : 0};
  }
  DropoutRowKey key(int64_t row) const {
    return drop ? dropout_row_key(seed, static_cast<uint64_t>(row)) : DropoutRowKey{0, 0};
  }
};

// A [rows, cols] matrix as the loops read it: unit column stride, row stride
// `stride` (0 for a row of zeros standing in for an absent operand).
template <typename T>
struct RowPtr {
  T* data;
  int64_t stride;
  T* row(int64_t i) const { return data + i * stride; }
};

// (A one-row operand gets stride 0: the zero row stands in for every row.)
template <typename T>
RowPtr<const T> rows_of(const Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 2 && (t.size(0) == 0 || t.size(1) == 0 || t.stride(1) == 1));
  return {t.const_data_ptr<T>(), t.size(0) == 1 ? 0 : t.stride(0)};
}

template <typename T>
RowPtr<T> mutable_rows_of(const Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 2 && (t.size(0) == 0 || t.size(1) == 0 || t.stride(1) == 1));
  return {t.data_ptr<T>(), t.stride(0)};
}

// --- one row each: branch-free loops that the compiler vectorises -----------------
// (Checked with -fopt-info-vec: the d-wide output and gradient rows, mask hash
// included, vectorise, 8-wide in the float32 AVX2 clones. The activation rows
// have no clones: they run over [N, m] only, a small part of the work.)

template <AdapterActivation A, typename scalar_t>
void activation_row(const scalar_t* p, scalar_t* a, int64_t m) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < m; ++j)
    a[j] = static_cast<scalar_t>(adapter_activation<acc_t>(A, static_cast<acc_t>(p[j])));
}

// g = g · act'(p) + g_p (the gradient that reached p directly), in place.
template <AdapterActivation A, typename scalar_t>
void activation_grad_row(scalar_t* g, const scalar_t* p, const scalar_t* g_p, int64_t m) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < m; ++j) {
    const acc_t grad = static_cast<acc_t>(g[j]) * adapter_activation_grad<acc_t>(A, static_cast<acc_t>(p[j]));
    g[j] = static_cast<scalar_t>(grad + static_cast<acc_t>(g_p[j]));
  }
}

// out = residual + factor · (out + b_up), in place on the up-projection.
template <bool kDrop, typename scalar_t>
inline void output_row(scalar_t* out, const scalar_t* res, const at::opmath_type<scalar_t>* b_up,
                       uint32_t d, DropoutRowKey key, uint32_t threshold,
                       at::opmath_type<scalar_t> kept) {
  using acc_t = at::opmath_type<scalar_t>;
  for (uint32_t j = 0; j < d; ++j) {
    const acc_t f = kDrop ? adapter_output_factor<acc_t>(key, j, threshold, kept) : kept;
    out[j] = static_cast<scalar_t>(
        adapter_output<acc_t>(static_cast<acc_t>(res[j]), static_cast<acc_t>(out[j]), b_up[j], f));
  }
}

// g = factor · grad_out: the gradient of the up-projection's output u (and of b_up).
template <bool kDrop, typename scalar_t>
inline void masked_grad_row(const scalar_t* grad_out, scalar_t* g, uint32_t d, DropoutRowKey key,
                            uint32_t threshold, at::opmath_type<scalar_t> kept) {
  using acc_t = at::opmath_type<scalar_t>;
  for (uint32_t j = 0; j < d; ++j) {
    const acc_t f = kDrop ? adapter_output_factor<acc_t>(key, j, threshold, kept) : kept;
    g[j] = static_cast<scalar_t>(static_cast<acc_t>(grad_out[j]) * f);
  }
}

// float32, the hot path, also in an AVX2 clone picked at run time (the mask
// hash's 32-bit multiplies vectorise there).
PYPEFT_CPU_CLONES void output_row_f32(bool drop, float* out, const float* res, const float* b_up,
                                      uint32_t d, DropoutRowKey key, uint32_t threshold,
                                      float kept) {
  if (drop)
    output_row<true>(out, res, b_up, d, key, threshold, kept);
  else
    output_row<false>(out, res, b_up, d, key, threshold, kept);
}

PYPEFT_CPU_CLONES void masked_grad_row_f32(bool drop, const float* grad_out, float* g, uint32_t d,
                                           DropoutRowKey key, uint32_t threshold, float kept) {
  if (drop)
    masked_grad_row<true>(grad_out, g, d, key, threshold, kept);
  else
    masked_grad_row<false>(grad_out, g, d, key, threshold, kept);
}

template <typename scalar_t>
void run_output_row(bool drop, scalar_t* out, const scalar_t* res,
                    const at::opmath_type<scalar_t>* b_up, uint32_t d, DropoutRowKey key,
                    uint32_t threshold, double kept) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, float>) {
    output_row_f32(drop, out, res, b_up, d, key, threshold, static_cast<float>(kept));
  } else if (drop) {
    output_row<true>(out, res, b_up, d, key, threshold, static_cast<acc_t>(kept));
  } else {
    output_row<false>(out, res, b_up, d, key, threshold, static_cast<acc_t>(kept));
  }
}

template <typename scalar_t>
void run_masked_grad_row(bool drop, const scalar_t* grad_out, scalar_t* g, uint32_t d,
                         DropoutRowKey key, uint32_t threshold, double kept) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, float>) {
    masked_grad_row_f32(drop, grad_out, g, d, key, threshold, static_cast<float>(kept));
  } else if (drop) {
    masked_grad_row<true>(grad_out, g, d, key, threshold, static_cast<acc_t>(kept));
  } else {
    masked_grad_row<false>(grad_out, g, d, key, threshold, static_cast<acc_t>(kept));
  }
}

// --- a block of rows ---------------------------------------------------------------

// a = act(p) for a block ([rows, m]; a contiguous).
void activation_block(AdapterActivation act, const Tensor& p, const Tensor& a) {
  const int64_t rows = p.size(0), m = p.size(1);
  if (rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "bottleneck_activation", [&] {
    const auto src = rows_of<scalar_t>(p);
    const auto dst = mutable_rows_of<scalar_t>(a);
    with_adapter_activation(act, [&](auto A) {
      for (int64_t i = 0; i < rows; ++i) activation_row<decltype(A)::value>(src.row(i), dst.row(i), m);
    });
  });
}

// g = g · act'(p) + g_p for a block, in place on g; g_p may be a [1, m] row of zeros.
void activation_grad_block(AdapterActivation act, const Tensor& g, const Tensor& p,
                           const Tensor& g_p) {
  const int64_t rows = g.size(0), m = g.size(1);
  if (rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "bottleneck_activation_grad", [&] {
    const auto dst = mutable_rows_of<scalar_t>(g);
    const auto src = rows_of<scalar_t>(p);
    const auto extra = rows_of<scalar_t>(g_p);
    with_adapter_activation(act, [&](auto A) {
      for (int64_t i = 0; i < rows; ++i)
        activation_grad_row<decltype(A)::value>(dst.row(i), src.row(i), extra.row(i), m);
    });
  });
}

// out = residual + factor · (out + b_up) for a block whose first row is global
// row `row0`; res may be a [1, d] row of zeros.
void output_block(const Tensor& out, const Tensor& res, const Tensor& b_up, int64_t row0,
                  const OutputScaling& s) {
  const int64_t rows = out.size(0);
  const auto d = static_cast<uint32_t>(out.size(1));
  if (rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "bottleneck_output", [&] {
    const auto dst = mutable_rows_of<scalar_t>(out);
    const auto r = rows_of<scalar_t>(res);
    const auto* bias = b_up.const_data_ptr<at::opmath_type<scalar_t>>();
    for (int64_t i = 0; i < rows; ++i)
      run_output_row<scalar_t>(s.drop, dst.row(i), r.row(i), bias, d, s.key(row0 + i), s.threshold,
                               s.kept);
  });
}

// g = factor · grad_out for a block whose first row is global row `row0`.
void masked_grad_block(const Tensor& grad_out, const Tensor& g, int64_t row0,
                       const OutputScaling& s) {
  const int64_t rows = g.size(0);
  const auto d = static_cast<uint32_t>(g.size(1));
  if (rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "bottleneck_masked_grad", [&] {
    const auto src = rows_of<scalar_t>(grad_out);
    const auto dst = mutable_rows_of<scalar_t>(g);
    for (int64_t i = 0; i < rows; ++i)
      run_masked_grad_row<scalar_t>(s.drop, src.row(i), dst.row(i), d, s.key(row0 + i),
                                    s.threshold, s.kept);
  });
}

// Rows b..e of an [N, C] operand, or the [1, C] zero row standing in for it.
Tensor rows_or_zero(const Tensor& t, const Tensor& zero_row, int64_t b, int64_t e) {
  return t.defined() ? t.slice(0, b, e) : zero_row;
}

// --- the ops --------------------------------------------------------------------------

std::tuple<Tensor, Tensor> bottleneck_adapter_cpu(
    const Tensor& z, const c10::optional<Tensor>& residual, const Tensor& w_down,
    const c10::optional<Tensor>& b_down, const Tensor& w_up, const c10::optional<Tensor>& b_up,
    double scale, c10::string_view activation, double dropout_p,
    const c10::optional<Tensor>& seed) {
  const auto dims = check_bottleneck_adapter_args(kOp, z, residual, w_down, b_down, w_up, b_up,
                                                  scale, activation, dropout_p, seed);
  // The math inside is not itself differentiated (the autograd formula is
  // the backward op), also when called from C++ on tensors requiring grad.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto scaling = OutputScaling::of(scale, dropout_p, seed);
  const auto ops = bottleneck_operands(z, w_down, b_down, w_up, b_up);
  const Tensor z2 = as_rows(z, dims.d);
  const Tensor res2 = has_value(residual) ? as_rows(*residual, dims.d) : Tensor();
  const Tensor zero_row = at::zeros({1, dims.d}, z.options());
  const Tensor wd_t = ops.w_down.t(), wu_t = ops.w_up.t();

  Tensor p2 = at::empty({dims.rows, dims.m}, z.options());
  Tensor out2 = at::empty({dims.rows, dims.d}, z.options());
  const int64_t block = rows_per_block(std::max(dims.d, dims.m), z.element_size());
  const Tensor act_scratch = at::empty({num_row_chunks(dims.rows, block), block, dims.m}, z.options());
  for_each_row_block(dims.rows, block, [&](int64_t c, int64_t b, int64_t e) {
    const Tensor zb = z2.slice(0, b, e);
    Tensor pb = p2.slice(0, b, e);
    if (ops.b_down.defined())
      at::addmm_out(pb, ops.b_down, zb, wd_t);
    else
      at::mm_out(pb, zb, wd_t);
    Tensor ab = act_scratch[c].slice(0, 0, e - b);
    activation_block(dims.act, pb, ab);
    Tensor ob = out2.slice(0, b, e);
    at::mm_out(ob, ab, wu_t);
    output_block(ob, rows_or_zero(res2, zero_row, b, e), ops.b_up, b, scaling);
  });
  return {out2.view(z.sizes()), p2.view(with_last_dim(z.sizes(), dims.m))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bottleneck_adapter_backward_cpu(
    const Tensor& grad_out, const c10::optional<Tensor>& grad_p, const Tensor& z, const Tensor& p,
    const Tensor& w_down, const Tensor& w_up, double scale, c10::string_view activation,
    double dropout_p, const c10::optional<Tensor>& seed, std::array<bool, 5> output_mask) {
  const auto dims = check_bottleneck_adapter_backward_args(kBackwardOp, grad_out, grad_p, z, p,
                                                           w_down, w_up, scale, activation,
                                                           dropout_p, seed);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const BottleneckGrads need(output_mask);
  Tensor grad_z, grad_w_down, grad_b_down, grad_w_up, grad_b_up;
  if (!need.any()) return {grad_z, grad_w_down, grad_b_down, grad_w_up, grad_b_up};

  const auto scaling = OutputScaling::of(scale, dropout_p, seed);
  const Tensor z2 = as_rows(z, dims.d);
  const Tensor gy2 = as_rows(grad_out, dims.d);
  const Tensor p2 = as_rows(p, dims.m);
  const Tensor gp2 = has_value(grad_p) ? as_rows(*grad_p, dims.m) : Tensor();
  const Tensor zero_row = at::zeros({1, dims.m}, z.options());
  const Tensor wd = w_down.to(z.scalar_type()).contiguous();
  const Tensor wu = w_up.to(z.scalar_type()).contiguous();

  const int64_t block = rows_per_block(std::max(dims.d, dims.m), z.element_size());
  const int64_t chunks = num_row_chunks(dims.rows, block);
  const auto acc_type = adapter_math_type(z.scalar_type());
  const auto acc_opts = z.options().dtype(acc_type);
  auto parts = [&](bool need, at::IntArrayRef shape) {
    std::vector<int64_t> s{chunks};
    s.insert(s.end(), shape.begin(), shape.end());
    return need ? at::zeros(s, acc_opts) : Tensor();
  };
  Tensor w_down_parts = parts(need.w_down, {dims.m, dims.d});
  Tensor b_down_parts = parts(need.b_down, {dims.m});
  Tensor w_up_parts = parts(need.w_up, {dims.d, dims.m});
  Tensor b_up_parts = parts(need.b_up, {dims.d});
  Tensor grad_z2 = need.z ? at::empty({dims.rows, dims.d}, z.options()) : Tensor();
  const Tensor g_scratch = at::empty({chunks, block, dims.d}, z.options());
  const Tensor a_scratch = need.w_up ? at::empty({chunks, block, dims.m}, z.options()) : Tensor();

  for_each_row_block(dims.rows, block, [&](int64_t c, int64_t b, int64_t e) {
    // dL/du for this block, u the up-projection's output.
    Tensor g = g_scratch[c].slice(0, 0, e - b);
    masked_grad_block(gy2.slice(0, b, e), g, b, scaling);
    const Tensor pb = p2.slice(0, b, e);
    if (need.w_up) {
      Tensor ab = a_scratch[c].slice(0, 0, e - b);
      activation_block(dims.act, pb, ab);  // recomputed: only p is saved
      Tensor acc = w_up_parts[c];
      add_product(acc, g.t(), ab);
    }
    if (need.b_up) b_up_parts[c].add_(g.sum(0, false, acc_type));
    if (!need.p()) return;
    Tensor gp = at::mm(g, wu);  // dL/da, then dL/dp in place
    activation_grad_block(dims.act, gp, pb, rows_or_zero(gp2, zero_row, b, e));
    if (need.b_down) b_down_parts[c].add_(gp.sum(0, false, acc_type));
    if (need.w_down) {
      Tensor acc = w_down_parts[c];
      add_product(acc, gp.t(), z2.slice(0, b, e));
    }
    if (need.z) {
      Tensor gzb = grad_z2.slice(0, b, e);
      at::mm_out(gzb, gp, wd);
    }
  });

  const auto w_dtype = w_down.scalar_type();
  if (need.z) grad_z = grad_z2.view(z.sizes());
  if (need.w_down) grad_w_down = w_down_parts.sum(0).to(w_dtype);
  if (need.b_down) grad_b_down = b_down_parts.sum(0).to(w_dtype);
  if (need.w_up) grad_w_up = w_up_parts.sum(0).to(w_dtype);
  if (need.b_up) grad_b_up = b_up_parts.sum(0).to(w_dtype);
  return {grad_z, grad_w_down, grad_b_down, grad_w_up, grad_b_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(pypeft, CPU, m) {
  m.impl("bottleneck_adapter", &bottleneck_adapter_cpu);
  m.impl("bottleneck_adapter_backward", &bottleneck_adapter_backward_cpu);
}

}  // namespace pypeft::cpu
