// The quant payload's argument checks, shared by the CUDA kernel (quant_pack.cu) and the C++ CPU kernel
// (codecs_cpu.cpp): bit widths, element types and the unpack operands (codes uint8 [G, S * bits / 8],
// lo/step float16 [G], exponent int8 [G]). Host code only.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <string>

namespace memcomp_quant {

inline void check_bits(int64_t bits, const char* where) {
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, where, ": bits=", bits,
              " is not allowed; use one of 1, 2, 4, 8");
}

inline void check_dtype(at::ScalarType dtype, const char* where) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, where, ": dtype ", dtype,
              " is not supported (float32, float16, bfloat16; float64 uses the torch path)");
}

// checks unpack's operands; returns the number of groups
inline int64_t check_unpack_args(const torch::Tensor& codes, const torch::Tensor& lo, const torch::Tensor& step,
                                 const torch::Tensor& exponent, int64_t bits, at::ScalarType dtype,
                                 const char* where) {
  check_bits(bits, where);
  check_dtype(dtype, where);
  TORCH_CHECK(codes.dim() == 2, where, ": codes must be [G, group_size * bits / 8], got ", codes.sizes());
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && lo.scalar_type() == torch::kHalf &&
                  step.scalar_type() == torch::kHalf && exponent.scalar_type() == torch::kChar,
              where, ": expected uint8 codes, float16 lo/step and int8 exponent");
  const int64_t G = codes.size(0);
  TORCH_CHECK(lo.numel() == G && step.numel() == G && exponent.numel() == G,
              where, ": lo, step and exponent need one entry per group (", G, ")");
  return G;
}

}  // namespace memcomp_quant
