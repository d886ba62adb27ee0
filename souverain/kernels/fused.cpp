// Fused CPU kernels for the decoder (see souverain/kernels/__init__.py).
//
// At batch 1 a SmolLM2 decode step is ~1500 eager ops, most of them tiny: the RMSNorm alone is
// seven ATen ops on the CPU (pow, mean, add, rsqrt, mul, casts), the rotary embedding five,
// and decode attention a block gather plus SDPA padded to the longest sequence. Each kernel
// here does one of those jobs in one call, in float32, rounding to the activation dtype once.
// Every row (every sequence and kv head, for attention) is computed by the same loop
// whatever the number of rows or threads, so the results are bitwise batch invariant.
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

// out <- (hi + lo / 254) * a
__attribute__((noinline)) void combine_planes(const float* __restrict hi,
                                              const float* __restrict lo, float a,
                                              float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = (hi[i] + lo[i] * (1.0f / 254.0f)) * a;
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


// Cephes' expf: 2^n * e^r with |r| <= ln2 / 2 and a degree-6 polynomial (~1 ulp); plain
// float code, so the softmax loop vectorizes (std::exp does not without -ffast-math).
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r -= n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// s[g * stride] = scale * (q_g . k) for the G query heads of a kv head
__attribute__((noinline)) void head_dots(const float* __restrict q, int64_t G, int64_t D,
                                         const float* __restrict k, float scale,
                                         float* __restrict s, int64_t stride) {
#ifdef __AVX512F__
  if (D % 16 == 0) {  // compilers keep a lane array on the stack and sum it serially
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < D; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + i), _mm512_loadu_ps(k + i), acc);
      s[g * stride] = _mm512_reduce_add_ps(acc) * scale;
    }
    return;
  }
#endif
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float sum = 0.f;
    for (int64_t i = 0; i < D; ++i) sum += qg[i] * k[i];
    s[g * stride] = sum * scale;
  }
}

// s <- exp(s - max(s)); returns 1 / sum
__attribute__((noinline)) float softmax_unnormalized(float* __restrict s, int64_t n) {
  float m = s[0];
  for (int64_t j = 1; j < n; ++j) m = std::max(m, s[j]);
  float acc[kLanes] = {0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      s[j + l] = exp_approx(s[j + l] - m);
      acc[l] += s[j + l];
    }
  float sum = 0.f;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  for (; j < n; ++j) {
    s[j] = exp_approx(s[j] - m);
    sum += s[j];
  }
  return 1.f / sum;
}

// acc <- acc + p * v
inline void axpy(float* __restrict acc, float p, const float* __restrict v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += p * v[i];
}


// Calls fn(j, row) for the keys (or values) at positions [lo, hi) of one sequence, j counting
// from 0: position p is slot table[p / bs] * bs + p % bs, and a slot's row for this kv head is
// base + slot * row_stride, of which fn reads the first `width` elements. Walks the table block
// by block (no division per key), prefetching the next block's rows while this one is used:
// the pages are scattered, so the hardware prefetcher cannot guess them (SmolLM2 batch-16
// decode: 240 -> 171 us per layer's attention).
template <typename T>
inline void prefetch_rows(const T* block, int64_t rows, int64_t row_stride, int64_t width) {
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t b = 0; b < width * int64_t(sizeof(T)); b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(block + t * row_stride) + b);
}

// The rows for_each_slot(base, table, lo, hi, ...) reads first (its first block).
template <typename T>
inline void prefetch_first_block(const T* base, const int64_t* table, int64_t lo, int64_t hi,
                                 int64_t bs, int64_t row_stride, int64_t width) {
  const int64_t in_block = lo % bs;
  prefetch_rows(base + (table[lo / bs] * bs + in_block) * row_stride,
                std::min(bs - in_block, hi - lo), row_stride, width);
}

template <typename T, typename Fn>
inline void for_each_slot(const T* base, const int64_t* table, int64_t lo, int64_t hi,
                          int64_t bs, int64_t row_stride, int64_t width, Fn&& fn) {
  for (int64_t pos = lo, j = 0; pos < hi;) {
    const int64_t in_block = pos % bs, take = std::min(bs - in_block, hi - pos);
    const T* row = base + (table[pos / bs] * bs + in_block) * row_stride;
    if (pos + take < hi)
      prefetch_rows(base + table[pos / bs + 1] * bs * row_stride, std::min(bs, hi - pos - take),
                    row_stride, width);
    for (int64_t t = 0; t < take; ++t, ++j) fn(j, row + t * row_stride);
    pos += take;
  }
}

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Lane i of the result is the sum of v[i]'s 16 lanes: a transpose-and-add tree, 45 ops for
// 16 dot products where 16 horizontal reductions (_mm512_reduce_add_ps) take ~130.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 s1[8], s2[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    s1[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                          _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: the lane's sum for 4 consecutive vectors
    s2[i] = _mm512_add_ps(_mm512_shuffle_ps(s1[2 * i], s1[2 * i + 1], 0x44),
                          _mm512_shuffle_ps(s1[2 * i], s1[2 * i + 1], 0xEE));
  const __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(s2[0], s2[1], 0x88),
                                 _mm512_shuffle_f32x4(s2[0], s2[1], 0xDD));
  const __m512 w = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2], s2[3], 0x88),
                                 _mm512_shuffle_f32x4(s2[2], s2[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u, w, 0x88), _mm512_shuffle_f32x4(u, w, 0xDD));
}

// partial[g * 16 + j % 16] = q_g * key_j (unsummed) for GT query heads held in registers;
// flush(j0, count) after every 16 keys and after the last.
template <typename scalar_t, int C, int GT, typename Flush>
inline void key_products(const float* qf, const scalar_t* kp, const int64_t* table, int64_t lo,
                         int64_t hi, int64_t bs, int64_t row_stride, __m512* partial,
                         Flush&& flush) {
  __m512 q[GT][C];
  for (int g = 0; g < GT; ++g)
    for (int c = 0; c < C; ++c) q[g][c] = _mm512_loadu_ps(qf + g * 16 * C + 16 * c);
  const int64_t n = hi - lo;
  for_each_slot(kp, table, lo, hi, bs, row_stride, 16 * C, [&](int64_t j, const scalar_t* key) {
    __m512 k[C];
    for (int c = 0; c < C; ++c) k[c] = load16(key + 16 * c);
    for (int g = 0; g < GT; ++g) {
      __m512 acc = _mm512_mul_ps(q[g][0], k[0]);
      for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(q[g][c], k[c], acc);
      partial[g * 16 + (j & 15)] = acc;
    }
    if ((j & 15) == 15) flush(j - 15, 16);
  });
  if (n & 15) flush(n & ~int64_t{15}, n & 15);
}

// acc[g][c] += p[g][j] * value[c] for GT query heads over all keys: each value row is loaded
// once for the GT heads (GT * C accumulators in registers).
template <typename scalar_t, int C, int GT>
inline void weighted_values(const scalar_t* vp, const int64_t* table, int64_t lo, int64_t hi,
                            int64_t bs, int64_t row_stride, const float* p, int64_t n,
                            float* out, int64_t D) {
  __m512 acc[GT][C];
  for (int g = 0; g < GT; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for_each_slot(vp, table, lo, hi, bs, row_stride, 16 * C, [&](int64_t j, const scalar_t* value) {
    __m512 v[C];
    for (int c = 0; c < C; ++c) v[c] = load16(value + 16 * c);
    for (int g = 0; g < GT; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * n + j]);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(w, v[c], acc[g][c]);
    }
  });
  for (int g = 0; g < GT; ++g)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + g * D + 16 * c, acc[g][c]);
}

// One (sequence, kv head) item with head_dim = 16 * C, in registers. Scores: each key row is
// loaded once for the G query heads, and 16 keys' products are summed at once
// (sum_lanes16). Values: one pass for up to kMaxAcc / C heads at a time.
//   scores (G, n) scratch; out (G, D) float32, normalized
template <typename scalar_t, int C>
void attend_item_avx512(const float* qf, int64_t G, const scalar_t* kp, const scalar_t* vp,
                        const int64_t* table, int64_t lo, int64_t hi, int64_t bs,
                        int64_t row_stride, float scale, float* scores, float* out,
                        __m512* partial) {
  constexpr int64_t D = 16 * C;
  const int64_t n = hi - lo;
  const __m512 vscale = _mm512_set1_ps(scale);
  auto flush = [&](int64_t g0, int64_t gt, int64_t j0, int64_t count) {  // keys j0.. in partial
    for (int64_t g = g0; g < g0 + gt; ++g) {
      __m512* pg = partial + (g - g0) * 16;
      for (int64_t i = count; i < 16; ++i) pg[i] = _mm512_setzero_ps();
      const __m512 sums = _mm512_mul_ps(sum_lanes16(pg), vscale);
      _mm512_mask_storeu_ps(scores + g * n + j0, static_cast<__mmask16>((1u << count) - 1u), sums);
    }
  };
  prefetch_first_block(vp, table, lo, hi, bs, row_stride, D);  // read after the key pass
  constexpr int kQTile = C == 4 ? 5 : 2;  // heads per key pass: their q in registers
  for (int64_t g0 = 0; g0 < G; g0 += kQTile) {
    const int64_t gt = std::min<int64_t>(kQTile, G - g0);
    switch (gt) {
      case 1: key_products<scalar_t, C, 1>(qf + g0 * D, kp, table, lo, hi, bs, row_stride, partial, [&](int64_t j0, int64_t cnt) { flush(g0, 1, j0, cnt); }); break;
      case 2: key_products<scalar_t, C, 2>(qf + g0 * D, kp, table, lo, hi, bs, row_stride, partial, [&](int64_t j0, int64_t cnt) { flush(g0, 2, j0, cnt); }); break;
      case 3: key_products<scalar_t, C, 3>(qf + g0 * D, kp, table, lo, hi, bs, row_stride, partial, [&](int64_t j0, int64_t cnt) { flush(g0, 3, j0, cnt); }); break;
      case 4: key_products<scalar_t, C, 4>(qf + g0 * D, kp, table, lo, hi, bs, row_stride, partial, [&](int64_t j0, int64_t cnt) { flush(g0, 4, j0, cnt); }); break;
      default: key_products<scalar_t, C, 5>(qf + g0 * D, kp, table, lo, hi, bs, row_stride, partial, [&](int64_t j0, int64_t cnt) { flush(g0, 5, j0, cnt); });
    }
  }
  std::vector<float> inv(G);
  for (int64_t g = 0; g < G; ++g) inv[g] = softmax_unnormalized(scores + g * n, n);
  constexpr int kTile = 24 / C;  // heads per value pass: 24 accumulators of the 32 registers
  for (int64_t g0 = 0; g0 < G; g0 += kTile) {
    const float* p = scores + g0 * n;
    float* o = out + g0 * D;
    switch (std::min<int64_t>(kTile, G - g0)) {
      case 1: weighted_values<scalar_t, C, 1>(vp, table, lo, hi, bs, row_stride, p, n, o, D); break;
      case 2: weighted_values<scalar_t, C, 2>(vp, table, lo, hi, bs, row_stride, p, n, o, D); break;
      case 3: weighted_values<scalar_t, C, 3>(vp, table, lo, hi, bs, row_stride, p, n, o, D); break;
      case 4: weighted_values<scalar_t, C, 4>(vp, table, lo, hi, bs, row_stride, p, n, o, D); break;
      case 5: weighted_values<scalar_t, C, 5>(vp, table, lo, hi, bs, row_stride, p, n, o, D); break;
      default: weighted_values<scalar_t, C, 6>(vp, table, lo, hi, bs, row_stride, p, n, o, D);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const __m512 s = _mm512_set1_ps(inv[g]);
    for (int c = 0; c < C; ++c)
      _mm512_storeu_ps(out + g * D + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(out + g * D + 16 * c), s));
  }
}
#endif

// Attention of one new query per sequence (decode rows) straight from the paged KV cache.
//   q (B, H, D); k_cache, v_cache (slots, KVH, D) of one layer; block_tables (B, W) int64;
//   sequence b sees the keys at positions [lo[b], hi[b]) counted from the start of its
//   table's first block, position p living in slot block_tables[b][p / bs] * bs + p % bs.
// Exact softmax in float32 (two passes over the scores), no gather and no padding: each
// (sequence, kv head) pair is one work item that reads its keys and values in place.
template <typename scalar_t>
void paged_attention_items(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const int64_t* lo, const int64_t* hi, int64_t bs, float scale,
                           at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1);
  const int64_t G = H / KVH, W = block_tables.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  const int64_t* tp = block_tables.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  int64_t work = 0;  // keys x heads: small problems stay on the calling thread
  for (int64_t b = 0; b < B; ++b) work += (hi[b] - lo[b]) * H;
  const int64_t grain = work < 2048 ? B * KVH : 1;
  at::parallel_for(0, B * KVH, grain, [&](int64_t begin, int64_t end) {
  std::vector<float> qf(G * D), acc(G * D), row(D), scores, inv(G);
#ifdef __AVX512F__
  std::vector<__m512> partial(G * 16);  // 16 keys' unsummed products per query head
#endif
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / KVH, kvh = item % KVH, n = hi[b] - lo[b];
    const int64_t* table = tp + b * W;
    if (item + 1 < end) {  // the next item's first keys, while this one is computed
      const int64_t b1 = (item + 1) / KVH;
      prefetch_first_block(kp + ((item + 1) % KVH) * D, tp + b1 * W, lo[b1], hi[b1], bs, KVH * D, D);
    }
    for (int64_t g = 0; g < G; ++g) load_row(qp + b * qs0 + (kvh * G + g) * qs1, &qf[g * D], D);
    scores.resize(G * n);
#ifdef __AVX512F__
    if constexpr (!std::is_same_v<scalar_t, double>) if (D == 64 || D == 128) {
      auto item_fn = D == 64 ? attend_item_avx512<scalar_t, 4> : attend_item_avx512<scalar_t, 8>;
      item_fn(qf.data(), G, kp + kvh * D, vp + kvh * D, table, lo[b], hi[b], bs, KVH * D, scale,
              scores.data(), acc.data(), partial.data());
      for (int64_t g = 0; g < G; ++g) store_row(&acc[g * D], op + (b * H + kvh * G + g) * D, D);
      continue;
    }
#endif
    for_each_slot(kp + kvh * D, table, lo[b], hi[b], bs, KVH * D, D,
                  [&](int64_t j, const scalar_t* key) {
      load_row(key, row.data(), D);
      head_dots(qf.data(), G, D, row.data(), scale, &scores[j], n);
    });
    for (int64_t g = 0; g < G; ++g) inv[g] = softmax_unnormalized(&scores[g * n], n);
    std::fill(acc.begin(), acc.end(), 0.f);
    for_each_slot(vp + kvh * D, table, lo[b], hi[b], bs, KVH * D, D,
                  [&](int64_t j, const scalar_t* value) {
      load_row(value, row.data(), D);
      for (int64_t g = 0; g < G; ++g) axpy(&acc[g * D], scores[g * n + j], row.data(), D);
    });
    for (int64_t g = 0; g < G; ++g) {
      float* a = &acc[g * D];
      for (int64_t d = 0; d < D; ++d) a[d] *= inv[g];
      store_row(a, op + (b * H + kvh * G + g) * D, D);
    }
  }
  });
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& lo, const at::Tensor& hi, int64_t block_size,
                           double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1,
              "paged_attention: q must be (B, H, D) with contiguous D");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
              v_cache.is_contiguous(),
              "paged_attention: k_cache and v_cache must be contiguous (slots, KVH, D)");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "paged_attention: q, k_cache and v_cache must have one dtype");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D && KVH > 0 && H % KVH == 0,
              "paged_attention: head_dim or head counts do not match the cache");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 &&
              block_tables.size(0) == B && block_tables.is_contiguous(),
              "paged_attention: block_tables must be contiguous int64 (B, W)");
  TORCH_CHECK(lo.scalar_type() == at::kLong && hi.scalar_type() == at::kLong && lo.numel() == B &&
              hi.numel() == B && lo.is_contiguous() && hi.is_contiguous(),
              "paged_attention: lo and hi must be contiguous int64 (B,)");
  const int64_t* lp = lo.data_ptr<int64_t>();
  const int64_t* hp = hi.data_ptr<int64_t>();
  const int64_t slots = k_cache.size(0), W = block_tables.size(1);
  const int64_t* tp = block_tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= lp[b] && lp[b] < hp[b] && (hp[b] - 1) / block_size < W,
                "paged_attention: key range of row ", b, " is empty or beyond its block table");
    for (int64_t i = lp[b] / block_size; i <= (hp[b] - 1) / block_size; ++i)
      TORCH_CHECK(0 <= tp[b * W + i] && (tp[b * W + i] + 1) * block_size <= slots,
                  "paged_attention: block ", tp[b * W + i], " is outside the cache");
  }
  auto out = at::empty({B, H, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    paged_attention_items<scalar_t>(q, k_cache, v_cache, block_tables, lp, hp, block_size,
                                    static_cast<float>(scale), out);
  });
  return out;
}


// Activations of an int8 linear as two int8 planes per row (see Int8Linear), uint8 with zero
// point 128 for oneDNN: planes (2m, K) = [hi + 128; lo + 128], amax (m, 1) float32, where
//   amax = max(|x|, 1e-30), xs = x * (127 / amax), hi = round(xs), lo = round((xs - hi) * 254)
// with round half to even: the same bytes as the PyTorch ops of Int8Linear.forward.
__attribute__((noinline)) void quantize_row(const float* __restrict x, int64_t K, float s,
                                            uint8_t* __restrict hi_out,
                                            uint8_t* __restrict lo_out) {
  for (int64_t i = 0; i < K; ++i) {
    const float xs = x[i] * s;
    const float hi = std::nearbyint(xs);
    const float lo = std::nearbyint((xs - hi) * 254.0f);
    hi_out[i] = static_cast<uint8_t>(static_cast<int32_t>(hi) + 128);
    lo_out[i] = static_cast<uint8_t>(static_cast<int32_t>(lo) + 128);
  }
}

__attribute__((noinline)) float abs_max(const float* __restrict x, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = std::max(acc[j], std::fabs(x[i + j]));
  float m = 0.f;
  for (int j = 0; j < kLanes; ++j) m = std::max(m, acc[j]);
  for (; i < n; ++i) m = std::max(m, std::fabs(x[i]));
  return m;
}

std::tuple<at::Tensor, at::Tensor> int8_planes(const at::Tensor& input) {
  const at::Tensor x = as_rows(input, "int8_planes");
  const int64_t m = x.size(0), K = x.size(1);
  auto planes = at::empty({2 * m, K}, x.options().dtype(at::kByte));
  auto amax = at::empty({m, 1}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_planes", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    uint8_t* pp = planes.data_ptr<uint8_t>();
    float* ap = amax.data_ptr<float>();
    const int64_t xs = x.stride(0);
    at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(K);
      for (int64_t r = begin; r < end; ++r) {
        load_row(xp + r * xs, row.data(), K);
        const float a = std::max(abs_max(row.data(), K), 1e-30f);
        ap[r] = a;
        // (1 / a) * 127, not 127 / a: torch evaluates `127.0 / amax` as reciprocal(amax) * 127
        quantize_row(row.data(), K, (1.0f / a) * 127.0f, pp + r * K, pp + (m + r) * K);
      }
    });
  });
  return {planes, amax};
}

// out (m, n) <- dtype((acc[:m] + acc[m:] / 254) * amax): the two planes' integer products
// (already times the weight scales / 127 in oneDNN's epilogue) summed back into one float.
// out may be a column block of a wider output (row stride >= n).
void int8_epilogue_(at::Tensor& out, const at::Tensor& acc, const at::Tensor& amax) {
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1, "int8_epilogue_: out must be (m, n) rows");
  const int64_t m = out.size(0), n = out.size(1);
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous() && acc.dim() == 2 &&
              acc.size(0) == 2 * m && acc.size(1) == n,
              "int8_epilogue_: acc must be contiguous float32 (2m, n)");
  TORCH_CHECK(amax.scalar_type() == at::kFloat && amax.is_contiguous() && amax.numel() == m,
              "int8_epilogue_: amax must be contiguous float32 (m, 1)");
  const float* cp = acc.data_ptr<float>();
  const float* ap = amax.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "int8_epilogue_", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t os = out.stride(0);
    at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
      float buf[kChunk];
      for (int64_t r = begin; r < end; ++r)
        for (int64_t c = 0; c < n; c += kChunk) {
          const int64_t len = std::min(kChunk, n - c);
          combine_planes(cp + r * n + c, cp + (m + r) * n + c, ap[r], buf, len);
          store_row(buf, op + r * os + c, len);
        }
    });
  });
}

}  // namespace

TORCH_LIBRARY(souverain, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_(Tensor(a!) x, Tensor rope) -> ()");
  m.def("int8_planes(Tensor x) -> (Tensor, Tensor)");
  m.def("int8_epilogue_(Tensor(a!) out, Tensor acc, Tensor amax) -> ()");
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor lo, Tensor hi, int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(souverain, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_", &rotary_);
  m.impl("paged_attention", &paged_attention);
  m.impl("int8_planes", &int8_planes);
  m.impl("int8_epilogue_", &int8_epilogue_);
}
