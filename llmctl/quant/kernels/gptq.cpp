// GPTQ's column sweep (llmctl.quantize.gptq): a run of columns of one lazy block, the rows independent.
//
// Exactly the eager sweep's fp32 operations, each rounded on its own: q = clamp(round(w / s) + z),
// e = (w - (q - z) * s) / U[i, i], then w[j] - U[i, j] * e for the block's later columns. Contracting a
// product and a sum into one fused multiply-add (GCC's default with -mfma) would round once where torch
// rounds twice, so this part is compiled without contraction.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

// Rows go through the sweep GPTQ_TILE at a time, held by column, (i2 - a, GPTQ_TILE): a column's codes and errors
// are one vector operation each, and each U[i, j] is read once for the tile's rows (one row at a time, the
// chain of a column's divisions and roundings was most of the time).
static constexpr int GPTQ_TILE = 8;
// The tile's rows as one value of GCC's (and clang's) generic vectors: one AVX register, two SSE ones, or
// scalars, whatever the target (left to itself the compiler vectorized the update along the columns instead).
typedef float gptq_rows __attribute__((vector_size(GPTQ_TILE * sizeof(float))));

// Rows [r0, r0 + nr) (nr <= GPTQ_TILE): columns [a, b) of the block [i1, i2). w: (rows, cols), updated in place;
// u: U (cols, cols); s, z: scales and zero-points (groups, rows); group: each column's group; codes: (rows, cols);
// err: (i2 - i1, rows), the block's scaled errors by column, as the block's matrix product reads them;
// t: room for (i2 - a) * GPTQ_TILE floats.
static void gptq_tile(float* __restrict w, const float* __restrict u, const float* s, const float* z,
                      const int64_t* group, int8_t* __restrict codes, float* __restrict err, float* __restrict t,
                      int64_t r0, int64_t nr, int64_t rows, int64_t cols, int64_t i1, int64_t i2, int64_t a,
                      int64_t b, float qmin, float qmax) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  constexpr int T = GPTQ_TILE;
  const int64_t n = i2 - a;
  for (int64_t j = 0; j < n; ++j)  // rows past the last are zeros with scale 1: computed, never stored
    for (int q = 0; q < T; ++q) t[j * T + q] = q < nr ? w[(r0 + q) * cols + a + j] : 0.f;
  for (int64_t i = a; i < b; ++i) {
    const int64_t k = group[i];
    float sv[T], zv[T], qv[T], e[T];
    for (int q = 0; q < T; ++q) {
      sv[q] = q < nr ? s[k * rows + r0 + q] : 1.f;
      zv[q] = q < nr ? z[k * rows + r0 + q] : 0.f;
    }
    const float d = u[i * cols + i];
    const float* x = t + (i - a) * T;
    for (int q = 0; q < T; ++q) {
      float v = round_even(x[q] / sv[q]) + zv[q];
      v = v < qmin ? qmin : (v > qmax ? qmax : v);
      qv[q] = v;
      e[q] = (x[q] - (v - zv[q]) * sv[q]) / d;
    }
    for (int q = 0; q < nr; ++q) {
      codes[(r0 + q) * cols + i] = static_cast<int8_t>(qv[q]);
      err[(i - i1) * rows + r0 + q] = e[q];
    }
    const float* ui = u + i * cols;
    gptq_rows ev;
    std::memcpy(&ev, e, sizeof ev);
    for (int64_t j = i + 1; j < i2; ++j) {  // the rank-1 update, a vector of the tile's rows per column
      gptq_rows y;
      std::memcpy(&y, t + (j - a) * T, sizeof y);
      y = y - ui[j] * ev;
      std::memcpy(t + (j - a) * T, &y, sizeof y);
    }
  }
  for (int64_t j = 0; j < n; ++j)  // each column as it was quantized, and the block's later ones as updated
    for (int q = 0; q < nr; ++q) w[(r0 + q) * cols + a + j] = t[j * T + q];
}

// w (rows, cols) fp32, updated in place; u (cols, cols) fp32; s, z (groups, rows) fp32; group (cols,) int64;
// codes (rows, cols) int8 and err (i2 - i1, rows) fp32 written; columns [a, b) inside the block [i1, i2).
void gptq_sweep(torch::Tensor w, torch::Tensor u, torch::Tensor s, torch::Tensor z, torch::Tensor group,
                torch::Tensor codes, torch::Tensor err, int64_t i1, int64_t i2, int64_t a, int64_t b, int64_t bits) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.is_contiguous(), "gptq_sweep: w must be contiguous fp32 (rows, cols)");
  const int64_t rows = w.size(0), cols = w.size(1);
  TORCH_CHECK(u.scalar_type() == torch::kFloat32 && u.is_contiguous() && u.numel() == cols * cols, "gptq_sweep: u must be contiguous fp32 (cols, cols)");
  TORCH_CHECK(s.scalar_type() == torch::kFloat32 && z.scalar_type() == torch::kFloat32 && s.is_contiguous() && z.is_contiguous()
              && s.numel() == z.numel() && s.numel() % std::max<int64_t>(rows, 1) == 0, "gptq_sweep: s and z must be contiguous fp32 (groups, rows)");
  TORCH_CHECK(group.scalar_type() == torch::kInt64 && group.is_contiguous() && group.numel() == cols, "gptq_sweep: group must be contiguous int64 (cols,)");
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && codes.is_contiguous() && codes.numel() == rows * cols, "gptq_sweep: codes must be contiguous int8 (rows, cols)");
  TORCH_CHECK(0 <= i1 && i1 <= a && a <= b && b <= i2 && i2 <= cols, "gptq_sweep: columns out of range");
  TORCH_CHECK(err.scalar_type() == torch::kFloat32 && err.is_contiguous() && err.numel() == (i2 - i1) * rows, "gptq_sweep: err must be contiguous fp32 (i2 - i1, rows)");
  const int64_t ng = rows > 0 ? s.numel() / rows : 0;
  const int64_t* gp = group.data_ptr<int64_t>();
  for (int64_t i = a; i < b; ++i) TORCH_CHECK(0 <= gp[i] && gp[i] < ng, "gptq_sweep: a column's group is out of range");
  float* wp = w.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  int8_t* cp = codes.data_ptr<int8_t>();
  float* ep = err.data_ptr<float>();
  const float qmin = static_cast<float>(-(1 << (bits - 1))), qmax = static_cast<float>((1 << (bits - 1)) - 1);
  const int64_t tiles = (rows + GPTQ_TILE - 1) / GPTQ_TILE;
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf((i2 - a) * GPTQ_TILE);
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t r0 = tile * GPTQ_TILE;
      gptq_tile(wp, up, sp, zp, gp, cp, ep, buf.data(), r0, std::min<int64_t>(GPTQ_TILE, rows - r0), rows, cols, i1, i2,
                a, b, qmin, qmax);
    }
  });
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
