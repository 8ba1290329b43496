// pypeft::counter_dropout on the CPU: rows split across threads; the mask is
// a pure function of (seed, global row, column), so the split does not matter.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dropout_rows.h"
#include "pypeft/counter_dropout.h"

namespace pypeft::cpu {
namespace {

constexpr const char* kOp = "pypeft.counter_dropout";

at::Tensor counter_dropout_cpu(const at::Tensor& x, double p, const c10::optional<at::Tensor>& seed,
                               const c10::optional<at::Tensor>& row_ids) {
  const auto dims = check_counter_dropout_args(kOp, x, p, seed, row_ids);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto drop = DropoutParams::from_probability(p);
  if (!drop.active) return x.clone(at::MemoryFormat::Contiguous);
  const uint64_t seed_v = static_cast<uint64_t>(seed->item<int64_t>());
  const at::Tensor src = x.contiguous().view({dims.rows, dims.cols});
  at::Tensor out = at::empty({dims.rows, dims.cols}, x.options());
  const at::Tensor ids = has_value(row_ids) ? row_ids->contiguous() : at::Tensor();
  const int64_t* id_ptr = ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, dims.cols));
  at::parallel_for(0, dims.rows, grain, [&](int64_t b, int64_t e) {
    dropout_rows(src.slice(0, b, e), out.slice(0, b, e), b, seed_v, drop, id_ptr);
  });
  return out.view(x.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(pypeft, CPU, m) { m.impl("counter_dropout", &counter_dropout_cpu); }

}  // namespace pypeft::cpu
