// One decode step through every layer (decode_plan, decode_step, decode_free).

// ---- one decode step through every layer (one token, batch 1, fp32): llmctl.runtime.model's layer in C++ ----
// The Python model is the reference and the fallback; this runs the same operations without a torch call per
// operation: RMSNorm (optionally scaling by 1 + weight), the q/k/v projection (joined or in parts), q/k norms,
// RoPE from the runtime's tables, the KV-cache write, one query per head over the cache (GQA, sliding
// windows from the cache's slot positions), o_proj, the sandwich norms, gate/up, activation, down_proj.
// Linears: kind 0 a dense fp32 weight (dense_linear), 1 int4_linear's (packed, scale, zero),
// 2 int8_linear's (codes, scale), 3 fp8_linear's (codes as uint8, lut, scale), 4 nf4_linear's (packed as
// (rows, cols / 2), code, absmax: the blocks' size follows), 5 a dense bf16 weight (dense_linear); each with
// an optional fp32 bias. The hidden state stays fp32 between the linears; the KV cache is fp32 or bf16
// (rounded to nearest even as it is written, as a bf16 model's own cache holds it).
#include <memory>
#include <unordered_map>
#include <omp.h>

struct DLin { int64_t kind = -1; torch::Tensor a, b, c, bias; };
struct DLayer {
  torch::Tensor in_norm, post_attn_norm, pre_ff_norm, post_ff_norm, q_norm, k_norm;
  std::vector<DLin> qkv, gate_up; DLin o, down;
  int64_t window = 0, rope = 0;  // window 0: full attention; rope: which table pair
};
// What turns a token into the first layer's input and the last layer's output into logits (decode_tail):
// the embedding table (dense, the model's dtype) and its scale, the final norm and the output matrix.
struct DTail {
  torch::Tensor embed, norm;
  DLin head;
  float embed_scale = 0.f;  // 0: none; else rounded to the model's dtype as the Python model scales by it
  bool round_bf16 = false;  // a bf16 model: the scaled embedding rounded to bf16 as its Python layers hold it
  float norm_offset = 0.f;
};
struct DPlan {
  std::vector<DLayer> layers;
  std::unique_ptr<DTail> tail;  // set by decode_tail: decode_token may run
  int64_t hidden = 0, H = 0, KV = 0, D = 0, inter = 0, act = 0; bool sandwich = false, qk_norm = false;
  float offset = 0.f; double eps = 1e-6; float scale = 1.f;
  bool dense = true;  // every linear dense (kinds 0 and 5): the step may run as one parallel region
};
static std::unordered_map<int64_t, std::unique_ptr<DPlan>> g_plans;
static int64_t g_next_plan = 1;

static const int64_t DSLOTS = 34;  // tensors per layer in decode_plan's list

// ints: [hidden, H, KV, D, inter, act, sandwich, qk_norm, n_layers, offset] then per layer
// [window, rope, kind q0, kind q1, kind q2, kind o, kind g0, kind g1, kind down] (-1: absent);
// tensors per layer: 6 norms, then 7 linears of 4 (a, b, c, bias), empty tensors where absent.
int64_t decode_plan(std::vector<torch::Tensor> t, std::vector<int64_t> ints, std::vector<double> floats) {
  auto p = std::make_unique<DPlan>();
  p->hidden = ints[0]; p->H = ints[1]; p->KV = ints[2]; p->D = ints[3]; p->inter = ints[4]; p->act = ints[5];
  p->sandwich = ints[6] != 0; p->qk_norm = ints[7] != 0; int64_t n = ints[8]; p->offset = static_cast<float>(ints[9]);
  p->eps = floats[0]; p->scale = static_cast<float>(floats[1]);
  TORCH_CHECK(static_cast<int64_t>(t.size()) == n * DSLOTS && static_cast<int64_t>(ints.size()) == 10 + n * 9, "decode_plan: lists do not match");
  TORCH_CHECK(p->D % 2 == 0 && p->D <= 1024 && p->KV > 0 && p->H % p->KV == 0, "decode_plan: heads");
  for (int64_t l = 0; l < n; ++l) {
    const torch::Tensor* s = t.data() + l * DSLOTS; const int64_t* k = ints.data() + 10 + l * 9;
    DLayer L;
    L.window = k[0]; L.rope = k[1];
    L.in_norm = s[0]; L.post_attn_norm = s[1]; L.pre_ff_norm = s[2]; L.post_ff_norm = s[3]; L.q_norm = s[4]; L.k_norm = s[5];
    for (int j = 0; j < 7; ++j) {
      if (k[2 + j] < 0) continue;
      DLin lin; lin.kind = k[2 + j];
      lin.a = s[6 + 4 * j]; lin.b = s[7 + 4 * j]; lin.c = s[8 + 4 * j]; lin.bias = s[9 + 4 * j];
      TORCH_CHECK(lin.a.is_cpu() && lin.a.is_contiguous(), "decode_plan: CPU, contiguous weights");
      TORCH_CHECK(lin.kind != 0 || lin.a.scalar_type() == torch::kFloat32, "decode_plan: kind 0 weights are fp32");
      TORCH_CHECK(lin.kind != 5 || lin.a.scalar_type() == torch::kBFloat16, "decode_plan: kind 5 weights are bf16");
      TORCH_CHECK(lin.bias.numel() == 0 || lin.bias.scalar_type() == torch::kFloat32, "decode_plan: fp32 biases");
      if (lin.kind != 0 && lin.kind != 5) p->dense = false;
      if (j < 3) L.qkv.push_back(lin); else if (j == 3) L.o = lin; else if (j < 6) L.gate_up.push_back(lin); else L.down = lin;
    }
    TORCH_CHECK(!L.qkv.empty() && L.o.kind >= 0 && !L.gate_up.empty() && L.down.kind >= 0, "decode_plan: missing linears");
    for (auto* w : {&L.in_norm, &L.post_attn_norm, &L.pre_ff_norm, &L.post_ff_norm, &L.q_norm, &L.k_norm})
      TORCH_CHECK(w->numel() == 0 || (w->scalar_type() == torch::kFloat32 && w->is_contiguous()), "decode_plan: fp32 norms");
    p->layers.push_back(std::move(L));
  }
  int64_t id = g_next_plan++;
  g_plans[id] = std::move(p);
  return id;
}

void decode_free(int64_t id) { g_plans.erase(id); }

// x * rsqrt(mean(x^2) + eps) * (offset + w), the sum in double as torch's CPU rms_norm accumulates
static inline float rms_factor(const float* x, int64_t n, double eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  return static_cast<float>(1.0 / std::sqrt(ss / n + eps));
}
static inline void rmsnorm(const float* x, const float* w, float offset, int64_t n, double eps, float* out) {
  const float r = rms_factor(x, n, eps);
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] * r) * (offset + w[i]);
}
// A sandwich norm's output added into the residual, elements [i0, i1): y += x * r * (offset + w), r the
// factor of the whole x. One expression for both the serial and the parallel step, so that the compiler's
// multiply-add contraction treats them alike.
static inline void add_normed(float* y, const float* x, float r, const float* w, float offset, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) y[i] += (x[i] * r) * (offset + w[i]);
}

// y (rows) = lin(x (cols)); x a (1, cols) fp32 tensor
static void dlin(const DLin& l, const torch::Tensor& x, float* y, int64_t path) {
  int64_t rows = l.a.size(0);
  if (l.kind == 0 || l.kind == 5) {  // dense: straight into y
    const float* xp = x.data_ptr<float>(); const int64_t cols = x.size(1);
    if (l.kind == 0) dense_impl(l.a.data_ptr<float>(), xp, y, 1, rows, cols, isa_of(path));
    else dense_impl(reinterpret_cast<const c10::BFloat16*>(l.a.data_ptr()), xp, y, 1, rows, cols, isa_of(path));
  } else {
    torch::Tensor r = l.kind == 1 ? int4_linear(x, l.a, l.b, l.c, path)
                    : l.kind == 2 ? int8_linear(x, l.a, l.b, path)
                    : l.kind == 3 ? fp8_linear(x, l.a, l.b, l.c, path)
                    : nf4_linear(x, l.a.view({-1}), l.b, l.c, rows, rows * x.size(1) / l.c.numel(), path);
    std::memcpy(y, r.data_ptr<float>(), rows * sizeof(float));
  }
  if (l.bias.numel()) { const float* b = l.bias.data_ptr<float>(); for (int64_t i = 0; i < rows; ++i) y[i] += b[i]; }
}

static void dlins(const std::vector<DLin>& ls, const torch::Tensor& x, float* y, int64_t path) {
  for (const auto& l : ls) { dlin(l, x, y, path); y += l.a.size(0); }
}

static inline float act_fn(float g, int64_t act) {
  if (act == 0) return g / (1.0f + std::exp(-g));
  if (act == 1) { const float c = 0.7978845608028654f; return 0.5f * g * (1.0f + std::tanh(c * (g + 0.044715f * g * g * g))); }
  return 0.5f * g * (1.0f + std::erf(g * 0.7071067811865476f));
}

// The cache write (k, v at ``slot``) and one query per head over the cache (GQA: H / KV query heads a key
// head; sliding windows from the slots' positions), for an fp32 or bf16 cache.
static inline void store(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
static inline void store(c10::BFloat16* dst, const float* src, int64_t n) { for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]); }
template <typename T>
static inline float dot_kv(const float* a, const T* b, int64_t n) {
#if defined(LLMCTL_AVX2)
  if (n % 16 == 0) {  // head_dim 64, 128, 256: the cache's bf16 widened in registers
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), ld8(b + i), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), ld8(b + i + 8), s1);
    }
    return hsum8(_mm256_add_ps(s0, s1));
  }
#endif
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += a[i + k] * ld(b, i + k);
  float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < n; ++i) t += a[i] * ld(b, i);
  return t;
}
template <typename T>
static inline void axpy_kv(float* o, float e, const T* v, int64_t n) {  // o += e * v
  int64_t i = 0;
#if defined(LLMCTL_AVX2)
  const __m256 ev = _mm256_set1_ps(e);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(ev, ld8(v + i), _mm256_loadu_ps(o + i)));
#endif
  for (; i < n; ++i) o[i] += e * ld(v, i);
}
template <typename T>
static inline void store_kv(T* kb, T* vb, const float* k, const float* v, int64_t g, int64_t S, int64_t slot, int64_t D) {
  store(kb + (g * S + slot) * D, k + g * D, D);
  store(vb + (g * S + slot) * D, v + g * D, D);
}
// Query heads [h0, h1) over the cache (the new key and value already stored); sc: len floats of scratch.
template <typename T>
static void attend_heads(const T* kb, const T* vb, const float* q, float* attn, float* sc, int64_t h0, int64_t h1, int64_t S,
                         int64_t len, int64_t W, const int64_t* sp, int64_t pos, int64_t rep, int64_t D, float scale) {
  for (int64_t h = h0; h < h1; ++h) {
    const float* qh = q + h * D; const int64_t g = h / rep;
    const T* kh = kb + g * S * D; const T* vh = vb + g * S * D;
    float m = -INFINITY;
    for (int64_t j = 0; j < len; ++j) {
      bool ok = true;
      if (W) { int64_t p = sp[j]; ok = p >= 0 && p <= pos && p > pos - W; }
      sc[j] = ok ? dot_kv(qh, kh + j * D, D) * scale : -INFINITY;
      m = std::max(m, sc[j]);
    }
    float* o = attn + h * D;
    for (int64_t i = 0; i < D; ++i) o[i] = 0.f;
    float sum = 0.f;
    for (int64_t j = 0; j < len; ++j) {
      if (sc[j] == -INFINITY) continue;
      float e = std::exp(sc[j] - m); sum += e;
      axpy_kv(o, e, vh + j * D, D);
    }
    float inv = 1.0f / sum;
    for (int64_t i = 0; i < D; ++i) o[i] *= inv;
  }
}
template <typename T>
static void attend(T* kb, T* vb, const float* q, const float* k, const float* v, float* attn, int64_t S, int64_t slot,
                   int64_t len, int64_t W, const int64_t* sp, int64_t pos, int64_t H, int64_t KV, int64_t D, float scale) {
  for (int64_t g = 0; g < KV; ++g) store_kv(kb, vb, k, v, g, S, slot, D);
  auto heads = [&](int64_t h0, int64_t h1) {
    std::vector<float> sc(len);
    attend_heads(kb, vb, q, attn, sc.data(), h0, h1, S, len, W, sp, pos, H / KV, D, scale);
  };
  if (len * D * H < (1 << 16)) heads(0, H); else at::parallel_for(0, H, 1, heads);
}

// RoPE on one head in place: out[i] = x[i] * cos[i] + x[partner(i)] * sin[i], partner the other half
static inline void rope_head(float* e, const float* c, const float* s, int64_t D) {
  const int64_t half = D / 2;
  float tmp[1024];
  for (int64_t i = 0; i < D; ++i) tmp[i] = e[i] * c[i] + e[i < half ? i + half : i - half] * s[i];
  std::memcpy(e, tmp, D * sizeof(float));
}

// ---- the step as one parallel region (every linear dense: fp32 and bf16 models) ----
// One OpenMP region for the whole step instead of one a product: each thread computes its share of every
// product's rows and the serial parts around them are split or repeated, so that the threads meet at five
// barriers a layer (seven with sandwich norms) and no thread waits while another runs a norm alone:
// * q/k/v rows are split by whole heads, so the thread that computed a head also norms, rotates and stores it;
// * the query heads are split for attention;
// * o_proj and down_proj rows are split, each thread adding its rows into the residual;
// * gate and up rows are split alike, so each thread's activations need only its own products;
// * the RMSNorms before the products are computed by every thread into its own buffer (a few hundred values).
// Every value is computed as the serial step computes it (the same functions, rows and sums).
static inline void share(int64_t n, int64_t align, int tid, int nt, int64_t& a, int64_t& b) {
  int64_t chunk = (n + nt - 1) / nt;
  chunk = (chunk + align - 1) / align * align;
  a = std::min(n, tid * chunk); b = std::min(n, a + chunk);
}

// rows [r0, r1) of a dense linear (kind 0 or 5), bias included
static void dense_rows(const DLin& l, const float* x, float* y, int64_t r0, int64_t r1, int isa) {
  const int64_t cols = l.a.size(1);
  if (r0 >= r1) return;
  if (l.kind == 0) dense_range(l.a.data_ptr<float>(), x, y, r0, r1, cols, isa);
  else dense_range(reinterpret_cast<const c10::BFloat16*>(l.a.data_ptr()), x, y, r0, r1, cols, isa);
  if (l.bias.numel()) { const float* bp = l.bias.data_ptr<float>(); for (int64_t r = r0; r < r1; ++r) y[r] += bp[r]; }
}
// rows [a, b) of the list's outputs laid end to end (q, k, v or gate, up: joined or apart)
static void dense_rows(const std::vector<DLin>& ls, const float* x, float* y, int64_t a, int64_t b, int isa) {
  int64_t off = 0;
  for (const auto& l : ls) {
    const int64_t rows = l.a.size(0);
    dense_rows(l, x, y + off, std::max<int64_t>(a - off, 0), std::min(b - off, rows), isa);
    off += rows;
  }
}

template <typename T> static T* cache_ptr(const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

template <typename T>
static void step_region(const DPlan& P, float* xp, const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
                        const std::vector<torch::Tensor>& rope, const int64_t* sp, int64_t pos, int isa, int nt) {
  const int64_t n = static_cast<int64_t>(P.layers.size()), hid = P.hidden, H = P.H, KV = P.KV, D = P.D, F = P.inter;
  int64_t longest = 1;
  for (int64_t l = 0; l < n; ++l) longest = std::max(longest, P.layers[l].window ? std::min(pos + 1, keys[l].size(2)) : pos + 1);
  std::vector<float> buf(std::max((H + 2 * KV) * D, 2 * F)), attn(H * D), act(F), out(hid);
  float* q = buf.data(); float* ap = act.data(); float* op = out.data();
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    std::vector<float> xn_v(hid), sc_v(longest);
    float* xn = xn_v.data(); float* sc = sc_v.data();
    int64_t u0, u1, h0, h1, r0, r1, f0, f1;
    share(H + 2 * KV, 1, tid, nth, u0, u1);  // q/k/v heads
    share(H, 1, tid, nth, h0, h1);           // query heads for attention
    share(hid, 16, tid, nth, r0, r1);        // o_proj / down_proj rows
    share(F, 16, tid, nth, f0, f1);          // gate / up rows
    // op's rows [r0, r1) into the residual (through ``norm`` first with sandwich norms, whose factor needs
    // all of op), then the barrier after which every thread reads the whole residual
    auto residual = [&](const torch::Tensor& norm) {
      if (P.sandwich) {
#pragma omp barrier
        add_normed(xp, op, rms_factor(op, hid, P.eps), norm.data_ptr<float>(), P.offset, r0, r1);
      } else {
        for (int64_t i = r0; i < r1; ++i) xp[i] += op[i];
      }
#pragma omp barrier
    };
    rmsnorm(xp, P.layers[0].in_norm.data_ptr<float>(), P.offset, hid, P.eps, xn);
    for (int64_t l = 0; l < n; ++l) {
      const DLayer& L = P.layers[l];
      T* kb = cache_ptr<T>(keys[l]); T* vb = cache_ptr<T>(values[l]);
      const int64_t S = keys[l].size(2), slot = L.window ? pos % S : pos, len = L.window ? std::min(pos + 1, S) : pos + 1;
      dense_rows(L.qkv, xn, q, u0 * D, u1 * D, isa);
      const float* c = rope[2 * L.rope].data_ptr<float>() + pos * D; const float* s = rope[2 * L.rope + 1].data_ptr<float>() + pos * D;
      for (int64_t e = u0; e < u1; ++e) {
        float* h = q + e * D;
        if (e < H + KV) {
          if (P.qk_norm) rmsnorm(h, (e < H ? L.q_norm : L.k_norm).data_ptr<float>(), P.offset, D, P.eps, h);
          rope_head(h, c, s, D);
          if (e >= H) store(kb + ((e - H) * S + slot) * D, h, D);
        } else {
          store(vb + ((e - H - KV) * S + slot) * D, h, D);
        }
      }
#pragma omp barrier
      attend_heads(kb, vb, q, attn.data(), sc, h0, h1, S, len, L.window, sp, pos, H / KV, D, P.scale);
#pragma omp barrier
      dense_rows(L.o, attn.data(), op, r0, r1, isa);
      residual(L.post_attn_norm);
      rmsnorm(xp, (P.sandwich ? L.pre_ff_norm : L.post_attn_norm).data_ptr<float>(), P.offset, hid, P.eps, xn);
      dense_rows(L.gate_up, xn, buf.data(), f0, f1, isa);
      dense_rows(L.gate_up, xn, buf.data(), F + f0, F + f1, isa);
      for (int64_t i = f0; i < f1; ++i) ap[i] = act_fn(buf[i], P.act) * buf[F + i];
#pragma omp barrier
      dense_rows(L.down, ap, op, r0, r1, isa);
      residual(L.post_ff_norm);
      if (l + 1 < n) rmsnorm(xp, P.layers[l + 1].in_norm.data_ptr<float>(), P.offset, hid, P.eps, xn);
    }
  }
}

// x (hidden) fp32, updated in place and returned; keys/values per layer (1, KV, slots, D) fp32 or bf16; rope: per table
// kind (cos, sin), each (length, .., D) fp32 contiguous (llmctl.runtime.rope.rope_tables); slot_pos: the
// position each ring slot holds (sliding layers); pos: this token's position.
static const DPlan& plan_of(int64_t id) {
  auto it = g_plans.find(id);
  TORCH_CHECK(it != g_plans.end(), "decode_step: no such plan");
  return *it->second;  // alive while the caller's Plan object is: free only from its __del__
}

static void run_layers(const DPlan& P, torch::Tensor& x, const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
                       const std::vector<torch::Tensor>& rope, const torch::Tensor& slot_pos, int64_t pos, int64_t path) {
  const int64_t n = static_cast<int64_t>(P.layers.size()), hid = P.hidden, H = P.H, KV = P.KV, D = P.D, F = P.inter;
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.numel() == hid, "decode_step: x");
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == n && static_cast<int64_t>(values.size()) == n, "decode_step: caches");
  for (const auto& r : rope) TORCH_CHECK(r.scalar_type() == torch::kFloat32 && r.is_contiguous() && r.numel() >= (pos + 1) * D, "decode_step: rope tables");
  TORCH_CHECK(slot_pos.numel() == 0 || (slot_pos.scalar_type() == torch::kLong && slot_pos.is_contiguous()), "decode_step: slot_pos");
  const int64_t* sp = slot_pos.numel() ? slot_pos.data_ptr<int64_t>() : nullptr;
  for (int64_t l = 0; l < n; ++l) {
    const torch::Tensor& ck = keys[l]; const torch::Tensor& cv = values[l];
    TORCH_CHECK((ck.scalar_type() == torch::kFloat32 || ck.scalar_type() == torch::kBFloat16) && cv.scalar_type() == ck.scalar_type()
                && ck.scalar_type() == keys[0].scalar_type() && ck.is_contiguous() && cv.is_contiguous() && ck.dim() == 4
                && ck.sizes() == cv.sizes() && ck.size(1) == KV && ck.size(3) == D, "decode_step: cache layout");
    const int64_t S = ck.size(2), slot = P.layers[l].window ? pos % S : pos;
    TORCH_CHECK(slot < S && (!P.layers[l].window || sp), "decode_step: the cache is full");
  }
  const int nt = at::get_num_threads();
  if (P.dense && nt > 1 && !at::in_parallel_region()) {
    if (keys[0].scalar_type() == torch::kFloat32) step_region<float>(P, x.data_ptr<float>(), keys, values, rope, sp, pos, isa_of(path), nt);
    else step_region<c10::BFloat16>(P, x.data_ptr<float>(), keys, values, rope, sp, pos, isa_of(path), nt);
    return;
  }
  const int64_t nq = (H + 2 * KV) * D;
  auto xn_t = torch::empty({1, std::max(hid, H * D)}, torch::kFloat32);
  auto buf_t = torch::empty({std::max(nq, 2 * F)}, torch::kFloat32);
  auto act_t = torch::empty({1, F}, torch::kFloat32);
  auto out_t = torch::empty({hid}, torch::kFloat32);
  float* xp = x.data_ptr<float>(); float* xn = xn_t.data_ptr<float>(); float* buf = buf_t.data_ptr<float>();
  float* ap = act_t.data_ptr<float>(); float* op = out_t.data_ptr<float>();
  torch::Tensor xn_h = xn_t.narrow(1, 0, hid), attn_t = xn_t.narrow(1, 0, H * D);
  for (int64_t l = 0; l < n; ++l) {
    const DLayer& L = P.layers[l];
    rmsnorm(xp, L.in_norm.data_ptr<float>(), P.offset, hid, P.eps, xn);
    dlins(L.qkv, xn_h, buf, path);
    float* q = buf; float* k = buf + H * D; float* v = k + KV * D;
    if (P.qk_norm) {
      const float* qw = L.q_norm.data_ptr<float>(); const float* kw = L.k_norm.data_ptr<float>();
      for (int64_t h = 0; h < H; ++h) rmsnorm(q + h * D, qw, P.offset, D, P.eps, q + h * D);
      for (int64_t h = 0; h < KV; ++h) rmsnorm(k + h * D, kw, P.offset, D, P.eps, k + h * D);
    }
    {  // RoPE
      const float* c = rope[2 * L.rope].data_ptr<float>() + pos * D; const float* s = rope[2 * L.rope + 1].data_ptr<float>() + pos * D;
      for (int64_t h = 0; h < H + KV; ++h) rope_head(q + h * D, c, s, D);  // k follows q
    }
    const torch::Tensor& ck = keys[l]; const torch::Tensor& cv = values[l];
    const int64_t S = ck.size(2);
    const int64_t slot = L.window ? pos % S : pos;
    const int64_t len = L.window ? std::min(pos + 1, S) : pos + 1;
    float* attn = xn;  // (H * D): q, k, v stay in buf
    if (ck.scalar_type() == torch::kFloat32)
      attend(ck.data_ptr<float>(), cv.data_ptr<float>(), q, k, v, attn, S, slot, len, L.window, sp, pos, H, KV, D, P.scale);
    else
      attend(reinterpret_cast<c10::BFloat16*>(ck.data_ptr()), reinterpret_cast<c10::BFloat16*>(cv.data_ptr()), q, k, v, attn, S,
             slot, len, L.window, sp, pos, H, KV, D, P.scale);
    dlin(L.o, attn_t, op, path);
    if (P.sandwich) {
      add_normed(xp, op, rms_factor(op, hid, P.eps), L.post_attn_norm.data_ptr<float>(), P.offset, 0, hid);
      rmsnorm(xp, L.pre_ff_norm.data_ptr<float>(), P.offset, hid, P.eps, xn);
    } else {
      for (int64_t i = 0; i < hid; ++i) xp[i] += op[i];
      rmsnorm(xp, L.post_attn_norm.data_ptr<float>(), P.offset, hid, P.eps, xn);
    }
    dlins(L.gate_up, xn_h, buf, path);
    for (int64_t i = 0; i < F; ++i) ap[i] = act_fn(buf[i], P.act) * buf[F + i];
    dlin(L.down, act_t, op, path);
    if (P.sandwich) add_normed(xp, op, rms_factor(op, hid, P.eps), L.post_ff_norm.data_ptr<float>(), P.offset, 0, hid);
    else for (int64_t i = 0; i < hid; ++i) xp[i] += op[i];
  }
}

torch::Tensor decode_step(int64_t id, torch::Tensor x, std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                          std::vector<torch::Tensor> rope, torch::Tensor slot_pos, int64_t pos, int64_t path) {
  const DPlan& P = plan_of(id);
  pybind11::gil_scoped_release no_gil;  // other Python threads (the server's event loop) run meanwhile
  run_layers(P, x, keys, values, rope, slot_pos, pos, path);
  return x;
}

// ---- a whole token: embedding, every layer, final norm, logits ----
// tensors: [embed (vocab, hidden) fp32 or bf16, final norm (hidden) fp32, head a, b, c, bias]; ints: [head kind,
// round_bf16, norm offset]; floats: [embed scale, 0 for none].
void decode_tail(int64_t id, std::vector<torch::Tensor> t, std::vector<int64_t> ints, std::vector<double> floats) {
  auto it = g_plans.find(id);
  TORCH_CHECK(it != g_plans.end(), "decode_tail: no such plan");
  DPlan& P = *it->second;
  TORCH_CHECK(t.size() == 6 && ints.size() == 3 && floats.size() == 1, "decode_tail: lists do not match");
  auto tail = std::make_unique<DTail>();
  tail->embed = t[0]; tail->norm = t[1];
  tail->head.kind = ints[0]; tail->head.a = t[2]; tail->head.b = t[3]; tail->head.c = t[4]; tail->head.bias = t[5];
  tail->round_bf16 = ints[1] != 0; tail->norm_offset = static_cast<float>(ints[2]);
  tail->embed_scale = static_cast<float>(floats[0]);
  const auto et = tail->embed.scalar_type();
  TORCH_CHECK(tail->embed.is_cpu() && tail->embed.is_contiguous() && tail->embed.dim() == 2 && tail->embed.size(1) == P.hidden
              && (et == torch::kFloat32 || et == torch::kBFloat16), "decode_tail: a dense (vocab, hidden) embedding");
  TORCH_CHECK(tail->norm.scalar_type() == torch::kFloat32 && tail->norm.is_contiguous() && tail->norm.numel() == P.hidden, "decode_tail: fp32 norm");
  const DLin& h = tail->head;
  TORCH_CHECK(h.kind >= 0 && h.kind <= 5 && h.a.is_cpu() && h.a.is_contiguous(), "decode_tail: head");
  TORCH_CHECK(h.kind != 0 || h.a.scalar_type() == torch::kFloat32, "decode_tail: kind 0 heads are fp32");
  TORCH_CHECK(h.kind != 5 || h.a.scalar_type() == torch::kBFloat16, "decode_tail: kind 5 heads are bf16");
  TORCH_CHECK(h.kind == 1 || h.kind == 4 || h.a.size(1) == P.hidden, "decode_tail: the head's columns");
  TORCH_CHECK(h.bias.numel() == 0 || h.bias.scalar_type() == torch::kFloat32, "decode_tail: fp32 bias");
  P.tail = std::move(tail);
}

// The logits (1, 1, vocab) fp32 of ``token`` (one int64) at ``pos``: the embedding row (scaled), every layer as
// decode_step runs them, the final RMSNorm and the output matrix. Arguments after ``token`` as decode_step's.
torch::Tensor decode_token(int64_t id, torch::Tensor token, std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                           std::vector<torch::Tensor> rope, torch::Tensor slot_pos, int64_t pos, int64_t path) {
  const DPlan& P = plan_of(id);
  TORCH_CHECK(P.tail, "decode_token: the plan has no decode_tail");
  const DTail& T = *P.tail;
  TORCH_CHECK(token.is_cpu() && token.scalar_type() == torch::kLong && token.numel() == 1, "decode_token: one int64 token");
  const int64_t tok = token.contiguous().data_ptr<int64_t>()[0], vocab = T.embed.size(0), hid = P.hidden;
  TORCH_CHECK(tok >= 0 && tok < vocab, "decode_token: token id ", tok, " is outside the vocabulary of ", vocab);
  pybind11::gil_scoped_release no_gil;
  auto x = torch::empty({hid}, torch::kFloat32);
  float* xp = x.data_ptr<float>();
  if (T.embed.scalar_type() == torch::kFloat32) std::memcpy(xp, T.embed.data_ptr<float>() + tok * hid, hid * sizeof(float));
  else { const c10::BFloat16* e = reinterpret_cast<const c10::BFloat16*>(T.embed.data_ptr()) + tok * hid; for (int64_t i = 0; i < hid; ++i) xp[i] = static_cast<float>(e[i]); }
  if (T.embed_scale != 0.f) {
    for (int64_t i = 0; i < hid; ++i) xp[i] *= T.embed_scale;
    if (T.round_bf16) for (int64_t i = 0; i < hid; ++i) xp[i] = static_cast<float>(c10::BFloat16(xp[i]));
  }
  run_layers(P, x, keys, values, rope, slot_pos, pos, path);
  auto xn = torch::empty({1, hid}, torch::kFloat32);
  rmsnorm(xp, T.norm.data_ptr<float>(), T.norm_offset, hid, P.eps, xn.data_ptr<float>());
  const int64_t rows = T.head.a.size(0);
  auto logits = torch::empty({1, 1, rows}, torch::kFloat32);
  dlin(T.head, xn, logits.data_ptr<float>(), path);
  return logits;
}
