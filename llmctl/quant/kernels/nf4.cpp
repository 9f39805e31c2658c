// NF4 weights times int8 activations (nf4_linear): 16-bit integer dot products.

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
