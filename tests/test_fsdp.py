"""FSDP 2 over 2 CPU processes (gloo) gives the same weights as one process, for every method.

``accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 2`` runs this
file as a script (the ``__main__`` block below) with the shipped FSDP config as it is, bar the
precision (``--mixed_precision no``: the comparison is in float32). On a machine without CUDA,
accelerate itself would fall back to DDP; :func:`alignkit.train.engine.make_accelerator` makes it
shard (its guard is tested here: every launched run asserts its model *is* sharded).

One launch trains, with 2 processes × batch 2 × 2 accumulation steps, the offline methods of
``tests/test_distributed.py`` (SFT, pairwise RM, DPO with ``reference=copy``) plus DPO with
``reference=precomputed``, KTO, SFT with LoRA and gradient checkpointing, and an SFT run stopped
after 2 steps and resumed from its FSDP checkpoint; then GRPO and PPO (generation and scoring
from the sharded policy) and 2 rounds of rejection sampling (round 2 samples from the sharded
policy of round 1). The tests run the same in this process with one process and compare the
losses and the weights, and load the saved directories with plain ``transformers``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_distributed import LR, STEPS, _free_port, _pair_items, per_prompt_sampling, train, train_online

REPO = Path(__file__).resolve().parents[1]
OFFLINE = ("sft", "rm", "dpo", "dpo_pre", "kto", "sft_lora_gc")
ONLINE = ("grpo", "ppo")


# ---- the runs (used both by the tests and by the launched processes) ----------------------------


def _kto_items(tokenizer):
    from alignkit.data import UnpairedExample, tokenize_records

    recs = [UnpairedExample(prompt=[{"role": "user", "content": f"What colour is item {i}?"}],
                            completion=f"Item {i} is {'red' if i % 2 else 'blue'}." + " Sure." * (i % 3), label=i % 3 != 0)
            for i in range(17)]
    return tokenize_records(recs, tokenizer, max_length=64)[0]


def train_offline(kind: str, tiny_dir: str, out: str, batch_size: int, grad_accum: int, stop_after: int | None = None,
                  resume: bool = False):
    """``kind`` of :data:`OFFLINE` for STEPS steps (those of test_distributed plus the FSDP-specific
    ones); returns (trainer, result)."""
    if kind in ("sft", "rm", "dpo") and stop_after is None and not resume:
        trainer, result, _ = train(kind, tiny_dir, out, batch_size, grad_accum)
        return trainer, result
    from alignkit.config import ModelConfig, OptimConfig, RunConfig
    from alignkit.models.loading import load_causal_lm, load_tokenizer
    from alignkit.train.loop import Trainer

    tokenizer = load_tokenizer(tiny_dir)
    pad = tokenizer.pad_token_id
    lora = kind == "sft_lora_gc"
    model_cfg = ModelConfig(path=tiny_dir, lora=lora, lora_r=4, lora_alpha=8)
    optim = OptimConfig(lr=LR, batch_size=batch_size, grad_accum=grad_accum, max_steps=STEPS, warmup_ratio=0.0,
                        schedule="constant")
    run = RunConfig(output_dir=out, progress=False, report_to="jsonl", seed=3, gradient_checkpointing=lora,
                    save_every=2 if kind == "sft" else 0, resume=resume)
    torch.manual_seed(0)
    model = load_causal_lm(model_cfg)
    if kind in ("sft", "sft_lora_gc"):
        from alignkit.train.sft import build_sft_task
        from test_distributed import _sft_items

        task = build_sft_task(_sft_items(tokenizer), [], pad, padding_free=False)
    elif kind == "dpo_pre":
        from alignkit.train.dpo import DPOConfig, build_dpo_task

        cfg = DPOConfig(model=model_cfg, optim=optim, run=run, beta=0.5, reference="precomputed")
        task, _ = build_dpo_task(cfg, model, _pair_items(tokenizer), [], pad)
    elif kind == "kto":
        from alignkit.train.kto import KTOConfig, build_kto_task

        cfg = KTOConfig(model=model_cfg, optim=optim, run=run, beta=0.5, reference="copy")
        task, _ = build_kto_task(cfg, model, _kto_items(tokenizer), [], pad)
    else:
        raise ValueError(kind)
    trainer = Trainer(model, task, optim, run)
    return trainer, trainer.fit(stop_after=stop_after)


def train_rs(tiny_dir: str, out: str, batch_size: int, grad_accum: int):
    """Two rounds of rejection sampling (round 2 samples from the policy round 1 trained)."""
    from alignkit.config import ModelConfig, OptimConfig, RunConfig
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.rewards import FunctionReward
    from alignkit.train.online import RewardConfig
    from alignkit.train.rejection_sampling import RSConfig, run_rs

    cfg = RSConfig(model=ModelConfig(path=tiny_dir),
                   optim=OptimConfig(lr=LR, batch_size=batch_size, grad_accum=grad_accum, epochs=1.0, warmup_ratio=0.0,
                                     schedule="constant"),
                   run=RunConfig(output_dir=out, progress=False, report_to="jsonl", seed=3),
                   sampling=SamplingConfig(max_new_tokens=8, temperature=1.0), reward=RewardConfig(unfinished_penalty=0.0),
                   num_samples=2, rounds=2)
    prompts = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(8)]
    torch.manual_seed(0)
    return run_rs(cfg, prompts, FunctionReward(lambda p, r: sum(c.isdigit() for c in r) / max(1, len(r)))).history


def full_state(trainer) -> dict[str, torch.Tensor]:
    """The trained model's full weights (gathered from the shards under FSDP; every process calls it)."""
    state = trainer.acc.get_state_dict(trainer.model)
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _worker(tiny_dir: str, out: str) -> None:
    """Entry point of each launched process: every method under FSDP with 2 × 2."""
    from alignkit.models.loading import load_tokenizer, save_model
    from alignkit.rollout.generate import HFGenerator
    from alignkit.train.engine import fsdp_modules

    torch.set_num_threads(1)
    out = Path(out)
    tokenizer = load_tokenizer(tiny_dir)
    for kind in OFFLINE:
        # KTO's reference point z₀ is a statistic of each micro-batch (all-reduced over processes,
        # not accumulated over micro-batches), so its split must not cut the global batch in time.
        batch, accum = (4, 1) if kind == "kto" else (2, 2)
        trainer, result = train_offline(kind, tiny_dir, str(out / kind), batch_size=batch, grad_accum=accum)
        assert trainer.acc.num_processes == 2 and fsdp_modules(trainer.model), f"{kind}: not sharded"
        state = full_state(trainer)
        if kind in ("sft", "sft_lora_gc"):  # the final model: a plain HF directory written from the shards
            trainer.save_final(lambda d: save_model(trainer.unwrapped(), tokenizer, d))
        if trainer.acc.is_main_process:
            torch.save(state, out / f"{kind}.pt")
            (out / f"{kind}.json").write_text(json.dumps(result.history))
        trainer.acc.wait_for_everyone()
    # Resume: stop after 2 of 4 steps (a checkpoint at step 2), then continue in a new run.
    trainer, _ = train_offline("sft", tiny_dir, str(out / "resumed"), 2, 2, stop_after=2)
    del trainer
    trainer, result = train_offline("sft", tiny_dir, str(out / "resumed"), 2, 2, resume=True)
    state = full_state(trainer)
    if trainer.acc.is_main_process:
        torch.save(state, out / "resumed.pt")
        (out / "resumed.json").write_text(json.dumps(result.history))
    trainer.acc.wait_for_everyone()

    HFGenerator.generate = per_prompt_sampling()
    for kind in ONLINE:
        history = train_online(kind, tiny_dir, str(out / kind), batch_size=4 if kind == "grpo" else 2, grad_accum=2)
        if int(os.environ.get("RANK", "0")) == 0:
            (out / f"{kind}.json").write_text(json.dumps(history))
    history = train_rs(tiny_dir, str(out / "rs"), batch_size=2, grad_accum=2)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "rs.json").write_text(json.dumps(history))


# ---- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def launch():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "examples" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
               "--main_process_port", str(_free_port()), __file__, str(tiny_dir), str(out)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    proc = launch()
    if proc.returncode != 0 and re.search(r"address already in use|EADDRINUSE", proc.stderr, re.IGNORECASE):
        proc = launch()  # the free port was taken meanwhile: one retry, for that case only
    assert proc.returncode == 0, f"FSDP run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "processes=2" in proc.stdout and "engine=FSDP" in proc.stdout, proc.stdout[-2000:]
    return out


def _compare(one: dict, two: dict, initial: dict | None, what: str):
    assert one.keys() == two.keys(), what
    diff = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    print(f"{what}: max |1-process − FSDP×2| = {diff:.2e}")
    if initial is not None:
        moved = max(float((one[k].float() - initial[k].float()).abs().max()) for k in one if k in initial)
        assert moved > LR, f"{what}: the run did not train"
    # As in test_distributed: float32 summation order differs, Adam turns noise on near-zero
    # gradients into at most a fraction of an LR-sized step.
    assert diff < 0.05 * LR, (what, diff)


@pytest.mark.parametrize("kind", OFFLINE)
def test_fsdp_equals_one_process(kind, fsdp_run, tiny_dir, tmp_path):
    single, result = train_offline(kind, str(tiny_dir), str(tmp_path / kind), batch_size=8, grad_accum=1)
    assert single.acc.num_processes == 1
    history = json.loads((fsdp_run / f"{kind}.json").read_text())
    assert [round(h["loss"], 5) for h in history] == [round(h["loss"], 5) for h in result.history]
    one = {k: v.detach() for k, v in single.unwrapped().state_dict().items()}
    _compare(one, torch.load(fsdp_run / f"{kind}.pt"), None, kind)
    if kind == "sft_lora_gc":  # the merged model written from the shards equals the one written by one process
        from safetensors.torch import load_file

        from alignkit.models.loading import load_tokenizer, save_model

        assert any("lora_" in k for k in one)
        single.save_final(lambda d: save_model(single.unwrapped(), load_tokenizer(str(tiny_dir)), d))
        _compare(load_file(tmp_path / kind / "model.safetensors"), load_file(fsdp_run / kind / "model.safetensors"),
                 load_file(tiny_dir / "model.safetensors"), "sft_lora_gc merged")


def test_fsdp_resume_from_checkpoint_equals_uninterrupted(fsdp_run):
    ckpts = sorted(p.name for p in (fsdp_run / "resumed" / "checkpoints").iterdir())
    assert "step-2" in ckpts, ckpts
    full, resumed = torch.load(fsdp_run / "sft.pt"), torch.load(fsdp_run / "resumed.pt")
    history = json.loads((fsdp_run / "resumed.json").read_text())
    assert [h["step"] for h in history] == [3, 4]  # it continued, it did not restart
    _compare(full, resumed, None, "resumed")


@pytest.mark.parametrize("kind", ["sft", "sft_lora_gc"])
def test_fsdp_saved_model_is_a_plain_hf_directory(kind, fsdp_run):
    from transformers import AutoModelForCausalLM

    folder = fsdp_run / kind
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"], cfg["architectures"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    loaded = model.state_dict()
    if kind == "sft":
        for k, v in torch.load(fsdp_run / "sft.pt").items():
            assert torch.equal(loaded[k], v), k
    else:  # merged: the base's names, no adapter weights; the adapter kept beside it
        assert not any("lora_" in k or "base_layer" in k for k in loaded) and (folder / "adapter").is_dir()


@pytest.mark.parametrize("kind", ONLINE)
def test_fsdp_equals_one_process_online(kind, fsdp_run, tiny_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from alignkit.rollout.generate import HFGenerator

    monkeypatch.setattr(HFGenerator, "generate", per_prompt_sampling())
    history = train_online(kind, str(tiny_dir), str(tmp_path / kind), batch_size=16 if kind == "grpo" else 5, grad_accum=1)
    two_history = json.loads((fsdp_run / f"{kind}.json").read_text())
    for key in ("reward", "loss", "kl"):
        assert [round(h[key], 5) for h in two_history] == [round(h[key], 5) for h in history], key
    _compare(load_file(tmp_path / kind / "model.safetensors"), load_file(fsdp_run / kind / "model.safetensors"),
             load_file(tiny_dir / "model.safetensors"), kind)


def test_fsdp_rejection_sampling_equals_one_process(fsdp_run, tiny_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from alignkit.rollout.generate import HFGenerator

    monkeypatch.setattr(HFGenerator, "generate", per_prompt_sampling())
    history = train_rs(str(tiny_dir), str(tmp_path / "rs"), batch_size=8, grad_accum=1)
    two_history = json.loads((fsdp_run / "rs.json").read_text())
    for key in ("reward/mean", "reward/best", "sft/loss"):
        assert [round(h[key], 5) for h in two_history] == [round(h[key], 5) for h in history], key
    _compare(load_file(tmp_path / "rs" / "model.safetensors"), load_file(fsdp_run / "rs" / "model.safetensors"),
             load_file(tiny_dir / "model.safetensors"), "rs")


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])


# ---- DeepSpeed: refused at start-up where it cannot run ---------------------------------------------

DEEPSPEED_FILES = sorted((REPO / "examples" / "accelerate").glob("deepspeed_zero*.yaml"))


@pytest.mark.parametrize("path", DEEPSPEED_FILES, ids=lambda p: p.stem)
def test_deepspeed_launch_stops_with_what_to_do_on_a_machine_without_it(path, monkeypatch, tmp_path):
    import yaml

    from alignkit.config import RunConfig
    from alignkit.train import engine

    zero = yaml.safe_load(path.read_text())["deepspeed_config"]
    # What `accelerate launch --config_file <path>` passes on to each process.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(zero["zero_stage"]))
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", str(zero["gradient_accumulation_steps"]))
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", str(zero["gradient_clipping"]))
    run = RunConfig(output_dir=str(tmp_path), progress=False, report_to="jsonl")
    monkeypatch.setattr(engine, "deepspeed_unavailable", lambda: "DeepSpeed is not installed (`pip install deepspeed`)")
    with pytest.raises(RuntimeError, match=rf"DeepSpeed ZeRO-{zero['zero_stage']}.*not installed.*fsdp\.yaml"):
        engine.make_accelerator(run)
    monkeypatch.undo()
    # This machine, as it is: no GPU (and no DeepSpeed) here, so the real check refuses too.
    if not torch.cuda.is_available():
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        with pytest.raises(RuntimeError, match="not installed|no CUDA GPU"):
            engine.make_accelerator(run)


def test_deepspeed_without_gpu_names_the_gpu(monkeypatch):
    import importlib.util

    from alignkit.train import engine

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in engine.deepspeed_unavailable()


def test_an_fsdp_launch_on_a_torch_with_other_fsdp_internals_is_refused_before_training(monkeypatch, tmp_path):
    """torch 2.11 keeps one ``_fsdp_param_group`` per unit (seen on a GPU machine's torch): the
    launch stops when its accelerator is made, naming the pinned torch, instead of after its
    training steps (at the first generation, evaluation or save)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_state

    from alignkit.config import RunConfig
    from alignkit.train import engine

    engine.check_fsdp_internals()  # this torch: the layout full_weights reads

    class Older(_fsdp_state.FSDPState):
        def __init__(self):
            super().__init__()
            del self._fsdp_param_groups  # 2.11 keeps one _fsdp_param_group instead

    monkeypatch.setattr(_fsdp_state, "FSDPState", Older)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match=r"no FSDPState\._fsdp_param_groups: install torch==2\.13\.0"):
        engine.make_accelerator(RunConfig(output_dir=str(tmp_path), progress=False, report_to="jsonl"))
    monkeypatch.undo()
    # a parameter group without the hooks full_weights removes and puts back
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    monkeypatch.delattr(_fsdp_param_group.FSDPParamGroup, "_register_state_dict_hooks")
    with pytest.raises(RuntimeError, match=r"no FSDPParamGroup\._register_state_dict_hooks"):
        engine.check_fsdp_internals()


@pytest.mark.parametrize("path", DEEPSPEED_FILES, ids=lambda p: p.stem)
def test_shipped_deepspeed_settings_leave_accumulation_and_clipping_to_alignkit(path, monkeypatch):
    import yaml

    from alignkit.train import engine

    zero = yaml.safe_load(path.read_text())["deepspeed_config"]
    assert engine.deepspeed_config_problems(zero) == []
    assert engine.deepspeed_config_problems({**zero, "gradient_accumulation_steps": 4})
    assert engine.deepspeed_config_problems({**zero, "gradient_clipping": 1.0})
    # ... and the launch check applies it (on a machine where DeepSpeed could run).
    monkeypatch.setattr(engine, "deepspeed_unavailable", lambda: None)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(ValueError, match="gradient_accumulation_steps: 4.*optim.grad_accum"):
        engine.check_deepspeed_launch()


def test_a_trainable_parameter_missing_from_the_optimizer_stops_the_run():
    """The guard that caught PPO's untied head under FSDP: a parameter the optimizer never steps."""
    from alignkit.train.engine import _check_optimizer_holds_every_trainable_parameter

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    _check_optimizer_holds_every_trainable_parameter(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(RuntimeError, match=r"2 trainable parameter\(s\) are not in the optimizer \(1\.weight, 1\.bias\)"):
        _check_optimizer_holds_every_trainable_parameter(model, torch.optim.AdamW(model[0].parameters()))


def test_a_wrapper_re_ties_the_transformers_models_inside_it(tiny_dir):
    """accelerate's FSDP 2 preparation re-ties weights through ``model.tie_weights()``."""
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm
    from alignkit.train.engine import _keep_ties_through_sharding

    policy = load_causal_lm(ModelConfig(path=str(tiny_dir)))
    wrapper = torch.nn.ModuleDict({"policy": policy, "head": torch.nn.Linear(2, 1)})
    _keep_ties_through_sharding(wrapper)
    policy.lm_head.weight = torch.nn.Parameter(policy.lm_head.weight.detach().clone())  # untied, as after meta loading
    wrapper.tie_weights()
    assert policy.lm_head.weight is policy.get_input_embeddings().weight
