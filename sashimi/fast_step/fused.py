"""The per-sample step of SaShiMi on the CPU as one compiled routine.

`SaShiMi.step` makes ~770 small torch calls per sample, and at these widths each costs more in
dispatch than in arithmetic. `FusedStep` runs the same step, and the sampling after it, as one
numba-compiled function over buffers laid out once, the way LPCNet and nv-wavenet keep a whole
autoregressive step in one routine with the weights close:

    weights  w   one float32 array; matrices stored transposed, (in, out), so y += x_i W[i] runs
                 over contiguous memory
    state    s   one float32 array: each S4 layer's x as real and imaginary planes, each tier's
                 pooling buffers, scratch
    tables       int64 offsets into w and s: one row per residual block, one per tier, one for
                 the whole network (the column names below)

The tables, not the types, carry the architecture, so one compile serves every model; numba
caches it on disk (`_compiled`). The arithmetic is SaShiMi.step's, in float32, summed in another
order: tests/test_fast_step.py holds the two within 1e-4 in the logits over 4,096 steps.
"""

import functools
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from torch import Tensor

from ..model import SaShiMi, SaShiMiState, StackState

log = logging.getLogger(__name__)

# Allowed: reordering sums (so reductions run as SIMD) and fused multiply-adds. Not allowed: the
# no-NaN / no-inf assumptions of full fastmath; sampling masks classes with -inf.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


def _compiled(fn):
    """numba.njit, with the machine code cached on disk next to this file or, where that folder is
    read-only, in the user's cache folder (numba's own fallback). Where neither is writable,
    numba refuses to cache: then compile in every process instead, and say so once."""
    options = dict(fastmath=FASTMATH, nogil=True, error_model="numpy")
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError as error:  # numba: "cannot cache function ...: no locator available"
        if not _compiled.warned:
            log.warning("numba cannot cache its compile here (%s); compiling in-process", error)
            _compiled.warned = True
        return numba.njit(**options)(fn)


_compiled.warned = False


def _inlined(fn):
    """A helper that numba inlines into its one caller before compiling that (inline="always"),
    so that it is optimised once, there: each compiled function is optimised on its own and again
    inside every compiled caller. _step inlined into _run (with the stack loop merged into it)
    took the first-use compile from 28 to 23 CPU seconds (benchmarks/bench_generation.py
    --compile); inlining every helper instead took 50."""
    return numba.njit(inline="always", fastmath=FASTMATH, nogil=True, error_model="numpy")(fn)


# --- tables ---------------------------------------------------------------------------------------
# Block table, one row per [Residual(S4), Residual(FeedForward)] pair: where its arrays start.
# In w: norms, the SSM's discrete parameters as real/imaginary planes, the linears (transposed).
# In s: the SSM state x and the label bias c_k (zeros for an unlabelled model).
(
    S4_NORM_W, S4_NORM_B,                                # LayerNorm before the S4 layer (H,)
    A_RE, A_IM,                                          # diagonal: A_bar (N/2, H)
    B_RE, B_IM,                                          # diagonal: B_bar; DPLR: dt B (N/2, H)
    C_RE, C_IM, D_SKIP,                                  # C (N/2, H), D (H,)
    LAMBDA_RE, LAMBDA_IM, P_RE, P_IM,                    # DPLR: Lambda, P (N/2,)
    HALF_DT, E_RE, E_IM, EP_RE, EP_IM,                   # DPLR: dt/2 (H,), E, EP_scaled (N/2, H)
    OUT_W, OUT_B,                                        # S4 output linear H -> 2H, before GLU
    FF_NORM_W, FF_NORM_B, FF_IN_W, FF_IN_B, FF_OUT_W, FF_OUT_B,
    X_RE, X_IM,                                          # state x (rows, N/2, H), in s
    LABEL_BIAS,                                          # c_k (rows, H), in s
    BLOCK_COLUMNS,
) = range(30)  # fmt: skip
# Tier table, one row per tier, the centre last: width, pooling, blocks, and (in s) the pooling
# buffers and the tier's input, running value and output (rows, H).
(
    WIDTH, POOL, FIRST_BLOCK, N_BLOCKS,
    DOWN_W, DOWN_B, UP_W, UP_B,                          # in w; the centre has none
    PENDING,                                             # (rows, p H): the group's inputs so far
    UPSAMPLED,                                           # (rows, p, H): UpPool of the inner tier
    INPUT, HIDDEN, OUTPUT,                               # (rows, H)
    TIER_COLUMNS,
) = range(14)  # fmt: skip
# Network table: one row.
(
    EMBEDDING, NORM_W, NORM_B, HEAD_W, HEAD_B,           # in w
    N_CLASSES, ROWS, HALF_N, FF_WIDTH, DPLR,             # sizes; DPLR: 1 for the DPLR kernel
    Z, Y, GATE, FF_HIDDEN, SUMS, LOGIT_INPUT,            # scratch in s
    NET_COLUMNS,
) = range(17)  # fmt: skip

SQRT_HALF = np.float32(math.sqrt(0.5))
TANH_CLAMP = np.float32(7.90531110763549805)  # tanh rounds to +-1 in float32 beyond this
TANH_NUMERATOR = tuple(  # odd part: a13, a11, ..., a1 (Eigen's float tanh, see _sigmoid)
    np.float32(a)
    for a in (
        -2.76076847742355e-16,
        2.00018790482477e-13,
        -8.60467152213735e-11,
        5.12229709037114e-08,
        1.48572235717979e-05,
        6.37261928875436e-04,
        4.89352455891786e-03,
    )
)
TANH_DENOMINATOR = tuple(  # even part: b6, b4, b2, b0
    np.float32(b)
    for b in (
        1.19825839466702e-06,
        1.18534705686654e-04,
        2.26843463243900e-03,
        4.89352518554385e-03,
    )
)
ERF_COEFFICIENTS = tuple(  # a6 ... a1, a0 of A&S 7.1.28 (see _erf)
    np.float32(a)
    for a in (0.0000430638, 0.0002765672, 0.0001520143, 0.0092705272, 0.0422820123, 0.0705230784, 1)
)


# --- the arithmetic -------------------------------------------------------------------------------
# Every array is a 1-D slice of w or s from its first element; a (rows, cols) matrix is row-major,
# element (r, c) at [r * cols + c]. Slicing costs nothing in numba, while a reshape to 2-D calls
# into its runtime: 58 ns each (measured), ~16 us a step at the ~270 views a step would take.


@_compiled
def _layer_norm(x, weight, bias, eps, out, rows, H):
    """out = (x - mean) / sqrt(var + eps) * weight + bias over each row of x (rows, H)."""
    inv_H = np.float32(1.0) / np.float32(H)
    for row in range(0, rows * H, H):
        mean = np.float32(0.0)
        for c in range(H):
            mean += x[row + c]
        mean *= inv_H
        var = np.float32(0.0)
        for c in range(H):
            var += (x[row + c] - mean) ** 2
        scale = np.float32(1.0) / np.sqrt(var * inv_H + eps)
        for c in range(H):
            out[row + c] = (x[row + c] - mean) * scale * weight[c] + bias[c]


@_compiled
def _erf(v):
    """erf by Abramowitz & Stegun 7.1.28: 1 - (1 + a1 |v| + ... + a6 |v|^6)^-16, odd in v.

    |error| <= 3e-7 in exact arithmetic, 1.7e-6 in float32 (measured over [-6, 6]), so GELU is
    off by at most 4e-7 (torch's own vectorised erf, A&S 7.1.26, by 1.5e-7). Only arithmetic:
    the GELU loops vectorise, 6x faster than a call to libm's erff per element."""
    a = abs(v)
    p = np.float32(0.0)
    for coefficient in ERF_COEFFICIENTS:  # Horner, a6 first
        p = p * a + coefficient
    p *= p  # p^16 by four squarings; an overflow to inf gives erf = 1, as it should
    p *= p
    p *= p
    p *= p
    e = np.float32(1.0) - np.float32(1.0) / p
    return e if v >= 0 else -e


@_compiled
def _sigmoid(v):
    """1 / (1 + exp(-v)) as 1/2 + tanh(v/2) / 2, with tanh the rational minimax fit Eigen uses
    for float (odd degree 13 over even degree 6, clamped). Within 1.5e-7 of the exact sigmoid
    (measured over [-30, 30]; float32 1 / (1 + exp(-v)) is within 9e-8), and only arithmetic,
    so the GLU loop vectorises instead of calling libm's expf per element (~8% of an sc09 step
    at 16 rows, measured)."""
    x = min(max(v * np.float32(0.5), -TANH_CLAMP), TANH_CLAMP)
    x2 = x * x
    p = np.float32(0.0)
    for a in TANH_NUMERATOR:
        p = p * x2 + a
    q = np.float32(0.0)
    for b in TANH_DENOMINATOR:
        q = q * x2 + b
    return np.float32(0.5) + np.float32(0.5) * (x * p / q)


@_compiled
def _gelu_(x, n):
    """GELU in place over x[:n], the exact form torch uses by default: v/2 (1 + erf(v / sqrt 2))."""
    for i in range(n):
        v = x[i]
        x[i] = np.float32(0.5) * v * (np.float32(1.0) + _erf(v * SQRT_HALF))


@_inlined
def _four_rows(a, i, n):
    """Rows i to i + 3 of a flat row-major array with rows of n, as views from each row's start."""
    return a[i * n :], a[(i + 1) * n :], a[(i + 2) * n :], a[(i + 3) * n :]


@_compiled
def _linear(x, W, b, y, rows, n_in, n_out, accumulate):
    """y = x W + b, or y += x W + b when accumulate: x (rows, n_in), W (n_in, n_out) (the
    transposed torch weight), b (n_out,).

    Register blocking: a pass over the outputs takes four inputs of four rows at once, so each
    weight loaded serves four rows and each load and store of y carries four multiply-adds; the
    inner loop runs over contiguous outputs and vectorises. 35-39 G multiply-adds/s at sc09's
    shapes with 16 rows against 24-30 for one row at a time (measured; scipy's BLAS made 29-34
    and wants its threads held to one)."""
    for r in range(rows):
        if accumulate:
            for o in range(n_out):
                y[r * n_out + o] += b[o]
        else:
            for o in range(n_out):
                y[r * n_out + o] = b[o]
    r = 0
    while r + 4 <= rows:  # four rows at a time
        y0, y1, y2, y3 = _four_rows(y, r, n_out)
        x0, x1, x2, x3 = _four_rows(x, r, n_in)
        for i in range(0, n_in - 3, 4):
            w0, w1, w2, w3 = _four_rows(W, i, n_out)
            a0, a1, a2, a3 = x0[i], x0[i + 1], x0[i + 2], x0[i + 3]
            b0, b1, b2, b3 = x1[i], x1[i + 1], x1[i + 2], x1[i + 3]
            c0, c1, c2, c3 = x2[i], x2[i + 1], x2[i + 2], x2[i + 3]
            d0, d1, d2, d3 = x3[i], x3[i + 1], x3[i + 2], x3[i + 3]
            for o in range(n_out):
                p, q, s, t = w0[o], w1[o], w2[o], w3[o]
                y0[o] += a0 * p + a1 * q + a2 * s + a3 * t
                y1[o] += b0 * p + b1 * q + b2 * s + b3 * t
                y2[o] += c0 * p + c1 * q + c2 * s + c3 * t
                y3[o] += d0 * p + d1 * q + d2 * s + d3 * t
        r += 4
    while r < rows:  # the rest one by one
        y0, x0 = y[r * n_out :], x[r * n_in :]
        for i in range(0, n_in - 3, 4):
            w0, w1, w2, w3 = _four_rows(W, i, n_out)
            a0, a1, a2, a3 = x0[i], x0[i + 1], x0[i + 2], x0[i + 3]
            for o in range(n_out):
                y0[o] += a0 * w0[o] + a1 * w1[o] + a2 * w2[o] + a3 * w3[o]
        r += 1
    for i in range(n_in // 4 * 4, n_in):  # inputs left over by the fours
        for r in range(rows):
            for o in range(n_out):
                y[r * n_out + o] += x[r * n_in + i] * W[i * n_out + o]


@_compiled
def _ssm_diagonal(w, s, block, u, y, rows, H, half_N):
    """S4D recurrence per channel on real planes: x = A_bar x + B_bar u,  y = 2 Re(C x) + D u
    (the 2: the conjugate modes are not stored). u, y (rows, H); x (rows, N/2, H) in place.

    Modes are the outer loop and channels the inner one (parameters stored (N/2, H)): the inner
    loop is then long and has no sum across it, 7x faster than channels outer (0.5 ns against
    3.3 ns per mode and channel, measured at H = 32, N/2 = 16)."""
    A_re, A_im, B_re, B_im = w[block[A_RE] :], w[block[A_IM] :], w[block[B_RE] :], w[block[B_IM] :]
    C_re, C_im, D = w[block[C_RE] :], w[block[C_IM] :], w[block[D_SKIP] :]
    for r in range(rows):
        x_re = s[block[X_RE] + r * half_N * H :]
        x_im = s[block[X_IM] + r * half_N * H :]
        u_r, y_r = u[r * H :], y[r * H :]
        for h in range(H):
            y_r[h] = D[h] * u_r[h]
        for n in range(half_N):
            for h in range(H):
                m = n * H + h
                re = A_re[m] * x_re[m] - A_im[m] * x_im[m] + B_re[m] * u_r[h]
                im = A_re[m] * x_im[m] + A_im[m] * x_re[m] + B_im[m] * u_r[h]
                x_re[m], x_im[m] = re, im
                y_r[h] += np.float32(2.0) * (C_re[m] * re - C_im[m] * im)


@_compiled
def _ssm_dplr(w, s, net, block, u, y, rows, H, half_N):
    """The bilinear DPLR step of s4.DPLRStep, A = Lambda - P P^H, inverse by Woodbury:

        v = x + dt/2 (Lambda x - P (P^H x)) + dt B u,   x = E v - EP_scaled (P^H E v),
        y = 2 Re(C x) + D u,

    every P^H inner product over all N modes being 2 Re of the sum over the stored half.
    Layout and loop order as _ssm_diagonal; the inner products per channel go to scratch."""
    L_re, L_im, P_re, P_im = (
        w[block[LAMBDA_RE] :],
        w[block[LAMBDA_IM] :],
        w[block[P_RE] :],
        w[block[P_IM] :],
    )
    dtB_re, dtB_im, E_re, E_im = (
        w[block[B_RE] :],
        w[block[B_IM] :],
        w[block[E_RE] :],
        w[block[E_IM] :],
    )
    EP_re, EP_im, C_re, C_im = (
        w[block[EP_RE] :],
        w[block[EP_IM] :],
        w[block[C_RE] :],
        w[block[C_IM] :],
    )
    half_dt, D = w[block[HALF_DT] :], w[block[D_SKIP] :]
    Px, PEv = s[net[SUMS] :], s[net[SUMS] + H :]  # P^H x and P^H E v of each channel (H,)
    for r in range(rows):
        x_re = s[block[X_RE] + r * half_N * H :]
        x_im = s[block[X_IM] + r * half_N * H :]
        u_r, y_r = u[r * H :], y[r * H :]
        for h in range(H):
            Px[h], PEv[h], y_r[h] = 0, 0, D[h] * u_r[h]
        for n in range(half_N):
            for h in range(H):
                Px[h] += np.float32(2.0) * (P_re[n] * x_re[n * H + h] + P_im[n] * x_im[n * H + h])
        for n in range(half_N):
            for h in range(H):
                m = n * H + h
                xr, xi, dt2 = x_re[m], x_im[m], half_dt[h]
                v_re = (
                    xr + dt2 * (L_re[n] * xr - L_im[n] * xi - P_re[n] * Px[h]) + dtB_re[m] * u_r[h]
                )
                v_im = (
                    xi + dt2 * (L_re[n] * xi + L_im[n] * xr - P_im[n] * Px[h]) + dtB_im[m] * u_r[h]
                )
                Ev_re = E_re[m] * v_re - E_im[m] * v_im
                Ev_im = E_re[m] * v_im + E_im[m] * v_re
                x_re[m], x_im[m] = Ev_re, Ev_im
                PEv[h] += np.float32(2.0) * (P_re[n] * Ev_re + P_im[n] * Ev_im)
        for n in range(half_N):
            for h in range(H):
                m = n * H + h
                re = x_re[m] - EP_re[m] * PEv[h]
                im = x_im[m] - EP_im[m] * PEv[h]
                x_re[m], x_im[m] = re, im
                y_r[h] += np.float32(2.0) * (C_re[m] * re - C_im[m] * im)


@_compiled
def _block(w, s, net, block, h, rows, H, eps):
    """One [Residual(S4), Residual(FeedForward)] pair on h (rows, H), in place (inference):

    u = LayerNorm(h) + c_k,  y = SSM(u),  h += GLU(Linear(GELU(y))),
    h += Linear(GELU(Linear(LayerNorm(h)))).
    """
    half_N, ff = net[HALF_N], net[FF_WIDTH] * H
    z, y, gate, hidden = s[net[Z] :], s[net[Y] :], s[net[GATE] :], s[net[FF_HIDDEN] :]
    label_bias = s[block[LABEL_BIAS] :]

    _layer_norm(h, w[block[S4_NORM_W] :], w[block[S4_NORM_B] :], eps, z, rows, H)
    for i in range(rows * H):
        z[i] += label_bias[i]
    if net[DPLR]:
        _ssm_dplr(w, s, net, block, z, y, rows, H, half_N)
    else:
        _ssm_diagonal(w, s, block, z, y, rows, H, half_N)
    _gelu_(y, rows * H)
    _linear(y, w[block[OUT_W] :], w[block[OUT_B] :], gate, rows, H, 2 * H, False)
    for r in range(rows):
        for c in range(H):  # GLU: first half times the sigmoid of the second
            a, b = gate[2 * H * r + c], gate[2 * H * r + H + c]
            h[r * H + c] += a * _sigmoid(b)

    _layer_norm(h, w[block[FF_NORM_W] :], w[block[FF_NORM_B] :], eps, z, rows, H)
    _linear(z, w[block[FF_IN_W] :], w[block[FF_IN_B] :], hidden, rows, H, ff, False)
    _gelu_(hidden, rows * ff)
    _linear(hidden, w[block[FF_OUT_W] :], w[block[FF_OUT_B] :], h, rows, ff, H, True)


@_inlined
def _step(tokens, w, s, positions, net, blocks, tiers, eps, logits):
    """One sample of every row: tokens (rows,) -> logits (rows, n_classes), state in s advanced.

    SaShiMi._step_tier without recursion. Going in: tier i reads upsampled[position % p] + its
    input, runs its stack, and files its input in the pending group; a complete group is pooled
    into the input of tier i + 1, and so on to the centre. Coming out: each tier whose group
    completed takes the UpPool of the inner tier's output as the p outputs its next group reads.
    """
    rows, n_pools, n_classes = net[ROWS], tiers.shape[0] - 1, net[N_CLASSES]
    H0 = tiers[0, WIDTH]
    embedding, x0 = w[net[EMBEDDING] :], s[tiers[0, INPUT] :]
    for r in range(rows):
        x0[r * H0 : (r + 1) * H0] = embedding[tokens[r] * H0 : (tokens[r] + 1) * H0]
    deepest = 0  # the innermost tier that steps this sample
    while True:
        tier = tiers[deepest]
        H, p = tier[WIDTH], tier[POOL]
        if deepest < n_pools:
            phase = positions[deepest] % p
            x, pending, upsampled = s[tier[INPUT] :], s[tier[PENDING] :], s[tier[UPSAMPLED] :]
            for r in range(rows):
                for c in range(H):
                    pending[(r * p + phase) * H + c] = x[r * H + c]
                    x[r * H + c] += upsampled[(r * p + phase) * H + c]  # UpPool + U-Net skip
        x, hidden, out = s[tier[INPUT] :], s[tier[HIDDEN] :], s[tier[OUTPUT] :]
        hidden[: rows * H] = x[: rows * H]
        for k in range(tier[FIRST_BLOCK], tier[FIRST_BLOCK] + tier[N_BLOCKS]):
            _block(w, s, net, blocks[k], hidden, rows, H, eps)
        for i in range(rows * H):
            out[i] = x[i] + hidden[i]  # the tier's residual around its stack
        if deepest == n_pools:
            break
        positions[deepest] += 1
        if phase < p - 1:
            break
        inner = tiers[deepest + 1]
        _linear(
            pending, w[tier[DOWN_W] :], w[tier[DOWN_B] :], s[inner[INPUT] :],
            rows, p * H, inner[WIDTH], False,
        )  # fmt: skip
        deepest += 1
    for i in range(deepest - 1, -1, -1):
        tier, inner = tiers[i], tiers[i + 1]
        _linear(
            s[inner[OUTPUT] :], w[tier[UP_W] :], w[tier[UP_B] :], s[tier[UPSAMPLED] :],
            rows, inner[WIDTH], tier[POOL] * tier[WIDTH], False,
        )  # fmt: skip
    z = s[net[LOGIT_INPUT] :]
    _layer_norm(s[tiers[0, OUTPUT] :], w[net[NORM_W] :], w[net[NORM_B] :], eps, z, rows, H0)
    _linear(z, w[net[HEAD_W] :], w[net[HEAD_B] :], logits.ravel(), rows, H0, n_classes, False)


# --- sampling -------------------------------------------------------------------------------------


@_compiled
def _lerp(start, end, weight):
    """start + weight (end - start), rounded as torch.lerp rounds it (from the nearer end)."""
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


@_compiled
def _sample(logits, noise, greedy, inverse_temperature, top_k, top_p, kept):
    """One class drawn from logits (n_classes,) as generate.Sampler draws it: the argmax when
    greedy; else argmax(g + logits / T) over the classes top-k and top-p keep (Gumbel-max), with
    g the Gumbel noise (n_classes,) Sampler drew ahead. 1 / T and top_p are float32 as Sampler's
    tensors hold them (top_p = inf: no nucleus); kept (n_classes,) bool is scratch."""
    n = logits.shape[0]
    if greedy:
        return np.argmax(logits)
    kept[:] = True
    if top_k:
        kth_largest = np.sort(logits)[n - top_k]
        for c in range(n):
            kept[c] = logits[c] >= kth_largest
    if top_p < np.inf:
        # nucleus, as Sampler._nucleus: classes by falling logit, kept while the probability
        # mass before them (tempered softmax over the top-k survivors) is below top_p
        masked = np.where(kept, logits, -np.inf).astype(np.float32)
        order = np.argsort(-masked, kind="mergesort")
        top = masked[order[0]] * inverse_temperature
        total = np.float32(0.0)
        for c in range(n):
            total += np.exp(masked[c] * inverse_temperature - top)
        mass = 0.0  # accumulated in float64, as torch's CPU cumsum does
        for c in order:
            probability = np.exp(masked[c] * inverse_temperature - top) / total
            mass += probability
            kept[c] = np.float32(mass) - probability < top_p
    best, best_value = 0, -np.inf
    for c in range(n):
        if kept[c]:
            value = noise[c] + inverse_temperature * logits[c]
            if value > best_value:
                best, best_value = c, value
    return best


@_compiled
def _log_softmax_at(logits, k):
    """log softmax(logits)[k]: the log-probability of class k. The terms in float32 (the
    logits' own precision; expf vectorises), their sum and the log in float64."""
    top = logits.max()
    total = 0.0
    for c in range(logits.shape[0]):
        total += np.exp(logits[c] - top)
    return np.float64(logits[k] - top) - np.log(total)


@_compiled
def _combine(logits, guided, guidance, combined):
    """The logits to sample from (clips, n_classes): rows [0, clips) hold the clips' labels and,
    when guided, rows [clips, 2 clips) every field unknown, combined as
    l_unknown + w (l_given - l_unknown) (classifier-free guidance)."""
    clips, n = combined.shape
    for c in range(clips):
        for k in range(n):
            if guided:
                combined[c, k] = _lerp(logits[clips + c, k], logits[c, k], guidance)
            else:
                combined[c, k] = logits[c, k]


@_compiled
def _run(
    k, w, s, positions, net, blocks, tiers, eps, logits, combined, guided, guidance,
    sample, noise, greedy, inverse_temperature, top_k, top_p, out, log_probs,
):  # fmt: skip
    """k steps. Before step j each clip's class goes to out[:, j]: drawn from `combined` with
    noise column j when sample (greedy, inverse_temperature and top_p one value per clip), else
    read from there; a drawn class's log-probability in every state row (the clip's own labels,
    and when guided every field unknown) goes to log_probs[:, j] unless log_probs has no columns.
    Every row steps on its clip's class; the next logits are left in logits and combined."""
    clips, n = combined.shape
    tokens = np.empty(logits.shape[0], dtype=np.int64)
    kept = np.empty(n, dtype=np.bool_)
    for j in range(k):
        for c in range(clips):
            if sample:
                out[c, j] = _sample(
                    combined[c],
                    noise[c, j],
                    greedy[c],
                    inverse_temperature[c],
                    top_k,
                    top_p[c],
                    kept,
                )
            tokens[c] = out[c, j]
            if sample and log_probs.shape[1]:
                log_probs[c, j] = _log_softmax_at(logits[c], out[c, j])
                if guided:
                    log_probs[clips + c, j] = _log_softmax_at(logits[clips + c], out[c, j])
            if guided:
                tokens[clips + c] = out[c, j]
        _step(tokens, w, s, positions, net, blocks, tiers, eps, logits)
        _combine(logits, guided, guidance, combined)


# --- the engine's side ----------------------------------------------------------------------------


class _Buffer:
    """float32 arrays laid end to end, each starting on a 64-byte boundary (a cache line, and one
    AVX-512 register), so the compiled loops read aligned vectors."""

    ALIGN = 16  # floats

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.size = 0

    def add(self, array: Tensor | np.ndarray) -> int:
        """Append array (flattened, as float32); returns where it starts."""
        if isinstance(array, Tensor):
            array = array.detach().cpu().numpy()
        array = np.ascontiguousarray(array, dtype=np.float32).ravel()
        start = self.size
        padding = -(start + array.size) % self.ALIGN
        self.parts += [array, np.zeros(padding, np.float32)]
        self.size += array.size + padding
        return start

    def zeros(self, n: int) -> int:
        return self.add(np.zeros(n, np.float32))

    def array(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)


def _transposed(linear: torch.nn.Linear) -> tuple[Tensor, Tensor]:
    """A linear's weight as (in, out), the layout _linear reads, and its bias."""
    return linear.weight.detach().T, linear.bias.detach()


class FusedStep:
    """model.step and the sampling after it as one compiled routine, for `batch` clips on the CPU.

    Built from the model's weights and a state (from initial_state, or prime then for_batch),
    which it copies into its own buffers: the state object is not advanced. As for TorchStep, a
    state of 2 batch rows is a guided one: rows [0, batch) with the clips' labels, [batch, 2 batch)
    with every field unknown, each pair fed its clip's class, and the logits sampled from are
    l_unknown + w (l_given - l_unknown), w = guidance.
    """

    def __init__(self, model: SaShiMi, state: SaShiMiState, batch: int, guidance: float = 1.0):
        cfg = model.config
        rows = state.rows()
        assert rows in (batch, 2 * batch), f"a state of {rows} rows for {batch} clips"
        self.batch, self.guidance, self.guided = batch, guidance, rows != batch
        self.n_classes = cfg.n_classes
        norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert len({m.eps for m in norms}) == 1, "one LayerNorm epsilon throughout"
        self.eps = np.float32(norms[0].eps)
        w, s = _Buffer(), _Buffer()
        stacks = [*model.up_stacks, model.center]
        stack_states = [*(tier.stack for tier in state.tiers), state.center]
        widths = [stack.s4_blocks[0].norm.normalized_shape[0] for stack in stacks]
        blocks, tiers = [], []
        for i, (stack, stack_state, H) in enumerate(zip(stacks, stack_states, widths, strict=True)):
            tier = np.zeros(TIER_COLUMNS, np.int64)
            tier[[WIDTH, FIRST_BLOCK, N_BLOCKS]] = H, len(blocks), len(stack.s4_blocks)
            tier[POOL] = 1
            if i < len(cfg.pool):
                p, tier_state = cfg.pool[i], state.tiers[i]
                tier[POOL] = p
                tier[DOWN_W], tier[DOWN_B] = map(w.add, _transposed(model.down_pools[i].linear))
                tier[UP_W], tier[UP_B] = map(w.add, _transposed(model.up_pools[i].linear))
                pending = np.zeros((rows, p, H), np.float32)
                assert len(tier_state.pending) == tier_state.position % p, "pending != position"
                for phase, x in enumerate(tier_state.pending):
                    pending[:, phase] = x.cpu().numpy()
                tier[PENDING] = s.add(pending)
                tier[UPSAMPLED] = s.add(tier_state.upsampled)
            tier[INPUT], tier[HIDDEN], tier[OUTPUT] = (s.zeros(rows * H) for _ in range(3))
            tiers.append(tier)
            blocks += self._pack_blocks(stack, stack_state, rows, H, w, s)
        net = np.zeros(NET_COLUMNS, np.int64)
        net[EMBEDDING] = w.add(model.embedding.weight)
        net[NORM_W], net[NORM_B] = w.add(model.norm.weight), w.add(model.norm.bias)
        net[HEAD_W], net[HEAD_B] = map(w.add, _transposed(model.head))
        net[N_CLASSES], net[ROWS], net[HALF_N] = cfg.n_classes, rows, cfg.d_state // 2
        net[FF_WIDTH], net[DPLR] = cfg.ff, cfg.kernel == "dplr"
        H_max = max(widths)
        net[Z], net[Y] = s.zeros(rows * H_max), s.zeros(rows * H_max)
        net[GATE], net[FF_HIDDEN] = s.zeros(rows * 2 * H_max), s.zeros(rows * cfg.ff * H_max)
        net[SUMS] = s.zeros(2 * H_max)
        net[LOGIT_INPUT] = s.zeros(rows * widths[0])
        self.w, self.s = w.array(), s.array()
        self.net, self.blocks, self.tiers = net, np.stack(blocks), np.stack(tiers)
        self.positions = np.array([t.position for t in state.tiers], np.int64)
        self.logits = np.zeros((rows, cfg.n_classes), np.float32)
        self.combined = np.zeros((batch, cfg.n_classes), np.float32) if self.guided else self.logits
        self.tokens = np.zeros((batch, cfg.total_pool), np.int64)  # classes drawn or given
        self.no_noise = np.zeros((batch, 1, cfg.n_classes), np.float32)  # for steps on given ones
        self.rows = rows
        self.scores = np.zeros((rows, cfg.total_pool), np.float64)  # log-probabilities drawn
        self.no_scores = np.zeros((rows, 0), np.float64)  # none asked for

    @staticmethod
    def _pack_blocks(
        stack, stack_state: StackState, rows: int, H: int, w: _Buffer, s: _Buffer
    ) -> list[np.ndarray]:
        """One block-table row per [S4, feed-forward] pair of a stack, its arrays appended to w, s."""
        biases = stack_state.label_bias  # c_k of each S4 block; zeros for an unlabelled model
        if biases is None:
            biases = [torch.zeros(rows, H)] * len(stack.s4_blocks)
        half_N = stack_state.x[0].shape[-1]
        table = []
        for s4_block, ff_block, x, c in zip(
            stack.s4_blocks, stack.ff_blocks, stack_state.x, biases, strict=True
        ):
            block = np.zeros(BLOCK_COLUMNS, np.int64)
            block[S4_NORM_W], block[S4_NORM_B] = (
                w.add(s4_block.norm.weight),
                w.add(s4_block.norm.bias),
            )
            ssm = s4_block.layer.step_parameters()

            def planes(z: Tensor) -> tuple[int, int]:
                z = z.detach().expand(H, half_N).T  # (N/2, H): see _ssm_diagonal
                return w.add(z.real), w.add(z.imag)

            if hasattr(ssm, "A_bar"):  # diagonal
                block[A_RE], block[A_IM] = planes(ssm.A_bar)
                block[B_RE], block[B_IM] = planes(ssm.B_bar)
            else:  # DPLR
                block[LAMBDA_RE], block[LAMBDA_IM] = w.add(ssm.Lambda.real), w.add(ssm.Lambda.imag)
                block[P_RE], block[P_IM] = w.add(ssm.P.real), w.add(ssm.P.imag)
                block[HALF_DT] = w.add(ssm.half_dt)
                block[B_RE], block[B_IM] = planes(ssm.dtB)
                block[E_RE], block[E_IM] = planes(ssm.E)
                block[EP_RE], block[EP_IM] = planes(ssm.EP_scaled)
            block[C_RE], block[C_IM] = planes(ssm.C)
            block[D_SKIP] = w.add(ssm.D)
            block[OUT_W], block[OUT_B] = map(w.add, _transposed(s4_block.layer.output_linear))
            block[FF_NORM_W], block[FF_NORM_B] = (
                w.add(ff_block.norm.weight),
                w.add(ff_block.norm.bias),
            )
            block[FF_IN_W], block[FF_IN_B] = map(w.add, _transposed(ff_block.layer.net[0]))
            block[FF_OUT_W], block[FF_OUT_B] = map(w.add, _transposed(ff_block.layer.net[-1]))
            x = x.transpose(1, 2)  # (rows, N/2, H)
            block[X_RE], block[X_IM] = s.add(x.real), s.add(x.imag)
            block[LABEL_BIAS] = s.add(c.expand(rows, H))
            table.append(block)
        return table

    def set_guidance(self, weight: float) -> None:
        self.guidance = weight

    def combine(self, logits: Tensor) -> Tensor:
        """(rows, n_classes) -> (batch, n_classes): the logits to sample from. Keeps the rows'
        logits, which score the first class drawn from them (run's log_probs)."""
        self.logits[:] = logits.detach().cpu().numpy()
        combined = np.empty((self.batch, self.n_classes), np.float32)
        _combine(self.logits, self.guided, self.guidance, combined)
        return torch.from_numpy(combined)

    def __call__(self, token: Tensor) -> Tensor:
        """One step on each clip's class token (batch,): the next logits (batch, n_classes)."""
        self.tokens[:, 0] = token.cpu().numpy()
        unused = np.zeros(self.batch, np.float32)
        self._run(1, False, self.no_noise, np.zeros(self.batch, np.bool_), unused, 0, unused)
        return torch.from_numpy(self.combined.copy())

    def run(
        self,
        k: int,
        logits: Tensor,
        sampler,
        out: Tensor,
        clips: slice | None = None,
        log_probs: Tensor | None = None,
    ) -> Tensor:
        """k samples, as generate._Sampling steps them: draws with sampler's noise columns
        [0, k) (and its temperature, top-k and top-p) into out (batch, k), steps on them; the
        next logits. clips: which of the sampler's clips these are (SplitFusedStep), by default
        all. log_probs (rows, k) float64, if given, gets each drawn class's log-probability in
        every state row: under the clip's own labels, and when guided every field unknown."""
        assert k <= self.tokens.shape[1], f"{k} steps at once; at most one period"
        clips = clips or slice(0, self.batch)
        scores = None if log_probs is None else self.scores
        self.combined[:] = logits.cpu().numpy()
        greedy = np.full(self.batch, sampler.greedy)
        if sampler.greedy_rows is not None:
            greedy = sampler.greedy_rows[clips].cpu().numpy()
        self._run(
            k,
            True,
            sampler.noise[clips].numpy(),
            greedy,
            self._per_clip(sampler.inverse_temperature, clips),
            sampler.top_k,
            self._per_clip(sampler.top_p, clips),
            scores,
        )
        out.copy_(torch.from_numpy(self.tokens[:, :k]))
        if scores is not None:
            log_probs.copy_(torch.from_numpy(scores[:, :k]))
        return torch.from_numpy(self.combined.copy())

    def _per_clip(self, value: float | Tensor, clips: slice) -> np.ndarray:
        """A Sampler setting, one float or a column (clips, 1), as float32 (batch,)."""
        if isinstance(value, Tensor):
            return value[clips].reshape(self.batch).cpu().numpy().astype(np.float32)
        return np.full(self.batch, value, np.float32)

    def _run(
        self, k, sample, noise, greedy, inverse_temperature, top_k, top_p, scores=None
    ) -> None:
        _run(
            k, self.w, self.s, self.positions, self.net, self.blocks, self.tiers, self.eps,
            self.logits, self.combined, self.guided, self.guidance,
            sample, noise, greedy, inverse_temperature, top_k, top_p, self.tokens,
            self.no_scores if scores is None else scores,
        )  # fmt: skip


# From this many clips on, the fused step splits them over two cores when there are two
# (benchmarks/bench_generation.py: one FusedStep against SplitFusedStep, side by side).
SPLIT_MIN_CLIPS = 8


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the system tells it, as Linux does)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def fused_step(
    model: SaShiMi, state: SaShiMiState, batch: int, guidance: float = 1.0
) -> "FusedStep | SplitFusedStep":
    """The fused step for `batch` clips: one FusedStep, or from SPLIT_MIN_CLIPS clips on, where
    the process may run on two cores or more, two groups stepped at once."""
    if batch >= SPLIT_MIN_CLIPS and usable_cores() > 1:
        return SplitFusedStep(model, state, batch, guidance)
    return FusedStep(model, state, batch, guidance)


class SplitFusedStep:
    """FusedStep over the clips split into contiguous groups, each group a FusedStep of its own,
    stepped at once: the compiled routine releases the GIL, so with two cores two groups run in
    parallel (group 0 in the calling thread, the others in a pool). Same interface and the same
    classes as one FusedStep over all the clips. Generator uses it from SPLIT_MIN_CLIPS clips on,
    where it measured faster (benchmarks/bench_generation.py)."""

    def __init__(
        self, model: SaShiMi, state: SaShiMiState, batch: int, guidance: float = 1.0, parts: int = 2
    ):
        self.batch, self.rows = batch, state.rows()
        self.guided = self.rows != batch
        bounds = [batch * i // parts for i in range(parts + 1)]
        self.groups = [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
        self.steps = [
            FusedStep(model, state.select(self._rows(clips)), clips.stop - clips.start, guidance)
            for clips in self.groups
        ]
        self._pool = _thread_pool()

    def _rows(self, clips: slice) -> Tensor:
        """The state rows of these clips: theirs, and when guided their unlabelled twins."""
        rows = torch.arange(clips.start, clips.stop)
        return torch.cat([rows, rows + self.batch]) if self.guided else rows

    def _each(self, work) -> Tensor:
        """work(step, clips) for every group at once, group 0 here; the results concatenated.
        The pool's threads take the caller's inference mode (torch keeps it per thread)."""
        inference = torch.is_inference_mode_enabled()

        def in_callers_mode(step: FusedStep, clips: slice) -> Tensor:
            with torch.inference_mode(inference):
                return work(step, clips)

        pending = [
            self._pool.submit(in_callers_mode, step, clips)
            for step, clips in zip(self.steps[1:], self.groups[1:], strict=True)
        ]
        first = work(self.steps[0], self.groups[0])
        return torch.cat([first, *(future.result() for future in pending)])

    def set_guidance(self, weight: float) -> None:
        for step in self.steps:
            step.set_guidance(weight)

    def combine(self, logits: Tensor) -> Tensor:
        return self._each(lambda step, clips: step.combine(logits[self._rows(clips)]))

    def __call__(self, token: Tensor) -> Tensor:
        return self._each(lambda step, clips: step(token[clips]))

    def run(
        self, k: int, logits: Tensor, sampler, out: Tensor, log_probs: Tensor | None = None
    ) -> Tensor:
        def run_group(step: FusedStep, clips: slice) -> Tensor:
            rows = self._rows(clips)  # not contiguous when guided: scored apart, then put back
            scores = None if log_probs is None else log_probs.new_empty(len(rows), k)
            logits_next = step.run(k, logits[clips], sampler, out[clips], clips, scores)
            if scores is not None:
                log_probs[rows] = scores
            return logits_next

        return self._each(run_group)


@functools.cache
def _thread_pool() -> ThreadPoolExecutor:
    """One pool for the process: split steps come and go with each request."""
    return ThreadPoolExecutor(thread_name_prefix="fused-step")
