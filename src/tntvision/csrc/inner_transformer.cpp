// TNT's inner transformer as one fused CPU operation: forward and backward.
//
// One call runs a block's whole inner transformer over every sentence (patch) of a batch:
//
//   x1 = x  + attn_scale * proj(attention(LN1(x)))        attention over the m words of each sentence
//   x2 = x1 + mlp_scale * fc2(gelu(fc1(LN2(x1))))        exact (erf) GELU
//
// x is (S, m, c): S sentences of m words of c features. attn_scale / mlp_scale are optional per-sentence drop-path
// scales (0 or 1/keep). Two layouts do the work (use_lanes picks one from the shape and the copy's vector width):
// the row layout below (inner_transformer_tile.h: a word's features along the vector) and the lane layout
// (inner_transformer_lanes.h: one value of W sentences per vector, for words too small to fill a vector).
// Row layout: sentences are processed in tiles of about 256 words that stay in the L2 cache;
// every intermediate of a tile lives in a per-tile scratch buffer, and the backward pass recomputes a
// tile's forward from x instead of keeping anything (so autograd keeps only x for this whole transformer).
//
// Precision. LayerNorm, softmax, GELU and every accumulation run in fp32. x and the outputs may be fp32 or
// bf16 (converted per tile), the weights any floating dtype (packed once per call). With `low_precision`
// (set by the Python side under bf16 autocast or for bf16 inputs), the four GEMMs of the forward take bf16
// operands with fp32 accumulation through PyTorch's oneDNN micro-kernels (`at::native::cpublas::brgemm`,
// the kernels PyTorch's CPU flash attention uses) where the CPU has AMX; elsewhere bf16 GEMMs are not
// faster than fp32 ones (no AMX: oneDNN's brgemm takes VNNI-packed bf16 only with AMX; without avx512_bf16
// bf16 is emulated), so the fp32 micro-kernel runs. The backward's GEMMs are fp32 in every case.
//
// One build for every CPU of an architecture. The per-tile code (inner_transformer_tile.h) is compiled
// several times in this one file, each copy for one instruction set (`#pragma GCC target`), and the copy
// to run is chosen at run time from the CPU's features (cpuid), never from compile-time -march flags:
//
//   avx512    16-float vectors, 8 x 3 register blocks  (x86-64 with AVX-512 F/VL/BW/DQ)
//   avx512-w8 8-float vectors, 8 x 3 register blocks   (the same CPUs; chosen on AMD family 19h, Zen 4,
//             whose AVX-512 units are 256 bits wide: 16-float vectors bring no more FLOPs per cycle
//             there, only wider padding of TNT's 24-feature rows to 32)
//   avx2      8-float vectors, 4 x 3 register blocks   (x86-64 with AVX2 and FMA)
//   baseline  4-float generic vectors                  (any CPU: SSE2 on x86-64, NEON on aarch64)
//   avx2-w16  the avx512 copy's 16-float code on AVX2 (never chosen by itself: it lets a machine without
//             AVX-512 test the 16-float code paths)
//
// `tntvision::set_kernel_dispatch(isa, bf16)` overrides the choice (the Python side maps the
// TNTVISION_KERNEL_ISA / TNTVISION_KERNEL_BF16 variables onto it); `tntvision::kernel_dispatch()` says what
// runs. Layout of a tile's row-major buffers: every row is padded to a multiple of the vector width with
// zeros, so the vector loops never need a tail; padding columns are never read as data.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define TNT_X86 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define TNT_X86 0
#endif

// Section timers for development (-DTNT_PROFILE, one thread): torch.ops.tntvision.kernel_profile() returns
// and resets the seconds spent in each section (0-7 forward, 8-13 backward). Compiled out otherwise.
#ifdef TNT_PROFILE
#include <chrono>
static double g_prof[16];
static double g_last;
inline double prof_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
#define PROF_START() (g_last = prof_now())
#define PROF(i) (g_prof[i] += prof_now() - g_last, g_last = prof_now())
#else
#define PROF_START() ((void)0)
#define PROF(i) ((void)0)
#endif

namespace {

constexpr int kTileWords = 256;  // words per tile (rounded to whole sentences)
constexpr int kMaxWords = 4096;  // per sentence: keeps every scratch index within int
constexpr int kMaxDim = 4096;
constexpr int kBlockN = 64;  // N block of the packed bf16 weights (oneDNN's packing takes N <= 64)
constexpr int kPackLd = 16;  // the packed rows' stride is a multiple of this (pack refuses 8 or 24)

inline int rup(int n, int w) { return (n + w - 1) / w * w; }

struct Dims {
  int m, c, H, heads, hd;
  int W;                // vector width the rows are padded to
  int cp, c3p, Hp, mp;  // padded row lengths (multiples of W)
  float eps, scale;
};

// One Linear of the forward as its GEMM needs it. fp32: the transposed weight, (K x N padded). bf16: the
// transposed weight in bf16, (kp x N) row-major with kp = K rounded up to even, or, with `packed`, N
// blocks of at most kBlockN columns, each in the VNNI layout of `cpublas::pack` with a row stride of
// block_ld(block) (its width rounded up to kPackLd), at `offsets`.
struct Linear {
  at::Tensor wT;
  at::Tensor bf16;  // defined: the bf16 GEMM runs
  bool packed = false;
  int n = 0, k = 0, kp = 0;
  std::vector<int64_t> offsets;  // packed: element offset of each N block
  int block_n(size_t i) const { return std::min(kBlockN, n - static_cast<int>(i) * kBlockN); }
  int block_ld(size_t i) const { return rup(block_n(i), kPackLd); }
};

// The weights of one call, packed once (forward: transposed, backward: as stored, fp32).
struct Weights {
  at::Tensor ln1w, ln1b, ln2w, ln2b;  // (cp)
  Linear qkv, proj, fc1, fc2;         // forward GEMMs
  at::Tensor bqkv, bp, b1, b2;        // (c3p), (cp), (Hp), (cp)
  at::Tensor wqkv, wp, w1, w2;        // backward: (3c, cp), (c, cp), (H, cp), (c, Hp)
};

// Per-tile scratch: every forward intermediate of up to R words.
struct Scratch {
  std::vector<float> x, xn1, qkv, o, x1, xn2, h, g, cdf, mean1, rstd1, mean2, rstd2;
  std::vector<float> P;  // transposed attention weights of every (sentence, head) of the tile: (m, mp) each
  std::vector<float> qT, oT, dPT, dqT, doT, rowdot;
  std::vector<c10::BFloat16> abf;  // the bf16 copy of a GEMM's A operand
  Scratch(int R, const Dims& d, bool bf16)
      : x(R * d.cp), xn1(R * d.cp), qkv(R * d.c3p), o(R * d.cp), x1(R * d.cp), xn2(R * d.cp), h(R * d.Hp),
        g(R * d.Hp), cdf(R * d.Hp), mean1(R), rstd1(R), mean2(R), rstd2(R), P((R / d.m) * d.heads * d.m * d.mp),
        qT(d.hd * d.mp), oT(d.hd * d.mp), dPT(d.m * d.mp), dqT(d.hd * d.mp), doT(d.hd * d.mp), rowdot(d.mp),
        abf(bf16 ? R * rup(std::max(d.c, d.H), 2) : 0) {}
  float* weights(int sentence, int head, const Dims& d) { return P.data() + (sentence * d.heads + head) * d.m * d.mp; }
};

// Which gradients a backward call computes (autograd's needs_input_grad, grouped by module): the input's,
// and each module's parameters together (weight and bias). What is not needed is not computed: a frozen
// backbone under a saliency map skips every weight-gradient GEMM.
struct Needs {
  bool x, ln1, qkv, proj, ln2, fc1, fc2;
  explicit Needs(std::array<bool, 7> m) : x(m[0]), ln1(m[1]), qkv(m[2]), proj(m[3]), ln2(m[4]), fc1(m[5]), fc2(m[6]) {}
  bool below_ln2() const { return x || ln1 || qkv || proj; }  // anything the MLP branch's input gradient feeds
  bool below_attention() const { return x || ln1 || qkv; }     // ... and the attention's
};

// Gradient accumulators of one chunk of tiles, fp32, padded like the packed weights; `need` says which the
// backward fills (the others stay zero and are not returned).
struct Grads {
  Needs need;
  std::vector<float> ln1w, ln1b, ln2w, ln2b, wqkv, bqkv, wp, bp, w1, b1, w2, b2;
  Grads(const Dims& d, Needs n)
      : need(n), ln1w(d.cp), ln1b(d.cp), ln2w(d.cp), ln2b(d.cp), wqkv(3 * d.c * d.cp), bqkv(d.c3p),
        wp(d.c * d.cp), bp(d.cp), w1(d.H * d.cp), b1(d.Hp), w2(d.c * d.Hp), b2(d.cp) {}
  void add(const Grads& o) {
    for (auto [a, b] : {std::pair{&ln1w, &o.ln1w}, {&ln1b, &o.ln1b}, {&ln2w, &o.ln2w}, {&ln2b, &o.ln2b},
                        {&wqkv, &o.wqkv}, {&bqkv, &o.bqkv}, {&wp, &o.wp}, {&bp, &o.bp}, {&w1, &o.w1},
                        {&b1, &o.b1}, {&w2, &o.w2}, {&b2, &o.b2}})
      for (size_t i = 0; i < a->size(); ++i) (*a)[i] += (*b)[i];
  }
};

// The lane layout (inner_transformer_lanes.h): shapes, fp32 weights and buffers of a call, every buffer
// counted in vectors of W floats (one value of W sentences each).
struct LaneDims {
  int m, c, H, heads, hd, W;
  int groups;  // groups of W sentences per tile
  float eps, scale;
  int rows() const { return groups * m; }
};

// Pointers into unpadded fp32 copies of the weights (LanePack keeps the tensors).
struct LaneWeights {
  const float *ln1w, *ln1b, *ln2w, *ln2b;
  const float *wqkv, *bqkv, *wp, *bp, *w1, *b1, *w2, *b2;  // PyTorch's (out, in) layout
  const float *wqkvT, *wpT, *w1T, *w2T;                   // transposed, for the input gradients
};

// A buffer carved out of a thread's arena (uninitialised: every buffer is written before it is read).
struct Span {
  float* p = nullptr;
  int64_t n = 0;
  float* data() const { return p; }
  int64_t size() const { return n; }
};

// One arena per thread, kept between calls and grown when a call needs more: no allocation, zeroing or
// page faults per call (a TNT-S batch-1 forward would otherwise fault in ~1 MB per thread per block).
float* thread_arena(int64_t n) {
  thread_local std::vector<float> arena;
  if (static_cast<int64_t>(arena.size()) < n) arena.resize(n);
  return arena.data();
}

struct LaneScratch {
  Span x, xn1, qkv, o, x1, xn2, h, dgelu, g, mean1, rstd1, mean2, rstd2, P, out;  // dgelu: gelu'(h)
  Span dS, dy, dz, dg, dqkv, dx;  // backward only (empty in a forward-only scratch)
  // One per thread at a time: every LaneScratch of a thread shares its arena.
  LaneScratch(const LaneDims& d, bool backward) {
    const int64_t R = d.rows(), W = d.W, c = d.c, H = d.H;
    std::vector<std::pair<Span*, int64_t>> parts = {
        {&x, R * c * W}, {&xn1, R * c * W}, {&o, R * c * W}, {&x1, R * c * W}, {&xn2, R * c * W},
        {&qkv, R * 3 * c * W}, {&h, R * H * W}, {&g, R * H * W}, {&mean1, R * W}, {&rstd1, R * W},
        {&mean2, R * W}, {&rstd2, R * W}, {&P, static_cast<int64_t>(d.groups) * d.heads * d.m * d.m * W}};
    if (backward) {
      parts.insert(parts.end(), {{&dgelu, R * H * W}, {&dS, static_cast<int64_t>(d.m) * d.m * W}, {&dy, R * c * W},
                                 {&dz, R * c * W}, {&dx, R * c * W}, {&dg, R * std::max(H, c) * W},
                                 {&dqkv, R * 3 * c * W}});
    } else {
      parts.push_back({&out, R * c * W});
    }
    int64_t total = 0;
    for (const auto& [span, n] : parts) total += (n + 15) / 16 * 16;  // 64-byte steps
    float* base = thread_arena(total);
    for (const auto& [span, n] : parts) {
      *span = Span{base, n};
      base += (n + 15) / 16 * 16;
    }
  }
  float* weights(int group, int head, const LaneDims& d) {
    return P.data() + (static_cast<int64_t>(group) * d.heads + head) * d.m * d.m * d.W;
  }
};

// Weight-gradient accumulators of one chunk of tiles, one vector per parameter value (summed over lanes
// at the end of the call).
struct LaneGrads {
  Needs need;
  std::vector<float> ln1w, ln1b, ln2w, ln2b, wqkv, bqkv, wp, bp, w1, b1, w2, b2;
  LaneGrads(const LaneDims& d, Needs n) : need(n) {
    const int64_t W = d.W, c = d.c, H = d.H;
    for (auto* v : {&ln1w, &ln1b, &ln2w, &ln2b, &bp, &b2}) v->assign(c * W, 0.f);
    wqkv.assign(3 * c * c * W, 0.f);
    bqkv.assign(3 * c * W, 0.f);
    wp.assign(c * c * W, 0.f);
    w1.assign(H * c * W, 0.f);
    b1.assign(H * W, 0.f);
    w2.assign(c * H * W, 0.f);
  }
  std::vector<std::vector<float>*> all() {
    return {&ln1w, &ln1b, &ln2w, &ln2b, &wqkv, &bqkv, &wp, &bp, &w1, &b1, &w2, &b2};
  }
};

// fp32 -> bf16, round to nearest even (NaN stays NaN); a loop of it vectorises.
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// C (rows x n, ldc) += a (rows x kp, bf16, from the tile code's `rows_to_bf16`) @ W^T through oneDNN's
// bf16 micro-kernel (AMX) or, with an unpacked weight, cpublas's bf16 GEMM; accumulation in fp32.
void bf16_gemm(const Linear& lin, int rows, const at::BFloat16* a, float* C, int64_t ldc) {
  const int kp = lin.kp;
  const at::BFloat16* b = lin.bf16.data_ptr<at::BFloat16>();
  if (!lin.packed) {
    at::native::cpublas::brgemm(rows, lin.n, kp, kp, lin.n, ldc, true, a, b, C, false);
    return;
  }
  for (size_t i = 0; i < lin.offsets.size(); ++i) {
    const int n0 = static_cast<int>(i) * kBlockN;
    at::native::cpublas::brgemm(rows, lin.block_n(i), kp, kp, lin.block_ld(i), ldc, true, a, b + lin.offsets[i],
                                C + n0, true);
  }
}

}  // namespace

// ------------------------------------------------------------------ the per-tile code, once per ISA

#if defined(__clang__)
#define TNT_TARGET_PUSH(t) _Pragma("clang attribute push(__attribute__((target(" #t "))), apply_to = function)")
#define TNT_TARGET_POP() _Pragma("clang attribute pop")
#else
#define TNT_TARGET_PUSH(t) _Pragma("GCC push_options") _Pragma(TNT_STR(GCC target(t)))
#define TNT_TARGET_POP() _Pragma("GCC pop_options")
#endif
#define TNT_STR(x) #x

namespace {
namespace tnt_baseline {
#define TNT_W 4  // the width every 64-bit CPU has natively (SSE2, NEON): wider generic vectors get split badly
#define TNT_MR 4
#define TNT_AVX2 0
#define TNT_AVX512 0
#define TNT_AVX512VL 0
#include "inner_transformer_tile.h"
}  // namespace tnt_baseline
}  // namespace

#if TNT_X86
TNT_TARGET_PUSH("avx2,fma")
namespace {
namespace tnt_avx2 {
#define TNT_W 8
#define TNT_MR 4
#define TNT_AVX2 1
#define TNT_AVX512 0
#define TNT_AVX512VL 0
#include "inner_transformer_tile.h"
}  // namespace tnt_avx2
namespace tnt_avx2_w16 {
#define TNT_W 16
#define TNT_MR 4
#define TNT_AVX2 0
#define TNT_AVX512 0
#define TNT_AVX512VL 0
#include "inner_transformer_tile.h"
}  // namespace tnt_avx2_w16
}  // namespace
TNT_TARGET_POP()

TNT_TARGET_PUSH("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
namespace {
namespace tnt_avx512 {
#define TNT_W 16
#define TNT_MR 8
#define TNT_AVX2 0
#define TNT_AVX512 1
#define TNT_AVX512VL 0
#include "inner_transformer_tile.h"
}  // namespace tnt_avx512
namespace tnt_avx512_w8 {
#define TNT_W 8
#define TNT_MR 8
#define TNT_AVX2 1
#define TNT_AVX512 0
#define TNT_AVX512VL 1
#include "inner_transformer_tile.h"
}  // namespace tnt_avx512_w8
}  // namespace
TNT_TARGET_POP()
#endif

namespace {

// ------------------------------------------------------------------------------------ dispatch

using ForwardFn = void (*)(Scratch&, int, const Dims&, const Weights&, const float*, const float*, float*, bool);
using BackwardFn = void (*)(Scratch&, int, const Dims&, const Weights&, const float*, const float*, float*, float*,
                            float*, float*, float*, Grads&);
using LanesForwardFn = void (*)(LaneScratch&, int, const LaneDims&, const LaneWeights&, const float*, const float*,
                                float*, bool);
using LanesBackwardFn = void (*)(LaneScratch&, int, const LaneDims&, const LaneWeights&, const float*, const float*,
                                 LaneGrads&);

struct Variant {
  const char* name;
  int W;
  ForwardFn forward;
  BackwardFn backward;
  LanesForwardFn lanes_forward;
  LanesBackwardFn lanes_backward;
};

enum VariantId { kBaseline = 0, kAvx2 = 1, kAvx2W16 = 2, kAvx512 = 3, kAvx512W8 = 4, kNumVariants = 5 };

const Variant kVariants[kNumVariants] = {
    {"baseline", 4, tnt_baseline::tile_forward, tnt_baseline::tile_backward,
     tnt_baseline::lanes_forward, tnt_baseline::lanes_backward},
#if TNT_X86
    {"avx2", 8, tnt_avx2::tile_forward, tnt_avx2::tile_backward,
     tnt_avx2::lanes_forward, tnt_avx2::lanes_backward},
    {"avx2-w16", 16, tnt_avx2_w16::tile_forward, tnt_avx2_w16::tile_backward,
     tnt_avx2_w16::lanes_forward, tnt_avx2_w16::lanes_backward},
    {"avx512", 16, tnt_avx512::tile_forward, tnt_avx512::tile_backward,
     tnt_avx512::lanes_forward, tnt_avx512::lanes_backward},
    {"avx512-w8", 8, tnt_avx512_w8::tile_forward, tnt_avx512_w8::tile_backward,
     tnt_avx512_w8::lanes_forward, tnt_avx512_w8::lanes_backward},
#else
    {"avx2", 0, nullptr, nullptr, nullptr, nullptr},
    {"avx2-w16", 0, nullptr, nullptr, nullptr, nullptr},
    {"avx512", 0, nullptr, nullptr, nullptr, nullptr},
    {"avx512-w8", 0, nullptr, nullptr, nullptr, nullptr},
#endif
};

bool cpu_has(VariantId v) {
#if TNT_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  switch (v) {
    case kBaseline: return true;
    case kAvx2:
    case kAvx2W16: return avx2;
    case kAvx512:
    case kAvx512W8:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    default: return false;
  }
#else
  return v == kBaseline;
#endif
}

// AMD family 19h (Zen 3 and Zen 4; of those only Zen 4 has AVX-512) splits each 512-bit operation into
// two 256-bit halves.
bool amd_family_19h() {
#if TNT_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d) || b != 0x68747541u) return false;  // "Auth"enticAMD
  __get_cpuid(1, &a, &b, &c, &d);
  const unsigned family = ((a >> 8) & 0xf) + ((a >> 20) & 0xff);
  return family == 0x19;
#else
  return false;
#endif
}

VariantId best_variant() {
  if (cpu_has(kAvx512)) return amd_family_19h() ? kAvx512W8 : kAvx512;
  if (cpu_has(kAvx2)) return kAvx2;
  return kBaseline;
}

// How the forward's GEMMs run under `low_precision`: fp32 micro-kernel, or bf16 through cpublas (packed
// for AMX where `could_pack` says the CPU can, otherwise cpublas's unpacked bf16 GEMM).
enum Bf16Mode { kBf16Auto = 0, kBf16Fp32 = 1, kBf16Brgemm = 2 };

std::atomic<int> g_variant{-1};  // -1: not chosen yet (best_variant() on first use)
std::atomic<int> g_bf16{kBf16Auto};

// Which layout a call's tiles take: rows (the tile code: a word's features along the vector) or lanes
// (sentences along the vector, inner_transformer_lanes.h); auto chooses from the shape (use_lanes).
enum Layout { kLayoutAuto = 0, kLayoutRows = 1, kLayoutLanes = 2 };
const char* const kLayoutNames[] = {"auto", "rows", "lanes"};
std::atomic<int> g_layout{kLayoutAuto};

const Variant& current_variant() {
  int v = g_variant.load();
  if (v < 0) {
    v = best_variant();
    g_variant.store(v);
  }
  return kVariants[v];
}

bool amx_bf16() { return at::native::cpublas::could_pack(at::kBFloat16); }

// Whether a low-precision call runs its GEMMs in bf16, and packed for AMX.
bool bf16_gemms(bool low_precision) {
  if (!low_precision) return false;
  const int mode = g_bf16.load();
  return mode == kBf16Brgemm || (mode == kBf16Auto && amx_bf16());
}

// Whether a word's c features, or a sentence's m words, fill at most half of a W-float vector: the row
// layout pads each row to a multiple of W and each sentence's attention weights to a vector.
bool small_words(int64_t m, int64_t c, int W) { return 2 * c <= W || 2 * m <= W; }

// The automatic choice, from static facts only (the shape, the copy's vector width W, whether the call's
// GEMMs run in bf16): small words always take lanes. With 16-float vectors (the avx512 copy: 32 registers
// of 16 lanes) every shape does, unless the row layout's bf16 GEMMs run (AMX, or forced), which the lane
// layout has not. Elsewhere (8-float copies, what AMD Zen 3 and Zen 4 run) larger words keep rows: the
// only layout ever measured on AMD (on an Intel CPU running those copies, lanes took 0.85-1.06x the row
// layout's time for TNT-S, 0.70-0.81x for TNT-Ti: BENCHMARKS.md, "Issue 34").
bool lanes_by_shape(int64_t m, int64_t c, int W, bool bf16_gemms_run) {
  if (small_words(m, c, W)) return true;
  return W >= 16 && !bf16_gemms_run;
}

// `bf16_run`: a low-precision call whose GEMMs would run in bf16 in the row layout (AMX, or forced); a
// forced mode (set_kernel_dispatch's bf16 "brgemm") keeps even small words on rows.
bool use_lanes(int64_t m, int64_t c, int W, bool bf16_run = false, bool forced_bf16 = false) {
  const int layout = g_layout.load();
  if (layout != kLayoutAuto) return layout == kLayoutLanes;
  return !forced_bf16 && lanes_by_shape(m, c, W, bf16_run);
}

std::vector<std::string> kernel_dispatch() {
  const int mode = g_bf16.load();
  std::string bf16 = mode == kBf16Fp32 || (mode == kBf16Auto && !amx_bf16()) ? "fp32"
                     : amx_bf16()                                             ? "brgemm-amx"
                                                                              : "brgemm-unpacked";
  std::vector<std::string> cpu;
  for (int v = 0; v < kNumVariants; ++v)
    if (v != kAvx2W16 && cpu_has(static_cast<VariantId>(v))) cpu.push_back(kVariants[v].name);
  std::string supported;
  for (const auto& n : cpu) supported += (supported.empty() ? "" : ",") + n;
  return {current_variant().name, bf16, supported, kLayoutNames[g_layout.load()]};
}

// The layout a call on words (S, m, c) takes with the current choices: "rows" or "lanes".
std::string kernel_layout(int64_t m, int64_t c) { return use_lanes(m, c, current_variant().W) ? "lanes" : "rows"; }

void set_kernel_dispatch(const std::string& isa, const std::string& bf16, const std::string& layout) {
  int v = -2;
  if (isa == "auto") v = best_variant();
  for (int i = 0; i < kNumVariants; ++i)
    if (isa == kVariants[i].name) v = i;
  TORCH_CHECK(v != -2, "tntvision kernels: unknown instruction set '", isa,
              "' (auto, avx512, avx512-w8, avx2, baseline or avx2-w16)");
  TORCH_CHECK(cpu_has(static_cast<VariantId>(v)), "tntvision kernels: this CPU cannot run the '", isa,
              "' kernels (it has: ", kernel_dispatch()[2], ")");
  int b = bf16 == "auto" ? kBf16Auto : bf16 == "fp32" ? kBf16Fp32 : bf16 == "brgemm" ? kBf16Brgemm : -1;
  TORCH_CHECK(b >= 0, "tntvision kernels: unknown bf16 mode '", bf16, "' (auto, fp32 or brgemm)");
  int l = -1;
  for (int i = 0; i < 3; ++i)
    if (layout == kLayoutNames[i]) l = i;
  TORCH_CHECK(l >= 0, "tntvision kernels: unknown layout '", layout, "' (auto, rows or lanes)");
  g_variant.store(v);
  g_bf16.store(b);
  g_layout.store(l);
}

// ---------------------------------------------------------------------------- argument checks

struct Problem {
  Dims d;
  int64_t S;
  int tile;  // sentences per tile
};

void check_param(const at::Tensor& t, c10::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.defined(), "inner_transformer: ", name, " is missing");
  TORCH_CHECK(t.device().is_cpu(), "inner_transformer: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "inner_transformer: ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "inner_transformer: ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_keep(const c10::optional<at::Tensor>& keep, int64_t S, const char* name) {
  if (!keep.has_value() || !keep->defined()) return;
  check_param(*keep, {S}, name);
}

// Every argument, before any pointer is taken: one clear error instead of undefined behaviour.
Problem make_problem(const at::Tensor& x, const at::Tensor& ln1_w, const at::Tensor& ln1_b, const at::Tensor& qk_w,
                     const c10::optional<at::Tensor>& qk_b, const at::Tensor& v_w,
                     const c10::optional<at::Tensor>& v_b, const at::Tensor& proj_w, const at::Tensor& proj_b,
                     const at::Tensor& ln2_w, const at::Tensor& ln2_b, const at::Tensor& fc1_w,
                     const at::Tensor& fc1_b, const at::Tensor& fc2_w, const at::Tensor& fc2_b,
                     const c10::optional<at::Tensor>& attn_scale, const c10::optional<at::Tensor>& mlp_scale,
                     int64_t heads, double eps, int W) {
  TORCH_CHECK(x.dim() == 3, "inner_transformer: x must be (sentences, words, dim), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "inner_transformer: CPU tensors only, x is on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "inner_transformer: x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t S = x.size(0), m = x.size(1), c = x.size(2);
  TORCH_CHECK(m >= 1 && m <= kMaxWords, "inner_transformer: 1..", kMaxWords, " words per sentence, got ", m);
  TORCH_CHECK(c >= 1 && c <= kMaxDim, "inner_transformer: word dim must be 1..", kMaxDim, ", got ", c);
  TORCH_CHECK(fc1_w.defined() && fc1_w.dim() == 2, "inner_transformer: fc1_w must be (hidden, dim)");
  const int64_t H = fc1_w.size(0);
  TORCH_CHECK(H >= 1 && H <= 16 * kMaxDim, "inner_transformer: MLP hidden size must be 1..", 16 * kMaxDim);
  TORCH_CHECK(heads > 0 && c % heads == 0, "inner_transformer: dim ", c, " is not divisible by num_heads ", heads);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "inner_transformer: eps must be positive, got ", eps);
  check_param(ln1_w, {c}, "ln1_w");
  check_param(ln1_b, {c}, "ln1_b");
  check_param(qk_w, {2 * c, c}, "qk_w");
  check_param(v_w, {c, c}, "v_w");
  const bool has_qk_b = qk_b.has_value() && qk_b->defined(), has_v_b = v_b.has_value() && v_b->defined();
  TORCH_CHECK(has_qk_b == has_v_b, "inner_transformer: qk_b and v_b must be given together (the qkv bias)");
  if (has_qk_b) check_param(*qk_b, {2 * c}, "qk_b");
  if (has_v_b) check_param(*v_b, {c}, "v_b");
  check_param(proj_w, {c, c}, "proj_w");
  check_param(proj_b, {c}, "proj_b");
  check_param(ln2_w, {c}, "ln2_w");
  check_param(ln2_b, {c}, "ln2_b");
  check_param(fc1_w, {H, c}, "fc1_w");
  check_param(fc1_b, {H}, "fc1_b");
  check_param(fc2_w, {c, H}, "fc2_w");
  check_param(fc2_b, {c}, "fc2_b");
  check_keep(attn_scale, S, "attn_scale (one drop-path scale per sentence)");
  check_keep(mlp_scale, S, "mlp_scale (one drop-path scale per sentence)");

  Problem p;
  Dims& d = p.d;
  p.S = S;
  d.m = static_cast<int>(m);
  d.c = static_cast<int>(c);
  d.H = static_cast<int>(H);
  d.heads = static_cast<int>(heads);
  d.hd = d.c / d.heads;
  d.W = W;
  d.cp = rup(d.c, W);
  d.c3p = rup(3 * d.c, W);
  d.Hp = rup(d.H, W);
  d.mp = rup(d.m, W);
  d.eps = static_cast<float>(eps);
  d.scale = 1.0f / std::sqrt(static_cast<float>(d.hd));
  // Sentences per tile: ~kTileWords words, then evened out so the tile count is a multiple of the thread
  // count (batch 1 of TNT-S: 14 tiles of 14 sentences, not 13 of 16 of which one thread would get 7).
  const int64_t most = std::max(1, kTileWords / d.m);
  const int64_t threads = std::max(1, at::get_num_threads());
  int64_t ntiles = (S + most - 1) / most;
  ntiles = (ntiles + threads - 1) / threads * threads;
  p.tile = static_cast<int>(std::max<int64_t>(1, ntiles ? (S + ntiles - 1) / ntiles : 1));
  return p;
}

// ------------------------------------------------------------------------------------ packing

// Row-major (rows x cols) source, any dtype -> fp32 (rows x ld) with zero padding.
at::Tensor pack(const at::Tensor& w, int rows, int cols, int ld, bool transpose) {
  at::Tensor src = w.to(at::kFloat).contiguous().view({rows, cols});
  if (transpose) src = src.t().contiguous();
  int r = transpose ? cols : rows, c = transpose ? rows : cols;
  at::Tensor out = at::zeros({r, ld}, src.options());
  out.narrow(1, 0, c).copy_(src);
  return out;
}

at::Tensor pack_vec(const c10::optional<at::Tensor>& b, int n, int ld) {
  at::Tensor out = at::zeros({ld}, at::TensorOptions().dtype(at::kFloat));
  if (b.has_value() && b->defined()) out.narrow(0, 0, n).copy_(b->to(at::kFloat).view({n}));
  return out;
}

// The forward GEMM of weight w (n x k, PyTorch's (out, in)) with outputs padded to ld.
Linear make_linear(const at::Tensor& w, int n, int k, int ld, bool bf16) {
  Linear lin;
  lin.n = n;
  lin.k = k;
  if (!bf16) {
    lin.wT = pack(w, n, k, ld, true);
    return lin;
  }
  lin.kp = rup(k, 2);
  at::Tensor wT = at::zeros({lin.kp, n}, at::TensorOptions().dtype(at::kBFloat16));  // (kp, n)
  wT.narrow(0, 0, k).copy_(w.to(at::kFloat).view({n, k}).t());
  if (!amx_bf16()) {
    lin.bf16 = wT;
    return lin;
  }
  lin.packed = true;
  const int nblocks = (n + kBlockN - 1) / kBlockN;
  const int64_t block = static_cast<int64_t>(rup(lin.kp, 32)) * kBlockN;  // room for any K padding of pack
  lin.bf16 = at::zeros({nblocks * block}, at::TensorOptions().dtype(at::kBFloat16));
  for (int i = 0; i < nblocks; ++i) {
    lin.offsets.push_back(i * block);
    at::native::cpublas::pack(lin.kp, lin.block_n(i), n, lin.block_ld(i), at::kBFloat16, at::kBFloat16,
                              wT.data_ptr<at::BFloat16>() + i * kBlockN,
                              lin.bf16.data_ptr<at::BFloat16>() + i * block);
  }
  return lin;
}

Weights pack_weights(const Dims& d, const at::Tensor& ln1_w, const at::Tensor& ln1_b, const at::Tensor& qk_w,
                     const c10::optional<at::Tensor>& qk_b, const at::Tensor& v_w,
                     const c10::optional<at::Tensor>& v_b, const at::Tensor& proj_w, const at::Tensor& proj_b,
                     const at::Tensor& ln2_w, const at::Tensor& ln2_b, const at::Tensor& fc1_w,
                     const at::Tensor& fc1_b, const at::Tensor& fc2_w, const at::Tensor& fc2_b, bool backward,
                     bool bf16) {
  Weights w;
  w.ln1w = pack_vec(ln1_w, d.c, d.cp);
  w.ln1b = pack_vec(ln1_b, d.c, d.cp);
  w.ln2w = pack_vec(ln2_w, d.c, d.cp);
  w.ln2b = pack_vec(ln2_b, d.c, d.cp);
  at::Tensor wqkv = at::cat({qk_w.to(at::kFloat), v_w.to(at::kFloat)}, 0);  // (3c, c), q rows first
  w.qkv = make_linear(wqkv, 3 * d.c, d.c, d.c3p, bf16);
  at::Tensor bqkv = at::zeros({d.c3p}, at::TensorOptions().dtype(at::kFloat));
  if (qk_b.has_value() && qk_b->defined()) {
    bqkv.narrow(0, 0, 2 * d.c).copy_(qk_b->to(at::kFloat));
    bqkv.narrow(0, 2 * d.c, d.c).copy_(v_b->to(at::kFloat));
  }
  w.bqkv = bqkv;
  w.proj = make_linear(proj_w, d.c, d.c, d.cp, bf16);
  w.bp = pack_vec(proj_b, d.c, d.cp);
  w.fc1 = make_linear(fc1_w, d.H, d.c, d.Hp, bf16);
  w.b1 = pack_vec(fc1_b, d.H, d.Hp);
  w.fc2 = make_linear(fc2_w, d.c, d.H, d.cp, bf16);
  w.b2 = pack_vec(fc2_b, d.c, d.cp);
  if (backward) {
    w.wqkv = pack(wqkv, 3 * d.c, d.c, d.cp, false);
    w.wp = pack(proj_w, d.c, d.c, d.cp, false);
    w.w1 = pack(fc1_w, d.H, d.c, d.cp, false);
    w.w2 = pack(fc2_w, d.c, d.H, d.Hp, false);
  }
  return w;
}

template <typename T>
void load_rows(const T* src, int rows, int c, int ld, float* dst) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < c; ++j) dst[r * ld + j] = static_cast<float>(src[r * c + j]);
}

template <typename T>
void store_rows(const float* src, int rows, int c, int ld, T* dst) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < c; ++j) dst[r * c + j] = static_cast<T>(src[r * ld + j]);
}

void load_tile(const at::Tensor& x, int64_t s0, int rows, const Dims& d, float* dst) {
  if (x.scalar_type() == at::kFloat) load_rows(x.data_ptr<float>() + s0 * d.m * d.c, rows, d.c, d.cp, dst);
  else load_rows(x.data_ptr<c10::BFloat16>() + s0 * d.m * d.c, rows, d.c, d.cp, dst);
}

void store_tile(const float* src, int64_t s0, int rows, const Dims& d, at::Tensor& y) {
  if (y.scalar_type() == at::kFloat) store_rows(src, rows, d.c, d.cp, y.data_ptr<float>() + s0 * d.m * d.c);
  else store_rows(src, rows, d.c, d.cp, y.data_ptr<c10::BFloat16>() + s0 * d.m * d.c);
}

// The weights of a lane-layout call: fp32, unpadded, in PyTorch's (out, in) layout and transposed.
struct LanePack {
  std::vector<at::Tensor> held;
  LaneWeights w{};
};

LanePack pack_lane_weights(const Dims& d, const at::Tensor& ln1_w, const at::Tensor& ln1_b, const at::Tensor& qk_w,
                           const c10::optional<at::Tensor>& qk_b, const at::Tensor& v_w,
                           const c10::optional<at::Tensor>& v_b, const at::Tensor& proj_w, const at::Tensor& proj_b,
                           const at::Tensor& ln2_w, const at::Tensor& ln2_b, const at::Tensor& fc1_w,
                           const at::Tensor& fc1_b, const at::Tensor& fc2_w, const at::Tensor& fc2_b, bool backward) {
  LanePack lp;
  auto keep = [&](const at::Tensor& t) {
    lp.held.push_back(t.to(at::kFloat).contiguous());
    return lp.held.back().data_ptr<float>();
  };
  const at::Tensor wqkv = at::cat({qk_w.to(at::kFloat), v_w.to(at::kFloat)}, 0);  // (3c, c), q rows first
  at::Tensor bqkv = at::zeros({3 * d.c}, at::TensorOptions().dtype(at::kFloat));
  if (qk_b.has_value() && qk_b->defined()) bqkv = at::cat({qk_b->to(at::kFloat), v_b->to(at::kFloat)}, 0);
  LaneWeights& w = lp.w;
  w.ln1w = keep(ln1_w), w.ln1b = keep(ln1_b), w.ln2w = keep(ln2_w), w.ln2b = keep(ln2_b);
  w.wqkv = keep(wqkv), w.bqkv = keep(bqkv), w.wp = keep(proj_w), w.bp = keep(proj_b);
  w.w1 = keep(fc1_w), w.b1 = keep(fc1_b), w.w2 = keep(fc2_w), w.b2 = keep(fc2_b);
  if (backward) {
    w.wqkvT = keep(wqkv.t()), w.wpT = keep(proj_w.t()), w.w1T = keep(fc1_w.t()), w.w2T = keep(fc2_w.t());
  }
  return lp;
}

// The lane layout's shapes: tiles of up to about 32 rows (words of W sentences), as many groups a tile as
// keeps the threads' shares of groups even.
LaneDims lane_dims(const Dims& d, int64_t S, int W) {
  LaneDims ld{};
  ld.m = d.m, ld.c = d.c, ld.H = d.H, ld.heads = d.heads, ld.hd = d.hd, ld.W = W, ld.eps = d.eps, ld.scale = d.scale;
  const int64_t groups = (S + W - 1) / W;
  const int64_t threads = std::max(1, at::get_num_threads());
  // the most groups any thread runs, with g groups a tile; the largest g up to the target that gives the
  // fewest (batch 1 of TNT-S, 13 groups on 2 threads: 1 a tile, 7 + 6, not 2 a tile, 8 + 5)
  auto busiest = [&](int64_t g) { return ((groups + g - 1) / g + threads - 1) / threads * g; };
  int64_t best = 1;
  for (int64_t g = 2; g <= std::max(1, 32 / d.m); ++g)
    if (busiest(g) <= busiest(best)) best = g;
  ld.groups = static_cast<int>(best);
  return ld;
}

// What one call (forward or backward) needs: the shapes, the kernels, the packed weights, the scales.
struct Call {
  at::Tensor x;
  Problem p;
  const Variant* kern = nullptr;
  bool bf16 = false;
  bool lanes = false;  // the lane layout runs (then `lw` and `ld`, not `w`)
  LaneDims ld{};
  LanePack lw;
  Weights w;
  at::Tensor attn_scale_f32, mlp_scale_f32;  // hold the fp32 copies k1 / k2 point into
  const float* k1 = nullptr;
  const float* k2 = nullptr;
  int64_t ntiles = 0;
  const float* attn_scale_at(int64_t s0) const { return k1 ? k1 + s0 : nullptr; }
  const float* mlp_scale_at(int64_t s0) const { return k2 ? k2 + s0 : nullptr; }
  int64_t first_sentence(int64_t t) const { return t * p.tile; }
  int rows_of(int64_t t) const {
    return static_cast<int>(std::min<int64_t>(p.tile, p.S - t * p.tile)) * p.d.m;
  }
  // A tile's scratch; the AMX tile state is released when the scratch of a thread's last tile goes.
  Scratch scratch() const { return Scratch(p.tile * p.d.m, p.d, bf16); }
  void release() const {
    if (bf16 && w.qkv.packed) at::native::cpublas::brgemm_release(true);
  }
};

const float* keep_ptr(const c10::optional<at::Tensor>& keep, at::Tensor& holder) {
  if (!keep.has_value() || !keep->defined()) return nullptr;
  holder = keep->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

Call prepare_call(const at::Tensor& x_in, const at::Tensor& ln1_w, const at::Tensor& ln1_b, const at::Tensor& qk_w,
                  const c10::optional<at::Tensor>& qk_b, const at::Tensor& v_w, const c10::optional<at::Tensor>& v_b,
                  const at::Tensor& proj_w, const at::Tensor& proj_b, const at::Tensor& ln2_w,
                  const at::Tensor& ln2_b, const at::Tensor& fc1_w, const at::Tensor& fc1_b, const at::Tensor& fc2_w,
                  const at::Tensor& fc2_b, const c10::optional<at::Tensor>& attn_scale,
                  const c10::optional<at::Tensor>& mlp_scale, int64_t num_heads, double eps, bool low_precision,
                  bool backward) {
  Call c;
  c.kern = &current_variant();
  c.p = make_problem(x_in, ln1_w, ln1_b, qk_w, qk_b, v_w, v_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w,
                     fc2_b, attn_scale, mlp_scale, num_heads, eps, c.kern->W);
  c.x = x_in.contiguous();
  c.k1 = keep_ptr(attn_scale, c.attn_scale_f32);
  c.k2 = keep_ptr(mlp_scale, c.mlp_scale_f32);
  c.lanes = use_lanes(c.p.d.m, c.p.d.c, c.kern->W, bf16_gemms(low_precision),
                      low_precision && g_bf16.load() == kBf16Brgemm);
  if (c.lanes) {  // fp32 throughout (its products are tiny; a bf16 GEMM would not be faster)
    c.ld = lane_dims(c.p.d, c.p.S, c.kern->W);
    c.lw = pack_lane_weights(c.p.d, ln1_w, ln1_b, qk_w, qk_b, v_w, v_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b,
                             fc2_w, fc2_b, backward);
    const int64_t span = static_cast<int64_t>(c.ld.groups) * c.ld.W;  // sentences per tile
    c.ntiles = (c.p.S + span - 1) / span;
    return c;
  }
  c.bf16 = bf16_gemms(low_precision);
  c.w = pack_weights(c.p.d, ln1_w, ln1_b, qk_w, qk_b, v_w, v_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w,
                     fc2_b, backward, c.bf16);
  c.ntiles = (c.p.S + c.p.tile - 1) / c.p.tile;
  return c;
}

// ---------------------------------------------------------------------------- lane-layout calls

// A tile of the lane layout: its first sentence and its groups (the last tile may have fewer).
struct LaneTile {
  int64_t s0;
  int groups;
  int rows(const LaneDims& d) const { return groups * d.m; }
};

LaneTile lane_tile(const Call& call, int64_t t) {
  const int64_t span = static_cast<int64_t>(call.ld.groups) * call.ld.W;
  const int64_t s0 = t * span, left = call.p.S - s0;
  return {s0, static_cast<int>(std::min<int64_t>(call.ld.groups, (left + call.ld.W - 1) / call.ld.W))};
}

// dst[(g * mc + e) * W + l] = src[(s0 + g * W + l) * mc + e]: the tile's sentences into lanes (zeros past S).
template <typename T>
void lanes_in(const T* src, int64_t S, const LaneTile& t, int mc, int W, float* dst) {
  for (int g = 0; g < t.groups; ++g)
    for (int l = 0; l < W; ++l) {
      const int64_t sent = t.s0 + static_cast<int64_t>(g) * W + l;
      float* d = dst + static_cast<int64_t>(g) * mc * W + l;
      if (sent < S) {
        const T* p = src + sent * mc;
        for (int e = 0; e < mc; ++e) d[e * W] = static_cast<float>(p[e]);
      } else {
        for (int e = 0; e < mc; ++e) d[e * W] = 0.f;
      }
    }
}

// The inverse of lanes_in for the sentences that exist.
template <typename T>
void lanes_out(const float* src, int64_t S, const LaneTile& t, int mc, int W, T* dst) {
  for (int g = 0; g < t.groups; ++g)
    for (int l = 0; l < W; ++l) {
      const int64_t sent = t.s0 + static_cast<int64_t>(g) * W + l;
      if (sent >= S) return;
      const float* s = src + static_cast<int64_t>(g) * mc * W + l;
      T* p = dst + sent * mc;
      for (int e = 0; e < mc; ++e) p[e] = static_cast<T>(s[e * W]);
    }
}

void lanes_load(const at::Tensor& x, int64_t S, const LaneTile& t, const LaneDims& d, float* dst) {
  const int mc = d.m * d.c;
  if (x.scalar_type() == at::kFloat) lanes_in(x.data_ptr<float>(), S, t, mc, d.W, dst);
  else lanes_in(x.data_ptr<c10::BFloat16>(), S, t, mc, d.W, dst);
}

void lanes_store(const float* src, int64_t S, const LaneTile& t, const LaneDims& d, at::Tensor& y) {
  const int mc = d.m * d.c;
  if (y.scalar_type() == at::kFloat) lanes_out(src, S, t, mc, d.W, y.data_ptr<float>());
  else lanes_out(src, S, t, mc, d.W, y.data_ptr<c10::BFloat16>());
}

// The drop-path scales of a tile's sentences, one vector per group (null when the call has none).
const float* lane_keep(const float* keep, int64_t S, const LaneTile& t, int W, std::vector<float>& buf) {
  if (!keep) return nullptr;
  for (int i = 0; i < t.groups * W; ++i) buf[i] = t.s0 + i < S ? keep[t.s0 + i] : 0.f;
  return buf.data();
}

at::Tensor lanes_forward_call(const Call& call) {
  const LaneDims& d = call.ld;
  at::Tensor y = at::empty_like(call.x);
  at::parallel_for(0, call.ntiles, 1, [&](int64_t t0, int64_t t1) {
    LaneScratch s(d, false);
    std::vector<float> k1(d.groups * d.W), k2(d.groups * d.W);
    for (int64_t t = t0; t < t1; ++t) {
      const LaneTile tile = lane_tile(call, t);
      lanes_load(call.x, call.p.S, tile, d, s.x.data());
      call.kern->lanes_forward(s, tile.rows(d), d, call.lw.w, lane_keep(call.k1, call.p.S, tile, d.W, k1),
                               lane_keep(call.k2, call.p.S, tile, d.W, k2), s.out.data(), false);
      lanes_store(s.out.data(), call.p.S, tile, d, y);
    }
  });
  return y;
}

// Per chunk of tiles, weight gradients accumulate in a LaneGrads; the chunks are summed in order and each
// vector over its lanes in order, so the result does not depend on the scheduling.
LaneGrads lanes_backward_call(const Call& call, const at::Tensor& grad, const Needs& need, at::Tensor& gx) {
  const LaneDims& d = call.ld;
  const int64_t nchunks = std::min<int64_t>(call.ntiles, std::max(1, at::get_num_threads()));
  std::vector<LaneGrads> grads(std::max<int64_t>(1, nchunks), LaneGrads(d, need));  // one: no sentences
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    LaneScratch s(d, true);
    std::vector<float> k1(d.groups * d.W), k2(d.groups * d.W);
    for (int64_t ch = c0; ch < c1; ++ch)
      for (int64_t t = ch * call.ntiles / nchunks; t < (ch + 1) * call.ntiles / nchunks; ++t) {
        const LaneTile tile = lane_tile(call, t);
        const float* kk1 = lane_keep(call.k1, call.p.S, tile, d.W, k1);
        const float* kk2 = lane_keep(call.k2, call.p.S, tile, d.W, k2);
        lanes_load(call.x, call.p.S, tile, d, s.x.data());
        call.kern->lanes_forward(s, tile.rows(d), d, call.lw.w, kk1, kk2, nullptr, true);
        lanes_load(grad, call.p.S, tile, d, s.dy.data());
        call.kern->lanes_backward(s, tile.rows(d), d, call.lw.w, kk1, kk2, grads[ch]);
        if (need.x) lanes_store(s.dx.data(), call.p.S, tile, d, gx);
      }
  });
  for (int64_t ch = 1; ch < nchunks; ++ch) {
    auto dst = grads[0].all(), src = grads[ch].all();
    for (size_t i = 0; i < dst.size(); ++i)
      for (size_t j = 0; j < dst[i]->size(); ++j) (*dst[i])[j] += (*src[i])[j];
  }
  return std::move(grads[0]);
}

// (n * W) vector accumulators -> n values (each the sum over its lanes), as a tensor shaped and typed like
// `like`.
at::Tensor lane_sum(const std::vector<float>& acc, int W, const at::Tensor& like) {
  const int64_t n = static_cast<int64_t>(acc.size()) / W;
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    float sum = 0.f;
    for (int l = 0; l < W; ++l) sum += acc[i * W + l];
    o[i] = sum;
  }
  return out.to(like.scalar_type()).view(like.sizes());
}

// ------------------------------------------------------------------------------------ the ops

at::Tensor inner_transformer_cpu(const at::Tensor& x_in, const at::Tensor& ln1_w, const at::Tensor& ln1_b,
                                 const at::Tensor& qk_w, const c10::optional<at::Tensor>& qk_b,
                                 const at::Tensor& v_w, const c10::optional<at::Tensor>& v_b,
                                 const at::Tensor& proj_w, const at::Tensor& proj_b, const at::Tensor& ln2_w,
                                 const at::Tensor& ln2_b, const at::Tensor& fc1_w, const at::Tensor& fc1_b,
                                 const at::Tensor& fc2_w, const at::Tensor& fc2_b,
                                 const c10::optional<at::Tensor>& attn_scale, const c10::optional<at::Tensor>& mlp_scale,
                                 int64_t num_heads, double eps, bool low_precision) {
  const Call call = prepare_call(x_in, ln1_w, ln1_b, qk_w, qk_b, v_w, v_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w,
                                 fc1_b, fc2_w, fc2_b, attn_scale, mlp_scale, num_heads, eps, low_precision, false);
  if (call.lanes) return lanes_forward_call(call);
  const Dims& d = call.p.d;
  at::Tensor y = at::empty_like(call.x);
  at::parallel_for(0, call.ntiles, 1, [&](int64_t t0, int64_t t1) {
    Scratch s = call.scratch();
    std::vector<float> out(call.p.tile * d.m * d.cp);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s0 = call.first_sentence(t);
      const int rows = call.rows_of(t);
      load_tile(call.x, s0, rows, d, s.x.data());
      call.kern->forward(s, rows, d, call.w, call.attn_scale_at(s0), call.mlp_scale_at(s0), out.data(), false);
      store_tile(out.data(), s0, rows, d, y);
    }
    call.release();
  });
  return y;
}

// (rows x ld) padded fp32 accumulator -> (rows x cols) tensor of `like`'s dtype and shape.
at::Tensor unpack(const std::vector<float>& acc, int rows, int cols, int ld, const at::Tensor& like) {
  at::Tensor t = at::from_blob(const_cast<float*>(acc.data()), {rows, ld}, at::TensorOptions().dtype(at::kFloat));
  return t.narrow(1, 0, cols).to(like.scalar_type()).clone().view(like.sizes());  // clone: acc is freed
}

std::vector<at::Tensor> inner_transformer_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& ln1_w, const at::Tensor& ln1_b,
    const at::Tensor& qk_w, const c10::optional<at::Tensor>& qk_b, const at::Tensor& v_w,
    const c10::optional<at::Tensor>& v_b, const at::Tensor& proj_w, const at::Tensor& proj_b,
    const at::Tensor& ln2_w, const at::Tensor& ln2_b, const at::Tensor& fc1_w, const at::Tensor& fc1_b,
    const at::Tensor& fc2_w, const at::Tensor& fc2_b, const c10::optional<at::Tensor>& attn_scale,
    const c10::optional<at::Tensor>& mlp_scale, int64_t num_heads, double eps, bool low_precision,
    std::array<bool, 7> output_mask) {
  const Call call = prepare_call(x_in, ln1_w, ln1_b, qk_w, qk_b, v_w, v_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w,
                                 fc1_b, fc2_w, fc2_b, attn_scale, mlp_scale, num_heads, eps, low_precision, true);
  const Needs need(output_mask);
  const Dims& d = call.p.d;
  const at::Tensor& x = call.x;
  TORCH_CHECK(grad_in.sizes() == x.sizes(), "inner_transformer_backward: grad has shape ", grad_in.sizes(),
              ", x has ", x.sizes());
  TORCH_CHECK(grad_in.device().is_cpu(), "inner_transformer_backward: grad must be a CPU tensor");
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat || grad_in.scalar_type() == at::kBFloat16,
              "inner_transformer_backward: grad must be float32 or bfloat16, got ", grad_in.scalar_type());
  at::Tensor grad = grad_in.contiguous();
  at::Tensor gx = at::empty_like(x);
  // a gradient that was not asked for (or a bias that is absent) comes back as an empty fp32 tensor, a
  // new one each (outputs never alias each other)
  auto either = [&](bool needed, auto make) {
    return needed ? at::Tensor(make()) : at::empty({0}, x.options().dtype(at::kFloat));
  };
  const bool qkv_bias = qk_b.has_value() && qk_b->defined();
  if (call.lanes) {
    const LaneGrads g = lanes_backward_call(call, grad, need, gx);
    const int W = call.ld.W, c = d.c;
    const at::Tensor gwqkv = lane_sum(g.wqkv, W, at::empty({3 * c, c})), gbqkv = lane_sum(g.bqkv, W, at::empty({3 * c}));
    return {
        either(need.x, [&] { return gx; }),
        either(need.ln1, [&] { return lane_sum(g.ln1w, W, ln1_w); }),
        either(need.ln1, [&] { return lane_sum(g.ln1b, W, ln1_b); }),
        either(need.qkv, [&] { return gwqkv.narrow(0, 0, 2 * c).to(qk_w.scalar_type()).clone(); }),
        either(need.qkv && qkv_bias, [&] { return gbqkv.narrow(0, 0, 2 * c).to(qk_b->scalar_type()).clone(); }),
        either(need.qkv, [&] { return gwqkv.narrow(0, 2 * c, c).to(v_w.scalar_type()).clone(); }),
        either(need.qkv && qkv_bias, [&] { return gbqkv.narrow(0, 2 * c, c).to(v_b->scalar_type()).clone(); }),
        either(need.proj, [&] { return lane_sum(g.wp, W, proj_w); }),
        either(need.proj, [&] { return lane_sum(g.bp, W, proj_b); }),
        either(need.ln2, [&] { return lane_sum(g.ln2w, W, ln2_w); }),
        either(need.ln2, [&] { return lane_sum(g.ln2b, W, ln2_b); }),
        either(need.fc1, [&] { return lane_sum(g.w1, W, fc1_w); }),
        either(need.fc1, [&] { return lane_sum(g.b1, W, fc1_b); }),
        either(need.fc2, [&] { return lane_sum(g.w2, W, fc2_w); }),
        either(need.fc2, [&] { return lane_sum(g.b2, W, fc2_b); }),
    };
  }
  // Tiles in a fixed number of chunks, each with its own gradient accumulators: indexed by chunk, never
  // by an OpenMP thread id, and summed in chunk order, so the result does not depend on the scheduling.
  const int64_t nchunks = std::min<int64_t>(call.ntiles, std::max(1, at::get_num_threads()));
  std::vector<Grads> grads(nchunks, Grads(d, need));
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    const int R = call.p.tile * d.m;
    Scratch s = call.scratch();
    std::vector<float> out(R * d.cp), dy(R * d.cp), dz(R * d.cp), dg(R * std::max(d.Hp, d.cp)), dx(R * d.cp),
        dqkv(R * d.c3p);
    for (int64_t ch = c0; ch < c1; ++ch) {
      for (int64_t t = ch * call.ntiles / nchunks; t < (ch + 1) * call.ntiles / nchunks; ++t) {
        const int64_t s0 = call.first_sentence(t);
        const int rows = call.rows_of(t);
        load_tile(x, s0, rows, d, s.x.data());
        const float* kk1 = call.attn_scale_at(s0);
        const float* kk2 = call.mlp_scale_at(s0);
        call.kern->forward(s, rows, d, call.w, kk1, kk2, out.data(), true);
        load_tile(grad, s0, rows, d, dy.data());
        call.kern->backward(s, rows, d, call.w, kk1, kk2, dy.data(), dz.data(), dg.data(), dx.data(), dqkv.data(),
                            grads[ch]);
        if (need.x) store_tile(dx.data(), s0, rows, d, gx);
      }
    }
    call.release();
  });
  Grads tot(d, need);
  for (const Grads& g : grads) tot.add(g);
  const int c = d.c;
  at::Tensor gwqkv = at::from_blob(tot.wqkv.data(), {3 * c, d.cp}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor gbqkv = at::from_blob(tot.bqkv.data(), {d.c3p}, at::TensorOptions().dtype(at::kFloat));
  return {
      either(need.x, [&] { return gx; }),
      either(need.ln1, [&] { return unpack(tot.ln1w, 1, c, d.cp, ln1_w); }),
      either(need.ln1, [&] { return unpack(tot.ln1b, 1, c, d.cp, ln1_b); }),
      either(need.qkv, [&] { return gwqkv.narrow(0, 0, 2 * c).narrow(1, 0, c).to(qk_w.scalar_type()).clone(); }),
      either(need.qkv && qkv_bias, [&] { return gbqkv.narrow(0, 0, 2 * c).to(qk_b->scalar_type()).clone(); }),
      either(need.qkv, [&] { return gwqkv.narrow(0, 2 * c, c).narrow(1, 0, c).to(v_w.scalar_type()).clone(); }),
      either(need.qkv && qkv_bias, [&] { return gbqkv.narrow(0, 2 * c, c).to(v_b->scalar_type()).clone(); }),
      either(need.proj, [&] { return unpack(tot.wp, c, c, d.cp, proj_w); }),
      either(need.proj, [&] { return unpack(tot.bp, 1, c, d.cp, proj_b); }),
      either(need.ln2, [&] { return unpack(tot.ln2w, 1, c, d.cp, ln2_w); }),
      either(need.ln2, [&] { return unpack(tot.ln2b, 1, c, d.cp, ln2_b); }),
      either(need.fc1, [&] { return unpack(tot.w1, d.H, c, d.cp, fc1_w); }),
      either(need.fc1, [&] { return unpack(tot.b1, 1, d.H, d.Hp, fc1_b); }),
      either(need.fc2, [&] { return unpack(tot.w2, c, d.H, d.Hp, fc2_w); }),
      either(need.fc2, [&] { return unpack(tot.b2, 1, c, d.cp, fc2_b); }),
  };
}

}  // namespace

TORCH_LIBRARY(tntvision, m) {
  m.def(
      "inner_transformer(Tensor x, Tensor ln1_w, Tensor ln1_b, Tensor qk_w, Tensor? qk_b, Tensor v_w, "
      "Tensor? v_b, Tensor proj_w, Tensor proj_b, Tensor ln2_w, Tensor ln2_b, Tensor fc1_w, Tensor fc1_b, "
      "Tensor fc2_w, Tensor fc2_b, Tensor? attn_scale, Tensor? mlp_scale, int num_heads, float eps, "
      "bool low_precision=False) -> Tensor");
  m.def(
      "inner_transformer_backward(Tensor grad, Tensor x, Tensor ln1_w, Tensor ln1_b, Tensor qk_w, Tensor? qk_b, "
      "Tensor v_w, Tensor? v_b, Tensor proj_w, Tensor proj_b, Tensor ln2_w, Tensor ln2_b, Tensor fc1_w, "
      "Tensor fc1_b, Tensor fc2_w, Tensor fc2_b, Tensor? attn_scale, Tensor? mlp_scale, int num_heads, float eps, "
      "bool low_precision=False, bool[7] output_mask=[True, True, True, True, True, True, True]) -> Tensor[]");
  // [instruction set running, how low-precision GEMMs run, instruction sets this CPU can run, layout setting]
  m.def("kernel_dispatch() -> str[]", &kernel_dispatch);
  m.def("set_kernel_dispatch(str isa, str bf16, str layout=\"auto\") -> ()", &set_kernel_dispatch);
  m.def("kernel_layout(int words, int dim) -> str", &kernel_layout);
}

#ifdef TNT_PROFILE
at::Tensor kernel_profile() {
  at::Tensor t = at::empty({16}, at::TensorOptions().dtype(at::kDouble));
  for (int i = 0; i < 16; ++i) t[i] = g_prof[i], g_prof[i] = 0;
  return t;
}
TORCH_LIBRARY_FRAGMENT(tntvision, m) { m.def("kernel_profile() -> Tensor", &kernel_profile); }
#endif

TORCH_LIBRARY_IMPL(tntvision, CPU, m) {
  m.impl("inner_transformer", &inner_transformer_cpu);
  m.impl("inner_transformer_backward", &inner_transformer_backward_cpu);
}
