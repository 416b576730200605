"""Selective scan (the SSM inside Mamba) in plain PyTorch, plus dispatch to the fused CUDA kernel.

MambaMIL needs ``mamba_ssm``'s fused kernel, which only exists on CUDA; its CPU
fallback is broken (METHODS.md A, "MIL heads"). This module gives the same
operation, with the shapes and meaning of ``mamba_ssm``'s ``selective_scan_fn``::

    u, delta: B×Dm×L   A: Dm×N   B, C: B×N×L   D: Dm   z: B×Dm×L   delta_bias: Dm
    delta ← softplus(delta + delta_bias)              (if delta_softplus)
    h_t   = exp(delta_t·A) ⊙ h_{t-1} + delta_t·u_t·B_t   (h: B×Dm×N, h_0 = 0)
    y_t   = C_t·h_t + D·u_t,   then  y ← y·silu(z)

Three implementations:

- :func:`selective_scan_ref` — the definition, one autograd step per position.
  Slow and memory-hungry; it exists to test the others against.
- :func:`selective_scan_chunked` — the CPU default. Works chunk by chunk
  (``chunk`` positions): the discretisation (exp(delta·A), delta·u·B) and the
  read-out (C·h) are vectorised over the chunk, the recurrence itself is one
  fused ``addcmul`` per position on a Dm×N state that stays in cache, and the
  state is carried across chunks. Its backward is written by hand and
  recomputes each chunk from the saved chunk-start states, so memory is
  O(B·Dm·L + chunk·B·Dm·N) instead of O(B·Dm·L·N) — what lets a 50,000-instance
  slide run on a CPU. Why not the "parallel" formulation (cumulative sums of
  log-decays and exp(±cumsum) inside a chunk)? On this CPU it was not faster
  (it trades a few µs of per-position overhead for ~10 passes over chunk×Dm×N
  tensors), and exp(−cumsum) overflows float32 as soon as delta·|A| summed over
  a chunk exceeds ~88, which trained Mamba layers reach.
- the fused CUDA kernel, used by :func:`selective_scan` only when
  ``mamba_ssm`` is importable *and* the tensors are on CUDA.

Log-decays delta·A below ``log(tiny)/2`` of the dtype are clamped before exp: the
decay is then ≤ 1e-19 (float32), far below rounding, and the clamp keeps the
state out of subnormal numbers, which are ~25× slower on x86.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

Impl = Literal["auto", "chunked", "ref", "fused"]
DEFAULT_CHUNK = 64
ScanResult = Union[Tensor, tuple[Tensor, Tensor]]


def _finish(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor], dim_last: bool = False) -> Tensor:
    """The skip connection D·u and the SiLU gate, shared by both PyTorch paths (Dm is dim 1, or last)."""
    if D is not None:
        y = y + u * (D.to(y.dtype) if dim_last else D.to(y.dtype)[:, None])
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _prepare_delta(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(f"selective scan: u and delta must both be B×Dm×L, "
                         f"got {tuple(u.shape)} and {tuple(delta.shape)}")
    b, dm, length = u.shape
    if A.ndim != 2 or A.shape[0] != dm:
        raise ValueError(f"selective scan: A must be Dm×N with Dm={dm}, got {tuple(A.shape)}")
    for name, m in (("B", B), ("C", C)):
        if tuple(m.shape) != (b, A.shape[1], length):
            raise ValueError(f"selective scan: {name} must be B×N×L = {(b, A.shape[1], length)}, got {tuple(m.shape)}"
                             " (constant or grouped B/C are not supported)")
    if A.is_complex():
        raise ValueError("selective scan: complex A is not supported")


def selective_scan_ref(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = True,
    return_last_state: bool = False,
) -> ScanResult:
    """The selective scan by its definition: a Python loop over positions, autograd throughout.

    Note ``delta_softplus`` defaults to True here (Mamba always passes True);
    ``mamba_ssm.selective_scan_fn`` defaults to False.
    """
    _check_shapes(u, delta, A, B, C)
    dtype_in = u.dtype
    work = torch.float32 if dtype_in in (torch.float16, torch.bfloat16) else dtype_in
    u, delta, A, B, C = (t.to(work) for t in (u, delta, A, B, C))
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    drive = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    # unbind, not decay[:, :, i]: the backward of L slicings would each allocate a full-size gradient.
    for a_t, b_t, c_t in zip(decay.unbind(2), drive.unbind(2), C.unbind(2)):
        h = a_t * h + b_t
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))
    y = _finish(torch.stack(ys, dim=2), u, D, z).to(dtype_in)
    return (y, h) if return_last_state else y


def _no_autocast(device_type: str):  # noqa: ANN202
    """Autocast off for the scan state; devices without autocast (meta: shape-only runs) need no context."""
    import contextlib

    if device_type in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _log_decay_floor(dtype: torch.dtype) -> float:
    return math.log(torch.finfo(dtype).tiny) / 2  # ≈ −43.7 (float32), −354 (float64)


class _ChunkedScan(torch.autograd.Function):
    """y_t = C_t·h_t, h_t = exp(Δ_t A)·h_{t−1} + Δ_t u_t B_t, on contiguous B×L×Dm / B×L×N inputs.

    Inside a chunk the layout is B×T×Dm×N: the state of one position is one
    block and each recurrence step is one in-place ``addcmul``. The chunk
    buffers are allocated once per call and reused: fresh multi-MB tensors per
    chunk cost more in page faults than the arithmetic.
    """

    @staticmethod
    def _states(dt: Tensor, du: Tensor, Bt: Tensor, A: Tensor, h0: Tensor, decay: Tensor, states: Tensor) -> None:
        """Fill ``decay`` with exp(Δ⊗A) and ``states`` with h_1..h_T of the chunk that starts from h0."""
        torch.mul(dt.unsqueeze(-1), A, out=decay)
        decay.clamp_(min=_log_decay_floor(decay.dtype)).exp_()
        torch.mul(du.unsqueeze(-1), Bt.unsqueeze(2), out=states)
        states[:, 0].addcmul_(decay[:, 0], h0)
        for i in range(1, states.shape[1]):
            states[:, i].addcmul_(decay[:, i], states[:, i - 1])

    @staticmethod
    def forward(
        ctx: Any, dt: Tensor, ut: Tensor, A: Tensor, Bt: Tensor, Ct: Tensor, chunk: int,
    ) -> tuple[Tensor, Tensor]:
        with _no_autocast(ut.device.type):  # the state must not drop to half precision
            return _ChunkedScan._forward(ctx, dt, ut, A, Bt, Ct, chunk)

    @staticmethod
    def _forward(ctx: Any, dt: Tensor, ut: Tensor, A: Tensor, Bt: Tensor, Ct: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
        b, length, dm = ut.shape
        chunk = min(chunk, length)
        n_chunks = -(-length // chunk)
        du = dt * ut
        h_start = ut.new_empty(n_chunks, b, dm, A.shape[1])
        h_start[0] = 0
        y = ut.new_empty(b, length, dm)
        decay, states = (ut.new_empty(b, chunk, dm, A.shape[1]) for _ in range(2))
        for k in range(n_chunks):
            s, e = k * chunk, min((k + 1) * chunk, length)
            dec, st = decay[:, : e - s], states[:, : e - s]
            _ChunkedScan._states(dt[:, s:e], du[:, s:e], Bt[:, s:e], A, h_start[k], dec, st)
            y[:, s:e] = torch.einsum("btdn,btn->btd", st, Ct[:, s:e])
            if k + 1 < n_chunks:
                h_start[k + 1] = st[:, -1]
        last = st[:, -1].clone()
        ctx.save_for_backward(dt, ut, A, Bt, Ct, h_start)
        ctx.chunk = chunk
        return y, last

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor, g_last: Tensor) -> tuple[Optional[Tensor], ...]:
        with _no_autocast(gy.device.type):
            return _ChunkedScan._backward(ctx, gy, g_last)

    @staticmethod
    def _backward(ctx: Any, gy: Tensor, g_last: Tensor) -> tuple[Optional[Tensor], ...]:
        dt, ut, A, Bt, Ct, h_start = ctx.saved_tensors
        chunk, (b, length, dm) = ctx.chunk, ut.shape
        gy = gy.contiguous()
        du = dt * ut
        g_dt, g_du, g_Bt, g_Ct = (torch.empty_like(t) for t in (dt, du, Bt, Ct))
        g_A = torch.zeros_like(A)
        decay, states, g_states, g_log = (ut.new_empty(b, chunk, dm, A.shape[1]) for _ in range(4))
        g_carry = g_last  # gradient w.r.t. the last state of the current chunk, from what follows it
        for k in reversed(range(h_start.shape[0])):
            s, e = k * chunk, min((k + 1) * chunk, length)
            dec, st, gs, gl = (t[:, : e - s] for t in (decay, states, g_states, g_log))
            h0 = h_start[k]
            _ChunkedScan._states(dt[:, s:e], du[:, s:e], Bt[:, s:e], A, h0, dec, st)
            # ∂/∂h_t, backwards in t: read-out C_t·gy_t, plus what flows back through
            # h_{t+1} = decay_{t+1}·h_t + …
            torch.mul(gy[:, s:e].unsqueeze(-1), Ct[:, s:e].unsqueeze(2), out=gs)
            gs[:, -1] += g_carry
            for i in range(e - s - 2, -1, -1):
                gs[:, i].addcmul_(dec[:, i + 1], gs[:, i + 1])
            g_carry = dec[:, 0] * gs[:, 0]
            g_Ct[:, s:e] = torch.einsum("btd,btdn->btn", gy[:, s:e], st)
            # ∂/∂(Δ_t A) = ∂/∂h_t · h_{t−1} · decay_t  (the clamp's zero-gradient region is below rounding)
            torch.mul(gs[:, 1:], st[:, :-1], out=gl[:, 1:])
            torch.mul(gs[:, 0], h0, out=gl[:, 0])
            gl.mul_(dec)
            g_A += torch.einsum("btdn,btd->dn", gl, dt[:, s:e])
            g_dt[:, s:e] = torch.mul(gl, A, out=dec).sum(-1)
            # ∂/∂(Δ_t u_t) and ∂/∂B_t from the drive (Δ_t u_t) ⊗ B_t
            g_du[:, s:e] = torch.einsum("btdn,btn->btd", gs, Bt[:, s:e])
            g_Bt[:, s:e] = torch.einsum("btdn,btd->btn", gs, du[:, s:e])
        g_dt += g_du * ut
        return g_dt, g_du * dt, g_A, g_Bt, g_Ct, None


def selective_scan_chunked(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = True,
    return_last_state: bool = False, chunk: int = DEFAULT_CHUNK,
) -> ScanResult:
    """Same result as :func:`selective_scan_ref`, fast and memory-light on CPU (works on any device).

    float16/bfloat16 inputs are computed in float32 and cast back, as the fused kernel does.
    """
    _check_shapes(u, delta, A, B, C)
    if chunk < 1:
        raise ValueError(f"selective scan: chunk must be ≥ 1, got {chunk}")
    dtype_in = u.dtype
    work = torch.float32 if dtype_in in (torch.float16, torch.bfloat16) else dtype_in
    u, delta, A, B, C = (t.to(work) for t in (u, delta, A, B, C))
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    y, last = _ChunkedScan.apply(
        delta.transpose(1, 2).contiguous(), u.transpose(1, 2).contiguous(), A.contiguous(),
        B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), int(chunk),
    )
    # finish in the B×L×Dm layout the scan produced; the B×Dm×L result is a view of it, so a caller
    # that goes back to B×L×Dm (MambaMIL does) gets contiguous rows without a copy
    y = _finish(y, u.transpose(1, 2), D, None if z is None else z.transpose(1, 2), dim_last=True)
    y = y.to(dtype_in).transpose(1, 2)
    return (y, last) if return_last_state else y


@lru_cache(maxsize=1)
def fused_scan_available() -> bool:
    """True when ``mamba_ssm``'s fused CUDA selective scan can be imported (says nothing about a GPU)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA extension raising on import
        return False
    return True


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = True,
    return_last_state: bool = False, impl: Impl = "auto",
) -> ScanResult:
    """The selective scan MambaMIL calls. ``impl="auto"``: the fused kernel if importable and on CUDA, else chunked."""
    if impl == "auto":
        impl = "fused" if u.is_cuda and fused_scan_available() else "chunked"
    if impl == "chunked":
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if impl == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if impl == "fused":
        if not u.is_cuda:
            raise ValueError("selective scan: impl='fused' needs CUDA tensors")
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return selective_scan_fn(
            u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
            None if D is None else D.float(), None if z is None else z.contiguous(),
            None if delta_bias is None else delta_bias.float(), delta_softplus, return_last_state,
        )
    raise ValueError(f"selective scan: unknown impl {impl!r}; use one of auto, chunked, ref, fused")
