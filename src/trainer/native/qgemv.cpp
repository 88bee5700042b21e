// A CPU kernel for few-row products with 4- or 8-bit affine-quantized weights (decode), as an MLX primitive.
//
// MLX's CPU quantized matmul unpacks one weight at a time; decode of a small model spends most of each token there.
// This kernel reads the 4-bit weights directly with SIMD and splits the output rows over OpenMP threads, so decode
// reads 0.56 bytes per 4-bit weight instead of the 4 of a float32 copy. The arithmetic stays float32: each output is
// sum_g (scale_g * sum_i q_i x_i + bias_g * sum_i x_i), equal to MLX's up to summation order.

#include <nanobind/nanobind.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

constexpr int kChunk = 16;  // 4-bit weights per 8 packed bytes
// SmolLM2 decode on 2 cores, tokens/s: 63 with 16M weights per thread (every layer on one thread), 47 with 4M (its
// 28M-weight output head on two)
constexpr int64_t kWeightsPerThread = int64_t(1) << 24;

// x reordered per 16-element chunk: even elements then odd ones, matching a byte's low and high nibbles.
void deinterleave(const float* x, float* out, int k) {
  for (int c = 0; c < k; c += kChunk) {
    for (int j = 0; j < kChunk / 2; ++j) {
      out[c + j] = x[c + 2 * j];
      out[c + kChunk / 2 + j] = x[c + 2 * j + 1];
    }
  }
}

// sum_i q_i * x_i over one group. 4 bits: `packed` holds group_size / 2 bytes and `xd` the deinterleaved inputs;
// 8 bits: one byte per weight and the inputs in order.
#if defined(__AVX2__) && defined(__FMA__)
template <int bits>
inline __m256 group_dot(const uint8_t* packed, const float* xd, int group_size);

template <>
inline __m256 group_dot<8>(const uint8_t* packed, const float* x, int group_size) {
  __m256 acc_a = _mm256_setzero_ps();
  __m256 acc_b = _mm256_setzero_ps();
  for (int c = 0; c < group_size; c += kChunk) {
    __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + c)));
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + c + 8)));
    acc_a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_loadu_ps(x + c), acc_a);
    acc_b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(b), _mm256_loadu_ps(x + c + 8), acc_b);
  }
  return _mm256_add_ps(acc_a, acc_b);
}

template <>
inline __m256 group_dot<4>(const uint8_t* packed, const float* xd, int group_size) {
  const __m256i low_mask = _mm256_set1_epi32(0xF);
  __m256 acc_lo = _mm256_setzero_ps();
  __m256 acc_hi = _mm256_setzero_ps();
  for (int c = 0; c < group_size; c += kChunk) {
    __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + c / 2)));
    __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, low_mask));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
    acc_lo = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xd + c), acc_lo);
    acc_hi = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xd + c + kChunk / 2), acc_hi);
  }
  return _mm256_add_ps(acc_lo, acc_hi);
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int bits>
float row_dot(const uint8_t* w, const float* scales, const float* xd, int k, int group_size) {
  __m256 acc = _mm256_setzero_ps();
  for (int g = 0; g < k / group_size; ++g) {
    __m256 part = group_dot<bits>(w + g * group_size * bits / 8, xd + g * group_size, group_size);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(scales[g]), part, acc);
  }
  return horizontal_sum(acc);
}
#else
template <int bits>
float row_dot(const uint8_t* w, const float* scales, const float* xd, int k, int group_size) {
  float acc = 0.0f;
  for (int g = 0; g < k / group_size; ++g) {
    float part = 0.0f;
    for (int c = g * group_size; c < (g + 1) * group_size; c += kChunk) {
      if constexpr (bits == 8) {
        for (int j = 0; j < kChunk; ++j) part += float(w[c + j]) * xd[c + j];
      } else {
        const uint8_t* bytes = w + c / 2;
        for (int j = 0; j < kChunk / 2; ++j) {
          part += float(bytes[j] & 0xF) * xd[c + j] + float(bytes[j] >> 4) * xd[c + kChunk / 2 + j];
        }
      }
    }
    acc += scales[g] * part;
  }
  return acc;
}
#endif

template <int bits>
void qgemv_float32(const float* x, const uint8_t* w, const float* scales, const float* biases, float* out, int rows,
                   int n, int k, int group_size) {
  const int groups = k / group_size;
  std::vector<float> xd(size_t(rows) * k);
  std::vector<float> xsum(size_t(rows) * groups, 0.0f);
  for (int m = 0; m < rows; ++m) {
    if constexpr (bits == 4) {
      deinterleave(x + size_t(m) * k, xd.data() + size_t(m) * k, k);
    } else {
      std::copy(x + size_t(m) * k, x + size_t(m + 1) * k, xd.data() + size_t(m) * k);
    }
    for (int i = 0; i < k; ++i) xsum[size_t(m) * groups + i / group_size] += x[size_t(m) * k + i];
  }
  const size_t row_bytes = size_t(k) * bits / 8;
  // A layer of a few million weights takes tens of microseconds on one core: more threads cost more to wake than
  // they save, and during decode the other cores are busy (MLX-LM builds the next token's graph meanwhile).
  const int threads = std::max(1, std::min(omp_get_max_threads(), int(int64_t(n) * k / kWeightsPerThread)));
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int o = 0; o < n; ++o) {
    const uint8_t* wo = w + size_t(o) * row_bytes;
    const float* so = scales + size_t(o) * groups;
    const float* bo = biases + size_t(o) * groups;
    for (int m = 0; m < rows; ++m) {
      float bias_part = 0.0f;
      const float* xs = xsum.data() + size_t(m) * groups;
      for (int g = 0; g < groups; ++g) bias_part += bo[g] * xs[g];
      out[size_t(m) * n + o] = row_dot<bits>(wo, so, xd.data() + size_t(m) * k, k, group_size) + bias_part;
    }
  }
}

// A view's elements in row-major order (x may be a slice; copying here saves an extra graph node per product).
const float* gather(const mx::array& x, std::vector<float>& packed) {
  packed.resize(x.size());
  const float* base = x.data<float>();
  const int nd = x.ndim();
  std::vector<int> index(nd, 0);
  for (size_t e = 0; e < x.size(); ++e) {
    int64_t offset = 0;
    for (int d = 0; d < nd; ++d) offset += int64_t(index[d]) * x.strides()[d];
    packed[e] = base[offset];
    for (int d = nd - 1; d >= 0 && ++index[d] == x.shape(d); --d) index[d] = 0;
  }
  return packed.data();
}

void require_row_contiguous(const mx::array& a, const char* what) {
  if (!a.flags().row_contiguous) {
    throw std::invalid_argument(std::string("[mcp_local qgemv] ") + what + " must be row-contiguous");
  }
}

class QuantizedGemv : public mx::UnaryPrimitive {
 public:
  QuantizedGemv(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    const mx::array& scales = inputs[2];
    const mx::array& biases = inputs[3];
    require_row_contiguous(w, "the packed weight");
    require_row_contiguous(scales, "the scales");
    require_row_contiguous(biases, "the biases");
    out.set_data(mx::allocator::malloc(out.nbytes()));
    encoder.set_input_array(x);
    encoder.set_input_array(w);
    encoder.set_input_array(scales);
    encoder.set_input_array(biases);
    encoder.set_output_array(out);
    const int k = x.shape(-1);
    const int n = out.shape(-1);
    const int rows = int(x.size() / k);
    encoder.dispatch([x = mx::array::unsafe_weak_copy(x), w = mx::array::unsafe_weak_copy(w),
                      scales = mx::array::unsafe_weak_copy(scales), biases = mx::array::unsafe_weak_copy(biases),
                      out = mx::array::unsafe_weak_copy(out), rows, n, k, group_size = group_size_,
                      bits = bits_]() mutable {
      std::vector<float> packed;
      const float* xp = x.flags().row_contiguous ? x.data<float>() : gather(x, packed);
      auto run = bits == 4 ? qgemv_float32<4> : qgemv_float32<8>;
      run(xp, reinterpret_cast<const uint8_t*>(w.data<uint32_t>()), scales.data<float>(), biases.data<float>(),
          out.data<float>(), rows, n, k, group_size);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[mcp_local qgemv] CPU only");
  }

  // the gradient with respect to x, through MLX's own op; the quantized weights get none (they are frozen)
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    std::vector<mx::array> grads;
    for (int arg : argnums) {
      if (arg == 0) {
        grads.push_back(mx::quantized_matmul(cotangents[0], primals[1], primals[2], primals[3], false, group_size_,
                                             bits_, "affine", stream()));
      } else {
        grads.push_back(mx::zeros_like(primals[arg], stream()));
      }
    }
    return grads;
  }

  const char* name() const override { return "McpLocalQuantizedGemv"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantizedGemv&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_;
  }

 private:
  int group_size_;
  int bits_;
};

mx::array qgemv(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                int group_size, int bits) {
  const int k = x.shape(-1);
  if (bits != 4 && bits != 8) {
    throw std::invalid_argument("[mcp_local qgemv] 4 or 8 bits only, got " + std::to_string(bits));
  }
  if (x.dtype() != mx::float32 || scales.dtype() != mx::float32 || biases.dtype() != mx::float32 ||
      w.dtype() != mx::uint32) {
    throw std::invalid_argument("[mcp_local qgemv] needs float32 x, scales and biases and uint32 weights");
  }
  if (w.ndim() != 2 || w.shape(1) * 32 / bits != k || k % group_size != 0 || group_size % kChunk != 0 ||
      scales.shape(0) != w.shape(0) || scales.shape(1) != k / group_size || biases.shape() != scales.shape()) {
    throw std::invalid_argument("[mcp_local qgemv] shapes do not match an affine-quantized layer");
  }
  mx::Shape out_shape = x.shape();
  out_shape.back() = w.shape(0);
  mx::Stream s = mx::default_stream(mx::Device::cpu);
  return mx::array(out_shape, mx::float32, std::make_shared<QuantizedGemv>(s, group_size, bits), {x, w, scales, biases});
}

}  // namespace

NB_MODULE(_qgemv, m) {
  m.def("qgemv", &qgemv, nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"), nb::arg("group_size"),
        nb::arg("bits"), "x @ dequantize(w).T for a 4- or 8-bit affine layer, float32, on the CPU.");
  m.def("threads", []() { return omp_get_max_threads(); });
}
