// at::parallel_for for loops that call ATen ops on the worker threads.
//
// at::parallel_for does not carry the calling thread's thread-local state
// (dispatch-key guards such as AutoDispatchBelowADInplaceOrView, grad mode,
// inference mode) to the OpenMP workers: an ATen op called there would see
// autograd again, and e.g. at::mm_out on a tensor that requires grad raises.
// Loops of plain arithmetic do not need this and use at::parallel_for.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace pypeft {

template <typename Fn>
void parallel_for_with_caller_state(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  const at::ThreadLocalState caller;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    const at::ThreadLocalStateGuard guard(caller);
    fn(b, e);
  });
}

}  // namespace pypeft
