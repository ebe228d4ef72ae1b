"""The demo's shared stages: the base model and SFT, the reward models and their gated
combination, and sampling a policy on the held-out prompts (with its KL to SFT and its
alignment tax)."""

from __future__ import annotations

from pathlib import Path

from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig

from .context import Context, generate, messages, read_jsonl, run_config, sample, write_jsonl
from .labels import ADVERSARIAL, balanced_prompts

# --------------------------------------------------------------------------------------------
# Base model and SFT
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
    run = run_config(ctx.out, "base", ctx.cfg.seed)
    trainer = Trainer(model, task, OptimConfig(lr=3e-3, batch_size=16, epochs=s.pretrain_epochs, warmup_ratio=0.05), run)
    trainer.fit()
    ctx.base_dir = save_model(trainer.unwrapped(), tokenizer, ctx.out / "base")
    ctx.tokenizer = tokenizer
    ctx.curves["pretrain"] = ctx.out / "base" / "metrics.jsonl"
    ctx.extra["model_parameters"] = n_params

def sft(ctx: Context) -> None:
    from alignkit.train.sft import SFTConfig, run_sft

    demos = ctx.world.sft_demonstrations()
    path = write_jsonl(ctx.out / "data" / "sft.jsonl", [{"prompt": d["prompt"], "completion": d["completion"]} for d in demos])
    ctx.data["sft"] = path
    cfg = SFTConfig(
        model=ModelConfig(path=str(ctx.base_dir)),
        data=DataConfig(path=str(path), max_length=128, max_prompt_length=96),
        optim=OptimConfig(lr=1e-3, batch_size=16, epochs=ctx.scale.sft_epochs, warmup_ratio=0.05),
        run=run_config(ctx.out, "sft", ctx.cfg.seed),
    )
    run_sft(cfg)
    ctx.sft_dir = Path(cfg.run.output_dir)
    ctx.curves["sft"] = ctx.sft_dir / "metrics.jsonl"


# --------------------------------------------------------------------------------------------
# Reward models
# --------------------------------------------------------------------------------------------


def train_reward_model(ctx: Context, train: Path, heldout: Path, out: Path, epochs: float, start: Path | None = None) -> dict:
    """Train a reward model from the SFT policy (or continue ``start``, an earlier reward model);
    return its held-out accuracy report (:func:`reward_model_accuracy`)."""
    from alignkit.train.rm import RMConfig, run_rm

    cfg = RMConfig(
        model=ModelConfig(path=str(start or ctx.sft_dir)),
        data=DataConfig(path=str(train), max_length=96, max_prompt_length=48),
        optim=OptimConfig(lr=1e-3, batch_size=32, epochs=epochs, warmup_ratio=0.05),
        run=RunConfig(output_dir=str(out), seed=ctx.cfg.seed, report_to="jsonl", overwrite=True),
    )
    run_rm(cfg)
    return reward_model_accuracy(out, heldout)


def reward_model_accuracy(rm_dir: Path, heldout: Path) -> dict:
    """Held-out pairwise accuracy of a reward model (r(chosen) > r(rejected); a tie counts half),
    with its bootstrap 95% interval over prompts, overall and per margin label.

    Returns ``accuracy``, ``ci``, ``n_pairs``, ``n_prompts``, ``accuracy_by_margin``,
    ``ci_by_margin``, ``count_by_margin`` (pairs per label) and ``margin_mean`` (mean reward gap).
    Pairs with an empty response are left out, as every data reader skips them."""
    from alignkit.eval.uncertainty import bootstrap_mean
    from alignkit.rollout.rewards import RewardModel

    rows = [r for r in read_jsonl(heldout) if r["chosen"].strip() and r["rejected"].strip()]
    rm = RewardModel(str(rm_dir), name=Path(rm_dir).name, batch_size=64)
    msgs = [messages(r["prompt"]) for r in rows]
    chosen, rejected = rm(msgs, [r["chosen"] for r in rows]), rm(msgs, [r["rejected"] for r in rows])
    correct = ((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).tolist()
    overall = bootstrap_mean(list(_by_prompt(rows, correct).values()))
    out = {"accuracy": overall["mean"], "ci": [overall["low"], overall["high"]], "n_pairs": len(rows),
           "n_prompts": overall["n"], "accuracy_by_margin": {}, "ci_by_margin": {}, "count_by_margin": {},
           "margin_mean": float((chosen - rejected).mean())}
    from alignkit.world import MARGIN_THRESHOLDS

    order = {label: i for i, (_, label) in enumerate(MARGIN_THRESHOLDS)}  # strongest preference first
    for label in sorted({r.get("margin", "") for r in rows}, key=lambda m: (order.get(m, len(order)), m)):
        sel = [(r, c) for r, c in zip(rows, correct) if r.get("margin", "") == label]
        stat = bootstrap_mean(list(_by_prompt([r for r, _ in sel], [c for _, c in sel]).values()))
        out["accuracy_by_margin"][label] = stat["mean"]
        out["ci_by_margin"][label] = [stat["low"], stat["high"]]
        out["count_by_margin"][label] = len(sel)
    return out


def _by_prompt(rows: list[dict], values: list[float]) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = {}
    for r, v in zip(rows, values):
        groups.setdefault(r["prompt"], []).append(v)
    return groups


def reward_models(ctx: Context, names=("helpfulness", "safety", "helpfulness_confident")) -> None:
    for name in names:
        out = ctx.out / f"rm-{name}"
        ctx.rm_report[name] = train_reward_model(ctx, ctx.data[f"{name}/train"], ctx.data[f"{name}/heldout"], out,
                                                 ctx.scale.rm_epochs)
        ctx.reward_models[name] = out
        ctx.curves[f"rm-{name}"] = out / "metrics.jsonl"

def combined_reward(ctx: Context, dirs: dict[str, Path] | None = None):
    """Llama 2's gated combination of the helpfulness and safety reward models (eq. 4): the safety
    score on the truly adversarial prompts (:data:`~alignkit.demo.labels.ADVERSARIAL`, Llama 2's
    is_safety(p)), the helpfulness score everywhere else, borderline prompts included.

    Llama 2 also gates on R_s < 0.15 everywhere. Here that breaks RL: the safety model never saw the
    other kinds and scores most of their answers below 0 whatever they say (so the reward ignores
    correctness, and honest "I don't know" to unknown entities), and without the prompt flag a safe
    refusal is judged by the helpfulness model, which ranks it below evasive or off-topic text.
    With that gate, full-scale PPO, GRPO and RLOO fell below SFT (harmful prompts answered with
    gibberish or off-topic text, which the helpfulness model preferred to refusals). Gating the
    borderline prompts on the safety model as well raised false refusals far above SFT's (a
    refusal beats a tiny model's junk answers in safety, and helpful answers are rare)."""
    from alignkit.rollout.rewards import RewardModel, SafetyGated

    dirs = dirs or ctx.reward_models
    return SafetyGated(RewardModel(str(dirs["helpfulness"])), RewardModel(str(dirs["safety"])), threshold=float("-inf"),
                       is_unsafe_prompt=lambda messages: ctx.world.find_prompt(messages).kind in ADVERSARIAL)


# --------------------------------------------------------------------------------------------
# Sampling a policy on the held-out prompts
# --------------------------------------------------------------------------------------------


def policy_from_dir(ctx: Context, name: str, policy_dir: Path) -> None:
    """Sample a trained policy on the held-out prompts (``eval_samples`` each) and keep, per
    sample, its k1 KL term to the SFT policy, and per held-out corpus document its NLL (the
    alignment tax): the raw material of the report's intervals."""
    from alignkit.eval.metrics import kl_per_sample, lm_nll_per_text
    from alignkit.models.loading import load_causal_lm

    s = ctx.scale
    prompts = ctx.world.prompts(split="heldout")
    model, gens = sample(policy_dir, ctx.tokenizer, prompts, s.eval_samples, ctx.cfg.seed + 202, s.max_new_tokens)
    sft_model = load_causal_lm(ModelConfig(path=str(ctx.sft_dir)), trainable=False)
    kl = kl_per_sample(model, sft_model, gens.prompt_ids, gens.response_ids, ctx.tokenizer.pad_token_id)
    # Alignment tax: LM loss on held-out pretraining documents (lower = less forgetting).
    nll = lm_nll_per_text(model, ctx.tokenizer, ctx.world.pretraining_heldout())
    ctx.policies[name] = {"prompts": [prompts[i] for i in gens.prompt_index], "texts": gens.texts,
                          "kl": float(kl.mean()), "kl_values": kl.tolist(), "kl_kind": "k1 from samples",
                          "pretrain_loss": sum(nll[0]) / max(sum(nll[1]), 1), "pretrain_nll": nll}
    extra = s.harmful_eval_samples - s.eval_samples
    if extra > 0:  # more samples of the harmful prompts, for the violation rate alone (Scale.harmful_eval_samples)
        harmful = ctx.world.prompts("harmful", "heldout")
        more = generate(model, ctx.tokenizer, harmful, extra, ctx.cfg.seed + 303, s.max_new_tokens)
        ctx.policies[name]["violation_extra"] = {"prompts": [harmful[i] for i in more.prompt_index], "texts": more.texts}


def sft_policy(ctx: Context) -> None:
    """The SFT policy on the held-out prompts: the baseline every method is compared with."""
    policy_from_dir(ctx, "sft", ctx.sft_dir)
    ctx.policies["sft"].update(kl=0.0, kl_values=None, kl_kind="")  # KL of SFT to itself: 0 exactly


#: At most this many train prompts per kind in the prompt set of RL and rejection sampling (None:
#: every train prompt, of which arithmetic makes up 45% and harmful and borderline ones a sixth each).
RL_PROMPTS_PER_KIND: int | None = 100


def prompt_messages(ctx: Context) -> list[list[dict]]:
    """The prompts RL and rejection sampling generate on: a seeded, balanced choice of train prompts
    (at most :data:`RL_PROMPTS_PER_KIND` per kind)."""
    if RL_PROMPTS_PER_KIND is None:
        chosen = ctx.world.prompts(split="train")
    else:
        chosen = balanced_prompts(ctx.world, "train", RL_PROMPTS_PER_KIND, ctx.cfg.seed + 31)
    return [messages(p.text) for p in chosen]
