"""Held-out evaluation of an online run: the reward of the policy's responses to prompts it never
trains on (``data.eval_path``), every ``run.eval_every`` rollouts and after the last one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from alignkit.rollout.generate import make_generator
from alignkit.train.online.prompts import load_prompts
from alignkit.train.online.rewards import score_responses


def held_out_reward(cfg, tokenizer, reward, policy_of: Callable = lambda model: model) -> Callable | None:
    """``evaluate(model) -> metrics`` for :class:`~alignkit.train.online.loop.OnlineLoop`, or None
    without ``cfg.data.eval_path``. One response per held-out prompt, sampled as in training
    (``cfg.sampling``) from a fixed seed, so evaluations differ only by the policy; ``policy_of``
    picks the policy out of the trained module (PPO trains an actor-critic)."""
    if not cfg.data.eval_path:
        return None
    prompts = load_prompts(replace(cfg.data, path=cfg.data.eval_path), cfg.run.seed, tokenizer)
    seed = cfg.run.seed * 1_000_003 + 999_983  # apart from every rollout's sampling seed

    def evaluate(model) -> dict[str, float]:
        gens = make_generator(policy_of(model), tokenizer, cfg.sampling, cfg.data.max_prompt_length).generate(
            prompts, n=1, seed=seed)
        finished = torch.tensor(gens.finished, dtype=torch.bool)
        raw, scores = score_responses(reward, [prompts[i] for i in gens.prompt_index], gens.texts, finished,
                                      cfg.reward.unfinished_penalty)
        return {"reward": float(raw.mean()), "score": float(scores.mean()),
                "response_length": sum(map(len, gens.response_ids)) / len(gens.response_ids),
                "unfinished": float((~finished).float().mean())}

    return evaluate
