"""Forward passes that every trainer shares: per-token log-probs of a causal LM, and the scalar
head's outputs (rewards at the last token, values at every token) of a reward/value model.

They accept both padded batches (2-D ``attention_mask``) and packed padding-free rows (4-D
block-diagonal mask plus ``position_ids``), so trainers don't care which one the collator made.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from alignkit.ops import token_logps


def _unwrap(model):
    """The transformers model under a peft wrapper (for attribute access only)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_logps(model, batch: dict) -> tuple[Tensor, Tensor]:
    """Per-token log π(y_t | y_<t) of the label tokens.

    Returns ``(logps, mask)``, both ``(B, T-1)``: position t scores token t+1; mask is 1 where a
    label exists (response tokens; -100 labels are prompt or padding).
    """
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )
    labels = batch["labels"][:, 1:]  # (B, T-1): the token each position predicts
    logits = out.logits[:, :-1]  # (B, T-1, V)
    mask = labels != -100
    return token_logps(logits, labels.masked_fill(~mask, 0)) * mask, mask


class ScalarHead(torch.nn.Module):
    """A reward/value model as one module whose forward gives the scalar head at every position.

    Wrapping the HF ``*ForSequenceClassification`` model (whose own forward pools to the last
    non-pad token only) lets a value model read every position, and lets accelerate/DDP wrap one
    module whose forward is the one that runs, so gradient synchronisation sees it.

    A reward model reads one position per sequence. Passing ``positions`` (flat indices into the
    ``(B·T)`` positions) returns the head there only, and the LAST decoder layer's MLP runs on
    those positions only: the MLP is position-wise and after the last layer only the final norm
    and the head (also position-wise) read the hidden states, so the other positions' MLP outputs
    could not change the result. Every earlier layer, and the last layer's attention (its keys and
    values cover the whole context), runs in full. On the benchmark's 4-layer model this is ~17% of
    a training step; the rewards and gradients are the same (tested). It is skipped (all positions
    computed) when the backbone has no ``layers[-1].mlp``, when the last layer is recomputed in the
    backward pass (HF gradient checkpointing, torch's ``checkpoint_wrapper`` as used by FSDP
    activation checkpointing: the recomputation would run the MLP on every position), when the
    MLP's linears are quantised (their scales depend on the rows they see), or when a position
    repeats (its MLP gradient would count twice).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.last_mlp_rows: int | None = None
        """Rows the last MLP computed in the latest forward when it skipped the others, else None
        (read by :class:`alignkit.train.flops.FlopCounter` to count only the FLOPs computed)."""

    def forward(self, input_ids: Tensor, attention_mask=None, position_ids=None, positions: Tensor | None = None) -> Tensor:
        backbone = scalar_head_backbone(self)
        if positions is not None:
            positions = positions.to(input_ids.device)
        with _last_mlp_only_at(backbone, positions) as skip:
            self.last_mlp_rows = None if skip.mlp is None else int(positions.numel())
            hidden = backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state  # (B, T, H)
        if positions is not None:
            hidden = hidden.flatten(0, 1)[positions]  # (N, H)
        # With peft the head is a `modules_to_save` wrapper at the same attribute, so this call
        # runs (and trains) the adapter's copy of the head.
        return _unwrap(self.model).score(hidden).squeeze(-1).float()  # (B, T), or (N,) with positions


_QUANTISED = re.compile(r"8bit|4bit|fp8|quant|int8|int4", re.IGNORECASE)


def last_mlp(backbone) -> torch.nn.Module | None:
    """The MLP of a decoder backbone's last layer (``layers[-1].mlp``), or None."""
    layers = getattr(backbone, "layers", None)
    return getattr(layers[-1], "mlp", None) if layers is not None and len(layers) else None


def scalar_head_backbone(head: "ScalarHead"):
    """The transformer body under a ScalarHead (through a peft wrapper)."""
    base = _unwrap(head.model)
    return getattr(base, base.base_model_prefix)


class _last_mlp_only_at:
    """Context manager: the backbone's last MLP computes only the rows ``positions`` of its
    ``(B, T, H)`` input; its output is zero elsewhere (see :class:`ScalarHead`)."""

    def __init__(self, backbone, positions: Tensor | None):
        mlp = last_mlp(backbone)
        usable = positions is not None and mlp is not None
        if usable:
            last = backbone.layers[-1]
            # Recomputation in the backward pass (HF checkpointing sets the layer's own flag in
            # transformers 5, the backbone's before; torch's checkpoint_wrapper, used by
            # accelerate's FSDP activation checkpointing, wraps the layer) would run the MLP on
            # every row after the hooks are gone. Quantised linears scale by what they see.
            recomputed = any(getattr(m, "gradient_checkpointing", False) for m in (backbone, last)) or any(
                hasattr(m, "_checkpoint_wrapped_module") for m in last.modules())
            quantised = any(_QUANTISED.search(type(m).__name__) for m in mlp.modules())
            # A repeated position would count the last MLP's gradient once per copy.
            repeated = positions.unique().numel() != positions.numel()
            usable = not (recomputed or quantised or repeated)
        self.mlp = mlp if usable else None
        self.positions, self.handles = positions, []

    def _gather(self, module, args, kwargs):
        if args:
            x, rest = args[0], args[1:]
        else:  # called as mlp(hidden_states=...)
            x, rest = kwargs.pop("hidden_states"), ()
        self.full = x.shape  # (B, T, H)
        return (x.reshape(-1, x.shape[-1])[self.positions][None], *rest), kwargs  # (1, N, H)

    def _scatter(self, module, args, out):
        y = out[0] if isinstance(out, tuple) else out  # (1, N, H); MoE blocks also return router logits
        full = y.new_zeros(self.full[0] * self.full[1], y.shape[-1]).index_copy(0, self.positions, y[0])
        full = full.view(*self.full[:-1], y.shape[-1])  # (B, T, H), zero outside the positions
        return (full, *out[1:]) if isinstance(out, tuple) else full

    def __enter__(self):
        if self.mlp is not None:
            self.handles = [self.mlp.register_forward_pre_hook(self._gather, with_kwargs=True),
                            self.mlp.register_forward_hook(self._scatter)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


def head_outputs(head: torch.nn.Module, batch: dict) -> Tensor:
    """Scalar head output at every position, ``(B, T)`` (the values of a value model)."""
    return head(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token in each right-padded row, ``(B,)``."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def sequence_rewards(head: torch.nn.Module, batch: dict, ends: Tensor | None = None) -> Tensor:
    """Raw reward r(x, y): the scalar head at the last token of each sequence.

    For padded batches the last token comes from ``attention_mask``; for packed rows pass
    ``ends`` (flat indices into the ``(R·T)`` positions of each sequence's last token). Returns
    ``(N,)`` where N is the number of sequences. Only those positions go through the head (and
    the last layer's MLP, see :class:`ScalarHead`).
    """
    if ends is None:
        mask = batch["attention_mask"]  # (B, T)
        rows = torch.arange(mask.shape[0], device=mask.device)
        ends = rows * mask.shape[1] + last_token_index(mask)  # (B,) flat
    return head(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"), positions=ends)


def check_reward_convention(model, where: str = "the reward model") -> None:
    """Refuse a reward model saved by an older alignkit that calibrated at read time.

    Such a model's ``config.json`` holds ``reward_offset`` (subtracted) and ``reward_scale``
    (multiplied) that plain ``transformers`` ignores, so it would score differently inside and
    outside alignkit. Models saved now are centred in training and have the scale folded into
    the head (:func:`alignkit.train.rm.save_reward_model`), so the raw head output is the score.
    A bias-free head cannot absorb an offset, hence a refusal rather than a silent fold."""
    cfg = _unwrap(model.model if isinstance(model, ScalarHead) else model).config
    offset, scale = float(getattr(cfg, "reward_offset", 0.0) or 0.0), float(getattr(cfg, "reward_scale", 1.0) or 1.0)
    if offset != 0.0 or scale != 1.0:
        raise ValueError(
            f"{where} was saved by an older alignkit that scored (raw - reward_offset) * reward_scale with "
            f"reward_offset={offset:g}, reward_scale={scale:g} from config.json; plain transformers ignores both, so "
            "the model would score differently outside alignkit. Retrain it with `alignkit rm` (rewards are now "
            "centred in training, see center_rewards_coefficient, and the scale is folded into the head), or delete "
            "reward_offset and reward_scale from its config.json to use its raw scores"
            + (f" (shifted by {offset:+g} from the old ones)." if offset else "."))
