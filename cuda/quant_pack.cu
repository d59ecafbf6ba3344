// Per-group k-bit quantization of saved activations: fused statistics + pack, and unpack.
//
// Same numbers as the torch reference in lightning_memcomp/compression/quant.py
// (quantize_groups / dequantize_groups): per group of S elements, lo = fp16(min / 2^e),
// step = fp16((max / 2^e - lo) / (2^bits - 1)) with e the frexp exponent of the group's largest
// magnitude; code q = round((x / 2^e - lo) / step) (or floor(. + u) with u ~ U[0,1) for stochastic
// rounding), clamped to [0, 2^bits - 1]; positive values of a zero-based group get q >= 1.
// Codes are packed 8 / bits per byte, the first element in the lowest bits.
// IEEE-rounded intrinsics (__fmul_rn, __fdiv_rn, ...) keep --use_fast_math from changing the results.

#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cfloat>
#include <cstdint>
#include <vector>

namespace {

constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float<at::Half>(at::Half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<at::BFloat16>(at::BFloat16 v) {
  return static_cast<float>(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }

template <typename T> struct Tiny { static constexpr float value = FLT_MIN; };
template <> struct Tiny<at::Half> { static constexpr float value = 6.103515625e-05f; };

// counter-based uniform in [0, 1): a 64-bit mix (splitmix64) of the seed and the element index
__device__ __forceinline__ float uniform01(uint64_t seed, uint64_t index) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (index + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // 24 random bits
}

template <typename T>
__global__ void pack_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes, at::Half* __restrict__ lo_out,
                            at::Half* __restrict__ step_out, int8_t* __restrict__ exp_out, int group_size,
                            int bits, bool stochastic, uint64_t seed) {
  const int64_t g = blockIdx.x;
  const T* xg = x + g * static_cast<int64_t>(group_size);
  __shared__ float s_min[kThreads];
  __shared__ float s_max[kThreads];
  float mn = FLT_MAX, mx = -FLT_MAX;
  for (int i = threadIdx.x; i < group_size; i += blockDim.x) {
    float v = to_float(xg[i]);
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
  }
  s_min[threadIdx.x] = mn;
  s_max[threadIdx.x] = mx;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      s_min[threadIdx.x] = fminf(s_min[threadIdx.x], s_min[threadIdx.x + s]);
      s_max[threadIdx.x] = fmaxf(s_max[threadIdx.x], s_max[threadIdx.x + s]);
    }
    __syncthreads();
  }
  mn = s_min[0];
  mx = s_max[0];
  const int levels = (1 << bits) - 1;
  const float amax = fmaxf(fabsf(mn), fabsf(mx));
  int e = 0;
  frexpf(amax, &e);
  e = max(-127, min(127, e));
  const float inv_scale = ldexpf(1.0f, -e);
  const __half lo_h = __float2half_rn(__fmul_rn(mn, inv_scale));
  const float lo = __half2float(lo_h);
  const __half step_h =
      __float2half_rn(__fdiv_rn(__fsub_rn(__fmul_rn(mx, inv_scale), lo), static_cast<float>(levels)));
  const float step = __half2float(step_h);
  if (threadIdx.x == 0) {
    lo_out[g] = lo_h;
    step_out[g] = step_h;
    exp_out[g] = static_cast<int8_t>(e);
  }
  const int per = 8 / bits;
  const int nbytes = group_size / per;
  uint8_t* cg = codes + g * static_cast<int64_t>(nbytes);
  for (int b = threadIdx.x; b < nbytes; b += blockDim.x) {
    unsigned int byte = 0;
    for (int j = 0; j < per; ++j) {
      const int i = b * per + j;
      const float v = to_float(xg[i]);
      float q = 0.0f;
      if (step > 0.0f) {
        float t = __fdiv_rn(__fsub_rn(__fmul_rn(v, inv_scale), lo), step);
        if (stochastic) {
          q = floorf(__fadd_rn(t, uniform01(seed, static_cast<uint64_t>(g) * group_size + i)));
        } else {
          q = rintf(t);
        }
        q = fminf(fmaxf(q, 0.0f), static_cast<float>(levels));
        if (v > 0.0f && lo == 0.0f) q = fmaxf(q, 1.0f);
      }
      byte |= (static_cast<unsigned int>(q) & levels) << (j * bits);
    }
    cg[b] = static_cast<uint8_t>(byte);
  }
}

template <typename T>
__global__ void unpack_kernel(const uint8_t* __restrict__ codes, const at::Half* __restrict__ lo_in,
                              const at::Half* __restrict__ step_in, const int8_t* __restrict__ exp_in,
                              T* __restrict__ out, int group_size, int bits, int64_t total) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= total) return;
  const int64_t g = idx / group_size;
  const int per = 8 / bits;
  const int levels = (1 << bits) - 1;
  const int64_t byte_index = idx / per;
  const int shift = static_cast<int>(idx % per) * bits;
  const int q = (codes[byte_index] >> shift) & levels;
  const float lo = __half2float(static_cast<__half>(lo_in[g]));
  const float step = __half2float(static_cast<__half>(step_in[g]));
  const float scale = ldexpf(1.0f, static_cast<int>(exp_in[g]));
  float v = __fmul_rn(__fadd_rn(lo, __fmul_rn(static_cast<float>(q), step)), scale);
  if (q > 0 && lo == 0.0f) v = fmaxf(v, Tiny<T>::value);
  out[idx] = from_float<T>(v);
}

}  // namespace

std::vector<torch::Tensor> pack(torch::Tensor groups, int64_t bits, bool stochastic, int64_t seed) {
  TORCH_CHECK(groups.is_cuda(), "quant_pack.pack: groups must be a CUDA tensor");
  TORCH_CHECK(groups.dim() == 2, "quant_pack.pack: groups must be [G, group_size], got ", groups.sizes());
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "quant_pack.pack: bits=", bits,
              " is not allowed; use one of 1, 2, 4, 8");
  TORCH_CHECK(groups.size(1) % 8 == 0, "quant_pack.pack: group_size must be a multiple of 8");
  const c10::cuda::CUDAGuard guard(groups.device());
  auto x = groups.contiguous();
  const int64_t G = x.size(0);
  const int group_size = static_cast<int>(x.size(1));
  auto codes = torch::empty({G, group_size * bits / 8}, x.options().dtype(torch::kUInt8));
  auto lo = torch::empty({G}, x.options().dtype(torch::kHalf));
  auto step = torch::empty({G}, x.options().dtype(torch::kHalf));
  auto exponent = torch::empty({G}, x.options().dtype(torch::kInt8));
  if (G == 0) return {codes, lo, step, exponent};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quant_pack_pack", [&] {
    pack_kernel<scalar_t><<<G, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), codes.data_ptr<uint8_t>(), lo.data_ptr<at::Half>(), step.data_ptr<at::Half>(),
        exponent.data_ptr<int8_t>(), group_size, static_cast<int>(bits), stochastic, static_cast<uint64_t>(seed));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, lo, step, exponent};
}

torch::Tensor unpack(torch::Tensor codes, torch::Tensor lo, torch::Tensor step, torch::Tensor exponent,
                     int64_t bits, at::ScalarType dtype) {
  TORCH_CHECK(codes.is_cuda(), "quant_pack.unpack: codes must be a CUDA tensor");
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "quant_pack.unpack: bits=", bits,
              " is not allowed; use one of 1, 2, 4, 8");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && lo.scalar_type() == torch::kHalf &&
                  step.scalar_type() == torch::kHalf && exponent.scalar_type() == torch::kChar,
              "quant_pack.unpack: expected uint8 codes, float16 lo/step and int8 exponent");
  const c10::cuda::CUDAGuard guard(codes.device());
  auto c = codes.contiguous();
  const int64_t G = c.size(0);
  const int group_size = static_cast<int>(c.size(1) * 8 / bits);
  auto out = torch::empty({G, group_size}, c.options().dtype(dtype));
  const int64_t total = G * group_size;
  if (total == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  auto lo_c = lo.contiguous();
  auto step_c = step.contiguous();
  auto exp_c = exponent.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "quant_pack_unpack", [&] {
    unpack_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        c.data_ptr<uint8_t>(), lo_c.data_ptr<at::Half>(), step_c.data_ptr<at::Half>(), exp_c.data_ptr<int8_t>(),
        out.data_ptr<scalar_t>(), group_size, static_cast<int>(bits), total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lightning_memcomp per-group k-bit quantization: fused statistics + pack, and unpack";
  m.def("pack", &pack, "groups [G, S] -> (codes uint8 [G, S*bits/8], lo f16 [G], step f16 [G], exponent i8 [G])",
        py::arg("groups"), py::arg("bits"), py::arg("stochastic"), py::arg("seed"));
  m.def("unpack", &unpack, "(codes, lo, step, exponent, bits, dtype) -> [G, S] of dtype", py::arg("codes"),
        py::arg("lo"), py::arg("step"), py::arg("exponent"), py::arg("bits"), py::arg("dtype"));
}
