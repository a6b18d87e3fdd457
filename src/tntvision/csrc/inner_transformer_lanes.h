// The fused inner transformer in the lane layout: one vector holds one value of TNT_W sentences.
//
// Included by inner_transformer_tile.h (once per instruction set, inside its namespace, with its vector
// helpers). The row layout of the tile code pads every word's row of c features to a multiple of the
// vector width and each sentence's m attention weights to a vector: for small words (the 28-px models:
// 4 words of 8 features, 2 heads of 4) most lanes hold padding. Here the vector runs across sentences
// instead, so every lane holds data whatever c, m and the head size are:
//
//   a tile holds G groups of kW sentences; row r = g * m + w is word w of group g's kW sentences, and a
//   buffer of n features per row keeps feature j of row r in the vector at (r * n + j) * kW.
//
// LayerNorm reduces over a row's c vectors (no horizontal sums), the attention of a group is m x m vector
// products, GELU is elementwise, and the Linears are GEMMs whose weights are scalars broadcast against
// rows of vectors. Weight gradients accumulate as vectors and are summed over lanes once per call.
// Sentences past the end of the batch are zero lanes: finite everywhere, and every gradient they would
// add is a product with their zero output gradient.

// out[r][j] (+)= bias[j] + sum_k A[r][k] * B[j][k] for RB rows x JB outputs (B row-major (N, K)).
template <int RB, int JB>
TNT_INLINE void lane_gemm_block(int K, const float* A, const float* B, int64_t N, const float* bias, float* out,
                                bool acc) {
  vf c[RB][JB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < JB; ++j)
      c[r][j] = acc ? vld(out + (r * N + j) * kW) : bias ? splat(bias[j]) : vf{};
  for (int k = 0; k < K; ++k) {
    vf a[RB];
    for (int r = 0; r < RB; ++r) a[r] = vld(A + (static_cast<int64_t>(r) * K + k) * kW);
    for (int j = 0; j < JB; ++j) {
      const vf b = splat(B[j * K + k]);
      for (int r = 0; r < RB; ++r) c[r][j] += a[r] * b;
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < JB; ++j) vst(out + (r * N + j) * kW, c[r][j]);
}

// Register blocks: 4 rows x 4 outputs where there are 32 vector registers (AVX-512), 2 x 4 elsewhere.
constexpr int kLaneRB = TNT_MR >= 8 ? 4 : 2;

template <int RB>
void lane_gemm_rows(int r0, int N, int K, const float* A, const float* B, const float* bias, float* out, bool acc) {
  const float* a = A + static_cast<int64_t>(r0) * K * kW;
  float* o = out + static_cast<int64_t>(r0) * N * kW;
  int j = 0;
  for (; j + 4 <= N; j += 4)
    lane_gemm_block<RB, 4>(K, a, B + j * K, N, bias ? bias + j : nullptr, o + j * kW, acc);
  for (; j < N; ++j) lane_gemm_block<RB, 1>(K, a, B + j * K, N, bias ? bias + j : nullptr, o + j * kW, acc);
}

// out (R, N) (+)= A (R, K) B^T (+ bias): a Linear over rows of vectors (B: (N, K), PyTorch's layout).
void lane_gemm(int R, int N, int K, const float* A, const float* B, const float* bias, float* out, bool acc) {
  int r = 0;
  for (; r + kLaneRB <= R; r += kLaneRB) lane_gemm_rows<kLaneRB>(r, N, K, A, B, bias, out, acc);
  for (; r < R; ++r) lane_gemm_rows<1>(r, N, K, A, B, bias, out, acc);
}

// gW[j][k] += sum_r D[r][j] * A[r][k] and gb[j] += sum_r D[r][j] (gb may be null), as vectors: the
// weight gradient of a Linear, summed over lanes at the end of the call.
template <int JB, int KB>
TNT_INLINE void lane_wgrad_block(int R, int N, int K, const float* D, const float* A, float* gW) {
  vf c[JB][KB];
  for (int j = 0; j < JB; ++j)
    for (int k = 0; k < KB; ++k) c[j][k] = vld(gW + (j * K + k) * kW);
  for (int r = 0; r < R; ++r) {
    vf a[KB];
    for (int k = 0; k < KB; ++k) a[k] = vld(A + (static_cast<int64_t>(r) * K + k) * kW);
    for (int j = 0; j < JB; ++j) {
      const vf d = vld(D + (static_cast<int64_t>(r) * N + j) * kW);
      for (int k = 0; k < KB; ++k) c[j][k] += d * a[k];
    }
  }
  for (int j = 0; j < JB; ++j)
    for (int k = 0; k < KB; ++k) vst(gW + (j * K + k) * kW, c[j][k]);
}

void lane_wgrad(int R, int N, int K, const float* D, const float* A, float* gW, float* gb) {
  for (int j = 0; j < N; j += 4) {
    const int jb = std::min(4, N - j);
    for (int k = 0; k < K; k += 4) {
      const int kb = std::min(4, K - k);
      const float* d = D + j * kW;
      const float* a = A + k * kW;
      float* g = gW + (j * K + k) * kW;
      if (jb == 4 && kb == 4) lane_wgrad_block<4, 4>(R, N, K, d, a, g);
      else
        for (int jj = 0; jj < jb; ++jj)
          for (int kk = 0; kk < kb; ++kk) lane_wgrad_block<1, 1>(R, N, K, d + jj * kW, a + kk * kW, g + (jj * K + kk) * kW);
    }
  }
  if (gb)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < N; ++j) vst(gb + j * kW, vld(gb + j * kW) + vld(D + (static_cast<int64_t>(r) * N + j) * kW));
}

TNT_INLINE vf lane_rsqrt(vf v) {  // 1 / sqrt(v) per lane, exactly as the scalar code rounds it
  vf r;
  for (int l = 0; l < kW; ++l) r[l] = 1.0f / std::sqrt(v[l]);
  return r;
}

// LayerNorm over the c features of each row; keeps mean and 1/std per row (vectors).
void lane_layer_norm(const float* x, int R, int c, float eps, const float* w, const float* b, float* y, float* mean,
                     float* rstd) {
  const float inv_c = 1.0f / c;
  for (int r = 0; r < R; ++r) {
    const float* xr = x + static_cast<int64_t>(r) * c * kW;
    float* yr = y + static_cast<int64_t>(r) * c * kW;
    vf s{};
    for (int k = 0; k < c; ++k) s += vld(xr + k * kW);
    const vf mu = s * inv_c;
    vf v{};
    for (int k = 0; k < c; ++k) {
      const vf dv = vld(xr + k * kW) - mu;
      v += dv * dv;
    }
    const vf rs = lane_rsqrt(v * inv_c + eps);
    vst(mean + r * kW, mu);
    vst(rstd + r * kW, rs);
    for (int k = 0; k < c; ++k) vst(yr + k * kW, (vld(xr + k * kW) - mu) * rs * w[k] + b[k]);
  }
}

// dx (+)= LayerNorm backward of dy; accumulates the weight and bias gradients (vectors) unless gw is null.
void lane_layer_norm_backward(const float* dy, const float* x, int R, int c, const float* w, const float* mean,
                              const float* rstd, float* dx, float* gw, float* gb) {
  const float inv_c = 1.0f / c;
  for (int r = 0; r < R; ++r) {
    const int64_t o = static_cast<int64_t>(r) * c * kW;
    const vf mu = vld(mean + r * kW), rs = vld(rstd + r * kW);
    vf s1{}, s2{};
    for (int k = 0; k < c; ++k) {
      const vf xhat = (vld(x + o + k * kW) - mu) * rs, d = vld(dy + o + k * kW);
      if (gw) {
        vst(gw + k * kW, vld(gw + k * kW) + d * xhat);
        vst(gb + k * kW, vld(gb + k * kW) + d);
      }
      const vf g = d * w[k];
      s1 += g;
      s2 += g * xhat;
    }
    const vf m1 = s1 * inv_c, m2 = s2 * inv_c;
    for (int k = 0; k < c; ++k) {
      const vf xhat = (vld(x + o + k * kW) - mu) * rs;
      vst(dx + o + k * kW, vld(dx + o + k * kW) + rs * (vld(dy + o + k * kW) * w[k] - m1 - xhat * m2));
    }
  }
}

// Attention of one group (m rows) and head: P[i][j] = softmax_j(scale * q_i . k_j), o_i = sum_j P[i][j] v_j.
// q, k, v point at the head's first feature in the group's first qkv row (row stride ld vectors).
void lane_attention(const float* q, const float* k, const float* v, int ld, int m, int hd, float scale, float* P,
                    float* o, int ldo) {
  for (int i = 0; i < m; ++i) {
    float* Pi = P + static_cast<int64_t>(i) * m * kW;
    vf mx = splat(-INFINITY);
    for (int j = 0; j < m; ++j) {
      vf acc{};
      for (int d = 0; d < hd; ++d) acc += vld(q + (i * ld + d) * kW) * vld(k + (j * ld + d) * kW);
      acc *= scale;
      vst(Pi + j * kW, acc);
      mx = vmax(mx, acc);
    }
    vf sum{};
    for (int j = 0; j < m; ++j) {
      const vf e = vexp(vld(Pi + j * kW) - mx);
      vst(Pi + j * kW, e);
      sum += e;
    }
    const vf inv = 1.0f / sum;
    for (int j = 0; j < m; ++j) vst(Pi + j * kW, vld(Pi + j * kW) * inv);
    for (int d = 0; d < hd; ++d) {
      vf acc{};
      for (int j = 0; j < m; ++j) acc += vld(Pi + j * kW) * vld(v + (j * ld + d) * kW);
      vst(o + (i * ldo + d) * kW, acc);
    }
  }
}

// Backward of lane_attention for one group and head, given P and dO: writes dq, dk, dv (row stride ld).
void lane_attention_backward(const float* q, const float* k, const float* v, int ld, int m, int hd, float scale,
                             const float* P, const float* dO, int ldo, float* dS, float* dq, float* dk, float* dv) {
  for (int i = 0; i < m; ++i) {  // dP[i][j] = dO_i . v_j, then dS = P * (dP - sum_j P dP)
    const float* Pi = P + static_cast<int64_t>(i) * m * kW;
    float* dSi = dS + static_cast<int64_t>(i) * m * kW;
    vf rowdot{};
    for (int j = 0; j < m; ++j) {
      vf acc{};
      for (int d = 0; d < hd; ++d) acc += vld(dO + (i * ldo + d) * kW) * vld(v + (j * ld + d) * kW);
      vst(dSi + j * kW, acc);
      rowdot += acc * vld(Pi + j * kW);
    }
    for (int j = 0; j < m; ++j) vst(dSi + j * kW, vld(Pi + j * kW) * (vld(dSi + j * kW) - rowdot) * scale);
  }
  for (int j = 0; j < m; ++j)
    for (int d = 0; d < hd; ++d) {  // dv_j = sum_i P[i][j] dO_i; dk_j = sum_i dS[i][j] q_i (scale in dS)
      vf av{}, ak{};
      for (int i = 0; i < m; ++i) {
        av += vld(P + (i * m + j) * kW) * vld(dO + (i * ldo + d) * kW);
        ak += vld(dS + (i * m + j) * kW) * vld(q + (i * ld + d) * kW);
      }
      vst(dv + (j * ld + d) * kW, av);
      vst(dk + (j * ld + d) * kW, ak);
    }
  for (int i = 0; i < m; ++i)
    for (int d = 0; d < hd; ++d) {  // dq_i = sum_j dS[i][j] k_j
      vf acc{};
      for (int j = 0; j < m; ++j) acc += vld(dS + (i * m + j) * kW) * vld(k + (j * ld + d) * kW);
      vst(dq + (i * ld + d) * kW, acc);
    }
}

// dst = base + keep * dst per row of n features (keep: one scale per lane, null: 1).
void lane_residual(float* dst, const float* base, const float* keep, int R, int n) {
  const vf kv = keep ? vld(keep) : splat(1.0f);
  for (int64_t i = 0; i < static_cast<int64_t>(R) * n * kW; i += kW) vst(dst + i, vld(base + i) + vld(dst + i) * kv);
}

// Forward of one tile of R rows (the group's sentences in s.x); keep1 / keep2: per-lane drop-path scales of
// each group, kW per group (null: none). Without `for_backward` the output goes to `out`; with it, the
// forward stops before fc2 and keeps GELU's derivative (in s.dgelu) for the backward.
void lanes_forward(LaneScratch& s, int R, const LaneDims& d, const LaneWeights& w, const float* keep1,
                   const float* keep2, float* out, bool for_backward) {
  const int m = d.m, c = d.c, H = d.H, c3 = 3 * d.c;
  lane_layer_norm(s.x.data(), R, c, d.eps, w.ln1w, w.ln1b, s.xn1.data(), s.mean1.data(), s.rstd1.data());
  lane_gemm(R, c3, c, s.xn1.data(), w.wqkv, w.bqkv, s.qkv.data(), false);
  for (int r0 = 0; r0 < R; r0 += m)
    for (int hh = 0; hh < d.heads; ++hh) {
      const float* q = s.qkv.data() + (static_cast<int64_t>(r0) * c3 + hh * d.hd) * kW;
      lane_attention(q, q + c * kW, q + 2 * c * kW, c3, m, d.hd, d.scale, s.weights(r0 / m, hh, d),
                     s.o.data() + (static_cast<int64_t>(r0) * c + hh * d.hd) * kW, c);
    }
  lane_gemm(R, c, c, s.o.data(), w.wp, w.bp, s.x1.data(), false);  // x1 = x + keep1 * (o Wp^T + bp)
  for (int r0 = 0; r0 < R; r0 += m)
    lane_residual(s.x1.data() + static_cast<int64_t>(r0) * c * kW, s.x.data() + static_cast<int64_t>(r0) * c * kW,
                  keep1 ? keep1 + r0 / m * kW : nullptr, m, c);
  lane_layer_norm(s.x1.data(), R, c, d.eps, w.ln2w, w.ln2b, s.xn2.data(), s.mean2.data(), s.rstd2.data());
  lane_gemm(R, H, c, s.xn2.data(), w.w1, w.b1, s.h.data(), false);
  const float* h = s.h.data();
  for (int64_t i = 0; i < static_cast<int64_t>(R) * H * kW; i += kW) {
    const vf a = vld(h + i);
    vf gauss;  // exp(-a^2 / 2)
    const vf cdf = 0.5f + 0.5f * verf(a * kSqrtHalf, &gauss);
    if (for_backward) {  // gelu'(a) = Phi(a) + a phi(a), for the backward
      vst(s.dgelu.data() + i, cdf + a * (kInvSqrt2Pi * gauss));
    }
    vst(s.g.data() + i, a * cdf);
  }
  if (for_backward) return;
  lane_gemm(R, c, H, s.g.data(), w.w2, w.b2, out, false);  // out = x1 + keep2 * (g W2^T + b2)
  for (int r0 = 0; r0 < R; r0 += m)
    lane_residual(out + static_cast<int64_t>(r0) * c * kW, s.x1.data() + static_cast<int64_t>(r0) * c * kW,
                  keep2 ? keep2 + r0 / m * kW : nullptr, m, c);
}

// dst = keep * src per group (keep null: a copy).
void lane_scale(float* dst, const float* src, const float* keep, int R, int m, int n) {
  for (int r0 = 0; r0 < R; r0 += m) {
    const vf kv = keep ? vld(keep + r0 / m * kW) : splat(1.0f);
    const int64_t o = static_cast<int64_t>(r0) * n * kW;
    for (int64_t i = 0; i < static_cast<int64_t>(m) * n * kW; i += kW) vst(dst + o + i, vld(src + o + i) * kv);
  }
}

// Backward of one tile whose forward buffers are filled (lanes_forward with for_backward); dy (R, c) holds
// the output gradient and is overwritten. Writes the input gradient into s.dx, accumulates weight gradients.
void lanes_backward(LaneScratch& s, int R, const LaneDims& d, const LaneWeights& w, const float* keep1,
                    const float* keep2, LaneGrads& gr) {
  const int m = d.m, c = d.c, H = d.H, c3 = 3 * d.c;
  const Needs& need = gr.need;
  float *dy = s.dy.data(), *dz = s.dz.data(), *dg = s.dg.data();
  lane_scale(dz, dy, keep2, R, m, c);  // MLP branch: dz = keep2 * dy
  if (need.fc2) lane_wgrad(R, c, H, dz, s.g.data(), gr.w2.data(), gr.b2.data());
  if (!need.fc1 && !need.ln2 && !need.below_ln2()) return;
  lane_gemm(R, H, c, dz, w.w2T, nullptr, dg, false);  // dg = dz W2
  for (int64_t i = 0; i < static_cast<int64_t>(R) * H * kW; i += kW)  // dh = dg * gelu'(h), kept by the forward
    vst(dg + i, vld(dg + i) * vld(s.dgelu.data() + i));
  if (need.fc1) lane_wgrad(R, H, c, dg, s.xn2.data(), gr.w1.data(), gr.b1.data());
  if (!need.ln2 && !need.below_ln2()) return;
  lane_gemm(R, c, H, dg, w.w1T, nullptr, dz, false);  // dxn2 = dh W1
  lane_layer_norm_backward(dz, s.x1.data(), R, c, w.ln2w, s.mean2.data(), s.rstd2.data(), dy,
                           need.ln2 ? gr.ln2w.data() : nullptr, gr.ln2b.data());  // dy now holds dx1
  lane_scale(dz, dy, keep1, R, m, c);  // attention branch: dz = keep1 * dx1
  if (need.proj) lane_wgrad(R, c, c, dz, s.o.data(), gr.wp.data(), gr.bp.data());
  if (!need.below_attention()) return;
  float* dO = dg;  // (R, c)
  lane_gemm(R, c, c, dz, w.wpT, nullptr, dO, false);
  float* dqkv = s.dqkv.data();
  for (int r0 = 0; r0 < R; r0 += m)
    for (int hh = 0; hh < d.heads; ++hh) {
      const int64_t at = (static_cast<int64_t>(r0) * c3 + hh * d.hd) * kW;
      const float* q = s.qkv.data() + at;
      float* dq = dqkv + at;
      lane_attention_backward(q, q + c * kW, q + 2 * c * kW, c3, m, d.hd, d.scale, s.weights(r0 / m, hh, d),
                              dO + (static_cast<int64_t>(r0) * c + hh * d.hd) * kW, c, s.dS.data(), dq,
                              dq + c * kW, dq + 2 * c * kW);
    }
  if (need.qkv) lane_wgrad(R, c3, c, dqkv, s.xn1.data(), gr.wqkv.data(), gr.bqkv.data());
  if (!need.x && !need.ln1) return;
  lane_gemm(R, c, c3, dqkv, w.wqkvT, nullptr, dz, false);  // dxn1
  std::memcpy(s.dx.data(), dy, sizeof(float) * R * c * kW);  // residual: dx = dx1 + LN1 backward
  lane_layer_norm_backward(dz, s.x.data(), R, c, w.ln1w, s.mean1.data(), s.rstd1.data(), s.dx.data(),
                           need.ln1 ? gr.ln1w.data() : nullptr, gr.ln1b.data());
}
