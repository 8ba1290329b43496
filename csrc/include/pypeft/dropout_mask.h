// Counter-based dropout mask: keep(seed, row, col) is a pure function, so the
// backward pass regenerates the mask instead of storing it, and CPU and CUDA
// draw the same mask for the same seed.
//
// Per row, a 64-bit key is derived from (seed, row) with splitmix64; per element
// two rounds of a 32-bit integer hash (Wellons' "lowbias32" constants) mix the
// column into that key. The per-element work is 32-bit multiplies and shifts
// only, which vectorise on CPUs (AVX2) and are cheap on GPUs.
//
// tests/reference.py re-implements this in plain PyTorch; keep them in step.
#pragma once

#include <cstdint>

#include "pypeft/macros.h"

namespace pypeft {

PYPEFT_HOST_DEVICE uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

PYPEFT_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0xD35A2D97u;
  x ^= x >> 15;
  return x;
}

struct DropoutRowKey {
  uint32_t lo;
  uint32_t hi;
};

PYPEFT_HOST_DEVICE DropoutRowKey dropout_row_key(uint64_t seed, uint64_t row) {
  const uint64_t h = splitmix64(seed ^ splitmix64(row));
  return DropoutRowKey{static_cast<uint32_t>(h), static_cast<uint32_t>(h >> 32)};
}

// 32 uniformly distributed bits for element (row, col).
PYPEFT_HOST_DEVICE uint32_t dropout_bits(DropoutRowKey key, uint32_t col) {
  return mix32(mix32(col ^ key.lo) + key.hi);
}

// An element is kept when its bits are >= the threshold, i.e. with
// probability 1 - threshold / 2^32 (exactly 1 for p == 0).
PYPEFT_HOST_DEVICE uint32_t dropout_threshold(double p) {
  if (!(p > 0.0)) return 0u;
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
}

}  // namespace pypeft

namespace pypeft {

// What a kernel needs to apply (or regenerate) one dropout mask.
struct DropoutParams {
  uint32_t threshold = 0;  // keep iff dropout_bits >= threshold
  double scale = 1.0;      // 1 / (1 - p) for kept elements
  bool active = false;     // p > 0

  static DropoutParams from_probability(double p) {
    DropoutParams d;
    d.active = p > 0.0;
    d.threshold = dropout_threshold(p);
    d.scale = d.active ? 1.0 / (1.0 - p) : 1.0;
    return d;
  }
};

}  // namespace pypeft
