// TNT's inner transformer as one fused CPU operation: forward and backward.
//
// One call runs a block's whole inner transformer over every sentence (patch) of a batch:
//
//   x1 = x  + keep1 * proj(attention(LN1(x)))        attention over the m words of each sentence
//   x2 = x1 + keep2 * fc2(gelu(fc1(LN2(x1))))        exact (erf) GELU
//
// x is (S, m, c): S sentences of m words of c features. keep1 / keep2 are optional per-sentence drop-path
// scales (0 or 1/keep). Sentences are processed in tiles of about 256 words that stay in the L2 cache;
// every intermediate of a tile lives in a per-thread scratch buffer, and the backward pass recomputes a
// tile's forward from x instead of keeping anything (so autograd keeps only x for this whole transformer).
//
// Compute is fp32 throughout; x and the outputs may be fp32 or bf16 (converted per tile), the weights any
// floating dtype (packed to fp32 once per call). The small GEMMs (K = c or 4c, c = 8..40) run on a
// register-blocked micro-kernel written with GCC vector extensions (8 floats per vector: AVX2 or AVX-512VL
// on x86, NEON pairs elsewhere); the compiler flags come from tntvision/models/kernels.py.
//
// Layout of a tile's row-major buffers: every row is padded to a multiple of 8 floats with zeros, so the
// vector loops never need a tail; padding columns are never read as data.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
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

constexpr int kW = 8;                 // floats per vector
constexpr int kTileWords = 256;       // words per tile (rounded to whole sentences)
typedef float vf __attribute__((vector_size(32)));
typedef float vfu __attribute__((vector_size(32), aligned(4)));  // unaligned access
typedef int32_t vi __attribute__((vector_size(32)));

inline int rup(int n) { return (n + kW - 1) / kW * kW; }
inline vf vld(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void vst(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
inline vf splat(float a) { return vf{a, a, a, a, a, a, a, a}; }
inline float hsum(vf v) {
#if defined(__AVX__)
  __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#else
  float s = 0.f;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
#endif
}
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// exp(x), Cephes-style: 2^n * p(r), |rel err| ~ 1 ulp. Inputs are clamped to [-87, 88].
inline vf vexp(vf x) {
#if defined(__AVX__)
  x = (vf)_mm256_max_ps(_mm256_min_ps((__m256)x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
  vf fx = x * 1.44269504088896341f + 0.5f;
  vf fl = (vf)_mm256_round_ps((__m256)fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#else
  x = x > 88.0f ? splat(88.0f) : x;
  x = x < -87.0f ? splat(-87.0f) : x;
  vf fx = x * 1.44269504088896341f + 0.5f;
  vf t = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);  // trunc toward zero
  vf fl = t + __builtin_convertvector(t > fx, vf);                      // floor (true lanes are -1)
#endif
  x = x - fl * 0.693359375f - fl * -2.12194440e-4f;
  vf z = x * x;
  vf y = splat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  vi n = (__builtin_convertvector(fl, vi) + 127) << 23;
  vf pow2n;
  std::memcpy(&pow2n, &n, sizeof pow2n);
  return y * pow2n;
}

// 1/a to within ~1 ulp: the hardware estimate refined by Newton steps (a divide is several times slower).
inline vf vrcp(vf a) {
#if defined(__AVX512VL__)
  vf r = (vf)_mm256_rcp14_ps((__m256)a);  // 14-bit estimate
  return r * (2.0f - a * r);
#elif defined(__AVX__)
  vf r = (vf)_mm256_rcp_ps((__m256)a);  // 12-bit estimate
  r = r * (2.0f - a * r);
  return r * (2.0f - a * r);
#else
  return 1.0f / a;
#endif
}

// erf(x), Abramowitz & Stegun 7.1.26 (|abs err| <= 1.5e-7), the formula PyTorch's vectorised CPU erf uses.
inline vf verf(vf x) {
  vf ax = x < 0.f ? -x : x;
  vf t = vrcp(1.0f + 0.3275911f * ax);
  vf r = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  vf e = 1.0f - r * vexp(-ax * ax);
  return x < 0.f ? -e : e;
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// C[m, n] (+)= sum_k A(m, k) * B[k, n] for an MR x (NB*8) block; A(m, k) = A[m*sam + k*sak].
template <int MR, int NB>
inline void gemm_block(int K, const float* A, int64_t sam, int64_t sak, const float* B, int64_t ldb, float* C,
                       int64_t ldc, bool acc) {
  vf c[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NB; ++v) c[r][v] = acc ? vld(C + r * ldc + v * kW) : vf{};
  for (int k = 0; k < K; ++k) {
    vf b[NB];
    for (int v = 0; v < NB; ++v) b[v] = vld(B + k * ldb + v * kW);
    for (int r = 0; r < MR; ++r) {
      vf a = splat(A[r * sam + k * sak]);
      for (int v = 0; v < NB; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NB; ++v) vst(C + r * ldc + v * kW, c[r][v]);
}

// Rows per register block: 8 x 3 accumulators fit AVX-512's 32 vector registers, 4 x 3 fit AVX2's 16.
#if defined(__AVX512VL__)
constexpr int kMR = 8;
#else
constexpr int kMR = 4;
#endif

template <int NB>
inline void gemm_cols(int M, int K, const float* A, int64_t sam, int64_t sak, const float* B, int64_t ldb, float* C,
                      int64_t ldc, bool acc) {
  int m = 0;
  for (; m + kMR <= M; m += kMR) gemm_block<kMR, NB>(K, A + m * sam, sam, sak, B, ldb, C + m * ldc, ldc, acc);
  for (; m + 4 <= M; m += 4) gemm_block<4, NB>(K, A + m * sam, sam, sak, B, ldb, C + m * ldc, ldc, acc);
  for (; m < M; ++m) gemm_block<1, NB>(K, A + m * sam, sam, sak, B, ldb, C + m * ldc, ldc, acc);
}

// C (M x N, ldc) (+)= A (M x K, strides sam/sak) @ B (K x N, row-major ldb); N a multiple of 8.
void gemm(int M, int N, int K, const float* A, int64_t sam, int64_t sak, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool acc) {
  int n = 0;
  for (; n + 3 * kW <= N; n += 3 * kW) gemm_cols<3>(M, K, A, sam, sak, B + n, ldb, C + n, ldc, acc);
  if (N - n == 2 * kW) gemm_cols<2>(M, K, A, sam, sak, B + n, ldb, C + n, ldc, acc);
  if (N - n == kW) gemm_cols<1>(M, K, A, sam, sak, B + n, ldb, C + n, ldc, acc);
}

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

struct Dims {
  int m, c, H, heads, hd;
  int cp, c3p, Hp, mp;  // padded row lengths (multiples of 8)
  float eps, scale;
};

// The fp32 weights of one call, packed for the micro-kernel (forward: transposed, backward: as stored).
struct Weights {
  at::Tensor ln1w, ln1b, ln2w, ln2b;  // (cp)
  at::Tensor wqkvT, bqkv;             // (c, c3p), (c3p)
  at::Tensor wpT, bp;                 // (c, cp), (cp)
  at::Tensor w1T, b1;                 // (c, Hp), (Hp)
  at::Tensor w2T, b2;                 // (H, cp), (cp)
  at::Tensor wqkv, wp, w1, w2;        // backward: (3c, cp), (c, cp), (H, cp), (c, Hp)
};

// Per-tile scratch: every forward intermediate of up to R words.
struct Scratch {
  std::vector<float> x, xn1, qkv, o, x1, xn2, h, g, cdf, mean1, rstd1, mean2, rstd2;
  std::vector<float> P;  // transposed attention weights of every (sentence, head) of the tile: (m, mp) each
  std::vector<float> qT, oT, dPT, dqT, doT, rowdot;
  Scratch(int R, const Dims& d)
      : x(R * d.cp), xn1(R * d.cp), qkv(R * d.c3p), o(R * d.cp), x1(R * d.cp), xn2(R * d.cp), h(R * d.Hp),
        g(R * d.Hp), cdf(R * d.Hp), mean1(R), rstd1(R), mean2(R), rstd2(R), P((R / d.m) * d.heads * d.m * d.mp),
        qT(d.hd * d.mp), oT(d.hd * d.mp), dPT(d.m * d.mp), dqT(d.hd * d.mp), doT(d.hd * d.mp), rowdot(d.mp) {}
  float* weights(int sentence, int head, const Dims& d) { return P.data() + (sentence * d.heads + head) * d.m * d.mp; }
};

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

// Lanes of the last vector of a padded row that hold data (1) or padding (0).
inline vf tail_mask(int c, int cp) {
  vf m;
  for (int l = 0; l < kW; ++l) m[l] = (cp - kW + l) < c ? 1.f : 0.f;
  return m;
}

// LayerNorm over the first c of each padded row; keeps mean and 1/std per row; padding stays zero (x's
// padding is zero, and so is the padding of w and b).
void layer_norm(const float* x, int rows, const Dims& d, const float* w, const float* b, float* y, float* mean,
                float* rstd) {
  const int cp = d.cp;
  const vf last = tail_mask(d.c, cp);
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + r * cp;
    vf s{};
    for (int j = 0; j < cp; j += kW) s += vld(xr + j);
    const float mu = hsum(s) / d.c;
    vf v{};
    for (int j = 0; j < cp; j += kW) {
      vf dv = vld(xr + j) - mu;
      if (j + kW == cp) dv *= last;
      v += dv * dv;
    }
    const float rs = 1.0f / std::sqrt(hsum(v) / d.c + d.eps);
    mean[r] = mu;
    rstd[r] = rs;
    float* yr = y + r * cp;
    for (int j = 0; j < cp; j += kW) vst(yr + j, (vld(xr + j) - mu) * rs * vld(w + j) + vld(b + j));
  }
}

// dx (+)= LayerNorm backward of dy (whose padding is zero); accumulates the weight and bias gradients.
void layer_norm_backward(const float* dy, const float* x, int rows, const Dims& d, const float* w,
                         const float* mean, const float* rstd, float* dx, float* gw, float* gb) {
  const int cp = d.cp;
  const vf last = tail_mask(d.c, cp);
  for (int r = 0; r < rows; ++r) {
    const float* dyr = dy + r * cp;
    const float* xr = x + r * cp;
    float* dxr = dx + r * cp;
    const float mu = mean[r], rs = rstd[r];
    vf s1{}, s2{};
    for (int j = 0; j < cp; j += kW) {
      vf xhat = (vld(xr + j) - mu) * rs, g = vld(dyr + j) * vld(w + j);
      vst(gw + j, vld(gw + j) + vld(dyr + j) * xhat);
      vst(gb + j, vld(gb + j) + vld(dyr + j));
      s1 += g;
      s2 += g * xhat;
    }
    const float m1 = hsum(s1) / d.c, m2 = hsum(s2) / d.c;
    for (int j = 0; j < cp; j += kW) {
      vf xhat = (vld(xr + j) - mu) * rs;
      vf g = rs * (vld(dyr + j) * vld(w + j) - m1 - xhat * m2);
      if (j + kW == cp) g *= last;
      vst(dxr + j, vld(dxr + j) + g);
    }
  }
}

// Transposed attention weights of one sentence and head: PT[j][i] = softmax_j(q_i . k_j * scale).
// Also leaves qT[d][i] = q[i][d] * scale. q and k point at the head's first column in the qkv rows.
// out[dd][u] = scale * sum_j coef[j * cs + dd] * rows[j][u] for dd < n, u < mp (rows and out: (., mp)).
// Blocks of 4 dd x NU vectors keep 4 * NU independent accumulators in registers, so the m-long sums
// pipeline instead of waiting on each FMA's latency.
template <int NU>
void mix_rows_nu(int n, int m, const float* coef, int64_t cs, const float* rows, float scale, float* out) {
  constexpr int mp = NU * kW;
  int dd = 0;
  for (; dd + 4 <= n; dd += 4) {
    vf acc[4][NU] = {};
    for (int j = 0; j < m; ++j) {
      vf r[NU];
      for (int u = 0; u < NU; ++u) r[u] = vld(rows + j * mp + u * kW);
      for (int t = 0; t < 4; ++t) {
        vf c = splat(coef[j * cs + dd + t]);
        for (int u = 0; u < NU; ++u) acc[t][u] += c * r[u];
      }
    }
    for (int t = 0; t < 4; ++t)
      for (int u = 0; u < NU; ++u) vst(out + (dd + t) * mp + u * kW, acc[t][u] * scale);
  }
  for (; dd < n; ++dd) {
    vf acc[NU] = {};
    for (int j = 0; j < m; ++j) {
      vf c = splat(coef[j * cs + dd]);
      for (int u = 0; u < NU; ++u) acc[u] += c * vld(rows + j * mp + u * kW);
    }
    for (int u = 0; u < NU; ++u) vst(out + dd * mp + u * kW, acc[u] * scale);
  }
}

void mix_rows(const Dims& d, const float* coef, const float* rows, float scale, float* out) {
  switch (d.mp / kW) {
    case 1: return mix_rows_nu<1>(d.hd, d.m, coef, d.c3p, rows, scale, out);
    case 2: return mix_rows_nu<2>(d.hd, d.m, coef, d.c3p, rows, scale, out);
    case 3: return mix_rows_nu<3>(d.hd, d.m, coef, d.c3p, rows, scale, out);
    case 4: return mix_rows_nu<4>(d.hd, d.m, coef, d.c3p, rows, scale, out);
    default:
      for (int dd = 0; dd < d.hd; ++dd)
        for (int u = 0; u < d.mp; u += kW) {
          vf acc{};
          for (int j = 0; j < d.m; ++j) acc += splat(coef[j * d.c3p + dd]) * vld(rows + j * d.mp + u);
          vst(out + dd * d.mp + u, acc * scale);
        }
  }
}

inline void scaled_q_transposed(const float* q, const Dims& d, float* qT) {
  for (int dd = 0; dd < d.hd; ++dd)
    for (int i = 0; i < d.mp; ++i) qT[dd * d.mp + i] = i < d.m ? q[i * d.c3p + dd] * d.scale : 0.f;
}

void attention_weights(const float* q, const float* k, const Dims& d, float* qT, float* PT) {
  const int m = d.m, mp = d.mp;
  scaled_q_transposed(q, d, qT);
  for (int j = 0; j < m; ++j)
    for (int u = 0; u < mp; u += kW) {
      vf acc{};
      for (int dd = 0; dd < d.hd; ++dd) acc += splat(k[j * d.c3p + dd]) * vld(qT + dd * mp + u);
      vst(PT + j * mp + u, acc);
    }
  for (int u = 0; u < mp; u += kW) {
    vf mx = vld(PT + u);
    for (int j = 1; j < m; ++j) mx = vmax(mx, vld(PT + j * mp + u));
    vf sum{};
    for (int j = 0; j < m; ++j) {
      vf e = vexp(vld(PT + j * mp + u) - mx);
      vst(PT + j * mp + u, e);
      sum += e;
    }
    vf inv = 1.0f / sum;
    for (int j = 0; j < m; ++j) vst(PT + j * mp + u, vld(PT + j * mp + u) * inv);
  }
}

// C (rows x N, row-major) = A (rows x K, row stride lda) W + b, with W packed as (K x N): the bias rows
// first, then the GEMM accumulates onto them.
void linear_rows(int rows, int N, int K, const float* A, int64_t lda, const float* W, const float* b, float* C) {
  for (int r = 0; r < rows; ++r) std::memcpy(C + r * N, b, N * sizeof(float));
  gemm(rows, N, K, A, lda, 1, W, N, C, N, true);
}

// dst = base + keep[sentence] * dst over padded rows of cp: a residual add with the drop-path scale
// (keep null: 1).
void add_residual(float* dst, const float* base, const float* keep, int rows, const Dims& d) {
  for (int r = 0; r < rows; ++r) {
    const float k = keep ? keep[r / d.m] : 1.0f;
    for (int j = 0; j < d.cp; j += kW) {
      const int i = r * d.cp + j;
      vst(dst + i, keep ? vld(base + i) + vld(dst + i) * k : vld(base + i) + vld(dst + i));
    }
  }
}

// dst = keep[sentence] * src over padded rows of cp (keep null: a copy).
void scale_rows(float* dst, const float* src, const float* keep, int rows, const Dims& d) {
  for (int r = 0; r < rows; ++r) {
    const float k = keep ? keep[r / d.m] : 1.0f;
    for (int j = 0; j < d.cp; j += kW) vst(dst + r * d.cp + j, vld(src + r * d.cp + j) * k);
  }
}

// Forward of one tile of `rows` words (rows / m sentences) into `out` (padded rows). With `for_backward`,
// it stops before fc2 (backward does not need x2) and also keeps GELU's cdf, Phi(h), in s.cdf.
void tile_forward(Scratch& s, int rows, const Dims& d, const Weights& w, const float* keep1, const float* keep2,
                  float* out, bool for_backward) {
  const float* ln1w = w.ln1w.data_ptr<float>();
  const float* ln1b = w.ln1b.data_ptr<float>();
  const float* ln2w = w.ln2w.data_ptr<float>();
  const float* ln2b = w.ln2b.data_ptr<float>();
  const int cp = d.cp, c3p = d.c3p, Hp = d.Hp, m = d.m, mp = d.mp;
  PROF_START();
  layer_norm(s.x.data(), rows, d, ln1w, ln1b, s.xn1.data(), s.mean1.data(), s.rstd1.data());
  PROF(0);
  float* qkv = s.qkv.data();
  linear_rows(rows, c3p, d.c, s.xn1.data(), cp, w.wqkvT.data_ptr<float>(), w.bqkv.data_ptr<float>(), qkv);
  PROF(1);
  for (int r0 = 0; r0 < rows; r0 += m)
    for (int hh = 0; hh < d.heads; ++hh) {
      const float* q = qkv + r0 * c3p + hh * d.hd;
      float* PT = s.weights(r0 / m, hh, d);
      attention_weights(q, q + d.c, d, s.qT.data(), PT);
      const float* v = q + 2 * d.c;
      mix_rows(d, v, PT, 1.0f, s.oT.data());  // oT[dd][i] = sum_j v[j][dd] P[i][j]
      float* o = s.o.data() + r0 * cp + hh * d.hd;
      for (int i = 0; i < m; ++i)
        for (int dd = 0; dd < d.hd; ++dd) o[i * cp + dd] = s.oT[dd * mp + i];
    }
  PROF(2);
  // x1 = x + keep1 * (o Wp^T + bp)
  float* x1 = s.x1.data();
  linear_rows(rows, cp, d.c, s.o.data(), cp, w.wpT.data_ptr<float>(), w.bp.data_ptr<float>(), x1);
  add_residual(x1, s.x.data(), keep1, rows, d);
  layer_norm(x1, rows, d, ln2w, ln2b, s.xn2.data(), s.mean2.data(), s.rstd2.data());
  PROF(3);
  float* h = s.h.data();
  linear_rows(rows, Hp, d.c, s.xn2.data(), cp, w.w1T.data_ptr<float>(), w.b1.data_ptr<float>(), h);
  PROF(4);
  float* g = s.g.data();
  for (int i = 0; i < rows * Hp; i += kW) {
    vf a = vld(h + i);
    vf cdf = 0.5f + 0.5f * verf(a * kSqrtHalf);
    if (for_backward) vst(s.cdf.data() + i, cdf);
    vst(g + i, a * cdf);
  }
  PROF(5);
  if (for_backward) return;
  linear_rows(rows, cp, d.H, g, Hp, w.w2T.data_ptr<float>(), w.b2.data_ptr<float>(), out);
  PROF(6);
  add_residual(out, x1, keep2, rows, d);
  PROF(7);
}

struct Problem {
  Dims d;
  int64_t S;
  int tile;  // sentences per tile
};

Problem make_problem(const at::Tensor& x, const at::Tensor& fc1_w, int64_t heads, double eps) {
  TORCH_CHECK(x.dim() == 3, "inner_transformer: x must be (sentences, words, dim), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "inner_transformer: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "inner_transformer: x must be float32 or bfloat16");
  Problem p;
  Dims& d = p.d;
  p.S = x.size(0);
  d.m = static_cast<int>(x.size(1));
  d.c = static_cast<int>(x.size(2));
  d.H = static_cast<int>(fc1_w.size(0));
  d.heads = static_cast<int>(heads);
  TORCH_CHECK(d.heads > 0 && d.c % d.heads == 0, "inner_transformer: dim not divisible by heads");
  d.hd = d.c / d.heads;
  d.cp = rup(d.c);
  d.c3p = rup(3 * d.c);
  d.Hp = rup(d.H);
  d.mp = rup(d.m);
  d.eps = static_cast<float>(eps);
  d.scale = 1.0f / std::sqrt(static_cast<float>(d.hd));
  // Sentences per tile: ~kTileWords words, then evened out so the tile count is a multiple of the thread
  // count (batch 1 of TNT-S: 14 tiles of 14 sentences, not 13 of 16 of which one thread would get 7).
  const int64_t most = std::max(1, kTileWords / std::max(1, d.m));
  const int64_t threads = std::max(1, at::get_num_threads());
  int64_t ntiles = (p.S + most - 1) / most;
  ntiles = (ntiles + threads - 1) / threads * threads;
  p.tile = static_cast<int>(std::max<int64_t>(1, (p.S + ntiles - 1) / ntiles));
  return p;
}

Weights pack_weights(const Dims& d, const at::Tensor& ln1_w, const at::Tensor& ln1_b, const at::Tensor& qk_w,
                     const c10::optional<at::Tensor>& qk_b, const at::Tensor& v_w,
                     const c10::optional<at::Tensor>& v_b, const at::Tensor& proj_w, const at::Tensor& proj_b,
                     const at::Tensor& ln2_w, const at::Tensor& ln2_b, const at::Tensor& fc1_w,
                     const at::Tensor& fc1_b, const at::Tensor& fc2_w, const at::Tensor& fc2_b, bool backward) {
  Weights w;
  w.ln1w = pack_vec(ln1_w, d.c, d.cp);
  w.ln1b = pack_vec(ln1_b, d.c, d.cp);
  w.ln2w = pack_vec(ln2_w, d.c, d.cp);
  w.ln2b = pack_vec(ln2_b, d.c, d.cp);
  at::Tensor wqkv = at::cat({qk_w.to(at::kFloat), v_w.to(at::kFloat)}, 0);  // (3c, c), q rows first
  w.wqkvT = pack(wqkv, 3 * d.c, d.c, d.c3p, true);
  at::Tensor bqkv = at::zeros({d.c3p}, at::TensorOptions().dtype(at::kFloat));
  if (qk_b.has_value() && qk_b->defined()) {
    bqkv.narrow(0, 0, 2 * d.c).copy_(qk_b->to(at::kFloat));
    bqkv.narrow(0, 2 * d.c, d.c).copy_(v_b->to(at::kFloat));
  }
  w.bqkv = bqkv;
  w.wpT = pack(proj_w, d.c, d.c, d.cp, true);
  w.bp = pack_vec(proj_b, d.c, d.cp);
  w.w1T = pack(fc1_w, d.H, d.c, d.Hp, true);
  w.b1 = pack_vec(fc1_b, d.H, d.Hp);
  w.w2T = pack(fc2_w, d.c, d.H, d.cp, true);
  w.b2 = pack_vec(fc2_b, d.c, d.cp);
  if (backward) {
    w.wqkv = pack(wqkv, 3 * d.c, d.c, d.cp, false);
    w.wp = pack(proj_w, d.c, d.c, d.cp, false);
    w.w1 = pack(fc1_w, d.H, d.c, d.cp, false);
    w.w2 = pack(fc2_w, d.c, d.H, d.Hp, false);
  }
  return w;
}

const float* keep_ptr(const c10::optional<at::Tensor>& keep, at::Tensor& holder, int64_t S) {
  if (!keep.has_value() || !keep->defined()) return nullptr;
  TORCH_CHECK(keep->numel() == S, "inner_transformer: drop-path scales must have one entry per sentence");
  holder = keep->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

template <typename T>
void copy_in(const at::Tensor& x, int64_t s0, int rows, const Dims& d, float* dst) {
  load_rows(x.data_ptr<T>() + s0 * d.m * d.c, rows, d.c, d.cp, dst);
}

void load_tile(const at::Tensor& x, int64_t s0, int rows, const Dims& d, float* dst) {
  if (x.scalar_type() == at::kFloat) copy_in<float>(x, s0, rows, d, dst);
  else copy_in<c10::BFloat16>(x, s0, rows, d, dst);
}

void store_tile(const float* src, int64_t s0, int rows, const Dims& d, at::Tensor& y) {
  if (y.scalar_type() == at::kFloat) store_rows(src, rows, d.c, d.cp, y.data_ptr<float>() + s0 * d.m * d.c);
  else store_rows(src, rows, d.c, d.cp, y.data_ptr<c10::BFloat16>() + s0 * d.m * d.c);
}

// What one call (forward or backward) needs: the shapes, the packed weights, the drop-path scales.
struct Call {
  at::Tensor x;
  Problem p;
  Weights w;
  at::Tensor keep1_f32, keep2_f32;  // hold the fp32 copies k1 / k2 point into
  const float* k1 = nullptr;
  const float* k2 = nullptr;
  int64_t ntiles = 0;
  const float* keep1_at(int64_t s0) const { return k1 ? k1 + s0 : nullptr; }
  const float* keep2_at(int64_t s0) const { return k2 ? k2 + s0 : nullptr; }
};

Call prepare_call(const at::Tensor& x_in, const at::Tensor& ln1_w, const at::Tensor& ln1_b, const at::Tensor& qk_w,
                  const c10::optional<at::Tensor>& qk_b, const at::Tensor& v_w, const c10::optional<at::Tensor>& v_b,
                  const at::Tensor& proj_w, const at::Tensor& proj_b, const at::Tensor& ln2_w,
                  const at::Tensor& ln2_b, const at::Tensor& fc1_w, const at::Tensor& fc1_b, const at::Tensor& fc2_w,
                  const at::Tensor& fc2_b, const c10::optional<at::Tensor>& keep1,
                  const c10::optional<at::Tensor>& keep2, int64_t num_heads, double eps, bool backward) {
  Call c;
  c.x = x_in.contiguous();
  c.p = make_problem(c.x, fc1_w, num_heads, eps);
  c.w = pack_weights(c.p.d, ln1_w, ln1_b, qk_w, qk_b, v_w, v_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w,
                     fc2_b, backward);
  c.k1 = keep_ptr(keep1, c.keep1_f32, c.p.S);
  c.k2 = keep_ptr(keep2, c.keep2_f32, c.p.S);
  c.ntiles = (c.p.S + c.p.tile - 1) / c.p.tile;
  return c;
}

at::Tensor inner_transformer_cpu(const at::Tensor& x_in, const at::Tensor& ln1_w, const at::Tensor& ln1_b,
                                 const at::Tensor& qk_w, const c10::optional<at::Tensor>& qk_b,
                                 const at::Tensor& v_w, const c10::optional<at::Tensor>& v_b,
                                 const at::Tensor& proj_w, const at::Tensor& proj_b, const at::Tensor& ln2_w,
                                 const at::Tensor& ln2_b, const at::Tensor& fc1_w, const at::Tensor& fc1_b,
                                 const at::Tensor& fc2_w, const at::Tensor& fc2_b,
                                 const c10::optional<at::Tensor>& keep1, const c10::optional<at::Tensor>& keep2,
                                 int64_t num_heads, double eps) {
  const Call call = prepare_call(x_in, ln1_w, ln1_b, qk_w, qk_b, v_w, v_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b,
                              fc2_w, fc2_b, keep1, keep2, num_heads, eps, false);
  const Problem& p = call.p;
  const Dims& d = p.d;
  at::Tensor y = at::empty_like(call.x);
  at::parallel_for(0, call.ntiles, 1, [&](int64_t t0, int64_t t1) {
    Scratch s(p.tile * d.m, d);
    std::vector<float> out(p.tile * d.m * d.cp);
    for (int64_t t = t0; t < t1; ++t) {
      int64_t s0 = t * p.tile;
      int ns = static_cast<int>(std::min<int64_t>(p.tile, p.S - s0)), rows = ns * d.m;
      load_tile(call.x, s0, rows, d, s.x.data());
      tile_forward(s, rows, d, call.w, call.keep1_at(s0), call.keep2_at(s0), out.data(), false);
      store_tile(out.data(), s0, rows, d, y);
    }
  });
  return y;
}

// Gradient accumulators of one thread, fp32, padded like the packed weights.
struct Grads {
  std::vector<float> ln1w, ln1b, ln2w, ln2b, wqkv, bqkv, wp, bp, w1, b1, w2, b2;
  explicit Grads(const Dims& d)
      : ln1w(d.cp), ln1b(d.cp), ln2w(d.cp), ln2b(d.cp), wqkv(3 * d.c * d.cp), bqkv(d.c3p), wp(d.c * d.cp),
        bp(d.cp), w1(d.H * d.cp), b1(d.Hp), w2(d.c * d.Hp), b2(d.cp) {}
};

void col_sum(const float* a, int rows, int ld, float* out) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < ld; j += kW) vst(out + j, vld(out + j) + vld(a + r * ld + j));
}

// Backward of one tile whose forward buffers `s` are filled; dx2 (padded rows) in `dy` is consumed.
// Writes the input gradient into `dx` (padded rows) and accumulates weight gradients into `gr`.
void tile_backward(Scratch& s, int rows, const Dims& d, const Weights& w, const float* keep1, const float* keep2,
                   float* dy, float* dz, float* dg, float* dx, float* dqkv, Grads& gr) {
  const int cp = d.cp, c3p = d.c3p, Hp = d.Hp, m = d.m, mp = d.mp;
  PROF_START();
  scale_rows(dz, dy, keep2, rows, d);  // MLP branch: dz = keep2 * dx2
  gemm(d.c, Hp, rows, dz, 1, cp, s.g.data(), Hp, gr.w2.data(), Hp, true);  // dW2 += dz^T g
  col_sum(dz, rows, cp, gr.b2.data());
  gemm(rows, Hp, d.c, dz, cp, 1, w.w2.data_ptr<float>(), Hp, dg, Hp, false);  // dg = dz W2
  const float* h = s.h.data();
  const float* cdf = s.cdf.data();
  for (int i = 0; i < rows * Hp; i += kW) {  // dh = dg * gelu'(h) = dg * (Phi(h) + h * phi(h))
    vf a = vld(h + i);
    vf pdf = kInvSqrt2Pi * vexp(-0.5f * a * a);
    vst(dg + i, vld(dg + i) * (vld(cdf + i) + a * pdf));
  }
  gemm(d.H, cp, rows, dg, 1, Hp, s.xn2.data(), cp, gr.w1.data(), cp, true);  // dW1 += dh^T xn2
  col_sum(dg, rows, Hp, gr.b1.data());
  gemm(rows, cp, d.H, dg, Hp, 1, w.w1.data_ptr<float>(), cp, dz, cp, false);  // dxn2 = dh W1 (into dz)
  PROF(8);
  layer_norm_backward(dz, s.x1.data(), rows, d, w.ln2w.data_ptr<float>(), s.mean2.data(), s.rstd2.data(), dy,
                      gr.ln2w.data(), gr.ln2b.data());  // dy now holds dx1
  PROF(9);
  scale_rows(dz, dy, keep1, rows, d);  // attention branch: dz = keep1 * dx1
  gemm(d.c, cp, rows, dz, 1, cp, s.o.data(), cp, gr.wp.data(), cp, true);  // dWp += dy^T o
  col_sum(dz, rows, cp, gr.bp.data());
  float* dO = dg;  // reuse: (rows, cp) gradient of the attention output
  gemm(rows, cp, d.c, dz, cp, 1, w.wp.data_ptr<float>(), cp, dO, cp, false);
  PROF(10);
  const float* qkv = s.qkv.data();
  float *qT = s.qT.data(), *doT = s.doT.data(), *dPT = s.dPT.data(), *dqT = s.dqT.data();
  float* rowdot = s.rowdot.data();
  for (int r0 = 0; r0 < rows; r0 += m)
    for (int hh = 0; hh < d.heads; ++hh) {
      const float* q = qkv + r0 * c3p + hh * d.hd;
      const float* k = q + d.c;
      const float* v = q + 2 * d.c;
      const float* PT = s.weights(r0 / m, hh, d);  // kept by the forward recompute
      scaled_q_transposed(q, d, qT);
      const float* dOh = dO + r0 * cp + hh * d.hd;
      for (int dd = 0; dd < d.hd; ++dd)
        for (int i = 0; i < mp; ++i) doT[dd * mp + i] = i < m ? dOh[i * cp + dd] : 0.f;
      float* dq = dqkv + r0 * c3p + hh * d.hd;
      float* dk = dq + d.c;
      float* dv = dq + 2 * d.c;
      for (int j = 0; j < m; ++j) {
        for (int dd = 0; dd < d.hd; ++dd) {  // dv[j] = sum_i P[i][j] dO[i]
          vf acc{};
          for (int u = 0; u < mp; u += kW) acc += vld(PT + j * mp + u) * vld(doT + dd * mp + u);
          dv[j * c3p + dd] = hsum(acc);
        }
        for (int u = 0; u < mp; u += kW) {  // dP[i][j] = dO[i] . v[j]
          vf acc{};
          for (int dd = 0; dd < d.hd; ++dd) acc += splat(v[j * c3p + dd]) * vld(doT + dd * mp + u);
          vst(dPT + j * mp + u, acc);
        }
      }
      for (int u = 0; u < mp; u += kW) {  // softmax backward over keys, per query lane
        vf acc{};
        for (int j = 0; j < m; ++j) acc += vld(PT + j * mp + u) * vld(dPT + j * mp + u);
        vst(rowdot + u, acc);
      }
      for (int j = 0; j < m; ++j)
        for (int u = 0; u < mp; u += kW)
          vst(dPT + j * mp + u, vld(PT + j * mp + u) * (vld(dPT + j * mp + u) - vld(rowdot + u)));  // dS^T
      mix_rows(d, k, dPT, d.scale, dqT);  // dq[i] = scale * sum_j dS[i][j] k[j]
      for (int i = 0; i < m; ++i)
        for (int dd = 0; dd < d.hd; ++dd) dq[i * c3p + dd] = dqT[dd * mp + i];
      for (int j = 0; j < m; ++j)
        for (int dd = 0; dd < d.hd; ++dd) {  // dk[j] = sum_i dS[i][j] q[i] * scale (qT holds the scale)
          vf acc{};
          for (int u = 0; u < mp; u += kW) acc += vld(dPT + j * mp + u) * vld(qT + dd * mp + u);
          dk[j * c3p + dd] = hsum(acc);
        }
    }
  PROF(11);
  gemm(3 * d.c, cp, rows, dqkv, 1, c3p, s.xn1.data(), cp, gr.wqkv.data(), cp, true);  // dWqkv += dqkv^T xn1
  col_sum(dqkv, rows, c3p, gr.bqkv.data());
  gemm(rows, cp, 3 * d.c, dqkv, c3p, 1, w.wqkv.data_ptr<float>(), cp, dz, cp, false);  // dxn1
  PROF(12);
  std::memcpy(dx, dy, sizeof(float) * rows * cp);  // residual: dx = dx1 + LN1 backward
  layer_norm_backward(dz, s.x.data(), rows, d, w.ln1w.data_ptr<float>(), s.mean1.data(), s.rstd1.data(), dx,
                      gr.ln1w.data(), gr.ln1b.data());
  PROF(13);
}

// (rows x ld) padded fp32 accumulator -> (rows x cols) tensor of `like`'s dtype.
at::Tensor unpack(const std::vector<float>& acc, int rows, int cols, int ld, const at::Tensor& like) {
  at::Tensor t = at::from_blob(const_cast<float*>(acc.data()), {rows, ld}, at::TensorOptions().dtype(at::kFloat));
  return t.narrow(1, 0, cols).to(like.scalar_type()).clone().view(like.sizes());  // clone: acc is freed
}

std::vector<at::Tensor> inner_transformer_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& ln1_w, const at::Tensor& ln1_b,
    const at::Tensor& qk_w, const c10::optional<at::Tensor>& qk_b, const at::Tensor& v_w,
    const c10::optional<at::Tensor>& v_b, const at::Tensor& proj_w, const at::Tensor& proj_b,
    const at::Tensor& ln2_w, const at::Tensor& ln2_b, const at::Tensor& fc1_w, const at::Tensor& fc1_b,
    const at::Tensor& fc2_w, const at::Tensor& fc2_b, const c10::optional<at::Tensor>& keep1,
    const c10::optional<at::Tensor>& keep2, int64_t num_heads, double eps) {
  const Call call = prepare_call(x_in, ln1_w, ln1_b, qk_w, qk_b, v_w, v_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b,
                              fc2_w, fc2_b, keep1, keep2, num_heads, eps, true);
  const Problem& p = call.p;
  const Dims& d = p.d;
  const at::Tensor& x = call.x;
  const Weights& w = call.w;
  at::Tensor grad = grad_in.contiguous();
  TORCH_CHECK(grad.sizes() == x.sizes(), "inner_transformer_backward: grad and x differ in shape");
  at::Tensor gx = at::empty_like(x);
  const int nthreads = at::get_num_threads();
  std::vector<Grads> grads(nthreads, Grads(d));
  at::parallel_for(0, call.ntiles, 1, [&](int64_t t0, int64_t t1) {
    const int R = p.tile * d.m;
    Scratch s(R, d);
    std::vector<float> out(R * d.cp), dy(R * d.cp), dz(R * d.cp), dg(R * std::max(d.Hp, d.cp)), dx(R * d.cp),
        dqkv(R * d.c3p);
    Grads& gr = grads[at::get_thread_num()];
    for (int64_t t = t0; t < t1; ++t) {
      int64_t s0 = t * p.tile;
      int ns = static_cast<int>(std::min<int64_t>(p.tile, p.S - s0)), rows = ns * d.m;
      load_tile(x, s0, rows, d, s.x.data());
      const float* kk1 = call.keep1_at(s0);
      const float* kk2 = call.keep2_at(s0);
      tile_forward(s, rows, d, w, kk1, kk2, out.data(), true);
      load_tile(grad, s0, rows, d, dy.data());
      tile_backward(s, rows, d, w, kk1, kk2, dy.data(), dz.data(), dg.data(), dx.data(), dqkv.data(), gr);
      store_tile(dx.data(), s0, rows, d, gx);
    }
  });
  Grads& tot = grads[0];
  for (int t = 1; t < nthreads; ++t) {
    auto add = [](std::vector<float>& a, const std::vector<float>& b) {
      for (size_t i = 0; i < a.size(); ++i) a[i] += b[i];
    };
    add(tot.ln1w, grads[t].ln1w), add(tot.ln1b, grads[t].ln1b), add(tot.ln2w, grads[t].ln2w);
    add(tot.ln2b, grads[t].ln2b), add(tot.wqkv, grads[t].wqkv), add(tot.bqkv, grads[t].bqkv);
    add(tot.wp, grads[t].wp), add(tot.bp, grads[t].bp), add(tot.w1, grads[t].w1), add(tot.b1, grads[t].b1);
    add(tot.w2, grads[t].w2), add(tot.b2, grads[t].b2);
  }
  const int c = d.c;
  at::Tensor gwqkv = at::from_blob(tot.wqkv.data(), {3 * c, d.cp}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor gbqkv = at::from_blob(tot.bqkv.data(), {d.c3p}, at::TensorOptions().dtype(at::kFloat));
  const bool qkv_bias = qk_b.has_value() && qk_b->defined();
  at::Tensor empty = at::empty({0}, x.options().dtype(at::kFloat));
  return {
      gx,
      unpack(tot.ln1w, 1, c, d.cp, ln1_w),
      unpack(tot.ln1b, 1, c, d.cp, ln1_b),
      gwqkv.narrow(0, 0, 2 * c).narrow(1, 0, c).to(qk_w.scalar_type()).clone(),
      qkv_bias ? gbqkv.narrow(0, 0, 2 * c).to(qk_b->scalar_type()).clone() : empty,
      gwqkv.narrow(0, 2 * c, c).narrow(1, 0, c).to(v_w.scalar_type()).clone(),
      qkv_bias ? gbqkv.narrow(0, 2 * c, c).to(v_b->scalar_type()).clone() : empty,
      unpack(tot.wp, c, c, d.cp, proj_w),
      unpack(tot.bp, 1, c, d.cp, proj_b),
      unpack(tot.ln2w, 1, c, d.cp, ln2_w),
      unpack(tot.ln2b, 1, c, d.cp, ln2_b),
      unpack(tot.w1, d.H, c, d.cp, fc1_w),
      unpack(tot.b1, 1, d.H, d.Hp, fc1_b),
      unpack(tot.w2, c, d.H, d.Hp, fc2_w),
      unpack(tot.b2, 1, c, d.cp, fc2_b),
  };
}

}  // namespace

TORCH_LIBRARY(tntvision, m) {
  m.def(
      "inner_transformer(Tensor x, Tensor ln1_w, Tensor ln1_b, Tensor qk_w, Tensor? qk_b, Tensor v_w, "
      "Tensor? v_b, Tensor proj_w, Tensor proj_b, Tensor ln2_w, Tensor ln2_b, Tensor fc1_w, Tensor fc1_b, "
      "Tensor fc2_w, Tensor fc2_b, Tensor? keep1, Tensor? keep2, int num_heads, float eps) -> Tensor");
  m.def(
      "inner_transformer_backward(Tensor grad, Tensor x, Tensor ln1_w, Tensor ln1_b, Tensor qk_w, Tensor? qk_b, "
      "Tensor v_w, Tensor? v_b, Tensor proj_w, Tensor proj_b, Tensor ln2_w, Tensor ln2_b, Tensor fc1_w, "
      "Tensor fc1_b, Tensor fc2_w, Tensor fc2_b, Tensor? keep1, Tensor? keep2, int num_heads, float eps) "
      "-> Tensor[]");
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
