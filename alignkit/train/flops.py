"""Model FLOPs of a training step, and the peak matmul FLOP/s of this machine: model FLOP utilisation.

Model FLOPs utilisation (MFU, Chowdhery et al. 2022, PaLM App. B) is the training FLOPs the model
needs per second divided by the hardware's peak. For a transformer with N matmul parameters,

    training FLOPs = 6·N·tokens + 12·L·d·pairs

- ``6·N·tokens``: every real (non-padding) token goes through every weight matrix once forward
  (2 FLOPs per weight: multiply and add) and twice backward (gradients of activations and of
  weights). N counts the weights of ``nn.Linear`` layers, the unembedding included (a tied one
  too: it is a matmul), embedding *lookups* excluded (no FLOPs).
- ``12·L·d·pairs``: attention scores QKᵀ and the weighted sum AV cost 2·d FLOPs each per
  (query, key) pair a layer computes, forward; ×3 for training. ``pairs`` counts the pairs the
  masks allow: T(T+1)/2 for a causal sequence of T tokens, the True entries of a block-diagonal
  4-D mask for packed rows. Kernels that compute the masked-out half do more work than this;
  that work is not counted (it is waste, not model FLOPs).

The peak is *measured*, not taken from a data sheet: the best FLOP/s of large float32 (or the
training dtype's) square matmuls on the threads this process uses (:func:`measure_peak_flops`;
per wall-second, or per CPU-second on a machine shared with other work). Set ``ALIGNKIT_PEAK_FLOPS`` (FLOP/s) to skip the measurement or to
use a data-sheet figure instead; the loop logs ``mfu`` when a peak is known (:func:`known_peak`).

Work the metric leaves out on purpose: no-grad forwards of a frozen reference (DPO's π_ref costs
2·N·tokens more per step), evaluation, and the optimizer step.
"""

from __future__ import annotations

import os
import time

import torch

_PEAK: float | None = None


def matmul_params(model: torch.nn.Module) -> int:
    """N: weights of every ``nn.Linear`` in ``model`` (the matrices a token is multiplied by)."""
    seen, n = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            key = (id(module), w.data_ptr())  # a tied unembedding is its own matmul: count it
            if key not in seen:
                seen.add(key)
                n += w.numel()
    return n


def attention_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(L layers, d = heads × head_dim) of the attention of ``model`` (a HF model, possibly wrapped)."""
    config = None
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_hidden_layers"):
            break
    if config is None:
        return 0, 0
    heads = getattr(config, "num_attention_heads", 0)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // max(heads, 1))
    return int(config.num_hidden_layers), int(heads * head_dim)


def attention_pairs(batch: dict) -> int:
    """(query, key) pairs the batch's attention masks allow, summed over rows."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 4:  # prefix-shared rows: the mask says it all
        return int(mask.bool().sum())
    if mask is None and "seq_lens" in batch:  # packed rows: causal within each sequence
        lengths = batch["seq_lens"].long()
    elif mask is not None:  # right-padded causal rows
        lengths = mask.sum(dim=1).long()
    else:
        lengths = torch.full((batch["input_ids"].shape[0],), batch["input_ids"].shape[1])
    return int((lengths * (lengths + 1) // 2).sum())


def real_tokens(batch: dict) -> int:
    """Tokens that are not padding (a prefix-shared batch says how many in ``num_tokens``)."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


class FlopCounter:
    """Training FLOPs of batches for one model: ``counter(batch)`` -> 6·N·tokens + 12·L·d·pairs,
    called after the model's forward on ``batch``.

    A reward model that read a few positions ran its last MLP and its head on those rows only
    (:class:`alignkit.models.heads.ScalarHead` sets ``last_mlp_rows``): the
    6·(N_mlp + d)·(tokens − rows) FLOPs it skipped are not counted. Likewise a causal LM whose
    log-probs took the chunked path ran its output head (V·H weights) on the label positions
    only (:func:`alignkit.models.heads.position_logps` sets ``last_head_rows``): the
    6·V·H·(tokens − rows) FLOPs of the others are not counted (nor, as for activation
    checkpointing, the head's recomputation in the backward pass).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.n = matmul_params(model)
        self.layers, self.width = attention_shape(model)
        from alignkit.models.heads import ScalarHead, last_mlp, scalar_head_backbone
        from alignkit.models.masks import unwrap

        mlp = last_mlp(scalar_head_backbone(model)) if isinstance(model, ScalarHead) else None
        # rows a reward read skips go through neither the last MLP nor the one-output head
        self.n_last_mlp = matmul_params(mlp) + model.model.config.hidden_size if mlp is not None else 0
        self.lm = unwrap(model)
        head = self.lm.get_output_embeddings() if hasattr(self.lm, "get_output_embeddings") else None
        self.n_head = head.weight.numel() if isinstance(head, torch.nn.Linear) else 0

    def __call__(self, batch: dict) -> float:
        tokens = real_tokens(batch)
        flops = 6.0 * self.n * tokens + 12.0 * self.layers * self.width * attention_pairs(batch)
        rows = getattr(self.model, "last_mlp_rows", None)
        if rows is not None:
            flops -= 6.0 * self.n_last_mlp * max(tokens - rows, 0)
        head_rows = getattr(self.lm, "last_head_rows", None)
        if head_rows is not None:
            flops -= 6.0 * self.n_head * max(tokens - head_rows, 0)
        return flops


def measure_peak_flops(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       sizes: tuple[int, ...] = (256, 512, 1024), seconds: float = 0.3, clock: str = "wall") -> float:
    """Best matmul FLOP/s of this process (its torch threads) on square ``dtype`` matrices.

    ``clock="cpu"`` divides by the CPU time of the process instead of wall time: FLOPs per
    CPU-second, which other processes sharing the cores disturb much less (a 1-thread process
    descheduled half the time still does the same FLOPs per CPU-second). CPU only.
    """
    timer = time.process_time if clock == "cpu" else time.perf_counter
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        c = a @ b  # warm-up
        reps, w0, t0 = 0, time.perf_counter(), timer()
        while True:
            c = a @ b
            reps += 1
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            if time.perf_counter() - w0 >= seconds:
                break
        best = max(best, 2.0 * n**3 * reps / max(timer() - t0, 1e-9))
        del c
    return best


def set_peak(flops_per_s: float | None) -> None:
    """Tell the loop the peak to divide by (e.g. from :func:`measure_peak_flops` at a benchmark's start)."""
    global _PEAK
    _PEAK = flops_per_s


def known_peak() -> float | None:
    """The peak FLOP/s set with :func:`set_peak` or ``ALIGNKIT_PEAK_FLOPS``, else None."""
    if _PEAK:
        return _PEAK
    env = os.environ.get("ALIGNKIT_PEAK_FLOPS")
    return float(env) if env else None
