// int4 weights times int8 activations (int4_linear), and int4_dequant for prefill.

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
