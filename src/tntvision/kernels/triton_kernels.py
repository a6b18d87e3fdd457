"""Triton kernels of TNT's fused inner transformer (forward, and backward by recomputation).

Imported by :mod:`tntvision.kernels.triton_op` at first use (importing Triton takes a while). Compiled for
CUDA tensors; with ``TRITON_INTERPRET=1`` set before Triton is imported, run by Triton's interpreter, on CPU
tensors too (that is how they are tested without a GPU).

One program owns a tile of whole sentences: ``BS`` sentences of ``M`` words, ``BS * M <= R`` rows of
``C`` features (padded to ``CP``). Every step between the load of the words and the store of the result
stays in registers:

    xn = LN1(x); per head h: q, k, v = xn Wq_h^T, xn Wk_h^T, xn Wv_h^T     (R, HDP) each
                 p = softmax(q k^T * scale) over the words of the same sentence   (R, R), block-diagonal
                 a += (p v) Wproj[:, h]^T                                         (R, CP)
    x1 = x + attn_scale * (a + b_proj);  y = x1 + mlp_scale * (fc2(gelu(fc1(LN2(x1)))))  hidden: chunks of CH

Attention is one (R, R) product per head masked to each sentence's block: any word count fits a tile
without padding the words, at the price of R / M times the few attention FLOPs (the products are tiny and
the kernel is bound by memory and latency, not by them). Head dims are padded to ``HDP`` inside the kernel
(zero weight columns), so ``tl.dot`` sees dimensions of at least 16.

Precision: LayerNorms, softmax, GELU, residuals and accumulation in fp32; the operands of every product
in the compute dtype (``DOT``: 0 fp32 with IEEE products, no TF32; 1 fp16; 2 bf16; 3 bf16-rounded
operands multiplied in fp32, which is what tensor cores compute for bf16 and what runs under the
interpreter, whose bf16 ``tl.dot`` is wrong in triton 3.8 and whose fp32 -> bf16 conversion truncates
where a GPU rounds to nearest, so with DOT 3 every bf16 rounding goes through :func:`_bf16_nearest`).

Backward recomputes the forward of its tile, writes the input gradient and, for the weight gradients, the
per-word operands of the weight products (LN outputs, q/k/v and attention-output gradients, the GELU
output and the fc1 gradient) in the compute dtype; the caller turns those into weight gradients with one
matrix product each. The LayerNorm parameter gradients are reduced per tile here.
"""

import triton
import triton.language as tl


@triton.jit
def _bf16_nearest(v):
    """fp32 v rounded to the nearest bf16 value (ties to even), still fp32. The interpreter's fp32 -> bf16
    conversion truncates; a GPU's rounds to nearest: this makes the interpreter round as the GPU does."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _cast(v, ty: tl.constexpr, DOT: tl.constexpr):
    """fp32 v as dtype ty, rounded to nearest (under the interpreter, DOT == 3, through _bf16_nearest)."""
    if DOT == 3 and ty == tl.bfloat16:
        v = _bf16_nearest(v)
    return v.to(ty)


@triton.jit
def _mm(a, b, DOT: tl.constexpr):
    """a @ b in fp32, the operands rounded to the compute dtype first."""
    if DOT == 1:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif DOT == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DOT == 3:
        return tl.dot(_bf16_nearest(a), _bf16_nearest(b), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _layer_norm(x, w, b, colok, C, eps):
    """LayerNorm over the C real columns of x (R, CP); returns (out, xhat, rstd)."""
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(colok[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    xhat = xc * rstd[:, None]
    return xhat * w[None, :] + b[None, :], xhat, rstd


@triton.jit
def _layer_norm_backward(dout, xhat, rstd, w, colok, C):
    """d(input) of a LayerNorm from d(output) (R, CP), its xhat and rstd; padded columns stay zero."""
    dxhat = dout * w[None, :]
    mean_d = tl.sum(dxhat, axis=1) / C
    mean_dx = tl.sum(dxhat * xhat, axis=1) / C
    dx = rstd[:, None] * (dxhat - mean_d[:, None] - xhat * mean_dx[:, None])
    return tl.where(colok[None, :], dx, 0.0)


@triton.jit
def _gelu(h):
    """Exact GELU: h * Phi(h)."""
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def _gelu_grad(h):
    """d GELU(h) / dh = Phi(h) + h * phi(h)."""
    return 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * tl.exp(-0.5 * h * h) * 0.3989422804014327


@triton.jit
def _vector(ptr, n, N: tl.constexpr):
    """ptr[0:n] as fp32 (N,), zero past n."""
    i = tl.arange(0, N)
    return tl.load(ptr + i, mask=i < n, other=0.0).to(tl.float32)


@triton.jit
def _head_weight_t(ptr, row0, C, HD, CP: tl.constexpr, HDP: tl.constexpr):
    """W[row0 + j, k] for j < HD, k < C, transposed and padded: (CP, HDP) fp32."""
    k = tl.arange(0, CP)[:, None]
    j = tl.arange(0, HDP)[None, :]
    return tl.load(ptr + (row0 + j) * C + k, mask=(k < C) & (j < HD), other=0.0).to(tl.float32)


@triton.jit
def _proj_weight_t(ptr, col0, C, HD, CP: tl.constexpr, HDP: tl.constexpr):
    """Wproj[n, col0 + j] for j < HD, n < C, as (HDP, CP) fp32: the head's slice of the projection."""
    j = tl.arange(0, HDP)[:, None]
    n = tl.arange(0, CP)[None, :]
    return tl.load(ptr + n * C + col0 + j, mask=(j < HD) & (n < C), other=0.0).to(tl.float32)


@triton.jit
def _fc1_weight_t(ptr, h0, C, H, CP: tl.constexpr, CH: tl.constexpr):
    """fc1 rows h0..h0+CH transposed: (CP, CH) fp32, W1[h0 + i, k]."""
    k = tl.arange(0, CP)[:, None]
    i = tl.arange(0, CH)[None, :]
    return tl.load(ptr + (h0 + i) * C + k, mask=(k < C) & (h0 + i < H), other=0.0).to(tl.float32)


@triton.jit
def _fc2_weight_t(ptr, h0, C, H, CP: tl.constexpr, CH: tl.constexpr):
    """fc2 columns h0..h0+CH transposed: (CH, CP) fp32, W2[n, h0 + i]."""
    i = tl.arange(0, CH)[:, None]
    n = tl.arange(0, CP)[None, :]
    return tl.load(ptr + n * H + h0 + i, mask=(h0 + i < H) & (n < C), other=0.0).to(tl.float32)


@triton.jit
def _tile(pid, S, M, C, BS: tl.constexpr, R: tl.constexpr, CP: tl.constexpr):
    """The tile of program ``pid``: its rows' global word indices (int64), which rows are words, each
    row's sentence, the feature columns and which are real, the (R, CP) offsets and mask of the words'
    features, and the (R, R) mask of the scores each row may see (:func:`_same_sentence`)."""
    r = tl.arange(0, R)
    local = r // M  # sentence within the tile
    sentence = pid * BS + local
    ok = (r < BS * M) & (sentence < S)
    word = pid.to(tl.int64) * BS * M + r  # sentences are contiguous: word index = sentence * M + w
    cols = tl.arange(0, CP)
    colok = cols < C
    io = word[:, None] * C + cols[None, :]
    iomask = ok[:, None] & colok[None, :]
    return word, ok, sentence, cols, colok, io, iomask, _same_sentence(local, ok)


@triton.jit
def _same_sentence(local, ok):
    """(R, R) mask of the scores a query row may see: the keys of its own sentence. A padding row (past
    the last sentence) sees every key, so its softmax stays finite; its gradient is zero all the same."""
    return ((local[:, None] == local[None, :]) & ok[None, :]) | (ok[:, None] == 0)


@triton.jit
def _head(xn, QKW, QKB, VW, VB, h, C, HD, same, scale, HAS_QKV_BIAS: tl.constexpr,
          CP: tl.constexpr, HDP: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
    """One head's q, k, v (R, HDP) and attention weights p (R, R), zero outside each sentence."""
    q = _mm(xn, _head_weight_t(QKW, h * HD, C, HD, CP, HDP), DOT)
    k = _mm(xn, _head_weight_t(QKW, C + h * HD, C, HD, CP, HDP), DOT)
    v = _mm(xn, _head_weight_t(VW, h * HD, C, HD, CP, HDP), DOT)
    if HAS_QKV_BIAS:
        q += _vector(QKB + h * HD, HD, HDP)[None, :]
        k += _vector(QKB + C + h * HD, HD, HDP)[None, :]
        v += _vector(VB + h * HD, HD, HDP)[None, :]
    s = tl.where(same, _mm(q, tl.trans(k), DOT) * scale, float("-inf"))  # (R, R)
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    return q, k, v, p


@triton.jit
def _attention(xn, QKW, QKB, VW, VB, PW, PB, C, HD, same, scale, NH: tl.constexpr,
               HAS_QKV_BIAS: tl.constexpr, R: tl.constexpr, CP: tl.constexpr, HDP: tl.constexpr,
               DOT: tl.constexpr):  # fmt: skip
    """proj(attention(xn)) with its bias: (R, CP)."""
    a = tl.zeros((R, CP), dtype=tl.float32)
    for h in range(NH):
        q, k, v, p = _head(xn, QKW, QKB, VW, VB, h, C, HD, same, scale, HAS_QKV_BIAS, CP, HDP, DOT)
        a += _mm(_mm(p, v, DOT), _proj_weight_t(PW, h * HD, C, HD, CP, HDP), DOT)
    return a + _vector(PB, C, CP)[None, :]


@triton.jit
def inner_forward_kernel(
    X, Y, LN1W, LN1B, QKW, QKB, VW, VB, PW, PB, LN2W, LN2B, W1, B1, W2, B2, K1, K2,
    S, M, C, H, HD, eps, scale,
    NH: tl.constexpr, BS: tl.constexpr, R: tl.constexpr, CP: tl.constexpr, HDP: tl.constexpr,
    CH: tl.constexpr, HAS_QKV_BIAS: tl.constexpr, HAS_ATTN_SCALE: tl.constexpr, HAS_MLP_SCALE: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    """y = x + attn_scale * attn(LN1(x)); y += mlp_scale * mlp(LN2(y)) for the sentences of ``program_id``."""
    pid = tl.program_id(0)
    word, ok, sentence, cols, colok, io, iomask, same = _tile(pid, S, M, C, BS, R, CP)
    x = tl.load(X + io, mask=iomask, other=0.0).to(tl.float32)

    xn, _, _ = _layer_norm(x, _vector(LN1W, C, CP), _vector(LN1B, C, CP), colok, C, eps)
    a = _attention(xn, QKW, QKB, VW, VB, PW, PB, C, HD, same, scale, NH, HAS_QKV_BIAS, R, CP, HDP, DOT)
    if HAS_ATTN_SCALE:
        a = a * tl.load(K1 + sentence, mask=ok, other=0.0).to(tl.float32)[:, None]
    x1 = x + a

    xn2, _, _ = _layer_norm(x1, _vector(LN2W, C, CP), _vector(LN2B, C, CP), colok, C, eps)
    m = tl.zeros((R, CP), dtype=tl.float32)
    for h0 in range(0, H, CH):
        g = _gelu(_mm(xn2, _fc1_weight_t(W1, h0, C, H, CP, CH), DOT) + _vector(B1 + h0, H - h0, CH)[None, :])
        m += _mm(g, _fc2_weight_t(W2, h0, C, H, CP, CH), DOT)
    m += _vector(B2, C, CP)[None, :]
    if HAS_MLP_SCALE:
        m = m * tl.load(K2 + sentence, mask=ok, other=0.0).to(tl.float32)[:, None]
    tl.store(Y + io, _cast(x1 + m, Y.dtype.element_ty, DOT), mask=iomask)


@triton.jit
def _store_cols(ptr, word, ok, ld, col0, v, n, WIDTH: tl.constexpr, DOT: tl.constexpr):
    """ptr[word, col0 + j] = v[:, j] for j < n (rows of length ld), in ptr's dtype."""
    j = tl.arange(0, WIDTH)[None, :]
    tl.store(
        ptr + word[:, None] * ld + col0 + j, _cast(v, ptr.dtype.element_ty, DOT), mask=ok[:, None] & (j < n)
    )


@triton.jit
def inner_backward_kernel(
    DY, X, DX, LN1W, LN1B, QKW, QKB, VW, VB, PW, PB, LN2W, LN2B, W1, B1, W2, B2, K1, K2,
    XN1, DQKV, O, DA, XN2, G, DH, LNP,
    S, M, C, H, HD, eps, scale,
    NH: tl.constexpr, BS: tl.constexpr, R: tl.constexpr, CP: tl.constexpr, HDP: tl.constexpr,
    CH: tl.constexpr, HAS_QKV_BIAS: tl.constexpr, HAS_ATTN_SCALE: tl.constexpr, HAS_MLP_SCALE: tl.constexpr,
    DOT: tl.constexpr,
    NEED_X: tl.constexpr, NEED_LN1: tl.constexpr, NEED_QKV: tl.constexpr, NEED_PROJ: tl.constexpr,
    NEED_LN2: tl.constexpr, NEED_FC1: tl.constexpr, NEED_FC2: tl.constexpr,
):  # fmt: skip
    """Gradients of one tile: dx (stored to DX), the weight products' operands (XN1, DQKV, O, DA, XN2, G,
    DH: rows = words) and the tile's LayerNorm sums (LNP[pid] = d ln1_w, d ln1_b, d ln2_w, d ln2_b).
    Only what ``NEED_*`` asks for is computed and stored."""
    pid = tl.program_id(0)
    word, ok, sentence, cols, colok, io, iomask, same = _tile(pid, S, M, C, BS, R, CP)
    x = tl.load(X + io, mask=iomask, other=0.0).to(tl.float32)
    dy = tl.load(DY + io, mask=iomask, other=0.0).to(tl.float32)
    ln1w = _vector(LN1W, C, CP)
    ln2w = _vector(LN2W, C, CP)

    # recompute the forward up to the MLP's input
    xn1, xhat1, rstd1 = _layer_norm(x, ln1w, _vector(LN1B, C, CP), colok, C, eps)
    a = _attention(xn1, QKW, QKB, VW, VB, PW, PB, C, HD, same, scale, NH, HAS_QKV_BIAS, R, CP, HDP, DOT)
    attn_scale = tl.full((R,), 1.0, tl.float32)
    mlp_scale = tl.full((R,), 1.0, tl.float32)
    if HAS_ATTN_SCALE:
        attn_scale = tl.load(K1 + sentence, mask=ok, other=0.0).to(tl.float32)
    if HAS_MLP_SCALE:
        mlp_scale = tl.load(K2 + sentence, mask=ok, other=0.0).to(tl.float32)
    x1 = x + a * attn_scale[:, None]
    xn2, xhat2, rstd2 = _layer_norm(x1, ln2w, _vector(LN2B, C, CP), colok, C, eps)

    # MLP branch: dm = mlp_scale * dy
    dm = dy * mlp_scale[:, None]
    dxn2 = tl.zeros((R, CP), dtype=tl.float32)
    for h0 in range(0, H, CH):
        w1t = _fc1_weight_t(W1, h0, C, H, CP, CH)  # (CP, CH)
        hpre = _mm(xn2, w1t, DOT) + _vector(B1 + h0, H - h0, CH)[None, :]
        dh = _mm(dm, tl.trans(_fc2_weight_t(W2, h0, C, H, CP, CH)), DOT) * _gelu_grad(hpre)  # (R, CH)
        dxn2 += _mm(dh, tl.trans(w1t), DOT)
        if NEED_FC2:
            _store_cols(G, word, ok, H, h0, _gelu(hpre), H - h0, CH, DOT)
        if NEED_FC1:
            _store_cols(DH, word, ok, H, h0, dh, H - h0, CH, DOT)
    if NEED_FC1:
        _store_cols(XN2, word, ok, C, 0, xn2, C, CP, DOT)
    if NEED_LN2:
        tl.store(LNP + (pid * 4 + 2) * CP + cols, tl.sum(dxn2 * xhat2, axis=0))
        tl.store(LNP + (pid * 4 + 3) * CP + cols, tl.sum(dxn2, axis=0))
    dx1 = dy + _layer_norm_backward(dxn2, xhat2, rstd2, ln2w, colok, C)

    # attention branch: da = attn_scale * dx1, the gradient of the projection's output
    da = dx1 * attn_scale[:, None]
    if NEED_PROJ:
        _store_cols(DA, word, ok, C, 0, da, C, CP, DOT)
    dxn1 = tl.zeros((R, CP), dtype=tl.float32)
    for h in range(NH):
        q, k, v, p = _head(xn1, QKW, QKB, VW, VB, h, C, HD, same, scale, HAS_QKV_BIAS, CP, HDP, DOT)
        if NEED_PROJ:
            _store_cols(O, word, ok, C, h * HD, _mm(p, v, DOT), HD, HDP, DOT)
        do = _mm(da, tl.trans(_proj_weight_t(PW, h * HD, C, HD, CP, HDP)), DOT)  # (R, HDP)
        dv = _mm(tl.trans(p), do, DOT)
        dp = _mm(do, tl.trans(v), DOT)  # (R, R)
        ds = p * (dp - tl.sum(dp * p, axis=1)[:, None]) * scale
        dq = _mm(ds, k, DOT)
        dk = _mm(tl.trans(ds), q, DOT)
        wq = _head_weight_t(QKW, h * HD, C, HD, CP, HDP)  # (CP, HDP)
        wk = _head_weight_t(QKW, C + h * HD, C, HD, CP, HDP)
        wv = _head_weight_t(VW, h * HD, C, HD, CP, HDP)
        dxn1 += _mm(dq, tl.trans(wq), DOT) + _mm(dk, tl.trans(wk), DOT) + _mm(dv, tl.trans(wv), DOT)
        if NEED_QKV:
            _store_cols(DQKV, word, ok, 3 * C, h * HD, dq, HD, HDP, DOT)
            _store_cols(DQKV, word, ok, 3 * C, C + h * HD, dk, HD, HDP, DOT)
            _store_cols(DQKV, word, ok, 3 * C, 2 * C + h * HD, dv, HD, HDP, DOT)
    if NEED_QKV:
        _store_cols(XN1, word, ok, C, 0, xn1, C, CP, DOT)
    if NEED_LN1:
        tl.store(LNP + (pid * 4 + 0) * CP + cols, tl.sum(dxn1 * xhat1, axis=0))
        tl.store(LNP + (pid * 4 + 1) * CP + cols, tl.sum(dxn1, axis=0))
    if NEED_X:
        dx = dx1 + _layer_norm_backward(dxn1, xhat1, rstd1, ln1w, colok, C)
        tl.store(DX + io, _cast(dx, DX.dtype.element_ty, DOT), mask=iomask)
