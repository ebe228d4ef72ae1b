"""Per-token log-probs (and entropy) straight from the last hidden states, through the output
projection in chunks of rows, so that no ``(N, V)`` logits tensor is ever held.

A causal LM's log-probs are usually read as ``log_softmax(lm_head(h))[y]``: the model writes the
full ``(B, T, V)`` logits (V = 49,152 for SmolLM2: 200 MB in float32 at 4 × 256 tokens), the loss
keeps a float copy of them and the backward pass another one for their gradient. Here the rows
``h (N, H)`` go through ``W (V, H)`` a chunk at a time; the forward pass keeps only the per-row
log-sum-exp, and the backward pass recomputes each chunk's logits to form its gradient::

    z = h Wᵀ + b                       (n, V) one chunk of rows
    u = scale · softcap(z) / τ          softcap(z) = c · tanh(z / c)  (Gemma 2's final soft-capping)
    log π(y) = u_y − logsumexp(u)       H = logsumexp(u) − Σ_v p_v u_v,  p = softmax(u)

    ∂ log π(y) / ∂u = onehot(y) − p     ∂H / ∂u = −p ⊙ (u − Σ_v p_v u_v)
    ∂u / ∂z = scale/τ · (1 − tanh²(z / c))
    ∂/∂h = (∂/∂z) W,   ∂/∂W = Σ_rows (∂/∂z)ᵀ h,   ∂/∂b = Σ_rows ∂/∂z

Memory is O(N·H + chunk·V) instead of O(N·V); the FLOPs are those of the plain path plus one
recomputation of ``h Wᵀ`` in backward (a third more head FLOPs). The idea is that of Liger
Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy, written here in plain torch so
that it runs wherever torch does.

Precision: the matmuls run in the dtype the plain path would use (the autocast dtype under
``torch.autocast``, else the inputs' dtype); the log-sum-exp, softmax and entropy in float32 for
half-precision inputs (float64 stays float64), as :func:`alignkit.ops.token_logps` does.
Nothing here imports the rest of alignkit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: Logits per working chunk (rows × V): 2**23 floats = 32 MiB in float32, 170 rows at V = 49,152.
#: The backward pass holds about three such buffers. Measured on one CPU thread
#: (benchmarks/bench_logps.py, SmolLM2's head): 2**20 (21 rows) was 1.4× slower per step than
#: 2**22, and 2**23 / 2**24 5–15% faster than 2**22 for 50 / 150 MB more at the peak.
CHUNK_ELEMENTS = 2**23


class LinearLogps(NamedTuple):
    """What :func:`linear_logps` returns."""

    logps: Tensor
    """(N,) log π(y_n): the log-softmax of the row's scores at its target."""
    entropy: Tensor | None
    """(N,) entropy of softmax(scores) of the row, or None when not asked for."""


@dataclass(frozen=True)
class _Spec:
    """The score transform and precisions of one call (fixed between forward and backward)."""

    softcap: float | None
    scale: float
    temperature: float
    mm_dtype: torch.dtype  # matmul dtype: the autocast dtype, else the inputs' common dtype
    out_dtype: torch.dtype  # log-sum-exp / softmax dtype: float32 for half, else mm_dtype
    device_type: str
    rows: int  # rows per chunk
    entropy: bool


def _scores(h: Tensor, weight: Tensor, bias: Tensor | None, spec: _Spec) -> Tensor:
    """u = scale · softcap(h Wᵀ + b) / τ of one chunk, ``(n, V)`` in ``spec.out_dtype`` (a fresh tensor)."""
    u = F.linear(h.to(spec.mm_dtype), weight, bias).to(spec.out_dtype)
    if spec.softcap is not None:
        u.div_(spec.softcap).tanh_().mul_(spec.softcap)
    if spec.scale != 1.0:
        u.mul_(spec.scale)
    if spec.temperature != 1.0:
        u.div_(spec.temperature)  # divided, as the plain path divides its logits
    return u


def _chunks(n: int, rows: int):
    for r0 in range(0, n, rows):
        yield r0, min(n, r0 + rows)


class _LinearLogpsFunction(torch.autograd.Function):
    """log π(y) (and H) of ``softmax(scale · softcap(h Wᵀ + b) / τ)`` with a backward pass that
    recomputes the logits chunk by chunk (formulas in the module docstring)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, spec: _Spec):
        N = hidden.shape[0]
        logps = hidden.new_empty(N, dtype=spec.out_dtype)
        lse = hidden.new_empty(N, dtype=spec.out_dtype)
        entropy = hidden.new_empty(N, dtype=spec.out_dtype) if spec.entropy else None
        with torch.autocast(spec.device_type, enabled=False):  # the dtypes are set explicitly in spec
            w = weight.to(spec.mm_dtype)
            b = None if bias is None else bias.to(spec.mm_dtype)
            for r0, r1 in _chunks(N, spec.rows):
                u = _scores(hidden[r0:r1], w, b, spec)  # (n, V)
                lse[r0:r1] = torch.logsumexp(u, dim=-1)
                logps[r0:r1] = u.gather(-1, targets[r0:r1, None]).squeeze(-1) - lse[r0:r1]
                if entropy is not None:
                    p = u.sub(lse[r0:r1, None]).exp_()  # (n, V) softmax
                    entropy[r0:r1] = lse[r0:r1] - p.mul_(u).sum(-1)
        ctx.spec = spec
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets, lse,
                              entropy if entropy is not None else torch.empty(0))
        if entropy is None:
            return logps
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps: Tensor, grad_entropy: Tensor | None = None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        spec: _Spec = ctx.spec
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        acc_dtype = torch.promote_types(weight.dtype, spec.out_dtype)  # float32 at least for sums over rows
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if want_b else None
        g_logp = grad_logps.to(spec.out_dtype)
        g_ent = None if grad_entropy is None else grad_entropy.to(spec.out_dtype)
        with torch.autocast(spec.device_type, enabled=False):
            w = weight.to(spec.mm_dtype)
            b = bias.to(spec.mm_dtype) if ctx.has_bias else None
            for r0, r1 in _chunks(hidden.shape[0], spec.rows):
                h = hidden[r0:r1].to(spec.mm_dtype)  # (n, H)
                u = _scores(h, w, b, spec)  # (n, V), recomputed
                g = u.sub(lse[r0:r1, None]).exp_()  # (n, V) p = softmax(u)
                gl = g_logp[r0:r1, None]  # (n, 1)
                if g_ent is not None:
                    # ∂/∂u = gl·(onehot − p) − gH·p⊙(u − ū),  ū = Σ p u = lse − H
                    mean_u = (lse[r0:r1] - entropy[r0:r1])[:, None]  # (n, 1)
                    g.mul_(u.sub(mean_u).mul_(g_ent[r0:r1, None]).add_(gl)).neg_()
                else:
                    g.mul_(-gl)
                g.scatter_add_(-1, targets[r0:r1, None], gl)  # + gl·onehot(y)
                # back through /τ, ·scale and the soft-cap: ∂u/∂z = scale/τ · (1 − tanh²(z/c))
                if spec.softcap is not None:
                    tanh = u.mul_(spec.temperature / (spec.scale * spec.softcap))  # u's buffer now holds tanh(z/c)
                    g.mul_(tanh.square_().neg_().add_(1.0))
                if spec.scale != 1.0:
                    g.mul_(spec.scale)
                if spec.temperature != 1.0:
                    g.div_(spec.temperature)
                del u
                g = g.to(spec.mm_dtype)  # (n, V) ∂/∂z
                if grad_h is not None:
                    grad_h[r0:r1] = (g @ w).to(hidden.dtype)  # (n, H)
                if grad_w is not None and grad_w.dtype == g.dtype:
                    grad_w.addmm_(g.t(), h)  # (V, H) += (V, n) @ (n, H)
                elif grad_w is not None:  # half-precision matmul, summed over chunks in float32
                    grad_w.add_(g.t() @ h)
                if grad_b is not None:
                    grad_b.add_(g.sum(0, dtype=acc_dtype))  # (V,)
        return (grad_h,
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype),
                None, None)


def _mm_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` computes in here: autocast's, or the inputs' common one."""
    device_type = hidden.device.type
    common = torch.promote_types(hidden.dtype, weight.dtype)
    if torch.is_autocast_enabled(device_type) and common != torch.float64:  # autocast leaves float64 alone
        return torch.get_autocast_dtype(device_type)
    return common


def linear_logps(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                 softcap: float | None = None, scale: float = 1.0, temperature: float = 1.0,
                 entropy: bool = False, chunk_elements: int | None = None) -> LinearLogps:
    """log π(y_n) = log_softmax(u_n)[y_n] with u_n = scale · softcap(W h_n + b) / τ, row by row,
    without ever holding the ``(N, V)`` scores (nor their gradient).

    Args:
        hidden: ``(N, H)`` last hidden states of the rows to score (only those: a row costs
            V·H multiply-adds, so callers gather the label positions first).
        weight: ``(V, H)`` output projection (the unembedding; the tied embedding matrix is fine:
            its gradient from here is added once to the shared parameter, as for any use).
        targets: ``(N,)`` token ids in ``[0, V)``.
        bias: optional ``(V,)`` output bias.
        softcap: c of a final logit soft-cap ``c · tanh(z / c)`` (Gemma 2), or None.
        scale: factor on the (capped) logits (Cohere's ``logit_scale``; 1/``logits_scaling`` for Granite).
        temperature: τ dividing the scores last (the distribution a sampler drew from).
        entropy: also return the entropy of each row's distribution.
        chunk_elements: rows per chunk × V stays at most this (the working buffers' size);
            None: :data:`CHUNK_ELEMENTS`.

    Returns:
        :class:`LinearLogps` ``(logps (N,), entropy (N,) or None)``, float32 for half-precision
        inputs (and under autocast), else the inputs' dtype. Differentiable (first order) with
        respect to ``hidden``, ``weight`` and ``bias``, entropy included.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_logps needs hidden (N, H) and weight (V, H); got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be (N,) = {tuple(hidden.shape[:1])}; got {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    mm_dtype = _mm_dtype(hidden, weight)
    spec = _Spec(softcap=softcap, scale=float(scale), temperature=float(temperature), mm_dtype=mm_dtype,
                 out_dtype=torch.float32 if mm_dtype in (torch.float16, torch.bfloat16) else mm_dtype,
                 device_type=hidden.device.type, rows=max(1, (chunk_elements or CHUNK_ELEMENTS) // max(weight.shape[0], 1)),
                 entropy=entropy)
    out = _LinearLogpsFunction.apply(hidden, weight, bias, targets.long(), spec)
    return LinearLogps(*out) if entropy else LinearLogps(out, None)
