// Per-group k-bit quantization of saved activations: fused statistics + pack, and unpack.
//
// Same numbers, bit for bit, as the torch reference in lightning_memcomp/compression/quant.py
// (quantize_groups / dequantize_groups) for float16, bfloat16 and float32 tensors (float64 stays on the
// torch path). Per group of S elements, with mn / mx the group's extremes, e the frexp exponent of
// max(|mn|, |mx|) clamped to [-127, 127] and inv = 2^-e:
//
// * constant group (mn == mx): codes 0, exponent -128 (the flag), and the float32 bits of mn split
//   over lo (high 16 bits) and step (low 16 bits), so it decodes exactly;
// * zero-based group (mn == 0 < mx), flagged by a negative step: code 0 is an exact zero, a positive x
//   gets 1 + clamp(round((x*inv - lo) / |step|), 0, L - 1), L = 2^bits - 1, with lo = fp16(min positive
//   * inv) rounded down and |step| = fp16((mx*inv - lo) / (L - 1)) rounded up; at 1 bit lo is the mean
//   positive value (rounded to nearest), step is -0 and every positive gets code 1;
// * ordinary group: lo = fp16(mn*inv) rounded down, step = fp16((mx*inv - lo) / L) rounded up,
//   q = clamp(round((x*inv - lo) / step), 0, L).
//
// A positive value that rounds down to a zero lo gets the smallest fp16 subnormal instead. Rounding is
// half-to-even (torch.round) or stochastic, floor(v + u) with u ~ U[0, 1) from a counter-based hash.
// A group holding NaN or Inf clears the `finite` flag that pack returns (the caller then keeps the
// tensor as it is). Codes are packed 8 / bits per byte, the first element in the lowest bits.
//
// The build passes --use_fast_math, which flushes float32 subnormals to zero (-ftz=true) in ordinary
// float arithmetic, comparisons, min/max and fabsf, and lets the compiler contract a*b+c into an FMA.
// The reference works on subnormals (inv can be 2^-127, tiny groups, float32 subnormal outputs), so
// every float operation here goes through the IEEE, non-flushing PTX helpers below, and powers of two,
// frexp and signs are computed on the bits.

#include <torch/extension.h>
#include "quant_format.h"
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <vector>

using memcomp_quant::check_bits;
using memcomp_quant::check_dtype;
using memcomp_quant::check_unpack_args;

namespace {

constexpr int kMaxThreads = 256;
constexpr int kWarp = 32;
constexpr int kConstantExponent = -128;  // int8 min: the constant-group flag
constexpr uint32_t kFullMask = 0xffffffffu;

// ---- IEEE float32 operations that never flush subnormals and never fuse -------------------------
__device__ __forceinline__ float f_add(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float f_sub(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float f_mul(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float f_div(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float f_rint(float a) {  // round half to even (torch.round)
  float r;
  asm("cvt.rni.f32.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}
__device__ __forceinline__ float f_floor(float a) {
  float r;
  asm("cvt.rmi.f32.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}
__device__ __forceinline__ bool f_lt(float a, float b) {
  uint32_t r;
  asm("{\n\t.reg .pred p;\n\tsetp.lt.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(a), "f"(b));
  return r != 0;
}
__device__ __forceinline__ bool f_eq(float a, float b) {
  uint32_t r;
  asm("{\n\t.reg .pred p;\n\tsetp.eq.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(a), "f"(b));
  return r != 0;
}
__device__ __forceinline__ bool f_gt(float a, float b) { return f_lt(b, a); }
__device__ __forceinline__ double f_widen(float a) {  // exact
  double r;
  asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(a));
  return r;
}
__device__ __forceinline__ float f_narrow(double a) {  // rounded to nearest even
  float r;
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(a));
  return r;
}
__device__ __forceinline__ float f_max(float a, float b) { return f_lt(a, b) ? b : a; }  // operands finite
__device__ __forceinline__ float f_min(float a, float b) { return f_lt(b, a) ? b : a; }
__device__ __forceinline__ bool f_signbit(float a) { return (__float_as_uint(a) >> 31) != 0; }
__device__ __forceinline__ bool f_finite(float a) { return (__float_as_uint(a) & 0x7f800000u) != 0x7f800000u; }
__device__ __forceinline__ float f_abs(float a) { return __uint_as_float(__float_as_uint(a) & 0x7fffffffu); }

// group extremes: -0 counts as below +0 for the minimum and +0 above -0 for the maximum, so the
// result does not depend on the reduction order (torch.aminmax keeps whichever zero comes first)
__device__ __forceinline__ float group_min(float a, float b) {
  if (f_lt(b, a)) return b;
  if (f_lt(a, b)) return a;
  return f_signbit(b) ? b : a;
}
__device__ __forceinline__ float group_max(float a, float b) {
  if (f_lt(a, b)) return b;
  if (f_lt(b, a)) return a;
  return f_signbit(b) ? a : b;
}

// 2^k exactly, subnormal included, for -149 <= k <= 127 (torch.ldexp(1, k))
__device__ __forceinline__ float pow2(int k) {
  if (k >= -126) return __uint_as_float(static_cast<uint32_t>(k + 127) << 23);
  return __uint_as_float(1u << (k + 149));
}

// torch.frexp(a).exponent for finite a >= 0 (0 for 0; subnormals included)
__device__ __forceinline__ int frexp_exponent(float a) {
  const uint32_t u = __float_as_uint(a) & 0x7fffffffu;
  if (u == 0) return 0;
  const int biased = static_cast<int>(u >> 23);
  if (biased != 0) return biased - 126;
  return (32 - __clz(u)) - 149;  // subnormal: a = m * 2^-149
}

// float32 -> float16 rounded to nearest even / toward -inf / toward +inf (no flushing: the cvt has no .ftz)
__device__ __forceinline__ __half to_half_rn(float v) { return __float2half_rn(v); }
__device__ __forceinline__ __half to_half_rd(float v) { return __float2half_rd(v); }
__device__ __forceinline__ __half to_half_ru(float v) { return __float2half_ru(v); }
__device__ __forceinline__ uint16_t half_bits(__half h) { return __half_as_ushort(h); }
__device__ __forceinline__ float half_bits_to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }

template <typename T> __device__ __forceinline__ float load_float(const T* p);
template <> __device__ __forceinline__ float load_float<float>(const float* p) { return *p; }
template <> __device__ __forceinline__ float load_float<at::Half>(const at::Half* p) {
  return __half2float(*reinterpret_cast<const __half*>(p));
}
template <> __device__ __forceinline__ float load_float<at::BFloat16>(const at::BFloat16* p) {
  return __uint_as_float(static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(p)) << 16);  // exact
}

template <typename T> __device__ __forceinline__ void store_float(T* p, float v);
template <> __device__ __forceinline__ void store_float<float>(float* p, float v) { *p = v; }
template <> __device__ __forceinline__ void store_float<at::Half>(at::Half* p, float v) {
  *reinterpret_cast<__half*>(p) = __float2half_rn(v);
}
template <> __device__ __forceinline__ void store_float<at::BFloat16>(at::BFloat16* p, float v) {
  *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(v);
}

// finfo(T).max and nextafter(0, 1) in T, as float32
template <typename T> struct Limits;
template <> struct Limits<float> {
  __device__ static float max() { return __uint_as_float(0x7f7fffffu); }
  __device__ static float smallest() { return __uint_as_float(0x00000001u); }  // 2^-149
};
template <> struct Limits<at::Half> {
  __device__ static float max() { return 65504.0f; }
  __device__ static float smallest() { return __uint_as_float(0x33800000u); }  // 2^-24
};
template <> struct Limits<at::BFloat16> {
  __device__ static float max() { return __uint_as_float(0x7f7f0000u); }
  __device__ static float smallest() { return __uint_as_float(0x00010000u); }  // 2^-133
};

// counter-based uniform in [0, 1): a 64-bit mix (splitmix64) of the seed and the element index
__device__ __forceinline__ float uniform01(uint64_t seed, uint64_t index) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (index + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // 24 random bits, exact
}

// per-thread partial statistics of a group
struct Stats {
  float mn;      // minimum
  float mx;      // maximum
  float minpos;  // smallest positive value (+inf if none), bits > 1
  double sum;    // sum of the positive values, bits == 1
  int count;     // number of positive values, bits == 1
};

__device__ __forceinline__ void combine(Stats& a, const Stats& b) {
  a.mn = group_min(a.mn, b.mn);
  a.mx = group_max(a.mx, b.mx);
  a.minpos = f_lt(b.minpos, a.minpos) ? b.minpos : a.minpos;
  a.sum += b.sum;
  a.count += b.count;
}

__device__ __forceinline__ Stats shuffle_xor(const Stats& s, int offset) {
  Stats o;
  o.mn = __shfl_xor_sync(kFullMask, s.mn, offset);
  o.mx = __shfl_xor_sync(kFullMask, s.mx, offset);
  o.minpos = __shfl_xor_sync(kFullMask, s.minpos, offset);
  o.sum = __shfl_xor_sync(kFullMask, s.sum, offset);
  o.count = __shfl_xor_sync(kFullMask, s.count, offset);
  return o;
}

// One block per group; blockDim.x is a multiple of 32 (at most kMaxThreads).
template <typename T>
__global__ void pack_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes, __half* __restrict__ lo_out,
                            __half* __restrict__ step_out, int8_t* __restrict__ exp_out,
                            unsigned int* __restrict__ finite_word, int group_size, int bits, bool stochastic,
                            uint64_t seed) {
  const int64_t g = blockIdx.x;
  const T* xg = x + g * static_cast<int64_t>(group_size);
  const float inf = __uint_as_float(0x7f800000u);

  // ---- pass 1: statistics --------------------------------------------------------------------
  Stats s{inf, -inf, inf, 0.0, 0};
  bool finite = true;
  for (int i = threadIdx.x; i < group_size; i += blockDim.x) {
    const float v = load_float(xg + i);
    finite = finite && f_finite(v);
    s.mn = group_min(s.mn, v);
    s.mx = group_max(s.mx, v);
    if (f_gt(v, 0.0f)) {
      s.minpos = f_lt(v, s.minpos) ? v : s.minpos;
      if (bits == 1) {
        s.sum += f_widen(v);
        s.count += 1;
      }
    }
  }
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) combine(s, shuffle_xor(s, offset));
  __shared__ Stats s_warp[kMaxThreads / kWarp];
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int nwarps = blockDim.x / kWarp;
  if (lane == 0) s_warp[warp] = s;
  // every thread learns whether the whole group is finite (also the barrier for s_warp)
  const bool all_finite = __syncthreads_and(finite) != 0;
  s = s_warp[0];
  for (int w = 1; w < nwarps; ++w) combine(s, s_warp[w]);  // same order in every thread

  const int per = 8 / bits;
  const int nbytes = group_size / per;
  uint8_t* cg = codes + g * static_cast<int64_t>(nbytes);
  if (!all_finite) {  // the caller discards the whole tensor: only leave defined bytes behind
    if (threadIdx.x == 0) {
      atomicAnd(finite_word, 0u);
      lo_out[g] = __ushort_as_half(0);
      step_out[g] = __ushort_as_half(0);
      exp_out[g] = 0;
    }
    for (int b = threadIdx.x; b < nbytes; b += blockDim.x) cg[b] = 0;
    return;
  }

  // ---- group parameters (every thread computes the same numbers) ----------------------------
  const float mn = s.mn;
  const float mx = s.mx;
  const int levels = (1 << bits) - 1;
  const int e = max(-127, min(127, frexp_exponent(f_max(f_abs(mn), f_abs(mx)))));
  const float inv = pow2(-e);
  const bool constant = f_eq(mn, mx);
  const bool zero_based = f_eq(mn, 0.0f) && f_gt(mx, 0.0f);
  float low;
  if (!zero_based) {
    low = mn;
  } else if (bits > 1) {
    low = s.minpos;
  } else {
    // the mean positive value: sum / count in float32 as in the reference; the sum is accumulated in
    // float64 and rounded once (torch's float32 sum depends on its summation order, so lo may rarely
    // differ from the reference by one fp16 ulp here)
    low = f_div(f_narrow(s.sum), static_cast<float>(max(s.count, 1)));
  }
  low = f_mul(low, inv);
  uint16_t lo_bits = half_bits((bits == 1 && zero_based) ? to_half_rn(low) : to_half_rd(low));
  if (f_gt(low, 0.0f) && (lo_bits & 0x7fffu) == 0) lo_bits = 0x0001u;  // smallest fp16 subnormal
  const float lo = half_bits_to_float(lo_bits);
  const float span = f_sub(f_mul(mx, inv), lo);
  const float nsteps = static_cast<float>(zero_based ? max(levels - 1, 1) : levels);
  uint16_t step_bits = half_bits(to_half_ru(f_div(span, nsteps)));
  if (bits == 1 && zero_based) step_bits = 0;
  const float step = half_bits_to_float(step_bits);
  const float divisor = f_gt(step, 0.0f) ? step : 1.0f;

  if (threadIdx.x == 0) {
    if (constant) {
      const uint32_t mn_bits = __float_as_uint(mn);
      lo_out[g] = __ushort_as_half(static_cast<uint16_t>(mn_bits >> 16));
      step_out[g] = __ushort_as_half(static_cast<uint16_t>(mn_bits & 0xffffu));
      exp_out[g] = static_cast<int8_t>(kConstantExponent);
    } else {
      lo_out[g] = __ushort_as_half(lo_bits);
      step_out[g] = __ushort_as_half(zero_based ? static_cast<uint16_t>(step_bits ^ 0x8000u) : step_bits);
      exp_out[g] = static_cast<int8_t>(e);
    }
  }

  // ---- pass 2: codes, one element per thread, bytes assembled across lanes ------------------
  // per divides 8 and the group size is a multiple of 8, so the lanes sharing a byte are always
  // `per` consecutive lanes of one warp starting at a multiple of per.
  const int top = zero_based ? max(levels - 1, 0) : levels;
  for (int base = 0; base < group_size; base += blockDim.x) {
    const int i = base + threadIdx.x;
    unsigned int q = 0;
    if (i < group_size && !constant) {
      const float v = load_float(xg + i);
      if (!zero_based || f_gt(v, 0.0f)) {
        float t = f_div(f_sub(f_mul(v, inv), lo), divisor);
        t = stochastic ? f_floor(f_add(t, uniform01(seed, static_cast<uint64_t>(g) * group_size + i)))
                       : f_rint(t);
        t = f_min(f_max(t, 0.0f), static_cast<float>(top));
        q = static_cast<unsigned int>(t);
        if (zero_based) q = bits == 1 ? 1u : q + 1u;
      }
    }
    unsigned int byte = q << ((i % per) * bits);
    for (int offset = 1; offset < per; offset <<= 1) byte |= __shfl_xor_sync(kFullMask, byte, offset);
    if (i < group_size && i % per == 0) cg[i / per] = static_cast<uint8_t>(byte);
  }
}

template <typename T>
__global__ void unpack_kernel(const uint8_t* __restrict__ codes, const __half* __restrict__ lo_in,
                              const __half* __restrict__ step_in, const int8_t* __restrict__ exp_in,
                              T* __restrict__ out, int group_size, int bits, int64_t total) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= total) return;
  const int64_t g = idx / group_size;
  const int per = 8 / bits;
  const int levels = (1 << bits) - 1;
  const int q = (codes[idx / per] >> (static_cast<int>(idx % per) * bits)) & levels;
  const uint16_t lo_bits = __half_as_ushort(lo_in[g]);
  const uint16_t step_bits = __half_as_ushort(step_in[g]);
  const int e = static_cast<int>(exp_in[g]);
  float v;
  if (e == kConstantExponent) {  // the exact value, its bits split over lo and step
    v = __uint_as_float((static_cast<uint32_t>(lo_bits) << 16) | static_cast<uint32_t>(step_bits));
  } else {
    const bool zero_based = (step_bits & 0x8000u) != 0;
    const float lo = half_bits_to_float(lo_bits);
    const float step = half_bits_to_float(static_cast<uint16_t>(step_bits & 0x7fffu));  // |step|
    const float qf = static_cast<float>(zero_based ? q - 1 : q);
    v = f_mul(f_add(lo, f_mul(qf, step)), pow2(e));
    if (zero_based && q == 0) v = 0.0f;
    v = f_min(f_max(v, -Limits<T>::max()), Limits<T>::max());
    // positives stay positive in the output dtype (exact ReLU masks)
    const bool positive = zero_based ? q > 0 : f_gt(lo, 0.0f);
    if (positive) v = f_max(v, Limits<T>::smallest());
  }
  store_float<T>(out + idx, v);
}

template <typename T>
void launch_pack(const torch::Tensor& x, torch::Tensor& codes, torch::Tensor& lo, torch::Tensor& step,
                 torch::Tensor& exponent, torch::Tensor& finite, int threads, int bits, bool stochastic,
                 uint64_t seed) {
  const int64_t G = x.size(0);
  pack_kernel<T><<<G, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<T>(), codes.data_ptr<uint8_t>(), reinterpret_cast<__half*>(lo.data_ptr<at::Half>()),
      reinterpret_cast<__half*>(step.data_ptr<at::Half>()), exponent.data_ptr<int8_t>(),
      reinterpret_cast<unsigned int*>(finite.data_ptr<uint8_t>()), static_cast<int>(x.size(1)), bits, stochastic,
      seed);
}

template <typename T>
void launch_unpack(const torch::Tensor& c, const torch::Tensor& lo, const torch::Tensor& step,
                   const torch::Tensor& exponent, torch::Tensor& out, int group_size, int bits) {
  const int64_t total = out.numel();
  const int64_t blocks = (total + kMaxThreads - 1) / kMaxThreads;
  unpack_kernel<T><<<blocks, kMaxThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      c.data_ptr<uint8_t>(), reinterpret_cast<const __half*>(lo.data_ptr<at::Half>()),
      reinterpret_cast<const __half*>(step.data_ptr<at::Half>()), exponent.data_ptr<int8_t>(), out.data_ptr<T>(),
      group_size, bits, total);
}

}  // namespace

// groups [G, S] -> (codes uint8 [G, S*bits/8], lo f16 [G], step f16 [G], exponent i8 [G], finite u8 [])
std::vector<torch::Tensor> pack(torch::Tensor groups, int64_t bits, bool stochastic, int64_t seed) {
  TORCH_CHECK(groups.is_cuda(), "quant_pack.pack: groups must be a CUDA tensor");
  TORCH_CHECK(groups.dim() == 2, "quant_pack.pack: groups must be [G, group_size], got ", groups.sizes());
  check_bits(bits, "quant_pack.pack");
  check_dtype(groups.scalar_type(), "quant_pack.pack");
  TORCH_CHECK(groups.size(1) > 0 && groups.size(1) % 8 == 0, "quant_pack.pack: group_size must be a positive "
              "multiple of 8, got ", groups.size(1));
  TORCH_CHECK(groups.size(1) <= (int64_t{1} << 30), "quant_pack.pack: group_size is too large");
  const c10::cuda::CUDAGuard guard(groups.device());
  auto x = groups.contiguous();
  const int64_t G = x.size(0);
  const int group_size = static_cast<int>(x.size(1));
  TORCH_CHECK(G <= int64_t{0x7fffffff}, "quant_pack.pack: too many groups");
  auto codes = torch::empty({G, group_size * bits / 8}, x.options().dtype(torch::kUInt8));
  auto lo = torch::empty({G}, x.options().dtype(torch::kHalf));
  auto step = torch::empty({G}, x.options().dtype(torch::kHalf));
  auto exponent = torch::empty({G}, x.options().dtype(torch::kInt8));
  // the flag lives in the first byte of a 4-byte word that the kernel clears with an atomic
  auto finite_word = torch::ones({4}, x.options().dtype(torch::kUInt8));
  auto finite = finite_word.select(0, 0);
  if (G == 0) return {codes, lo, step, exponent, finite};
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (group_size + kWarp - 1) / kWarp * kWarp));
  const int b = static_cast<int>(bits);
  const uint64_t s = static_cast<uint64_t>(seed);
  switch (x.scalar_type()) {
    case at::kFloat: launch_pack<float>(x, codes, lo, step, exponent, finite_word, threads, b, stochastic, s); break;
    case at::kHalf: launch_pack<at::Half>(x, codes, lo, step, exponent, finite_word, threads, b, stochastic, s); break;
    default: launch_pack<at::BFloat16>(x, codes, lo, step, exponent, finite_word, threads, b, stochastic, s); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, lo, step, exponent, finite};
}

torch::Tensor unpack(torch::Tensor codes, torch::Tensor lo, torch::Tensor step, torch::Tensor exponent,
                     int64_t bits, at::ScalarType dtype) {
  TORCH_CHECK(codes.is_cuda(), "quant_pack.unpack: codes must be a CUDA tensor");
  const int64_t G = check_unpack_args(codes, lo, step, exponent, bits, dtype, "quant_pack.unpack");
  TORCH_CHECK(lo.device() == codes.device() && step.device() == codes.device() &&
                  exponent.device() == codes.device(),
              "quant_pack.unpack: codes, lo, step and exponent must be on the same device");
  const c10::cuda::CUDAGuard guard(codes.device());
  auto c = codes.contiguous();
  const int group_size = static_cast<int>(c.size(1) * 8 / bits);
  auto out = torch::empty({G, group_size}, c.options().dtype(dtype));
  if (out.numel() == 0) return out;
  auto lo_c = lo.contiguous();
  auto step_c = step.contiguous();
  auto exp_c = exponent.contiguous();
  const int b = static_cast<int>(bits);
  switch (dtype) {
    case at::kFloat: launch_unpack<float>(c, lo_c, step_c, exp_c, out, group_size, b); break;
    case at::kHalf: launch_unpack<at::Half>(c, lo_c, step_c, exp_c, out, group_size, b); break;
    default: launch_unpack<at::BFloat16>(c, lo_c, step_c, exp_c, out, group_size, b); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lightning_memcomp per-group k-bit quantization: fused statistics + pack, and unpack";
  m.def("pack", &pack,
        "groups [G, S] (float32/float16/bfloat16) -> (codes uint8 [G, S*bits/8], lo f16 [G], step f16 [G], "
        "exponent i8 [G], finite u8 [] (0 when a group holds NaN or Inf))",
        py::arg("groups"), py::arg("bits"), py::arg("stochastic"), py::arg("seed"));
  m.def("unpack", &unpack, "(codes, lo, step, exponent, bits, dtype) -> [G, S] of dtype", py::arg("codes"),
        py::arg("lo"), py::arg("step"), py::arg("exponent"), py::arg("bits"), py::arg("dtype"));
}
