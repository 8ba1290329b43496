// NF4 (QLoRA's 4-bit NormalFloat) and the 8-bit blockwise code used for its
// double quantisation: the per-element math, once, for the CPU and CUDA kernels.
//
// Every formula here reproduces bitsandbytes' CPU path bit for bit (the oracle
// in tests/test_nf4_ops.py), including its float32 rounding order:
// - NF4 quantisation (bitsandbytes::quantize_4bit, "default" kernel): a block's
//   values are scaled by the float32 reciprocal of its absmax (the last, partial
//   block is divided by its absmax instead), clamped to [-1, 1], and bucketed
//   against the midpoints of the sorted table, a midpoint itself going down
//   (torch.bucketize, right=False).
// - Dequantisation: table[code] * absmax[block] in float32, then cast.
// - 8-bit blockwise quantisation (cquantize_blockwise_cpu_fp32, bitsandbytes
//   >= 0.50): not an exact nearest-value search but a 65536-entry table over
//   [-1, 1], each entry the first code whose upper midpoint is not below it.
#pragma once

#include <cstdint>

#include "pypeft/macros.h"

namespace pypeft::nf4 {

// bitsandbytes' get_4bit_type("nf4"): quantiles of N(0, 1), sorted, 0 exactly at code 7.
PYPEFT_HOST_DEVICE float value(int code) {
  switch (code & 15) {
    case 0: return -1.0f;
    case 1: return -0.6961928009986877f;
    case 2: return -0.5250730514526367f;
    case 3: return -0.39491748809814453f;
    case 4: return -0.28444138169288635f;
    case 5: return -0.18477343022823334f;
    case 6: return -0.09105003625154495f;
    case 7: return 0.0f;
    case 8: return 0.07958029955625534f;
    case 9: return 0.16093020141124725f;
    case 10: return 0.24611230194568634f;
    case 11: return 0.33791524171829224f;
    case 12: return 0.44070982933044434f;
    case 13: return 0.5626170039176941f;
    case 14: return 0.7229568362236023f;
    default: return 1.0f;
  }
}

// The bucket boundary between codes i and i + 1, rounded as torch computes it.
PYPEFT_HOST_DEVICE float midpoint(int i) { return (value(i) + value(i + 1)) / 2.0f; }

// The code of a value already scaled into [-1, 1]: how many boundaries lie
// strictly below it.
PYPEFT_HOST_DEVICE uint8_t code_of(float scaled) {
  uint8_t q = 0;
  for (int i = 0; i < 15; ++i) q += scaled > midpoint(i) ? 1 : 0;
  return q;
}

// What the scale of an all-zero block is clamped to before dividing by it.
constexpr float kTinyAbsmax = 1e-38f;

// Scale then bucket: `last_block` selects bitsandbytes' division for the
// partial block at the end (full blocks multiply by the reciprocal).
PYPEFT_HOST_DEVICE uint8_t quantize(float v, float absmax, bool last_block) {
  const float scale = absmax > kTinyAbsmax ? absmax : kTinyAbsmax;
  float s = last_block ? v / scale : v * (1.0f / scale);
  s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
  return code_of(s);
}

// Packing: element 2k in the high nibble of byte k, element 2k + 1 in the low.
PYPEFT_HOST_DEVICE uint8_t high(uint8_t byte) { return byte >> 4; }
PYPEFT_HOST_DEVICE uint8_t low(uint8_t byte) { return byte & 15; }
PYPEFT_HOST_DEVICE uint8_t pack(uint8_t hi, uint8_t lo) {
  return static_cast<uint8_t>((hi << 4) | lo);
}

// The code of the padding nibble after an odd element count: zero's code.
constexpr uint8_t kZeroCode = 7;

}  // namespace pypeft::nf4

namespace pypeft::blockwise8 {

constexpr int kCodes = 256;
constexpr int kTableSize = 65536;

// A value scaled into [-1, 1] -> its slot in the 65536-entry table.
PYPEFT_HOST_DEVICE uint16_t table_slot(float v) {
  v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
  return static_cast<uint16_t>((v + 1.0f) * 0.5f * static_cast<float>(kTableSize - 1) + 0.5f);
}

// Fills table[kTableSize] for a sorted 256-value code: slot i holds the first
// code whose midpoint with its successor is not below the slot's value.
inline void build_table(const float* code, uint8_t* table) {
  float mid[kCodes - 1];
  for (int i = 0; i < kCodes - 1; ++i) mid[i] = 0.5f * (code[i] + code[i + 1]);
  int c = 0;
  for (int i = 0; i < kTableSize; ++i) {
    const float v = -1.0f + (2.0f * static_cast<float>(i)) / static_cast<float>(kTableSize - 1);
    while (c < kCodes - 1 && mid[c] < v) ++c;
    table[i] = static_cast<uint8_t>(c);
  }
}

}  // namespace pypeft::blockwise8
