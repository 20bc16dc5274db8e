"""S4 against outside oracles: the closed form of HiPPO-LegS and scipy.signal's discretisation and
simulation. The pure functions run here in float64, so the comparisons test the math, not round-off;
the float32 layer is checked convolution-against-recurrence in test_model.py."""

import math

import numpy as np
import pytest
import torch
from scipy import signal

from sashimi.s4 import (
    S4,
    DiagonalStep,
    causal_conv,
    discretize_bilinear,
    discretize_dplr_dense,
    discretize_zoh,
    dplr_dense,
    final_state_dense,
    final_state_diagonal,
    hippo_legs,
    hippo_legs_nplr,
    kernel_diagonal,
    kernel_dplr,
    s4d_lin,
)

N = 16  # state size for one-channel checks
DT = 0.02


def test_hippo_legs_matches_closed_form():
    A, B = hippo_legs(N)
    for n in range(N):
        assert B[n] == pytest.approx(math.sqrt(2 * n + 1))
        for k in range(N):
            expected = (
                -math.sqrt((2 * n + 1) * (2 * k + 1)) if n > k else -(n + 1) if n == k else 0.0
            )
            assert A[n, k].item() == pytest.approx(expected, abs=1e-12)


def test_nplr_form_reconstructs_hippo_legs():
    A, B = hippo_legs(N)
    Lambda, P_tilde, B_tilde, V = hippo_legs_nplr(N)
    assert torch.all(Lambda.real == -0.5)
    # Both halves: W = [V, conj V] is unitary and W^H A W = diag(Lambda, conj Lambda) - P~ P~^H.
    W = torch.cat([V, V.conj()], dim=1)
    assert torch.allclose(W.mH @ W, torch.eye(N, dtype=W.dtype), atol=1e-10)
    A_rebuilt = W @ dplr_dense(Lambda, P_tilde) @ W.mH
    assert (A_rebuilt.imag.abs().max()) < 1e-10
    assert torch.allclose(A_rebuilt.real, A, atol=1e-5)
    assert torch.allclose((W @ torch.cat([B_tilde, B_tilde.conj()])).real, B, atol=1e-10)


def diagonal_system(init: str):
    """One channel of a diagonal SSM: Lambda, B, C as (1, N/2) complex128, D a float."""
    if init == "legs":
        Lambda, _, B, _ = hippo_legs_nplr(N)
    else:
        Lambda, B = s4d_lin(N)
    generator = torch.Generator().manual_seed(0)
    C = torch.randn(N // 2, dtype=torch.complex128, generator=generator)
    return Lambda[None], B[None], C[None], 0.7


def to_real_coordinates(*mats):
    """Full complex system over conjugate pairs -> real coordinates (Re z, Im z) of the stored half.

    The full state is x = [z, conj z] = T^-1 r with r = [Re z, Im z]; so A_r = T A T^-1, B_r = T B,
    C_r = C T^-1. Everything must come out real (imaginary part ~ 0).
    """
    half = mats[0].shape[-1] // 2
    eye = np.eye(half)
    T_inv = np.block([[eye, 1j * eye], [eye, -1j * eye]])
    T = np.linalg.inv(T_inv)
    A, B, C = mats
    out = T @ A @ T_inv, T @ B, C @ T_inv
    for m in out:
        assert np.abs(m.imag).max() < 1e-9
    return tuple(m.real for m in out)


def full(v: torch.Tensor) -> np.ndarray:
    """(1, N/2) stored modes -> (N,) with the conjugates appended."""
    return torch.cat([v[0], v[0].conj()]).numpy()


@pytest.mark.parametrize("init", ["legs", "lin"])
@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_diagonal_discretisation_matches_scipy_cont2discrete(init, method):
    Lambda, B, C, D = diagonal_system(init)
    ours = {"zoh": discretize_zoh, "bilinear": discretize_bilinear}[method]
    A_bar, B_bar = ours(Lambda, B, torch.tensor([DT], dtype=torch.float64))
    A_r, B_r, C_r = to_real_coordinates(np.diag(full(Lambda)), full(B)[:, None], full(C)[None, :])
    Ad, Bd, Cd, Dd, _ = signal.cont2discrete((A_r, B_r, C_r, [[D]]), DT, method=method)
    A_bar_r, B_bar_r, _ = to_real_coordinates(
        np.diag(full(A_bar)), full(B_bar)[:, None], full(C)[None, :]
    )
    np.testing.assert_allclose(A_bar_r, Ad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(B_bar_r, Bd, rtol=1e-10, atol=1e-12)
    if method == "zoh":  # zoh leaves C and D alone; scipy's bilinear also reshapes C, D (below)
        np.testing.assert_allclose(Cd, C_r, rtol=1e-12)
        np.testing.assert_allclose(Dd, [[D]], rtol=1e-12)


def dplr_system():
    Lambda, P, B, _ = hippo_legs_nplr(N)
    C = torch.randn(1, N // 2, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    return Lambda, P, B, C, 0.7


def test_dplr_discretisation_matches_scipy_cont2discrete():
    Lambda, P, B, C, D = dplr_system()
    dt = torch.tensor([DT], dtype=torch.float64)
    A_bar, B_bar = discretize_dplr_dense(Lambda, P, B, dt)
    A_r, B_r, C_r = to_real_coordinates(
        dplr_dense(Lambda, P).numpy(), full(B[None])[:, None], full(C)[None]
    )
    Ad, Bd, _, _, _ = signal.cont2discrete((A_r, B_r, C_r, [[D]]), DT, method="bilinear")
    A_bar_r, B_bar_r, _ = to_real_coordinates(
        A_bar[0].numpy(), B_bar[0].numpy()[:, None], full(C)[None]
    )
    np.testing.assert_allclose(A_bar_r, Ad, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(B_bar_r, Bd, rtol=1e-9, atol=1e-11)


def scipy_reference_output(A_r, B_r, C_r, D, method, u):
    """Discretise and simulate with scipy alone. S4 reads y_k = C x_k + D u_k after the update
    x_k = A_bar x_{k-1} + B_bar u_k; scipy's dlsim reads y before it, so we hand dlsim the output
    matrices C A_bar and C B_bar + D built from scipy's own A_bar, B_bar."""
    Ad, Bd, _, _, _ = signal.cont2discrete((A_r, B_r, C_r, [[D]]), DT, method=method)
    _, y, _ = signal.dlsim((Ad, Bd, C_r @ Ad, C_r @ Bd + D, DT), u)
    return y[:, 0]


def assert_both_modes_match(y_scipy, y_conv, params, u):
    """The kernel convolution and the recurrence generation runs (one channel, from x = 0, with
    these step parameters) both give scipy's output, to 1e-5 of its scale."""
    x, ys = torch.zeros(1, 1, N // 2, dtype=torch.complex128), []
    for u_k in u:
        y, x = params(torch.tensor([[u_k]], dtype=torch.float64), x)
        ys.append(y.item())
    scale = np.abs(y_scipy).max()
    np.testing.assert_allclose(y_conv, y_scipy, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(np.array(ys), y_scipy, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("init", ["legs", "lin"])
@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_diagonal_kernel_and_recurrence_match_scipy_dlsim(init, method):
    Lambda, B, C, D = diagonal_system(init)
    L = 400
    u = np.random.default_rng(0).standard_normal(L)
    A_r, B_r, C_r = to_real_coordinates(np.diag(full(Lambda)), full(B)[:, None], full(C)[None, :])
    y_scipy = scipy_reference_output(A_r, B_r, C_r, D, method, u)

    ours = {"zoh": discretize_zoh, "bilinear": discretize_bilinear}[method]
    A_bar, B_bar = ours(Lambda, B, torch.tensor([DT], dtype=torch.float64))
    u_t = torch.from_numpy(u)[None, None]  # (batch, H, L)
    y_conv = causal_conv(u_t, kernel_diagonal(C, A_bar, B_bar, L))[0, 0].numpy() + D * u

    params = DiagonalStep(A_bar, B_bar, C, torch.tensor([D], dtype=torch.float64))
    assert_both_modes_match(y_scipy, y_conv, params, u)


def test_dplr_kernel_and_recurrence_match_scipy_dlsim():
    Lambda, P, B, C, D = dplr_system()
    L = 400
    u = np.random.default_rng(0).standard_normal(L)
    A_r, B_r, C_r = to_real_coordinates(
        dplr_dense(Lambda, P).numpy(), full(B[None])[:, None], full(C)[None]
    )
    y_scipy = scipy_reference_output(A_r, B_r, C_r, D, "bilinear", u)

    dt = torch.tensor([DT], dtype=torch.float64)
    u_t = torch.from_numpy(u)[None, None]
    y_conv = causal_conv(u_t, kernel_dplr(Lambda, P, B, C, dt, L))[0, 0].numpy() + D * u

    layer = S4(1, N, kernel="dplr", disc="bilinear").double()
    with torch.no_grad():  # the layer's O(N) Woodbury step, given this system's parameters
        layer.log_dt.fill_(math.log(DT))
        layer.log_neg_Lambda_real.copy_(torch.log(-Lambda.real)[None])
        layer.Lambda_imag.copy_(Lambda.imag[None])
        layer.P.copy_(torch.view_as_real(P[None]))
        layer.B.copy_(torch.view_as_real(B[None]))
        layer.C.copy_(torch.view_as_real(C))
        layer.D.fill_(D)
    assert_both_modes_match(y_scipy, y_conv, layer.step_parameters(), u)


def test_final_state_matches_stepping():
    """The parallel final state (priming) equals the state a sequential loop reaches, both forms."""
    Lambda, B, _, _ = diagonal_system("legs")
    A_bar, B_bar = discretize_zoh(
        Lambda.expand(3, -1), B, torch.tensor([0.01, 0.03, 0.1], dtype=torch.float64)
    )
    u = torch.randn(2, 3, 77, dtype=torch.float64)
    x = torch.zeros(2, 3, N // 2, dtype=torch.complex128)
    for k in range(u.shape[-1]):
        x = A_bar * x + B_bar * u[..., k, None]
    assert torch.allclose(final_state_diagonal(A_bar, B_bar, u), x, atol=1e-10)

    A_dense = torch.diag_embed(torch.cat([A_bar, A_bar.conj()], -1))
    B_dense = torch.cat([B_bar, B_bar.conj()], -1)
    assert torch.allclose(final_state_dense(A_dense, B_dense, u)[..., : N // 2], x, atol=1e-10)


def test_kernel_keeps_no_length_sized_intermediate_for_backward():
    """The diagonal kernel's autograd graph holds O(N sqrt L) numbers per channel, not O(N L)."""
    layer = S4(4, 64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel()) or t, lambda t: t
    ):
        layer.kernel(16_384)
    assert max(saved) <= 4 * 16_384  # the (H, L) kernel itself; (H, N/2, L) would be 32x more
