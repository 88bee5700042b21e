// CPU kernels for decode (one to a few query rows), as MLX primitives: products with 4- or 8-bit affine-quantized
// weights, RMS norm, rotary embedding and attention.
//
// MLX's CPU quantized matmul unpacks one weight at a time; decode of a small model spent most of each token there.
// `qgemv` reads the 4-bit weights directly with SIMD, so decode reads 0.56 bytes per 4-bit weight instead of the 4
// of a float32 copy. The arithmetic stays float32: each output is sum_g (scale_g * sum_i q_i x_i + bias_g * sum_i
// x_i), equal to MLX's up to summation order. MLX's CPU backend has no RMS norm, RoPE or attention kernels: each is a
// dozen or more small graph operations per call, and at decode sizes their scheduling, not their arithmetic, is the
// cost (about 4,000 operations per SmolLM2 token); each of ours is one operation. Gradients go through MLX's own
// functions (vjp of the reference op), so these primitives are correct anywhere, though used for decode only.
#include <nanobind/nanobind.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <cmath>
#include <functional>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/fast.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"
#include "mlx/transforms.h"

namespace mx = mlx::core;
namespace nb = nanobind;

#include "qgemv_kernels.h"

namespace {

// An array's float32 elements in row-major order: its own buffer, or for a view (a slice) a copy in `packed`
// (copying here saves a graph node per call).
const float* dense(const mx::array& x, std::vector<float>& packed) {
  if (x.flags().row_contiguous) return x.data<float>();
  packed.resize(x.size());
  const float* base = x.data<float>();
  const int nd = x.ndim();
  const int last = x.shape(-1);
  const int64_t last_stride = x.strides()[nd - 1];
  std::vector<int> index(nd, 0);  // index[nd - 1] stays 0: whole rows at a time
  for (size_t row = 0; row < x.size() / last; ++row) {
    int64_t offset = 0;
    for (int d = 0; d < nd - 1; ++d) offset += int64_t(index[d]) * x.strides()[d];
    float* to = packed.data() + row * last;
    if (last_stride == 1) {
      std::copy(base + offset, base + offset + last, to);
    } else {
      for (int i = 0; i < last; ++i) to[i] = base[offset + i * last_stride];
    }
    for (int d = nd - 2; d >= 0 && ++index[d] == x.shape(d); --d) index[d] = 0;
  }
  return packed.data();
}

void require_row_contiguous(const mx::array& a, const char* what) {
  if (!a.flags().row_contiguous) {
    throw std::invalid_argument(std::string("[mcp_local qgemv] ") + what + " must be row-contiguous");
  }
}

// Called at the end of each of our operations, on MLX's thread: wide registers left dirty (zmm16-31 too, which
// VZEROUPPER leaves as they are) make each later switch between MLX's SSE code and glibc's VEX code stall on Intel
// CPUs: after one of our operations MLX's exp ran 60x slower on a Sapphire Rapids Xeon (docs/benchmarks.md).
inline void clean_vector_state() {
#if defined(__AVX512F__)
  __asm__ volatile(
      "vpxord %%zmm16, %%zmm16, %%zmm16\n vpxord %%zmm17, %%zmm17, %%zmm17\n vpxord %%zmm18, %%zmm18, %%zmm18\n"
      "vpxord %%zmm19, %%zmm19, %%zmm19\n vpxord %%zmm20, %%zmm20, %%zmm20\n vpxord %%zmm21, %%zmm21, %%zmm21\n"
      "vpxord %%zmm22, %%zmm22, %%zmm22\n vpxord %%zmm23, %%zmm23, %%zmm23\n vpxord %%zmm24, %%zmm24, %%zmm24\n"
      "vpxord %%zmm25, %%zmm25, %%zmm25\n vpxord %%zmm26, %%zmm26, %%zmm26\n vpxord %%zmm27, %%zmm27, %%zmm27\n"
      "vpxord %%zmm28, %%zmm28, %%zmm28\n vpxord %%zmm29, %%zmm29, %%zmm29\n vpxord %%zmm30, %%zmm30, %%zmm30\n"
      "vpxord %%zmm31, %%zmm31, %%zmm31\n" ::: "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23",
      "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31");
#endif
#if defined(__AVX__)
  _mm256_zeroupper();
#endif
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
      const float* xp = dense(x, packed);
      auto run = bits == 4 ? qgemv_float32<4> : qgemv_float32<8>;
      run(xp, reinterpret_cast<const uint8_t*>(w.data<uint32_t>()), scales.data<float>(), biases.data<float>(),
          out.data<float>(), rows, n, k, group_size);
      clean_vector_state();
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

// Gradients of our primitives: those of MLX's own op, computed by MLX.
using Reference = std::function<std::vector<mx::array>(const std::vector<mx::array>&)>;

std::vector<mx::array> reference_vjp(const Reference& reference, const std::vector<mx::array>& primals,
                                     const std::vector<mx::array>& cotangents, const std::vector<int>& argnums) {
  auto grads = mx::vjp(reference, primals, cotangents).second;
  std::vector<mx::array> picked;
  for (int arg : argnums) picked.push_back(grads[arg]);
  return picked;
}

// A primitive computed by `kernel(inputs as row-major float32, out)` on the CPU stream, one operation in the graph.
class DecodeOp : public mx::UnaryPrimitive {
 public:
  using Kernel = std::function<void(const std::vector<const float*>&, const std::vector<mx::array>&, float*)>;

  // inputs listed in `strided` are passed as they are (the kernel reads their strides); the others row-major
  DecodeOp(mx::Stream stream, const char* name, Kernel kernel, Reference reference, std::vector<bool> strided)
      : mx::UnaryPrimitive(stream),
        name_(name),
        kernel_(std::move(kernel)),
        reference_(std::move(reference)),
        strided_(std::move(strided)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    out.set_data(mx::allocator::malloc(out.nbytes()));
    encoder.set_output_array(out);
    std::vector<mx::array> weak;
    for (const auto& a : inputs) weak.push_back(mx::array::unsafe_weak_copy(a));
    encoder.dispatch([weak = std::move(weak), out = mx::array::unsafe_weak_copy(out), kernel = kernel_,
                      strided = strided_]() mutable {
      std::vector<std::vector<float>> buffers(weak.size());
      std::vector<const float*> data;
      for (size_t i = 0; i < weak.size(); ++i) {
        data.push_back(i < strided.size() && strided[i] ? weak[i].data<float>() : dense(weak[i], buffers[i]));
      }
      kernel(data, weak, out.data<float>());
      clean_vector_state();
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(std::string("[mcp_local ") + name_ + "] CPU only");
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    return reference_vjp(reference_, primals, cotangents, argnums);
  }

  const char* name() const override { return name_; }

 private:
  const char* name_;
  Kernel kernel_;
  Reference reference_;
  std::vector<bool> strided_;
};

void require_float32(const std::vector<mx::array>& arrays, const char* op) {
  for (const auto& a : arrays) {
    if (a.dtype() != mx::float32) {
      throw std::invalid_argument(std::string("[mcp_local ") + op + "] needs float32 inputs");
    }
  }
}

// The stream in use (MLX-LM generates on a stream of its own): on another stream, each of our operations would wait
// for that stream's work and it for ours.
mx::Stream cpu_stream() {
  mx::Stream s = mx::to_stream(std::monostate{});
  return s.device == mx::Device::cpu ? s : mx::default_stream(mx::Device::cpu);
}

mx::array make_op(const char* name, const mx::Shape& shape, const std::vector<mx::array>& inputs,
                  DecodeOp::Kernel kernel, Reference reference, std::vector<bool> strided = {}) {
  require_float32(inputs, name);
  mx::Stream s = cpu_stream();
  auto op = std::make_shared<DecodeOp>(s, name, std::move(kernel), std::move(reference), std::move(strided));
  return mx::array(shape, mx::float32, std::move(op), inputs);
}

// y = x * rsqrt(mean(x^2) + eps) * weight over the last axis, as mx.fast.rms_norm.
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps) {
  const int d = x.shape(-1);
  if (weight.ndim() != 1 || weight.shape(0) != d) throw std::invalid_argument("[mcp_local rms_norm] weight shape");
  auto kernel = [eps, d](const std::vector<const float*>& in, const std::vector<mx::array>& arrays, float* out) {
    const float* x = in[0];
    const float* w = in[1];
    const size_t rows = arrays[0].size() / d;
    for (size_t r = 0; r < rows; ++r) {
      const float* xr = x + r * d;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int i = 0; i < d; ++i) sum += xr[i] * xr[i];
      const float inv = 1.0f / std::sqrt(sum / d + eps);
      float* yr = out + r * d;
#pragma omp simd
      for (int i = 0; i < d; ++i) yr[i] = w[i] * (xr[i] * inv);
    }
  };
  auto reference = [eps](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{mx::fast::rms_norm(in[0], in[1], eps)};
  };
  return make_op("rms_norm", x.shape(), {x, weight}, kernel, reference);
}

// Rotary embedding of x (..., L, D) at positions offset .. offset + L - 1, as mx.fast.rope with a base.
mx::array rope(const mx::array& x, int dims, bool traditional, float base, float scale, int offset) {
  const int d = x.shape(-1);
  const int length = x.shape(-2);
  if (dims % 2 != 0 || dims > d) throw std::invalid_argument("[mcp_local rope] dims must be even and <= last axis");
  auto kernel = [=](const std::vector<const float*>& in, const std::vector<mx::array>& arrays, float* out) {
    const float* x = in[0];
    const int half = dims / 2;
    const float step = -std::log(base) / half;  // MLX: inverse frequencies exp(arange(0, -log(base), step))
    std::vector<float> cos_t(size_t(length) * half), sin_t(size_t(length) * half);
    for (int l = 0; l < length; ++l) {
      const float position = float(offset + l) * scale;
      for (int i = 0; i < half; ++i) {
        const float theta = position * std::exp(float(i) * step);
        cos_t[size_t(l) * half + i] = std::cos(theta);
        sin_t[size_t(l) * half + i] = std::sin(theta);
      }
    }
    const size_t rows = arrays[0].size() / d;
    for (size_t r = 0; r < rows; ++r) {
      const float* xr = x + r * d;
      float* yr = out + r * d;
      const float* c = cos_t.data() + size_t(r % length) * half;
      const float* sn = sin_t.data() + size_t(r % length) * half;
      for (int i = 0; i < half; ++i) {
        const int a = traditional ? 2 * i : i;
        const int b = traditional ? 2 * i + 1 : i + half;
        yr[a] = xr[a] * c[i] - xr[b] * sn[i];
        yr[b] = xr[a] * sn[i] + xr[b] * c[i];
      }
      for (int i = dims; i < d; ++i) yr[i] = xr[i];
    }
  };
  auto reference = [=](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{mx::fast::rope(in[0], dims, traditional, base, scale, offset)};
  };
  return make_op("rope", x.shape(), {x}, kernel, reference);
}

// softmax(scale * q k^T) v for q (B, Hq, L, D) and k, v (B, Hkv, S, D): every query sees every key (decode's one
// query row needs no mask); Hq a multiple of Hkv (grouped-query attention).
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || k.shape(0) != q.shape(0) || v.shape(0) != q.shape(0) ||
      k.shape(-1) != q.shape(-1) || k.shape(1) != v.shape(1) || k.shape(2) != v.shape(2) ||
      q.shape(1) % k.shape(1) != 0) {
    throw std::invalid_argument("[mcp_local attention] needs q (B, Hq, L, D), k and v (B, Hkv, S, D)");
  }
  const int batch = q.shape(0), heads = q.shape(1), length = q.shape(2), dk = q.shape(3);
  const int kv_heads = k.shape(1), keys = k.shape(2), dv = v.shape(3);
  // k and v are usually views of the KV cache's larger buffer: read in place when their last axis is contiguous
  const bool k_in_place = k.strides()[3] == 1, v_in_place = v.strides()[3] == 1;
  auto kernel = [=](const std::vector<const float*>& in, const std::vector<mx::array>& arrays, float* out) {
    const float* q = in[0];
    const float* k = in[1];
    const float* v = in[2];
    auto strides = [](const mx::array& a, bool in_place, int rows, int cols) {
      if (in_place) return std::array<int64_t, 3>{a.strides()[0], a.strides()[1], a.strides()[2]};
      return std::array<int64_t, 3>{int64_t(a.shape(1)) * rows * cols, int64_t(rows) * cols, cols};
    };
    const auto ks = strides(arrays[1], k_in_place, keys, dk);
    const auto vs = strides(arrays[2], v_in_place, keys, dv);
    std::vector<float> p(keys);
    for (int b = 0; b < batch; ++b) {
      for (int h = 0; h < heads; ++h) {
        const int kh = h / (heads / kv_heads);
        const float* kb = k + b * ks[0] + kh * ks[1];
        const float* vb = v + b * vs[0] + kh * vs[1];
        for (int l = 0; l < length; ++l) {
          const float* qr = q + ((size_t(b) * heads + h) * length + l) * dk;
          float top = -INFINITY;
          for (int j = 0; j < keys; ++j) {
            const float* kr = kb + j * ks[2];
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int i = 0; i < dk; ++i) dot += qr[i] * kr[i];
            p[j] = dot * scale;
            top = std::max(top, p[j]);
          }
          float total = 0.0f;
          for (int j = 0; j < keys; ++j) total += (p[j] = std::exp(p[j] - top));
          float* yr = out + ((size_t(b) * heads + h) * length + l) * dv;
          std::fill(yr, yr + dv, 0.0f);
          for (int j = 0; j < keys; ++j) {
            const float* vr = vb + j * vs[2];
            const float weight = p[j] / total;
#pragma omp simd
            for (int i = 0; i < dv; ++i) yr[i] += weight * vr[i];
          }
        }
      }
    }
  };
  auto reference = [scale](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{mx::fast::scaled_dot_product_attention(in[0], in[1], in[2], scale)};
  };
  return make_op("attention", {batch, heads, length, dv}, {q, k, v}, kernel, reference,
                 {false, k_in_place, v_in_place});
}

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
  mx::Stream s = cpu_stream();
  return mx::array(out_shape, mx::float32, std::make_shared<QuantizedGemv>(s, group_size, bits), {x, w, scales, biases});
}

}  // namespace

NB_MODULE(_cpu_decode, m) {
  m.def("qgemv", &qgemv, nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"), nb::arg("group_size"),
        nb::arg("bits"), "x @ dequantize(w).T for a 4- or 8-bit affine layer, float32, on the CPU.");
  m.def("rms_norm", &rms_norm, nb::arg("x"), nb::arg("weight"), nb::arg("eps"), "mx.fast.rms_norm, float32, CPU.");
  m.def("rope", &rope, nb::arg("x"), nb::arg("dims"), nb::arg("traditional"), nb::arg("base"), nb::arg("scale"),
        nb::arg("offset"), "mx.fast.rope with a base and an integer offset, float32, CPU.");
  m.def("attention", &attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("scale"),
        "Unmasked grouped-query attention (decode), float32, CPU.");
  m.def("threads", []() { return omp_get_max_threads(); });
}
