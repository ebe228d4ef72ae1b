"""The demo's shared stages: the base model and SFT, the reward models and their gated
combination, and sampling a policy on the held-out prompts (with its KL to SFT and its
alignment tax)."""

from __future__ import annotations

from pathlib import Path

from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig

from .context import Context, messages, run_config, sample, write_jsonl
from .labels import ANNOTATIONS

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
# Sampling a policy on the held-out prompts
# --------------------------------------------------------------------------------------------


def policy_from_dir(ctx: Context, name: str, policy_dir: Path) -> None:
    """Sample a trained policy on the held-out prompts and estimate its KL to the SFT policy."""
    from alignkit.eval.metrics import kl_to_reference, lm_loss
    from alignkit.models.loading import load_causal_lm

    s = ctx.scale
    prompts = ctx.world.prompts(split="heldout")
    model, gens = sample(policy_dir, ctx.tokenizer, prompts, s.eval_samples, ctx.cfg.seed + 202, s.max_new_tokens)
    sft_model = load_causal_lm(ModelConfig(path=str(ctx.sft_dir)), trainable=False)
    kl = kl_to_reference(model, sft_model, gens.prompt_ids, gens.response_ids, ctx.tokenizer.pad_token_id)
    # Alignment tax: LM loss on held-out pretraining documents (lower = less forgetting).
    tax = lm_loss(model, ctx.tokenizer, ctx.world.pretraining_heldout())
    ctx.policies[name] = {"prompts": [prompts[i] for i in gens.prompt_index], "texts": gens.texts, "kl": kl,
                          "kl_kind": "k1 from samples", "pretrain_loss": tax}

def sft_policy(ctx: Context) -> None:
    policy_from_dir(ctx, "sft", ctx.sft_dir)
    ctx.policies["sft"]["kl"] = 0.0

def prompt_messages(ctx: Context) -> list[list[dict]]:
    return [messages(p.text) for p in ctx.world.prompts(split="train")]
