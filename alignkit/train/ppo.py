"""Actor-critic PPO from a reward, as in InstructGPT (Ouyang et al. 2022, §3.5; Ziegler et al. 2019).

Each rollout, top to bottom:

1. sample a response y ~ π_θ(·|x) for a batch of prompts (batched, KV cache);
2. score it: s = r(x, y) from any reward source (reward models, Python functions, combinations),
   minus a penalty if it never ended; with a cost model (Safe RLHF, Dai et al. 2024) the score is
   the Lagrangian (r − λ·c)/(1 + λ) and λ is learned so that E[c] stays below a threshold;
3. per-token reward with a KL penalty to the reference (Ziegler et al. 2019; InstructGPT eq. 2):
       r_t = −β·KL_t + [t = last]·s,   KL_t from estimator k1, k2 or k3 (logged as kl_estimator)
   with β fixed or steered to a target KL (adaptive controller); or, "PPO-penalty", β·KL_t as a
   loss term instead of in the reward;
4. advantages by GAE(γ, λ) on the critic's values V(s_t), whitened;
5. ``ppo_epochs`` passes over the rollout in minibatches, minimising per token
       L = −min(ρ_t·Â_t, clip(ρ_t, 1 ± ε)·Â_t) + c_v·½·max((V − R)², (V_clip − R)²) [+ β·KL_t]
   and, PPO-ptx, γ_ptx · NLL of a pretraining/SFT batch (reduces the "alignment tax").

Models: policy π_θ; reference π_ref (a frozen copy, or with LoRA the policy with its adapter
disabled); the reward; the critic V, either a scalar head on its own backbone ("separate",
InstructGPT initialises it from the reward model) or a head on the policy's last hidden state
("shared"). Every logged metric is defined in docs/rl.md.
"""

from __future__ import annotations

from alignkit.context import entry

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from alignkit.advantages import LagrangeMultiplier, gae, kl_penalized_rewards, lagrangian_scores
from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from alignkit.data.tokenize import stop_token_ids
from alignkit.losses import kl_penalty_loss, ppo_policy_loss, ppo_value_loss
from alignkit.models.heads import ScalarHead
from alignkit.models.loading import Reference, load_causal_lm, load_scalar_head_model, save_model
from alignkit.models.masks import unwrap
from alignkit.ops import masked_mean
from alignkit.rollout.batch import build_rollout_batch
from alignkit.rollout.generate import SamplingConfig, make_generator
from alignkit.rollout.rewards import RewardModel, RewardSource
from alignkit.train.online import (
    KL_CONTROLLERS, KLConfig, OnlineLoop, OnlineResult, RewardConfig, RolloutConfig, online_inputs, policy_forward,
    response_slice, rollout_logps, score_responses, sequence_kl, validate_online,
)
from alignkit.train.common import choose_logps_path
from alignkit.train.online.config import ONLINE_UNREAD
from alignkit.train.online.evaluate import held_out_reward


@dataclass
class PPOConfig:
    """`alignkit ppo`: actor-critic PPO on prompts against a reward (InstructGPT), with KL penalty, PPO-ptx and an optional cost constraint."""

    UNREAD = ONLINE_UNREAD  # not a field: options of the shared sections this command never reads

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to start from (usually the SFT model); with model.lora the reference is its adapter-disabled base."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts: any data file with a prompt (only the prompts are used)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, schedule="constant", warmup_ratio=0.0))
    """Optimiser; batch_size × grad_accum episodes make one minibatch (one optimizer step)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output, checkpoints (save_every counts rollouts), logging."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How responses are sampled."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward models and their combination (command line), penalty for unfinished responses."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout size, number of rollouts, PPO epochs."""
    kl: KLConfig = field(default_factory=KLConfig)
    """KL penalty to the reference."""
    gamma: float = 1.0
    """γ, the discount of GAE (1 in InstructGPT: the only reward that is not a KL term comes at the end)."""
    gae_lambda: float = 0.95
    """λ of GAE: 0 is the one-step TD advantage, 1 the Monte-Carlo return minus the value."""
    whiten_advantages: bool = True
    """Normalise the advantages of each rollout to zero mean and unit variance over response tokens."""
    clip_eps: float = 0.2
    """ε of the clipped surrogate: the ratio π_θ/π_old is clipped to [1 − ε, 1 + ε]."""
    clip_eps_value: float = 0.2
    """ε_v of value-function clipping: V moves at most ε_v from its rollout value per update (0 = no clipping)."""
    vf_coef: float = 0.1
    """c_v, the weight of the value loss in the total loss."""
    value_model: str = "separate"
    """Critic: 'separate' (a scalar head on its own backbone) or 'shared' (a head on the policy's last hidden state)."""
    value_model_path: str = ""
    """Backbone of a separate critic; empty = model.path (InstructGPT initialises it from the reward model: give its path)."""
    ptx_coef: float = 0.0
    """γ_ptx of PPO-ptx: weight of the NLL of a pretraining/SFT batch added at every optimizer step (0 = off)."""
    ptx_path: str = ""
    """SFT data (prompt/completion or messages records) for PPO-ptx; a Python caller may pass ptx_texts instead."""
    cost_model: str = ""
    """Cost model directory (a reward model scoring harm): maximise the reward subject to E[cost] ≤ cost_threshold (Safe RLHF)."""
    cost_threshold: float = 0.0
    """d, the bound on the expected cost per response."""
    lagrange_init: float = 1.0
    """Initial value of the Lagrange multiplier λ ≥ 0."""
    lagrange_lr: float = 0.05
    """Step size of λ's projected ascent: λ ← max(0, λ + lr·(mean cost − threshold)) after each rollout."""
    lagrange_max: float = 0.0
    """Upper bound on λ (0 = none)."""

    def validate(self) -> None:
        validate_online(self.optim, self.rollout)
        self.kl.validate()
        if self.value_model not in VALUE_MODELS:
            raise ValueError(f"value_model must be one of {', '.join(VALUE_MODELS)}; got {self.value_model!r}")


# ---- the critic ---------------------------------------------------------------------------------


class ActorCritic(torch.nn.Module):
    """π_θ and V as one module (one optimizer, one accelerate ``prepare``).

    ``forward`` has a causal LM's signature and returns ``.logits`` (B, L, V) and, with
    ``with_values``, ``.values`` (B, L): the critic's V at every position.
    """

    def __init__(self, policy, critic: torch.nn.Module, shared: bool):
        super().__init__()
        self.policy, self.critic, self.shared = policy, critic, shared

    def causal_lm(self):
        """The transformers causal LM of π_θ (whose output head the chunked log-probs split off)."""
        return unwrap(self.policy)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, with_values=False):
        hidden = self.shared and with_values
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False, output_hidden_states=hidden)
        values = None
        if with_values and self.shared:
            values = self.critic(out.hidden_states[-1]).squeeze(-1).float()  # (B, L, H) -> (B, L)
        elif with_values:
            values = self.critic(input_ids, attention_mask, position_ids)  # (B, L)
        return SimpleNamespace(logits=out.logits, values=values)


def separate_critic(cfg: PPOConfig, policy) -> torch.nn.Module:
    path = cfg.value_model_path or cfg.model.path
    return ScalarHead(load_scalar_head_model(replace(cfg.model, path=path)), per_token=True)


def shared_value_head(cfg: PPOConfig, policy) -> torch.nn.Module:
    head = torch.nn.Linear(policy.config.hidden_size, 1)
    torch.nn.init.zeros_(head.weight)  # V = 0 at the start: no arbitrary initial baseline
    torch.nn.init.zeros_(head.bias)
    return head


#: value_model -> (config, policy) -> critic module
VALUE_MODELS = {"separate": separate_critic, "shared": shared_value_head}


# ---- losses ---------------------------------------------------------------------------------------


def ppo_loss(model, mb, cfg: PPOConfig, loss_kl_coef: float):
    """Per-token PPO loss of a minibatch: clipped surrogate + c_v · clipped value loss [+ β·KL]."""
    mask = mb.response_mask
    logps, entropy, out = policy_forward(model, mb, cfg.sampling.temperature, entropy=True, with_values=True)
    values = response_slice(out.values, mb)  # (b, T) V(s_t)
    pg, pg_metrics = ppo_policy_loss(logps, mb.logps, mb.advantages, mask, cfg.clip_eps)
    vf, vf_metrics = ppo_value_loss(values, mb.values, mb.returns, mask, cfg.clip_eps_value or None)
    losses = pg + cfg.vf_coef * vf
    metrics = {"loss/policy": masked_mean(pg.detach(), mask), "loss/value": masked_mean(vf.detach(), mask),
               **pg_metrics, **vf_metrics}
    if loss_kl_coef > 0:  # PPO-penalty: the KL as a loss term
        kl, kl_metrics = kl_penalty_loss(logps, mb.ref_logps, mask, cfg.kl.kl_estimator)
        losses = losses + loss_kl_coef * kl
        metrics["loss/kl"] = kl_metrics["kl"]
    metrics["entropy"] = masked_mean(entropy.detach(), mask)
    return losses, metrics


def ptx_items(tokenizer, texts: list[str] | None, cfg: PPOConfig) -> list[dict]:
    """SFT items for PPO-ptx: plain texts (every token a target) or ``cfg.ptx_path`` SFT records."""
    if texts:
        from alignkit.train.sft import text_items

        return text_items(tokenizer, texts, cfg.data.max_length)
    if cfg.ptx_path:
        from alignkit.train.common import prepare_data

        data = replace(cfg.data, path=cfg.ptx_path, eval_path="", eval_fraction=0.0, eval_size=0)
        return prepare_data(data, tokenizer, cfg.run.seed, expect=("SFTExample",), name="ppo-ptx").train
    raise ValueError("ptx_coef > 0 needs ptx_path (SFT data) or ptx_texts")


def ptx_loss_fn(items: list[dict], pad_id: int, cfg: PPOConfig, device):
    """extra_loss for the update loop: γ_ptx × mean token NLL of the next ptx micro-batch."""
    from alignkit.data import collate_sft
    from alignkit.train.sft import sft_batch_loss

    rng = random.Random(cfg.run.seed)
    order: list[int] = []

    def loss(model):
        nonlocal order
        if len(order) < cfg.optim.batch_size:
            order += rng.sample(range(len(items)), len(items))  # cycle through shuffled epochs
        take, order = order[: cfg.optim.batch_size], order[cfg.optim.batch_size :]
        batch = {k: v.to(device) for k, v in collate_sft([items[i] for i in take], pad_id).items() if torch.is_tensor(v)}
        nll_sum, metrics = sft_batch_loss(model, batch)
        tokens = (batch["labels"][:, 1:] != -100).sum().clamp_min(1)
        return cfg.ptx_coef * nll_sum / tokens, {"ptx/nll": metrics["nll"]}

    return loss


# ---- the run ----------------------------------------------------------------------------------------


@entry("ppo")
def run_ppo(cfg: PPOConfig, prompts: list[list[dict]] | None = None, reward: RewardSource | None = None,
            cost: RewardSource | None = None, ptx_texts: list[str] | None = None) -> OnlineResult:
    """Train ``cfg.model.path`` with PPO; save the policy (plain HF directory) to ``cfg.run.output_dir``.

    ``prompts`` (chat messages), ``reward`` and ``cost`` (any RewardSource) and ``ptx_texts`` may be
    passed in Python; otherwise they come from ``cfg.data.path``, ``cfg.reward``, ``cfg.cost_model``
    and ``cfg.ptx_path``.
    """
    tokenizer, prompts, reward = online_inputs(cfg, prompts, reward)
    if cost is None and cfg.cost_model:
        cost = RewardModel(cfg.cost_model, name="cost", max_length=cfg.data.max_length,
                           max_prompt_length=cfg.data.max_prompt_length)
    lagrange = None
    if cost is not None:
        lagrange = LagrangeMultiplier(cfg.cost_threshold, cfg.lagrange_init, cfg.lagrange_lr, cfg.lagrange_max or None)

    policy = load_causal_lm(cfg.model)
    choose_logps_path(policy, cfg.run.logps_path)  # before the reference copy is made: it keeps the choice
    reference = Reference(policy)  # frozen copy, or the LoRA policy with its adapter disabled
    model = ActorCritic(policy, VALUE_MODELS[cfg.value_model](cfg, policy), shared=cfg.value_model == "shared")
    loop = OnlineLoop(model, cfg.optim, cfg.run, cfg.rollout, len(prompts), "ppo", config=cfg, prompts=prompts,
                      evaluate=held_out_reward(cfg, tokenizer, reward, policy_of=lambda m: m.policy))
    reference.to(loop.device)
    generator = make_generator(loop.unwrapped().policy, tokenizer, cfg.sampling, cfg.data.max_prompt_length)
    kl_ctl = KL_CONTROLLERS[cfg.kl.kl_control](cfg.kl)
    in_reward = cfg.kl.kl_penalty == "reward"
    extra = None
    if cfg.ptx_coef > 0:
        extra = ptx_loss_fn(ptx_items(tokenizer, ptx_texts, cfg), tokenizer.pad_token_id, cfg, loop.device)
    temperature, fwd_bs = cfg.sampling.temperature, cfg.optim.batch_size
    loop.register_state({"kl_controller": kl_ctl, "lagrange": lagrange})

    for k in loop.rollouts():
        # 1. sample
        with loop.gathered():  # FSDP: the full policy for sampling and scoring, sharded again before the update
            with loop.timed("generation"):
                rollout_prompts = [prompts[i] for i in loop.prompts_for(k)]
                gens = generator.generate(rollout_prompts, n=cfg.rollout.samples_per_prompt, seed=loop.sampling_seed(k))
                batch = build_rollout_batch(gens, tokenizer.pad_token_id, stop_token_ids(tokenizer)).to(loop.device)
            # 2. score, and the log-probs / values at sampling time
            with loop.timed("scoring"):
                sample_prompts = [rollout_prompts[i] for i in gens.prompt_index]
                raw, scores = score_responses(reward, sample_prompts, gens.texts, batch.finished, cfg.reward.unfinished_penalty)
                if cost is not None:
                    costs = cost(sample_prompts, gens.texts).float().cpu()
                    scores = lagrangian_scores(scores, costs, lagrange.value)
                batch.scores = scores.to(loop.device)
                batch.logps, outs = rollout_logps(loop.model, batch, temperature, fwd_bs, with_values=True)
                batch.values = torch.cat([response_slice(o.values, batch) for o in outs]) * batch.response_mask
                with reference.active() as ref:
                    batch.ref_logps, _ = rollout_logps(ref, batch, temperature, fwd_bs)
        # 3. per-token rewards with the KL penalty; 4. GAE advantages
        beta = kl_ctl.value
        batch.rewards, kl = kl_penalized_rewards(batch.scores, batch.logps, batch.ref_logps, batch.response_mask,
                                                 beta if in_reward else 0.0, cfg.kl.kl_estimator)
        batch.advantages, batch.returns = gae(batch.rewards, batch.values, batch.response_mask, cfg.gamma, cfg.gae_lambda)
        if cfg.whiten_advantages:  # μ and σ over the whole rollout, all processes' shares
            batch.advantages = loop.whiten(batch.advantages, batch.response_mask)
        # 5. PPO epochs over minibatches
        with loop.timed("update"):
            loss_fn = lambda m, mb: ppo_loss(m, mb, cfg, 0.0 if in_reward else beta)  # noqa: E731
            stats = loop.update(batch, loss_fn, "token", k, extra_loss=extra)
        seq_kl = float(sequence_kl(kl, batch.response_mask).mean())
        kl_ctl.update(seq_kl, len(batch))
        row = {
            "reward": float(raw.mean()), "score": float(scores.mean()),
            "kl": seq_kl, "kl_estimator": cfg.kl.kl_estimator, "kl_coef": beta,
            "response_length": float(batch.response_lengths.float().mean()),
            "unfinished": float((~batch.finished).float().mean()),
            "returns/mean": float(masked_mean(batch.returns, batch.response_mask)),
            "values/mean": float(masked_mean(batch.values, batch.response_mask)),
            **stats,
        }
        if lagrange is not None:
            row.update({"cost": float(costs.mean()), "lambda": lagrange.value})
            lagrange.update(costs.mean())
        loop.log(k, row, tokens=int(batch.attention_mask.sum()))
        loop.maybe_save(k)

    wall = loop.close()
    loop.save_final(lambda out: save_model(loop.unwrapped().policy, tokenizer, out))
    return OnlineResult(output_dir=Path(cfg.run.output_dir), history=loop.history, wall_s=wall)
