"""GPTQ (Frantar et al., 2022) for the compiler's group-wise formats, in PyTorch.

For a linear weight ``W[N, K]`` whose inputs ``x`` have the (uncentered) second moment
``H = sum x x^T`` (:class:`Hessian`), GPTQ picks codes that minimize the layer-output
error ``sum_x ||(W - Q) x||^2 = tr((W - Q) H (W - Q)^T)`` rather than ``||W - Q||^2``: the
columns (input channels) are quantized one after another, and the rounding error of each
is fed back onto the columns not yet quantized, weighted by the inverse Hessian (its
Cholesky factor), so correlated channels compensate each other.

The codes are exactly the format's: each group's scale (and min) is chosen by the
compiler's own rule -- ``kernels/quant.py``'s row quantizers, with its ``search`` if the
format asks -- on the group's *current* (error-updated) weights when the loop reaches the
group, and each column is rounded with that rule's arithmetic (float32, round half to
even, multiply by the reciprocal of the float16 scale). So :func:`gptq_quantize` returns
codes + float16 scales (+ mins) that the kernels' packers take unchanged, and with
``H = I`` it returns exactly the round-to-nearest codes of the plain quantizer.

``act_order``: columns in order of decreasing ``H_kk`` (the most active inputs first);
the group scales are then computed up front from the unquantized weights ("static
groups"), because the packed formats need each group to be K-contiguous.

Memory: the weight in float32, its codes, ``H`` and its Cholesky factor (``K x K``
float32, a few copies while factoring); no activations (they are summed into ``H``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels import (
    quantize_int4_asym_rows,
    quantize_int4_rows,
    quantize_int8_groupwise_rows,
)
from .recipe import GROUPED_KINDS, WeightFormat
from .stored import StoredWeight, padded_shape, store_codes

DEFAULT_DAMP = 0.01  # of the mean of diag(H), added to the diagonal (the reference implementation's)
DEFAULT_BLOCK = 128  # columns per lazy-update block (rounded to whole groups)


class Hessian:
    """``H = sum x x^T`` over every row ``x`` (length ``K``) added (float32, torch).

    ``add(x)`` takes a tensor ``[..., K]``; ``count`` is the number of rows summed."""

    def __init__(self, k: int):
        import torch

        self.k = k
        self.h = torch.zeros((k, k), dtype=torch.float32)
        self.count = 0

    def add(self, x) -> None:
        import torch

        x = x.detach().reshape(-1, self.k).to(torch.float32)
        self.h.addmm_(x.T, x)
        self.count += x.shape[0]


@dataclass
class GPTQCodes:
    """The codes GPTQ chose for an unpadded-N weight: ``codes [N, K_pad]`` (uint8 ``u`` for
    INT4, ``q + 8`` for the symmetric format; int8 for ``int8_group``), float16 ``scales``
    and ``mins`` (``int4_asym``, else None) ``[N, K_pad // group_size]``."""

    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None


def _check_format(fmt: WeightFormat) -> None:
    if fmt.kind not in GROUPED_KINDS:
        raise ValueError(f"GPTQ needs a group-wise format ({', '.join(GROUPED_KINDS)}), got {fmt.kind!r}")


def _group_params(wg: np.ndarray, fmt: WeightFormat):
    """(scales f16 [N, G], mins f16 [N, G] | None) of float32 ``wg [N, G * gs]`` by the
    compiler's rule for ``fmt`` (its row quantizers: same rounding, same search)."""
    gs = fmt.group_size
    if fmt.kind == "int4":
        return quantize_int4_rows(wg, gs, search=fmt.search)[1], None
    if fmt.kind == "int4_asym":
        _, s, m = quantize_int4_asym_rows(wg, gs, search=fmt.search)
        return s, m
    return quantize_int8_groupwise_rows(wg, gs)[1], None


def _round_column(w, s32, inv, m32, kind: str):
    """(code as float, dequantized value) of float32 column ``w`` with the group's float32
    scale ``s32`` (its reciprocal ``inv``) and min ``m32``: the kernels/quant.py rule."""
    import torch

    if kind == "int4_asym":
        u = torch.clamp(torch.round((w - m32) * inv), 0, 15)
        return u, u * s32 + m32
    lo, hi = (-8, 7) if kind == "int4" else (-127, 127)
    q = torch.clamp(torch.round(w * inv), lo, hi)
    return q, q * s32


def _reciprocal(s32):
    """``1 / s`` in float32, 0 where ``s == 0`` (kernels/quant.py's rule: a zero group has code 0)."""
    import torch

    safe = torch.where(s32 != 0, s32, torch.ones_like(s32))
    return torch.where(s32 != 0, 1.0 / safe, torch.zeros_like(s32))


def _inverse_cholesky(h, damp: float):
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; the damping is raised
    tenfold (at most 4 times) while the factorization fails."""
    import torch

    k = h.shape[0]
    mean = float(torch.diag(h).mean())
    for _ in range(5):
        hd = h + (damp * mean) * torch.eye(k, dtype=h.dtype)
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
        damp *= 10
    raise ValueError("GPTQ: the Hessian is not positive definite even with damping (non-finite activations?)")


def gptq_codes(w: np.ndarray, hessian, fmt: WeightFormat, *, act_order: bool = False,
               damp: float = DEFAULT_DAMP, block_size: int = DEFAULT_BLOCK) -> GPTQCodes:
    """GPTQ codes of float32 ``w [N, K]`` (any N) for inputs with second moment ``hessian``
    (``[K, K]``, torch or numpy) in group-wise format ``fmt``.

    K is zero-padded to the group size as the compiler stores it (padded columns get an
    identity Hessian: the kernels multiply them with zero activations). Input channels
    that never fire (``H_kk = 0``) are quantized as zeros would be. Raises ``ValueError``
    for a format without group-wise codes (``int8`` per channel, ``fp32``) or mismatched
    shapes."""
    import torch

    _check_format(fmt)
    w = np.asarray(w, np.float32)
    n, k = w.shape
    h = torch.as_tensor(np.asarray(hessian) if not torch.is_tensor(hessian) else hessian).to(torch.float32)
    if tuple(h.shape) != (k, k):
        raise ValueError(f"Hessian shape {tuple(h.shape)} must be [K, K] = {(k, k)}")
    gs = fmt.group_size
    k_pad = -(-k // gs) * gs
    W = torch.zeros((n, k_pad), dtype=torch.float32)
    W[:, :k] = torch.from_numpy(w)
    H = torch.eye(k_pad, dtype=torch.float32)
    H[:k, :k] = h
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    groups = k_pad // gs

    scales = np.zeros((n, groups), np.float16)
    mins = np.zeros((n, groups), np.float16) if fmt.kind == "int4_asym" else None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        s, m = _group_params(W.numpy(), fmt)  # static groups, from the unquantized weights
        scales[:] = s
        if mins is not None:
            mins[:] = m
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = None
    hinv = _inverse_cholesky(H, damp)

    codes = torch.empty((n, k_pad), dtype=torch.float32)  # in processing order
    block = max(gs, block_size // gs * gs)
    s32_all = torch.from_numpy(scales.astype(np.float32))
    m32_all = torch.from_numpy(mins.astype(np.float32)) if mins is not None else None
    inv_all = _reciprocal(s32_all)
    for b0 in range(0, k_pad, block):
        b1 = min(b0 + block, k_pad)
        W1 = W[:, b0:b1].clone()
        err1 = torch.empty_like(W1)
        h1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if perm is None:
                g = col // gs
                if col % gs == 0:  # a new group: its scale from the current (error-updated) weights
                    s, m = _group_params(np.ascontiguousarray(W1[:, i:i + gs].numpy()), fmt)
                    scales[:, g], s32_all[:, g] = s[:, 0], torch.from_numpy(s[:, 0].astype(np.float32))
                    inv_all[:, g] = _reciprocal(s32_all[:, g])
                    if mins is not None:
                        mins[:, g], m32_all[:, g] = m[:, 0], torch.from_numpy(m[:, 0].astype(np.float32))
            else:
                g = int(perm[col]) // gs
            wcol = W1[:, i]
            code, qcol = _round_column(wcol, s32_all[:, g], inv_all[:, g],
                                       m32_all[:, g] if m32_all is not None else None, fmt.kind)
            codes[:, col] = code
            e = (wcol - qcol) / h1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        W[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    if perm is not None:
        out = torch.empty_like(codes)
        out[:, perm] = codes
        codes = out
    c = codes.numpy()
    if fmt.kind == "int4":
        c = (c + 8).astype(np.uint8)
    elif fmt.kind == "int4_asym":
        c = c.astype(np.uint8)
    else:
        c = c.astype(np.int8)
    return GPTQCodes(np.ascontiguousarray(c), scales, mins)


def pad_code_rows(c: GPTQCodes, n_pad: int, fmt: WeightFormat) -> GPTQCodes:
    """``c`` with zero-weight rows appended up to ``n_pad`` (code of 0, scale 0, min 0)."""
    n = c.codes.shape[0]
    if n_pad == n:
        return c
    zero = 8 if fmt.kind == "int4" else 0
    codes = np.full((n_pad, c.codes.shape[1]), zero, c.codes.dtype)
    codes[:n] = c.codes
    scales = np.zeros((n_pad, c.scales.shape[1]), np.float16)
    scales[:n] = c.scales
    mins = None
    if c.mins is not None:
        mins = np.zeros_like(scales)
        mins[:n] = c.mins
    return GPTQCodes(codes, scales, mins)


def split_code_rows(c: GPTQCodes, sizes: list[int]) -> list[GPTQCodes]:
    """Row blocks of ``c`` (GPTQ of weights sharing an input, concatenated along N)."""
    out, r = [], 0
    for size in sizes:
        out.append(GPTQCodes(c.codes[r:r + size], c.scales[r:r + size], None if c.mins is None else c.mins[r:r + size]))
        r += size
    return out


def stored_from_codes(c: GPTQCodes, fmt: WeightFormat, shape: tuple, use: str = "linear") -> StoredWeight:
    """The :class:`StoredWeight` of GPTQ codes for an unpadded ``shape`` weight (rows padded
    as the layout needs, then the kernels' packers); its ``codes`` is ``c``."""
    n_pad, _ = padded_shape(fmt, shape, use)
    padded = pad_code_rows(c, n_pad, fmt)
    out = store_codes(padded.codes, padded.scales, padded.mins, fmt, shape, use)
    out.codes = c
    return out


def gptq_quantize(w: np.ndarray, hessian, fmt: WeightFormat, *, use: str = "linear", act_order: bool = False,
                  damp: float = DEFAULT_DAMP, block_size: int = DEFAULT_BLOCK) -> StoredWeight:
    """GPTQ of one weight, packed: :func:`gptq_codes` then :func:`stored_from_codes`."""
    w = np.asarray(w, np.float32)
    c = gptq_codes(w, hessian, fmt, act_order=act_order, damp=damp, block_size=block_size)
    return stored_from_codes(c, fmt, w.shape, use)


def output_error(w: np.ndarray, w_q: np.ndarray, hessian) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the summed squared layer-output error over the inputs
    whose second moment is ``hessian`` (float64)."""
    e = np.asarray(w, np.float64) - np.asarray(w_q, np.float64)
    h = np.asarray(hessian.numpy() if hasattr(hessian, "numpy") else hessian, np.float64)
    return float(np.sum((e @ h) * e))
