// Complex multiply-accumulate over channels for band-limited FFT convolutions
// (Dziedzic et al., "Band-limited Training and Inference for Convolutional Neural Networks", ICML 2019).
//
//   out[k, i, j] = sum_r  opA(A[k, i, r]) * opB(B[k, r, j])        opX(z) = z or conj(z)
//
// k runs over the kept (compressed) frequency positions, r over the channel axis being reduced. The one
// kernel serves the three products of the layer by choosing which axis plays "channel":
//   forward      Y[k, b, o]  = sum_c X[k, b, c]  * conj(W[k, c, o])      (correlation, as nn.Conv computes)
//   grad-input   GX[k, b, c] = sum_o G[k, b, o]  * W[k, o, c]
//   grad-weight  GW[k, o, c] = sum_b conj(G[k, o, b]) * X[k, b, c]
// A and B may be any strided views (transposes are free); the output is contiguous [K, I, J].
// Each block computes a TILE x TILE output tile for one frequency position, staging TILE-wide slabs of the
// reduced axis in shared memory; the complex product uses three real multiplies (as the paper's kernel).
// Accumulation is in the input precision (complex64 or complex128).

#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/complex.h>

#include <algorithm>

namespace {

constexpr int TILE = 16;
constexpr int64_t MAX_GRID_Z = 65535;

template <typename T>
__global__ void complex_mac_kernel(const c10::complex<T>* __restrict__ a, const c10::complex<T>* __restrict__ b,
                                   c10::complex<T>* __restrict__ out, int64_t K, int64_t I, int64_t R, int64_t J,
                                   int64_t sak, int64_t sai, int64_t sar, int64_t sbk, int64_t sbr, int64_t sbj,
                                   bool conj_a, bool conj_b) {
  __shared__ T a_re[TILE][TILE + 1];
  __shared__ T a_im[TILE][TILE + 1];
  __shared__ T b_re[TILE][TILE + 1];
  __shared__ T b_im[TILE][TILE + 1];

  const int tx = threadIdx.x;  // along j (and along r when loading A)
  const int ty = threadIdx.y;  // along i (and along r when loading B)
  const int64_t i = static_cast<int64_t>(blockIdx.y) * TILE + ty;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * TILE + tx;
  const T sign_a = conj_a ? T(-1) : T(1);
  const T sign_b = conj_b ? T(-1) : T(1);

  // grid-stride over frequency positions: a 3-D spectrum can hold more than 65535 of them
  for (int64_t k = blockIdx.z; k < K; k += gridDim.z) {
    T acc_re = 0, acc_im = 0;
    for (int64_t r0 = 0; r0 < R; r0 += TILE) {
      const int64_t ra = r0 + tx;
      if (i < I && ra < R) {
        const c10::complex<T> v = a[k * sak + i * sai + ra * sar];
        a_re[ty][tx] = v.real();
        a_im[ty][tx] = sign_a * v.imag();
      } else {
        a_re[ty][tx] = 0;
        a_im[ty][tx] = 0;
      }
      const int64_t rb = r0 + ty;
      if (rb < R && j < J) {
        const c10::complex<T> v = b[k * sbk + rb * sbr + j * sbj];
        b_re[ty][tx] = v.real();
        b_im[ty][tx] = sign_b * v.imag();
      } else {
        b_re[ty][tx] = 0;
        b_im[ty][tx] = 0;
      }
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < TILE; ++rr) {
        const T ar = a_re[ty][rr], ai = a_im[ty][rr];
        const T br = b_re[rr][tx], bi = b_im[rr][tx];
        // (ar + i ai)(br + i bi) with three real multiplies
        const T k1 = br * (ar + ai);
        const T k2 = ar * (bi - br);
        const T k3 = ai * (br + bi);
        acc_re += k1 - k3;
        acc_im += k1 + k2;
      }
      __syncthreads();
    }
    if (i < I && j < J) {
      out[(k * I + i) * J + j] = c10::complex<T>(acc_re, acc_im);
    }
  }
}

}  // namespace

torch::Tensor complex_mac(torch::Tensor a, torch::Tensor b, bool conj_a, bool conj_b) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda(), "complex_mac: a and b must be CUDA tensors");
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3, "complex_mac: a must be [K, I, R] and b [K, R, J], got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "complex_mac: a and b must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.scalar_type() == at::kComplexFloat || a.scalar_type() == at::kComplexDouble,
              "complex_mac: dtype must be complex64 or complex128, got ", a.scalar_type());
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(1), "complex_mac: shapes do not match: a ", a.sizes(),
              ", b ", b.sizes());
  TORCH_CHECK(a.device() == b.device(), "complex_mac: a and b must be on the same device");
  // a lazily conjugated view holds the conjugate in memory: fold the bit into the flag
  conj_a = conj_a != a.is_conj();
  conj_b = conj_b != b.is_conj();
  a = a.resolve_neg();
  b = b.resolve_neg();

  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t K = a.size(0), I = a.size(1), R = a.size(2), J = b.size(2);
  auto out = torch::empty({K, I, J}, a.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) {
    return out;
  }
  if (R == 0) {
    return out.zero_();
  }
  const dim3 block(TILE, TILE);
  const dim3 grid(static_cast<unsigned>((J + TILE - 1) / TILE), static_cast<unsigned>((I + TILE - 1) / TILE),
                  static_cast<unsigned>(std::min<int64_t>(K, MAX_GRID_Z)));
  TORCH_CHECK((I + TILE - 1) / TILE <= MAX_GRID_Z, "complex_mac: I=", I, " is too large for one launch");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_COMPLEX_TYPES(a.scalar_type(), "complex_mac", [&] {
    using real_t = typename scalar_t::value_type;
    complex_mac_kernel<real_t><<<grid, block, 0, stream>>>(
        reinterpret_cast<const c10::complex<real_t>*>(a.const_data_ptr<scalar_t>()),
        reinterpret_cast<const c10::complex<real_t>*>(b.const_data_ptr<scalar_t>()),
        reinterpret_cast<c10::complex<real_t>*>(out.mutable_data_ptr<scalar_t>()), K, I, R, J, a.stride(0),
        a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2), conj_a, conj_b);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("complex_mac", &complex_mac,
        "out[k,i,j] = sum_r opA(a[k,i,r]) * opB(b[k,r,j]) for complex a [K,I,R], b [K,R,J] (opX = conj when "
        "conj_x)",
        pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("conj_a") = false, pybind11::arg("conj_b") = false);
}
