// Dense fp32 / bf16 weights times fp32 activations (dense_linear).

// How dense rows are read: 4 = four rows at a time with software prefetch (fastest measured on the Xeons
// seen here), 1 = one row at a time front to back (fastest on AMD's Zen 4, where interleaved rows and
// software prefetch halve the bandwidth). The CPU's vendor picks it; dense_rows_mode(n) sets it (tests).
static int detect_dense_rows() {
#if defined(__x86_64__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
  return (b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u) ? 1 : 4;  // "AuthenticAMD"
#else
  return 4;
#endif
}
static int g_dense_rows = detect_dense_rows();
// The current mode; n = 1 or 4 sets it, anything else only reads it.
int64_t dense_rows_mode(int64_t n) {
  int64_t old = g_dense_rows;
  if (n == 1 || n == 4) g_dense_rows = static_cast<int>(n);
  return old;
}

// ---- dense fp32 or bf16 weights times fp32 activations (the fused decode step's kinds 0 and 5) -------------
// Each bf16 is widened exactly to fp32 (the top half of its bits); fp32 products and sums, the activations not
// rounded — except on the AVX-512 path of a CPU with AVX512-BF16, where bf16 weights meet activations rounded
// to bf16 in vdpbf16ps (below). Four rows at a time share the activations' loads and run four independent chains, and the next
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
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
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
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
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
// One row front to back, four accumulators (see dense_row_dp4).
template <typename S, typename T>
static float dense_row4(const T* w, const float* x, int64_t cols) {
  typename S::V a0 = S::zero(), a1 = S::zero(), a2 = S::zero(), a3 = S::zero();
  int64_t j = 0;
  for (; j + 4 * S::W <= cols; j += 4 * S::W) {
    a0 = S::fma(S::w(w + j), S::x(x + j), a0);
    a1 = S::fma(S::w(w + j + S::W), S::x(x + j + S::W), a1);
    a2 = S::fma(S::w(w + j + 2 * S::W), S::x(x + j + 2 * S::W), a2);
    a3 = S::fma(S::w(w + j + 3 * S::W), S::x(x + j + 3 * S::W), a3);
  }
  for (; j + S::W <= cols; j += S::W) a0 = S::fma(S::w(w + j), S::x(x + j), a0);
  float t = S::sum(S::add(S::add(a0, a1), S::add(a2, a3)));
  for (; j < cols; ++j) t += ld(w, j) * x[j];
  return t;
}
#endif

#if defined(LLMCTL_AVX512) && defined(__AVX512BF16__)
#define LLMCTL_AVX512_BF16 1
// bf16 weights on a CPU with AVX512-BF16: the activations rounded to bf16 once (to nearest even, as a bf16
// model's own matmuls take them), then vdpbf16ps multiplies 32 pairs and adds them into 16 fp32 sums in one
// instruction, where widening takes three a 16 values.
static void dense_rows4_dp(const c10::BFloat16* w, int64_t stride, const c10::BFloat16* x, int64_t cols, float* y) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= cols; j += 32) {
    prefetch_rows(w + 8 * stride, stride, j);  // rows 12-15: measured a little faster than 4-7 here (not for fp32)
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + j);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + j), xv);
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + stride + j), xv);
    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + 2 * stride + j), xv);
    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + 3 * stride + j), xv);
  }
  y[0] = _mm512_reduce_add_ps(a0); y[1] = _mm512_reduce_add_ps(a1); y[2] = _mm512_reduce_add_ps(a2); y[3] = _mm512_reduce_add_ps(a3);
  for (; j < cols; ++j)
    for (int t = 0; t < 4; ++t) y[t] += ld(w + t * stride, j) * ld(x, j);
}
static float dense_row_dp(const c10::BFloat16* w, const c10::BFloat16* x, int64_t cols) {
  __m512 a = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= cols; j += 32) a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(w + j), (__m512bh)_mm512_loadu_si512(x + j));
  float t = _mm512_reduce_add_ps(a);
  for (; j < cols; ++j) t += ld(w, j) * ld(x, j);
  return t;
}
// One row at a time, read front to back (four accumulators, no software prefetch): on AMD's Zen 4 the
// hardware prefetcher follows one linear stream at full speed but not four interleaved rows, and software
// prefetch slows it (measured on Gemma's 262144x640 head: see dense_rows_mode).
static float dense_row_dp4(const c10::BFloat16* w, const c10::BFloat16* x, int64_t cols) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 128 <= cols; j += 128) {
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + j), (__m512bh)_mm512_loadu_si512(x + j));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + j + 32), (__m512bh)_mm512_loadu_si512(x + j + 32));
    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + j + 64), (__m512bh)_mm512_loadu_si512(x + j + 64));
    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + j + 96), (__m512bh)_mm512_loadu_si512(x + j + 96));
  }
  for (; j + 32 <= cols; j += 32) a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + j), (__m512bh)_mm512_loadu_si512(x + j));
  float t = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; j < cols; ++j) t += ld(w, j) * ld(x, j);
  return t;
}
static void to_bf16(const float* x, c10::BFloat16* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
  for (; i < n; ++i) out[i] = c10::BFloat16(x[i]);
}
#endif

// Rows [r0, r1) of y = w x for one activation row, on the calling thread.
template <typename T>
static void dense_range(const T* wp, const float* xi, float* yi, int64_t r0, int64_t r1, int64_t cols, int isa) {
  int64_t r = r0;
#if defined(LLMCTL_AVX512_BF16)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (isa == ISA_AVX512) {
      thread_local std::vector<c10::BFloat16> xb;
      xb.resize(cols);
      to_bf16(xi, xb.data(), cols);
      if (g_dense_rows == 1)
        for (; r < r1; ++r) yi[r] = dense_row_dp4(wp + r * cols, xb.data(), cols);
      for (; r + 4 <= r1; r += 4) dense_rows4_dp(wp + r * cols, cols, xb.data(), cols, yi + r);
      for (; r < r1; ++r) yi[r] = dense_row_dp(wp + r * cols, xb.data(), cols);
      return;
    }
  }
#endif
#if defined(LLMCTL_AVX512)
  if (isa == ISA_AVX512 && g_dense_rows == 1) for (; r < r1; ++r) yi[r] = dense_row4<Avx512F>(wp + r * cols, xi, cols);
  if (isa == ISA_AVX512) for (; r + 4 <= r1; r += 4) dense_rows4<Avx512F>(wp + r * cols, cols, xi, cols, yi + r);
#endif
#if defined(LLMCTL_AVX2)
  if (isa == ISA_AVX2 && g_dense_rows == 1) for (; r < r1; ++r) yi[r] = dense_row4<Avx2F>(wp + r * cols, xi, cols);
  if (isa == ISA_AVX2) for (; r + 4 <= r1; r += 4) dense_rows4<Avx2F>(wp + r * cols, cols, xi, cols, yi + r);
#endif
  for (; r < r1; ++r) yi[r] = dense_row_scalar(wp + r * cols, xi, cols);
}

template <typename T>
static void dense_impl(const T* wp, const float* xp, float* yp, int64_t n, int64_t rows, int64_t cols, int isa) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = 0; i < n; ++i) dense_range(wp, xp + i * cols, yp + i * rows, r0, r1, cols, isa);
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
