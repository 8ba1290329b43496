// pypeft::lora_linear_mixed and pypeft::vera_linear_mixed, for every backend
// at once: mixed-adapter batches for serving, where each batch row runs with
// its own adapter (or none). Inference only: the Python face registers an
// autograd formula that raises.
//
// One op call per layer; the loop over adapters is here, not in Python. The
// frozen product runs once for all rows, exactly as at::linear (so base rows
// are bit for bit the plain layer's, and adapter rows add to that); then only
// the rows that have an adapter get their low-rank update:
// - LoRA, per adapter with rows: a contiguous run of rows works on narrow()
//   views of x and y (no copy, no index, the update lands with addmm_);
//   scattered rows are gathered with index_select and added with index_add_.
// - VeRA: every adapter shares A_s and B_s, so the adapter rows together take
//   one u = x A_sᵀ and one v = (λ_d ⊙ u) B_sᵀ, with λ_d and λ_b gathered per
//   row; no per-adapter GEMMs.
// Base rows are never touched (not even by adding zero, which would turn -0
// into +0 and an inf into NaN). Row indices are planned on the host from
// row_adapter and reach the device in one copy per call, none when the rows
// are grouped by adapter. An NF4 base weight (weight_absmax given) takes the
// frozen product tile by tile of its rows (pypeft/nf4_linear.h); the adapter
// part is the same.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "pypeft/mixed_linear.h"
#include "pypeft/parallel.h"

namespace pypeft {
namespace {

constexpr const char* kLoraOp = "pypeft.lora_linear_mixed";
constexpr const char* kVeraOp = "pypeft.vera_linear_mixed";

using Tensor = at::Tensor;
using OptTensor = c10::optional<Tensor>;

// An int64 buffer on the host, filled there and then moved to `device` by
// to_device(). For CUDA it is pinned, so that the copy is asynchronous.
Tensor host_index_buffer(int64_t n, const at::Device& device) {
  return at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(device.is_cuda()));
}

// The copy from pinned memory is queued on the current stream, which the
// kernels reading the index use too, so they see it complete; the caching
// host allocator records that stream and does not hand the buffer out again
// before the copy has run. Other devices take a plain (synchronous) copy.
Tensor to_device(const Tensor& host, const at::Device& device) {
  if (device.is_cpu()) return host;
  return host.to(at::TensorOptions().device(device), /*non_blocking=*/device.is_cuda());
}

// x [B, ..., in] and y [B, ..., out] as [B, M, in] and [B, M, out], M the
// product of the middle dims, so that batch rows are the first dim of both.
// y comes from at::linear and is contiguous; the view is free.
struct BatchRows {
  Tensor x3;
  Tensor y3;
  int64_t middle;
};

BatchRows batch_rows(const Tensor& x, Tensor& y, const MixedLinearDims& dims) {
  const int64_t middle = x.numel() / (dims.batch * dims.in);
  if (!y.is_contiguous()) y = y.contiguous();
  return {x.reshape({dims.batch, middle, dims.in}), y.view({dims.batch, middle, dims.out}),
          middle};
}

// The frozen product for every row: at::linear, what torch.nn.functional.linear
// runs (base rows equal it bit for bit), or the tiled NF4 product.
Tensor base_product(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                    const BaseWeight& base, const MixedLinearDims& dims) {
  if (!base.nf4()) return at::linear(x, weight, bias);
  return frozen_product(x.reshape({-1, dims.in}), weight, bias, base)
      .view(with_last_dim(x.sizes(), dims.out));
}

// --- LoRA ------------------------------------------------------------------------

// The rows of one adapter: a contiguous run [first, first + count), or
// scattered rows listed in the plan's index at [index_offset, + count).
struct RowGroup {
  int64_t adapter;
  int64_t first;
  int64_t count;
  int64_t index_offset;  // -1 for a contiguous run
};

struct LoraRowPlan {
  std::vector<RowGroup> groups;  // adapters that have rows, in adapter order
  Tensor index;                  // rows of the scattered groups, on x's device
};

LoraRowPlan plan_lora_rows(at::IntArrayRef row_adapter, int64_t adapters,
                           const at::Device& device) {
  std::vector<int64_t> count(adapters, 0), first(adapters, 0), last(adapters, 0);
  const int64_t batch = static_cast<int64_t>(row_adapter.size());
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t k = row_adapter[b];
    if (k < 0) continue;
    if (count[k]++ == 0) first[k] = b;
    last[k] = b;
  }
  LoraRowPlan plan;
  std::vector<int64_t> cursor(adapters, -1);
  int64_t scattered = 0;
  for (int64_t k = 0; k < adapters; ++k) {
    if (count[k] == 0) continue;
    const bool contiguous = last[k] - first[k] + 1 == count[k];
    if (!contiguous) {
      cursor[k] = scattered;
      scattered += count[k];
    }
    plan.groups.push_back({k, first[k], count[k], cursor[k]});
  }
  if (scattered > 0) {
    Tensor host = host_index_buffer(scattered, device);
    int64_t* idx = host.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t k = row_adapter[b];
      if (k >= 0 && cursor[k] >= 0) idx[cursor[k]++] = b;
    }
    plan.index = to_device(host, device);
  }
  return plan;
}

// Few tokens (serving): every adapter's update in one pair of GEMMs over the
// adapters stacked side by side (A_cat [R, in], B_cat [out, R], R = Σ r_k),
// each row keeping only its adapter's columns of u (a mask that also carries
// the scale). That spends R / r_k times the flops of the grouped path but
// ~8 ATen calls instead of ~5 per adapter, which is what costs at a few
// tokens per row. Only rows with an adapter are touched.
bool stacked_is_cheaper(const LoraRowPlan& plan, at::TensorList lora_a, int64_t middle,
                        const MixedLinearDims& dims) {
  int64_t stacked_rank = 0, rows = 0, grouped_macs = 0;
  for (const auto& g : plan.groups) {
    stacked_rank += lora_a[g.adapter].size(0);
    rows += g.count;
    grouped_macs += g.count * lora_a[g.adapter].size(0);
  }
  const int64_t width = dims.in + dims.out;
  const int64_t extra_macs = (rows * stacked_rank - grouped_macs) * middle * width;
  // One small ATen call costs about as much as half a million multiply-adds
  // (~10 µs on a CPU core); the grouped path makes ~5 per adapter, this one ~8.
  const int64_t saved_calls = 5 * static_cast<int64_t>(plan.groups.size()) - 8;
  return extra_macs < saved_calls * 500000;
}

void add_stacked_updates(const LoraRowPlan& plan, at::IntArrayRef row_adapter, at::TensorList lora_a,
                         at::TensorList lora_b, at::ArrayRef<double> scale, const BatchRows& rows,
                         const Tensor& y, const MixedLinearDims& dims) {
  const at::ScalarType adapter_dtype = lora_a[0].scalar_type();
  std::vector<Tensor> as, bs;
  std::vector<int64_t> offset(lora_a.size(), -1);
  int64_t rank = 0, n_rows = 0;
  for (const auto& g : plan.groups) {
    as.push_back(lora_a[g.adapter]);
    bs.push_back(lora_b[g.adapter]);
    offset[g.adapter] = rank;
    rank += lora_a[g.adapter].size(0);
    n_rows += g.count;
  }
  const int64_t batch = dims.batch, m = rows.middle;
  const bool every_row = n_rows == batch;
  // Host-built: the mask [n_rows, R] (scale in the row's adapter's columns),
  // and the adapter rows' indices when some rows are base. One copy each.
  Tensor mask = at::zeros({n_rows, rank}, at::TensorOptions().dtype(at::kDouble));
  Tensor index = every_row ? Tensor() : host_index_buffer(n_rows, y.device());
  double* mk = mask.data_ptr<double>();
  for (int64_t b = 0, i = 0; b < batch; ++b) {
    const int64_t k = row_adapter[b];
    if (k < 0) continue;
    if (!every_row) index.data_ptr<int64_t>()[i] = b;
    for (int64_t j = 0; j < lora_a[k].size(0); ++j) mk[i * rank + offset[k] + j] = scale[k];
    ++i;
  }
  mask = mask.to(y.device(), adapter_dtype).view({n_rows, 1, rank});
  if (!every_row) index = to_device(index, y.device());
  const Tensor a_cat = at::cat(as, 0), b_cat_t = at::cat(bs, 1).t();
  const Tensor xs = every_row ? rows.x3 : rows.x3.index_select(0, index);
  Tensor u = at::mm(xs.reshape({n_rows * m, dims.in}).to(adapter_dtype), a_cat.t());
  u = u.view({n_rows, m, rank}).mul_(mask).view({n_rows * m, rank});
  if (every_row && y.scalar_type() == adapter_dtype) {
    rows.y3.view({n_rows * m, dims.out}).addmm_(u, b_cat_t);
    return;
  }
  const Tensor v = at::mm(u, b_cat_t).to(y.scalar_type()).view({n_rows, m, dims.out});
  if (every_row)
    rows.y3.add_(v);
  else
    rows.y3.index_add_(0, index, v);
}

// Long rows on a CPU: each thread takes whole batch rows and runs their two
// small GEMMs on views of x and y (single-threaded inside the parallel
// region, as lora_linear's row blocks do): no gathered copy of x, no
// scatter into y, which on a CPU cost more than the GEMMs save.
void add_row_updates_cpu(const LoraRowPlan& plan, at::IntArrayRef row_adapter, at::TensorList lora_a,
                         at::TensorList lora_b, at::ArrayRef<double> scale, const BatchRows& rows,
                         const MixedLinearDims& dims) {
  std::vector<Tensor> b_scaled_t(lora_a.size());
  for (const auto& g : plan.groups) b_scaled_t[g.adapter] = lora_b[g.adapter].mul(scale[g.adapter]).t();
  parallel_for_with_caller_state(0, dims.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t k = row_adapter[b];
      if (k < 0) continue;
      const Tensor& a = lora_a[k];
      const Tensor u = at::mm(rows.x3[b].to(a.scalar_type()), a.t());
      Tensor yb = rows.y3[b];
      if (yb.scalar_type() == a.scalar_type())
        yb.addmm_(u, b_scaled_t[k]);
      else
        yb.add_(at::mm(u, b_scaled_t[k]));  // computed in float32, rounded once to y's dtype
    }
  });
}

Tensor lora_linear_mixed(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                         at::TensorList lora_a, at::TensorList lora_b, at::ArrayRef<double> scale,
                         at::IntArrayRef row_adapter, const OptTensor& weight_absmax,
                         int64_t weight_blocksize) {
  const BaseWeight base{weight_absmax, weight_blocksize};
  const auto dims = check_lora_linear_mixed_args(kLoraOp, x, weight, bias, lora_a, lora_b, scale,
                                                 row_adapter, base);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  Tensor y = base_product(x, weight, bias, base, dims);
  if (x.numel() == 0 || dims.adapters == 0) return y;
  const auto plan = plan_lora_rows(row_adapter, dims.adapters, x.device());
  if (plan.groups.empty()) return y;
  const auto rows = batch_rows(x, y, dims);
  const int64_t m = rows.middle;
  if (plan.groups.size() > 1 && stacked_is_cheaper(plan, lora_a, m, dims)) {
    add_stacked_updates(plan, row_adapter, lora_a, lora_b, scale, rows, y, dims);
    return y;
  }
  if (x.is_cpu()) {
    add_row_updates_cpu(plan, row_adapter, lora_a, lora_b, scale, rows, dims);
    return y;
  }
  for (const auto& g : plan.groups) {
    const Tensor& a = lora_a[g.adapter];
    const at::ScalarType adapter_dtype = a.scalar_type();
    // The scale folded into B ([out, r], small), as lora_linear does.
    const Tensor b_scaled_t = lora_b[g.adapter].mul(scale[g.adapter]).t();
    if (g.index_offset < 0) {
      const Tensor xs = rows.x3.narrow(0, g.first, g.count).reshape({g.count * m, dims.in});
      const Tensor u = at::mm(xs.to(adapter_dtype), a.t());
      Tensor ys = rows.y3.narrow(0, g.first, g.count).view({g.count * m, dims.out});
      if (ys.scalar_type() == adapter_dtype)
        ys.addmm_(u, b_scaled_t);
      else
        ys.add_(at::mm(u, b_scaled_t));  // computed in float32, rounded once to y's dtype
    } else {
      const Tensor idx = plan.index.narrow(0, g.index_offset, g.count);
      const Tensor xs = rows.x3.index_select(0, idx).view({g.count * m, dims.in});
      const Tensor v = at::mm(at::mm(xs.to(adapter_dtype), a.t()), b_scaled_t);
      rows.y3.index_add_(0, idx, v.to(y.scalar_type()).view({g.count, m, dims.out}));
    }
  }
  return y;
}

// --- VeRA ------------------------------------------------------------------------

// The rows that have an adapter, as one group, and which adapter each has.
struct VeraRowPlan {
  int64_t count = 0;          // rows with an adapter
  int64_t first = 0;          // their first row, when they form a contiguous run
  bool contiguous = true;
  int64_t single_adapter = -1;  // the adapter of all of them, if they share one
  Tensor rows;                // [count] row indices, when not contiguous
  Tensor adapter_of_row;      // [count] adapter per row, when not a single adapter
};

VeraRowPlan plan_vera_rows(at::IntArrayRef row_adapter, const at::Device& device) {
  VeraRowPlan plan;
  const int64_t batch = static_cast<int64_t>(row_adapter.size());
  int64_t last = -1;
  bool single = true;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t k = row_adapter[b];
    if (k < 0) continue;
    if (plan.count++ == 0) {
      plan.first = b;
      plan.single_adapter = k;
    }
    single = single && k == plan.single_adapter;
    last = b;
  }
  if (plan.count == 0) return plan;
  plan.contiguous = last - plan.first + 1 == plan.count;
  if (!single) plan.single_adapter = -1;
  const int64_t n_rows = plan.contiguous ? 0 : plan.count;
  const int64_t n_ids = single ? 0 : plan.count;
  if (n_rows + n_ids == 0) return plan;
  // Both index vectors in one buffer: one copy to the device.
  Tensor host = host_index_buffer(n_rows + n_ids, device);
  int64_t* rows = host.data_ptr<int64_t>();
  int64_t* ids = rows + n_rows;
  for (int64_t b = plan.first, i = 0; b <= last; ++b) {
    const int64_t k = row_adapter[b];
    if (k < 0) continue;
    if (n_rows) rows[i] = b;
    if (n_ids) ids[i] = k;
    ++i;
  }
  const Tensor dev = to_device(host, device);
  if (n_rows) plan.rows = dev.narrow(0, 0, n_rows);
  if (n_ids) plan.adapter_of_row = dev.narrow(0, n_rows, n_ids);
  return plan;
}

// λ's rows for the planned rows, as [count or 1, 1, width], to broadcast over M.
Tensor lambda_rows(const Tensor& lambda, const VeraRowPlan& plan) {
  const Tensor rows = plan.single_adapter >= 0 ? lambda.narrow(0, plan.single_adapter, 1)
                                               : lambda.index_select(0, plan.adapter_of_row);
  return rows.unsqueeze(1);
}

Tensor vera_linear_mixed(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                         const Tensor& vera_a, const Tensor& vera_b, const Tensor& lambda_d,
                         const Tensor& lambda_b, at::IntArrayRef row_adapter,
                         const OptTensor& weight_absmax, int64_t weight_blocksize) {
  const BaseWeight base{weight_absmax, weight_blocksize};
  const auto dims = check_vera_linear_mixed_args(kVeraOp, x, weight, bias, vera_a, vera_b,
                                                 lambda_d, lambda_b, row_adapter, base);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  Tensor y = base_product(x, weight, bias, base, dims);
  if (x.numel() == 0) return y;
  const auto plan = plan_vera_rows(row_adapter, x.device());
  if (plan.count == 0) return y;
  const auto rows = batch_rows(x, y, dims);
  const int64_t n = plan.count, m = rows.middle, r = vera_a.size(0);
  const Tensor a_s_t = vera_a.narrow(1, 0, dims.in).t();   // [in, r]
  const Tensor b_s_t = vera_b.narrow(0, 0, dims.out).t();  // [r, out]
  const Tensor xs = plan.contiguous ? rows.x3.narrow(0, plan.first, n)
                                    : rows.x3.index_select(0, plan.rows);
  Tensor u = at::mm(xs.reshape({n * m, dims.in}).to(vera_a.scalar_type()), a_s_t);
  u.view({n, m, r}).mul_(lambda_rows(lambda_d, plan));
  Tensor v = at::mm(u, b_s_t).view({n, m, dims.out});
  v.mul_(lambda_rows(lambda_b, plan));
  if (plan.contiguous)
    rows.y3.narrow(0, plan.first, n).add_(v);  // in float32 beside bf16 y, rounded once
  else
    rows.y3.index_add_(0, plan.rows, v.to(y.scalar_type()));
  return y;
}

}  // namespace

// Backend-generic: ATen calls only, so CPU and CUDA run the same code.
TORCH_LIBRARY_IMPL(pypeft, CompositeExplicitAutograd, m) {
  m.impl("lora_linear_mixed", &lora_linear_mixed);
  m.impl("vera_linear_mixed", &vera_linear_mixed);
}

}  // namespace pypeft
