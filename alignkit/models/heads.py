"""Forward passes that every trainer shares: per-token log-probs of a causal LM, and the scalar
head's outputs (rewards at the last token, values at every token) of a reward/value model.

Log-probs are read at the label positions only, from the last hidden states through the output
head in chunks (no ``(B, T, V)`` logits: :mod:`alignkit.linear_logps`), or from the model's full
logits where the head cannot be split off or ``run.logps_path=full``
(:mod:`alignkit.models.output_head` says which and why).

They accept padded batches (2-D ``attention_mask``), packed padding-free rows (``position_ids``
restarting per sequence, no mask) and prefix-shared rows (a 4-D bool layout), so trainers don't
care which one the collator made: :func:`alignkit.models.masks.attention_inputs` turns the layout
into what the model's attention implementation takes.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import Tensor

from alignkit.models.masks import attention_inputs, pools_sequences, unwrap
from alignkit.models.output_head import logps_path, output_head
from alignkit.ops import entropy_from_logits, token_logps


def _unwrap(model):
    """The transformers model under a peft wrapper (for attribute access only)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def causal_lm(model):
    """The causal LM whose output head gives π: ``model`` itself (under DDP/peft wrappers), or
    what its ``causal_lm()`` names when it is a module around one that returns its logits
    (PPO's actor-critic)."""
    inner = unwrap(model)
    return inner.causal_lm() if hasattr(inner, "causal_lm") else inner


def lm_forward(model, batch: dict, **kwargs):
    """``model``'s output on a batch of any layout (padded, packed or prefix-shared)."""
    return model(input_ids=batch["input_ids"], **attention_inputs(model, batch), use_cache=False, **kwargs)


class PositionLogps(NamedTuple):
    """What :func:`position_logps` returns."""

    logps: Tensor
    """(N,) log π(y_n | context of position n), at the temperature asked for."""
    entropy: Tensor | None
    """(N,) entropy of π(· | context of position n) at that temperature, or None."""
    output: object
    """The model's own output (on the chunked path its ``logits`` are empty, ``(B, 0, V)``)."""


class _head_input:
    """Context manager: while the whole model runs (so wrappers such as peft and DDP see the call
    they expect, and synchronise gradients), catch what its output head receives, the last hidden
    states ``(B, T, H)``, and pass the head an empty slice ``(B, 0, H)`` instead: the model then
    computes no logits at all (its output's ``logits`` are ``(B, 0, V)``)."""

    def __init__(self, lm):
        self.head, self.hidden = lm.get_output_embeddings(), None

    def _catch(self, module, args):
        self.hidden = args[0]
        return (args[0][..., :0, :], *args[1:])  # (B, 0, H)

    def __enter__(self):
        self.handle = self.head.register_forward_pre_hook(self._catch)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def position_logps(model, batch: dict, index: Tensor, targets: Tensor, *, temperature: float = 1.0,
                   entropy: bool = False, entropy_grad: bool = True, lm=None, **forward_kwargs) -> PositionLogps:
    """log π of ``targets (N,)``, each predicted at a position ``index (N,)`` (flat indices into
    the ``(B·T)`` positions of ``batch``, any layout), optionally divided by a sampling
    ``temperature`` and with the entropy of each position's distribution.

    One forward of ``model``. On the chunked path (:func:`alignkit.models.output_head.logps_path`)
    the head runs on the N positions only, chunk by chunk, and no ``(B, T, V)`` logits exist; on
    the full path the model's logits are read at those positions. Both give the same numbers and
    gradients up to float rounding (tests/test_linear_logps.py).

    ``lm``: the causal LM inside ``model`` whose output head makes the log-probs; by default
    :func:`causal_lm` of ``model``. ``entropy_grad=False``: the entropy is a metric only, returned detached
    (on the full path a differentiable one would keep an ``(N, V)`` softmax for backward; on
    the chunked path it costs nothing either way).
    """
    lm = causal_lm(model) if lm is None else unwrap(lm)
    path, _ = logps_path(model, lm)
    if path == "chunked":
        with _head_input(lm) as caught:
            out = lm_forward(model, batch, **forward_kwargs)
        hidden = caught.hidden.flatten(0, 1)[index]  # (N, H) the rows that predict a target
        logps, ent = output_head(lm).logps(hidden, targets, temperature, entropy)
        if torch.is_grad_enabled():
            lm.last_head_rows = int(index.numel())
        return PositionLogps(logps, ent if ent is None or entropy_grad else ent.detach(), out)
    out = lm_forward(model, batch, **forward_kwargs)
    logits = out.logits.flatten(0, 1)[index]  # (N, V)
    if temperature != 1.0:
        logits = logits / temperature
    ent = None
    if entropy:
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            ent = entropy_from_logits(logits[None])[0]  # (N,)
    if torch.is_grad_enabled():
        lm.last_head_rows = None
    return PositionLogps(token_logps(logits[None], targets[None])[0], ent, out)


def forward_logps(model, batch: dict) -> tuple[Tensor, Tensor]:
    """Per-token log π(y_t | y_<t) of the label tokens.

    Returns ``(logps, mask)``, both ``(B, T-1)``: position t scores token t+1; mask is 1 where a
    label exists (response tokens; -100 labels are prompt or padding), and logps is 0 elsewhere
    (those positions are not computed).
    """
    labels = batch["labels"][:, 1:]  # (B, T-1): the token each position predicts
    mask = labels != -100
    rows, cols = mask.nonzero(as_tuple=True)  # (N,) each, row-major: the order of labels[mask]
    index = rows * batch["input_ids"].shape[1] + cols  # (N,) flat into the (B·T) positions
    logps = position_logps(model, batch, index, labels[mask]).logps  # (N,)
    return logps.new_zeros(mask.shape).index_put((rows, cols), logps), mask  # (B, T-1)


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

    An encoder (BERT, DeBERTa: a ``classifier`` on the pooled first token, no ``score`` head) has
    one score per sequence, not one per position: its reward is its own classification forward
    on padded rows, and ``per_token=True`` (a value model) refuses it.
    """

    def __init__(self, model, per_token: bool = False):
        super().__init__()
        self.model = model
        self.pooled = pools_sequences(_unwrap(model))
        """The model pools each whole sequence into one score (an encoder: BERT, DeBERTa read the
        [CLS] token through a pooler and a ``classifier``): its reward is the model's own
        classification forward, and it has no value per position."""
        if per_token and self.pooled:
            raise ValueError(f"{type(_unwrap(model)).__name__} is an encoder that scores whole sequences; a value "
                             "model needs a value at every position, i.e. a causal decoder: use a decoder model")
        self.last_mlp_rows: int | None = None
        """Rows the last MLP computed in the latest forward when it skipped the others, else None
        (read by :class:`alignkit.train.flops.FlopCounter` to count only the FLOPs computed)."""

    def forward(self, input_ids: Tensor, attention_mask=None, position_ids=None, positions: Tensor | None = None) -> Tensor:
        if self.pooled:
            return self._sequence_scores(input_ids, attention_mask, position_ids, positions)
        backbone = scalar_head_backbone(self)
        if positions is not None:
            positions = positions.to(input_ids.device)
        layout = attention_inputs(backbone, {"attention_mask": attention_mask, "position_ids": position_ids})
        with _last_mlp_only_at(backbone, positions) as skip:
            self.last_mlp_rows = None if skip.mlp is None else int(positions.numel())
            hidden = backbone(input_ids=input_ids, **layout, use_cache=False).last_hidden_state  # (B, T, H)
        if positions is not None:
            hidden = hidden.flatten(0, 1)[positions]  # (N, H)
        # With peft the head is a `modules_to_save` wrapper at the same attribute, so this call
        # runs (and trains) the adapter's copy of the head.
        return _unwrap(self.model).score(hidden).squeeze(-1).float()  # (B, T), or (N,) with positions

    def _sequence_scores(self, input_ids: Tensor, attention_mask, position_ids, positions) -> Tensor:
        """An encoder's score of each padded row, ``(B,)``: exactly what its
        ``*ForSequenceClassification`` forward returns (pooler and classifier included)."""
        name = type(_unwrap(self.model)).__name__
        if attention_mask is None or attention_mask.dim() != 2 or position_ids is not None:
            raise ValueError(f"{name} is an encoder: every token sees the whole row, so sequences cannot be packed "
                             "or share a prompt; it takes padded batches only (batching=padded)")
        B, T = input_ids.shape
        rows = torch.arange(B, device=input_ids.device)
        if positions is None or not torch.equal(positions.to(input_ids.device).div(T, rounding_mode="floor"), rows):
            raise ValueError(f"{name} is an encoder: it gives one score per sequence (its pooled first token), "
                             "not a value at every position; read it with sequence_rewards")
        self.last_mlp_rows = None
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()  # (B,)


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
    """Raw reward r(x, y): the scalar head at the last token of each sequence (an encoder: its
    pooled score of the row, see :class:`ScalarHead`).

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
