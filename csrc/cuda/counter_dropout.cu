// pypeft::counter_dropout on CUDA: one launch of dropout_rows (same mask as the CPU).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dropout_rows.cuh"
#include "pypeft/counter_dropout.h"

namespace pypeft::cuda {
namespace {

constexpr const char* kOp = "pypeft.counter_dropout";

at::Tensor counter_dropout_cuda(const at::Tensor& x, double p,
                                const c10::optional<at::Tensor>& seed,
                                const c10::optional<at::Tensor>& row_ids) {
  const auto dims = check_counter_dropout_args(kOp, x, p, seed, row_ids);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto drop = DropoutParams::from_probability(p);
  if (!drop.active) return x.clone(at::MemoryFormat::Contiguous);
  const at::Tensor src = x.contiguous().view({dims.rows, dims.cols});
  at::Tensor out = at::empty({dims.rows, dims.cols}, x.options());
  const at::Tensor ids = has_value(row_ids) ? row_ids->contiguous() : at::Tensor();
  dropout_rows(src, out, seed_source(seed), drop,
               ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr);
  return out.view(x.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(pypeft, CUDA, m) { m.impl("counter_dropout", &counter_dropout_cuda); }

}  // namespace pypeft::cuda
