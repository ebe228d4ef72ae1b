"""Switching dropout off everywhere in a model, functional dropout included.

On-policy methods compare the policy with itself: PPO's ratio ρ = π_θ/π_old is 1 at the first
update only if the forward that scored the rollout and the forward being trained are the same
function. Dropout makes them different random functions, and it hides in three places:

1. ``nn.Dropout`` modules (GPT-2's ``attn_dropout``/``resid_dropout``, peft's ``lora_dropout``);
2. plain float attributes of modules that a forward passes to a functional call: OPT's decoder
   layer runs ``nn.functional.dropout(h, p=self.dropout, training=self.training)``, and
   transformers' attention functions take ``dropout=self.attention_dropout`` (Llama, Qwen, ...);
   OPT also drops whole layers (``layerdrop``);
3. the model config, which some code reads at forward time and which is what gets saved.

:func:`disable_dropout` zeroes all three, for every family and through peft wrappers.
"""

from __future__ import annotations

import re

import torch

#: Names of dropout probabilities: ``dropout``, ``attention_dropout``, ``hidden_dropout_prob``,
#: ``classifier_dropout``, ``resid_pdrop``/``embd_pdrop``/``attn_pdrop`` (GPT-2), ``layerdrop``
#: (OPT, Whisper), ``drop_path_rate`` (stochastic depth).
DROPOUT_NAME = re.compile(r"dropout|pdrop|layerdrop|drop_path", re.IGNORECASE)


def _is_probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _zero_config(config, seen: set[int]) -> None:
    """Zero the dropout probabilities of a transformers config and of its sub-configs (text_config ...)."""
    if config is None or id(config) in seen:
        return
    seen.add(id(config))
    for name, value in list(vars(config).items()):
        if DROPOUT_NAME.search(name) and _is_probability(value):
            setattr(config, name, 0.0)
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a nested PretrainedConfig
            _zero_config(value, seen)


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability in ``model`` to 0 and return it.

    Covers dropout modules (``nn.Dropout`` and its 1d/2d/3d/alpha variants), float attributes of
    any module named like a dropout probability (read by functional dropout and the attention
    functions), and the configs of every sub-model (so a saved model records what was trained).
    Works through peft and accelerate wrappers, since it walks ``model.modules()``.
    """
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if DROPOUT_NAME.search(name) and _is_probability(value):
                setattr(module, name, 0.0)
        _zero_config(getattr(module, "config", None), seen)
    return model
