// int8 weights times int8 activations (int8_linear).

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
