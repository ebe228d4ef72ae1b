"""alignkit: align language models with human preferences, from the command line or from Python.

::

    import alignkit

    result = alignkit.sft(model="path/or/hub-name", data=rows, output_dir="runs/sft", max_steps=100)
    result.model, result.tokenizer, result.metrics, result.output_dir

One function per method (:mod:`alignkit.api`): ``sft``, ``rm``, ``eval_rm``, ``score``, ``dpo``,
``kto``, ``ppo``, ``grpo``, ``rloo``, ``rs``, ``critic``; their config classes; :class:`Result`;
callbacks (:class:`Callback`, :class:`EarlyStopping`). Names are imported on first use, so
``import alignkit`` stays light (no torch or transformers until a method is touched).
"""

from __future__ import annotations

import importlib

#: public name -> module that defines it
_EXPORTS = {
    **{name: "alignkit.api" for name in ("sft", "rm", "eval_rm", "score", "dpo", "kto", "ppo", "grpo", "rloo", "rs",
                                         "critic", "Result")},
    "Callback": "alignkit.train.callbacks", "EarlyStopping": "alignkit.train.callbacks", "STOP": "alignkit.train.callbacks",
    "SFTConfig": "alignkit.train.sft", "RMConfig": "alignkit.train.rm", "EvalRMConfig": "alignkit.train.evaluate_rm",
    "ScoreConfig": "alignkit.train.evaluate_rm", "DPOConfig": "alignkit.train.dpo", "KTOConfig": "alignkit.train.kto",
    "PPOConfig": "alignkit.train.ppo", "GRPOConfig": "alignkit.train.grpo", "RLOOConfig": "alignkit.train.grpo",
    "RSConfig": "alignkit.train.rejection_sampling", "CriticConfig": "alignkit.train.critic",
    "ModelConfig": "alignkit.config", "DataConfig": "alignkit.config", "OptimConfig": "alignkit.config",
    "RunConfig": "alignkit.config",
    "RewardSource": "alignkit.rollout.rewards", "RewardModel": "alignkit.rollout.rewards",
    "FunctionReward": "alignkit.rollout.rewards", "WeightedSum": "alignkit.rollout.rewards",
    "SafetyGated": "alignkit.rollout.rewards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        # Submodules (alignkit.train, alignkit.data, ...) still import as usual.
        raise AttributeError(f"module 'alignkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cached: the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
