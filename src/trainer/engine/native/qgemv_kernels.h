// The quantized matrix-vector kernels `qgemv` computes with: 4- and 8-bit rows dotted with a float32 input, on
// AVX-512 (a per-group lookup table), AVX2 (nibbles widened to floats) or portable C++ the compiler vectorizes.
// Included once, by cpu_decode.cpp (one translation unit, so everything stays in its anonymous namespace).
#pragma once

#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {


// 4-bit weights are handled 32 at a time: 16 packed bytes, whose low nibbles are weights 0, 2, 4, ... and high
// nibbles 1, 3, 5, ... of each 16. The inputs are reordered once per call to match (see deinterleave). MLX's group
// sizes (32, 64, 128) are multiples of 32.
constexpr int kChunk = 32;
// Rows are split over OpenMP threads, one per this many weights: fewer threads left large layers on one core, more
// gained nothing (docs/benchmarks.md).
constexpr int64_t kWeightsPerThread = int64_t(1) << 20;

// x reordered per 32 elements as [evens of 0-15, evens of 16-31, odds of 0-15, odds of 16-31].
void deinterleave(const float* x, float* out, int k) {
  for (int c = 0; c < k; c += kChunk) {
    for (int half = 0; half < 2; ++half) {
      for (int j = 0; j < 8; ++j) {
        out[c + half * 8 + j] = x[c + half * 16 + 2 * j];
        out[c + 16 + half * 8 + j] = x[c + half * 16 + 2 * j + 1];
      }
    }
  }
}

#if defined(__AVX512F__)
// 4 bits: each group's 16 possible weights (scale * q + bias) in one register, looked up by nibble (vpermps reads an
// index's low 4 bits), so a weight costs no integer-to-float conversion and no separate bias term.
inline float row_dot4(const uint8_t* w, const float* scales, const float* biases, const float* xd, int k,
                      int group_size) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc_a = _mm512_setzero_ps();
  __m512 acc_b = _mm512_setzero_ps();
  for (int g = 0; g < k / group_size; ++g) {
    const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(scales[g]), _mm512_set1_ps(biases[g]));
    for (int c = g * group_size; c < (g + 1) * group_size; c += kChunk) {
      __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c / 2)));
      acc_a = _mm512_fmadd_ps(_mm512_permutexvar_ps(bytes, table), _mm512_loadu_ps(xd + c), acc_a);
      acc_b = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), _mm512_loadu_ps(xd + c + 16),
                              acc_b);
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc_a, acc_b));
}

// 8 bits: sum_g scale_g * (q . x)_g as 16 partial sums; the bias term is added by the caller
inline float row_dot8(const uint8_t* w, const float* scales, const float* x, int k, int group_size) {
  __m512 acc = _mm512_setzero_ps();
  for (int g = 0; g < k / group_size; ++g) {
    __m512 part_a = _mm512_setzero_ps();
    __m512 part_b = _mm512_setzero_ps();
    for (int c = g * group_size; c < (g + 1) * group_size; c += kChunk) {
      __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c)));
      __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c + 16)));
      part_a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_loadu_ps(x + c), part_a);
      part_b = _mm512_fmadd_ps(_mm512_cvtepi32_ps(b), _mm512_loadu_ps(x + c + 16), part_b);
    }
    acc = _mm512_fmadd_ps(_mm512_set1_ps(scales[g]), _mm512_add_ps(part_a, part_b), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

template <int bits>
float row_dot(const uint8_t* w, const float* scales, const float* biases, const float* xd, const float* xsum, int k,
              int group_size) {
  if constexpr (bits == 4) {
    return row_dot4(w, scales, biases, xd, k, group_size);
  } else {
    float bias_part = 0.0f;
#pragma omp simd reduction(+ : bias_part)
    for (int g = 0; g < k / group_size; ++g) bias_part += biases[g] * xsum[g];
    return row_dot8(w, scales, xd, k, group_size) + bias_part;
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
inline __m256 widen(const uint8_t* bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes))));
}

template <int bits>
inline __m256 group_dot(const uint8_t* packed, const float* x, int group_size) {
  __m256 acc_a = _mm256_setzero_ps();
  __m256 acc_b = _mm256_setzero_ps();
  for (int c = 0; c < group_size; c += kChunk) {
    if constexpr (bits == 4) {
      const __m256i low_mask = _mm256_set1_epi32(0xF);
      for (int half = 0; half < 2; ++half) {
        __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + c / 2 + 8 * half)));
        __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, low_mask));
        __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
        acc_a = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + c + 8 * half), acc_a);
        acc_b = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + c + 16 + 8 * half), acc_b);
      }
    } else {
      for (int j = 0; j < kChunk; j += 16) {
        acc_a = _mm256_fmadd_ps(widen(packed + c + j), _mm256_loadu_ps(x + c + j), acc_a);
        acc_b = _mm256_fmadd_ps(widen(packed + c + j + 8), _mm256_loadu_ps(x + c + j + 8), acc_b);
      }
    }
  }
  return _mm256_add_ps(acc_a, acc_b);
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int bits>
float row_dot(const uint8_t* w, const float* scales, const float* biases, const float* xd, const float* xsum, int k,
              int group_size) {
  __m256 acc = _mm256_setzero_ps();
  float bias_part = 0.0f;
  for (int g = 0; g < k / group_size; ++g) {
    __m256 part = group_dot<bits>(w + g * group_size * bits / 8, xd + g * group_size, group_size);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(scales[g]), part, acc);
    bias_part += biases[g] * xsum[g];
  }
  return horizontal_sum(acc) + bias_part;
}
#else
// Portable: dequantize a group into a small buffer (scale * q + bias, as the SIMD paths' table), then a dot product
// the compiler vectorizes (NEON on ARM, SSE on older x86).
template <int bits>
float row_dot(const uint8_t* w, const float* scales, const float* biases, const float* xd, const float*, int k,
              int group_size) {
  float acc = 0.0f;
  float weights[128];  // MLX's largest group
  for (int g = 0; g < k / group_size; ++g) {
    const float scale = scales[g], bias = biases[g];
    const int base = g * group_size;
    if constexpr (bits == 8) {
#pragma omp simd
      for (int j = 0; j < group_size; ++j) weights[j] = scale * float(w[base + j]) + bias;
    } else {
      for (int c = 0; c < group_size; c += kChunk) {
        const uint8_t* bytes = w + (base + c) / 2;
#pragma omp simd
        for (int j = 0; j < 16; ++j) {
          weights[c + j] = scale * float(bytes[j] & 0xF) + bias;
          weights[c + 16 + j] = scale * float(bytes[j] >> 4) + bias;
        }
      }
    }
    const float* x = xd + base;
#pragma omp simd reduction(+ : acc)
    for (int j = 0; j < group_size; ++j) acc += weights[j] * x[j];
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
  // small layers are not worth waking another thread for
  const int threads = std::max(1, std::min(omp_get_max_threads(), int(int64_t(n) * k / kWeightsPerThread)));
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int o = 0; o < n; ++o) {
    const uint8_t* wo = w + size_t(o) * row_bytes;
    const float* so = scales + size_t(o) * groups;
    const float* bo = biases + size_t(o) * groups;
    for (int m = 0; m < rows; ++m) {
      out[size_t(m) * n + o] =
          row_dot<bits>(wo, so, bo, xd.data() + size_t(m) * k, xsum.data() + size_t(m) * groups, k, group_size);
    }
  }
}

}  // namespace
