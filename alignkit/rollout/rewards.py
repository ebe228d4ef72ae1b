"""Reward sources: anything that maps (prompt, response) pairs to scores.

One small interface, :class:`RewardSource`: ``source(prompts, responses) -> Tensor (N,)`` where a
prompt is a list of chat messages and a response a string. Trainers and evaluators take any
source and never ask which kind it is:

- :class:`RewardModel`: a trained scalar-head model (``alignkit rm``): the head at the last token
  of the conversation its chat template renders, the same number plain ``transformers`` gives;
- :class:`FunctionReward`: any Python function ``f(prompt, response) -> float``;
- :class:`BatchFunctionReward`: a batched function ``f(prompts, responses) -> N floats`` (what a
  plain callable becomes, :func:`as_reward`), its output checked for count and finiteness;
- :class:`WeightedSum`: Σ_i w_i · r_i(x, y);
- :class:`SafetyGated`: Llama 2's gating (§3.2.2, eq. 4): use the safety score when the prompt
  is flagged unsafe or the safety score is below a threshold, else the helpfulness score;
- :class:`Whitened` and :class:`Clipped`: normalise or bound any source's scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Messages = list[dict]


class RewardSource:
    """Base class: call with parallel lists of prompts (chat messages) and responses."""

    name: str = "reward"

    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str]) -> Tensor:
        raise NotImplementedError

    def _check(self, prompts, responses) -> None:
        if len(prompts) != len(responses):
            raise ValueError(f"{self.name}: {len(prompts)} prompts but {len(responses)} responses")


class FunctionReward(RewardSource):
    """Wraps ``fn(prompt_messages, response) -> float``."""

    def __init__(self, fn: Callable[[Messages, str], float], name: str = "function"):
        self.fn, self.name = fn, name

    def __call__(self, prompts, responses):
        self._check(prompts, responses)
        return torch.tensor([float(self.fn(p, r)) for p, r in zip(prompts, responses)], dtype=torch.float32)


def check_scores(scores, n: int, name: str, responses: Sequence[str] | None = None, finite: bool = True) -> Tensor:
    """``scores`` as a float32 tensor (N,), refused with a clear error when it does not hold exactly
    one number per response (a wrong count would pair scores with the wrong responses) or, with
    ``finite``, when one is NaN or infinite (a Python reward's bug, named at once rather than
    trained on)."""
    try:
        t = torch.as_tensor(scores if torch.is_tensor(scores) else [float(x) for x in scores], dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward {name!r}: must return one number per response (a list, array or tensor of "
                         f"{n} floats); got {type(scores).__name__} ({e})") from None
    t = t.detach().float().cpu()
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"reward {name!r}: returned {tuple(t.shape)} scores for {n} responses; a batched reward "
                         "f(prompts, responses) must return one number per response, in order")
    bad = (~torch.isfinite(t)).nonzero().flatten().tolist() if finite else []
    if bad:
        i = bad[0]
        what = f" (response {i}: {responses[i][:60]!r})" if responses is not None else ""
        raise ValueError(f"reward {name!r}: {len(bad)} of {n} scores are not finite, e.g. {float(t[i])} at index "
                         f"{i}{what}; return finite numbers (clip or replace NaN/inf inside the reward)")
    return t


class BatchFunctionReward(RewardSource):
    """Wraps a batched ``fn(prompts, responses) -> sequence of N floats`` (prompts as chat
    messages, responses as strings); the result is checked (:func:`check_scores`)."""

    def __init__(self, fn: Callable[[Sequence[Messages], Sequence[str]], Sequence[float]], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")

    def __call__(self, prompts, responses):
        self._check(prompts, responses)
        return check_scores(self.fn(list(prompts), list(responses)), len(responses), self.name, responses)


def as_reward(reward) -> RewardSource:
    """A :class:`RewardSource` as it is; a plain callable as a batched function reward
    (:class:`BatchFunctionReward`): ``reward(prompts, responses) -> N floats``."""
    if isinstance(reward, RewardSource):
        return reward
    if callable(reward):
        return BatchFunctionReward(reward)
    raise TypeError(f"a reward must be a RewardSource or a callable f(prompts, responses) -> scores; got "
                    f"{type(reward).__name__}")


class RewardModel(RewardSource):
    """A saved scalar-head reward model. The score of (prompt, response) is the head's output at
    the last token of ``prompt + [assistant response]`` as the model's chat template renders it
    (end of turn and trailer included), truncated as the training data was: exactly what
    ``AutoModelForSequenceClassification`` returns on ``tokenizer.apply_chat_template(...)``
    text (docs/templates.md). Models of older alignkit versions that calibrated at read time are
    refused (:func:`~alignkit.models.heads.check_reward_convention`)."""

    def __init__(self, path_or_head, tokenizer=None, name: str = "reward_model", batch_size: int = 32,
                 max_length: int = 512, max_prompt_length: int = 384, device: str | torch.device = "cpu"):
        from alignkit.config import ModelConfig
        from alignkit.models.heads import ScalarHead, check_reward_convention
        from alignkit.models.loading import load_reward_model, load_tokenizer

        if isinstance(path_or_head, str):  # refused unless it is a trained reward model
            self.head = ScalarHead(load_reward_model(ModelConfig(path=path_or_head), role=f"the reward model {name!r}"))
            self.tokenizer = tokenizer or load_tokenizer(path_or_head)
        else:
            self.head, self.tokenizer = path_or_head, tokenizer
        check_reward_convention(self.head, str(path_or_head) if isinstance(path_or_head, str) else name)
        self.head.to(device).eval()
        self.device = device
        self.name, self.batch_size = name, batch_size
        self.max_length, self.max_prompt_length = max_length, max_prompt_length

    @torch.no_grad()
    def __call__(self, prompts, responses):
        from alignkit.data import RatedExample, tokenize_records
        from alignkit.models.scoring import score_sequences

        self._check(prompts, responses)
        records = [RatedExample(prompt=list(p), response=r, score=0.0) for p, r in zip(prompts, responses)]
        items, _ = tokenize_records(records, self.tokenizer, max_length=self.max_length,
                                    max_prompt_length=self.max_prompt_length)
        # length-sorted batches; responses to one prompt (a GRPO group, rejection sampling's N, a
        # file of several answers per question) share one row where exact and cheaper
        return score_sequences(self.head, items, self.tokenizer.pad_token_id, self.batch_size)


class WeightedSum(RewardSource):
    """r(x, y) = Σ_i w_i · r_i(x, y)."""

    def __init__(self, sources: Sequence[tuple[RewardSource, float]], name: str = "weighted_sum"):
        if not sources:
            raise ValueError("WeightedSum needs at least one (source, weight)")
        self.sources, self.name = [(as_reward(src), w) for src, w in sources], name  # callables too

    def __call__(self, prompts, responses):
        self._check(prompts, responses)
        return sum(w * s(prompts, responses) for s, w in self.sources)


class SafetyGated(RewardSource):
    """Llama 2's combination of a helpfulness and a safety reward (Touvron et al. 2023, eq. 4):

        R_c(g | p) = R_s(g | p)   if is_safety(p) or R_s(g | p) < threshold
                     R_h(g | p)   otherwise

    ``is_unsafe_prompt(prompt_messages) -> bool`` flags prompts known to be adversarial (in Llama 2,
    from the prompt set's safety tags); without it only the threshold gates.
    """

    def __init__(self, helpfulness: RewardSource, safety: RewardSource, threshold: float = 0.15,
                 is_unsafe_prompt: Callable[[Messages], bool] | None = None, name: str = "safety_gated"):
        self.helpfulness, self.safety, self.threshold = helpfulness, safety, threshold
        self.is_unsafe_prompt, self.name = is_unsafe_prompt, name

    def __call__(self, prompts, responses):
        self._check(prompts, responses)
        r_h = self.helpfulness(prompts, responses)
        r_s = self.safety(prompts, responses)
        flagged = torch.tensor([bool(self.is_unsafe_prompt(p)) if self.is_unsafe_prompt else False for p in prompts])
        use_safety = flagged | (r_s < self.threshold)
        return torch.where(use_safety, r_s, r_h)


class Whitened(RewardSource):
    """(r − μ) / σ with μ, σ fixed from a calibration set (``fit``) or passed in."""

    def __init__(self, source: RewardSource, mean: float = 0.0, std: float = 1.0, name: str | None = None):
        self.source, self.mean, self.std = source, mean, std
        self.name = name or f"whitened({source.name})"

    def fit(self, prompts, responses) -> Whitened:
        r = self.source(prompts, responses)
        self.mean, self.std = float(r.mean()), float(r.std().clamp_min(1e-6)) if len(r) > 1 else 1.0
        return self

    def __call__(self, prompts, responses):
        return (self.source(prompts, responses) - self.mean) / self.std


class Clipped(RewardSource):
    """Scores clamped to [low, high], a guard against reward-model outliers in RL."""

    def __init__(self, source: RewardSource, low: float = -10.0, high: float = 10.0):
        self.source, self.low, self.high = source, low, high
        self.name = f"clipped({source.name})"

    def __call__(self, prompts, responses):
        return self.source(prompts, responses).clamp(self.low, self.high)
