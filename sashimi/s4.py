"""S4: structured state space sequence layer (Gu, Goel & Ré 2022; diagonal variant S4D, Gu et al. 2022).

Per channel, the continuous system x'(t) = A x(t) + B u(t), y(t) = C x(t) + D u(t) runs two ways:
  training:   y = K * u + D u, with the kernel K_l = C A_bar^l B_bar in closed form, applied by FFT;
  generation: x_k = A_bar x_{k-1} + B_bar u_k,  y_k = C x_k + D u_k, in constant time per sample.
Both agree to float precision (tests/test_s4.py). H channels, N state size, L length, dt = Δ.

A is stored in one of two forms, chosen once when the layer is built:
  diagonal (S4D):  A = diag(Lambda), kernel by a Vandermonde product;
  dplr (S4):       A = diag(Lambda) - P P^H in the basis where HiPPO-LegS is normal plus low rank,
                   kernel by Cauchy sums and the Woodbury identity (bilinear discretisation).
Real systems have eigenvalues in conjugate pairs; we store the N/2 modes with Im > 0 and add their
conjugates implicitly, so outputs read y = 2 Re(C x) and Cauchy sums run over both halves.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def both_halves(v: Tensor) -> Tensor:
    """The stored N/2 modes and their conjugates: (..., N/2) -> (..., N)."""
    return torch.cat([v, v.conj()], -1)


def sqrt_blocking(L: int) -> tuple[int, int]:
    """(c, m) with c ~ sqrt(L) and m c >= L: a length L split as m blocks of c, so that a power
    A^l = A^(c i) A^j (l = c i + j) needs only ~2 sqrt(L) powers of A."""
    c = math.isqrt(L - 1) + 1 if L > 1 else 1
    return c, -(-L // c)


# --- initialisation: HiPPO-LegS and its normal plus low-rank (NPLR) form -------------------------


def hippo_legs(N: int) -> tuple[Tensor, Tensor]:
    """HiPPO-LegS (Gu et al. 2020), the state matrix that projects history onto Legendre polynomials:

        A_nk = -sqrt((2n+1)(2k+1)) if n > k,   -(n+1) if n = k,   0 if n < k;    B_n = sqrt(2n+1)

    Returns: A (N, N) and B (N,), float64.
    """
    q = torch.sqrt(2 * torch.arange(N, dtype=torch.float64) + 1)
    A = -torch.tril(q[:, None] * q[None, :], diagonal=-1) - torch.diag(torch.arange(1.0, N + 1))
    return A.double(), q


def hippo_legs_nplr(N: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """HiPPO-LegS as normal plus low rank, A = V diag(Lambda) V^H - P P^T, kept to the N/2 modes with Im > 0.

    With P_n = sqrt(n + 1/2), A + P P^T = -I/2 + S with S skew-symmetric, so its eigenvectors V are
    unitary (well conditioned, unlike those of A itself) and Lambda = -1/2 + i omega.

    Returns: Lambda, P_tilde = V^H P, B_tilde = V^H B, each (N/2,) complex128, and V (N, N/2).
    """
    A, B = hippo_legs(N)
    P = torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5)
    S = A + P[:, None] * P[None, :] + 0.5 * torch.eye(N, dtype=torch.float64)  # skew-symmetric
    omega, V = torch.linalg.eigh(-1j * S.to(torch.complex128))  # S = V diag(i omega) V^H
    keep = omega > 0  # one of each conjugate pair
    assert int(keep.sum()) == N // 2, (
        f"expected {N // 2} positive frequencies, got {int(keep.sum())}"
    )
    V = V[:, keep]
    Lambda = -0.5 + 1j * omega[keep]
    return Lambda, V.mH @ P.to(V.dtype), V.mH @ B.to(V.dtype), V


def s4d_lin(N: int) -> tuple[Tensor, Tensor]:
    """S4D-Lin (Gu et al. 2022): Lambda_n = -1/2 + i pi n, B_n = 1; (N/2,) complex128 each."""
    n = torch.arange(N // 2, dtype=torch.float64)
    return -0.5 + 1j * math.pi * n, torch.ones(N // 2, dtype=torch.complex128)


# --- discretisation ------------------------------------------------------------------------------


def discretize_zoh(A: Tensor, B: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-order hold: exact when u is constant over each step.

        A_bar = exp(dt A),   B_bar = (exp(dt A) - 1) / A * B

    Args:    A, B: (H or 1, N/2) complex, A diagonal with Re A < 0;  dt: (H,) step sizes.
    Returns: A_bar, B_bar: (H, N/2) complex.
    """
    A_bar = torch.exp(dt[:, None] * A)
    B_bar = (A_bar - 1) / A * B  # dividing by A is safe: Re A < 0 keeps it away from 0
    return A_bar, B_bar


def discretize_bilinear(A: Tensor, B: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
    """Bilinear (Tustin) transform for diagonal A:

        A_bar = (I - dt/2 A)^-1 (I + dt/2 A),   B_bar = (I - dt/2 A)^-1 dt B

    Args/Returns as discretize_zoh.
    """
    half = dt[:, None] / 2 * A
    A_bar = (1 + half) / (1 - half)
    B_bar = dt[:, None] * B / (1 - half)
    return A_bar, B_bar


DISCRETIZATIONS = {"zoh": discretize_zoh, "bilinear": discretize_bilinear}


def dplr_dense(Lambda: Tensor, P: Tensor) -> Tensor:
    """The full N x N matrix A = diag(Lambda) - P P^H over both conjugate halves: (N, N) complex."""
    Lambda_full, P_full = both_halves(Lambda), both_halves(P)
    return torch.diag_embed(Lambda_full) - P_full[..., :, None] * P_full[..., None, :].conj()


def woodbury_terms(Lambda: Tensor, P: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
    """The two terms of the Woodbury inverse of M = I - (dt/2) A, A = diag(Lambda) - P P^H:

        M^-1 v = E v - E P s (P^H E v),   E = (I - dt/2 Lambda)^-1,   s = (dt/2) / (1 + (dt/2) P^H E P)

    with P^H E P over all N modes (2 Re of the sum over the stored half).
    Args:    Lambda, P: (N/2,) or (1, N/2) complex;  dt: (H,).
    Returns: E (H, N/2) complex, s (H, 1) real.
    """
    half_dt = (dt / 2)[:, None]
    E = 1 / (1 - half_dt * Lambda)
    PEP = 2 * (P.conj() * E * P).sum(-1, keepdim=True).real
    return E, half_dt / (1 + half_dt * PEP)


def discretize_dplr_dense(
    Lambda: Tensor, P: Tensor, B: Tensor, dt: Tensor
) -> tuple[Tensor, Tensor]:
    """Bilinear discretisation of A = diag(Lambda) - P P^H as dense matrices over all N modes.

        A_bar = M^-1 (I + dt/2 A),  B_bar = M^-1 dt B,  M = I - dt/2 A,
        M^-1 = E - s (E P)(P^H E)   (woodbury_terms),

    so it costs O(N^2) per channel, no factorisation. Used where a power of A_bar is needed
    (C_tilde, priming), never in the per-sample step.
    Args:    Lambda, P, B: (N/2,) complex;  dt: (H,).
    Returns: A_bar (H, N, N), B_bar (H, N), complex.
    """
    E_half, scale = woodbury_terms(Lambda, P, dt)
    E, scale = both_halves(E_half), scale[..., None].to(E_half.dtype)  # (H, N), (H, 1, 1)
    Lambda, P, B = both_halves(Lambda), both_halves(P), both_halves(B)  # (N,)
    half = (dt / 2)[:, None].to(Lambda.dtype)  # (H, 1)
    EP = E * P
    M_inv = torch.diag_embed(E) - scale * EP[..., :, None] * (P.conj() * E)[..., None, :]
    M_inv_P = (M_inv @ P[:, None])[..., 0]  # (H, N)
    A_bar = (
        M_inv * (1 + half * Lambda)[..., None, :]
        - half[..., None] * M_inv_P[..., :, None] * P.conj()
    )
    B_bar = (M_inv @ (2 * half * B)[..., None])[..., 0]
    return A_bar, B_bar


def row_times_power(v: Tensor, A: Tensor, n: int) -> Tensor:
    """v A^n for row vectors v (H, N) and matrices A (H, N, N), by baby step / giant step:
    A^c once (c ~ sqrt(n), by squaring), then ~ sqrt(n) vector-matrix products, which costs
    a fraction of the log2(n) dense squarings of a full matrix power."""
    c = max(math.isqrt(n), 1)
    A_c = torch.linalg.matrix_power(A, c)
    v = v[:, None, :]
    for _ in range(n // c):
        v = v @ A_c
    for _ in range(n % c):
        v = v @ A
    return v[:, 0]


# --- convolution mode ----------------------------------------------------------------------------


def _vandermonde_blocks(log_A_bar: Tensor, L: int) -> tuple[Tensor, Tensor, int]:
    """A_bar^l for l < L split as A_bar^(c i) * A_bar^j (l = c i + j, c ~ sqrt(L)).

    Two Vandermonde blocks of (H, N/2, L/c) and (H, N/2, c) replace one of (H, N/2, L): at L = 16,000,
    H = 64, N/2 = 32 that is 0.5 M complex numbers kept for backward instead of 33 M.
    Returns: outer (H, N/2, m) = A_bar^(c i), inner (H, N/2, c) = A_bar^j, and c; m c >= L.
    """
    c, m = sqrt_blocking(L)
    steps = torch.arange(max(c, m), device=log_A_bar.device, dtype=log_A_bar.real.dtype)
    inner = torch.exp(log_A_bar[..., None] * steps[:c])
    outer = torch.exp(log_A_bar[..., None] * (c * steps[:m]))
    return outer, inner, c


def kernel_diagonal(C: Tensor, A_bar: Tensor, B_bar: Tensor, L: int) -> Tensor:
    """S4D kernel by a Vandermonde product:  K_l = 2 Re sum_n C_n B_bar_n A_bar_n^l,  l < L.

    (The factor 2 adds the conjugate modes we do not store.)
    Args:    C, A_bar, B_bar: (H, N/2) complex.
    Returns: K (H, L) real.
    """
    outer, inner, c = _vandermonde_blocks(torch.log(A_bar), L)
    outer = outer * (C * B_bar)[..., None]  # (H, N/2, m)
    K = outer.transpose(-1, -2) @ inner  # (H, m, c): K[h, i, j] = K_{c i + j}
    return 2 * K.flatten(-2)[..., :L].real


def cauchy_woodbury(
    Lambda: Tensor, P: Tensor, B: Tensor, C_tilde: Tensor, dt: Tensor, z: Tensor
) -> Tensor:
    """Transfer function of the bilinear-discretised DPLR system at points z on the unit circle:

        K_hat(z) = C_tilde (I - A_bar z)^-1 B_bar = 2 C_tilde [(2/dt)(1 - z) I - (1 + z) A]^-1 B

    With A = Lambda - P P^H the inverse is diagonal plus rank one, so by the Woodbury identity

        K_hat(z) = 2 [k00 - (1 + z) k01 k10 / (1 + (1 + z) k11)],   k_ab = sum_n a_n b_n / d_n(z),
        d_n(z) = (2/dt)(1 - z) - (1 + z) Lambda_n,   (a, b) in {C_tilde, P^H} x {B, P}.

    These Cauchy sums run over all N modes (stored half and conjugates). Written with (1 + z) multiplied
    through, z = -1 (the Nyquist frequency) needs no special case.
    Args:    Lambda, P, B: (N/2,);  C_tilde: (H, N/2);  dt: (H,);  z: (F,) complex.
    Returns: K_hat (H, F) complex.
    """
    Lambda, P, B, C_tilde = map(both_halves, (Lambda, P, B, C_tilde))  # (…, N)
    numerators = torch.stack(  # (H, 4, N): rows k00, k01, k10, k11
        torch.broadcast_tensors(C_tilde * B, C_tilde * P, P.conj() * B, P.conj() * P), dim=-2
    )
    d = (2 / dt[:, None, None]) * (1 - z)[None, None, :] - (1 + z)[None, None, :] * Lambda[
        ..., :, None
    ]
    k00, k01, k10, k11 = (numerators @ (1 / d)).unbind(-2)  # Cauchy sums: (H, 4, N) @ (H, N, F)
    return 2 * (k00 - (1 + z) * k01 * k10 / (1 + (1 + z) * k11))


def kernel_dplr(Lambda: Tensor, P: Tensor, B: Tensor, C: Tensor, dt: Tensor, L: int) -> Tensor:
    """S4 kernel K_l = C A_bar^l B_bar, l < L, from the transfer function at the L-th roots of unity.

    The truncated generating function sum_{l<L} K_l z^l equals C_tilde (I - A_bar z)^-1 B_bar at
    z^L = 1 when C_tilde = C (I - A_bar^L): C_tilde is derived here from the trained C on every call
    and never stored. K_hat at z_k = exp(-2 pi i k / L) is the DFT of K, so K = irfft(K_hat).
    Args:    Lambda, P, B: (N/2,) complex;  C: (H, N/2) complex;  dt: (H,).
    Returns: K (H, L) real.
    """
    C_tilde = checkpoint(_c_tilde, Lambda, P, B, C, dt, L, use_reentrant=False)
    k = torch.arange(L // 2 + 1, device=dt.device, dtype=dt.dtype)
    z = torch.polar(torch.ones_like(k), -2 * math.pi * k / L)
    K_hat = checkpoint(cauchy_woodbury, Lambda, P, B, C_tilde, dt, z, use_reentrant=False)
    return torch.fft.irfft(K_hat, n=L)


def _c_tilde(Lambda: Tensor, P: Tensor, B: Tensor, C: Tensor, dt: Tensor, L: int) -> Tensor:
    """C_tilde = C (I - A_bar^L), first N/2 entries. In float64: A_bar is far from normal, and
    float32 powers of it lose digits that the kernel then misses."""
    A_bar, _ = discretize_dplr_dense(Lambda.cdouble(), P.cdouble(), B.cdouble(), dt.double())
    C_full = both_halves(C).cdouble()  # (H, N)
    C_tilde = C_full - row_times_power(C_full, A_bar, L)
    return C_tilde[:, : C.shape[-1]].to(C.dtype)


def causal_conv(u: Tensor, K: Tensor) -> Tensor:
    """y_t = sum_{l <= t} K_l u_{t-l} by FFT at length 2L, so the circular convolution does not wrap.

    Args: u (batch, H, L), K (H, L).  Returns: y (batch, H, L).
    """
    L = u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L), n=2 * L)
    return y[..., :L]


# --- final state after a sequence (priming the recurrence from a parallel pass) -------------------


def final_state_diagonal(A_bar: Tensor, B_bar: Tensor, u: Tensor) -> Tensor:
    """x_L = sum_{l<L} A_bar^(L-1-l) B_bar u_l, the state after reading u, without a sequential loop.

    Args: A_bar, B_bar (H, N/2) complex; u (batch, H, L) real.  Returns: x (batch, H, N/2) complex.
    """
    L = u.shape[-1]
    outer, inner, c = _vandermonde_blocks(torch.log(A_bar), L)
    m = outer.shape[-1]
    u_reversed = F.pad(u.flip(-1), (0, m * c - L)).view(*u.shape[:-1], m, c)  # r = L-1-l = c i + j
    partial = torch.einsum("bhij,hnj->bhin", u_reversed.to(inner.dtype), inner)
    return torch.einsum("hni,bhin->bhn", outer, partial) * B_bar


def final_state_dense(A_bar: Tensor, B_bar: Tensor, u: Tensor) -> Tensor:
    """As final_state_diagonal for a dense A_bar (H, N, N), B_bar (H, N): chunks of c ~ sqrt(L) inputs
    are folded in parallel, then the chunks are chained by Horner's rule, x <- A_bar^c x + chunk.

    Returns: x (batch, H, N).
    """
    batch, H, L = u.shape
    c, m = sqrt_blocking(L)
    powers = [B_bar]  # A_bar^j B_bar for j < c
    for _ in range(c - 1):
        powers.append((A_bar @ powers[-1][..., None])[..., 0])
    G = torch.stack(powers[::-1], -2)  # (H, c, N): row j holds A_bar^(c-1-j) B_bar
    u_chunks = (
        F.pad(u, (m * c - L, 0)).view(batch, H, m, c).to(G.dtype)
    )  # zeros first: state stays 0
    chunk_states = torch.einsum("bhij,hjn->bhin", u_chunks, G)
    A_bar_c = torch.linalg.matrix_power(A_bar, c)
    x = torch.zeros(batch, H, A_bar.shape[-1], dtype=G.dtype, device=G.device)
    for i in range(m):
        x = (A_bar_c @ x[..., None])[..., 0] + chunk_states[:, :, i]
    return x


# --- recurrent mode ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiagonalStep:
    """Discrete parameters of a diagonal SSM for the recurrence, computed once per generation."""

    A_bar: Tensor  # (H, N/2) complex
    B_bar: Tensor  # (H, N/2) complex
    C: Tensor  # (H, N/2) complex
    D: Tensor  # (H,)

    def __call__(self, u: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """x_k = A_bar x_{k-1} + B_bar u_k,  y_k = 2 Re(C x_k) + D u_k.   u (batch, H), x (batch, H, N/2)."""
        x = self.A_bar * x + self.B_bar * u[..., None]
        y = 2 * torch.einsum("bhn,hn->bh", x, self.C).real + self.D * u
        return y, x


@dataclass(frozen=True)
class DPLRStep:
    """Exact bilinear step of A = diag(Lambda) - P P^H in O(N): no dense matrix, no eigendecomposition.

        x_k = (I - dt/2 A)^-1 [(I + dt/2 A) x_{k-1} + dt B u_k]

    The inverse by Woodbury: with E = (I - dt/2 Lambda)^-1 (diagonal),
        (I - dt/2 A)^-1 v = E v - E P  (dt/2) (P^H E v) / (1 + (dt/2) P^H E P).
    The state holds the N/2 stored modes; the conjugates are implicit, so every inner product over
    all N modes is 2 Re of the sum over the stored half.
    """

    Lambda: Tensor  # (1, N/2) complex
    P: Tensor  # (1, N/2) complex
    dtB: Tensor  # (H, N/2) complex: dt B
    half_dt: Tensor  # (H, 1): dt / 2
    E: Tensor  # (H, N/2) complex: (1 - dt/2 Lambda)^-1
    EP_scaled: Tensor  # (H, N/2) complex: E P (dt/2) / (1 + (dt/2) P^H E P)
    C: Tensor  # (H, N/2) complex
    D: Tensor  # (H,)

    def __call__(self, u: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        P_conj = self.P.conj()
        Px = 2 * (x * P_conj).sum(-1, keepdim=True).real  # P^H x over all N modes
        v = x + self.half_dt * (self.Lambda * x - self.P * Px) + self.dtB * u[..., None]
        Ev = self.E * v
        x = Ev - self.EP_scaled * (2 * (Ev * P_conj).sum(-1, keepdim=True).real)
        y = 2 * torch.einsum("bhn,hn->bh", x, self.C).real + self.D * u
        return y, x


# --- the layer -----------------------------------------------------------------------------------


def _complex_parameter(z: Tensor) -> nn.Parameter:
    """Complex values stored as a real (..., 2) parameter: safetensors and every optimiser handle it."""
    return nn.Parameter(torch.view_as_real(z.to(torch.complex64)).clone())


class DiagonalForm:
    """A = diag(Lambda) (S4D): the kernel, step parameters and final state of the layer's
    parameters, by the pure functions above, discretised by `discretize` (ZOH or bilinear)."""

    def __init__(self, discretize):
        self.discretize = discretize

    def discrete(self, layer: "S4") -> tuple[Tensor, Tensor]:
        return self.discretize(layer.Lambda(), layer.B_complex(), layer.dt())

    def kernel(self, layer: "S4", L: int) -> Tensor:
        return kernel_diagonal(layer.C_complex(), *self.discrete(layer), L)

    def step_parameters(self, layer: "S4") -> DiagonalStep:
        return DiagonalStep(*self.discrete(layer), layer.C_complex(), layer.D)

    def final_state(self, layer: "S4", u: Tensor) -> Tensor:
        return final_state_diagonal(*self.discrete(layer), u)


class DPLRForm:
    """A = diag(Lambda) - P P^H (S4), bilinear: Cauchy + Woodbury kernel, O(N) Woodbury step, and a
    dense float64 final state (priming is rare; its powers of A_bar need the precision)."""

    def kernel(self, layer: "S4", L: int) -> Tensor:
        Lambda, P, B = layer.Lambda()[0], layer.P_complex()[0], layer.B_complex()[0]
        return kernel_dplr(Lambda, P, B, layer.C_complex(), layer.dt(), L)

    def step_parameters(self, layer: "S4") -> DPLRStep:
        dt, Lambda, P = layer.dt(), layer.Lambda(), layer.P_complex()
        E, s = woodbury_terms(Lambda, P, dt)
        half_dt = (dt / 2)[:, None]
        dtB = dt[:, None] * layer.B_complex()
        return DPLRStep(Lambda, P, dtB, half_dt, E, E * P * s, layer.C_complex(), layer.D)

    def final_state(self, layer: "S4", u: Tensor) -> Tensor:
        A_bar, B_bar = discretize_dplr_dense(
            layer.Lambda()[0].cdouble(),
            layer.P_complex()[0].cdouble(),
            layer.B_complex()[0].cdouble(),
            layer.dt().double(),
        )
        N_half = layer.N // 2
        return final_state_dense(A_bar, B_bar, u.double())[..., :N_half].to(torch.complex64)


class S4(nn.Module):
    """One S4 layer: the SSM per channel, the D skip, GELU, dropout, and a GLU output projection.

    One (A, B) is shared by the H channels (as in the reference SaShiMi); C, dt and D are per channel.
    The form of A (DiagonalForm or DPLRForm) is chosen once, here. u (batch, L, H) -> y (batch, L, H).
    """

    def __init__(
        self,
        H: int,
        N: int = 64,
        kernel: str = "diagonal",
        init: str = "legs",
        disc: str = "zoh",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.H, self.N = H, N
        # dt log-uniform in [dt_min, dt_max]; stored as log_dt so that dt = exp(log_dt) stays positive.
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        if kernel == "dplr":
            Lambda, P, B, _ = hippo_legs_nplr(N)
            self.P = _complex_parameter(P[None])
            self.form = DPLRForm()
        elif init == "legs":  # S4D-LegS: the diagonal of the normal part of HiPPO-LegS
            Lambda, _, B, _ = hippo_legs_nplr(N)
        else:
            Lambda, B = s4d_lin(N)
        if kernel != "dplr":
            self.form = DiagonalForm(DISCRETIZATIONS[disc])
        # Re Lambda = -exp(log_neg_Lambda_real) < 0: the continuous system stays stable, so A_bar^l
        # decays and the recurrence cannot blow up over long generations.
        self.log_neg_Lambda_real = nn.Parameter(torch.log(-Lambda.real).float()[None])
        self.Lambda_imag = nn.Parameter(Lambda.imag.float()[None])
        self.B = _complex_parameter(B[None])
        self.C = _complex_parameter(torch.randn(H, N // 2, dtype=torch.complex64) * 0.5**0.5)
        self.D = nn.Parameter(torch.randn(H))
        self.dropout = nn.Dropout(dropout)
        self.output_linear = nn.Linear(H, 2 * H)

    def ssm_parameters(self) -> list[nn.Parameter]:
        """The state-space parameters that S4 trains with a smaller lr and no weight decay."""
        names = ("log_dt", "log_neg_Lambda_real", "Lambda_imag", "B", "P")
        return [p for name, p in self.named_parameters() if name in names]

    # the parameters as the paper writes them
    def dt(self) -> Tensor:
        return torch.exp(self.log_dt)  # (H,)

    def Lambda(self) -> Tensor:
        return torch.complex(-torch.exp(self.log_neg_Lambda_real), self.Lambda_imag)  # (1, N/2)

    def B_complex(self) -> Tensor:
        return torch.view_as_complex(self.B)  # (1, N/2)

    def C_complex(self) -> Tensor:
        return torch.view_as_complex(self.C)  # (H, N/2)

    def P_complex(self) -> Tensor:
        return torch.view_as_complex(self.P)  # (1, N/2), DPLR only

    def kernel(self, L: int) -> Tensor:
        """The SSM convolution kernel K (H, L) for the current parameters."""
        return self.form.kernel(self, L)

    def _ssm_to_output(self, y: Tensor) -> Tensor:
        """GELU, dropout, then a pointwise linear H -> 2H gated back to H by a GLU."""
        return F.glu(self.output_linear(self.dropout(F.gelu(y))), dim=-1)

    def forward(self, u: Tensor) -> Tensor:
        u_t = u.transpose(1, 2)  # (batch, H, L): the FFT wants L last
        y = causal_conv(u_t, self.kernel(u.shape[1])).transpose(1, 2)
        return self._ssm_to_output(y + self.D * u)

    def step_parameters(self) -> DiagonalStep | DPLRStep:
        """Discrete parameters for the recurrence, derived from the current weights (not cached here)."""
        return self.form.step_parameters(self)

    def initial_state(self, batch: int) -> Tensor:
        """x = 0: (batch, H, N/2) complex, on the layer's device."""
        return torch.zeros(batch, self.H, self.N // 2, dtype=torch.complex64, device=self.D.device)

    def step(self, u: Tensor, x: Tensor, params: DiagonalStep | DPLRStep) -> tuple[Tensor, Tensor]:
        """One sample: u (batch, H), x (batch, H, N/2) -> y (batch, H), new x."""
        y, x = params(u, x)
        return self._ssm_to_output(y), x

    def final_state(self, u: Tensor) -> Tensor:
        """The state after reading u (batch, L, H), as stepping through it would leave it."""
        return self.form.final_state(self, u.transpose(1, 2))  # (batch, H, L)
