#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LLMCTL_AVX2 1
#endif
// AVX-512 with VNNI (llmctl.quant.native adds the flags when the CPU has them): 64 bytes an instruction and
// dpbusd/dpwssd, the multiply-and-sum of four int8 (two int16) products into an int32 in one step.
#if defined(LLMCTL_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define LLMCTL_AVX512 1
#endif

// The kernels' paths: a call's ``path`` is an index into int4_paths(), best first; the last is scalar.
enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static const int ISA_ORDER[] = {
#if defined(LLMCTL_AVX512)
    ISA_AVX512,
#endif
#if defined(LLMCTL_AVX2)
    ISA_AVX2,
#endif
    ISA_SCALAR};
static const int64_t ISA_COUNT = sizeof(ISA_ORDER) / sizeof(ISA_ORDER[0]);
static inline int isa_of(int64_t path) { return ISA_ORDER[path < 0 ? 0 : std::min(path, ISA_COUNT - 1)]; }

// Loads as fp32. bf16 is the top half of an fp32: a shift the compiler vectorizes.
static inline float ld(const float* p, int64_t i) { return p[i]; }
static inline float ld(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
static inline float ld(const c10::BFloat16* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f; std::memcpy(&f, &u, 4); return f;
}

// max |x| over a block as bits: the bit patterns of non-negative floats order like their values and every
// NaN's lies above +inf's, so an integer max (which vectorizes, where a float max with NaN checks does
// not) gives the absmax and tells whether the block holds a NaN.
static inline uint32_t abs_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u & 0x7fffffffu; }
static inline float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
// A float's bits as an int32 that orders like the value (negative values' magnitude bits flipped).
static inline int32_t order_key(float f) { int32_t i; std::memcpy(&i, &f, 4); return i ^ ((i >> 31) & 0x7fffffff); }
static inline float from_key(int32_t k) { int32_t i = k ^ ((k >> 31) & 0x7fffffff); float f; std::memcpy(&f, &i, 4); return f; }

template <typename T>
static void nf4_impl(const T* x, int64_t n, int64_t g, const float* bounds, uint8_t* packed, float* absmax) {
  // g is even (64, 128, ...), so blocks start on a byte. Loops are shaped for the compiler's vectorizer:
  // the code of a value is the number of the 15 midpoints it lies above (unrolled, no memory traffic).
  int64_t nblocks = (n + g - 1) / g;
  float bk[15];
  for (int k = 0; k < 15; ++k) bk[k] = bounds[k];
  at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
    std::vector<float> v(g + 1);
    std::vector<int32_t> c(g + 1);
    for (int64_t b = b0; b < b1; ++b) {
      int64_t s = b * g, m = std::min(n, s + g) - s;
      uint32_t top = 0;
      for (int64_t i = 0; i < m; ++i) { float f = ld(x, s + i); v[i] = f; uint32_t a = abs_bits(f); top = a > top ? a : top; }
      float am = from_bits(top);
      absmax[b] = top > 0x7f800000u ? NAN : am;  // a NaN block: the caller refuses the tensor
      float inv = 1.0f / std::max(am, 1e-38f);
      for (int64_t i = 0; i < m; ++i) { float t = v[i] * inv; v[i] = t < -1.f ? -1.f : (t > 1.f ? 1.f : t); }
      if (m % 2) v[m] = 0.f;  // bitsandbytes pads an odd tensor with 0.0 (code 7)
      int64_t mm = m + (m % 2);
      for (int64_t i = 0; i < mm; ++i) {
        float t = v[i];
        int32_t code = 0;
        for (int k = 0; k < 15; ++k) code += t > bk[k];
        c[i] = code;
      }
      for (int64_t i = 0; i < mm; i += 2) packed[(s + i) / 2] = static_cast<uint8_t>((c[i] << 4) | c[i + 1]);
    }
  });
}

std::vector<torch::Tensor> nf4(torch::Tensor x, int64_t g, torch::Tensor bounds) {
  x = x.contiguous().reshape(-1);
  int64_t n = x.numel();
  auto packed = torch::empty({(n + 1) / 2}, torch::kUInt8);
  auto absmax = torch::empty({(n + g - 1) / g}, torch::kFloat32);
  auto bp = bounds.contiguous().data_ptr<float>();
  auto pp = packed.data_ptr<uint8_t>();
  if (x.scalar_type() == torch::kBFloat16) nf4_impl(reinterpret_cast<const c10::BFloat16*>(x.data_ptr()), n, g, bp, pp, absmax.data_ptr<float>());
  else if (x.scalar_type() == torch::kHalf) nf4_impl(reinterpret_cast<const c10::Half*>(x.data_ptr()), n, g, bp, pp, absmax.data_ptr<float>());
  else { auto xf = x.to(torch::kFloat32); nf4_impl(xf.data_ptr<float>(), n, g, bp, pp, absmax.data_ptr<float>()); }
  return std::vector<torch::Tensor>{packed, absmax};
}

static inline c10::Half round_up_half(float v) {
  c10::Half h(v);  // round to nearest even, as torch's .to(float16)
  if (static_cast<float>(h) < v) { uint16_t bits = h.x; bits = (bits & 0x8000) ? bits - 1 : bits + 1; h.x = bits; }
  return h;
}

// Round half to even in the default rounding mode without a libm call (which stops vectorization): adding
// and subtracting 1.5 * 2^23 leaves the integer part. Exact for |v| < 2^22; larger values come out still
// beyond any 8-bit code and are clamped right after, as are infinities.
static inline float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

// Weighted squared reconstruction error of a group (fp32 values v, weights w) at scale s and zero-point zf
// (0: symmetric). The search only ranks candidates, so it multiplies by 1/s (the eager code does the same);
// the stored codes are computed with a division, as round-to-nearest does.
static inline float group_err(const float* v, const float* w, int64_t g, float s, float zf, float qmin, float qmax) {
  const float inv = 1.0f / s;
  const float lo = qmin - zf, hi = qmax - zf;  // q - zf = clamp(round(v / s), qmin - zf, qmax - zf), exactly
  float e = 0.f;
  int64_t i = 0;
  if (g % 8 == 0) {
    float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (; i < g; i += 8)
      for (int t = 0; t < 8; ++t) {
        float r = round_even(v[i + t] * inv);
        r = r < lo ? lo : (r > hi ? hi : r);
        float d = r * s - v[i + t];
        a[t] += d * d * w[i + t];
      }
    e = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  }
  for (; i < g; ++i) {
    float r = round_even(v[i] * inv);
    r = r < lo ? lo : (r > hi ? hi : r);
    float d = r * s - v[i];
    e += d * d * w[i];
  }
  return e;
}

// The least-squares scale of the codes scale s gives a symmetric group, sum w*v*q / sum w*q^2 (0 when the
// codes are all 0; the eager code: llmctl.quant.int_formats, refit).
static inline float ls_scale(const float* v, const float* w, int64_t g, float s, float qmin, float qmax) {
  const float inv = 1.0f / s;
  float num = 0.f, den = 0.f;
  int64_t i = 0;
  if (g % 8 == 0) {  // eight running sums of each, so the compiler may vectorize (as group_err)
    float a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (; i < g; i += 8)
      for (int t = 0; t < 8; ++t) {
        float r = round_even(v[i + t] * inv);
        r = r < qmin ? qmin : (r > qmax ? qmax : r);
        float wr = w[i + t] * r;
        a[t] += wr * v[i + t];
        b[t] += wr * r;
      }
    num = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    den = ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7]));
  }
  for (; i < g; ++i) {
    float r = round_even(v[i] * inv);
    r = r < qmin ? qmin : (r > qmax ? qmax : r);
    float wr = w[i] * r;
    num += wr * v[i];
    den += wr * r;
  }
  return den > 0.f ? num / den : 0.f;
}

// |v| rounded up to fp16, with the sign of a negative scale
static inline c10::Half signed_half(float v, bool negative) {
  c10::Half h = round_up_half(std::fabs(v));
  if (negative) h.x |= 0x8000;
  return h;
}

// steps > 1: the scale search (llmctl.quant.search.SEARCH_*), keeping the candidate with the smallest squared
// error (round to nearest on ties): asymmetric, [lo, hi] shrunk by 1 - j * delta for j < steps; symmetric, the
// largest-magnitude value sent to qmin at 1 + (widen - j) * delta of it, then least-squares refits.
template <typename T>
static void int_impl(const T* x, int64_t rows, int64_t cols, int64_t g, int bits, bool asym,
                     int8_t* q, c10::Half* scale, int8_t* zp, uint8_t* nibbles, int64_t steps, double delta,
                     int64_t widen, int64_t refits) {
  // nibbles (4 bits, even g): the codes go straight into pack4's bytes through a per-thread buffer
  const int qmin = -(1 << (bits - 1)), qmax = (1 << (bits - 1)) - 1;
  const float tiny = 1.1754943508222875e-38f;
  int64_t ng = cols / g;
  at::parallel_for(0, rows * ng, 16, [&](int64_t a, int64_t z) {
    std::vector<int8_t> buf(nibbles ? g : 0);
    std::vector<float> vf(steps > 1 ? g : 0), wf(steps > 1 ? g : 0);  // the group as fp32, its error weights
    const float fmin = static_cast<float>(qmin), fmax = static_cast<float>(qmax);
    for (int64_t k = a; k < z; ++k) {
      const T* xs = x + (k / ng) * cols + (k % ng) * g;
      if (steps > 1) {  // llama.cpp's K-quant error weights: rms of the group + |x|
        double sq[4] = {0, 0, 0, 0};  // four running sums: one chain of float64 adds would be the search's cost
        int64_t i = 0;
        for (; i + 4 <= g; i += 4)
          for (int t = 0; t < 4; ++t) { vf[i + t] = ld(xs, i + t); sq[t] += static_cast<double>(vf[i + t]) * vf[i + t]; }
        for (; i < g; ++i) { vf[i] = ld(xs, i); sq[0] += static_cast<double>(vf[i]) * vf[i]; }
        float rms = static_cast<float>(std::sqrt(((sq[0] + sq[1]) + (sq[2] + sq[3])) / g));
        for (int64_t i = 0; i < g; ++i) wf[i] = rms + std::fabs(vf[i]);
      }
      int8_t* qs = nibbles ? buf.data() : q + (k / ng) * cols + (k % ng) * g;
      if (asym) {
        // min and max (with 0) as integer reductions over order-preserving keys, NaN from the abs bits
        int32_t klo = 0, khi = 0;
        uint32_t top = 0;
        for (int64_t i = 0; i < g; ++i) {
          float v = ld(xs, i);
          int32_t k = order_key(v);
          uint32_t a = abs_bits(v);
          klo = k < klo ? k : klo; khi = k > khi ? k : khi; top = a > top ? a : top;
        }
        float lo = from_key(klo) + 0.0f, hi = from_key(khi);  // + 0.0f: -0.0 counts as 0, as v < 0.f does
        if (top > 0x7f800000u) { lo = NAN; hi = NAN; }
        c10::Half sh = round_up_half((hi - lo) / static_cast<float>(qmax - qmin));
        float s = std::max(static_cast<float>(sh), tiny);
        float zf = static_cast<float>(qmin) - std::nearbyint(lo / s);
        zf = zf < qmin ? qmin : (zf > qmax ? qmax : zf);
        if (steps > 1 && hi > lo) {
          float best = group_err(vf.data(), wf.data(), g, s, zf, fmin, fmax);
          for (int64_t j = 1; j < steps; ++j) {
            float alpha = static_cast<float>(1.0 - j * delta);
            float lj = lo * alpha, hj = hi * alpha;
            c10::Half h = round_up_half((hj - lj) / static_cast<float>(qmax - qmin));
            float sj = std::max(static_cast<float>(h), tiny);
            float zj = static_cast<float>(qmin) - std::nearbyint(lj / sj);
            zj = zj < qmin ? qmin : (zj > qmax ? qmax : zj);
            float e = group_err(vf.data(), wf.data(), g, sj, zj, fmin, fmax);
            if (e < best) { best = e; sh = h; s = sj; zf = zj; }
          }
        }
        scale[k] = sh;
        zp[k] = static_cast<int8_t>(zf);
        for (int64_t i = 0; i < g; ++i) {
          float r = round_even(ld(xs, i) / s) + zf;
          qs[i] = static_cast<int8_t>(r < qmin ? qmin : (r > qmax ? qmax : r));
        }
      } else {
        uint32_t top = 0;
        for (int64_t i = 0; i < g; ++i) { uint32_t a = abs_bits(ld(xs, i)); top = a > top ? a : top; }
        float am = top > 0x7f800000u ? NAN : from_bits(top);
        const float half = static_cast<float>(qmax - qmin) / 2.0f;
        c10::Half sh = round_up_half(am / half);
        float s = std::max(static_cast<float>(sh), tiny);
        if (steps > 1 && am > 0.f && am <= 3.4e38f) {
          float best = group_err(vf.data(), wf.data(), g, s, 0.f, fmin, fmax);
          bool flip = false;  // the first largest-magnitude value is positive: the candidates' scales are negative
          for (int64_t i = 0; i < g; ++i)
            if (abs_bits(vf[i]) == top) { flip = !std::signbit(vf[i]); break; }
          for (int64_t j = 0; j < steps; ++j) {
            float alpha = static_cast<float>(1.0 + (widen - j) * delta);
            c10::Half h = signed_half(am * alpha / -fmin, flip);
            float sj = std::max(std::fabs(static_cast<float>(h)), tiny);
            sj = flip ? -sj : sj;
            float e = group_err(vf.data(), wf.data(), g, sj, 0.f, fmin, fmax);
            if (e < best) { best = e; sh = h; s = sj; }
          }
          for (int64_t r = 0; r < refits; ++r) {  // the winner's least-squares scale, kept when it is better
            float ls = ls_scale(vf.data(), wf.data(), g, s, fmin, fmax);
            if (!(ls != 0.f && (ls > 0.f) == (s > 0.f))) break;
            bool negative = s < 0.f;
            c10::Half h = signed_half(ls, negative);
            float sj = std::max(std::fabs(static_cast<float>(h)), tiny);
            sj = negative ? -sj : sj;
            float e = group_err(vf.data(), wf.data(), g, sj, 0.f, fmin, fmax);
            if (!(e < best)) break;
            best = e; sh = h; s = sj;
          }
        }
        scale[k] = sh;
        for (int64_t i = 0; i < g; ++i) {
          float r = round_even(ld(xs, i) / s);
          qs[i] = static_cast<int8_t>(r < qmin ? qmin : (r > qmax ? qmax : r));
        }
      }
      if (nibbles) {
        uint8_t* o = nibbles + ((k / ng) * cols + (k % ng) * g) / 2;
        for (int64_t j = 0; j < g / 2; ++j) o[j] = static_cast<uint8_t>((buf[2 * j] + 8) | ((buf[2 * j + 1] + 8) << 4));
      }
    }
  });
}

// ---- decode-time matrix-vector products on the stored codes (fp8, NF4): y (n, rows) = x (n, cols) · Wᵀ ----
// The weight is never materialised: each code goes through a small table (256 fp8 values, 16 NF4 values),
// is multiplied by x and summed per scale group, and the group's sum is scaled once. Eight running sums
// let the compiler vectorize the reduction (a float sum in one accumulator it may not reorder).
static inline float dot_lut8(const uint8_t* w, const float* lut, const float* x, int64_t m) {
  float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= m; j += 8)
    for (int k = 0; k < 8; ++k) a[k] += lut[w[j + k]] * x[j + k];
  float t = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  for (; j < m; ++j) t += lut[w[j]] * x[j];
  return t;
}

// fp8 bytes as fp32, eight at a time (AVX2/F16C): both fp8 variants are a truncated fp16. e5m2 is the top byte
// of the fp16 with the same value; e4m3 (bias 7, no infinities) moved into fp16's fields (sign to bit 15,
// exponent and mantissa shifted by 7) is the fp16 of its value times 2^-8, subnormals included, so the group's
// scale carries the 2^8. Which variant a table holds is checked once per call (fp8_variant).
static int fp8_variant(const float* lut) {  // 1 e4m3, 2 e5m2, 0 neither (the table path runs)
  bool e4 = true, e5 = true;
  for (int b = 0; b < 256 && (e4 || e5); ++b) {
    float v = lut[b];
    if (std::isnan(v)) continue;
    uint16_t h4 = static_cast<uint16_t>(((b & 0x80) << 8) | ((b & 0x7f) << 7));
    float v4 = c10::detail::fp16_ieee_to_fp32_value(h4) * 256.f;
    float v5 = c10::detail::fp16_ieee_to_fp32_value(static_cast<uint16_t>(b << 8));
    e4 = e4 && v4 == v; e5 = e5 && v5 == v;
  }
  return e4 ? 1 : e5 ? 2 : 0;
}

#if defined(LLMCTL_AVX2)
static inline float hsum8(__m256 v);
static inline __m256i fp8_to_half16(const uint8_t* w, int variant) {  // 16 bytes -> 16 fp16 bit patterns
  __m256i u = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  __m256i h = _mm256_slli_epi16(u, 8);  // e5m2: this; e4m3: the sign copied one bit down, then that copy cleared
  return variant == 2 ? h : _mm256_and_si256(_mm256_srai_epi16(h, 1), _mm256_set1_epi16(static_cast<short>(0xBFFF)));
}
static inline __m256 fp8x8(const uint8_t* w, int variant) {
  __m128i u = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w)));
  __m128i h = _mm_slli_epi16(u, 8);
  if (variant != 2) h = _mm_and_si128(_mm_srai_epi16(h, 1), _mm_set1_epi16(static_cast<short>(0xBFFF)));
  return _mm256_cvtph_ps(h);
}
static float fp8_row_avx2(const uint8_t* w, const float* x, const float* s, int64_t groups, int64_t g, int variant) {
  const float unit = variant == 1 ? 256.f : 1.f;
  __m256 acc = _mm256_setzero_ps();
  float tail = 0.f;
  for (int64_t q = 0; q < groups; ++q) {
    const uint8_t* wq = w + q * g; const float* xq = x + q * g;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= g; j += 16) {  // 16 bytes widened at once, then two halves to fp32
      __m256i h = fp8_to_half16(wq + j, variant);
      a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_loadu_ps(xq + j), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), _mm256_loadu_ps(xq + j + 8), a1);
    }
    for (; j + 8 <= g; j += 8) a0 = _mm256_fmadd_ps(fp8x8(wq + j, variant), _mm256_loadu_ps(xq + j), a0);
    float rest = 0.f;
    for (; j < g; ++j) {
      uint16_t h = variant == 2 ? static_cast<uint16_t>(wq[j] << 8)
                                : static_cast<uint16_t>(((wq[j] & 0x80) << 8) | ((wq[j] & 0x7f) << 7));
      rest += c10::detail::fp16_ieee_to_fp32_value(h) * xq[j];
    }
    acc = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(s[q] * unit), acc);
    tail += rest * s[q] * unit;
  }
  return hsum8(acc) + tail;
}
#endif

#if defined(LLMCTL_AVX512)
// ---- AVX-512 VNNI rows (path "avx512"): 64 bytes an instruction --------------------------------------------
// A pair of blocks of 32 products gives 16 int32 lanes, 0-7 the first block's and 8-15 the second's, so a pair's
// activation scales are one vector: spread8 writes each block's scale 8 times, once a call, and a pair loads
// 16 floats at its first block.
static void spread8(const float* d, int64_t nb, float* out) {
  for (int64_t b = 0; b < nb; ++b) for (int t = 0; t < 8; ++t) out[b * 8 + t] = d[b];
}
// Two blocks' fp16 scales, [s0 x8, s1 x8]: indices into the 4 converted at once.
static inline __m512 scale_pair(__m128 s4, int first) {
  const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(first)), _mm512_castps128_ps512(s4));
}
static float fp8_row_avx512(const uint8_t* w, const float* x, const float* s, int64_t groups, int64_t g, int variant) {
  const float unit = variant == 1 ? 256.f : 1.f;
  __m512 acc = _mm512_setzero_ps();
  float tail = 0.f;
  for (int64_t q = 0; q < groups; ++q) {
    const uint8_t* wq = w + q * g; const float* xq = x + q * g;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= g; j += 32) {
      a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(fp8_to_half16(wq + j, variant)), _mm512_loadu_ps(xq + j), a0);
      a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(fp8_to_half16(wq + j + 16, variant)), _mm512_loadu_ps(xq + j + 16), a1);
    }
    for (; j + 16 <= g; j += 16) a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(fp8_to_half16(wq + j, variant)), _mm512_loadu_ps(xq + j), a0);
    float rest = 0.f;
    for (; j < g; ++j) {
      uint16_t h = variant == 2 ? static_cast<uint16_t>(wq[j] << 8)
                                : static_cast<uint16_t>(((wq[j] & 0x80) << 8) | ((wq[j] & 0x7f) << 7));
      rest += c10::detail::fp16_ieee_to_fp32_value(h) * xq[j];
    }
    acc = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(s[q] * unit), acc);
    tail += rest * s[q] * unit;
  }
  return _mm512_reduce_add_ps(acc) + tail;
}
#endif

// w (rows, cols) fp8 bytes, lut[256] their values, scale (1 or rows, groups) fp32; path: an index into
// int4_paths() (AVX-512 / AVX2: the bytes converted in registers; scalar: the table, one value at a time)
torch::Tensor fp8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor lut, torch::Tensor scale, int64_t path) {
  TORCH_CHECK(x.is_cpu() && w.is_cpu() && lut.is_cpu() && scale.is_cpu(), "fp8_linear runs on CPU tensors");
  x = x.to(torch::kFloat32).contiguous(); w = w.contiguous(); scale = scale.to(torch::kFloat32).contiguous();
  lut = lut.to(torch::kFloat32).contiguous();
  int64_t n = x.size(0), cols = x.size(1), rows = w.size(0), groups = scale.size(1), g = cols / groups;
  bool per_row = scale.size(0) == rows;
  auto y = torch::empty({n, rows}, torch::kFloat32);
  const float* xp = x.data_ptr<float>(); const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* lp = lut.data_ptr<float>(); const float* sp = scale.data_ptr<float>(); float* yp = y.data_ptr<float>();
  const int isa = isa_of(path);
  int variant = isa != ISA_SCALAR ? fp8_variant(lp) : 0;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* wr = wp + r * cols;
      const float* sr = sp + (per_row ? r * groups : 0);
      for (int64_t i = 0; i < n; ++i) {
#if defined(LLMCTL_AVX512)
        if (variant && isa == ISA_AVX512) { yp[i * rows + r] = fp8_row_avx512(wr, xp + i * cols, sr, groups, g, variant); continue; }
#endif
#if defined(LLMCTL_AVX2)
        if (variant) { yp[i * rows + r] = fp8_row_avx2(wr, xp + i * cols, sr, groups, g, variant); continue; }
#endif
        float acc = 0.f;
        for (int64_t q = 0; q < groups; ++q) acc += dot_lut8(wr + q * g, lp, xp + i * cols + q * g, g) * sr[q];
        yp[i * rows + r] = acc;
      }
    }
  });
  return y;
}

static void quantize_rows_q8(const float* x, int64_t n, int64_t cols, int8_t* q, float* d, float* qsum);

#if defined(LLMCTL_AVX2)
// One row of NF4 codes times int8 activations (as llama.cpp's iq4_nl x q8_0, with a 16-bit table): the 16 code
// values as int16 (round(NF4_UNIT · value), so the table's rounding is ~3e-5 of absmax, far below NF4's own
// steps), looked up 32 at a time with two byte shuffles (low and high bytes), then 16-bit integer dot products
// with the activations' int8 blocks; each block's sum scaled by its activation scale, each NF4 block's by
// absmax / NF4_UNIT. (An int8 table, as iq4_nl's, would round NF4's small values by up to 3 %.)
static const float NF4_UNIT = 16383.f;
static float nf4_row_avx2(const uint8_t* w, const __m256i tlo, const __m256i thi, const __m256i* q16, const float* d,
                          const float* absmax, int64_t per_row, int64_t bs) {
  const __m128i m4 = _mm_set1_epi8(15);
  __m256 acc = _mm256_setzero_ps();
  int64_t chunks = bs / 32;
  for (int64_t b = 0; b < per_row; ++b) {
    __m256 accb = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t k = b * chunks + c;  // the row's k-th block of 32 values
      __m128i r = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k * 16));
      // byte j holds value 2j in its high nibble and 2j + 1 in its low one: interleave back into order
      __m128i hi = _mm_and_si128(_mm_srli_epi16(r, 4), m4), lo = _mm_and_si128(r, m4);
      __m256i idx = _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
      __m256i vl = _mm256_shuffle_epi8(tlo, idx), vh = _mm256_shuffle_epi8(thi, idx);
      // in-lane unpacks: the code values' 16-bit halves pair with the activations widened the same way
      __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_unpacklo_epi8(vl, vh), _mm256_loadu_si256(q16 + 2 * k)),
                                   _mm256_madd_epi16(_mm256_unpackhi_epi8(vl, vh), _mm256_loadu_si256(q16 + 2 * k + 1)));
      accb = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[k]), accb);
    }
    acc = _mm256_fmadd_ps(accb, _mm256_set1_ps(absmax[b] * (1.f / NF4_UNIT)), acc);
  }
  return hsum8(acc);
}
#endif

#if defined(LLMCTL_AVX512)
// NF4 as nf4_row_avx2, 64 values (two activation blocks, 32 bytes of codes) an iteration: the bytes widened to
// 16 bits, each nibble looked up in the int16 table with one vpermw, and the products summed by dpwssd against
// the activations split into even (high nibbles) and odd (low nibbles) positions, once a call (qe, qo).
static float nf4_row_avx512(const uint8_t* w, const __m512i table, const int16_t* qe, const int16_t* qo, const float* d8,
                            const float* absmax, int64_t per_row, int64_t bs) {
  const __m512i m4 = _mm512_set1_epi16(15);
  __m512 acc = _mm512_setzero_ps();
  const int64_t chunks = bs / 64;
  for (int64_t b = 0; b < per_row; ++b) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k = b * chunks + c;  // the row's k-th chunk of 64 values
      __m512i r = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 32)));
      __m512i vh = _mm512_permutexvar_epi16(_mm512_srli_epi16(r, 4), table), vl = _mm512_permutexvar_epi16(_mm512_and_si512(r, m4), table);
      __m512i p = _mm512_dpwssd_epi32(_mm512_madd_epi16(vh, _mm512_loadu_si512(qe + k * 32)), vl, _mm512_loadu_si512(qo + k * 32));
      if (c & 1) a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_loadu_ps(d8 + k * 16), a1);
      else a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_loadu_ps(d8 + k * 16), a0);
    }
    acc = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(absmax[b] * (1.f / NF4_UNIT)), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

// The int16 values nf4_linear's integer path multiplies: round(16383 · code value), clamped to ±16383.
torch::Tensor nf4_code_table(torch::Tensor code) {
  code = code.to(torch::kFloat32).contiguous();
  TORCH_CHECK(code.numel() == 16, "nf4_code_table: 16 code values");
  auto t = torch::empty({16}, torch::kInt16);
  for (int i = 0; i < 16; ++i)
    t.data_ptr<int16_t>()[i] = static_cast<int16_t>(std::max(-16383.f, std::min(16383.f, std::nearbyint(16383.f * code.data_ptr<float>()[i]))));
  return t;
}

// packed: NF4 codes two a byte, the first in the high nibble, over the flattened (rows, cols) weight;
// code[16] the values; absmax one fp32 per block of bs (cols a multiple of bs: blocks stay in a row).
// path: an index into int4_paths(). AVX2 (bs a multiple of 32) and AVX-512 (bs a multiple of 64): int8
// activations and integer dot products with the code values as int16 (nf4_code_table); scalar: float, the
// code values as stored, one table look-up a byte.
torch::Tensor nf4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor code, torch::Tensor absmax, int64_t rows, int64_t bs, int64_t path) {
  TORCH_CHECK(x.is_cpu() && packed.is_cpu() && code.is_cpu() && absmax.is_cpu(), "nf4_linear runs on CPU tensors");
  x = x.to(torch::kFloat32).contiguous(); packed = packed.contiguous();
  code = code.to(torch::kFloat32).contiguous(); absmax = absmax.to(torch::kFloat32).contiguous();
  int64_t n = x.size(0), cols = x.size(1), per_row = cols / bs;
  TORCH_CHECK(cols % bs == 0 && packed.numel() * 2 == rows * cols && absmax.numel() == rows * per_row, "nf4_linear: shapes do not match");
  auto y = torch::empty({n, rows}, torch::kFloat32);
  const float* xp = x.data_ptr<float>(); const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* cp = code.data_ptr<float>(); const float* ap = absmax.data_ptr<float>(); float* yp = y.data_ptr<float>();
#if defined(LLMCTL_AVX2)
  const int isa = isa_of(path);
  if (isa != ISA_SCALAR && bs % 32 == 0) {
    torch::Tensor t16 = nf4_code_table(code);
    uint8_t lo8[16], hi8[16];
    for (int i = 0; i < 16; ++i) {
      uint16_t v = static_cast<uint16_t>(t16.data_ptr<int16_t>()[i]);
      lo8[i] = static_cast<uint8_t>(v & 0xff); hi8[i] = static_cast<uint8_t>(v >> 8);
    }
    __m128i l = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo8)), h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi8));
    const __m256i tlo = _mm256_set_m128i(l, l), thi = _mm256_set_m128i(h, h);
    int64_t nb = cols / 32;
    std::vector<int8_t> q(n * cols);
    std::vector<float> d(n * nb), qs(n * nb);
    quantize_rows_q8(xp, n, cols, q.data(), d.data(), qs.data());
#if defined(LLMCTL_AVX512)
    if (isa == ISA_AVX512 && bs % 64 == 0) {
      std::vector<int16_t> qe(n * cols / 2), qo(n * cols / 2);  // even and odd positions, as int16
      for (int64_t j = 0; j < n * cols / 2; ++j) { qe[j] = q[2 * j]; qo[j] = q[2 * j + 1]; }
      std::vector<float> d8(n * nb * 8);
      spread8(d.data(), n * nb, d8.data());
      int16_t t[32] = {0};
      std::memcpy(t, t16.data_ptr<int16_t>(), 16 * sizeof(int16_t));
      const __m512i table = _mm512_loadu_si512(t);
      at::parallel_for(0, rows, 32, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t i = 0; i < n; ++i)
            yp[i * rows + r] = nf4_row_avx512(pp + r * cols / 2, table, qe.data() + i * cols / 2, qo.data() + i * cols / 2,
                                              d8.data() + i * nb * 8, ap + r * per_row, per_row, bs);
      });
      return y;
    }
#endif
    // the activations widened to int16 once per call, in the in-lane order the rows' unpacks give
    std::vector<__m256i> q16(2 * n * nb);
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t k = 0; k < n * nb; ++k) {
      __m256i qq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.data() + k * 32));
      __m256i sq = _mm256_cmpgt_epi8(zero, qq);
      q16[2 * k] = _mm256_unpacklo_epi8(qq, sq); q16[2 * k + 1] = _mm256_unpackhi_epi8(qq, sq);
    }
    at::parallel_for(0, rows, 32, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t i = 0; i < n; ++i)
          yp[i * rows + r] = nf4_row_avx2(pp + r * cols / 2, tlo, thi, q16.data() + 2 * i * nb, d.data() + i * nb, ap + r * per_row, per_row, bs);
    });
    return y;
  }
#endif
  // the 256 byte values as (high, low) pairs: one table look-up gives both codes' values
  float pair[512];
  for (int b = 0; b < 256; ++b) { pair[2 * b] = cp[b >> 4]; pair[2 * b + 1] = cp[b & 15]; }
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* wr = pp + r * cols / 2;
      for (int64_t i = 0; i < n; ++i) {
        const float* xi = xp + i * cols;
        float acc = 0.f;
        for (int64_t b = 0; b < per_row; ++b) {
          const uint8_t* wb = wr + b * bs / 2;
          const float* xb = xi + b * bs;
          float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          int64_t k = 0;
          for (; k + 4 <= bs / 2; k += 4)
            for (int t = 0; t < 4; ++t) {
              const float* v = pair + 2 * wb[k + t];
              a[2 * t] += v[0] * xb[2 * (k + t)];
              a[2 * t + 1] += v[1] * xb[2 * (k + t) + 1];
            }
          float s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
          for (; k < bs / 2; ++k) { const float* v = pair + 2 * wb[k]; s += v[0] * xb[2 * k] + v[1] * xb[2 * k + 1]; }
          acc += s * ap[r * per_row + b];
        }
        yp[i * rows + r] = acc;
      }
    }
  });
  return y;
}

// ---- int4 weights times int8 activations: decode steps (llama.cpp's q4_1 x q8_1 scheme) -----------------
// Weights: per row, blocks of 32 columns of 16 bytes, byte j holding u[j] in its low nibble and u[j + 16] in
// its high one, u = code + 8 in [0, 15] (``int4_repack``); one fp16 scale and one zero-point z in [0, 15]
// (8 when symmetric) per group of g columns, g a multiple of 32: w = (u - z) * s. Activations: each block of
// 32 scaled to int8 (d = max|x| / 127, round to nearest), so a block's dot product is an integer:
// y = sum_groups s * (sum_blocks d_b * (u . q)_b - z * sum_blocks d_b * sum(q)_b).
static inline int32_t i4_block_dot_scalar(const uint8_t* w, const int8_t* q) {
  int32_t t = 0;
  for (int j = 0; j < 16; ++j) t += (w[j] & 15) * q[j] + (w[j] >> 4) * q[j + 16];
  return t;
}

static void quantize_rows_q8(const float* x, int64_t n, int64_t cols, int8_t* q, float* d, float* qsum) {
  int64_t nb = cols / 32;
  for (int64_t i = 0; i < n * nb; ++i) {
    const float* xb = x + i * 32;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    float dd = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    int32_t s = 0;
    for (int j = 0; j < 32; ++j) { int32_t v = static_cast<int32_t>(std::nearbyint(xb[j] * id)); q[i * 32 + j] = static_cast<int8_t>(v); s += v; }
    d[i] = dd; qsum[i] = dd * static_cast<float>(s);
  }
}

#if defined(LLMCTL_AVX2)
static inline float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}
// One block of 32 int4 codes (16 bytes, u[j] low nibble, u[j + 16] high) times 32 int8 activations: 8 int32 sums.
static inline __m256i i4_block(const uint8_t* w, const int8_t* q) {
  const __m128i m4 = _mm_set1_epi8(15);
  __m128i r = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(r, 4), m4), _mm_and_si128(r, m4));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))),
                           _mm256_set1_epi16(1));
}
static float i4_row_avx2(const uint8_t* w, const uint16_t* s, const uint8_t* z, const int8_t* q, const float* d,
                         const float* gsum, int64_t groups, int64_t bpg, float* sf, float* ds) {
  // the groups' scales as fp32 and the zero-point correction sum_g s_g z_g gsum_g, 8 groups at a time
  __m256 cv = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + g)));
    __m256 zv = z ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z + g))))
                  : _mm256_set1_ps(8.f);
    cv = _mm256_fmadd_ps(_mm256_mul_ps(sv, zv), _mm256_loadu_ps(gsum + g), cv);
    _mm256_storeu_ps(sf + g, sv);
  }
  float corr = hsum8(cv);
  for (; g < groups; ++g) { float sg = _cvtsh_ss(s[g]); sf[g] = sg; corr += sg * static_cast<float>(z ? z[g] : 8) * gsum[g]; }
  int64_t nb = groups * bpg;
  if (bpg == 1) for (int64_t b = 0; b < nb; ++b) ds[b] = d[b] * sf[b];
  else for (int64_t b = 0; b < nb; ++b) ds[b] = d[b] * sf[b / bpg];
  // blocks two at a time into two accumulators (independent FMA chains)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    __m256i p0 = i4_block(w + b * 16, q + b * 32), p1 = i4_block(w + b * 16 + 16, q + b * 32 + 32);
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(ds[b]), a0);
    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(ds[b + 1]), a1);
  }
  for (; b < nb; ++b) {
    __m256i p0 = i4_block(w + b * 16, q + b * 32);
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(ds[b]), a0);
  }
  return hsum8(_mm256_add_ps(a0, a1)) - corr;
}
// Groups of two or more blocks (g >= 64): each group's blocks summed with their activation scales, then the
// group's weight scale applied once (no per-row table of d_b · s_g to build: on short rows, Gemma's 640
// columns in groups of 128, building it cost more than the products).
static float i4_row_groups_avx2(const uint8_t* w, const uint16_t* s, const uint8_t* z, const int8_t* q, const float* d,
                                const float* gsum, int64_t groups, int64_t bpg) {
  __m256 acc = _mm256_setzero_ps();
  float corr = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t b = g * bpg, e = b + bpg;
    for (; b + 2 <= e; b += 2) {
      __m256i p0 = i4_block(w + b * 16, q + b * 32), p1 = i4_block(w + b * 16 + 16, q + b * 32 + 32);
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d[b]), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d[b + 1]), a1);
    }
    for (; b < e; ++b) {
      __m256i p0 = i4_block(w + b * 16, q + b * 32);
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d[b]), a0);
    }
    float sg = _cvtsh_ss(s[g]);
    acc = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(sg), acc);
    corr += sg * static_cast<float>(z ? z[g] : 8) * gsum[g];
  }
  return hsum8(acc) - corr;
}
#endif

#if defined(LLMCTL_AVX512)
// Two int4 blocks (32 bytes) times 64 int8 activations: lanes 0-7 the first block's sums, 8-15 the second's.
static inline __m512i i4_pair(const uint8_t* w, const int8_t* q) {
  const __m256i m4 = _mm256_set1_epi8(15);
  __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(r, m4)), _mm256_and_si256(_mm256_srli_epi16(r, 4), m4), 1);
  u = _mm512_shuffle_i64x2(u, u, _MM_SHUFFLE(3, 1, 2, 0));  // (low 0, low 1, high 0, high 1) -> block 0's values, block 1's
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512(q));
}
// Two int8 blocks times 64 int8 activations (dpbusd takes unsigned x signed: |w| times q with w's sign).
static inline __m512i i8_pair(const int8_t* w, const int8_t* q) {
  __m512i ww = _mm512_loadu_si512(w), qq = _mm512_loadu_si512(q);
  __m512i qs = _mm512_mask_sub_epi8(qq, _mm512_movepi8_mask(ww), _mm512_setzero_si512(), qq);
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(ww), qs);
}
static inline __m256i i8_block(const int8_t* w, const int8_t* q);
// A row of int4 or int8 blocks (Pair: i4_pair or i8_pair; Block: the one-block AVX2 product, for an odd block
// out), given the activations' spread scales d8: with one block a group, pairs take the two blocks' weight
// scales as a vector; with more, each group's pairs are summed with the activation scales and the group's
// scale applied once. Returns the sum before the zero-point correction.
template <typename W, int BLOCK_BYTES, __m512i (*Pair)(const W*, const int8_t*), __m256i (*Block)(const W*, const int8_t*)>
static float row_pairs_avx512(const W* w, const uint16_t* s, const int8_t* q, const float* d, const float* d8,
                              int64_t groups, int64_t bpg) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m256 odd = _mm256_setzero_ps();
  if (bpg == 1) {
    int64_t b = 0;
    for (; b + 4 <= groups; b += 4) {
      __m128 s4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + b)));
      a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(Pair(w + b * BLOCK_BYTES, q + b * 32)), _mm512_mul_ps(_mm512_loadu_ps(d8 + b * 8), scale_pair(s4, 0)), a0);
      a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(Pair(w + (b + 2) * BLOCK_BYTES, q + (b + 2) * 32)), _mm512_mul_ps(_mm512_loadu_ps(d8 + (b + 2) * 8), scale_pair(s4, 2)), a1);
    }
    for (; b < groups; ++b)
      odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(Block(w + b * BLOCK_BYTES, q + b * 32)), _mm256_set1_ps(d[b] * _cvtsh_ss(s[b])), odd);
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + hsum8(odd);
  }
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    int64_t b = g * bpg, e = b + bpg;
    a0 = _mm512_setzero_ps(); a1 = _mm512_setzero_ps();
    for (; b + 4 <= e; b += 4) {
      a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(Pair(w + b * BLOCK_BYTES, q + b * 32)), _mm512_loadu_ps(d8 + b * 8), a0);
      a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(Pair(w + (b + 2) * BLOCK_BYTES, q + (b + 2) * 32)), _mm512_loadu_ps(d8 + (b + 2) * 8), a1);
    }
    if (b + 2 <= e) { a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(Pair(w + b * BLOCK_BYTES, q + b * 32)), _mm512_loadu_ps(d8 + b * 8), a0); b += 2; }
    float sg = _cvtsh_ss(s[g]);
    if (b < e) odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(Block(w + b * BLOCK_BYTES, q + b * 32)), _mm256_set1_ps(d[b] * sg), odd);
    acc = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(sg), acc);
  }
  return _mm512_reduce_add_ps(acc) + hsum8(odd);
}
// int4 four blocks at a time (64 bytes of codes), with no shuffles: the activations are laid out once a call
// in the order the codes' nibbles come in (quads: per four blocks, their first 16 values each, then their last
// 16 each), so the low nibbles of all four blocks meet the first 64 bytes and the high nibbles the next 64:
// two dpbusd, lanes 4j..4j+3 block j's sums. Activation scales spread 4 times (d4), weight scales permuted
// to match. Taken for one or two blocks a group, groups of a multiple of four blocks, or one group a row.
static bool i4_quads_fit(int64_t groups, int64_t bpg) { return bpg == 1 || bpg == 2 || bpg % 4 == 0 || groups == 1; }
static void i4_quad_layout(const int8_t* q, int64_t n, int64_t cols, int8_t* qa) {
  const int64_t nb = cols / 32, nq = nb / 4;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < nq; ++k)
      for (int64_t j = 0; j < 4; ++j) {
        const int8_t* src = q + i * cols + (4 * k + j) * 32; int8_t* dst = qa + (i * nq + k) * 128 + j * 16;
        std::memcpy(dst, src, 16); std::memcpy(dst + 64, src + 16, 16);
      }
}
static inline __m512i i4_quad(const uint8_t* w, const int8_t* qa) {
  const __m512i m4 = _mm512_set1_epi8(15);
  __m512i r = _mm512_loadu_si512(w);
  __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(r, m4), _mm512_loadu_si512(qa));
  return _mm512_dpbusd_epi32(p, _mm512_and_si512(_mm512_srli_epi16(r, 4), m4), _mm512_loadu_si512(qa + 64));
}
static float i4_row_quads(const uint8_t* w, const uint16_t* s, const int8_t* q, const int8_t* qa, const float* d, const float* d4,
                          int64_t groups, int64_t bpg) {
  const int64_t nb = groups * bpg, nq = nb / 4;
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m256 odd = _mm256_setzero_ps();
  if (bpg <= 2) {  // a block's (or two's) own weight scale: [s x4 per block] or [s x8 per pair]
    const __m512i idx = bpg == 1 ? _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
                                 : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int64_t k = 0; k < nq; ++k) {
      __m128i raw;
      if (bpg == 1) raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + 4 * k));
      else { int32_t two; std::memcpy(&two, s + 2 * k, 4); raw = _mm_cvtsi32_si128(two); }
      __m512 sc = _mm512_mul_ps(_mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_cvtph_ps(raw))), _mm512_loadu_ps(d4 + 16 * k));
      if (k & 1) a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i4_quad(w + 64 * k, qa + 128 * k)), sc, a1);
      else a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i4_quad(w + 64 * k, qa + 128 * k)), sc, a0);
    }
  } else {  // whole quads in each group (or one group a row): the group's scale once
    const int64_t qpg = groups == 1 ? nq : bpg / 4;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512 g0 = _mm512_setzero_ps(), g1 = _mm512_setzero_ps();
      for (int64_t k = g * qpg; k < (g + 1) * qpg; ++k) {
        if (k & 1) g1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i4_quad(w + 64 * k, qa + 128 * k)), _mm512_loadu_ps(d4 + 16 * k), g1);
        else g0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i4_quad(w + 64 * k, qa + 128 * k)), _mm512_loadu_ps(d4 + 16 * k), g0);
      }
      acc = _mm512_fmadd_ps(_mm512_add_ps(g0, g1), _mm512_set1_ps(_cvtsh_ss(s[g])), acc);
    }
    a0 = acc;
  }
  for (int64_t b = 4 * nq; b < nb; ++b)  // the blocks after the last whole quad (not with groups of 4k blocks)
    odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i4_block(w + 16 * b, q + 32 * b)), _mm256_set1_ps(d[b] * _cvtsh_ss(s[b / bpg])), odd);
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + hsum8(odd);
}
// sum_g s_g z_g gsum_g, the int4 rows' zero-point correction (z 8 when symmetric)
static float i4_correction(const uint16_t* s, const uint8_t* z, const float* gsum, int64_t groups) {
  __m512 cv = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 16 <= groups; g += 16) {
    __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + g)));
    __m512 zv = z ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + g)))) : _mm512_set1_ps(8.f);
    cv = _mm512_fmadd_ps(_mm512_mul_ps(sv, zv), _mm512_loadu_ps(gsum + g), cv);
  }
  float corr = _mm512_reduce_add_ps(cv);
  for (; g < groups; ++g) corr += _cvtsh_ss(s[g]) * static_cast<float>(z ? z[g] : 8) * gsum[g];
  return corr;
}
#endif

static float i4_row_scalar(const uint8_t* w, const c10::Half* s, const uint8_t* z, const int8_t* q, const float* d,
                           const float* gsum, int64_t groups, int64_t bpg) {
  float acc = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    float accg = 0.f;
    for (int64_t k = 0; k < bpg; ++k) {
      int64_t b = g * bpg + k;
      accg += d[b] * static_cast<float>(i4_block_dot_scalar(w + b * 16, q + b * 32));
    }
    float sg = static_cast<float>(s[g]);
    acc += sg * (accg - static_cast<float>(z ? z[g] : 8) * gsum[g]);
  }
  return acc;
}

// x (n, cols) float; packed (rows, cols / 2) uint8 (int4_repack's order); scale (rows, groups) fp16;
// zero (rows, groups) uint8 or empty (symmetric); path: an index into int4_paths(), best first. fp32 out.
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, int64_t path) {
  TORCH_CHECK(x.is_cpu() && packed.is_cpu() && scale.is_cpu() && zero.is_cpu(), "int4_linear runs on CPU tensors");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && scale.scalar_type() == torch::kHalf, "int4_linear: uint8 codes, fp16 scales");
  TORCH_CHECK(x.dim() == 2, "the input is (rows, columns)");
  if (x.scalar_type() != torch::kFloat32 || !x.is_contiguous()) x = x.to(torch::kFloat32).contiguous();
  int64_t n = x.size(0), cols = x.size(1), rows = packed.size(0), groups = scale.size(1);
  TORCH_CHECK(packed.is_contiguous() && scale.is_contiguous() && zero.is_contiguous(), "int4_linear: contiguous weights");
  TORCH_CHECK(cols % 32 == 0 && packed.size(1) * 2 == cols && scale.size(0) == rows && groups > 0 && cols % groups == 0
              && (cols / groups) % 32 == 0, "int4_linear: shapes do not match");
  bool asym = zero.numel() > 0;
  TORCH_CHECK(!asym || (zero.scalar_type() == torch::kUInt8 && zero.size(0) == rows && zero.size(1) == groups), "int4_linear: zero-points");
  int64_t nb = cols / 32, bpg = nb / groups;
  std::vector<int8_t> q(n * cols);
  std::vector<float> d(n * nb), qs(n * nb), gsum(n * groups, 0.f);  // gsum: sum of d_b * sum(q)_b per group
  quantize_rows_q8(x.data_ptr<float>(), n, cols, q.data(), d.data(), qs.data());
  for (int64_t i = 0; i < n * nb; ++i) gsum[i / bpg] += qs[i];
  auto y = torch::empty({n, rows}, torch::kFloat32);
  const uint8_t* wp = packed.data_ptr<uint8_t>(); const c10::Half* sp = reinterpret_cast<const c10::Half*>(scale.data_ptr());
  const uint8_t* zp = asym ? zero.data_ptr<uint8_t>() : nullptr;
  const int8_t* qp = q.data(); const float* dp = d.data(); const float* gp = gsum.data();
  float* yp = y.data_ptr<float>();
  const int isa = isa_of(path);
#if defined(LLMCTL_AVX512)
  const bool quads = isa == ISA_AVX512 && i4_quads_fit(groups, bpg);
  std::vector<float> d8(isa == ISA_AVX512 && !quads ? n * nb * 8 : 0), d4(quads ? n * nb * 4 : 0);
  std::vector<int8_t> qa(quads ? n * (nb / 4) * 128 : 0);
  if (quads) {
    for (int64_t b = 0; b < n * nb; ++b) for (int t = 0; t < 4; ++t) d4[b * 4 + t] = d[b];
    i4_quad_layout(q.data(), n, cols, qa.data());
  } else if (isa == ISA_AVX512) spread8(d.data(), n * nb, d8.data());
#endif
  at::parallel_for(0, rows, 32, [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(groups + nb);  // the row's scales as fp32, and d_b * s_g per block
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* w = wp + r * cols / 2; const c10::Half* s = sp + r * groups; const uint8_t* z = zp ? zp + r * groups : nullptr;
      for (int64_t i = 0; i < n; ++i) {
        const int8_t* qi = qp + i * cols; const float* di = dp + i * nb; const float* gi = gp + i * groups;
#if defined(LLMCTL_AVX512)
        if (isa == ISA_AVX512) {
          const uint16_t* s16 = reinterpret_cast<const uint16_t*>(s);
          yp[i * rows + r] = (quads ? i4_row_quads(w, s16, qi, qa.data() + i * (nb / 4) * 128, di, d4.data() + i * nb * 4, groups, bpg)
                                    : row_pairs_avx512<uint8_t, 16, i4_pair, i4_block>(w, s16, qi, di, d8.data() + i * nb * 8, groups, bpg))
                             - i4_correction(s16, z, gi, groups);
          continue;
        }
#endif
#if defined(LLMCTL_AVX2)
        if (isa == ISA_AVX2) {
          yp[i * rows + r] = bpg == 1
              ? i4_row_avx2(w, reinterpret_cast<const uint16_t*>(s), z, qi, di, gi, groups, bpg, scratch.data(), scratch.data() + groups)
              : i4_row_groups_avx2(w, reinterpret_cast<const uint16_t*>(s), z, qi, di, gi, groups, bpg);
          continue;
        }
#endif
        yp[i * rows + r] = i4_row_scalar(w, s, z, qi, di, gi, groups, bpg);
      }
    }
  });
  return y;
}

// ---- int8 weights times int8 activations (llama.cpp's q8_0 x q8_0) -----------------------------------------
// codes (rows, cols) int8, one fp16 scale per group of g columns (g a multiple of 32): w = code * s.
#if defined(LLMCTL_AVX2)
// One block of 32 int8 codes times 32 int8 activations: 8 int32 sums. maddubs takes unsigned x signed: |w| times
// q carrying w's sign (w = -128 gives 0x80, read unsigned as 128: still exact).
static inline __m256i i8_block(const int8_t* w, const int8_t* q) {
  __m256i ww = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  __m256i qq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(ww, ww), _mm256_sign_epi8(qq, ww)), _mm256_set1_epi16(1));
}
static float i8_row_avx2(const int8_t* w, const uint16_t* s, const int8_t* q, const float* d, int64_t groups, int64_t bpg) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();  // two chains: per channel a row is one group
    int64_t b = g * bpg, e = b + bpg;
    for (; b < e; ++b) {
      __m256i p = i8_block(w + b * 32, q + b * 32);
      if ((b & 1) == 0) a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[b]), a0);
      else a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[b]), a1);
    }
    acc = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(_cvtsh_ss(s[g])), acc);
  }
  return hsum8(acc);
}
#endif

static float i8_row_scalar(const int8_t* w, const c10::Half* s, const int8_t* q, const float* d, int64_t groups, int64_t bpg) {
  float acc = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    float accg = 0.f;
    for (int64_t k = 0; k < bpg; ++k) {
      int64_t b = g * bpg + k;
      int32_t t = 0;
      for (int j = 0; j < 32; ++j) t += static_cast<int32_t>(w[b * 32 + j]) * q[b * 32 + j];
      accg += d[b] * static_cast<float>(t);
    }
    acc += static_cast<float>(s[g]) * accg;
  }
  return acc;
}

// x (n, cols) float; codes (rows, cols) int8 in [-127, 127]; scale (rows, groups) fp16; path as int4_linear.
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, int64_t path) {
  TORCH_CHECK(x.is_cpu() && codes.is_cpu() && scale.is_cpu(), "int8_linear runs on CPU tensors");
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && scale.scalar_type() == torch::kHalf, "int8_linear: int8 codes, fp16 scales");
  TORCH_CHECK(x.dim() == 2, "the input is (rows, columns)");
  if (x.scalar_type() != torch::kFloat32 || !x.is_contiguous()) x = x.to(torch::kFloat32).contiguous();
  int64_t n = x.size(0), cols = x.size(1), rows = codes.size(0), groups = scale.size(1);
  TORCH_CHECK(codes.is_contiguous() && scale.is_contiguous(), "int8_linear: contiguous weights");
  TORCH_CHECK(cols % 32 == 0 && codes.size(1) == cols && scale.size(0) == rows && groups > 0 && cols % groups == 0
              && (cols / groups) % 32 == 0, "int8_linear: shapes do not match");
  int64_t nb = cols / 32, bpg = nb / groups;
  std::vector<int8_t> q(n * cols);
  std::vector<float> d(n * nb), qs(n * nb);
  quantize_rows_q8(x.data_ptr<float>(), n, cols, q.data(), d.data(), qs.data());
  auto y = torch::empty({n, rows}, torch::kFloat32);
  const int8_t* wp = codes.data_ptr<int8_t>(); const c10::Half* sp = reinterpret_cast<const c10::Half*>(scale.data_ptr());
  const int8_t* qp = q.data(); const float* dp = d.data(); float* yp = y.data_ptr<float>();
  const int isa = isa_of(path);
#if defined(LLMCTL_AVX512)
  std::vector<float> d8(isa == ISA_AVX512 ? n * nb * 8 : 0);
  if (isa == ISA_AVX512) spread8(d.data(), n * nb, d8.data());
#endif
  at::parallel_for(0, rows, 32, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* w = wp + r * cols; const c10::Half* s = sp + r * groups;
      for (int64_t i = 0; i < n; ++i) {
#if defined(LLMCTL_AVX512)
        if (isa == ISA_AVX512) {
          yp[i * rows + r] = row_pairs_avx512<int8_t, 32, i8_pair, i8_block>(w, reinterpret_cast<const uint16_t*>(s), qp + i * cols, dp + i * nb,
                                                                          d8.data() + i * nb * 8, groups, bpg);
          continue;
        }
#endif
#if defined(LLMCTL_AVX2)
        if (isa == ISA_AVX2) { yp[i * rows + r] = i8_row_avx2(w, reinterpret_cast<const uint16_t*>(s), qp + i * cols, dp + i * nb, groups, bpg); continue; }
#endif
        yp[i * rows + r] = i8_row_scalar(w, s, qp + i * cols, dp + i * nb, groups, bpg);
      }
    }
  });
  return y;
}

// The weight int4_linear multiplies, as fp32 (rows, cols): for longer inputs (prefill), one matrix product.
torch::Tensor int4_dequant(torch::Tensor packed, torch::Tensor scale, torch::Tensor zero) {
  TORCH_CHECK(packed.is_cpu() && scale.is_cpu() && zero.is_cpu(), "int4_dequant runs on CPU tensors");
  packed = packed.contiguous(); scale = scale.to(torch::kFloat32).contiguous(); zero = zero.contiguous();
  int64_t rows = packed.size(0), cols = packed.size(1) * 2, groups = scale.size(1), g = cols / groups;
  bool asym = zero.numel() > 0;
  auto out = torch::empty({rows, cols}, torch::kFloat32);
  const uint8_t* wp = packed.data_ptr<uint8_t>(); const float* sp = scale.data_ptr<float>();
  const uint8_t* zp = asym ? zero.data_ptr<uint8_t>() : nullptr; float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < cols / 32; ++b) {
        const uint8_t* w = wp + r * cols / 2 + b * 16; float* o = op + r * cols + b * 32;
        int64_t grp = b * 32 / g; float s = sp[r * groups + grp]; float z = zp ? zp[r * groups + grp] : 8.f;
        for (int j = 0; j < 16; ++j) { o[j] = ((w[j] & 15) - z) * s; o[j + 16] = ((w[j] >> 4) - z) * s; }
      }
  });
  return out;
}

// The paths this build has, best first (for tests and the benchmark).
std::vector<std::string> int4_paths() {  // every kernel's (int4, int8, fp8, NF4)
  std::vector<std::string> names;
  for (int64_t i = 0; i < ISA_COUNT; ++i) names.push_back(ISA_ORDER[i] == ISA_AVX512 ? "avx512" : ISA_ORDER[i] == ISA_AVX2 ? "avx2" : "scalar");
  return names;
}

// Two codes a byte, element 2k in the low nibble, each stored as code + 8 (compressed-tensors' order; an odd
// row is padded with 0), what ``primitives.pack_nibbles((q + 8).to(uint8))`` gives.
static torch::Tensor pack4(const torch::Tensor& q, int64_t rows, int64_t cols) {
  int64_t half = (cols + 1) / 2;
  auto out = torch::empty({rows, half}, torch::kUInt8);
  const int8_t* qp = q.data_ptr<int8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* a = qp + r * cols;
      uint8_t* o = op + r * half;
      for (int64_t j = 0; j < cols / 2; ++j)
        o[j] = static_cast<uint8_t>((a[2 * j] + 8) | ((a[2 * j + 1] + 8) << 4));
      if (cols % 2) o[half - 1] = static_cast<uint8_t>(a[cols - 1] + 8);
    }
  });
  return out;
}

// 8 bits: (codes int8 (rows, cols), scales fp16 (rows, groups), zero-points int8 (rows, groups) or empty);
// 4 bits: codes and zero-points (flattened) packed by pack4.
std::vector<torch::Tensor> int_group(torch::Tensor x, int64_t g, int64_t bits, bool asym, int64_t steps, double delta,
                                     int64_t widen, int64_t refits) {
  x = x.contiguous();
  int64_t rows = x.size(0), cols = x.size(1);
  bool inline_pack = bits == 4 && g % 2 == 0;
  auto q = torch::empty({inline_pack ? 0 : rows, cols}, torch::kInt8);
  auto packed = torch::empty({inline_pack ? rows : 0, cols / 2}, torch::kUInt8);
  auto scale = torch::empty({rows, cols / g}, torch::kHalf);
  auto zp = torch::empty({asym ? rows : 0, cols / g}, torch::kInt8);
  auto qp = q.data_ptr<int8_t>(); auto sp = reinterpret_cast<c10::Half*>(scale.data_ptr()); auto zpp = zp.data_ptr<int8_t>();
  uint8_t* np = inline_pack ? packed.data_ptr<uint8_t>() : nullptr;
  int b = static_cast<int>(bits);
  if (x.scalar_type() == torch::kBFloat16) int_impl(reinterpret_cast<const c10::BFloat16*>(x.data_ptr()), rows, cols, g, b, asym, qp, sp, zpp, np, steps, delta, widen, refits);
  else if (x.scalar_type() == torch::kHalf) int_impl(reinterpret_cast<const c10::Half*>(x.data_ptr()), rows, cols, g, b, asym, qp, sp, zpp, np, steps, delta, widen, refits);
  else { auto xf = x.to(torch::kFloat32); int_impl(xf.data_ptr<float>(), rows, cols, g, b, asym, qp, sp, zpp, np, steps, delta, widen, refits); }
  if (bits == 4) {
    q = inline_pack ? packed : pack4(q, rows, cols);
    if (asym) zp = pack4(zp, 1, zp.numel()).reshape(-1);
  }
  return std::vector<torch::Tensor>{q, scale, zp};
}

// ---- dense fp32 or bf16 weights times fp32 activations (the fused decode step's kinds 0 and 5) -------------
// Each bf16 is widened exactly to fp32 (the top half of its bits); fp32 products and sums, the activations not
// rounded. Four rows at a time share the activations' loads and run four independent chains, and the next
// four rows are prefetched: one row is a short stream (576 columns: 18 cache lines of bf16), and without both
// a thread reaches ~2/3 of the memory bandwidth one large torch.mv does.
template <typename T>
static float dense_row_scalar(const T* w, const float* x, int64_t cols) {
  float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8)
    for (int k = 0; k < 8; ++k) a[k] += ld(w, j + k) * x[j + k];
  float t = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  for (; j < cols; ++j) t += ld(w, j) * x[j];
  return t;
}
#if defined(LLMCTL_AVX2)
template <typename T>
static inline void prefetch_rows(const T* w, int64_t stride, int64_t j) {  // rows 4-7 ahead of w, column j
  for (int t = 4; t < 8; ++t) _mm_prefetch(reinterpret_cast<const char*>(w + t * stride + j), _MM_HINT_T0);
}
static inline __m256 ld8(const float* w) { return _mm256_loadu_ps(w); }
static inline __m256 ld8(const c10::BFloat16* w) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))), 16));
}
// The vector width of a dense path: its register, loads (fp32 as is, bf16 widened), multiply-add, sum.
struct Avx2F {
  using V = __m256;
  static const int W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V x(const float* p) { return _mm256_loadu_ps(p); }
  template <typename T> static V w(const T* p) { return ld8(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) { return hsum8(v); }
};
#endif
#if defined(LLMCTL_AVX512)
static inline __m512 ld16(const float* w) { return _mm512_loadu_ps(w); }
static inline __m512 ld16(const c10::BFloat16* w) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))), 16));
}
struct Avx512F {
  using V = __m512;
  static const int W = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V x(const float* p) { return _mm512_loadu_ps(p); }
  template <typename T> static V w(const T* p) { return ld16(p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#endif
#if defined(LLMCTL_AVX2)
template <typename S, typename T>
static void dense_rows4(const T* w, int64_t stride, const float* x, int64_t cols, float* y) {
  typename S::V a0 = S::zero(), a1 = S::zero(), a2 = S::zero(), a3 = S::zero();
  int64_t j = 0;
  for (; j + S::W <= cols; j += S::W) {
    if ((j * sizeof(T)) % 64 == 0) prefetch_rows(w, stride, j);
    typename S::V xv = S::x(x + j);
    a0 = S::fma(S::w(w + j), xv, a0);
    a1 = S::fma(S::w(w + stride + j), xv, a1);
    a2 = S::fma(S::w(w + 2 * stride + j), xv, a2);
    a3 = S::fma(S::w(w + 3 * stride + j), xv, a3);
  }
  y[0] = S::sum(a0); y[1] = S::sum(a1); y[2] = S::sum(a2); y[3] = S::sum(a3);
  for (; j < cols; ++j)
    for (int t = 0; t < 4; ++t) y[t] += ld(w + t * stride, j) * x[j];
}
#endif

template <typename T>
static void dense_impl(const T* wp, const float* xp, float* yp, int64_t n, int64_t rows, int64_t cols, int isa) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = 0; i < n; ++i) {
      const float* xi = xp + i * cols; float* yi = yp + i * rows;
      int64_t r = r0;
#if defined(LLMCTL_AVX512)
      if (isa == ISA_AVX512) for (; r + 4 <= r1; r += 4) dense_rows4<Avx512F>(wp + r * cols, cols, xi, cols, yi + r);
#endif
#if defined(LLMCTL_AVX2)
      if (isa == ISA_AVX2) for (; r + 4 <= r1; r += 4) dense_rows4<Avx2F>(wp + r * cols, cols, xi, cols, yi + r);
#endif
      for (; r < r1; ++r) yi[r] = dense_row_scalar(wp + r * cols, xi, cols);
    }
  });
}

// x (n, cols) float; w (rows, cols) fp32 or bf16; path as int4_linear. fp32 out.
torch::Tensor dense_linear(torch::Tensor x, torch::Tensor w, int64_t path) {
  TORCH_CHECK(x.is_cpu() && w.is_cpu(), "dense_linear runs on CPU tensors");
  TORCH_CHECK((w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kFloat32) && w.dim() == 2 && w.is_contiguous() && x.dim() == 2,
              "dense_linear: a contiguous (rows, cols) fp32 or bf16 weight");
  if (x.scalar_type() != torch::kFloat32 || !x.is_contiguous()) x = x.to(torch::kFloat32).contiguous();
  int64_t n = x.size(0), cols = x.size(1), rows = w.size(0);
  TORCH_CHECK(w.size(1) == cols, "dense_linear: shapes do not match");
  auto y = torch::empty({n, rows}, torch::kFloat32);
  if (w.scalar_type() == torch::kFloat32) dense_impl(w.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), n, rows, cols, isa_of(path));
  else dense_impl(reinterpret_cast<const c10::BFloat16*>(w.data_ptr()), x.data_ptr<float>(), y.data_ptr<float>(), n, rows, cols, isa_of(path));
  return y;
}

// ---- one decode step through every layer (one token, batch 1, fp32): llmctl.runtime.model's layer in C++ ----
// The Python model is the reference and the fallback; this runs the same operations without a torch call per
// operation: RMSNorm (optionally scaling by 1 + weight), the q/k/v projection (joined or in parts), q/k norms,
// RoPE from the runtime's tables, the KV-cache write, one query per head over the cache (GQA, sliding
// windows from the cache's slot positions), o_proj, the sandwich norms, gate/up, activation, down_proj.
// Linears: kind 0 a dense fp32 weight (dense_linear), 1 int4_linear's (packed, scale, zero),
// 2 int8_linear's (codes, scale), 3 fp8_linear's (codes as uint8, lut, scale), 4 nf4_linear's (packed as
// (rows, cols / 2), code, absmax: the blocks' size follows), 5 a dense bf16 weight (dense_linear); each with
// an optional fp32 bias. The hidden state stays fp32 between the linears; the KV cache is fp32 or bf16
// (rounded to nearest even as it is written, as a bf16 model's own cache holds it).
#include <memory>
#include <unordered_map>

struct DLin { int64_t kind = -1; torch::Tensor a, b, c, bias; };
struct DLayer {
  torch::Tensor in_norm, post_attn_norm, pre_ff_norm, post_ff_norm, q_norm, k_norm;
  std::vector<DLin> qkv, gate_up; DLin o, down;
  int64_t window = 0, rope = 0;  // window 0: full attention; rope: which table pair
};
struct DPlan {
  std::vector<DLayer> layers;
  int64_t hidden = 0, H = 0, KV = 0, D = 0, inter = 0, act = 0; bool sandwich = false, qk_norm = false;
  float offset = 0.f; double eps = 1e-6; float scale = 1.f;
};
static std::unordered_map<int64_t, std::unique_ptr<DPlan>> g_plans;
static int64_t g_next_plan = 1;

static const int64_t DSLOTS = 34;  // tensors per layer in decode_plan's list

// ints: [hidden, H, KV, D, inter, act, sandwich, qk_norm, n_layers, offset] then per layer
// [window, rope, kind q0, kind q1, kind q2, kind o, kind g0, kind g1, kind down] (-1: absent);
// tensors per layer: 6 norms, then 7 linears of 4 (a, b, c, bias), empty tensors where absent.
int64_t decode_plan(std::vector<torch::Tensor> t, std::vector<int64_t> ints, std::vector<double> floats) {
  auto p = std::make_unique<DPlan>();
  p->hidden = ints[0]; p->H = ints[1]; p->KV = ints[2]; p->D = ints[3]; p->inter = ints[4]; p->act = ints[5];
  p->sandwich = ints[6] != 0; p->qk_norm = ints[7] != 0; int64_t n = ints[8]; p->offset = static_cast<float>(ints[9]);
  p->eps = floats[0]; p->scale = static_cast<float>(floats[1]);
  TORCH_CHECK(static_cast<int64_t>(t.size()) == n * DSLOTS && static_cast<int64_t>(ints.size()) == 10 + n * 9, "decode_plan: lists do not match");
  TORCH_CHECK(p->D % 2 == 0 && p->KV > 0 && p->H % p->KV == 0, "decode_plan: heads");
  for (int64_t l = 0; l < n; ++l) {
    const torch::Tensor* s = t.data() + l * DSLOTS; const int64_t* k = ints.data() + 10 + l * 9;
    DLayer L;
    L.window = k[0]; L.rope = k[1];
    L.in_norm = s[0]; L.post_attn_norm = s[1]; L.pre_ff_norm = s[2]; L.post_ff_norm = s[3]; L.q_norm = s[4]; L.k_norm = s[5];
    for (int j = 0; j < 7; ++j) {
      if (k[2 + j] < 0) continue;
      DLin lin; lin.kind = k[2 + j];
      lin.a = s[6 + 4 * j]; lin.b = s[7 + 4 * j]; lin.c = s[8 + 4 * j]; lin.bias = s[9 + 4 * j];
      TORCH_CHECK(lin.a.is_cpu() && lin.a.is_contiguous(), "decode_plan: CPU, contiguous weights");
      TORCH_CHECK(lin.kind != 0 || lin.a.scalar_type() == torch::kFloat32, "decode_plan: kind 0 weights are fp32");
      TORCH_CHECK(lin.kind != 5 || lin.a.scalar_type() == torch::kBFloat16, "decode_plan: kind 5 weights are bf16");
      TORCH_CHECK(lin.bias.numel() == 0 || lin.bias.scalar_type() == torch::kFloat32, "decode_plan: fp32 biases");
      if (j < 3) L.qkv.push_back(lin); else if (j == 3) L.o = lin; else if (j < 6) L.gate_up.push_back(lin); else L.down = lin;
    }
    TORCH_CHECK(!L.qkv.empty() && L.o.kind >= 0 && !L.gate_up.empty() && L.down.kind >= 0, "decode_plan: missing linears");
    for (auto* w : {&L.in_norm, &L.post_attn_norm, &L.pre_ff_norm, &L.post_ff_norm, &L.q_norm, &L.k_norm})
      TORCH_CHECK(w->numel() == 0 || (w->scalar_type() == torch::kFloat32 && w->is_contiguous()), "decode_plan: fp32 norms");
    p->layers.push_back(std::move(L));
  }
  int64_t id = g_next_plan++;
  g_plans[id] = std::move(p);
  return id;
}

void decode_free(int64_t id) { g_plans.erase(id); }

// x * rsqrt(mean(x^2) + eps) * (offset + w), the sum in double as torch's CPU rms_norm accumulates
static inline void rmsnorm(const float* x, const float* w, float offset, int64_t n, double eps, float* out) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  float r = static_cast<float>(1.0 / std::sqrt(ss / n + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] * r) * (offset + w[i]);
}

// y (rows) = lin(x (cols)); x a (1, cols) fp32 tensor
static void dlin(const DLin& l, const torch::Tensor& x, float* y, int64_t path) {
  int64_t rows = l.a.size(0);
  if (l.kind == 0 || l.kind == 5) {  // dense: straight into y
    const float* xp = x.data_ptr<float>(); const int64_t cols = x.size(1);
    if (l.kind == 0) dense_impl(l.a.data_ptr<float>(), xp, y, 1, rows, cols, isa_of(path));
    else dense_impl(reinterpret_cast<const c10::BFloat16*>(l.a.data_ptr()), xp, y, 1, rows, cols, isa_of(path));
  } else {
    torch::Tensor r = l.kind == 1 ? int4_linear(x, l.a, l.b, l.c, path)
                    : l.kind == 2 ? int8_linear(x, l.a, l.b, path)
                    : l.kind == 3 ? fp8_linear(x, l.a, l.b, l.c, path)
                    : nf4_linear(x, l.a.view({-1}), l.b, l.c, rows, rows * x.size(1) / l.c.numel(), path);
    std::memcpy(y, r.data_ptr<float>(), rows * sizeof(float));
  }
  if (l.bias.numel()) { const float* b = l.bias.data_ptr<float>(); for (int64_t i = 0; i < rows; ++i) y[i] += b[i]; }
}

static void dlins(const std::vector<DLin>& ls, const torch::Tensor& x, float* y, int64_t path) {
  for (const auto& l : ls) { dlin(l, x, y, path); y += l.a.size(0); }
}

static inline float act_fn(float g, int64_t act) {
  if (act == 0) return g / (1.0f + std::exp(-g));
  if (act == 1) { const float c = 0.7978845608028654f; return 0.5f * g * (1.0f + std::tanh(c * (g + 0.044715f * g * g * g))); }
  return 0.5f * g * (1.0f + std::erf(g * 0.7071067811865476f));
}

// The cache write (k, v at ``slot``) and one query per head over the cache (GQA: H / KV query heads a key
// head; sliding windows from the slots' positions), for an fp32 or bf16 cache.
static inline void store(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
static inline void store(c10::BFloat16* dst, const float* src, int64_t n) { for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]); }
template <typename T>
static inline float dot_kv(const float* a, const T* b, int64_t n) {
#if defined(LLMCTL_AVX2)
  if (n % 16 == 0) {  // head_dim 64, 128, 256: the cache's bf16 widened in registers
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), ld8(b + i), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), ld8(b + i + 8), s1);
    }
    return hsum8(_mm256_add_ps(s0, s1));
  }
#endif
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += a[i + k] * ld(b, i + k);
  float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < n; ++i) t += a[i] * ld(b, i);
  return t;
}
template <typename T>
static inline void axpy_kv(float* o, float e, const T* v, int64_t n) {  // o += e * v
  int64_t i = 0;
#if defined(LLMCTL_AVX2)
  const __m256 ev = _mm256_set1_ps(e);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(ev, ld8(v + i), _mm256_loadu_ps(o + i)));
#endif
  for (; i < n; ++i) o[i] += e * ld(v, i);
}
template <typename T>
static void attend(T* kb, T* vb, const float* q, const float* k, const float* v, float* attn, int64_t S, int64_t slot,
                   int64_t len, int64_t W, const int64_t* sp, int64_t pos, int64_t H, int64_t KV, int64_t D, float scale) {
  for (int64_t h = 0; h < KV; ++h) {
    store(kb + (h * S + slot) * D, k + h * D, D);
    store(vb + (h * S + slot) * D, v + h * D, D);
  }
  const int64_t rep = H / KV;
  auto heads = [&](int64_t h0, int64_t h1) {
    std::vector<float> sc(len);
    for (int64_t h = h0; h < h1; ++h) {
      const float* qh = q + h * D; const int64_t g = h / rep;
      const T* kh = kb + g * S * D; const T* vh = vb + g * S * D;
      float m = -INFINITY;
      for (int64_t j = 0; j < len; ++j) {
        bool ok = true;
        if (W) { int64_t p = sp[j]; ok = p >= 0 && p <= pos && p > pos - W; }
        sc[j] = ok ? dot_kv(qh, kh + j * D, D) * scale : -INFINITY;
        m = std::max(m, sc[j]);
      }
      float* o = attn + h * D;
      for (int64_t i = 0; i < D; ++i) o[i] = 0.f;
      float sum = 0.f;
      for (int64_t j = 0; j < len; ++j) {
        if (sc[j] == -INFINITY) continue;
        float e = std::exp(sc[j] - m); sum += e;
        axpy_kv(o, e, vh + j * D, D);
      }
      float inv = 1.0f / sum;
      for (int64_t i = 0; i < D; ++i) o[i] *= inv;
    }
  };
  if (len * D * H < (1 << 16)) heads(0, H); else at::parallel_for(0, H, 1, heads);
}

// x (hidden) fp32, updated in place and returned; keys/values per layer (1, KV, slots, D) fp32 or bf16; rope: per table
// kind (cos, sin), each (length, .., D) fp32 contiguous (llmctl.runtime.rope.rope_tables); slot_pos: the
// position each ring slot holds (sliding layers); pos: this token's position.
torch::Tensor decode_step(int64_t id, torch::Tensor x, std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                          std::vector<torch::Tensor> rope, torch::Tensor slot_pos, int64_t pos, int64_t path) {
  auto it = g_plans.find(id);
  TORCH_CHECK(it != g_plans.end(), "decode_step: no such plan");
  const DPlan& P = *it->second;  // alive while the caller's Plan object is: free only from its __del__
  pybind11::gil_scoped_release no_gil;  // other Python threads (the server's event loop) run meanwhile
  const int64_t n = static_cast<int64_t>(P.layers.size()), hid = P.hidden, H = P.H, KV = P.KV, D = P.D, F = P.inter;
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.numel() == hid, "decode_step: x");
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == n && static_cast<int64_t>(values.size()) == n, "decode_step: caches");
  for (const auto& r : rope) TORCH_CHECK(r.scalar_type() == torch::kFloat32 && r.is_contiguous() && r.numel() >= (pos + 1) * D, "decode_step: rope tables");
  TORCH_CHECK(slot_pos.numel() == 0 || (slot_pos.scalar_type() == torch::kLong && slot_pos.is_contiguous()), "decode_step: slot_pos");
  const int64_t nq = (H + 2 * KV) * D;
  auto xn_t = torch::empty({1, std::max(hid, H * D)}, torch::kFloat32);
  auto buf_t = torch::empty({std::max(nq, 2 * F)}, torch::kFloat32);
  auto act_t = torch::empty({1, F}, torch::kFloat32);
  auto out_t = torch::empty({hid}, torch::kFloat32);
  float* xp = x.data_ptr<float>(); float* xn = xn_t.data_ptr<float>(); float* buf = buf_t.data_ptr<float>();
  float* ap = act_t.data_ptr<float>(); float* op = out_t.data_ptr<float>();
  torch::Tensor xn_h = xn_t.narrow(1, 0, hid), attn_t = xn_t.narrow(1, 0, H * D);
  const int64_t* sp = slot_pos.numel() ? slot_pos.data_ptr<int64_t>() : nullptr;
  for (int64_t l = 0; l < n; ++l) {
    const DLayer& L = P.layers[l];
    rmsnorm(xp, L.in_norm.data_ptr<float>(), P.offset, hid, P.eps, xn);
    dlins(L.qkv, xn_h, buf, path);
    float* q = buf; float* k = buf + H * D; float* v = k + KV * D;
    if (P.qk_norm) {
      const float* qw = L.q_norm.data_ptr<float>(); const float* kw = L.k_norm.data_ptr<float>();
      for (int64_t h = 0; h < H; ++h) rmsnorm(q + h * D, qw, P.offset, D, P.eps, q + h * D);
      for (int64_t h = 0; h < KV; ++h) rmsnorm(k + h * D, kw, P.offset, D, P.eps, k + h * D);
    }
    {  // RoPE: out[i] = x[i] * cos[i] + x[partner(i)] * sin[i], partner the other half
      const float* c = rope[2 * L.rope].data_ptr<float>() + pos * D; const float* s = rope[2 * L.rope + 1].data_ptr<float>() + pos * D;
      const int64_t half = D / 2;
      float tmp[1024];
      TORCH_CHECK(D <= 1024, "decode_step: head_dim");
      for (int64_t h = 0; h < H + KV; ++h) {
        float* e = q + h * D;  // k follows q
        for (int64_t i = 0; i < D; ++i) tmp[i] = e[i] * c[i] + e[i < half ? i + half : i - half] * s[i];
        std::memcpy(e, tmp, D * sizeof(float));
      }
    }
    const torch::Tensor& ck = keys[l]; const torch::Tensor& cv = values[l];
    TORCH_CHECK((ck.scalar_type() == torch::kFloat32 || ck.scalar_type() == torch::kBFloat16) && cv.scalar_type() == ck.scalar_type()
                && ck.is_contiguous() && cv.is_contiguous() && ck.size(1) == KV && ck.size(3) == D, "decode_step: cache layout");
    const int64_t S = ck.size(2);
    const int64_t slot = L.window ? pos % S : pos;
    TORCH_CHECK(slot < S && (!L.window || sp), "decode_step: the cache is full");
    const int64_t len = L.window ? std::min(pos + 1, S) : pos + 1;
    float* attn = xn;  // (H * D): q, k, v stay in buf
    if (ck.scalar_type() == torch::kFloat32)
      attend(ck.data_ptr<float>(), cv.data_ptr<float>(), q, k, v, attn, S, slot, len, L.window, sp, pos, H, KV, D, P.scale);
    else
      attend(reinterpret_cast<c10::BFloat16*>(ck.data_ptr()), reinterpret_cast<c10::BFloat16*>(cv.data_ptr()), q, k, v, attn, S,
             slot, len, L.window, sp, pos, H, KV, D, P.scale);
    dlin(L.o, attn_t, op, path);
    if (P.sandwich) {
      rmsnorm(op, L.post_attn_norm.data_ptr<float>(), P.offset, hid, P.eps, op);
      for (int64_t i = 0; i < hid; ++i) xp[i] += op[i];
      rmsnorm(xp, L.pre_ff_norm.data_ptr<float>(), P.offset, hid, P.eps, xn);
    } else {
      for (int64_t i = 0; i < hid; ++i) xp[i] += op[i];
      rmsnorm(xp, L.post_attn_norm.data_ptr<float>(), P.offset, hid, P.eps, xn);
    }
    dlins(L.gate_up, xn_h, buf, path);
    for (int64_t i = 0; i < F; ++i) ap[i] = act_fn(buf[i], P.act) * buf[F + i];
    dlin(L.down, act_t, op, path);
    if (P.sandwich) rmsnorm(op, L.post_ff_norm.data_ptr<float>(), P.offset, hid, P.eps, op);
    for (int64_t i = 0; i < hid; ++i) xp[i] += op[i];
  }
  return x;
}
