// fp8 weights times fp32 activations (fp8_linear), and the table path NF4 shares.

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
