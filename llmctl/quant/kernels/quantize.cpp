// Quantizing: NF4 (bitsandbytes' bytes) and the int formats' scale search (llmctl.quant.search), pack4.

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

// From here to int_group's packing, every fp32 operation rounds on its own, as torch's do: a product fused
// into the sum after it (GCC's default with -mfma; clang's within an expression) rounds once, and the search
// then ranked some candidates differently from the eager code (~1 % of groups of bf16 weights, whose
// quotients often land within an fp32 rounding of a half).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
// Round half to even in the default rounding mode without a libm call (which stops vectorization): adding
// and subtracting 1.5 * 2^23 leaves the integer part. Exact for |v| < 2^22; larger values come out still
// beyond any 8-bit code and are clamped right after, as are infinities.
static inline float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

// Weighted squared reconstruction error of a group (fp32 values v, weights w) at scale s and zero-point zf
// (0: symmetric). The search only ranks candidates, so it multiplies by 1/s (the eager code does the same);
// the stored codes are computed with a division, as round-to-nearest does.
static inline float group_err(const float* v, const float* w, int64_t g, float s, float zf, float qmin, float qmax) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
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

// group_err with calibration weights (E[x^2] per input: a few columns can outweigh the rest of a group by
// decades, and an fp32 sum then cannot tell candidates apart that differ in the others): in float64. r * s is
// exact there, so is r * s - v, and the eager code's sums (llmctl.quant.int_formats, error) differ from these
// only in their order, by ~1e-16.
static inline double group_err64(const float* v, const float* w, int64_t g, float s, float zf, float qmin, float qmax) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const float inv = 1.0f / s;
  const float lo = qmin - zf, hi = qmax - zf;
  double a[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= g; i += 4)
    for (int t = 0; t < 4; ++t) {
      float r = round_even(v[i + t] * inv);
      r = r < lo ? lo : (r > hi ? hi : r);
      double d = static_cast<double>(r) * s - v[i + t];
      a[t] += d * d * w[i + t];
    }
  double e = (a[0] + a[1]) + (a[2] + a[3]);
  for (; i < g; ++i) {
    float r = round_even(v[i] * inv);
    r = r < lo ? lo : (r > hi ? hi : r);
    double d = static_cast<double>(r) * s - v[i];
    e += d * d * w[i];
  }
  return e;
}

// The least-squares scale of the codes scale s gives a symmetric group, sum w*v*q / sum w*q^2 (0 when the
// codes are all 0; the eager code: llmctl.quant.int_formats, refit). w*q is rounded to fp32, its products with
// v and q are exact in float64 and every term is >= 0 (q has v's sign), so the float64 sums carry no error
// an order of summation could show once rounded to fp32: the eager code's sums, in its own order, give the
// same scale.
static inline float ls_scale(const float* v, const float* w, int64_t g, float s, float qmin, float qmax) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const float inv = 1.0f / s;
  double num = 0., den = 0.;
  int64_t i = 0;
  if (g % 8 == 0) {  // eight running sums of each, so the compiler may vectorize (as group_err)
    double a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (; i < g; i += 8)
      for (int t = 0; t < 8; ++t) {
        float r = round_even(v[i + t] * inv);
        r = r < qmin ? qmin : (r > qmax ? qmax : r);
        double wr = w[i + t] * r;
        a[t] += wr * v[i + t];
        b[t] += wr * r;
      }
    num = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    den = ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7]));
  }
  for (; i < g; ++i) {
    float r = round_even(v[i] * inv);
    r = r < qmin ? qmin : (r > qmax ? qmax : r);
    double wr = w[i] * r;
    num += wr * v[i];
    den += wr * r;
  }
  return static_cast<float>(num / std::max(den, 1.1754943508222875e-38));
}

// |v| rounded up to fp16, with the sign of a negative scale
static inline c10::Half signed_half(float v, bool negative) {
  c10::Half h = round_up_half(std::fabs(v));
  if (negative) h.x |= 0x8000;
  return h;
}

// steps > 1: the scale search (llmctl.quant.search.SEARCH_*), keeping the candidate with the smallest squared
// error (round to nearest on ties): asymmetric, [lo, hi] shrunk by 1 - j * delta for j < steps; symmetric, the
// largest-magnitude value sent to qmin at 1 + (widen - j) * delta of it, then least-squares refits. The errors
// are weighed by imp[column] (cols values: the calibration statistics) when given, else rms(group) + |x|.
template <typename T>
static void int_impl(const T* x, int64_t rows, int64_t cols, int64_t g, int bits, bool asym,
                     int8_t* q, c10::Half* scale, int8_t* zp, uint8_t* nibbles, int64_t steps, double delta,
                     int64_t widen, int64_t refits, const float* imp) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  // nibbles (4 bits, even g): the codes go straight into pack4's bytes through a per-thread buffer
  const int qmin = -(1 << (bits - 1)), qmax = (1 << (bits - 1)) - 1;
  const float tiny = 1.1754943508222875e-38f;
  int64_t ng = cols / g;
  at::parallel_for(0, rows * ng, 16, [&](int64_t a, int64_t z) {
    std::vector<int8_t> buf(nibbles ? g : 0);
    std::vector<float> vf(steps > 1 ? g : 0), wf(steps > 1 ? g : 0);  // the group as fp32, its error weights
    const float fmin = static_cast<float>(qmin), fmax = static_cast<float>(qmax);
    auto error = [&](float s, float zf) -> double {  // float to double keeps the uncalibrated order exactly
      return imp ? group_err64(vf.data(), wf.data(), g, s, zf, fmin, fmax) : group_err(vf.data(), wf.data(), g, s, zf, fmin, fmax);
    };
    for (int64_t k = a; k < z; ++k) {
      const T* xs = x + (k / ng) * cols + (k % ng) * g;
      if (steps > 1 && imp) {
        const float* ik = imp + (k % ng) * g;
        for (int64_t i = 0; i < g; ++i) { vf[i] = ld(xs, i); wf[i] = ik[i]; }
      } else if (steps > 1) {  // llama.cpp's K-quant error weights: rms of the group + |x|
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
          double best = error(s, zf);
          for (int64_t j = 1; j < steps; ++j) {
            float alpha = static_cast<float>(1.0 - j * delta);
            float lj = lo * alpha, hj = hi * alpha;
            c10::Half h = round_up_half((hj - lj) / static_cast<float>(qmax - qmin));
            float sj = std::max(static_cast<float>(h), tiny);
            float zj = static_cast<float>(qmin) - std::nearbyint(lj / sj);
            zj = zj < qmin ? qmin : (zj > qmax ? qmax : zj);
            double e = error(sj, zj);
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
          double best = error(s, 0.f);
          bool flip = false;  // the first largest-magnitude value is positive: the candidates' scales are negative
          for (int64_t i = 0; i < g; ++i)
            if (abs_bits(vf[i]) == top) { flip = !std::signbit(vf[i]); break; }
          for (int64_t j = 0; j < steps; ++j) {
            float alpha = static_cast<float>(1.0 + (widen - j) * delta);
            c10::Half h = signed_half(am * alpha / -fmin, flip);
            float sj = std::max(std::fabs(static_cast<float>(h)), tiny);
            sj = flip ? -sj : sj;
            double e = error(sj, 0.f);
            if (e < best) { best = e; sh = h; s = sj; }
          }
          for (int64_t r = 0; r < refits; ++r) {  // the winner's least-squares scale, kept when it is better
            float ls = ls_scale(vf.data(), wf.data(), g, s, fmin, fmax);
            if (!(ls != 0.f && (ls > 0.f) == (s > 0.f))) break;
            bool negative = s < 0.f;
            c10::Half h = signed_half(ls, negative);
            float sj = std::max(std::fabs(static_cast<float>(h)), tiny);
            sj = negative ? -sj : sj;
            double e = error(sj, 0.f);
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

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

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
// importance: the error weights per column (cols fp32 values), or an empty tensor for rms(group) + |x|.
std::vector<torch::Tensor> int_group(torch::Tensor x, int64_t g, int64_t bits, bool asym, int64_t steps, double delta,
                                     int64_t widen, int64_t refits, torch::Tensor importance) {
  x = x.contiguous();
  int64_t rows = x.size(0), cols = x.size(1);
  importance = importance.to(torch::kFloat32).contiguous();
  TORCH_CHECK(importance.numel() == 0 || importance.numel() == cols, "int_group: importance must have one value per column");
  const float* ip = importance.numel() ? importance.data_ptr<float>() : nullptr;
  bool inline_pack = bits == 4 && g % 2 == 0;
  auto q = torch::empty({inline_pack ? 0 : rows, cols}, torch::kInt8);
  auto packed = torch::empty({inline_pack ? rows : 0, cols / 2}, torch::kUInt8);
  auto scale = torch::empty({rows, cols / g}, torch::kHalf);
  auto zp = torch::empty({asym ? rows : 0, cols / g}, torch::kInt8);
  auto qp = q.data_ptr<int8_t>(); auto sp = reinterpret_cast<c10::Half*>(scale.data_ptr()); auto zpp = zp.data_ptr<int8_t>();
  uint8_t* np = inline_pack ? packed.data_ptr<uint8_t>() : nullptr;
  int b = static_cast<int>(bits);
  if (x.scalar_type() == torch::kBFloat16) int_impl(reinterpret_cast<const c10::BFloat16*>(x.data_ptr()), rows, cols, g, b, asym, qp, sp, zpp, np, steps, delta, widen, refits, ip);
  else if (x.scalar_type() == torch::kHalf) int_impl(reinterpret_cast<const c10::Half*>(x.data_ptr()), rows, cols, g, b, asym, qp, sp, zpp, np, steps, delta, widen, refits, ip);
  else { auto xf = x.to(torch::kFloat32); int_impl(xf.data_ptr<float>(), rows, cols, g, b, asym, qp, sp, zpp, np, steps, delta, widen, refits, ip); }
  if (bits == 4) {
    q = inline_pack ? packed : pack4(q, rows, cols);
    if (asym) zp = pack4(zp, 1, zp.numel()).reshape(-1);
  }
  return std::vector<torch::Tensor>{q, scale, zp};
}
