// GPTQ's column sweep (llmctl.quantize.gptq): a run of columns of one lazy block, every row on its own.
//
// Exactly the eager sweep's fp32 operations, each rounded on its own: q = clamp(round(w / s) + z),
// e = (w - (q - z) * s) / U[i, i], then w[j] - U[i, j] * e for the block's later columns. Contracting a
// product and a sum into one fused multiply-add (GCC's default with -mfma) would round once where torch
// rounds twice, so this part is compiled without contraction.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

// One row r: columns [a, b) of the block [i1, i2). w: the row (cols values, updated in place); u: U (cols, cols);
// s, z: scales and zero-points (groups, rows); group: each column's group; codes: the row's codes;
// err: (i2 - i1, rows), the block's scaled errors by column, as the block's matrix product reads them.
static void gptq_row(float* __restrict w, const float* __restrict u, const float* s, const float* z,
                     const int64_t* group, int8_t* __restrict codes, float* __restrict err, int64_t r, int64_t rows,
                     int64_t cols, int64_t i1, int64_t i2, int64_t a, int64_t b, float qmin, float qmax) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  for (int64_t i = a; i < b; ++i) {
    const int64_t k = group[i];
    const float sv = s[k * rows + r], zv = z[k * rows + r];
    const float x = w[i];
    float q = round_even(x / sv) + zv;
    q = q < qmin ? qmin : (q > qmax ? qmax : q);
    codes[i] = static_cast<int8_t>(q);
    const float e = (x - (q - zv) * sv) / u[i * cols + i];
    err[(i - i1) * rows + r] = e;
    const float* ui = u + i * cols;
    for (int64_t j = i + 1; j < i2; ++j) w[j] = w[j] - ui[j] * e;  // the rank-1 update, vectorized over j
  }
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
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      gptq_row(wp + r * cols, up, sp, zp, gp, cp + r * cols, ep, r, rows, cols, i1, i2, a, b, qmin, qmax);
  });
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
