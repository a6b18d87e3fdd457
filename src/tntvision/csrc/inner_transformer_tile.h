// The per-tile work of the fused inner transformer, written once and compiled once per instruction set.
//
// inner_transformer.cpp includes this file several times, each time inside its own namespace and a
// `#pragma GCC target` region, with these macros set:
//
//   TNT_W       floats per vector (4: baseline, 8: AVX2, 16: AVX-512)
//   TNT_MR      rows per register block of the GEMM micro-kernel
//   TNT_AVX2    1 when 256-bit AVX2/FMA intrinsics may be used for W = 8
//   TNT_AVX512  1 when 512-bit AVX-512F intrinsics may be used for W = 16
//   TNT_AVX512VL  1 when AVX-512VL's 256-bit forms may be used for W = 8 (a 14-bit reciprocal estimate)
//
// Without the intrinsics macros the same code runs on GCC's generic vector extensions (the compiler
// splits or emulates the vectors), so a W = 16 build can be checked on a CPU without AVX-512.
//
// The types it works on (Dims, Weights, Scratch, Grads) and the bf16 GEMM (`bf16_gemm`) are defined
// once in inner_transformer.cpp; every row of a tile buffer is padded with zeros to a multiple of TNT_W
// floats (Dims::cp, c3p, Hp, mp), so the vector loops never need a tail.

constexpr int kW = TNT_W;
typedef float vf __attribute__((vector_size(TNT_W * 4)));
typedef float vfu __attribute__((vector_size(TNT_W * 4), aligned(4)));  // unaligned access
typedef int32_t vi __attribute__((vector_size(TNT_W * 4)));

#define TNT_INLINE inline __attribute__((always_inline))

TNT_INLINE vf vld(const float* p) { return *reinterpret_cast<const vfu*>(p); }
TNT_INLINE void vst(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
TNT_INLINE vf splat(float a) { return vf{} + a; }
TNT_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }

TNT_INLINE float hsum(vf v) {
#if TNT_AVX512
  return _mm512_reduce_add_ps((__m512)v);
#elif TNT_AVX2
  __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#else
  float s = 0.f;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
#endif
}

TNT_INLINE vf vfloor(vf x) {
#if TNT_AVX512
  return (vf)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#elif TNT_AVX2
  return (vf)_mm256_round_ps((__m256)x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#else
  vf t = __builtin_convertvector(__builtin_convertvector(x, vi), vf);  // trunc toward zero
  return t + __builtin_convertvector(t > x, vf);                      // floor (true lanes are -1)
#endif
}

// exp(x), Cephes-style: 2^n * p(r), |rel err| ~ 1 ulp. Inputs are clamped to [-87, 88] (NaN stays NaN).
TNT_INLINE vf vexp(vf x) {
#if TNT_AVX512
  // min/max return their second operand when either is NaN; n = round(x log2 e); 2^n by vscalefps
  x = (vf)_mm512_max_ps(_mm512_set1_ps(-87.0f), _mm512_min_ps(_mm512_set1_ps(88.0f), (__m512)x));
  vf fl = (vf)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  x = x > 88.0f ? splat(88.0f) : x;
  x = x < -87.0f ? splat(-87.0f) : x;
  vf fl = vfloor(x * 1.44269504088896341f + 0.5f);
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
#if TNT_AVX512
  return (vf)_mm512_scalef_ps((__m512)y, (__m512)fl);
#else
  vi n = (__builtin_convertvector(fl, vi) + 127) << 23;
  vf pow2n;
  std::memcpy(&pow2n, &n, sizeof pow2n);
  return y * pow2n;
#endif
}

// 1/a to within ~1 ulp: the hardware estimate refined by Newton steps (a divide is several times slower).
TNT_INLINE vf vrcp(vf a) {
#if TNT_AVX512
  vf r = (vf)_mm512_rcp14_ps((__m512)a);  // 14-bit estimate
  return r * (2.0f - a * r);
#elif TNT_AVX512VL
  vf r = (vf)_mm256_rcp14_ps((__m256)a);  // 14-bit estimate
  return r * (2.0f - a * r);
#elif TNT_AVX2
  vf r = (vf)_mm256_rcp_ps((__m256)a);  // 12-bit estimate
  r = r * (2.0f - a * r);
  return r * (2.0f - a * r);
#else
  return 1.0f / a;
#endif
}

// erf(x), Abramowitz & Stegun 7.1.26 (|abs err| <= 1.5e-7), the formula PyTorch's vectorised CPU erf uses.
// With `gauss`, also exp(-x^2), which it computes on the way (GELU's backward needs it).
TNT_INLINE vf verf(vf x, vf* gauss = nullptr) {
  vf ax = x < 0.f ? -x : x;
  vf t = vrcp(1.0f + 0.3275911f * ax);
  vf r = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  const vf g = vexp(-ax * ax);
  if (gauss) *gauss = g;
  vf e = 1.0f - r * g;
  return x < 0.f ? -e : e;
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// ------------------------------------------------------------------------------------ fp32 GEMM

// C[m, n] (+)= sum_k A(m, k) * B[k, n] for an MR x (NB*W) block; A(m, k) = A[m*sam + k*sak].
template <int MR, int NB>
TNT_INLINE void gemm_block(int K, const float* A, int64_t sam, int64_t sak, const float* B, int64_t ldb, float* C,
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

template <int NB>
void gemm_cols(int M, int K, const float* A, int64_t sam, int64_t sak, const float* B, int64_t ldb, float* C,
               int64_t ldc, bool acc) {
  int m = 0;
  for (; m + TNT_MR <= M; m += TNT_MR) gemm_block<TNT_MR, NB>(K, A + m * sam, sam, sak, B, ldb, C + m * ldc, ldc, acc);
  for (; m + 4 <= M; m += 4) gemm_block<4, NB>(K, A + m * sam, sam, sak, B, ldb, C + m * ldc, ldc, acc);
  for (; m < M; ++m) gemm_block<1, NB>(K, A + m * sam, sam, sak, B, ldb, C + m * ldc, ldc, acc);
}

// C (M x N, ldc) (+)= A (M x K, strides sam/sak) @ B (K x N, row-major ldb); N a multiple of W.
void gemm(int M, int N, int K, const float* A, int64_t sam, int64_t sak, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool acc) {
  int n = 0;
  for (; n + 3 * kW <= N; n += 3 * kW) gemm_cols<3>(M, K, A, sam, sak, B + n, ldb, C + n, ldc, acc);
  if (N - n == 2 * kW) gemm_cols<2>(M, K, A, sam, sak, B + n, ldb, C + n, ldc, acc);
  if (N - n == kW) gemm_cols<1>(M, K, A, sam, sak, B + n, ldb, C + n, ldc, acc);
}

// bf16 bits of the first K floats of each row of A (round to nearest even, NaN kept a quiet NaN, as
// bf16_bits), rows kp apart with zeros in K..kp: the A operand of the bf16 GEMM, a vector at a time.
void rows_to_bf16(const float* A, int64_t lda, int rows, int K, int kp, uint16_t* a) {
  typedef uint32_t vu __attribute__((vector_size(TNT_W * 4)));
  typedef uint16_t vh __attribute__((vector_size(TNT_W * 2)));
  for (int r = 0; r < rows; ++r) {
    const float* src = A + r * lda;
    uint16_t* dst = a + r * kp;
    int j = 0;
    for (; j + kW <= K; j += kW) {
      vu u;
      std::memcpy(&u, src + j, sizeof u);
      const vu nan = (vu)((u & 0x7fffffffu) > 0x7f800000u);  // all ones where NaN
      const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
      const vh h = __builtin_convertvector((rounded & ~nan) | (0x7fc0u & nan), vh);
      std::memcpy(dst + j, &h, sizeof h);
    }
    for (; j < K; ++j) dst[j] = bf16_bits(src[j]);
    for (; j < kp; ++j) dst[j] = 0;
  }
}

// C (rows x N padded, row-major) = A (rows x K, row stride lda) W^T + b: the bias rows first, then the
// product accumulates onto them, in fp32 (the packed fp32 weight, (K x N)) or through the bf16 GEMM.
void linear_rows(int rows, int N, int K, const float* A, int64_t lda, const Linear& lin, const float* b, float* C,
                 Scratch& s) {
  for (int r = 0; r < rows; ++r) std::memcpy(C + r * N, b, N * sizeof(float));
  if (lin.bf16.defined()) {
    rows_to_bf16(A, lda, rows, K, lin.kp, reinterpret_cast<uint16_t*>(s.abf.data()));
    bf16_gemm(lin, rows, s.abf.data(), C, N);
  } else {
    gemm(rows, N, K, A, lda, 1, lin.wT.data_ptr<float>(), N, C, N, true);
  }
}

// ------------------------------------------------------------------------------- elementwise

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

// dx (+)= LayerNorm backward of dy (whose padding is zero); accumulates the weight and bias gradients into
// gw and gb unless gw is null (not asked for).
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
      if (gw) {  // the LayerNorm's own gradients, when asked for
        vst(gw + j, vld(gw + j) + vld(dyr + j) * xhat);
        vst(gb + j, vld(gb + j) + vld(dyr + j));
      }
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

void col_sum(const float* a, int rows, int ld, float* out) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < ld; j += kW) vst(out + j, vld(out + j) + vld(a + r * ld + j));
}

// --------------------------------------------------------------------------------- attention

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

// Lanes 0..15 times a row stride: the offsets of one column's words, for gathers and scatters.
#if TNT_AVX512
TNT_INLINE __m512i column_offsets(int ld) {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(ld));
}
#endif

// dstT[dd][i] = src[i * ld + dd] * scale for dd < hd, i < m; lanes m..mp-1 are zero (one sentence, one head).
inline void columns_to_rows(const float* src, int64_t ld, float scale, const Dims& d, float* dstT) {
#if TNT_AVX512
  if (d.mp == kW) {  // the sentence fills one vector: a gather per column
    const __m512i idx = column_offsets(static_cast<int>(ld));
    const __mmask16 live = static_cast<__mmask16>((1u << d.m) - 1u);
    for (int dd = 0; dd < d.hd; ++dd)
      vst(dstT + dd * kW, (vf)_mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idx, src + dd, 4) * scale);
    return;
  }
#endif
  for (int dd = 0; dd < d.hd; ++dd)
    for (int i = 0; i < d.mp; ++i) dstT[dd * d.mp + i] = i < d.m ? src[i * ld + dd] * scale : 0.f;
}

// dst[i * ld + dd] = srcT[dd][i] for dd < hd, i < m: the inverse of columns_to_rows (scale 1).
inline void rows_to_columns(const float* srcT, const Dims& d, float* dst, int64_t ld) {
#if TNT_AVX512
  if (d.mp == kW) {
    const __m512i idx = column_offsets(static_cast<int>(ld));
    const __mmask16 live = static_cast<__mmask16>((1u << d.m) - 1u);
    for (int dd = 0; dd < d.hd; ++dd) _mm512_mask_i32scatter_ps(dst + dd, live, idx, (__m512)vld(srcT + dd * kW), 4);
    return;
  }
#endif
  for (int i = 0; i < d.m; ++i)
    for (int dd = 0; dd < d.hd; ++dd) dst[i * ld + dd] = srcT[dd * d.mp + i];
}

inline void scaled_q_transposed(const float* q, const Dims& d, float* qT) { columns_to_rows(q, d.c3p, d.scale, d, qT); }

// Transposed attention weights of one sentence and head: PT[j][i] = softmax_j(q_i . k_j * scale).
// Also leaves qT[d][i] = q[i][d] * scale. q and k point at the head's first column in the qkv rows.
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

// ------------------------------------------------------------------------------ tile forward

// Forward of one tile of `rows` words (rows / m sentences, in s.x) into `out` (padded rows). With
// `for_backward`, it stops before fc2 (backward does not need x2) and also keeps GELU's cdf, Phi(h).
void tile_forward(Scratch& s, int rows, const Dims& d, const Weights& w, const float* attn_scale, const float* mlp_scale,
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
  linear_rows(rows, c3p, d.c, s.xn1.data(), cp, w.qkv, w.bqkv.data_ptr<float>(), qkv, s);
  PROF(1);
  for (int r0 = 0; r0 < rows; r0 += m)
    for (int hh = 0; hh < d.heads; ++hh) {
      const float* q = qkv + r0 * c3p + hh * d.hd;
      float* PT = s.weights(r0 / m, hh, d);
      attention_weights(q, q + d.c, d, s.qT.data(), PT);
      const float* v = q + 2 * d.c;
      mix_rows(d, v, PT, 1.0f, s.oT.data());  // oT[dd][i] = sum_j v[j][dd] P[i][j]
      rows_to_columns(s.oT.data(), d, s.o.data() + r0 * cp + hh * d.hd, cp);
    }
  PROF(2);
  // x1 = x + attn_scale * (o Wp^T + bp)
  float* x1 = s.x1.data();
  linear_rows(rows, cp, d.c, s.o.data(), cp, w.proj, w.bp.data_ptr<float>(), x1, s);
  add_residual(x1, s.x.data(), attn_scale, rows, d);
  layer_norm(x1, rows, d, ln2w, ln2b, s.xn2.data(), s.mean2.data(), s.rstd2.data());
  PROF(3);
  float* h = s.h.data();
  linear_rows(rows, Hp, d.c, s.xn2.data(), cp, w.fc1, w.b1.data_ptr<float>(), h, s);
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
  linear_rows(rows, cp, d.H, g, Hp, w.fc2, w.b2.data_ptr<float>(), out, s);
  PROF(6);
  add_residual(out, x1, mlp_scale, rows, d);
  PROF(7);
}

// ----------------------------------------------------------------------------- tile backward

// Backward of one tile whose forward buffers `s` are filled; dx2 (padded rows) in `dy` is consumed.
// Writes the input gradient into `dx` (padded rows) and accumulates weight gradients into `gr`.
// Its GEMMs run in fp32 whatever the forward's precision.
void tile_backward(Scratch& s, int rows, const Dims& d, const Weights& w, const float* attn_scale, const float* mlp_scale,
                   float* dy, float* dz, float* dg, float* dx, float* dqkv, Grads& gr) {
  const int cp = d.cp, c3p = d.c3p, Hp = d.Hp, m = d.m, mp = d.mp;
  PROF_START();
  const Needs& need = gr.need;
  scale_rows(dz, dy, mlp_scale, rows, d);  // MLP branch: dz = mlp_scale * dx2
  if (need.fc2) {
    gemm(d.c, Hp, rows, dz, 1, cp, s.g.data(), Hp, gr.w2.data(), Hp, true);  // dW2 += dz^T g
    col_sum(dz, rows, cp, gr.b2.data());
  }
  if (!need.fc1 && !need.ln2 && !need.below_ln2()) return;
  gemm(rows, Hp, d.c, dz, cp, 1, w.w2.data_ptr<float>(), Hp, dg, Hp, false);  // dg = dz W2
  const float* h = s.h.data();
  const float* cdf = s.cdf.data();
  for (int i = 0; i < rows * Hp; i += kW) {  // dh = dg * gelu'(h) = dg * (Phi(h) + h * phi(h))
    vf a = vld(h + i);
    vf pdf = kInvSqrt2Pi * vexp(-0.5f * a * a);
    vst(dg + i, vld(dg + i) * (vld(cdf + i) + a * pdf));
  }
  if (need.fc1) {
    gemm(d.H, cp, rows, dg, 1, Hp, s.xn2.data(), cp, gr.w1.data(), cp, true);  // dW1 += dh^T xn2
    col_sum(dg, rows, Hp, gr.b1.data());
  }
  if (!need.ln2 && !need.below_ln2()) return;
  gemm(rows, cp, d.H, dg, Hp, 1, w.w1.data_ptr<float>(), cp, dz, cp, false);  // dxn2 = dh W1 (into dz)
  PROF(8);
  layer_norm_backward(dz, s.x1.data(), rows, d, w.ln2w.data_ptr<float>(), s.mean2.data(), s.rstd2.data(), dy,
                      need.ln2 ? gr.ln2w.data() : nullptr, gr.ln2b.data());  // dy now holds dx1
  PROF(9);
  scale_rows(dz, dy, attn_scale, rows, d);  // attention branch: dz = attn_scale * dx1
  if (need.proj) {
    gemm(d.c, cp, rows, dz, 1, cp, s.o.data(), cp, gr.wp.data(), cp, true);  // dWp += dy^T o
    col_sum(dz, rows, cp, gr.bp.data());
  }
  if (!need.below_attention()) return;
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
      columns_to_rows(dOh, cp, 1.0f, d, doT);
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
      rows_to_columns(dqT, d, dq, c3p);
      for (int j = 0; j < m; ++j)
        for (int dd = 0; dd < d.hd; ++dd) {  // dk[j] = sum_i dS[i][j] q[i] * scale (qT holds the scale)
          vf acc{};
          for (int u = 0; u < mp; u += kW) acc += vld(dPT + j * mp + u) * vld(qT + dd * mp + u);
          dk[j * c3p + dd] = hsum(acc);
        }
    }
  PROF(11);
  if (need.qkv) {
    gemm(3 * d.c, cp, rows, dqkv, 1, c3p, s.xn1.data(), cp, gr.wqkv.data(), cp, true);  // dWqkv += dqkv^T xn1
    col_sum(dqkv, rows, c3p, gr.bqkv.data());
  }
  if (!need.x && !need.ln1) return;
  gemm(rows, cp, 3 * d.c, dqkv, c3p, 1, w.wqkv.data_ptr<float>(), cp, dz, cp, false);  // dxn1
  PROF(12);
  std::memcpy(dx, dy, sizeof(float) * rows * cp);  // residual: dx = dx1 + LN1 backward
  layer_norm_backward(dz, s.x.data(), rows, d, w.ln1w.data_ptr<float>(), s.mean1.data(), s.rstd1.data(), dx,
                      need.ln1 ? gr.ln1w.data() : nullptr, gr.ln1b.data());
  PROF(13);
}

// The same work in the lane layout (sentences across a vector's lanes), for small words.
#include "inner_transformer_lanes.h"

#undef TNT_INLINE
// the includer sets these afresh for the next copy
#undef TNT_W
#undef TNT_MR
#undef TNT_AVX2
#undef TNT_AVX512
#undef TNT_AVX512VL
