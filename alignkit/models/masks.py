"""What a batch's attention layout becomes for a model, per attention implementation, and which
(model family, batching, attention implementation) combinations give exact results.

Three layouts reach a model (docs/batching.md):

* **padded** rows: a 2-D ``attention_mask (B, T)``. transformers builds every mask itself.
* **packed** rows (padding-free): ``position_ids (1, N)`` restarting at 0 for each sequence and
  no ``attention_mask``. transformers finds the sequences from the restarts
  (``masking_utils.find_packed_sequence_indices``) and builds the block-diagonal causal mask in
  the form its attention implementation takes (bool for sdpa, additive float for eager,
  sequence boundaries ``cu_seqlens`` for flash-attention), sliding windows and per-layer windows
  included. This is how transformers itself trains on packed rows. A family whose mask builder
  ignores ``position_ids`` (OPT) gets the block-diagonal mask built here instead, like below.
* **prefix-shared** rows: a 4-D bool ``attention_mask (R, 1, T, T)`` (True = query may see key)
  that no 2-D mask or position ids can express. transformers passes a 4-D mask to the attention
  unchanged, and eager attention ADDS it to the scores, so a bool mask would add +1/+0 and mask
  nothing; and one 4-D mask would drop every sliding window. So :func:`attention_inputs` turns
  the bool layout into what the model's implementation takes, with transformers' own mask
  builders (``ALL_MASK_ATTENTION_FUNCTIONS``: bool for sdpa, 0/−inf float for eager), windowed
  by position ids with its ``sliding_window_overlay``, and for families whose layers alternate
  between full and sliding attention as the ``{"full_attention": …, "sliding_attention": …}``
  mapping those models accept in place of one mask.

A batching the model cannot be served exactly under is refused before training
(:func:`batching_refusal`), never run with a silent difference. Every accepted combination is
tested against a plain per-example forward (tests/test_conformance.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Family:
    """How a decoder family's transformers model takes masks (checked by the conformance suite)."""

    packs_by_position_ids: bool
    """Its mask builder receives ``position_ids``, so packed rows need no mask (and work under flash-attention)."""
    windows: str = "none"
    """Sliding windows (``config.sliding_window``): 'none'; 'every_layer' (one mask for all layers,
    windowed when the config sets a window); 'by_layer_type' (layers alternate full and sliding
    attention as ``config.layer_types`` says, and the model takes one mask per layer type)."""


#: Decoder families served by the padding-free and prefix-shared batchings, by ``config.model_type``.
#: A family not listed gets padded batches only. Add one after tests/test_conformance.py passes for it.
FAMILIES: dict[str, Family] = {
    "llama": Family(packs_by_position_ids=True),
    "gemma": Family(packs_by_position_ids=True),
    "gpt2": Family(packs_by_position_ids=True),
    "gpt_neox": Family(packs_by_position_ids=True),
    "opt": Family(packs_by_position_ids=False),  # its create_causal_mask call is not given position_ids
    "mistral": Family(packs_by_position_ids=True, windows="every_layer"),
    "phi3": Family(packs_by_position_ids=True, windows="every_layer"),
    "qwen2": Family(packs_by_position_ids=True, windows="by_layer_type"),
    "qwen3": Family(packs_by_position_ids=True, windows="by_layer_type"),
    "gemma2": Family(packs_by_position_ids=True, windows="by_layer_type"),
    "gemma3_text": Family(packs_by_position_ids=True, windows="by_layer_type"),
}

#: Attention implementations a custom mask is built for (transformers' mask builders, bool / float).
MASKED_ATTENTION = ("sdpa", "eager")
#: Implementations that take packed rows as sequence boundaries from position ids (no mask at all).
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def unwrap(model):
    """The transformers model under DDP/FSDP (``.module``) and peft wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _config(model):
    return getattr(unwrap(model), "config", None)


#: How a refusal names the batching that works (SFT has no ``batching`` option, only run.padding_free).
_USE = {"padded": "use batching=padded (SFT, critic: run.padding_free=false)",
        "padding_free": "use batching=padding_free"}
_OTHER_ATTENTION = "or load the model with model.attn_implementation=sdpa or eager"


def batching_refusal(batching: str, model) -> str | None:
    """Why ``model`` cannot run ``batching`` (padded, padding_free, prefix_shared) exactly, naming
    the batching that works; None when it can."""
    if batching not in ("padded", "padding_free", "prefix_shared"):
        raise ValueError(f"batching must be padded, padding_free or prefix_shared; got {batching!r}")
    if batching == "padded":
        return None
    config = _config(model)
    model_type = getattr(config, "model_type", "?")
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    family = FAMILIES.get(model_type)
    if family is None:
        encoder = " (an encoder reads every sequence in both directions, so sequences cannot share a row)"
        return (f"batching={batching} is exact only on the decoder families tested for it "
                f"({', '.join(sorted(FAMILIES))}); model_type {model_type!r} is not one of them"
                f"{encoder if pools_sequences(unwrap(model)) else ''}: {_USE['padded']}")
    if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
        return f"batching={batching} needs causal attention; this {model_type} attends both ways: {_USE['padded']}"
    if attention in MASKED_ATTENTION:
        return None
    if batching == "padding_free" and attention in VARLEN_ATTENTION:
        if family.packs_by_position_ids:
            return None
        return (f"batching=padding_free under {attention} needs masks that follow position ids, and "
                f"{model_type}'s do not: {_USE['padded']}, {_OTHER_ATTENTION}")
    works = "padding_free" if attention in VARLEN_ATTENTION and family.packs_by_position_ids else "padded"
    why = ("flash-attention takes sequence boundaries, not a mask, and a shared prompt is not a boundary"
           if attention in VARLEN_ATTENTION else "only sdpa and eager are tested with custom masks")
    return (f"batching={batching} under attn_implementation={attention!r} cannot be served exactly for "
            f"{model_type} ({why}): {_USE[works]}, {_OTHER_ATTENTION}")


def pools_sequences(model) -> bool:
    """A sequence classifier that pools the sequence (encoders: [CLS] → pooler → ``classifier``)
    rather than applying a ``score`` head at each position (decoders)."""
    return hasattr(model, "classifier") and not hasattr(model, "score")


def _mask_dtype(model) -> torch.dtype:
    """The dtype transformers gives eager masks: that of the input embeddings."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if weight is not None and weight.is_floating_point() else torch.float32


def packed_visibility(position_ids: Tensor) -> Tensor:
    """``(R, 1, N, N)`` bool of a packed row: causal within each sequence, nothing across
    (a sequence starts where its position id is 0)."""
    seq = (position_ids == 0).cumsum(-1)  # (R, N) sequence number of each token
    N = position_ids.shape[-1]
    causal = torch.ones((N, N), dtype=torch.bool, device=position_ids.device).tril_()
    return ((seq[:, :, None] == seq[:, None, :]) & causal)[:, None]  # (R, 1, N, N)


def _at_positions(mask_function, position_ids: Tensor):
    """``mask_function`` (of row indices) applied to the tokens' position ids instead. Here
    rather than transformers' ``remap_positions_for_packed_sequence``, which only its newer
    releases have (5.17 lacks it)."""

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return mask_function(batch_idx, head_idx, position_ids[batch_idx, q_idx], position_ids[batch_idx, kv_idx])

    return inner


def _build(attention: str, visible: Tensor, position_ids: Tensor | None, window: int | None, dtype: torch.dtype):
    """``visible`` in implementation ``attention``'s format, keys further than ``window`` positions
    behind the query hidden, through transformers' own mask builder for that implementation."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, and_masks, sliding_window_overlay

    def allowed(batch_idx, head_idx, q_idx, kv_idx):  # index-based, broadcast by the builder
        return visible[batch_idx, 0, q_idx, kv_idx]

    mask_function = allowed
    if window is not None:
        # The window counts positions in the sequence a token belongs to, not row indices: a
        # prefix-shared rejected token at position p sees prompt keys at p−window+1..p, as alone.
        mask_function = and_masks(allowed, _at_positions(sliding_window_overlay(window), position_ids))
    R, _, T, K = visible.shape
    return ALL_MASK_ATTENTION_FUNCTIONS[attention](
        batch_size=R, q_length=T, kv_length=K, mask_function=mask_function, allow_is_causal_skip=False,
        dtype=dtype, device=visible.device,
    )


def _explicit_masks(model, visible: Tensor, position_ids: Tensor):
    """The ``attention_mask`` argument that makes ``model`` (a family of the table, under sdpa or
    eager: :func:`batching_refusal` checked it) attend as ``visible (R, 1, T, T)`` says, its
    sliding windows applied: one mask, or a mapping per layer type."""
    base = unwrap(model)
    config = base.config
    attention = config._attn_implementation
    family = FAMILIES[config.model_type]
    window = getattr(config, "sliding_window", None)
    dtype = _mask_dtype(base)
    if family.windows == "by_layer_type":
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        return {kind: _build(attention, visible, position_ids, window if kind == "sliding_attention" else None, dtype)
                for kind in kinds}
    return _build(attention, visible, position_ids, window if family.windows == "every_layer" else None, dtype)


def attention_inputs(model, batch: dict) -> dict:
    """``attention_mask`` and ``position_ids`` to call ``model`` with on ``batch`` (any layout).

    Raises the start-up check's error (:func:`batching_refusal`) if the layout is one the model
    cannot be served exactly with, so a library caller that skipped the check gets no silent
    difference either."""
    mask, position_ids = batch.get("attention_mask"), batch.get("position_ids")
    layout = ("prefix_shared" if mask is not None and mask.dim() == 4
              else "padding_free" if mask is None and position_ids is not None else "padded")
    reason = batching_refusal(layout, model)
    if reason is not None:
        raise ValueError(reason)
    if layout == "prefix_shared":  # the layout says who sees whom
        return {"attention_mask": _explicit_masks(model, mask.bool(), position_ids), "position_ids": position_ids}
    if layout == "padding_free" and not FAMILIES[_config(model).model_type].packs_by_position_ids:
        return {"attention_mask": _explicit_masks(model, packed_visibility(position_ids), position_ids),
                "position_ids": position_ids}
    return {"attention_mask": mask, "position_ids": position_ids}
