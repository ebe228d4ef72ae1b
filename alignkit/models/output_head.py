"""Which causal LMs can have their output head split off, so that log-probs are computed from the
last hidden states in chunks (:func:`alignkit.linear_logps.linear_logps`) instead of from the full
``(B, T, V)`` logits, and the choice between the two paths (``run.logps_path``).

The chunked path needs to know exactly how the model makes logits from its last hidden state h.
Each family listed in :data:`HEADS` computes ``transform(lm_head(h))`` with ``lm_head`` a plain
``torch.nn.Linear`` (with or without bias, tied to the input embedding or not) and ``transform``
one of: nothing, Gemma 2/3's final soft-cap ``c·tanh(z/c)``, Cohere's ``z·logit_scale``,
Granite's ``z/logits_scaling`` (read from each ``*ForCausalLM.forward`` of transformers 5). The
path is chunked only when every rule of :func:`head_refusal` holds; otherwise it is the full
logits, and the reason is printed at start-up:

======================================  =====================================================
the model                               why its head cannot be split off
======================================  =====================================================
a family not in :data:`HEADS`           its final-logit transform is unknown (a scale, a cap,
                                        a second projection...): not guessed
head not exactly ``torch.nn.Linear``    LoRA or ``modules_to_save`` on ``lm_head``, a
                                        bitsandbytes / quantised linear: their forward is not
                                        ``h Wᵀ + b`` of a readable weight
weight not a whole dense float tensor   quantised tensor subclasses (torchao), sharded
                                        (FSDP's DTensor or flat parameters, DeepSpeed ZeRO-3
                                        partitions): the weight does not exist outside the
                                        model's own forward
model wrapped by FSDP                   parameters are gathered only inside the wrapped forward
======================================  =====================================================

Every family of the table is tested equal to the full-logits path, values and gradients
(tests/test_linear_logps.py; tests/test_conformance.py runs the trainers' losses through it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.linear_logps import LinearLogps, linear_logps
from alignkit.models.masks import unwrap


@dataclass(frozen=True)
class HeadRule:
    """What a family's ``*ForCausalLM.forward`` does to ``lm_head(h)``: names of config fields
    (a field that is None in the config means no such step)."""

    softcap: str | None = None
    """Field holding c of a final soft-cap c·tanh(z/c) (Gemma 2's ``final_logit_softcapping``)."""
    scale: str | None = None
    """Field the logits are multiplied by (Cohere's ``logit_scale``)."""
    divide: str | None = None
    """Field the logits are divided by (Granite's ``logits_scaling``)."""


_PLAIN = HeadRule()
#: Causal-LM families (``config.model_type``) whose logits are a known transform of a linear head.
#: Add one after tests/test_linear_logps.py passes for it.
HEADS: dict[str, HeadRule] = {
    "llama": _PLAIN, "mistral": _PLAIN, "qwen2": _PLAIN, "qwen3": _PLAIN, "gemma": _PLAIN, "phi3": _PLAIN,
    "gpt2": _PLAIN, "gpt_neox": _PLAIN, "opt": _PLAIN,
    "phi": _PLAIN,  # its lm_head has a bias
    "gemma2": HeadRule(softcap="final_logit_softcapping"),
    "gemma3_text": HeadRule(softcap="final_logit_softcapping"),
    "cohere": HeadRule(scale="logit_scale"),
    "granite": HeadRule(divide="logits_scaling"),
}

#: ``run.logps_path`` values: auto (chunked where :func:`head_refusal` allows, else full), or forced.
LOGPS_PATHS = ("auto", "chunked", "full")
_OPTION = "alignkit_logps_path"  # attribute of the transformers model holding its run.logps_path
_ANNOUNCED = "alignkit_logps_announced"  # the path set_logps_path printed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output head, split off: logits = scale · softcap(h Wᵀ + b)."""

    weight: Tensor
    """(V, H) the unembedding (the input embedding's parameter when tied)."""
    bias: Tensor | None
    """(V,) or None."""
    softcap: float | None
    """c of the final soft-cap, or None."""
    scale: float
    """Factor on the (capped) logits."""

    def logps(self, hidden: Tensor, targets: Tensor, temperature: float = 1.0, entropy: bool = False) -> LinearLogps:
        """log π(targets) (and the entropy) of the rows ``hidden (N, H)`` at ``temperature``."""
        return linear_logps(hidden, self.weight, targets, self.bias, softcap=self.softcap, scale=self.scale,
                            temperature=temperature, entropy=entropy)


def _sharded(model) -> bool:
    """Wrapped by FSDP (FSDP1 module wrappers, or FSDP2's ``FSDP<Class>`` modules)."""
    return any(type(m).__name__ == "FullyShardedDataParallel" or type(m).__name__.startswith("FSDP")
               for m in model.modules())


def head_refusal(model, lm=None) -> str | None:
    """Why ``model``'s output head cannot be split off for the chunked log-probs; None when it can
    (rules in the module docstring). ``lm``: the causal LM inside ``model`` whose head is meant,
    when ``model`` is a module around it (PPO's actor-critic); default ``unwrap(model)``."""
    lm = unwrap(model) if lm is None else lm
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", "?")
    if model_type not in HEADS:
        return (f"model_type {model_type!r} is not among the families whose final logits are known and tested "
                f"({', '.join(sorted(HEADS))})")
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return (f"its output head is a {type(head).__module__}.{type(head).__name__}, not a plain torch.nn.Linear "
                "(LoRA or modules_to_save on the head, or a quantised head)")
    w = head.weight
    if (type(w.data) is not torch.Tensor or not w.is_floating_point() or w.dim() != 2 or w.numel() == 0
            or hasattr(w, "ds_id")):
        return (f"its output head's weight ({type(w.data).__name__} {w.dtype} {tuple(w.shape)}) is quantised or "
                "sharded (FSDP, DeepSpeed ZeRO-3): it exists whole only inside the model's own forward")
    if _sharded(model):
        return "it is wrapped by FSDP: its weights are gathered only inside the wrapped forward"
    return None


def output_head(model) -> OutputHead:
    """``model``'s output head (call after :func:`head_refusal` returned None)."""
    lm = unwrap(model)
    rule, config = HEADS[lm.config.model_type], lm.config
    head = lm.get_output_embeddings()
    softcap = getattr(config, rule.softcap, None) if rule.softcap else None
    scale = float(getattr(config, rule.scale, None) or 1.0) if rule.scale else 1.0
    if rule.divide:
        scale /= float(getattr(config, rule.divide, None) or 1.0)
    return OutputHead(head.weight, head.bias, None if softcap is None else float(softcap), scale)


def set_logps_path(model, option: str) -> str:
    """Use ``option`` (``run.logps_path``: auto, chunked, full) for ``model``'s log-probs from now
    on (copies of the model made later, such as a frozen reference, keep it). Returns the line
    the trainers print: the path taken and why. ``chunked`` on a model that cannot take it raises."""
    if option not in LOGPS_PATHS:
        raise ValueError(f"run.logps_path must be one of {', '.join(LOGPS_PATHS)}; got {option!r}")
    setattr(unwrap(model), _OPTION, option)
    path, why = logps_path(model)
    setattr(unwrap(model), _ANNOUNCED, path)
    return f"log-probs: {path} ({why})"


def logps_path(model, lm=None) -> tuple[str, str]:
    """(``"chunked"`` or ``"full"``, why) for ``model`` now, under its ``run.logps_path``
    (auto when never set). Checked at every forward, so a model wrapped after start-up (FSDP)
    falls back; a forced ``chunked`` that cannot be served raises instead. ``lm``: the causal LM
    inside ``model`` (see :func:`head_refusal`)."""
    lm = unwrap(model) if lm is None else lm
    option = getattr(lm, _OPTION, "auto")
    if option == "full":
        return "full", "run.logps_path=full: the (B, T, V) logits are materialised"
    reason = head_refusal(model, lm)
    if reason is None:
        head = lm.get_output_embeddings().weight
        return "chunked", (f"from the last hidden states through the {head.shape[0]} × {head.shape[1]} output head "
                           "in chunks; no (B, T, V) logits are held")
    if option == "chunked":
        raise ValueError(f"run.logps_path=chunked cannot be served: {reason}; use run.logps_path=auto or full")
    why = f"the output head cannot be split off: {reason}"
    if getattr(lm, _ANNOUNCED, None) == "chunked":  # e.g. FSDP wrapped it after start-up
        log.warning("log-probs: full from now on, not chunked as announced (%s)", why)
        setattr(lm, _ANNOUNCED, "full")
    return "full", why
