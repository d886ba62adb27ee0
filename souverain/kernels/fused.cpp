// Fused CPU kernels for the decoder's small row-wise ops (see souverain/kernels/__init__.py).
//
// At batch 1 a SmolLM2 decode step is ~1500 eager ops, most of them tiny: the RMSNorm alone is
// seven ATen ops on the CPU (pow, mean, add, rsqrt, mul, casts), the rotary embedding five.
// Each kernel here does one of those jobs in one pass over a row, in float32, rounding to
// the activation dtype once. Every row is computed by the same loop whatever the number of
// rows or threads, so the results are bitwise batch invariant.
//
// Registered as torch.ops.souverain.* (no pybind: the dispatcher calls them directly).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// Conversions the compiler can vectorize (c10's bfloat16 rounding has a NaN branch that
// keeps loops scalar): float <-> bfloat16 with round-to-nearest-even, NaN kept a quiet NaN.
template <typename T> inline float to_f(T v) { return static_cast<float>(v); }
template <> inline float to_f<at::BFloat16>(at::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename T> inline T from_f(float f) { return static_cast<T>(f); }
template <> inline at::BFloat16 from_f<at::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : static_cast<uint16_t>(rounded);
  return at::BFloat16(bits, at::BFloat16::from_bits());
}

template <typename T>
void load_row(const T* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i]);
}
template <typename T>
void store_row(const float* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_f<T>(src[i]);
}

// (x0, x1) <- (x0 cos - x1 sin, x1 cos + x0 sin) for each interleaved pair
__attribute__((noinline)) void rotate_pairs(const float* __restrict x, const float* __restrict cs,
                                            float* __restrict out, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x0 = x[2 * i], x1 = x[2 * i + 1], cos = cs[2 * i], sin = cs[2 * i + 1];
    out[2 * i] = x0 * cos - x1 * sin;
    out[2 * i + 1] = x1 * cos + x0 * sin;
  }
}

// h <- (h + u) (the caller rounds it to the activation dtype)
__attribute__((noinline)) void add_rows(float* __restrict h, const float* __restrict u,
                                        int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] += u[i];
}

// h <- h * inv * w
__attribute__((noinline)) void scale_rows(float* __restrict h, const float* __restrict w,
                                          float inv, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = h[i] * inv * w[i];
}

constexpr int kLanes = 16;  // independent partial sums: lets the compiler vectorize the sum

inline float sum_of_squares(const float* v, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += v[i + j] * v[i + j];
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += v[i] * v[i];
  return s;
}

// (rows, features) view of x: every leading dimension flattened, features contiguous
at::Tensor as_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 1, name, ": expected a tensor with a feature dimension");
  at::Tensor rows = x.reshape({-1, x.size(-1)});
  return rows.stride(1) == 1 ? rows : rows.contiguous();
}

constexpr int64_t kChunk = 512;  // floats per stack buffer: rows are processed in chunks

// out = dtype(h * rsqrt(mean(h^2) + eps) * weight), h = x (+ residual, rounded to dtype first).
// Two passes per row: the sum of squares, then the scaled output (h re-read from x, or from
// the rounded sum already written).
template <typename scalar_t, typename weight_t>
void rms_norm_rows(const at::Tensor& x, const at::Tensor* residual, at::Tensor* sum,
                   const at::Tensor& weight, double eps, at::Tensor& out) {
  const int64_t rows = x.size(0), dim = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* rp = residual ? residual->data_ptr<scalar_t>() : nullptr;
  scalar_t* sp = sum ? sum->data_ptr<scalar_t>() : nullptr;
  const weight_t* wp = weight.data_ptr<weight_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t xs = x.stride(0), rs = residual ? residual->stride(0) : 0, os = out.stride(0);
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    float h[kChunk], u[kChunk], w[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      // the residual stream keeps its dtype: the sum is rounded as `x + residual` would be
      const scalar_t* src = rp ? sp + r * dim : xp + r * xs;
      float ss = 0.f;
      for (int64_t c = 0; c < dim; c += kChunk) {
        const int64_t n = std::min(kChunk, dim - c);
        load_row(xp + r * xs + c, h, n);
        if (rp) {
          load_row(rp + r * rs + c, u, n);
          add_rows(h, u, n);
          store_row(h, sp + r * dim + c, n);
          load_row(sp + r * dim + c, h, n);
        }
        ss += sum_of_squares(h, n);
      }
      const float inv = 1.f / std::sqrt(ss / dim + feps);
      for (int64_t c = 0; c < dim; c += kChunk) {
        const int64_t n = std::min(kChunk, dim - c);
        load_row(src + c, h, n);
        load_row(wp + c, w, n);
        scale_rows(h, w, inv, n);
        store_row(h, op + r * os + c, n);
      }
    }
  });
}

void dispatch_rms_norm(const at::Tensor& x, const at::Tensor* residual, at::Tensor* sum,
                       const at::Tensor& weight, double eps, at::Tensor& out) {
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "rms_norm: weight must be a contiguous vector of ", x.size(1), " values");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    using act_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(),
                                    "rms_norm_weight", [&] {
      rms_norm_rows<act_t, scalar_t>(x, residual, sum, weight, eps, out);
    });
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor rows = as_rows(x, "rms_norm");
  auto out = at::empty(rows.sizes(), rows.options());
  dispatch_rms_norm(rows, nullptr, nullptr, weight, eps, out);
  return out.view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: x and residual must have the same shape and dtype");
  const at::Tensor rows = as_rows(x, "add_rms_norm"), res = as_rows(residual, "add_rms_norm");
  auto out = at::empty(rows.sizes(), rows.options());
  auto sum = at::empty(rows.sizes(), rows.options());
  dispatch_rms_norm(rows, &res, &sum, weight, eps, out);
  return {out.view(x.sizes()), sum.view(x.sizes())};
}

// In place on x (rows, heads, head_dim), interleaved pairs (2i, 2i+1):
//   (x0, x1) <- (x0 cos - x1 sin, x1 cos + x0 sin),  cos/sin = rope[row, i, 0/1] (float32)
void rotary_(at::Tensor& x, const at::Tensor& rope) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "rotary_: expected x (rows, heads, head_dim) with contiguous even head_dim");
  const int64_t rows = x.size(0), heads = x.size(1), half = x.size(2) / 2;
  TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.dim() == 3 && rope.size(0) == rows &&
              rope.size(1) == half && rope.size(2) == 2 && rope.is_contiguous(),
              "rotary_: rope must be float32 (rows, head_dim / 2, 2) contiguous");
  const float* cs = rope.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1);
    TORCH_CHECK(half <= kChunk, "rotary_: head_dim above ", 2 * kChunk);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      float in[2 * kChunk], out[2 * kChunk];
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t h = 0; h < heads; ++h) {
          scalar_t* v = xp + r * s0 + h * s1;
          load_row(v, in, 2 * half);
          rotate_pairs(in, cs + r * half * 2, out, half);
          store_row(out, v, 2 * half);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY(souverain, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_(Tensor(a!) x, Tensor rope) -> ()");
}

TORCH_LIBRARY_IMPL(souverain, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_", &rotary_);
}
