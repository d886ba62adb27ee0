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
#include <vector>
#include <type_traits>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

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

#ifdef __AVX512F__
inline __m512 exp_approx16(__m512 x);
#endif

// s <- exp(s - max(s)); returns 1 / sum
__attribute__((noinline)) float softmax_unnormalized(float* __restrict s, int64_t n) {
#ifdef __AVX512F__
  if (n >= 16) {  // the same operations on 16 lanes (exp_approx16), so the same values
    __m512 mv = _mm512_loadu_ps(s);
    int64_t j = 16;
    for (; j + 16 <= n; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + j));
    float m = _mm512_reduce_max_ps(mv);
    for (; j < n; ++j) m = std::max(m, s[j]);
    const __m512 mb = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    j = 0;
    for (; j + 16 <= n; j += 16) {
      const __m512 e = exp_approx16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mb));
      _mm512_storeu_ps(s + j, e);
      acc = _mm512_add_ps(acc, e);
    }
    float sum = _mm512_reduce_add_ps(acc);
    for (; j < n; ++j) {
      s[j] = exp_approx(s[j] - m);
      sum += s[j];
    }
    return 1.f / sum;
  }
#endif
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
//   scores (G, n) and inv (G) scratch; out (G, D) float32, normalized
template <typename scalar_t, int C>
void attend_item_avx512(const float* qf, int64_t G, const scalar_t* kp, const scalar_t* vp,
                        const int64_t* table, int64_t lo, int64_t hi, int64_t bs,
                        int64_t row_stride, float scale, float* scores, float* out,
                        __m512* partial, float* inv) {
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
              scores.data(), acc.data(), partial.data(), inv.data());
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

// One row's two planes (uint8, zero point 128) into hi and lo; returns the row's scale amax.
template <typename T>
inline float quantize_planes(const T* x, int64_t K, float* row, uint8_t* hi, uint8_t* lo) {
  load_row(x, row, K);
  const float a = std::max(abs_max(row, K), 1e-30f);
  // (1 / a) * 127, not 127 / a: torch evaluates `127.0 / amax` as reciprocal(amax) * 127
  quantize_row(row, K, (1.0f / a) * 127.0f, hi, lo);
  return a;
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
      for (int64_t r = begin; r < end; ++r)
        ap[r] = quantize_planes(xp + r * xs, K, row.data(), pp + r * K, pp + (m + r) * K);
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


// out (rows, H) = silu(x[:, :H]) * x[:, H:] for SwiGLU's fused gate|up projection, in float32,
// rounded once to x's dtype (F.silu then a multiply round twice in bf16).
#ifdef __AVX512F__
// exp_approx on 16 lanes (the same operations, so the same bits)
inline __m512 exp_approx16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(
      _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r),
                                 _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
}
#endif

__attribute__((noinline)) void silu_mul_row(const float* __restrict g, const float* __restrict u,
                                            float* __restrict out, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __m512 e = exp_approx16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)),
                                            _mm512_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) out[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
}

at::Tensor silu_mul(const at::Tensor& input) {
  const at::Tensor x = as_rows(input, "silu_mul");
  const int64_t rows = x.size(0), H = x.size(1) / 2;
  TORCH_CHECK(x.size(1) % 2 == 0, "silu_mul: expected an even number of columns (gate|up)");
  auto out_shape = input.sizes().vec();
  out_shape.back() = H;
  auto out = at::empty({rows, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0);
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)),
                     [&](int64_t begin, int64_t end) {
      float g[kChunk], u[kChunk], o[kChunk];
      for (int64_t r = begin; r < end; ++r)
        for (int64_t c = 0; c < H; c += kChunk) {
          const int64_t len = std::min(kChunk, H - c);
          load_row(xp + r * xs + c, g, len);
          load_row(xp + r * xs + H + c, u, len);
          silu_mul_row(g, u, o, len);
          store_row(o, op + r * H + c, len);
        }
    });
  });
  return out.view(out_shape);
}

// ---------------------------------------------------------------------------------------------
// Int8Linear's own matmul (AVX-512 VNNI): the two activation planes times the int8 weight, the
// planes' sum and the scales applied in registers, the output written in the activation dtype.
//
// Weight layout ("vnni"): (ceil(N / 16), ceil(K / 4), 64) int8, zero padded; block b, step k
// holds output channels 16b..16b+15, each with its 4 input columns 4k..4k+3 (what one
// vpdpbusd multiplies: 4 uint8 activations broadcast, times 16 x 4 int8 weights, summed into
// 16 int32 lanes). Activations are the planes of int8_planes (uint8, zero point 128) with the
// hi and lo rows of each input row interleaved; the zero point comes back out as
// 128 * sum_k w[n, k] (`comp`). A tile is MR plane rows x NR blocks of int32 accumulators
// (8 x 3 = 24 of the 32 registers); the loops are unrolled by hand-placed pragmas, without
// which GCC keeps the accumulator array on the stack (2.4 instead of 6 G vpdpbusd/s a core).
//
// Per output: a = float(acc_hi - comp) * s, b = float(acc_lo - comp) * s (s = scale / 127),
// y = (a + b * (1 / 254)) * amax: oneDNN's float32 epilogue and int8_epilogue_'s sum, in the
// same order, so the result is bitwise that of the oneDNN path. Integer sums are exact, every
// row is computed alone: batch invariant.
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SOUVERAIN_VNNI 1
#define UNROLL _Pragma("GCC unroll 16")

inline void store16(float* dst, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(dst, mask, v); }
inline void store16(at::BFloat16* dst, __m512 v, __mmask16 mask) {
  // round to nearest even, NaN kept a quiet NaN (from_f's rule, 16 lanes at once)
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(dst, mask, _mm512_cvtepi32_epi16(r));
}
inline void store16(at::Half* dst, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(dst, mask, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <int MR, int NR, typename T>
inline void vnni_tile(const uint8_t* a, int64_t lda, const int8_t* b, int64_t K4,
                      const int32_t* comp, const float* s127, const float* amax, T* y,
                      int64_t ldy, int64_t cols, const int8_t* prefetch) {
  __m512i acc[MR][NR];
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int n = 0; n < NR; ++n)
    acc[m][n] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K4; ++k) {
    if (prefetch != nullptr)  // the next panel's weights, streamed in step with this one's
      UNROLL for (int n = 0; n < 3; ++n)
        _mm_prefetch(reinterpret_cast<const char*>(prefetch + (n * K4 + k) * 64), _MM_HINT_T0);
    __m512i bv[NR];
    UNROLL for (int n = 0; n < NR; ++n) bv[n] = _mm512_loadu_si512(b + (n * K4 + k) * 64);
    UNROLL for (int m = 0; m < MR; ++m) {
      const __m512i av = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(a + m * lda + 4 * k));
      UNROLL for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_dpbusd_epi32(acc[m][n], av, bv[n]);
    }
  }
  const __m512 inv254 = _mm512_set1_ps(1.0f / 254.0f);
  UNROLL for (int n = 0; n < NR; ++n) {
    const int64_t left = cols - 16 * n;
    if (left <= 0) break;
    const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    const __m512i c = _mm512_loadu_si512(comp + 16 * n);
    const __m512 s = _mm512_loadu_ps(s127 + 16 * n);
    UNROLL for (int p = 0; p < MR / 2; ++p) {
      const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[2 * p][n], c)), s);
      const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[2 * p + 1][n], c)), s);
      const __m512 out = _mm512_mul_ps(_mm512_add_ps(hi, _mm512_mul_ps(lo, inv254)),
                                       _mm512_set1_ps(amax[p]));
      store16(y + p * ldy + 16 * n, out, mask);
    }
  }
}

// All plane rows (2m, interleaved) times blocks [16 * NR * panel, ...) of one panel.
template <int NR, typename T>
void vnni_panel(const uint8_t* a, int64_t rows, int64_t lda, const int8_t* b, int64_t K4,
                const int32_t* comp, const float* s127, const float* amax, T* y, int64_t ldy,
                int64_t cols, const int8_t* next) {
  // the first tile prefetches the next panel (nullptr: none), the others find this one cached
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8, next = nullptr)
    vnni_tile<8, NR>(a + r * lda, lda, b, K4, comp, s127, amax + r / 2, y + (r / 2) * ldy, ldy,
                     cols, next);
  if (r + 4 <= rows) {
    vnni_tile<4, NR>(a + r * lda, lda, b, K4, comp, s127, amax + r / 2, y + (r / 2) * ldy, ldy,
                     cols, next);
    r += 4;
    next = nullptr;
  }
  if (r < rows)
    vnni_tile<2, NR>(a + r * lda, lda, b, K4, comp, s127, amax + r / 2, y + (r / 2) * ldy, ldy,
                     cols, next);
}

// y (m, n_out) from the interleaved planes (2m, lda): panels of 3 blocks split over threads
template <typename T>
void vnni_gemm(const uint8_t* pp, int64_t m, int64_t lda, const at::Tensor& packed,
               const at::Tensor& comp, const at::Tensor& s127, const float* ap, T* yp,
               int64_t n_out) {
  const int64_t N16 = packed.size(0), K4 = packed.size(1);
  const int8_t* bp = packed.data_ptr<int8_t>();
  const int32_t* cp = comp.data_ptr<int32_t>();
  const float* sp = s127.data_ptr<float>();
  const int64_t panels = (N16 + 2) / 3;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t blocks = std::min<int64_t>(3, N16 - 3 * p);
      const int64_t cols = std::min<int64_t>(48, n_out - 48 * p);
      const int8_t* b = bp + 3 * p * K4 * 64;
      const int64_t c0 = 48 * p;
      // a whole next panel of this thread's (the last one, ragged or not its own: no prefetch)
      const int8_t* next = p + 1 < end && N16 - 3 * (p + 1) >= 3 ? b + 3 * K4 * 64 : nullptr;
      switch (blocks) {
        case 3: vnni_panel<3>(pp, 2 * m, lda, b, K4, cp + c0, sp + c0, ap, yp + c0, n_out, cols, next); break;
        case 2: vnni_panel<2>(pp, 2 * m, lda, b, K4, cp + c0, sp + c0, ap, yp + c0, n_out, cols, next); break;
        default: vnni_panel<1>(pp, 2 * m, lda, b, K4, cp + c0, sp + c0, ap, yp + c0, n_out, cols, next);
      }
    }
  });
}
template <>
void vnni_gemm<double>(const uint8_t*, int64_t, int64_t, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const float*, double*, int64_t) {
  TORCH_CHECK(false, "int8_linear: float64 activations are not supported");
}
#endif

bool has_vnni() {
#ifdef SOUVERAIN_VNNI
  return true;
#else
  return false;
#endif
}

// y (..., n_out) = Int8Linear(x) on a "vnni" packed weight (see above): x any float dtype,
// quantized into its two planes here; comp (N16 * 16,) int32; s127 (N16 * 16,) float32.
at::Tensor int8_linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& comp,
                       const at::Tensor& s127, int64_t n_out) {
#ifndef SOUVERAIN_VNNI
  TORCH_CHECK(false, "int8_linear: this CPU has no AVX-512 VNNI (use the oneDNN path)");
#else
  const at::Tensor x = as_rows(input, "int8_linear");
  const int64_t m = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 3 && packed.size(2) == 64 &&
              packed.is_contiguous(), "int8_linear: packed must be contiguous int8 (N/16, K/4, 64)");
  const int64_t N16 = packed.size(0), K4 = packed.size(1);
  TORCH_CHECK(K4 == (K + 3) / 4, "int8_linear: the weight has ", 4 * K4,
              " (padded) input columns, the activations ", K);
  TORCH_CHECK(n_out > 0 && (n_out + 15) / 16 == N16, "int8_linear: n_out ", n_out,
              " does not match ", N16, " blocks of 16");
  TORCH_CHECK(comp.scalar_type() == at::kInt && comp.is_contiguous() && comp.numel() == N16 * 16,
              "int8_linear: comp must be contiguous int32 (N16 * 16,)");
  TORCH_CHECK(s127.scalar_type() == at::kFloat && s127.is_contiguous() && s127.numel() == N16 * 16,
              "int8_linear: s127 must be contiguous float32 (N16 * 16,)");
  const int64_t lda = 4 * K4;
  auto planes = at::empty({2 * m, lda}, x.options().dtype(at::kByte));
  auto amax = at::empty({m}, x.options().dtype(at::kFloat));
  auto out_shape = input.sizes().vec();
  out_shape.back() = n_out;
  auto y = at::empty({m, n_out}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_linear", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    uint8_t* pp = planes.data_ptr<uint8_t>();
    float* ap = amax.data_ptr<float>();
    const int64_t xs = x.stride(0);
    at::parallel_for(0, m, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
      std::vector<float> row(K);
      for (int64_t r = begin; r < end; ++r) {
        uint8_t* hi = pp + 2 * r * lda;
        ap[r] = quantize_planes(xp + r * xs, K, row.data(), hi, hi + lda);
        std::fill(hi + K, hi + lda, uint8_t(128));
        std::fill(hi + lda + K, hi + 2 * lda, uint8_t(128));
      }
    });
    vnni_gemm(pp, m, lda, packed, comp, s127, ap, y.data_ptr<scalar_t>(), n_out);
  });
  return y.view(out_shape);
#endif
}

// ---- q4_linear: weight-only int4 times int16 activations on AVX2's integer dot ----
// Weights: qs (N, K/2) uint8, per row K/32 blocks of 16 bytes, byte i of a block holding
// weight i of the block in its low nibble and weight i + 16 in its high one (GGUF's Q4_0/Q4_1
// order); d, m (N, K/32) float16: w = q * d + m. Activations: each row quantized per block of
// 32 to int16 (symmetric, d_x = max|x| / 32767) here, with the block's exact float sum kept,
// so y = sum_b d * d_x * (q . x_q) + m * sum(x): the integer dot on vpmaddwd (exact in int32),
// one float FMA per block. (llama.cpp quantizes activations to int8 for vpmaddubsw: measured
// here 5x the bf16 path's logit error on tiny models; int16 costs one more multiply-add per
// block and keeps ~16 bits.) Each output (row, n) is computed by the same instructions in the
// same order at any batch size or thread count (batch invariant).
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SOUVERAIN_Q4 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
// AVX-512: two blocks per instruction (the activations stored pair by pair, see q16_row)
#define SOUVERAIN_Q4_512 1
#endif
#endif

bool has_q4() {
#ifdef SOUVERAIN_Q4
  return true;
#else
  return false;
#endif
}

#ifdef SOUVERAIN_Q4
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One row's nb blocks of 32 floats -> int16 codes, scales d_x (max|x| / 32767, round to
// nearest: ~16 bits of each block, far finer than bfloat16's 8) and exact block sums (a
// fixed order of adds: the same bits at any batch size).
inline void q16_row(const float* __restrict x, int64_t nb, int16_t* __restrict xq,
                    float* __restrict xd, float* __restrict xsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < nb; ++b) {
    const float* v = x + 32 * b;
    const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
    const __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                              _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    xsum[b] = hsum8(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
    const float d = amax / 32767.f;
    xd[b] = d;
    const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
    constexpr int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m256 lim = _mm256_set1_ps(32767.f);  // (x * (1 / d) may round a hair past it)
    auto code = [&](__m256 v) {
      return _mm256_cvtps_epi32(_mm256_min_ps(lim, _mm256_max_ps(
          _mm256_sub_ps(_mm256_setzero_ps(), lim), _mm256_round_ps(_mm256_mul_ps(v, id), rn))));
    };
    // packs interleave the 128-bit lanes: put the 16-bit codes back in order
    const __m256i a = _mm256_permute4x64_epi64(_mm256_packs_epi32(code(v0), code(v1)), 0xD8);
    const __m256i c = _mm256_permute4x64_epi64(_mm256_packs_epi32(code(v2), code(v3)), 0xD8);
#ifdef SOUVERAIN_Q4_512
    // blocks 2i and 2i + 1 interleaved: [2i: 0-15, 2i+1: 0-15, 2i: 16-31, 2i+1: 16-31], so
    // one 512-bit load takes the same half of both; a last odd block stays as it is
    const bool paired = (b | 1) < nb;
    int16_t* base = xq + 32 * (b & ~int64_t(1));
    int16_t* lo = paired ? base + 16 * (b & 1) : xq + 32 * b;
    int16_t* hi = paired ? base + 32 + 16 * (b & 1) : xq + 32 * b + 16;
#else
    int16_t* lo = xq + 32 * b;
    int16_t* hi = xq + 32 * b + 16;
#endif
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), a);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), c);
  }
}

// R rows of activations against one weight row: out[r] for r < R. Blocks go 8 at a time
// (d, m, d_x and the sums are zero-padded to whole 8s): their scales' products d * d_x and
// the zero terms m * sum(x) in vectors, then an integer dot per block and row, two blocks'
// products summed before they join the row's accumulator (half the dependent adds). Every
// row runs the same operations in the same order whatever R is: batch invariant.
template <int R>
inline void q4_dot(const uint8_t* __restrict qs, const uint16_t* __restrict dh,
                   const uint16_t* __restrict mh, int64_t nb, const int16_t* const* xq,
                   const float* const* xd, const float* const* xsum, float* out) {
  const __m128i low = _mm_set1_epi8(0x0F);
  __m256 acc[R], mtv[R];
  alignas(32) float dx[R][8];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    mtv[r] = _mm256_setzero_ps();
  }
#ifdef SOUVERAIN_Q4_512
  __m512 acc2[R], dxz[R];
  for (int r = 0; r < R; ++r) acc2[r] = _mm512_setzero_ps();
  const __m256i low2 = _mm256_set1_epi8(0x0F);
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
#endif
  struct Q16 { __m256i lo, hi; };  // a block's 32 codes as int16: weights 0-15, 16-31
  auto nibbles = [&](int64_t b) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * b));
    return Q16{_mm256_cvtepu8_epi16(_mm_and_si128(raw, low)),
               _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low))};
  };
  auto dot = [&](const Q16& q, int r, int64_t b) {  // |sum| <= 4 * 15 * 32767: exact
    const __m256i* xv = reinterpret_cast<const __m256i*>(xq[r] + 32 * b);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)  // the same integers, one fused op each
    const __m256i acc = _mm256_dpwssd_epi32(_mm256_madd_epi16(q.lo, _mm256_loadu_si256(xv)), q.hi,
                                            _mm256_loadu_si256(xv + 1));
    return _mm256_cvtepi32_ps(acc);
#else
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(q.lo, _mm256_loadu_si256(xv)),
                                               _mm256_madd_epi16(q.hi, _mm256_loadu_si256(xv + 1))));
#endif
  };
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    const __m256 vd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dh + b0)));
    const __m256 vm = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mh + b0)));
    for (int r = 0; r < R; ++r) {
      const __m256 v = _mm256_mul_ps(vd, _mm256_loadu_ps(xd[r] + b0));
      _mm256_store_ps(dx[r], v);
#ifdef SOUVERAIN_Q4_512
      dxz[r] = _mm512_castps256_ps512(v);
#endif
      mtv[r] = _mm256_fmadd_ps(vm, _mm256_loadu_ps(xsum[r] + b0), mtv[r]);
    }
    const int cnt = static_cast<int>(std::min<int64_t>(8, nb - b0));
    int j = 0;
#ifdef SOUVERAIN_Q4_512
    for (; j + 1 < cnt; j += 2) {  // blocks j, j + 1: [j, j+1] halves of each 512-bit vector
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 16 * (b0 + j)));
      const __m512i qlo = _mm512_cvtepu8_epi16(_mm256_and_si256(raw, low2));
      const __m512i qhi = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low2));
      const __m512i idx = _mm512_add_epi32(halves, _mm512_set1_epi32(j));
      for (int r = 0; r < R; ++r) {
        const __m512i* xv = reinterpret_cast<const __m512i*>(xq[r] + 32 * (b0 + j));
        const __m512i p = _mm512_dpwssd_epi32(_mm512_madd_epi16(qlo, _mm512_loadu_si512(xv)), qhi,
                                              _mm512_loadu_si512(xv + 1));
        acc2[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx, dxz[r]), _mm512_cvtepi32_ps(p),
                                  acc2[r]);
      }
    }
#endif
    for (; j + 1 < cnt; j += 2) {
      const Q16 q0 = nibbles(b0 + j), q1 = nibbles(b0 + j + 1);
      for (int r = 0; r < R; ++r) {
        __m256 u = _mm256_mul_ps(_mm256_broadcast_ss(&dx[r][j]), dot(q0, r, b0 + j));
        u = _mm256_fmadd_ps(_mm256_broadcast_ss(&dx[r][j + 1]), dot(q1, r, b0 + j + 1), u);
        acc[r] = _mm256_add_ps(acc[r], u);
      }
    }
    if (j < cnt) {
      const Q16 q0 = nibbles(b0 + j);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(_mm256_broadcast_ss(&dx[r][j]),
                                                      dot(q0, r, b0 + j)));
    }
  }
#ifdef SOUVERAIN_Q4_512
  for (int r = 0; r < R; ++r)
    acc[r] = _mm256_add_ps(acc[r], _mm256_add_ps(_mm512_castps512_ps256(acc2[r]),
                                                 _mm512_extractf32x8_ps(acc2[r], 1)));
#endif
  for (int r = 0; r < R; ++r) out[r] = hsum8(acc[r]) + hsum8(mtv[r]);
}
#endif

#ifdef SOUVERAIN_Q4
template <typename scalar_t>
void q4_gemm(const at::Tensor& x, const uint8_t* qp, const uint16_t* dp, const uint16_t* mp,
             int64_t N, scalar_t* yp) {
  const int64_t M = x.size(0), K = x.size(1), nb = K / 32, nb8 = (nb + 7) / 8 * 8;
  auto xq = at::empty({M, K}, x.options().dtype(at::kShort));
  auto xd = at::zeros({M, nb8}, x.options().dtype(at::kFloat));
  auto xsum = at::zeros({M, nb8}, x.options().dtype(at::kFloat));
  int16_t* xqp = xq.data_ptr<int16_t>();
  float* xdp = xd.data_ptr<float>();
  float* xsp = xsum.data_ptr<float>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t ldx = x.stride(0);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t begin, int64_t end) {
    std::vector<float> row(std::is_same<scalar_t, float>::value ? 0 : K);
    for (int64_t r = begin; r < end; ++r) {
      const float* xr;
      if constexpr (std::is_same<scalar_t, float>::value) {
        xr = xp + r * ldx;
      } else {
        load_row(xp + r * ldx, row.data(), K);
        xr = row.data();
      }
      q16_row(xr, nb, xqp + r * K, xdp + r * nb8, xsp + r * nb8);
    }
  });
  // a tile of NT weight rows (L2) against every 4 activation rows in turn (L1): the weights
  // are read from memory once per call, the int16 activations from L2/L3 once per tile
  constexpr int64_t NT = 64;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    const int16_t* xr[4];
    const float* dr[4];
    const float* sr[4];
    float out[4];
    for (int64_t n0 = begin; n0 < end; n0 += NT) {
      const int64_t n1 = std::min(end, n0 + NT);
      for (int64_t r = 0; r < M; r += 4) {
        const int R = static_cast<int>(std::min<int64_t>(4, M - r));
        for (int i = 0; i < R; ++i) {
          xr[i] = xqp + (r + i) * K;
          dr[i] = xdp + (r + i) * nb8;
          sr[i] = xsp + (r + i) * nb8;
        }
        for (int64_t n = n0; n < n1; ++n) {
          const uint8_t* qn = qp + n * (K / 2);
          const uint16_t* dn = dp + n * nb8;
          const uint16_t* mn = mp + n * nb8;
          switch (R) {
            case 4: q4_dot<4>(qn, dn, mn, nb, xr, dr, sr, out); break;
            case 3: q4_dot<3>(qn, dn, mn, nb, xr, dr, sr, out); break;
            case 2: q4_dot<2>(qn, dn, mn, nb, xr, dr, sr, out); break;
            default: q4_dot<1>(qn, dn, mn, nb, xr, dr, sr, out); break;
          }
          for (int i = 0; i < R; ++i) yp[(r + i) * N + n] = from_f<scalar_t>(out[i]);
        }
      }
    }
  });
}
#endif

// y (..., N) = x (..., K) times the q4 weight qs (N, K/2) uint8 with dm (2, N, nb8) float16
// (d then m, K/32 blocks per row zero-padded to a multiple of 8); x float32, bfloat16 or
// float16, y in x's dtype.
at::Tensor q4_linear(const at::Tensor& input, const at::Tensor& qs, const at::Tensor& dm) {
#ifndef SOUVERAIN_Q4
  TORCH_CHECK(false, "q4_linear: this CPU has no AVX2 + FMA + F16C (use the ATen int4 path)");
#else
  const at::Tensor x = as_rows(input, "q4_linear");
  const int64_t K = x.size(1), N = qs.size(0), nb8 = (K / 32 + 7) / 8 * 8;
  TORCH_CHECK(K % 32 == 0, "q4_linear: K must be a multiple of 32, got ", K);
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.dim() == 2 &&
              qs.size(1) == K / 2, "q4_linear: qs must be contiguous uint8 (N, K/2)");
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.dim() == 3 &&
              dm.size(0) == 2 && dm.size(1) == N && dm.size(2) == nb8,
              "q4_linear: dm must be contiguous float16 (2, N, K/32 padded to a multiple of 8)");
  auto out_shape = input.sizes().vec();
  out_shape.back() = N;
  auto y = at::empty({x.size(0), N}, x.options());
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "q4_linear", [&] {
    if constexpr (std::is_same<scalar_t, double>::value) {
      TORCH_CHECK(false, "q4_linear: float64 activations are not supported");
    } else {
      q4_gemm<scalar_t>(x, qs.data_ptr<uint8_t>(), dp, dp + N * nb8, N, y.data_ptr<scalar_t>());
    }
  });
  return y.view(out_shape);
#endif
}
}  // namespace

TORCH_LIBRARY(souverain, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_(Tensor(a!) x, Tensor rope) -> ()");
  m.def("int8_planes(Tensor x) -> (Tensor, Tensor)");
  m.def("int8_epilogue_(Tensor(a!) out, Tensor acc, Tensor amax) -> ()");
  m.def("int8_linear(Tensor x, Tensor packed, Tensor comp, Tensor s127, int n_out) -> Tensor");
  m.def("has_vnni() -> bool", &has_vnni);
  m.def("has_q4() -> bool", &has_q4);
  m.def("q4_linear(Tensor x, Tensor qs, Tensor dm) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
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
  m.impl("int8_linear", &int8_linear);
  m.impl("q4_linear", &q4_linear);
  m.impl("silu_mul", &silu_mul);
}

