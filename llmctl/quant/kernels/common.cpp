// llmctl's CPU kernels, one translation unit: llmctl.quant.native concatenates kernels/*.cpp in the order
// of its KERNEL_FILES. This part: headers, the ISA paths (AVX-512 VNNI, AVX2, scalar) and small helpers.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LLMCTL_AVX2 1
#endif
// AVX-512 with VNNI (llmctl.quant.native adds the flags when the CPU has them): 64 bytes an instruction and
// dpbusd/dpwssd, the multiply-and-sum of four int8 (two int16) products into an int32 in one step.
#if defined(LLMCTL_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define LLMCTL_AVX512 1
#endif

// The kernels' paths: a call's ``path`` is an index into int4_paths(), best first; the last is scalar.
enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static const int ISA_ORDER[] = {
#if defined(LLMCTL_AVX512)
    ISA_AVX512,
#endif
#if defined(LLMCTL_AVX2)
    ISA_AVX2,
#endif
    ISA_SCALAR};
static const int64_t ISA_COUNT = sizeof(ISA_ORDER) / sizeof(ISA_ORDER[0]);
static inline int isa_of(int64_t path) { return ISA_ORDER[path < 0 ? 0 : std::min(path, ISA_COUNT - 1)]; }

// Loads as fp32. bf16 is the top half of an fp32: a shift the compiler vectorizes.
static inline float ld(const float* p, int64_t i) { return p[i]; }
static inline float ld(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
static inline float ld(const c10::BFloat16* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f; std::memcpy(&f, &u, 4); return f;
}

// max |x| over a block as bits: the bit patterns of non-negative floats order like their values and every
// NaN's lies above +inf's, so an integer max (which vectorizes, where a float max with NaN checks does
// not) gives the absmax and tells whether the block holds a NaN.
static inline uint32_t abs_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u & 0x7fffffffu; }
static inline float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
// A float's bits as an int32 that orders like the value (negative values' magnitude bits flipped).
static inline int32_t order_key(float f) { int32_t i; std::memcpy(&i, &f, 4); return i ^ ((i >> 31) & 0x7fffffff); }
static inline float from_key(int32_t k) { int32_t i = k ^ ((k >> 31) & 0x7fffffff); float f; std::memcpy(&f, &i, 4); return f; }

// The paths this build has, best first (for tests and the benchmark).
std::vector<std::string> int4_paths() {  // every kernel's (int4, int8, fp8, NF4)
  std::vector<std::string> names;
  for (int64_t i = 0; i < ISA_COUNT; ++i) names.push_back(ISA_ORDER[i] == ISA_AVX512 ? "avx512" : ISA_ORDER[i] == ISA_AVX2 ? "avx2" : "scalar");
  return names;
}
