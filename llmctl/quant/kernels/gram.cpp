
// ---- Σ xxᵀ of bf16 inputs in fp32 (GPTQ's Hessian; llmctl.quantize.calibrate) ------------------------------
// gram (cols, cols) fp32 += xᵀ x for x (n, cols) bf16, the upper triangle (tiles on or above the diagonal; the
// caller mirrors it). vdpbf16ps multiplies pairs of bf16 exactly and adds them into fp32 sums, so this is the
// fp32 sum of exact products, as oneDNN's bf16 GEMM with fp32 output gives; on a CPU without AMX, where
// oneDNN's fp32-from-bf16 path ran at ~half the bf16 peak, it is what reaches it.
//
// x is first laid out in pairs of rows (tokens), by blocks of 16 columns: q[cb][p][c][2] = x[2p][16cb + c],
// x[2p + 1][16cb + c] (zero-padded to an even row count and to whole blocks of columns). A tile of 4 rows ×
// 64 columns of gram keeps 16 accumulators (4 × 4 vectors of 16 fp32) over every pair p: 4 loads of the
// columns' pairs, 4 broadcasts of the rows' pairs, 16 vdpbf16ps.
#if defined(LLMCTL_AVX512_BF16)
static const int GRAM_MR = 4;   // rows of gram a tile
static const int GRAM_NB = 4;   // blocks of 16 columns a tile

static void gram_pack(const uint16_t* x, int64_t n, int64_t cols, int64_t blocks, uint16_t* q) {
  const int64_t pairs = (n + 1) / 2;
  alignas(64) static const uint16_t idx_lo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx = _mm512_load_si512(idx_lo);
  at::parallel_for(0, pairs, 64, [&](int64_t p0, int64_t p1) {
    std::vector<uint16_t> a(blocks * 16, 0), b(blocks * 16, 0);
    for (int64_t p = p0; p < p1; ++p) {
      std::memcpy(a.data(), x + 2 * p * cols, cols * 2);
      if (2 * p + 1 < n) std::memcpy(b.data(), x + (2 * p + 1) * cols, cols * 2);
      else std::fill(b.begin(), b.end(), 0);
      for (int64_t cb = 0; cb < blocks; ++cb) {
        __m512i va = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.data() + 16 * cb)));
        __m512i vb = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.data() + 16 * cb)));
        _mm512_storeu_si512(q + (cb * pairs + p) * 32, _mm512_permutex2var_epi16(va, idx, vb));
      }
    }
  });
}

// gram[r0 .. r0 + 4) × [16 cb0 .. 16 (cb0 + nb)) += the products over every pair, in chunks of GRAM_KC pairs
// each summed from zero and then added to gram: the fp32 sums' rounding grows with a chunk's length plus the
// number of chunks, not with every row (a sequential sum over 4096 rows erred 2-3x more).
static const int64_t GRAM_KC = 128;
static void gram_tile(const uint16_t* q, int64_t pairs, int64_t r0, int64_t cb0, int nb, float* gram, int64_t cols) {
  const int64_t rb = r0 / 16, ro = r0 % 16;
  const uint32_t* a = reinterpret_cast<const uint32_t*>(q + rb * pairs * 32) + ro;  // row r's pair: a[p * 16 + r]
  const uint16_t* b[GRAM_NB];
  for (int k = 0; k < GRAM_NB; ++k) b[k] = q + (cb0 + std::min(k, nb - 1)) * pairs * 32;
  for (int64_t p0 = 0; p0 < pairs; p0 += GRAM_KC) {
    __m512 acc[GRAM_MR][GRAM_NB];
    for (int r = 0; r < GRAM_MR; ++r)
      for (int k = 0; k < GRAM_NB; ++k) acc[r][k] = _mm512_setzero_ps();
    const int64_t p1 = std::min(pairs, p0 + GRAM_KC);
    for (int64_t p = p0; p < p1; ++p) {
      __m512bh bv[GRAM_NB];
      for (int k = 0; k < GRAM_NB; ++k) bv[k] = (__m512bh)_mm512_loadu_si512(b[k] + p * 32);
      for (int r = 0; r < GRAM_MR; ++r) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[p * 16 + r]));
        for (int k = 0; k < GRAM_NB; ++k) acc[r][k] = _mm512_dpbf16_ps(acc[r][k], av, bv[k]);
      }
    }
    for (int r = 0; r < GRAM_MR; ++r) {
      if (r0 + r >= cols) break;
      float* row = gram + (r0 + r) * cols;
      for (int k = 0; k < nb; ++k) {
        const int64_t c = 16 * (cb0 + k);
        const __mmask16 m = c + 16 <= cols ? (__mmask16)0xffff : (__mmask16)((1u << (cols - c)) - 1);
        _mm512_mask_storeu_ps(row + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, row + c), acc[r][k]));
      }
    }
  }
}
#endif

bool gram_bf16_available() {
#if defined(LLMCTL_AVX512_BF16)
  return true;
#else
  return false;
#endif
}

// gram (cols, cols) fp32 contiguous += xᵀ x on and above the diagonal (by tiles: some entries just below it
// too); x (n, cols) bf16 contiguous.
void gram_bf16(torch::Tensor x, torch::Tensor gram) {
  TORCH_CHECK(x.is_cpu() && gram.is_cpu(), "gram_bf16 runs on CPU tensors");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "gram_bf16: x is a contiguous (n, cols) bf16 matrix");
  const int64_t n = x.size(0), cols = x.size(1);
  TORCH_CHECK(gram.scalar_type() == torch::kFloat32 && gram.is_contiguous() && gram.dim() == 2 && gram.size(0) == cols && gram.size(1) == cols,
              "gram_bf16: gram is a contiguous (cols, cols) fp32 matrix");
#if defined(LLMCTL_AVX512_BF16)
  if (n == 0 || cols == 0) return;
  const int64_t blocks = (cols + 15) / 16, pairs = (n + 1) / 2;
  std::vector<uint16_t> q(blocks * pairs * 32);
  gram_pack(reinterpret_cast<const uint16_t*>(x.data_ptr()), n, cols, blocks, q.data());
  // tiles (row group of 4, panel of GRAM_NB column blocks) on or above the diagonal, the widest rows first
  const int64_t panels = (blocks + GRAM_NB - 1) / GRAM_NB;
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (first row, panel)
  for (int64_t pn = panels - 1; pn >= 0; --pn)
    for (int64_t r0 = 0; r0 < std::min<int64_t>(cols, 16 * GRAM_NB * (pn + 1)); r0 += GRAM_MR) tiles.emplace_back(r0, pn);
  float* g = gram.data_ptr<float>();
  const int64_t count = static_cast<int64_t>(tiles.size());
#pragma omp parallel for schedule(dynamic, 8) num_threads(at::get_num_threads())
  for (int64_t t = 0; t < count; ++t) {
    const int64_t pn = tiles[t].second;
    const int nb = static_cast<int>(std::min<int64_t>(GRAM_NB, blocks - pn * GRAM_NB));
    gram_tile(q.data(), pairs, tiles[t].first, pn * GRAM_NB, nb, g, cols);
  }
#else
  TORCH_CHECK(false, "gram_bf16: this build has no AVX512-BF16 (check gram_bf16_available())");
#endif
}
