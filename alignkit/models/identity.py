"""What a model directory is, and the mark that makes it a reward model.

``alignkit rm`` writes ``config.alignkit = {"kind": "reward_model", "head": "trained", ...}`` into
the ``config.json`` it saves. Every command that scores with a reward or cost model (ppo, grpo,
rloo, rs, eval-rm, score, iterate) checks its directory first and refuses one that is not a
reward model, saying what it is instead: without the check a causal LM given as a reward model
gets a freshly initialised random head, and training "succeeds" against noise.

A directory counts as a reward model when it carries the mark, or when it is a one-output
``*ForSequenceClassification`` model from elsewhere (e.g. a reward model from the hub) whose
checkpoint holds its head: the loader then also refuses any load that would initialise head
weights at random (see :func:`alignkit.models.loading.load_reward_model`).
"""

from __future__ import annotations

from alignkit.models.errors import ModelLoadError

REWARD_MODEL = "reward_model"


def reward_model_marker(**details) -> dict:
    """``extra_config`` for :func:`~alignkit.models.loading.save_model` that marks a trained reward model.

    ``details`` (e.g. the objective) are recorded beside the kind.
    """
    return {"alignkit": {"kind": REWARD_MODEL, "head": "trained", **details}}


def is_marked_reward_model(config: dict) -> bool:
    mark = config.get("alignkit")
    return isinstance(mark, dict) and mark.get("kind") == REWARD_MODEL


def num_labels(config: dict) -> int:
    """Outputs of a classifier config (transformers' default is 2 when nothing is recorded)."""
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def _architecture(config: dict) -> str:
    archs = config.get("architectures") or []
    return archs[0] if archs else ""


def describe(config: dict) -> str:
    """What the model of ``config`` (a ``config.json`` as a dict) is, in words, for error messages."""
    arch, kind = _architecture(config), config.get("model_type", "unknown")
    if is_marked_reward_model(config):
        return f"a reward model trained by alignkit ({arch or kind})"
    if arch.endswith("ForSequenceClassification"):
        n = num_labels(config)
        if n == 1:
            return f"a one-output sequence classifier ({arch})"
        labels = list((config.get("id2label") or {}).values())
        shown = f": {', '.join(map(str, labels[:6]))}{', ...' if len(labels) > 6 else ''}" if labels else ""
        return f"a classifier with {n} labels ({arch}{shown}), not a one-score reward model"
    if arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
        return f"a causal language model ({arch}), e.g. a base or SFT policy, with no trained reward head"
    if arch.endswith("ForMaskedLM"):
        return f"a masked language model ({arch}), an encoder with no reward head"
    if arch.endswith("Model") or not arch:
        return f"a bare {kind} backbone ({arch or 'no architectures recorded'}) with no head"
    return f"a {kind} model ({arch}) with no reward head"


def check_reward_model_config(config: dict, path: str, role: str = "a reward model") -> None:
    """Refuse ``path`` as ``role`` (e.g. "the reward model 'helpful'") unless its config marks a
    reward model or a one-output classifier."""
    if is_marked_reward_model(config):
        return
    arch = _architecture(config)
    if arch.endswith("ForSequenceClassification") and num_labels(config) == 1:
        return  # a reward model from elsewhere; the load checks that its head is in the checkpoint
    raise ModelLoadError(
        f"{path} was given as {role}, but it is {describe(config)}. Reward and cost models must be the output of "
        f"`alignkit rm` (train one from this model: `alignkit rm model.path={path} data.path=COMPARISONS`) "
        "or a one-output *ForSequenceClassification reward model.")
