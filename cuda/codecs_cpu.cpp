// CPU kernels of the `quant` and `blpa` codecs: fused, group by group / channel by channel, no full-size
// temporaries. Built by lightning_memcomp.kernels with torch.utils.cpp_extension.load and the flags
// -O3 -fopenmp -ffp-contract=off -fno-trapping-math (no fast-math): every float operation below rounds once,
// in the order the torch references do, and subnormals are kept, so the results are the references' bits
// (-fno-trapping-math changes no value: it lets the compiler vectorize the float selects).
//
// quant (lightning_memcomp/compression/quant.py, _quantize_chunk / _dequantize_chunk; the CUDA twin is
// cuda/quant_pack.cu, whose comments describe the format): per group of S elements, one pass for the
// statistics and one for the codes, packed straight into the uint8 payload; stochastic rounding draws
// u = splitmix64(seed, element index) in the loop, the same counter-based uniform as the CUDA kernel, so
// codes do not depend on the thread count. Decoding builds, per group, the table of the 2^bits decoded
// values and writes the output once.
//
// blpa (lightning_memcomp/compression/blpa.py, blpa_quantize / _dequantize_rows): a tensor flattened in
// memory order is [outer, C, inner] with the channel dimension in the middle (inner = 1 for channels_last).
// blpa_stats gives per channel min, max, mean and population std (one pass, float64 sums shifted by the
// channel's first value, merged in a fixed order: the same numbers for any thread count); blpa_pack writes
// the codes k = clamp(ceil((x - t) / delta) + s - 1, 0, n - 1) (at least s above t) packed 8 / bits per byte
// in memory order; blpa_unpack decodes through per-channel tables into the one output tensor.

#include <torch/extension.h>
#include "quant_format.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

using memcomp_quant::check_bits;
using memcomp_quant::check_dtype;
using memcomp_quant::check_unpack_args;

namespace {

constexpr int kConstantExponent = -128;  // int8 min: the constant-group flag of quant
constexpr int64_t kBlock = 2048;         // elements per code block (a multiple of 8)
constexpr int64_t kGrainElements = 1 << 15;  // below this, one thread

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float abs_of(float v) { return float_of(bits_of(v) & 0x7fffffffu); }
inline uint32_t non_finite(float v) { return (bits_of(v) & 0x7f800000u) == 0x7f800000u; }

// A signed integer with the order of the floats, -0 just below +0: integer min/max give the extremes of a
// group whatever the order of the elements (torch.aminmax keeps whichever zero it meets first).
inline int32_t order_key(float v) {
  const int32_t i = static_cast<int32_t>(bits_of(v));
  return i ^ ((i >> 31) & 0x7fffffff);
}
inline float key_value(int32_t k) { return float_of(static_cast<uint32_t>(k ^ ((k >> 31) & 0x7fffffff))); }

// 2^k exactly, subnormal included, for -149 <= k <= 127 (torch.ldexp(1, k))
inline float pow2(int k) {
  if (k >= -126) return float_of(static_cast<uint32_t>(k + 127) << 23);
  return float_of(1u << (k + 149));
}

// torch.frexp(a).exponent for finite a >= 0 (0 for 0; subnormals included)
inline int frexp_exponent(float a) {
  const uint32_t u = bits_of(a) & 0x7fffffffu;
  if (u == 0) return 0;
  const int biased = static_cast<int>(u >> 23);
  if (biased != 0) return biased - 126;
  return (32 - __builtin_clz(u)) - 149;  // subnormal: a = m * 2^-149
}

// round half to even for 0 <= t <= 2^22 (torch.round), without a libm call
inline float round_even_small(float t) { return (t + 8388608.0f) - 8388608.0f; }

// ceil (torch.ceil) without a libm call or a branch: |t| rounded half to even by adding 2^23, the sign put
// back, one up where that went below t; |t| >= 2^23 (and NaN) is left as it is. A zero result may carry
// the other sign, which no caller can see (it is added to a non-negative offset)
inline float ceil_exact(float t) {
  const float a = abs_of(t);
  float r = float_of(bits_of((a + 8388608.0f) - 8388608.0f) | (bits_of(t) & 0x80000000u));
  r = a < 8388608.0f ? r : t;
  return r < t ? r + 1.0f : r;
}

// counter-based uniform in [0, 1): splitmix64 of the seed and the element index (as cuda/quant_pack.cu)
inline float uniform01(uint64_t seed, uint64_t index) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (index + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // 24 random bits, exact
}

// ---- element types: exact loads to float32, round-to-nearest-even stores, finfo max / smallest ------
template <typename T> struct Elem;
template <> struct Elem<float> {
  static float load(float v) { return v; }
  static float store(float v) { return v; }
  static float max() { return float_of(0x7f7fffffu); }
  static float smallest() { return float_of(0x00000001u); }  // 2^-149
};
template <> struct Elem<at::Half> {
  static float load(at::Half v) { return static_cast<float>(v); }
  static at::Half store(float v) { return at::Half(v); }
  static float max() { return 65504.0f; }
  static float smallest() { return float_of(0x33800000u); }  // 2^-24
};
template <> struct Elem<at::BFloat16> {
  static float load(at::BFloat16 v) { return float_of(static_cast<uint32_t>(v.x) << 16); }
  static at::BFloat16 store(float v) { return at::BFloat16(v); }
  static float max() { return float_of(0x7f7f0000u); }
  static float smallest() { return float_of(0x00010000u); }  // 2^-133
};

// ---- float16 metadata: round to nearest even, then one step toward the wanted side (quant._round_to) --
inline uint16_t half_rn(float v) { return at::Half(v).x; }
inline float half_value(uint16_t b) { return static_cast<float>(at::Half(b, at::Half::from_bits())); }
inline uint16_t half_next(uint16_t h, bool up) {  // torch.nextafter toward +-inf, h not NaN
  if ((h & 0x7fffu) == 0) return up ? 0x0001u : 0x8001u;
  const bool negative = (h & 0x8000u) != 0;
  return static_cast<uint16_t>(up != negative ? h + 1 : h - 1);
}
inline uint16_t half_down(float v) {
  const uint16_t h = half_rn(v);
  return half_value(h) > v ? half_next(h, false) : h;
}
inline uint16_t half_up(float v) {
  const uint16_t h = half_rn(v);
  return half_value(h) < v ? half_next(h, true) : h;
}

template <typename F>
void dispatch_float(at::ScalarType dtype, F&& body) {
  switch (dtype) {
    case at::kFloat: body(float{}); break;
    case at::kHalf: body(at::Half{}); break;
    default: body(at::BFloat16{}); break;
  }
}

template <typename F>
void dispatch_bits(int64_t bits, F&& body) {
  switch (bits) {
    case 1: body(std::integral_constant<int, 1>{}); break;
    case 2: body(std::integral_constant<int, 2>{}); break;
    case 4: body(std::integral_constant<int, 4>{}); break;
    default: body(std::integral_constant<int, 8>{}); break;
  }
}

// codes[0 .. n) (n a multiple of 8 / BITS) -> bytes, the first code in the lowest bits (bitpack.pack_bits)
template <int BITS>
inline void pack_codes(const uint8_t* codes, int64_t n, uint8_t* out) {
  constexpr int per = 8 / BITS;
  for (int64_t j = 0; j < n / per; ++j) {
    unsigned byte = 0;
    for (int p = 0; p < per; ++p) byte |= static_cast<unsigned>(codes[j * per + p]) << (p * BITS);
    out[j] = static_cast<uint8_t>(byte);
  }
}

template <int BITS>
inline unsigned code_at(const uint8_t* packed, int64_t i) {
  constexpr int per = 8 / BITS;
  return (packed[i / per] >> ((i % per) * BITS)) & ((1u << BITS) - 1u);
}

// =====================================================================================================
// quant
// =====================================================================================================

enum GroupKind { kOrdinary = 0, kZeroBased = 1, kConstant = 2 };

struct QuantGroup {
  GroupKind kind;
  float inv;      // 2^-exponent
  float lo;       // fp16 lo, as float
  float divisor;  // fp16 |step| if > 0, else 1
  uint16_t lo_out, step_out;
  int8_t exponent_out;
};

// The statistics and metadata of one group (quant._quantize_chunk); false when it holds NaN or Inf.
template <typename T>
bool quant_group(const T* x, int64_t S, int bits, QuantGroup& g) {
  int32_t kmin = std::numeric_limits<int32_t>::max();
  int32_t kmax = std::numeric_limits<int32_t>::min();
  uint32_t bad = 0;
  for (int64_t i = 0; i < S; ++i) {
    const float v = Elem<T>::load(x[i]);
    bad |= non_finite(v);
    const int32_t k = order_key(v);
    kmin = std::min(kmin, k);
    kmax = std::max(kmax, k);
  }
  if (bad) return false;
  const float mn = key_value(kmin);
  const float mx = key_value(kmax);
  const int levels = (1 << bits) - 1;
  const int e = std::max(-127, std::min(127, frexp_exponent(std::max(abs_of(mn), abs_of(mx)))));
  const float inv = pow2(-e);
  const bool constant = mn == mx;
  const bool zero_based = mn == 0.0f && mx > 0.0f;
  float low = mn;
  if (zero_based && bits > 1) {  // the smallest positive value: the smallest positive key
    int32_t kpos = std::numeric_limits<int32_t>::max();
    for (int64_t i = 0; i < S; ++i) {
      const int32_t k = order_key(Elem<T>::load(x[i]));
      kpos = std::min(kpos, k > 0 ? k : std::numeric_limits<int32_t>::max());
    }
    low = key_value(kpos);
  } else if (zero_based) {
    // the mean positive value: sum / count in float32 as in the reference; the sum is accumulated in
    // float64 and rounded once (torch's float32 sum depends on its order, so lo may rarely differ from the
    // reference by one fp16 ulp here; the codes, all 1, do not)
    double sum = 0.0;
    int64_t count = 0;
    for (int64_t i = 0; i < S; ++i) {
      const float v = Elem<T>::load(x[i]);
      if (v > 0.0f) {
        sum += static_cast<double>(v);
        ++count;
      }
    }
    low = static_cast<float>(sum) / static_cast<float>(std::max<int64_t>(count, 1));
  }
  low = low * inv;
  uint16_t lo_bits = (bits == 1 && zero_based) ? half_rn(low) : half_down(low);
  if (low > 0.0f && (lo_bits & 0x7fffu) == 0) lo_bits = 0x0001u;  // a positive minimum keeps a positive grid
  const float lo = half_value(lo_bits);
  const float span = mx * inv - lo;
  const float nsteps = static_cast<float>(zero_based ? std::max(levels - 1, 1) : levels);
  uint16_t step_bits = half_up(span / nsteps);
  if (bits == 1 && zero_based) step_bits = 0;
  const float step = half_value(step_bits);
  g.inv = inv;
  g.lo = lo;
  g.divisor = step > 0.0f ? step : 1.0f;
  if (constant) {
    const uint32_t mn_bits = bits_of(mn);
    g.kind = kConstant;
    g.lo_out = static_cast<uint16_t>(mn_bits >> 16);
    g.step_out = static_cast<uint16_t>(mn_bits & 0xffffu);
    g.exponent_out = static_cast<int8_t>(kConstantExponent);
  } else {
    g.kind = zero_based ? kZeroBased : kOrdinary;
    g.lo_out = lo_bits;
    g.step_out = zero_based ? static_cast<uint16_t>(step_bits ^ 0x8000u) : step_bits;
    g.exponent_out = static_cast<int8_t>(e);
  }
  return true;
}

// The packed codes of one group; `first` is the flat index of its first element (the random counter).
template <typename T, int BITS, bool STOCHASTIC>
void quant_codes(const T* x, int64_t S, const QuantGroup& g, uint64_t seed, uint64_t first, uint8_t* out) {
  constexpr int per = 8 / BITS;
  constexpr int levels = (1 << BITS) - 1;
  if (g.kind == kConstant) {
    std::memset(out, 0, static_cast<size_t>(S / per));
    return;
  }
  const bool zero_based = g.kind == kZeroBased;
  const float top = static_cast<float>(zero_based ? std::max(levels - 1, 0) : levels);
  const float inv = g.inv, lo = g.lo, divisor = g.divisor;
  uint8_t q[kBlock];
  for (int64_t b0 = 0; b0 < S; b0 += kBlock) {
    const int64_t n = std::min(kBlock, S - b0);
    for (int64_t i = 0; i < n; ++i) {
      const float v = Elem<T>::load(x[b0 + i]);
      float t = (v * inv - lo) / divisor;
      if (STOCHASTIC) t = t + uniform01(seed, first + static_cast<uint64_t>(b0 + i));
      // clamping first is the same as clamping the rounded value: rounding is monotone, the ends integers
      t = std::min(std::max(t, 0.0f), top);
      int code = static_cast<int>(STOCHASTIC ? t : round_even_small(t));  // floor of t >= 0 / half to even
      if (zero_based) code = v > 0.0f ? (BITS == 1 ? 1 : code + 1) : 0;
      q[i] = static_cast<uint8_t>(code);
    }
    pack_codes<BITS>(q, n, out + b0 / per);
  }
}

template <typename T>
void quant_pack_impl(const torch::Tensor& flat, int64_t S, int bits, bool stochastic, uint64_t seed,
                     torch::Tensor& codes, torch::Tensor& lo, torch::Tensor& step, torch::Tensor& exponent,
                     bool& finite) {
  const T* x = flat.data_ptr<T>();
  const int64_t N = flat.numel();
  const int64_t G = codes.size(0);
  const int64_t nbytes = codes.size(1);
  uint8_t* c = codes.data_ptr<uint8_t>();
  uint16_t* lo_p = reinterpret_cast<uint16_t*>(lo.data_ptr<at::Half>());
  uint16_t* step_p = reinterpret_cast<uint16_t*>(step.data_ptr<at::Half>());
  int8_t* exp_p = exponent.data_ptr<int8_t>();
  std::atomic<bool> all_finite{true};
  const int64_t grain = std::max<int64_t>(1, kGrainElements / S);
  at::parallel_for(0, G, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> tail;  // the partial last group, padded with its last value (quant._grouped)
    for (int64_t gi = begin; gi < end; ++gi) {
      const T* xg = x + gi * S;
      const int64_t valid = std::min(S, N - gi * S);
      if (valid < S) {
        tail.assign(xg, xg + valid);
        tail.resize(static_cast<size_t>(S), xg[valid - 1]);
        xg = tail.data();
      }
      uint8_t* cg = c + gi * nbytes;
      QuantGroup g;
      if (!all_finite.load(std::memory_order_relaxed) || !quant_group(xg, S, bits, g)) {
        // the caller discards the whole tensor: only leave defined bytes behind
        all_finite.store(false, std::memory_order_relaxed);
        std::memset(cg, 0, static_cast<size_t>(nbytes));
        lo_p[gi] = 0;
        step_p[gi] = 0;
        exp_p[gi] = 0;
        continue;
      }
      lo_p[gi] = g.lo_out;
      step_p[gi] = g.step_out;
      exp_p[gi] = g.exponent_out;
      const uint64_t first = static_cast<uint64_t>(gi * S);
      dispatch_bits(bits, [&](auto b) {
        constexpr int B = decltype(b)::value;
        if (stochastic) {
          quant_codes<T, B, true>(xg, S, g, seed, first, cg);
        } else {
          quant_codes<T, B, false>(xg, S, g, seed, first, cg);
        }
      });
    }
  });
  finite = all_finite.load();
}

// One decoded value of a group (quant._dequantize_chunk) as float32, before the store to T.
template <typename T>
inline float quant_value(unsigned q, uint16_t lo_bits, uint16_t step_bits, int e) {
  if (e == kConstantExponent) {  // the exact value, its bits split over lo and step
    return float_of((static_cast<uint32_t>(lo_bits) << 16) | static_cast<uint32_t>(step_bits));
  }
  const bool zero_based = (step_bits & 0x8000u) != 0;
  const float lo = half_value(lo_bits);
  const float step = half_value(static_cast<uint16_t>(step_bits & 0x7fffu));  // |step|
  const float qf = static_cast<float>(zero_based ? static_cast<int>(q) - 1 : static_cast<int>(q));
  float v = (qf * step + lo) * pow2(e);
  v = std::min(std::max(v, -Elem<T>::max()), Elem<T>::max());  // -finfo.max's group: lo * 2^127 may be -inf
  // positives stay positive in the output dtype (exact ReLU masks); zero-based code 0 is an exact zero
  if (zero_based ? q > 0 : lo > 0.0f) v = std::max(v, Elem<T>::smallest());
  if (zero_based && q == 0) v = 0.0f;
  return v;
}

template <typename T, int BITS>
void quant_unpack_impl(const torch::Tensor& codes, const torch::Tensor& lo, const torch::Tensor& step,
                       const torch::Tensor& exponent, torch::Tensor& out) {
  constexpr int per = 8 / BITS;
  constexpr int n = 1 << BITS;
  const int64_t G = codes.size(0);
  const int64_t nbytes = codes.size(1);
  const int64_t S = nbytes * per;
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const uint16_t* lo_p = reinterpret_cast<const uint16_t*>(lo.data_ptr<at::Half>());
  const uint16_t* step_p = reinterpret_cast<const uint16_t*>(step.data_ptr<at::Half>());
  const int8_t* exp_p = exponent.data_ptr<int8_t>();
  T* o = out.data_ptr<T>();
  const bool table = S >= 2 * n;  // small groups at 8 bits: compute each value instead
  at::parallel_for(0, G, std::max<int64_t>(1, kGrainElements / S), [&](int64_t begin, int64_t end) {
    T lut[n];
    for (int64_t gi = begin; gi < end; ++gi) {
      const uint8_t* cg = c + gi * nbytes;
      T* og = o + gi * S;
      const uint16_t lb = lo_p[gi], sb = step_p[gi];
      const int e = exp_p[gi];
      if (e == kConstantExponent) {
        const T value = Elem<T>::store(quant_value<T>(0, lb, sb, e));
        std::fill(og, og + S, value);
        continue;
      }
      if (table) {
        for (int q = 0; q < n; ++q) lut[q] = Elem<T>::store(quant_value<T>(q, lb, sb, e));
        for (int64_t i = 0; i < S; ++i) og[i] = lut[code_at<BITS>(cg, i)];
      } else {
        for (int64_t i = 0; i < S; ++i) og[i] = Elem<T>::store(quant_value<T>(code_at<BITS>(cg, i), lb, sb, e));
      }
    }
  });
}

void check_quant_input(const torch::Tensor& x, int64_t bits, const char* where) {
  TORCH_CHECK(x.device().is_cpu(), where, ": expected a CPU tensor");
  check_bits(bits, where);
  check_dtype(x.scalar_type(), where);
}

// flat [N] -> (codes uint8 [G, S*bits/8], lo f16 [G], step f16 [G], exponent i8 [G], finite u8 []), the
// last group padded with the tensor's last value (quant._grouped) without copying the tensor
std::vector<torch::Tensor> pack_flat(torch::Tensor flat, int64_t group_size, int64_t bits, bool stochastic,
                                     int64_t seed) {
  check_quant_input(flat, bits, "codecs_cpu.pack_flat");
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0, "codecs_cpu.pack_flat: group_size must be a positive "
              "multiple of 8, got ", group_size);
  auto x = flat.contiguous().view(-1);
  const int64_t N = x.numel();
  const int64_t G = (N + group_size - 1) / group_size;
  auto options = x.options();
  auto codes = torch::empty({G, group_size * bits / 8}, options.dtype(torch::kUInt8));
  auto lo = torch::empty({G}, options.dtype(torch::kHalf));
  auto step = torch::empty({G}, options.dtype(torch::kHalf));
  auto exponent = torch::empty({G}, options.dtype(torch::kInt8));
  bool finite = true;
  if (G > 0) {
    dispatch_float(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      quant_pack_impl<T>(x, group_size, static_cast<int>(bits), stochastic, static_cast<uint64_t>(seed), codes, lo,
                         step, exponent, finite);
    });
  }
  auto flag = torch::full({}, finite ? 1 : 0, options.dtype(torch::kUInt8));
  return {codes, lo, step, exponent, flag};
}

// groups [G, S] -> as pack_flat (the signature of cuda/quant_pack.cu's pack)
std::vector<torch::Tensor> pack(torch::Tensor groups, int64_t bits, bool stochastic, int64_t seed) {
  TORCH_CHECK(groups.dim() == 2, "codecs_cpu.pack: groups must be [G, group_size], got ", groups.sizes());
  return pack_flat(groups.contiguous().view(-1), groups.size(1), bits, stochastic, seed);
}

torch::Tensor unpack(torch::Tensor codes, torch::Tensor lo, torch::Tensor step, torch::Tensor exponent,
                     int64_t bits, at::ScalarType dtype) {
  TORCH_CHECK(codes.device().is_cpu(), "codecs_cpu.unpack: expected CPU tensors");
  const int64_t G = check_unpack_args(codes, lo, step, exponent, bits, dtype, "codecs_cpu.unpack");
  auto c = codes.contiguous();
  auto lo_c = lo.contiguous();
  auto step_c = step.contiguous();
  auto exp_c = exponent.contiguous();
  auto out = torch::empty({G, c.size(1) * 8 / bits}, c.options().dtype(dtype));
  if (out.numel() == 0) return out;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_bits(bits, [&](auto b) { quant_unpack_impl<T, decltype(b)::value>(c, lo_c, step_c, exp_c, out); });
  });
  return out;
}

// packed bits of low < x < high, one per element (bitpack.pack_mask of the comparisons); the bounds are the
// dtype's values of the thresholds, as float32
torch::Tensor threshold_mask(torch::Tensor flat, double low, double high) {
  TORCH_CHECK(flat.device().is_cpu(), "codecs_cpu.threshold_mask: expected a CPU tensor");
  check_dtype(flat.scalar_type(), "codecs_cpu.threshold_mask");
  auto x = flat.contiguous().view(-1);
  const int64_t N = x.numel();
  auto out = torch::empty({(N + 7) / 8}, x.options().dtype(torch::kUInt8));
  uint8_t* o = out.data_ptr<uint8_t>();
  const float lo_f = static_cast<float>(low), hi_f = static_cast<float>(high);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* p = x.data_ptr<T>();
    at::parallel_for(0, (N + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
      uint8_t q[kBlock];
      for (int64_t b = begin; b < end; ++b) {
        const int64_t start = b * kBlock, n = std::min(kBlock, N - start);
        for (int64_t i = 0; i < n; ++i) {
          const float v = Elem<T>::load(p[start + i]);
          q[i] = static_cast<uint8_t>(v > lo_f && v < hi_f);
        }
        const int64_t padded = (n + 7) / 8 * 8;
        std::fill(q + n, q + padded, uint8_t{0});
        pack_codes<1>(q, padded, o + start / 8);
      }
    });
  });
  return out;
}

// =====================================================================================================
// blpa
// =====================================================================================================

// [outer, C, inner] in memory order: element i is in channel (i / inner) % C
struct Layout {
  int64_t outer, channels, inner;
  int64_t numel() const { return outer * channels * inner; }
};

// the layout, checked; `numel` >= 0: the number of elements it must hold
Layout check_layout(int64_t numel, int64_t outer, int64_t channels, int64_t inner, const char* where) {
  TORCH_CHECK(outer >= 0 && channels > 0 && inner > 0, where, ": bad layout [", outer, ", ", channels, ", ", inner,
              "]");
  const Layout l{outer, channels, inner};
  TORCH_CHECK(numel < 0 || numel == l.numel(), where, ": ", numel, " elements for the layout [", outer, ", ",
              channels, ", ", inner, "]");
  return l;
}

// Calls run(c, from, to) for the runs of one channel that cover the flat range [begin, end) (inner > 1), or,
// for inner == 1 (channels_last), row(c, from, to) for the runs of consecutive channels c, c + 1, ...
template <typename Run, typename Row>
inline void for_segments(const Layout& l, int64_t begin, int64_t end, Run&& run, Row&& row) {
  if (l.inner == 1) {
    for (int64_t i = begin; i < end;) {
      const int64_t c = i % l.channels;
      const int64_t stop = std::min(end, i + l.channels - c);
      row(c, i, stop);
      i = stop;
    }
    return;
  }
  int64_t c = (begin / l.inner) % l.channels;
  int64_t r = begin % l.inner;
  for (int64_t i = begin; i < end;) {
    const int64_t stop = std::min(end, i + l.inner - r);
    run(c, i, stop);
    i = stop;
    r = 0;
    c = c + 1 == l.channels ? 0 : c + 1;
  }
}

// per-channel partial statistics of one chunk: order keys of the extremes, sums of x - K and (x - K)^2 with
// K the channel's first value (a shift that keeps the variance free of cancellation)
struct ChannelSums {
  std::vector<int32_t> kmin, kmax;
  std::vector<double> s1, s2;
  explicit ChannelSums(int64_t C)
      : kmin(static_cast<size_t>(C), std::numeric_limits<int32_t>::max()),
        kmax(static_cast<size_t>(C), std::numeric_limits<int32_t>::min()),
        s1(static_cast<size_t>(C), 0.0), s2(static_cast<size_t>(C), 0.0) {}
};

// one value into a channel's extremes (order keys), shifted sums and non-finite flag
inline void accumulate(float v, double shift, int32_t& kmin, int32_t& kmax, double& s1, double& s2, uint32_t& bad) {
  bad |= non_finite(v);
  const int32_t key = order_key(v);
  kmin = std::min(kmin, key);
  kmax = std::max(kmax, key);
  const double d = static_cast<double>(v) - shift;
  s1 += d;
  s2 += d * d;
}

template <typename T>
uint32_t blpa_chunk_stats(const T* x, const Layout& l, const double* K, int64_t begin, int64_t end,
                          ChannelSums& acc) {
  constexpr int kLanes = 8;  // independent partial sums: vectorizable, and the same order every time
  uint32_t bad = 0;
  for_segments(
      l, begin, end,
      [&](int64_t c, int64_t from, int64_t to) {
        int32_t kmin[kLanes], kmax[kLanes];
        double s1[kLanes], s2[kLanes];
        for (int j = 0; j < kLanes; ++j) {
          kmin[j] = acc.kmin[c];
          kmax[j] = acc.kmax[c];
          s1[j] = s2[j] = 0.0;
        }
        const double k0 = K[c];
        int64_t i = from;
        for (; i + kLanes <= to; i += kLanes) {
          for (int j = 0; j < kLanes; ++j) accumulate(Elem<T>::load(x[i + j]), k0, kmin[j], kmax[j], s1[j], s2[j], bad);
        }
        for (int j = 0; i < to; ++i, ++j) accumulate(Elem<T>::load(x[i]), k0, kmin[j], kmax[j], s1[j], s2[j], bad);
        for (int j = 0; j < kLanes; ++j) {
          acc.kmin[c] = std::min(acc.kmin[c], kmin[j]);
          acc.kmax[c] = std::max(acc.kmax[c], kmax[j]);
          acc.s1[c] += s1[j];
          acc.s2[c] += s2[j];
        }
      },
      [&](int64_t c0, int64_t from, int64_t to) {
        int32_t* kmin = acc.kmin.data() + c0;
        int32_t* kmax = acc.kmax.data() + c0;
        double* s1 = acc.s1.data() + c0;
        double* s2 = acc.s2.data() + c0;
        const double* k0 = K + c0;
        const T* xr = x + from;
        for (int64_t j = 0; j < to - from; ++j) {  // channel c0 + j
          accumulate(Elem<T>::load(xr[j]), k0[j], kmin[j], kmax[j], s1[j], s2[j], bad);
        }
      });
  return bad;
}

template <typename T>
void blpa_stats_impl(const torch::Tensor& flat, const Layout& l, torch::Tensor& lo, torch::Tensor& hi,
                     torch::Tensor& mean, torch::Tensor& std, bool& finite) {
  const T* x = flat.data_ptr<T>();
  const int64_t N = l.numel(), C = l.channels;
  std::vector<double> K(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) K[c] = static_cast<double>(Elem<T>::load(x[c * l.inner]));
  // a fixed split (not one per thread), merged in order: the same sums whatever the thread count
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(64, N / (1 << 16)));
  std::vector<ChannelSums> partial(static_cast<size_t>(chunks), ChannelSums(0));
  std::atomic<bool> all_finite{true};
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      partial[k] = ChannelSums(C);
      if (blpa_chunk_stats(x, l, K.data(), N * k / chunks, N * (k + 1) / chunks, partial[k])) {
        all_finite.store(false, std::memory_order_relaxed);
      }
    }
  });
  finite = all_finite.load();
  float* lo_p = lo.data_ptr<float>();
  float* hi_p = hi.data_ptr<float>();
  float* mean_p = mean.data_ptr<float>();
  float* std_p = std.data_ptr<float>();
  const double count = static_cast<double>(l.outer * l.inner);
  for (int64_t c = 0; c < C; ++c) {
    int32_t kmin = partial[0].kmin[c], kmax = partial[0].kmax[c];
    double s1 = partial[0].s1[c], s2 = partial[0].s2[c];
    for (int64_t k = 1; k < chunks; ++k) {
      kmin = std::min(kmin, partial[k].kmin[c]);
      kmax = std::max(kmax, partial[k].kmax[c]);
      s1 += partial[k].s1[c];
      s2 += partial[k].s2[c];
    }
    lo_p[c] = key_value(kmin);
    hi_p[c] = key_value(kmax);
    const double m = s1 / count;
    mean_p[c] = static_cast<float>(K[c] + m);
    std_p[c] = static_cast<float>(std::sqrt(std::max(0.0, s2 / count - m * m)));
  }
}

// flat [N] as [outer, C, inner] -> (min f32 [C], max f32 [C], mean f32 [C], population std f32 [C],
// finite u8 [])
std::vector<torch::Tensor> blpa_stats(torch::Tensor flat, int64_t outer, int64_t channels, int64_t inner) {
  TORCH_CHECK(flat.device().is_cpu(), "codecs_cpu.blpa_stats: expected a CPU tensor");
  check_dtype(flat.scalar_type(), "codecs_cpu.blpa_stats");
  auto x = flat.contiguous().view(-1);
  const Layout l = check_layout(x.numel(), outer, channels, inner, "codecs_cpu.blpa_stats");
  TORCH_CHECK(l.numel() > 0, "codecs_cpu.blpa_stats: empty tensor");
  auto options = x.options().dtype(torch::kFloat);
  auto lo = torch::empty({channels}, options), hi = torch::empty({channels}, options);
  auto mean = torch::empty({channels}, options), std = torch::empty({channels}, options);
  bool finite = true;
  dispatch_float(x.scalar_type(), [&](auto tag) { blpa_stats_impl<decltype(tag)>(x, l, lo, hi, mean, std, finite); });
  return {lo, hi, mean, std, torch::full({}, finite ? 1 : 0, x.options().dtype(torch::kUInt8))};
}

// per channel, as float32: threshold, divisor (delta, or 1 for a constant channel: delta 0), shift - 1, shift,
// and the bin width delta itself
struct BlpaChannels {
  std::vector<float> t, safe, offset, shift, delta;
  std::vector<uint8_t> constant;
};

BlpaChannels blpa_channels(const torch::Tensor& threshold, const torch::Tensor& delta, const torch::Tensor& shift,
                           int64_t C, const char* where) {
  TORCH_CHECK(threshold.scalar_type() == torch::kFloat && delta.scalar_type() == torch::kFloat &&
                  shift.scalar_type() == torch::kUInt8,
              where, ": expected float32 threshold and delta, uint8 shift");
  TORCH_CHECK(threshold.numel() == C && delta.numel() == C && shift.numel() == C, where,
              ": threshold, delta and shift need one entry per channel (", C, ")");
  auto tc = threshold.contiguous();
  auto dc = delta.contiguous();
  auto sc = shift.contiguous();
  const float* tp = tc.data_ptr<float>();
  const float* dp = dc.data_ptr<float>();
  const uint8_t* sp = sc.data_ptr<uint8_t>();
  BlpaChannels ch;
  ch.t.assign(tp, tp + C);
  ch.delta.assign(dp, dp + C);
  for (int64_t c = 0; c < C; ++c) {
    const float sh = static_cast<float>(sp[c]);
    ch.safe.push_back(dp[c] > 0.0f ? dp[c] : 1.0f);
    ch.offset.push_back(sh - 1.0f);
    ch.shift.push_back(sh);
    ch.constant.push_back(dp[c] == 0.0f);
  }
  return ch;
}

// blpa_quantize's code: ceil((x - t) / delta) + s - 1, at least s above t, clamped to [0, n - 1]; 0 for a
// constant channel
inline uint8_t blpa_code(float v, float t, float safe, float offset, float shift, bool constant, float top) {
  float k = ceil_exact((v - t) / safe) + offset;
  k = v > t ? std::max(k, shift) : k;
  k = std::min(std::max(k, 0.0f), top);
  return constant ? uint8_t{0} : static_cast<uint8_t>(static_cast<int>(k));
}

template <typename T, int BITS>
void blpa_pack_impl(const torch::Tensor& flat, const Layout& l, const BlpaChannels& ch, torch::Tensor& packed) {
  constexpr int per = 8 / BITS;
  const float top = static_cast<float>((1 << BITS) - 1);
  const T* x = flat.data_ptr<T>();
  uint8_t* o = packed.data_ptr<uint8_t>();
  const int64_t N = l.numel();
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainElements / kBlock), [&](int64_t begin, int64_t end) {
    uint8_t q[kBlock];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * kBlock, stop = std::min(N, start + kBlock);
      for_segments(
          l, start, stop,
          [&](int64_t c, int64_t from, int64_t to) {
            const float t = ch.t[c], safe = ch.safe[c], offset = ch.offset[c], shift = ch.shift[c];
            const bool constant = ch.constant[c] != 0;
            uint8_t* qr = q + (from - start);
            const T* xr = x + from;
            for (int64_t j = 0; j < to - from; ++j) {
              qr[j] = blpa_code(Elem<T>::load(xr[j]), t, safe, offset, shift, constant, top);
            }
          },
          [&](int64_t c0, int64_t from, int64_t to) {
            uint8_t* qr = q + (from - start);
            const T* xr = x + from;
            const float *t = ch.t.data() + c0, *safe = ch.safe.data() + c0;
            const float *offset = ch.offset.data() + c0, *shift = ch.shift.data() + c0;
            const uint8_t* constant = ch.constant.data() + c0;
            for (int64_t j = 0; j < to - from; ++j) {  // channel c0 + j
              qr[j] = blpa_code(Elem<T>::load(xr[j]), t[j], safe[j], offset[j], shift[j], constant[j] != 0, top);
            }
          });
      const int64_t n = stop - start, padded = (n + per - 1) / per * per;
      std::fill(q + n, q + padded, uint8_t{0});  // the codec pads the last byte with code 0
      pack_codes<BITS>(q, padded, o + start / per);
    }
  });
}

// flat [N] as [outer, C, inner], threshold/delta f32 [C], shift u8 [C] -> packed codes uint8 [ceil(N*bits/8)]
torch::Tensor blpa_pack(torch::Tensor flat, torch::Tensor threshold, torch::Tensor delta, torch::Tensor shift,
                        int64_t outer, int64_t channels, int64_t inner, int64_t bits) {
  TORCH_CHECK(flat.device().is_cpu(), "codecs_cpu.blpa_pack: expected a CPU tensor");
  check_dtype(flat.scalar_type(), "codecs_cpu.blpa_pack");
  check_bits(bits, "codecs_cpu.blpa_pack");
  auto x = flat.contiguous().view(-1);
  const Layout l = check_layout(x.numel(), outer, channels, inner, "codecs_cpu.blpa_pack");
  const auto ch = blpa_channels(threshold, delta, shift, channels, "codecs_cpu.blpa_pack");
  const int64_t per = 8 / bits;
  auto packed = torch::empty({(l.numel() + per - 1) / per}, x.options().dtype(torch::kUInt8));
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_bits(bits, [&](auto b) { blpa_pack_impl<T, decltype(b)::value>(x, l, ch, packed); });
  });
  return packed;
}

template <typename T, int BITS>
void blpa_unpack_impl(const torch::Tensor& packed, const Layout& l, const BlpaChannels& ch, bool relu,
                      torch::Tensor& out) {
  constexpr int n = 1 << BITS;
  const int64_t C = l.channels;
  // the decoded value of every (channel, code): blpa._dequantize_rows
  std::vector<T> lut(static_cast<size_t>(C * n));
  for (int64_t c = 0; c < C; ++c) {
    for (int k = 0; k < n; ++k) {
      const float kf = static_cast<float>(k) - (ch.shift[c] - 0.5f);
      float v = kf * ch.delta[c] + ch.t[c];
      v = std::min(std::max(v, -Elem<T>::max()), Elem<T>::max());
      if (relu) {
        v = std::max(v, 0.0f);
        // a positive bin stays positive in a narrow dtype too (exact ReLU mask)
        if (kf > 0.0f && ch.delta[c] > 0.0f) v = std::max(v, Elem<T>::smallest());
      }
      lut[c * n + k] = Elem<T>::store(v);
    }
  }
  const uint8_t* p = packed.data_ptr<uint8_t>();
  T* o = out.data_ptr<T>();
  const int64_t N = l.numel();
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainElements / kBlock), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for_segments(
          l, b * kBlock, std::min(N, (b + 1) * kBlock),
          [&](int64_t c, int64_t from, int64_t to) {
            const T* table = lut.data() + c * n;
            for (int64_t i = from; i < to; ++i) o[i] = table[code_at<BITS>(p, i)];
          },
          [&](int64_t c0, int64_t from, int64_t to) {
            const T* table = lut.data() + c0 * n;
            for (int64_t j = 0; j < to - from; ++j) o[from + j] = table[j * n + code_at<BITS>(p, from + j)];
          });
    }
  });
}

// packed codes -> flat [N] of dtype, N = outer * C * inner, in memory order
torch::Tensor blpa_unpack(torch::Tensor packed, torch::Tensor threshold, torch::Tensor delta, torch::Tensor shift,
                          bool relu, at::ScalarType dtype, int64_t outer, int64_t channels, int64_t inner,
                          int64_t bits) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == torch::kUInt8,
              "codecs_cpu.blpa_unpack: expected uint8 CPU codes");
  check_dtype(dtype, "codecs_cpu.blpa_unpack");
  check_bits(bits, "codecs_cpu.blpa_unpack");
  auto p = packed.contiguous().view(-1);
  const Layout l = check_layout(-1, outer, channels, inner, "codecs_cpu.blpa_unpack");
  TORCH_CHECK(p.numel() * (8 / bits) >= l.numel(), "codecs_cpu.blpa_unpack: ", p.numel(), " bytes hold fewer than ",
              l.numel(), " codes");
  const auto ch = blpa_channels(threshold, delta, shift, channels, "codecs_cpu.blpa_unpack");
  auto out = torch::empty({l.numel()}, p.options().dtype(dtype));
  if (l.numel() == 0) return out;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_bits(bits, [&](auto b) { blpa_unpack_impl<T, decltype(b)::value>(p, l, ch, relu, out); });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lightning_memcomp CPU kernels of the quant and blpa codecs (fused encode, single-output decode)";
  m.def("pack", &pack,
        "quant: groups [G, S] (float32/float16/bfloat16) -> (codes uint8 [G, S*bits/8], lo f16 [G], step f16 [G], "
        "exponent i8 [G], finite u8 [] (0 when a group holds NaN or Inf))",
        py::arg("groups"), py::arg("bits"), py::arg("stochastic"), py::arg("seed"));
  m.def("pack_flat", &pack_flat,
        "quant: flat [N] in groups of group_size, the last one padded with the last value -> as pack",
        py::arg("flat"), py::arg("group_size"), py::arg("bits"), py::arg("stochastic"), py::arg("seed"));
  m.def("unpack", &unpack, "quant: (codes, lo, step, exponent, bits, dtype) -> [G, S] of dtype", py::arg("codes"),
        py::arg("lo"), py::arg("step"), py::arg("exponent"), py::arg("bits"), py::arg("dtype"));
  m.def("threshold_mask", &threshold_mask, "packed bits of low < x < high for a flat tensor", py::arg("flat"),
        py::arg("low"), py::arg("high"));
  m.def("blpa_stats", &blpa_stats,
        "blpa: flat [outer*C*inner] -> (min, max, mean, population std: f32 [C]; finite u8 [])", py::arg("flat"),
        py::arg("outer"), py::arg("channels"), py::arg("inner"));
  m.def("blpa_pack", &blpa_pack, "blpa: codes packed in memory order, uint8 [ceil(N * bits / 8)]", py::arg("flat"),
        py::arg("threshold"), py::arg("delta"), py::arg("shift"), py::arg("outer"), py::arg("channels"),
        py::arg("inner"), py::arg("bits"));
  m.def("blpa_unpack", &blpa_unpack, "blpa: packed codes -> flat [N] of dtype (bin centres)", py::arg("packed"),
        py::arg("threshold"), py::arg("delta"), py::arg("shift"), py::arg("relu"), py::arg("dtype"),
        py::arg("outer"), py::arg("channels"), py::arg("inner"), py::arg("bits"));
}
