"""Forward passes that every trainer shares: per-token log-probs of a causal LM, and the scalar
head's outputs (rewards at the last token, values at every token) of a reward/value model.

They accept both padded batches (2-D ``attention_mask``) and packed padding-free rows (4-D
block-diagonal mask plus ``position_ids``), so trainers don't care which one the collator made.
"""

from __future__ import annotations

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
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask=None, position_ids=None) -> Tensor:
        base = _unwrap(self.model)
        backbone = getattr(base, base.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
        # With peft the head is a `modules_to_save` wrapper at the same attribute, so this call
        # runs (and trains) the adapter's copy of the head.
        return base.score(hidden).squeeze(-1).float()  # (B, T)


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
    ``ends`` (flat indices into the row of each sequence's last token). Returns ``(N,)`` where N
    is the number of sequences.
    """
    values = head_outputs(head, batch)  # (B, T)
    if ends is not None:
        return values.reshape(-1)[ends]  # packed: one flat row
    idx = last_token_index(batch["attention_mask"])
    return values.gather(1, idx[:, None]).squeeze(1)  # (B,)


def reward_calibration(model) -> tuple[float, float]:
    """``(offset, scale)`` stored in a reward model's config by ``alignkit rm``: the reported
    reward is ``(raw - offset) * scale`` so that a trained model scores around 0."""
    cfg = _unwrap(model.model if isinstance(model, ScalarHead) else model).config
    return float(getattr(cfg, "reward_offset", 0.0)), float(getattr(cfg, "reward_scale", 1.0))
