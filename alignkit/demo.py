"""`alignkit demo`: the InstructGPT / Llama 2 recipe end to end on the embedded alignment world.

1. build the world; train a tokenizer on its corpus and pretrain a tiny Llama; SFT it on the
   (imperfect) demonstrations;
2. sample the SFT policy, have the simulated labelers compare the samples (helpfulness and
   safety annotations with margin labels, plus a "confident" labeler who cannot spot made-up
   facts), train the reward models and report their held-out accuracy;
3. run every alignment method from the same SFT policy;
4. score every policy on held-out prompts with the gold judge (which nothing trains on);
5. write ``report.json``, ``report.md`` and the plots.

Everything the pipeline trains on comes from the labelers; the gold judge only evaluates.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from alignkit.demo_critic import critic_stage


@dataclass
class DemoConfig:
    """`alignkit demo`: the whole pipeline on the embedded alignment world, measured by its gold judge."""

    out: str = "demo-out"
    """Directory for models, data, report.json, report.md and the plots."""
    seed: int = 0
    """Seed of the world, the models and the sampling."""
    quick: bool = False
    """A smaller, faster run (fewer steps and samples): about 3 minutes on 2 CPU cores."""
    methods: str = "default"
    """Comma-separated alignment methods to run after SFT (see `alignkit.demo.METHODS`), 'all', or 'default'
    (all of them; with --quick the core ones: best-of-N, DPO, rejection sampling, PPO, PPO-ptx, GRPO, RLOO)."""
    threads: int = 1
    """torch CPU threads (0 = torch's default). Tiny models run fastest on one: on this project's 2-core
    machines one thread trained 16.7k tokens/s, two threads far less whenever anything else ran."""


@dataclass
class Scale:
    """Sizes of one demo run (the full and the quick one differ only here)."""

    pretrain_epochs: float
    sft_epochs: float
    samples_per_prompt: int  # SFT samples per train prompt for the comparison data
    rm_epochs: float
    best_of_n: int
    eval_samples: int  # samples per held-out prompt when evaluating a policy
    dpo_epochs: float = 2
    rs_prompts: int = 0  # prompts per rejection-sampling round (0 = all train prompts)
    rounds: int = 2  # iterative RLHF rounds
    rl_rollouts: int = 10  # rollouts (PPO, GRPO, RLOO)
    constrained_rollouts: int = 10  # rollouts of the Safe-RLHF pair (the Lagrange multiplier needs time to settle)
    max_new_tokens: int = 24
    hidden_size: int = 96
    num_hidden_layers: int = 3
    vocab_size: int = 768


FULL = Scale(pretrain_epochs=10, sft_epochs=2, samples_per_prompt=4, rm_epochs=4, best_of_n=8, eval_samples=4,
             rl_rollouts=12, constrained_rollouts=24)
QUICK = Scale(pretrain_epochs=5, sft_epochs=2, samples_per_prompt=4, rm_epochs=2, best_of_n=6, eval_samples=3,
              dpo_epochs=1, rl_rollouts=10, rs_prompts=256)


# --------------------------------------------------------------------------------------------
# Plumbing
# --------------------------------------------------------------------------------------------


class Stages:
    """Prints which stage runs (with its number) and records each stage's wall time."""

    def __init__(self, total: int):
        self.total, self.n, self.timings = total, 0, {}
        self.t_start = time.perf_counter()

    def run(self, name: str, fn: Callable, *args, **kwargs):
        self.n += 1
        elapsed = time.perf_counter() - self.t_start
        print(f"\n[demo] stage {self.n}/{self.total}: {name}  (elapsed {elapsed:.0f}s)", flush=True)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - t0, 2)
        return out


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(out: Path, name: str, seed: int) -> RunConfig:
    return RunConfig(output_dir=str(out / name), seed=seed, report_to="jsonl", progress=True)


@dataclass
class Context:
    """What the stages share."""

    cfg: DemoConfig
    scale: Scale
    world: object
    out: Path
    tokenizer: object = None
    base_dir: Path | None = None
    sft_dir: Path | None = None
    reward_models: dict[str, Path] = field(default_factory=dict)
    data: dict[str, Path] = field(default_factory=dict)
    policies: dict[str, dict] = field(default_factory=dict)  # name -> {"prompts", "texts", "kl"...}
    rm_report: dict = field(default_factory=dict)
    curves: dict[str, Path] = field(default_factory=dict)  # stage -> metrics.jsonl
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Stage 1: base model and SFT
# --------------------------------------------------------------------------------------------


def build_base(ctx: Context) -> None:
    from alignkit.models.factory import TinyModelConfig, tiny_llama, train_tokenizer
    from alignkit.models.loading import save_model
    from alignkit.train.loop import Trainer
    from alignkit.train.sft import build_sft_task, text_items

    s = ctx.scale
    corpus = ctx.world.pretraining_corpus()
    tokenizer = train_tokenizer(corpus, vocab_size=s.vocab_size)
    model = tiny_llama(tokenizer, TinyModelConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=3 * s.hidden_size,
        num_hidden_layers=s.num_hidden_layers, num_attention_heads=4), seed=ctx.cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    items = text_items(tokenizer, corpus, max_length=256)
    print(f"[demo] corpus: {len(corpus)} documents, {sum(len(i['input_ids']) for i in items)} tokens; "
          f"model: {n_params / 1e6:.2f}M parameters")
    task = build_sft_task(items, [], tokenizer.pad_token_id, padding_free=False)
    task.name = "pretrain"
    run = _run(ctx.out, "base", ctx.cfg.seed)
    trainer = Trainer(model, task, OptimConfig(lr=3e-3, batch_size=16, epochs=s.pretrain_epochs, warmup_ratio=0.05), run)
    trainer.fit()
    ctx.base_dir = save_model(trainer.unwrapped(), tokenizer, ctx.out / "base")
    ctx.tokenizer = tokenizer
    ctx.curves["pretrain"] = ctx.out / "base" / "metrics.jsonl"
    ctx.extra["model_parameters"] = n_params


def sft(ctx: Context) -> None:
    from alignkit.train.sft import SFTConfig, run_sft

    demos = ctx.world.sft_demonstrations()
    path = _write_jsonl(ctx.out / "data" / "sft.jsonl", [{"prompt": d["prompt"], "completion": d["completion"]} for d in demos])
    ctx.data["sft"] = path
    cfg = SFTConfig(
        model=ModelConfig(path=str(ctx.base_dir)),
        data=DataConfig(path=str(path), max_length=128, max_prompt_length=96),
        optim=OptimConfig(lr=1e-3, batch_size=16, epochs=ctx.scale.sft_epochs, warmup_ratio=0.05),
        run=_run(ctx.out, "sft", ctx.cfg.seed),
    )
    run_sft(cfg)
    ctx.sft_dir = Path(cfg.run.output_dir)
    ctx.curves["sft"] = ctx.sft_dir / "metrics.jsonl"


# --------------------------------------------------------------------------------------------
# Stage 2: comparison data from the simulated labelers, reward models
# --------------------------------------------------------------------------------------------


def _sample(model_dir: Path, tokenizer, prompts, n: int, seed: int, max_new_tokens: int, temperature: float = 1.0):
    from alignkit.models.loading import load_causal_lm
    from alignkit.rollout.generate import SamplingConfig, make_generator

    model = load_causal_lm(ModelConfig(path=str(model_dir)), trainable=False)
    gen = make_generator(model, tokenizer, SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature))
    return model, gen.generate([_messages(p.text) for p in prompts], n=n, seed=seed)


def _diverse_samples(ctx: Context, policy_dir: Path, prompts, seed: int) -> list[str]:
    """Samples to compare, ``samples_per_prompt`` per prompt (consecutive): half at temperature 1
    and half at a higher temperature, as Llama 2 varied models and temperatures to make the two
    responses of a comparison differ."""
    s = ctx.scale
    half = s.samples_per_prompt // 2
    _, a = _sample(policy_dir, ctx.tokenizer, prompts, half, seed, s.max_new_tokens, temperature=1.0)
    _, b = _sample(policy_dir, ctx.tokenizer, prompts, s.samples_per_prompt - half, seed + 1, s.max_new_tokens,
                   temperature=COMPARISON_HOT_TEMPERATURE)
    texts = []
    for i in range(len(prompts)):
        texts += a.texts[i * half : (i + 1) * half] + b.texts[i * (s.samples_per_prompt - half) : (i + 1) * (s.samples_per_prompt - half)]
    return texts


def _pairs_of(prompts, texts: list[str], n: int):
    """(prompt, a, b) for every pair of the n samples of each prompt."""
    for i, p in enumerate(prompts):
        group = texts[i * n : (i + 1) * n]
        for a in range(n):
            for b in range(a + 1, n):
                yield p, group[a], group[b]


#: Which prompt kinds each annotation covers. As in Llama 2, safety annotations are collected on
#: adversarial prompts (harmful requests and benign ones that look harmful), helpfulness ones on all.
ANNOTATIONS = {
    "helpfulness": ("helpfulness", "honest", None),
    "safety": ("safety", "honest", ("harmful", "borderline")),
    "helpfulness_confident": ("helpfulness", "confident", None),
    "overall": ("overall", "honest", None),
}
#: At most this many prompts per kind are sampled for labelling, so the 300 arithmetic prompts
#: do not make up half of every comparison set.
PROMPTS_PER_KIND = 100
#: Temperature of the second half of the samples that are compared.
COMPARISON_HOT_TEMPERATURE = 1.5
#: Noise of the simulated labelers' Bradley–Terry choices (0 = the gold order).
LABELER_TEMPERATURE = 0.2


def _label_prompts(world, split: str, seed: int) -> list:
    from alignkit.world import KINDS

    rng = random.Random(seed)
    chosen = []
    for kind in KINDS:
        ps = world.prompts(kind, split)
        chosen += rng.sample(ps, min(len(ps), PROMPTS_PER_KIND if split == "train" else PROMPTS_PER_KIND // 4))
    return chosen


def collect_comparisons(ctx: Context, policy_dir: Path, split: str, seed: int, names=tuple(ANNOTATIONS)) -> tuple[dict, list, list]:
    """Sample ``policy_dir`` on a balanced set of ``split`` prompts and label every pair of samples
    with each annotation in ``names``. Returns ({name: records}, prompts, samples)."""
    s, w = ctx.scale, ctx.world
    prompts = _label_prompts(w, split, seed)
    texts = _diverse_samples(ctx, policy_dir, prompts, seed)
    records, stats = {}, {}
    for name in names:
        kind, variant, kinds = ANNOTATIONS[name]
        labeler = w.labeler(kind, variant, temperature=LABELER_TEMPERATURE, seed=seed + 17 * len(name))
        pairs = [t for t in _pairs_of(prompts, texts, s.samples_per_prompt) if kinds is None or t[0].kind in kinds]
        records[name], stats[name] = labeler.label_pairs(pairs)
    ctx.extra.setdefault("labels", {}).update({f"{k}/{split}/{seed}": v for k, v in stats.items()})
    return records, prompts, texts


def comparisons(ctx: Context) -> None:
    """Sample the SFT policy on train and held-out prompts; label with every labeler."""
    for split in ("train", "heldout"):
        seed = ctx.cfg.seed + 10 * (split == "heldout")
        records, prompts, texts = collect_comparisons(ctx, ctx.sft_dir, split, seed)
        for name, rows in records.items():
            ctx.data[f"{name}/{split}"] = _write_jsonl(ctx.out / "data" / f"{name}-{split}.jsonl", rows)
        if split == "train":
            # Unpaired desirable/undesirable labels (KTO) from the combined (overall) labeler.
            lab = ctx.world.labeler("overall", "honest", temperature=LABELER_TEMPERATURE, seed=ctx.cfg.seed + 5)
            n = ctx.scale.samples_per_prompt
            rows = lab.label_unpaired([(prompts[k // n], t) for k, t in enumerate(texts)], threshold=0.5)
            ctx.data["unpaired/train"] = _write_jsonl(ctx.out / "data" / "unpaired-train.jsonl", rows)
    print("[demo] comparisons:", json.dumps({k: v["labelled"] for k, v in ctx.extra["labels"].items()}))


def train_reward_model(ctx: Context, train: Path, heldout: Path, out: Path, epochs: float, start: Path | None = None) -> dict:
    """Train a reward model from the SFT policy (or continue ``start``, an earlier reward model);
    return its held-out accuracy report."""
    from alignkit.train.evaluate_rm import EvalRMConfig, run_eval_rm
    from alignkit.train.rm import RMConfig, run_rm

    cfg = RMConfig(
        model=ModelConfig(path=str(start or ctx.sft_dir)),
        data=DataConfig(path=str(train), eval_path=str(heldout), max_length=96, max_prompt_length=48),
        optim=OptimConfig(lr=1e-3, batch_size=32, epochs=epochs, warmup_ratio=0.05),
        run=RunConfig(output_dir=str(out), seed=ctx.cfg.seed, report_to="jsonl"),
    )
    run_rm(cfg)
    metrics = run_eval_rm(EvalRMConfig(model=ModelConfig(path=str(out)),
                                       data=DataConfig(path=str(heldout), shuffle=False, max_length=96, max_prompt_length=48)))
    return {k: metrics[k] for k in ("accuracy", "accuracy_by_margin", "count_by_margin", "n_pairs", "margin_mean")}


def reward_models(ctx: Context, names=("helpfulness", "safety", "helpfulness_confident")) -> None:
    for name in names:
        out = ctx.out / f"rm-{name}"
        ctx.rm_report[name] = train_reward_model(ctx, ctx.data[f"{name}/train"], ctx.data[f"{name}/heldout"], out,
                                                 ctx.scale.rm_epochs)
        ctx.reward_models[name] = out
        ctx.curves[f"rm-{name}"] = out / "metrics.jsonl"


def combined_reward(ctx: Context, dirs: dict[str, Path] | None = None):
    """Llama 2's gated combination of the helpfulness and safety reward models (eq. 4): the safety
    score on the adversarial prompts its annotations cover (Llama 2's is_safety(p)), the
    helpfulness score elsewhere.

    Llama 2 also gates on R_s < 0.15 everywhere. Here that breaks RL: the safety model never saw the
    other kinds and scores most of their answers below 0 whatever they say (so the reward ignores
    correctness, and honest "I don't know" to unknown entities), and without the prompt flag a safe
    refusal is judged by the helpfulness model, which ranks it below evasive or off-topic text.
    With that gate, full-scale PPO, GRPO and RLOO fell below SFT (harmful prompts answered with
    gibberish or off-topic text, which the helpfulness model preferred to refusals)."""
    from alignkit.rollout.rewards import RewardModel, SafetyGated

    dirs = dirs or ctx.reward_models
    adversarial = ANNOTATIONS["safety"][2]
    return SafetyGated(RewardModel(str(dirs["helpfulness"])), RewardModel(str(dirs["safety"])), threshold=float("-inf"),
                       is_unsafe_prompt=lambda messages: ctx.world.find_prompt(messages).kind in adversarial)


# --------------------------------------------------------------------------------------------
# Stage 3: alignment methods (each from the same SFT policy)
# --------------------------------------------------------------------------------------------


def best_of_n(ctx: Context) -> None:
    """Best-of-N sampling (no training): N SFT samples per held-out prompt, keep the best under a
    reward. Its KL to the SFT policy is log N − (N−1)/N (analytic)."""
    from alignkit.eval.metrics import best_of_n_kl
    from alignkit.rollout.rewards import RewardModel

    s, w = ctx.scale, ctx.world
    prompts = w.prompts(split="heldout")
    n, draws = s.best_of_n, s.eval_samples
    # draws × n samples per prompt: each consecutive block of n is one best-of-n draw.
    _, gens = _sample(ctx.sft_dir, ctx.tokenizer, prompts, n * draws, ctx.cfg.seed + 101, s.max_new_tokens)
    msgs = [_messages(prompts[i].text) for i in gens.prompt_index]
    rewards = {
        "best_of_n/helpfulness": RewardModel(str(ctx.reward_models["helpfulness"])),
        "best_of_n/combined": combined_reward(ctx),
        "best_of_n/confident_labelers": RewardModel(str(ctx.reward_models["helpfulness_confident"])),
    }
    blocks = len(prompts) * draws
    for name, reward in rewards.items():
        scores = reward(msgs, gens.texts).view(blocks, n)  # (P·draws, N)
        best = scores.argmax(dim=1)
        texts = [gens.texts[k * n + int(b)] for k, b in enumerate(best)]
        chosen_prompts = [prompts[k // draws] for k in range(blocks)]
        ctx.policies[name] = {"prompts": chosen_prompts, "texts": texts, "kl": best_of_n_kl(n),
                              "kl_kind": f"analytic log N − (N−1)/N, N={n}"}


def _policy_from_dir(ctx: Context, name: str, policy_dir: Path) -> None:
    """Sample a trained policy on the held-out prompts and estimate its KL to the SFT policy."""
    from alignkit.eval.metrics import kl_to_reference, lm_loss
    from alignkit.models.loading import load_causal_lm

    s = ctx.scale
    prompts = ctx.world.prompts(split="heldout")
    model, gens = _sample(policy_dir, ctx.tokenizer, prompts, s.eval_samples, ctx.cfg.seed + 202, s.max_new_tokens)
    sft_model = load_causal_lm(ModelConfig(path=str(ctx.sft_dir)), trainable=False)
    kl = kl_to_reference(model, sft_model, gens.prompt_ids, gens.response_ids, ctx.tokenizer.pad_token_id)
    # Alignment tax: LM loss on held-out pretraining documents (lower = less forgetting).
    tax = lm_loss(model, ctx.tokenizer, ctx.world.pretraining_heldout())
    ctx.policies[name] = {"prompts": [prompts[i] for i in gens.prompt_index], "texts": gens.texts, "kl": kl,
                          "kl_kind": "k1 from samples", "pretrain_loss": tax}


def sft_policy(ctx: Context) -> None:
    _policy_from_dir(ctx, "sft", ctx.sft_dir)
    ctx.policies["sft"]["kl"] = 0.0


def _prompt_messages(ctx: Context) -> list[list[dict]]:
    return [_messages(p.text) for p in ctx.world.prompts(split="train")]


def _dpo(ctx: Context, name: str, loss_type: str, beta: float, length_normalize: bool = False) -> None:
    from alignkit.train.dpo import DPOConfig, run_dpo

    cfg = DPOConfig(
        model=ModelConfig(path=str(ctx.sft_dir)),
        data=DataConfig(path=str(ctx.data["overall/train"]), eval_path=str(ctx.data["overall/heldout"]),
                        max_length=96, max_prompt_length=48),
        optim=OptimConfig(lr=3e-4, batch_size=32, epochs=ctx.scale.dpo_epochs, warmup_ratio=0.05),
        run=_run(ctx.out, name, ctx.cfg.seed), beta=beta, loss_type=loss_type, reference="precomputed",
        length_normalize=length_normalize,
    )
    run_dpo(cfg)
    ctx.curves[name] = Path(cfg.run.output_dir) / "metrics.jsonl"
    _policy_from_dir(ctx, name, Path(cfg.run.output_dir))


def dpo(ctx: Context) -> None:
    """DPO (Rafailov et al. 2023) on the overall labelers' comparisons."""
    _dpo(ctx, "dpo", "sigmoid", beta=0.1)


def ipo(ctx: Context) -> None:
    """IPO (Azar et al. 2023) on the same comparisons."""
    # IPO's squared loss on summed log-probs gave gradient norms in the thousands here; on per-token
    # means (length normalisation) it trains stably.
    _dpo(ctx, "ipo", "ipo", beta=0.5, length_normalize=True)


def kto(ctx: Context) -> None:
    """KTO (Ethayarajh et al. 2024) on the labelers' desirable/undesirable labels."""
    from alignkit.train.kto import KTOConfig, run_kto

    rows = [json.loads(line) for line in ctx.data["unpaired/train"].read_text().splitlines()]
    n_d = sum(r["label"] for r in rows)
    # The KTO paper advises λ_D·n_D / (λ_U·n_U) in [1, 4/3]: weight the rarer label up to balance.
    desirable_weight = max(1.0, (len(rows) - n_d) / max(n_d, 1))
    cfg = KTOConfig(
        model=ModelConfig(path=str(ctx.sft_dir)),
        data=DataConfig(path=str(ctx.data["unpaired/train"]), max_length=96, max_prompt_length=48),
        optim=OptimConfig(lr=3e-4, batch_size=32, epochs=ctx.scale.dpo_epochs, warmup_ratio=0.05),
        run=_run(ctx.out, "kto", ctx.cfg.seed), beta=0.1, reference="precomputed", desirable_weight=desirable_weight,
    )
    run_kto(cfg)
    ctx.curves["kto"] = Path(cfg.run.output_dir) / "metrics.jsonl"
    _policy_from_dir(ctx, "kto", Path(cfg.run.output_dir))


#: Learning rate and KL coefficient of the online methods (PPO, GRPO, RLOO).
RL_LR = 3e-4
RL_KL_COEF = 0.05


def _online_common(ctx: Context, name: str):
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.train.online import RewardConfig

    s = ctx.scale
    return dict(
        model=ModelConfig(path=str(ctx.sft_dir)),
        run=_run(ctx.out, name, ctx.cfg.seed),
        sampling=SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=1.0),
        # Whitened with the first rollout's statistics: the gated reward's scale differs from one
        # reward model to the other, and PPO's step size assumes unit-scale rewards.
        reward=RewardConfig(unfinished_penalty=0.5, whiten=True),
    )


def _ppo(ctx: Context, name: str, ptx: bool = False, reward=None, cost=None, cost_threshold: float = 0.0,
         rollouts: int | None = None) -> None:
    from alignkit.train.online import KLConfig, RolloutConfig
    from alignkit.train.ppo import PPOConfig, run_ppo

    s = ctx.scale
    cfg = PPOConfig(**_online_common(ctx, name),
                    optim=OptimConfig(lr=RL_LR, batch_size=16, schedule="constant", warmup_ratio=0.0),
                    rollout=RolloutConfig(prompts_per_rollout=32, samples_per_prompt=1, num_rollouts=rollouts or s.rl_rollouts,
                                          ppo_epochs=2),
                    kl=KLConfig(kl_coef=RL_KL_COEF, kl_estimator="k1"), value_model="shared", vf_coef=0.1,
                    ptx_coef=0.5 if ptx else 0.0, cost_threshold=cost_threshold, lagrange_lr=0.5)
    ptx_texts = ctx.world.pretraining_corpus()[:512] if ptx else None
    result = run_ppo(cfg, prompts=_prompt_messages(ctx), reward=reward or combined_reward(ctx), cost=cost, ptx_texts=ptx_texts)
    ctx.curves[name] = Path(cfg.run.output_dir) / "metrics.jsonl"
    _policy_from_dir(ctx, name, Path(result.output_dir))
    if cost is not None:
        rows = [json.loads(line) for line in (Path(cfg.run.output_dir) / "metrics.jsonl").read_text().splitlines()]
        costs = [r["cost"] for r in rows if "cost" in r]
        ctx.policies[name]["cost_threshold"] = cost_threshold
        # Rollout means are noisy (32 prompts): report the first one and the mean of the last three.
        ctx.policies[name]["initial_cost"] = costs[0] if costs else None
        ctx.policies[name]["final_cost"] = sum(costs[-3:]) / len(costs[-3:]) if costs else None


#: d in E[cost] ≤ d for the Safe-RLHF run; cost = −(centred safety reward), so d = 0.5 asks for a
#: mean safety score of at least −0.5 (the SFT policy starts near +1 cost on train prompts).
SAFETY_COST_THRESHOLD = 0.5


def ppo_safety_constrained(ctx: Context) -> None:
    """Safe RLHF (Dai et al. 2024): PPO maximising the helpfulness reward alone, subject to
    E[cost] ≤ d with cost = −(safety reward), the Lagrange multiplier learnt; beside it the same
    PPO without the constraint."""
    from alignkit.rollout.rewards import RewardModel, WeightedSum

    helpful = RewardModel(str(ctx.reward_models["helpfulness"]))
    n = ctx.scale.constrained_rollouts
    _ppo(ctx, "ppo_helpfulness_only", reward=helpful, rollouts=n)
    cost = WeightedSum([(RewardModel(str(ctx.reward_models["safety"])), -1.0)], name="cost=-safety")
    _ppo(ctx, "ppo_cost_constrained", reward=helpful, cost=cost, cost_threshold=SAFETY_COST_THRESHOLD, rollouts=n)


def ppo(ctx: Context) -> None:
    """PPO (InstructGPT) against the safety-gated combined reward model, KL penalty in the reward."""
    _ppo(ctx, "ppo", ptx=False)


def ppo_ptx(ctx: Context) -> None:
    """PPO-ptx: the same with pretraining-corpus NLL mixed in (against the alignment tax)."""
    _ppo(ctx, "ppo_ptx", ptx=True)


def _critic_free(ctx: Context, name: str, advantage: str) -> None:
    from alignkit.train.grpo import GRPOConfig, run_grpo
    from alignkit.train.online import RolloutConfig

    s = ctx.scale
    cfg = GRPOConfig(**_online_common(ctx, name),
                     optim=OptimConfig(lr=RL_LR, batch_size=16, schedule="constant", warmup_ratio=0.0),
                     rollout=RolloutConfig(prompts_per_rollout=16, samples_per_prompt=4, num_rollouts=s.rl_rollouts, ppo_epochs=1),
                     advantage=advantage)
    result = run_grpo(cfg, prompts=_prompt_messages(ctx), reward=combined_reward(ctx))
    ctx.curves[name] = Path(cfg.run.output_dir) / "metrics.jsonl"
    _policy_from_dir(ctx, name, Path(result.output_dir))


def grpo(ctx: Context) -> None:
    """GRPO (Shao et al. 2024): group-relative advantages, no critic."""
    _critic_free(ctx, "grpo", "grpo")


def rloo(ctx: Context) -> None:
    """RLOO (Ahmadian et al. 2024): leave-one-out baseline, no critic."""
    _critic_free(ctx, "rloo", "rloo")


def _rs(ctx: Context, policy_dir: Path, reward, out: Path) -> Path:
    from alignkit.train.rejection_sampling import RSConfig, run_rs

    common = _online_common(ctx, "rejection_sampling")
    common["model"] = ModelConfig(path=str(policy_dir))
    common["run"] = RunConfig(output_dir=str(out), seed=ctx.cfg.seed, report_to="jsonl")
    cfg = RSConfig(**common, optim=OptimConfig(lr=1e-3, batch_size=16, epochs=2, warmup_ratio=0.05),
                   num_samples=ctx.scale.best_of_n, prompts_per_round=ctx.scale.rs_prompts)
    return Path(run_rs(cfg, prompts=_prompt_messages(ctx), reward=reward).output_dir)


def rejection_sampling(ctx: Context) -> None:
    """Rejection sampling (Llama 2): best of N SFT samples under the combined reward, fine-tuned on."""
    out = _rs(ctx, ctx.sft_dir, combined_reward(ctx), ctx.out / "rejection_sampling")
    ctx.curves["rejection_sampling"] = out / "metrics.jsonl"
    _policy_from_dir(ctx, "rejection_sampling", out)


def iterative(ctx: Context) -> None:
    """Iterative rounds (Llama 2's RLHF-V1…): each round labels the current policy's samples, retrains
    the helpfulness and safety reward models on all comparisons so far and runs rejection sampling
    from the current policy. Round 1 uses the SFT comparisons and reward models already trained."""
    from alignkit.train.iterate import run_rounds

    names = ("helpfulness", "safety")
    previous = {n: ctx.reward_models[n] for n in names}

    def collect(policy: Path, r: int) -> dict[str, list[dict]]:
        if r == 1:
            return {n: [json.loads(line) for line in ctx.data[f"{n}/train"].read_text().splitlines()] for n in names}
        records, _, _ = collect_comparisons(ctx, policy, "train", ctx.cfg.seed + 1000 * r, names)
        return records

    def train_rewards(files: dict[str, Path], round_dir: Path, r: int) -> dict[str, Path]:
        if r == 1:
            return {n: ctx.reward_models[n] for n in names}
        # Each round's reward models continue from the previous round's on all comparisons so far
        # (half the epochs of a fresh model: the earlier data is already fitted once).
        dirs = {}
        for n in names:
            dirs[n] = round_dir / f"rm-{n}"
            ctx.rm_report[f"{n}/round{r}"] = train_reward_model(ctx, files[n], ctx.data[f"{n}/heldout"], dirs[n],
                                                                 max(1.0, ctx.scale.rm_epochs / 2), start=previous[n])
            previous[n] = dirs[n]
        return dirs

    def optimise(policy: Path, dirs: dict[str, Path], out: Path, r: int) -> Path:
        done = ctx.out / "rejection_sampling"
        if r == 1 and (done / "config.json").exists():
            return done  # the rejection_sampling method already ran this exact round
        return _rs(ctx, policy, combined_reward(ctx, dirs), out)

    for rec in run_rounds(ctx.out / "iterative", ctx.sft_dir, ctx.scale.rounds, collect, train_rewards, optimise):
        _policy_from_dir(ctx, f"iterative/round{rec.round}", Path(rec.policy_dir))


#: method name -> stage function, run in this order, each from the same SFT policy.
METHODS: dict[str, Callable[[Context], None]] = {
    "best_of_n": best_of_n,
    "dpo": dpo,
    "ipo": ipo,
    "kto": kto,
    "rejection_sampling": rejection_sampling,
    "iterative": iterative,
    "ppo": ppo,
    "ppo_ptx": ppo_ptx,
    "ppo_safety_constrained": ppo_safety_constrained,
    "grpo": grpo,
    "rloo": rloo,
    # Last, so that its training does not shift the random streams of the stages above.
    "critic": critic_stage,
}


#: What `--quick` runs by default, to stay within about 3 minutes on 2 CPU cores; IPO, KTO, the
#: iterative rounds and the cost-constrained PPO run in the full demo (or with methods=all).
QUICK_METHODS = ("best_of_n", "dpo", "rejection_sampling", "ppo", "ppo_ptx", "grpo", "rloo")

# --------------------------------------------------------------------------------------------
# Stage 4 and 5: evaluation and the report
# --------------------------------------------------------------------------------------------

POLICY_KEYS = ("gold_reward", "helpfulness", "safety_violation_rate", "hallucination_rate", "false_refusal_rate",
               "kl_to_sft", "win_rate_vs_sft", "n_prompts")


def evaluate(ctx: Context) -> dict:
    from alignkit.eval.metrics import win_rate

    w = ctx.world
    sft_texts: dict[str, list[str]] = {}
    for p, t in zip(ctx.policies["sft"]["prompts"], ctx.policies["sft"]["texts"]):
        sft_texts.setdefault(p.text, []).append(t)
    report = {}
    for name, pol in ctx.policies.items():
        ev = w.evaluate(pol["prompts"], pol["texts"])
        # The j-th sample of a policy on a prompt is compared with the j-th SFT sample on it.
        seen: dict[str, int] = {}
        opponents = []
        for p in pol["prompts"]:
            j = seen.get(p.text, 0)
            seen[p.text] = j + 1
            opponents.append(sft_texts[p.text][j % len(sft_texts[p.text])])
        wr = win_rate(w.reward, pol["prompts"], pol["texts"], opponents)
        report[name] = {
            "gold_reward": ev["gold_reward"],
            "helpfulness": ev["helpfulness"],
            "safety_violation_rate": ev["safety_violation_rate"],
            "hallucination_rate": ev["hallucination_rate"],
            "false_refusal_rate": ev["false_refusal_rate"],
            "accuracy": ev["accuracy"],
            "kl_to_sft": pol["kl"],
            "kl_estimator": pol.get("kl_kind", ""),
            "pretrain_loss": pol.get("pretrain_loss", ctx.policies["sft"].get("pretrain_loss")),
            "win_rate_vs_sft": 0.5 if name == "sft" else wr,
            "n_prompts": len({p.text for p in pol["prompts"]}),
            "n_samples": len(pol["texts"]),
            "per_kind": {k: {"gold_reward": v["gold_reward"]} for k, v in ev["per_kind"].items()},
            "examples": [{"prompt": p.text, "response": t} for p, t in list(zip(pol["prompts"], pol["texts"]))[::37][:5]],
        }
        report[name].update({k: pol[k] for k in ("cost_threshold", "initial_cost", "final_cost") if k in pol})
    return report


@dataclass
class IterateConfig:
    """`alignkit iterate`: iterative RLHF rounds on the alignment world from a policy trained on it
    (e.g. `demo-out/sft`): label the policy's samples with the simulated labelers, retrain the
    helpfulness and safety reward models on all comparisons so far, rejection-sample; repeat."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to start from (a model trained on the world, such as the demo's `sft` directory)."""
    out: str = "iterate-out"
    """Directory for the rounds (resumable: `rounds.json` lists finished rounds), data and report.json."""
    seed: int = 0
    """Seed of the world (must match the one the policy was trained on) and of the sampling."""
    rounds: int = 2
    """Number of rounds."""
    quick: bool = False
    """Smaller samples and shorter reward-model training."""
    threads: int = 1
    """torch CPU threads (0 = torch's default)."""


def run_iterate(cfg: IterateConfig) -> dict:
    from alignkit.models.loading import load_tokenizer
    from alignkit.world import World

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    scale = QUICK if cfg.quick else FULL
    scale = Scale(**{**scale.__dict__, "rounds": cfg.rounds})
    out = Path(cfg.out)
    ctx = Context(cfg=DemoConfig(out=cfg.out, seed=cfg.seed, quick=cfg.quick), scale=scale, world=World(seed=cfg.seed),
                  out=out, tokenizer=load_tokenizer(cfg.model.path), sft_dir=Path(cfg.model.path))
    stages = Stages(total=5)
    stages.run("comparison data from simulated labelers", comparisons, ctx)
    stages.run("reward models (helpfulness, safety)", reward_models, ctx, ("helpfulness", "safety"))
    stages.run("sample the starting policy", sft_policy, ctx)
    stages.run("iterative rounds", iterative, ctx)
    policies = stages.run("gold-judge evaluation", evaluate, ctx)
    report = {"seed": cfg.seed, "rounds": cfg.rounds, "reward_models": ctx.rm_report, "policies": policies,
              "timings_s": stages.timings}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    for name, p in policies.items():
        print(f"[iterate] {name}: gold reward {p['gold_reward']:.3f}, KL to start {p['kl_to_sft']:.2f}")
    return report


def run_demo(cfg: DemoConfig) -> dict:
    from alignkit.eval.report import write_report
    from alignkit.train.common import seed_everything
    from alignkit.world import World

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    scale = QUICK if cfg.quick else FULL
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.methods == "all" or (cfg.methods == "default" and not cfg.quick):
        wanted = list(METHODS)
    elif cfg.methods == "default":
        wanted = list(QUICK_METHODS)
    else:
        wanted = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise ValueError(f"demo: unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    ctx = Context(cfg=cfg, scale=scale, world=World(seed=cfg.seed), out=out)
    stages = Stages(total=6 + len(wanted))
    t0 = time.perf_counter()
    stages.run("world, tokenizer and pretraining", build_base, ctx)
    stages.run("supervised fine-tuning", sft, ctx)
    stages.run("comparison data from simulated labelers", comparisons, ctx)
    stages.run("reward models (helpfulness, safety, confident-labeler helpfulness)", reward_models, ctx)
    stages.run("sample the SFT policy", sft_policy, ctx)
    for m in wanted:
        stages.run(m, METHODS[m], ctx)
    policies = stages.run("gold-judge evaluation and report", evaluate, ctx)
    report = {
        "seed": cfg.seed,
        "quick": cfg.quick,
        "reward_models": ctx.rm_report,
        "policies": policies,
        "timings_s": {**stages.timings, "total": round(time.perf_counter() - t0, 2)},
        "world": ctx.world.summary(),
        "labels": ctx.extra.get("labels", {}),
        "model_parameters": ctx.extra.get("model_parameters"),
        "critic": ctx.extra.get("critic"),
    }
    write_report(report, out, ctx.curves)
    print(f"\n[demo] done in {report['timings_s']['total']:.0f}s: {out / 'report.md'}")
    return report
