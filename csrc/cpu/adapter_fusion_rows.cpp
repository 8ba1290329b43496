// adapter_fusion's per-row loops on the CPU, and the ops' CPU registration
// (the driver with every GEMM is csrc/adapter_fusion.cpp). Rows are split
// across threads; one row's N scores, softmax and N·(m+1) weighted
// activations are computed while the row's slices of the GEMM outputs are in
// cache. The activation is a template parameter so that its switch leaves
// the inner loops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "pypeft/activation.h"
#include "pypeft/adapter_fusion.h"
#include "pypeft/checks.h"

namespace pypeft::cpu {
namespace {

using Tensor = at::Tensor;

template <Activation A>
using ActivationTag = std::integral_constant<Activation, A>;

template <typename Fn>
void with_activation(Activation a, const Fn& fn) {
  switch (a) {
    case Activation::kRelu: return fn(ActivationTag<Activation::kRelu>{});
    case Activation::kSilu: return fn(ActivationTag<Activation::kSilu>{});
    case Activation::kGelu: return fn(ActivationTag<Activation::kGelu>{});
    case Activation::kGeluTanh: return fn(ActivationTag<Activation::kGeluTanh>{});
    case Activation::kTanh: return fn(ActivationTag<Activation::kTanh>{});
    case Activation::kSigmoid: return fn(ActivationTag<Activation::kSigmoid>{});
    case Activation::kLeakyRelu: return fn(ActivationTag<Activation::kLeakyRelu>{});
    case Activation::kIdentity: return fn(ActivationTag<Activation::kIdentity>{});
  }
}

// Row t of a [rows, cols] matrix with unit column stride (null stays null).
template <typename scalar_t>
struct Rows {
  scalar_t* base = nullptr;
  int64_t stride = 0;
  Rows() = default;
  explicit Rows(const Tensor& t) {
    if (!t.defined() || t.numel() == 0) return;
    TORCH_INTERNAL_ASSERT(t.dim() == 1 || t.stride(1) == 1);
    base = static_cast<scalar_t*>(t.data_ptr());
    stride = t.stride(0);
  }
  scalar_t* operator[](int64_t t) const { return base ? base + t * stride : nullptr; }
};

uint64_t seed_value(const OptTensor* seed) {
  return seed && has_value(*seed) ? static_cast<uint64_t>((*seed)->item<int64_t>()) : 0;
}

// Rows per task: about 16k values of work.
int64_t row_grain(int64_t per_row) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_row));
}

// drop(score) for adapter i of row t: kept ones scaled, dropped ones 0.
template <typename acc_t>
acc_t dropped(acc_t v, const DropoutParams& drop, DropoutRowKey key, int64_t i) {
  if (!drop.active) return v;
  return dropout_bits(key, static_cast<uint32_t>(i)) >= drop.threshold ? v * acc_t(drop.scale)
                                                                      : acc_t(0);
}

// a'_i · v over one adapter's K = m + 1 columns (the last one is a' = 1).
template <typename scalar_t, Activation A, typename acc_t = at::opmath_type<scalar_t>>
acc_t augmented_dot(const scalar_t* h, const scalar_t* v, int64_t m) {
  acc_t dot = static_cast<acc_t>(v[m]);
  for (int64_t j = 0; j < m; ++j)
    dot += static_cast<acc_t>(v[j]) * activation(A, static_cast<acc_t>(h[j]));
  return dot;
}

template <typename scalar_t, Activation A>
void forward_rows_typed(const AdapterFusionRows& r, const Tensor& pre, const Tensor& scores,
                        const Tensor& probs, const Tensor& weighted) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = pre.size(0), n = r.n, m = r.m, K = m + 1;
  const Rows<const scalar_t> pre_r(pre), score_r(scores);
  const Rows<scalar_t> prob_r(probs), weighted_r(weighted);
  const uint64_t seed = seed_value(r.seed);
  const acc_t inv_t = static_cast<acc_t>(r.inv_temperature);
  at::parallel_for(0, T, row_grain(n * K), [&](int64_t b, int64_t e) {
    std::vector<acc_t> x(n);
    for (int64_t t = b; t < e; ++t) {
      const scalar_t* h = pre_r[t];
      const scalar_t* s = score_r[t];
      const DropoutRowKey key = dropout_row_key(seed, static_cast<uint64_t>(t));
      const acc_t key_bias = static_cast<acc_t>(s[n * K]);  // q·b_k
      acc_t top = -INFINITY;
      for (int64_t i = 0; i < n; ++i) {
        const acc_t dot = augmented_dot<scalar_t, A>(h + i * m, s + i * K, m);
        x[i] = dropped(dot + key_bias, r.drop, key, i) * inv_t;
        top = std::max(top, x[i]);
      }
      acc_t total = 0;
      for (int64_t i = 0; i < n; ++i) total += (x[i] = std::exp(x[i] - top));
      scalar_t* p = prob_r[t];
      scalar_t* w = weighted_r[t];
      for (int64_t i = 0; i < n; ++i) {
        const acc_t pi = x[i] / total;
        p[i] = static_cast<scalar_t>(pi);
        const scalar_t* hi = h + i * m;
        scalar_t* wi = w + i * K;
        for (int64_t j = 0; j < m; ++j)
          wi[j] = static_cast<scalar_t>(pi * activation(A, static_cast<acc_t>(hi[j])));
        wi[m] = static_cast<scalar_t>(pi);
      }
    }
  });
}

template <typename scalar_t, Activation A>
void backward_rows_typed(const AdapterFusionRows& r, const Tensor& pre, const Tensor& probs,
                         const Tensor& value, const Tensor& scores, const Tensor& grad_probs,
                         const Tensor& grad_pre_in, const Tensor& grad_pre, const Tensor& weighted,
                         const Tensor& dweighted, const Tensor& dsum) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = pre.size(0), n = r.n, m = r.m, K = m + 1;
  const Rows<const scalar_t> pre_r(pre), prob_r(probs), value_r(value), score_r(scores),
      gprob_r(grad_probs), gpre_in_r(grad_pre_in);
  const Rows<scalar_t> gpre_r(grad_pre), weighted_r(weighted), dweighted_r(dweighted);
  scalar_t* dsum_p = dsum.defined() ? dsum.data_ptr<scalar_t>() : nullptr;
  const int64_t dsum_stride = dsum.defined() ? dsum.stride(0) : 0;
  const uint64_t seed = seed_value(r.seed);
  const acc_t inv_t = static_cast<acc_t>(r.inv_temperature);
  const bool with_scores = value.defined();
  at::parallel_for(0, T, row_grain(n * K), [&](int64_t b, int64_t e) {
    std::vector<acc_t> ds(n);
    for (int64_t t = b; t < e; ++t) {
      const scalar_t* h = pre_r[t];
      const scalar_t* p = prob_r[t];
      const scalar_t* v = value_r[t];
      if (with_scores) {
        // dp_i = g_c · u_i, then the softmax's and dropout's backward.
        const scalar_t* gp = gprob_r[t];
        acc_t pdp = 0;
        for (int64_t i = 0; i < n; ++i) {
          acc_t dot = augmented_dot<scalar_t, A>(h + i * m, v + i * K, m);
          if (gp) dot += static_cast<acc_t>(gp[i]);
          ds[i] = dot;
          pdp += static_cast<acc_t>(p[i]) * dot;
        }
        const DropoutRowKey key = dropout_row_key(seed, static_cast<uint64_t>(t));
        acc_t sum = 0;
        for (int64_t i = 0; i < n; ++i) {
          ds[i] = dropped(static_cast<acc_t>(p[i]) * (ds[i] - pdp) * inv_t, r.drop, key, i);
          sum += ds[i];
        }
        if (dsum_p) dsum_p[t * dsum_stride] = static_cast<scalar_t>(sum);
      }
      scalar_t* gpre = gpre_r[t];
      const scalar_t* gpre_in = gpre_in_r[t];
      const scalar_t* s = score_r[t];
      scalar_t* w = weighted_r[t];
      scalar_t* dw = dweighted_r[t];
      for (int64_t i = 0; i < n; ++i) {
        const acc_t pi = static_cast<acc_t>(p[i]);
        const acc_t dsi = with_scores ? ds[i] : acc_t(0);
        const scalar_t* hi = h + i * m;
        for (int64_t j = 0; j < m; ++j) {
          const auto a = activation_and_derivative(A, static_cast<acc_t>(hi[j]));
          if (w) w[i * K + j] = static_cast<scalar_t>(pi * a.value);
          if (dw) dw[i * K + j] = static_cast<scalar_t>(dsi * a.value);
          if (gpre) {
            acc_t ga = pi * static_cast<acc_t>(v[i * K + j]) +
                       dsi * static_cast<acc_t>(s[i * K + j]);
            acc_t g = ga * a.derivative;
            if (gpre_in) g += static_cast<acc_t>(gpre_in[i * m + j]);
            gpre[i * m + j] = static_cast<scalar_t>(g);
          }
        }
        if (w) w[i * K + m] = static_cast<scalar_t>(pi);
        if (dw) dw[i * K + m] = static_cast<scalar_t>(dsi);
      }
    }
  });
}

void forward_rows(const AdapterFusionRows& r, const Tensor& pre, const Tensor& scores,
                  const Tensor& probs, const Tensor& weighted) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, pre.scalar_type(), "adapter_fusion_rows", [&] {
    with_activation(r.act, [&](auto tag) {
      forward_rows_typed<scalar_t, decltype(tag)::value>(r, pre, scores, probs, weighted);
    });
  });
}

void backward_rows(const AdapterFusionRows& r, const Tensor& pre, const Tensor& probs,
                   const Tensor& value, const Tensor& scores, const Tensor& grad_probs,
                   const Tensor& grad_pre_in, const Tensor& grad_pre, const Tensor& weighted,
                   const Tensor& dweighted, const Tensor& dsum) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, pre.scalar_type(), "adapter_fusion_rows_backward", [&] {
    with_activation(r.act, [&](auto tag) {
      backward_rows_typed<scalar_t, decltype(tag)::value>(r, pre, probs, value, scores, grad_probs,
                                                          grad_pre_in, grad_pre, weighted,
                                                          dweighted, dsum);
    });
  });
}

constexpr AdapterFusionRowKernels kCpuRows{&forward_rows, &backward_rows};

}  // namespace

TORCH_LIBRARY_IMPL(pypeft, CPU, m) { register_adapter_fusion_ops<kCpuRows>(m); }

}  // namespace pypeft::cpu
