"""Triton kernels for batch norm: one generic kernel, specialised by constexpr parameters.

Every op is "per-channel sums over the elements, then per-channel coefficients, then an
elementwise pass". Element tensors are seen as (K, N, C, L) through four strides (the
spatial dims flattened to one stride; K stride 0 for an argument shared by the K
problems), so NCHW, channels_last, (N, C), (N, C, L) and 3d shapes go through the same
code; a program owns a tile of BLOCK_C channels and walks the M = N * L elements of its
chunk in steps of BLOCK_M (element m sits at n = m // L, l = m % L).

MODE selects the reduction strategy:
- FUSED: the whole per-channel slice fits one [BLOCK_M, BLOCK_C] tile; it is read once,
  reduced, and the outputs are written from the same registers (single read).
- REDUCE: split reduction, pass 1: grid (channel blocks × K, chunks); each program writes
  the partial statistics of its (chunk, channels) to PART.
- APPLY: split reduction, pass 2: each program combines the partials of its channels
  (Chan/Welford merge for the forward statistics, plain sums otherwise), derives the
  coefficients, writes the per-channel outputs (chunk 0 only) and runs the elementwise pass
  over its chunk.
- EVAL has no reduction and always runs as APPLY.

OP selects the math (see `reference.py` for the spec and the launchers for the slots):
    FWD   E: -                  sums: per-tile mean and M2, Chan-merged  out: y
    EVAL  E: -                  no sums                                   out: y
    BWD   E1 = grad_y           sums: g, g*xhat                           out: grad_x
    FJVP  E1 = x_t              sums: xt, xt*xhat                         out: y_t
    BB    E1 = grad_y, E2 = ggx sums: g, g*xh, a, a*xh, a*g               out: g_grad_y, g_x
    BJVP  E1 = grad_y, E2 = grad_y_t, E3 = x_t
                                sums: g, g*xh, gt, gt*xh, xt, xt*xh, g*xt out: grad_x_t
g and gt are masked by the recomputed ReLU mask when ACT.

Numerics: accumulation in ACC (float32, float64 for float64 input) within a tile, and in
float64 across tiles and chunks (per tile and channel, not per element; the order of the
merges then costs no precision). The forward statistics are taken of
x - pivot (the channel's first element, read by every program), each tile's mean gets one
residual-correction step and its M2 is two-pass in registers, and tiles and chunks merge
with Chan's formula; the output is (x - pivot) * scale + shift (in eval:
(x - running mean) * scale + bias), so a large common offset (x = 1e4 + N(0, 1)) loses
nothing beyond the float32 rounding of the inputs. The derivative ops centre each element
input by its per-channel mean before scaling it, so a large common part of a cotangent or
tangent costs the rounding of its mean alone (folded into one per-channel constant, it
cancelled after the product's rounding); the tangent whose product with grad_y is summed
(BB's gg_x, BJVP's x_t) enters that sum less its channel's first element, so a common part
of both does not round the product.
"""

import triton
import triton.language as tl

# Plain ints for the launchers; tl.constexpr copies for the jit code (compiled kernels may
# only read constexpr globals).
OP_FWD, OP_EVAL, OP_BWD, OP_FJVP, OP_BB, OP_BJVP = range(6)
MODE_FUSED, MODE_REDUCE, MODE_APPLY = range(3)
NSUMS = {OP_FWD: 2, OP_EVAL: 0, OP_BWD: 2, OP_FJVP: 2, OP_BB: 5, OP_BJVP: 7}
FWD, EVAL, BWD, FJVP, BB, BJVP = (tl.constexpr(i) for i in range(6))
FUSED, REDUCE, APPLY = (tl.constexpr(i) for i in range(3))


@triton.jit
def _load_tile(ptr, k, m, c, valid, L, sK, sN, sC, sL, ACC: tl.constexpr):
    off = k * sK + (m // L) * sN + (m % L) * sL + c * sC
    return tl.load(ptr + off, mask=valid, other=0.0).to(ACC)


@triton.jit
def _store_tile(ptr, val, k, m, c, valid, L, sK, sN, sC, sL):
    off = k * sK + (m // L) * sN + (m % L) * sL + c * sC
    tl.store(ptr + off, val.to(ptr.dtype.element_ty), mask=valid)


@triton.jit
def _load_chan(ptr, k, sK, cs, cmask, HAS: tl.constexpr, ACC: tl.constexpr):
    if HAS:
        v = tl.load(ptr + k * sK + cs, mask=cmask, other=0.0).to(ACC)
    else:
        v = tl.zeros(cs.shape, dtype=ACC)
    return v


@triton.jit
def _prep(OP: tl.constexpr, ACT: tl.constexpr, x, e1, e2, valid, mean, invstd, w, b):
    """xhat (zero outside the tile), the ReLU mask, and the masked cotangents. For FWD the
    `mean` slot holds the channel's pivot and "xhat" is x - pivot: statistics and output
    are computed on values shifted next to zero, so a large common offset costs nothing.
    For EVAL it holds the running mean and "xhat" is x - running mean, for the same
    reason (x * scale + shift would cancel two large terms)."""
    if OP == FWD or OP == EVAL:
        xhat = tl.where(valid, x - mean[None, :], 0.0)
    else:
        xhat = tl.where(valid, (x - mean[None, :]) * invstd[None, :], 0.0)
    relu = valid
    if ACT:
        if OP != FWD and OP != EVAL:
            relu = (xhat * w[None, :] + b[None, :]) > 0
    if OP == BWD or OP == BB or OP == BJVP:
        e1 = tl.where(relu, e1, 0.0)
    if OP == BJVP:
        e2 = tl.where(relu, e2, 0.0)
    return xhat, e1, e2, relu


@triton.jit
def _tile_sums(OP: tl.constexpr, xhat, e1, e2, e3, valid, cnt, pivot):
    """Per-channel sums of one tile (for FWD: its mean and M2, with cnt valid rows), in
    float64 for the merges. The tangent summed times grad_y (BB's gg_x, BJVP's x_t) enters
    that product's sum less `pivot`: with both a large common part, the products of the
    raw values would round away what the sum keeps (_coeffs restores the centred sum in
    float64). g is zero outside the tile, so the product needs no mask."""
    z = tl.sum(tl.zeros_like(xhat), axis=0)
    s0 = z
    s1 = z
    s2 = z
    s3 = z
    s4 = z
    s5 = z
    s6 = z
    if OP == FWD:
        s0 = tl.sum(xhat, axis=0) / cnt
        # one correction step: the mean of the residuals recovers the rounding of the sum
        # (skipped for an infinite mean, where it would be inf - inf)
        fix = tl.sum(tl.where(valid, xhat - s0[None, :], 0.0), axis=0) / cnt
        s0 = tl.where(_finite(s0), s0 + fix, s0)
        d = tl.where(valid, xhat - s0[None, :], 0.0)
        s1 = tl.sum(d * d, axis=0)
    if OP == BWD or OP == FJVP or OP == BB or OP == BJVP:
        s0 = tl.sum(e1, axis=0)
        s1 = tl.sum(e1 * xhat, axis=0)
    if OP == BB:
        s2 = tl.sum(e2, axis=0)
        s3 = tl.sum(e2 * xhat, axis=0)
        s4 = tl.sum((e2 - pivot[None, :]) * e1, axis=0)
    if OP == BJVP:
        s2 = tl.sum(e2, axis=0)
        s3 = tl.sum(e2 * xhat, axis=0)
        s4 = tl.sum(e3, axis=0)
        s5 = tl.sum(e3 * xhat, axis=0)
        s6 = tl.sum(e1 * (e3 - pivot[None, :]), axis=0)
    return (s0.to(tl.float64), s1.to(tl.float64), s2.to(tl.float64), s3.to(tl.float64),
            s4.to(tl.float64), s5.to(tl.float64), s6.to(tl.float64))


@triton.jit
def _merge(OP: tl.constexpr, na, a0, a1, a2, a3, a4, a5, a6, nb, b0, b1, b2, b3, b4, b5, b6):
    """Combine two partial states: Chan's parallel Welford update for FWD, sums otherwise."""
    if OP == FWD:
        n = na + nb
        delta = b0 - a0
        # an infinite mean stays infinite (a0 + delta * w would be inf - inf)
        r0 = tl.where(_finite(delta), a0 + delta * (nb / n), a0 * (na / n) + b0 * (nb / n))
        r1 = a1 + b1 + delta * delta * (na * nb / n)
    else:
        r0 = a0 + b0
        r1 = a1 + b1
    return r0, r1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6


@triton.jit
def _finite(v):
    return v - v == 0   # inf - inf and NaN - NaN are NaN


@triton.jit
def _rsqrt(v):
    if v.dtype == tl.float64:
        r = 1.0 / tl.sqrt(v)
    else:
        # Both steps correctly rounded (a GPU's `/` is an approximate division), as
        # torch.rsqrt is close to.
        r = tl.math.div_rn(1.0, tl.sqrt_rn(v))
    return r


@triton.jit
def _coeffs(OP: tl.constexpr, s0, s1, s2, s3, s4, s5, s6, Mf, mean, invstd, w, b, p1, p2,
            pivot, eps, HAS_E1: tl.constexpr, HAS_E2: tl.constexpr, HAS_E3: tl.constexpr,
            HAS_P1: tl.constexpr, HAS_P2: tl.constexpr):
    """Per-channel coefficients of the elementwise pass and the per-channel outputs, in
    ACC (w's dtype) from the float64 sums. Terms of an absent input are left out, not
    multiplied by its zeros: a non-finite x or grad_y would make them NaN where the
    reference has nothing. The sum of the pivot-shifted tangent times g becomes the
    centred one, sum (tangent - its mean) g, in float64: the cancellation is exact there."""
    m64 = Mf.to(tl.float64)
    if OP == BB:
        s4 += (pivot.to(tl.float64) - s2 / m64) * s0
    if OP == BJVP:
        s6 += (pivot.to(tl.float64) - s4 / m64) * s0
    s0 = s0.to(w.dtype)
    s1 = s1.to(w.dtype)
    s2 = s2.to(w.dtype)
    s3 = s3.to(w.dtype)
    s4 = s4.to(w.dtype)
    s5 = s5.to(w.dtype)
    s6 = s6.to(w.dtype)
    z = tl.zeros_like(w)
    c0 = z
    c1 = z
    c2 = z
    c3 = z
    c4 = z
    c5 = z
    c6 = z
    c7 = z
    q1 = z
    q2 = z
    q3 = z
    r = invstd
    wr = w * r
    wr2 = wr * r
    if OP == FWD:   # s0: mean of x - pivot (the pivot sits in `mean`)
        var = s1 / Mf
        r = _rsqrt(var + eps)
        c0 = w * r
        c1 = b - s0 * c0
        q1 = s0 + mean
        q2 = r
        q3 = var
    if OP == EVAL:   # mean / invstd slots carry running_mean / running_var
        c0 = w * _rsqrt(invstd + eps)
        c1 = b
    if OP == BWD:   # grad_x = (g - c2) c0 + xhat c1
        c0 = wr
        c1 = -(s1 / Mf) * wr
        c2 = s0 / Mf
        q1 = s1
        q2 = s0
    if OP == FJVP:   # y_t = (x_t - c3) c0 + xhat c1 + c2
        if HAS_E1:
            c0 = wr
            c1 = -(s1 / Mf) * wr
            c3 = s0 / Mf
        if HAS_P1:
            c1 += p1
        if HAS_P2:
            c2 += p2
    # BB: g_grad_y = mask * ((a - c6) c0 + xhat c1 + c2); g_x = (a - c6) c3 + (g - c7) c4
    # + xhat c5
    if OP == BB:
        g_mean = s0 / Mf
        gx_mean = s1 / Mf
        c7 = g_mean
        if HAS_E2:
            a_mean = s2 / Mf
            ax_mean = s3 / Mf
            adc = s4 - gx_mean * s3     # sum a (g - mean g - xhat mean(g xhat))
            c0 = wr
            c1 = -wr * ax_mean
            c3 = -wr2 * gx_mean
            c4 = -wr2 * ax_mean
            c5 = 2.0 * wr2 * gx_mean * ax_mean - (r * r / Mf) * w * adc
            c6 = a_mean
            q1 = r * adc
        if HAS_P1:
            c1 += p1
            c4 += r * p1
            c5 -= r * p1 * gx_mean
        if HAS_P2:
            c2 += p2
    # BJVP: grad_x_t = (g_t - c4) c0 + (x_t - c5) c1 + xhat c2 + (g - c6) c3
    if OP == BJVP:
        gb_m = s0 / Mf
        gw_m = s1 / Mf
        gb_t = z
        gw_t = z
        scale_t = z
        if HAS_E2:
            gb_t = s2
            gw_t = s3
            c0 = wr
        if HAS_E3:
            mxt = s4 / Mf
            proj = s5 / Mf
            gw_t += r * (s6 - proj * s1)
            scale_t -= wr2 * proj
            c1 = -wr2 * gw_m
            c2 = wr2 * proj * gw_m
            c5 = mxt
        if HAS_P1:
            scale_t += p1 * r
        c2 -= wr * (gw_t / Mf)
        c4 = gb_t / Mf
        if HAS_E3 or HAS_P1:
            c2 -= scale_t * gw_m
            c3 = scale_t
            c6 = gb_m
        q1 = gw_t
        q2 = gb_t
    return c0, c1, c2, c3, c4, c5, c6, c7, q1, q2, q3


@triton.jit
def _tile_out(OP: tl.constexpr, ACT: tl.constexpr, xhat, e1, e2, e3, relu,
              c0, c1, c2, c3, c4, c5, c6, c7, HAS_E1: tl.constexpr, HAS_E2: tl.constexpr,
              HAS_E3: tl.constexpr, HAS_P1: tl.constexpr):
    """The elementwise outputs; as in _coeffs, terms of absent inputs are left out."""
    o2 = xhat
    if OP == FWD:
        o1 = xhat * c0[None, :] + c1[None, :]
        if ACT:
            o1 = tl.where(o1 < 0, 0.0, o1)   # torch's relu: NaN stays NaN
    if OP == EVAL:
        o1 = xhat * c0[None, :] + c1[None, :]
        if ACT:
            o1 = tl.where(o1 < 0, 0.0, o1)
    if OP == BWD:
        o1 = (e1 - c2[None, :]) * c0[None, :] + xhat * c1[None, :]
    if OP == FJVP:
        o1 = tl.zeros_like(xhat) + c2[None, :]
        if HAS_E1:
            o1 += (e1 - c3[None, :]) * c0[None, :]
        if HAS_E1 or HAS_P1:
            o1 += xhat * c1[None, :]
        if ACT:
            o1 = tl.where(relu, o1, 0.0)
    if OP == BB:
        o1 = tl.zeros_like(xhat) + c2[None, :]
        o2 = tl.zeros_like(xhat)
        if HAS_E2:
            a = e2 - c6[None, :]
            o1 += a * c0[None, :]
            o2 += a * c3[None, :]
        if HAS_E2 or HAS_P1:
            o1 += xhat * c1[None, :]
            o2 += (e1 - c7[None, :]) * c4[None, :] + xhat * c5[None, :]
        if ACT:
            o1 = tl.where(relu, o1, 0.0)
    if OP == BJVP:
        o1 = xhat * c2[None, :]
        if HAS_E2:
            o1 += (e2 - c4[None, :]) * c0[None, :]
        if HAS_E3:
            o1 += (e3 - c5[None, :]) * c1[None, :]
        if HAS_E3 or HAS_P1:
            o1 += (e1 - c6[None, :]) * c3[None, :]
    return o1, o2


@triton.jit
def _load_elems(X, E1, E2, E3, k, m, c, valid, L,
                sxN, sxC, sxL, s1K, s1N, s1C, s1L, s2K, s2N, s2C, s2L, s3K, s3N, s3C, s3L,
                HAS_E1: tl.constexpr, HAS_E2: tl.constexpr, HAS_E3: tl.constexpr,
                ACC: tl.constexpr):
    x = _load_tile(X, k, m, c, valid, L, 0, sxN, sxC, sxL, ACC)
    zero = tl.zeros_like(x)
    e1 = zero
    e2 = zero
    e3 = zero
    if HAS_E1:
        e1 = _load_tile(E1, k, m, c, valid, L, s1K, s1N, s1C, s1L, ACC)
    if HAS_E2:
        e2 = _load_tile(E2, k, m, c, valid, L, s2K, s2N, s2C, s2L, ACC)
    if HAS_E3:
        e3 = _load_tile(E3, k, m, c, valid, L, s3K, s3N, s3C, s3L, ACC)
    return x, e1, e2, e3


@triton.jit
def _store_partial(PART, base, C, cs, cmask, i: tl.constexpr, NS: tl.constexpr, v):
    if i < NS:
        tl.store(PART + base + i * C + cs, v, mask=cmask)


@triton.jit
def _load_partial(PART, base, C, cs, cmask, i: tl.constexpr, NS: tl.constexpr, zero):
    v = zero
    if i < NS:
        v = tl.load(PART + base + i * C + cs, mask=cmask, other=0.0)
    return v


@triton.jit(do_not_specialize=["eps_hi", "eps_lo"])
def bn_kernel(X, E1, E2, E3, O1, O2,
              MEAN, INVSTD, W, B, P1, P2, Q1, Q2, Q3, PART,
              M, C, L, CHUNK, NCHUNKS, eps_hi, eps_lo,
              sxN, sxC, sxL,
              s1K, s1N, s1C, s1L, s2K, s2N, s2C, s2L, s3K, s3N, s3C, s3L,
              so1K, so1N, so1C, so1L, so2K, so2N, so2C, so2L,
              sp1K, sp2K, sqK,
              OP: tl.constexpr, MODE: tl.constexpr, ACT: tl.constexpr,
              HAS_E1: tl.constexpr, HAS_E2: tl.constexpr, HAS_E3: tl.constexpr,
              HAS_P1: tl.constexpr, HAS_P2: tl.constexpr, NS: tl.constexpr,
              ACC: tl.constexpr, IDX64: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # K shares grid axis 0 with the channel blocks: CUDA caps axes 1 and 2 at 65535.
    blocks = tl.cdiv(C, BLOCK_C)
    k = tl.program_id(0) // blocks
    pid_c = tl.program_id(0) % blocks
    ch = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if IDX64:
        ch = ch.to(tl.int64)
        k = k.to(tl.int64)
        rows = rows.to(tl.int64)
        cs = cs.to(tl.int64)
    cmask = cs < C
    c2 = cs[None, :]
    cm2 = cmask[None, :]
    # Not M.to(ACC): the JIT turns an int argument equal to 1 into a constexpr.
    Mf = tl.full([], M, ACC)
    # eps as the bits of a float64 in two int32 halves (a float argument is float32 in
    # compiled code, an int one typed by its value): exact in float64, rounded to float32
    # as torch rounds a scalar.
    eps_bits = (tl.full([], eps_hi, tl.int64) << 32) | (tl.full([], eps_lo, tl.int64)
                                                          & 0xFFFFFFFF)
    eps = eps_bits.to(tl.float64, bitcast=True).to(ACC)

    if OP == FWD:   # pivot: the channel's first element, 0 if that is not finite
        mean = tl.load(X + cs * sxC, mask=cmask, other=0.0).to(ACC)
        mean = tl.where(_finite(mean), mean, 0.0)
        invstd = mean
    else:
        mean = tl.load(MEAN + cs, mask=cmask, other=0.0).to(ACC)
        invstd = tl.load(INVSTD + cs, mask=cmask, other=0.0).to(ACC)
    # The pivot of _tile_sums: the tangent's first element in the channel (0 if that is
    # not finite).
    pivot = tl.zeros([BLOCK_C], dtype=ACC)
    if OP == BB and HAS_E2:
        pivot = tl.load(E2 + k * s2K + cs * s2C, mask=cmask, other=0.0).to(ACC)
    if OP == BJVP and HAS_E3:
        pivot = tl.load(E3 + k * s3K + cs * s3C, mask=cmask, other=0.0).to(ACC)
    pivot = tl.where(_finite(pivot), pivot, 0.0)
    w = tl.load(W + cs, mask=cmask, other=0.0).to(ACC)
    b = tl.load(B + cs, mask=cmask, other=0.0).to(ACC)
    p1 = _load_chan(P1, k, sp1K, cs, cmask, HAS_P1, ACC)
    p2 = _load_chan(P2, k, sp2K, cs, cmask, HAS_P2, ACC)
    zc = tl.zeros([BLOCK_C], dtype=tl.float64)   # merged sums
    chunk_start = ch * CHUNK
    chunk_end = tl.minimum(chunk_start + CHUNK, M)

    if MODE == REDUCE:
        n = tl.full([], 0.0, tl.float64)
        s0, s1, s2, s3, s4, s5, s6 = zc, zc, zc, zc, zc, zc, zc
        for start in range(chunk_start, chunk_end, BLOCK_M):
            m = start + rows[:, None]
            valid = (m < chunk_end) & cm2
            x, e1, e2, e3 = _load_elems(X, E1, E2, E3, k, m, c2, valid, L, sxN, sxC, sxL,
                                        s1K, s1N, s1C, s1L, s2K, s2N, s2C, s2L,
                                        s3K, s3N, s3C, s3L, HAS_E1, HAS_E2, HAS_E3, ACC)
            xhat, e1, e2, relu = _prep(OP, ACT, x, e1, e2, valid, mean, invstd, w, b)
            cnt = (tl.minimum(chunk_end - start, BLOCK_M)).to(ACC)
            t0, t1, t2, t3, t4, t5, t6 = _tile_sums(OP, xhat, e1, e2, e3, valid, cnt, pivot)
            cnt = cnt.to(tl.float64)
            s0, s1, s2, s3, s4, s5, s6 = _merge(OP, n, s0, s1, s2, s3, s4, s5, s6,
                                                cnt, t0, t1, t2, t3, t4, t5, t6)
            n += cnt
        base = (k * NCHUNKS + ch) * NS * C
        _store_partial(PART, base, C, cs, cmask, 0, NS, s0)
        _store_partial(PART, base, C, cs, cmask, 1, NS, s1)
        _store_partial(PART, base, C, cs, cmask, 2, NS, s2)
        _store_partial(PART, base, C, cs, cmask, 3, NS, s3)
        _store_partial(PART, base, C, cs, cmask, 4, NS, s4)
        _store_partial(PART, base, C, cs, cmask, 5, NS, s5)
        _store_partial(PART, base, C, cs, cmask, 6, NS, s6)
    else:
        if MODE == FUSED:
            m = rows[:, None]
            valid = (m < M) & cm2
            x, e1, e2, e3 = _load_elems(X, E1, E2, E3, k, m, c2, valid, L, sxN, sxC, sxL,
                                        s1K, s1N, s1C, s1L, s2K, s2N, s2C, s2L,
                                        s3K, s3N, s3C, s3L, HAS_E1, HAS_E2, HAS_E3, ACC)
            xhat, e1, e2, relu = _prep(OP, ACT, x, e1, e2, valid, mean, invstd, w, b)
            s0, s1, s2, s3, s4, s5, s6 = _tile_sums(OP, xhat, e1, e2, e3, valid, Mf, pivot)
        else:
            # APPLY: combine the partial statistics of every chunk of these channels.
            n = tl.full([], 0.0, tl.float64)
            s0, s1, s2, s3, s4, s5, s6 = zc, zc, zc, zc, zc, zc, zc
            if NS > 0:
                for j32 in range(0, NCHUNKS):
                    j = j32
                    if IDX64:
                        j = tl.cast(j32, tl.int64)   # the interpreter's range yields ints
                    base = (k * NCHUNKS + j) * NS * C
                    t0 = _load_partial(PART, base, C, cs, cmask, 0, NS, zc)
                    t1 = _load_partial(PART, base, C, cs, cmask, 1, NS, zc)
                    t2 = _load_partial(PART, base, C, cs, cmask, 2, NS, zc)
                    t3 = _load_partial(PART, base, C, cs, cmask, 3, NS, zc)
                    t4 = _load_partial(PART, base, C, cs, cmask, 4, NS, zc)
                    t5 = _load_partial(PART, base, C, cs, cmask, 5, NS, zc)
                    t6 = _load_partial(PART, base, C, cs, cmask, 6, NS, zc)
                    cnt = (tl.minimum(M - j * CHUNK, CHUNK)).to(tl.float64)
                    s0, s1, s2, s3, s4, s5, s6 = _merge(OP, n, s0, s1, s2, s3, s4, s5, s6,
                                                        cnt, t0, t1, t2, t3, t4, t5, t6)
                    n += cnt
        c0, c1, cc2, c3, c4, c5, c6, c7, q1, q2, q3 = _coeffs(
            OP, s0, s1, s2, s3, s4, s5, s6, Mf, mean, invstd, w, b, p1, p2, pivot, eps,
            HAS_E1, HAS_E2, HAS_E3, HAS_P1, HAS_P2)
        if ch == 0:
            if OP == FWD:
                tl.store(Q1 + cs, q1, mask=cmask)
                tl.store(Q2 + cs, q2, mask=cmask)
                tl.store(Q3 + cs, q3, mask=cmask)
            if OP == BWD or OP == BJVP:
                tl.store(Q1 + k * sqK + cs, q1, mask=cmask)
                tl.store(Q2 + k * sqK + cs, q2, mask=cmask)
            if OP == BB:
                tl.store(Q1 + k * sqK + cs, q1, mask=cmask)
        if MODE == FUSED:
            o1, o2 = _tile_out(OP, ACT, xhat, e1, e2, e3, relu, c0, c1, cc2, c3, c4, c5, c6,
                               c7, HAS_E1, HAS_E2, HAS_E3, HAS_P1)
            _store_tile(O1, o1, k, m, c2, valid, L, so1K, so1N, so1C, so1L)
            if OP == BB:
                _store_tile(O2, o2, k, m, c2, valid, L, so2K, so2N, so2C, so2L)
        else:
            for start in range(chunk_start, chunk_end, BLOCK_M):
                m = start + rows[:, None]
                valid = (m < chunk_end) & cm2
                x, e1, e2, e3 = _load_elems(X, E1, E2, E3, k, m, c2, valid, L, sxN, sxC, sxL,
                                            s1K, s1N, s1C, s1L, s2K, s2N, s2C, s2L,
                                            s3K, s3N, s3C, s3L, HAS_E1, HAS_E2, HAS_E3, ACC)
                xhat, e1, e2, relu = _prep(OP, ACT, x, e1, e2, valid, mean, invstd, w, b)
                o1, o2 = _tile_out(OP, ACT, xhat, e1, e2, e3, relu,
                                   c0, c1, cc2, c3, c4, c5, c6, c7, HAS_E1, HAS_E2, HAS_E3,
                                   HAS_P1)
                _store_tile(O1, o1, k, m, c2, valid, L, so1K, so1N, so1C, so1L)
                if OP == BB:
                    _store_tile(O2, o2, k, m, c2, valid, L, so2K, so2N, so2C, so2L)


def _inline_helpers_for_interpreter():
    """Under TRITON_INTERPRET=1 every call of a jit helper re-patches triton.language
    (tens of milliseconds each); the kernel has already patched it, so the helpers are
    swapped for their rewritten Python bodies. Nothing changes for compiled kernels."""
    from triton.runtime.interpreter import InterpretedFunction
    module = globals()
    for key, value in list(module.items()):
        if isinstance(value, InterpretedFunction) and key != "bn_kernel":
            module[key] = value.rewrite()


# TRITON_INTERPRET when this module was imported decides, for the life of the process.
INTERPRETED = type(bn_kernel).__name__ == "InterpretedFunction"
if INTERPRETED:
    _inline_helpers_for_interpreter()
