// Dense fp32 / bf16 weights times fp32 activations (dense_linear).

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
