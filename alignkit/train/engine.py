"""The one training engine every method drives, offline and online.

A driver decides *what* each optimizer step trains on: the offline loop (:mod:`alignkit.train.loop`:
SFT, reward models, DPO, KTO, critic) cuts a global batch of examples into micro-batches, the online
loop (:mod:`alignkit.train.online`: PPO, GRPO, RLOO) cuts minibatches of episodes from a rollout.
The :class:`Engine` does everything else, one way for all of them:

- **model preparation**: mixed precision (:func:`make_accelerator`), gradient checkpointing on
  every transformers model inside the trained module (a PPO policy and its critic alike), dropout
  off where a method compares the policy with itself (:func:`prepare_model`);
- **the optimizer step** (:meth:`Engine.step`): gradient accumulation with the loss divided by the
  units of the whole step (all micro-batches, all processes), so the gradient equals the one of a
  single big batch however it is split; clipping; AdamW; the schedule; and the **non-finite
  guard**: a step whose loss or gradient norm is NaN/inf is skipped (counted, logged as
  ``skipped_nonfinite``), and ``run.max_nonfinite_steps`` of them in a row stop the run with a
  :class:`~alignkit.numerics.NonFiniteError`;
- **checkpoints and the final model**: :meth:`Engine.save_checkpoint`, :meth:`Engine.resume` and
  :meth:`Engine.save_final` are the only places that write or read a run's state. Checkpoints hold
  model, optimizer, scheduler, RNG (accelerate's ``save_state``), the objects a driver registers
  (KL controller, Lagrange multiplier) and the data position, and are written atomically (a
  temporary directory renamed into place), so ``run.resume=true`` continues a killed run exactly;
- **metrics, progress and evaluation** (:meth:`Engine.log`, :meth:`Engine.evaluate`).

Engine: ``accelerate`` (DDP, FSDP or DeepSpeed from its config).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import warnings
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit.config import OptimConfig, RunConfig
from alignkit.numerics import FIXES, NonFiniteError
from alignkit.train.memory import memory_setting
from alignkit.train.outputs import CHECKPOINT_DIR, STATE_FILE, checkpoint_step, resumable_checkpoints

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Precision and the accelerate engine
# --------------------------------------------------------------------------------------------

#: Smallest hidden size for which "auto" picks bf16 on a CPU with native bf16 instructions. A
#: training step of a 4-layer Llama (batch 8 × 200 tokens, one thread, avx512_bf16 CPU, torch
#: 2.13) ran 1.12× faster under bf16 autocast at hidden 64, 1.44× at 128, 1.57× at 256 and 1.75×
#: at 512: below 256 the gain is small and fp32 keeps small runs (tests, the demo) exact.
CPU_BF16_MIN_HIDDEN = 256


def cpu_bf16_instructions() -> str | None:
    """The native bf16 instruction set of this CPU (``amx_bf16`` or ``avx512_bf16``), else None.
    Without them bf16 matmuls are emulated, and slower than fp32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: ask torch's oneDNN build whether the CPU has AMX
        return "amx_bf16" if getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")().startswith("AMX") else None
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def _hidden_size(model) -> int | None:
    for module in (model.modules() if model is not None else ()):
        size = getattr(getattr(module, "config", None), "hidden_size", None)
        if size:
            return int(size)
    return None


def choose_mixed_precision(requested: str, model: torch.nn.Module | None = None) -> tuple[str, str]:
    """Pick the autocast dtype: (choice, reason). bf16 only where the hardware runs it fast:
    a CUDA device with bf16, or a CPU with native bf16 instructions and a model of hidden size
    at least :data:`CPU_BF16_MIN_HIDDEN`; fp32 otherwise."""
    if requested != "auto":
        return requested, "as configured"
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:  # accelerate allows one precision per process
        chosen = str(AcceleratorState().mixed_precision)
        return chosen, f"this process's accelerator already runs with mixed_precision={chosen}"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16", "CUDA device with native bf16"
        return "no", "CUDA device without bf16: fp32 (fp16 needs loss scaling; opt in with mixed_precision=fp16)"
    from accelerate.utils import is_npu_available, is_xpu_available

    if is_xpu_available() or is_npu_available():
        return "no", "XPU/NPU device: fp32 (opt in with mixed_precision=bf16)"
    native = cpu_bf16_instructions()
    if native is None:
        return "no", "CPU without native bf16 instructions: fp32 (bf16 would be emulated, slower)"
    hidden = _hidden_size(model)
    if hidden is None or hidden < CPU_BF16_MIN_HIDDEN:
        return "no", (f"CPU with {native}, but the model is small (hidden size {hidden} < {CPU_BF16_MIN_HIDDEN}): fp32 "
                      f"(bf16 gains ≤ 1.4× there; opt in with mixed_precision=bf16)")
    return "bf16", f"CPU with {native} and hidden size {hidden} ≥ {CPU_BF16_MIN_HIDDEN}: bf16 autocast (1.5-1.8× a step; mixed_precision=no for fp32)"


def launched_on_cpu_only() -> bool:
    """True when this process belongs to a multi-process launch (torchrun / ``accelerate launch``)
    on a machine with no accelerator. accelerate then needs ``cpu=True`` to join the processes in
    one gloo group; without it each process would silently train alone on the whole data."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or torch.cuda.is_available():
        return False
    from accelerate.utils import is_npu_available, is_xpu_available

    return not (is_xpu_available() or is_npu_available())


def deepspeed_unavailable() -> str | None:
    """Why DeepSpeed ZeRO cannot run on this machine, or None when it can."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed (`pip install deepspeed`, which needs a CUDA toolchain)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible, and DeepSpeed ZeRO trains on GPUs"
    return None


def deepspeed_config_problems(zero: dict[str, Any]) -> list[str]:
    """What in an accelerate ``deepspeed_config`` section (or the launch's variables, same keys)
    alignkit cannot run with: it accumulates gradients and clips them itself
    (``optim.grad_accum``, ``optim.max_grad_norm``), so DeepSpeed's must be 1 and off, or each
    step would accumulate twice and clip twice."""
    problems = []
    accum = zero.get("gradient_accumulation_steps")
    if accum not in (None, "", "auto") and int(accum) != 1:
        problems.append(f"gradient_accumulation_steps: {accum} (set 1 and use optim.grad_accum)")
    clip = zero.get("gradient_clipping")
    if clip not in (None, "", "none", "auto") and float(clip) != 0.0:
        problems.append(f"gradient_clipping: {clip} (set 0.0 and use optim.max_grad_norm)")
    stage = zero.get("zero_stage")
    if stage not in (None, "") and int(stage) not in (0, 1, 2, 3):
        problems.append(f"zero_stage: {stage} (0-3)")
    return problems


def check_deepspeed_launch() -> None:
    """Stop at start-up, with what to do instead, when the launch asked for DeepSpeed
    (``distributed_type: DEEPSPEED``, passed on as ``ACCELERATE_USE_DEEPSPEED``) and this machine
    cannot run it, or its settings fight alignkit's own accumulation and clipping."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "?")
    why = deepspeed_unavailable()
    if why is not None:
        raise RuntimeError(
            f"this run was launched with DeepSpeed ZeRO-{stage} (an accelerate config with distributed_type: DEEPSPEED, "
            f"e.g. examples/accelerate/deepspeed_zero{stage}.yaml), but {why}. On this machine launch with "
            "examples/accelerate/fsdp.yaml instead (FSDP 2 shards parameters, gradients and optimizer state like "
            "ZeRO-3, and runs on the CPU too) or ddp.yaml; see docs/scaling.md")
    problems = deepspeed_config_problems({
        "zero_stage": os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"),
        "gradient_accumulation_steps": os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"),
        "gradient_clipping": os.environ.get("ACCELERATE_GRADIENT_CLIPPING")})
    if problems:
        raise ValueError("the DeepSpeed settings of this launch cannot run with alignkit: " + "; ".join(problems)
                         + " (in the accelerate config's deepspeed_config section; the shipped files have them right)")


def fsdp_requested() -> bool:
    """True when the launch asked for FSDP (``distributed_type: FSDP`` in the accelerate config, or
    ``--use_fsdp``: accelerate passes it on as ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


#: What :func:`full_weights` uses of FSDP 2's private classes (torch 2.13, the pinned version):
#: instance attributes of FSDPState, methods of FSDPState and FSDPParamGroup, and attributes
#: FSDPParamGroup sets on itself (read from its source, as they exist only on instances).
FSDP_STATE_FIELDS = ("_fsdp_param_groups", "_auto_reshard_after_forward")
FSDP_METHODS = {"FSDPState": ("_lazy_init",), "FSDPParamGroup": ("_register_state_dict_hooks",)}
FSDP_GROUP_FIELDS = ("post_forward_mesh_info", "_module_to_pre_save_state_dict_hook_handle",
                     "_module_to_pre_load_state_dict_hook_handle")


def check_fsdp_internals() -> None:
    """Refuse an FSDP launch before training on a torch whose FSDP 2 keeps its state differently
    from the one :func:`full_weights` was written against: otherwise the run fails at its first
    generation, evaluation or save, after its training steps (torch 2.11 keeps one
    ``_fsdp_param_group`` per unit where 2.13 keeps a list)."""
    import inspect

    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    classes = {"FSDPState": FSDPState, "FSDPParamGroup": FSDPParamGroup}
    state, group_source = FSDPState(), inspect.getsource(FSDPParamGroup)
    missing = ([f"FSDPState.{f}" for f in FSDP_STATE_FIELDS if not hasattr(state, f)]
               + [f"{c}.{m}" for c, ms in FSDP_METHODS.items() for m in ms if not hasattr(classes[c], m)]
               + [f"FSDPParamGroup.{f}" for f in FSDP_GROUP_FIELDS if f"self.{f}" not in group_source])
    if missing:
        raise RuntimeError(
            f"FSDP: alignkit gathers sharded weights through FSDP 2's internals as torch 2.13 has them, and "
            f"this torch {torch.__version__} has no {', '.join(missing)}: install torch==2.13.0, the version "
            "pyproject.toml pins (its CUDA build on a GPU: README, torch)")


def _fsdp_on_cpu_state() -> None:
    """Make accelerate run FSDP on a CPU-only multi-process launch.

    accelerate selects FSDP only for GPU-like devices: with ``cpu=True`` (needed to join the
    processes over gloo) it silently falls back to DDP, so an "FSDP" run on the CPU would hold the
    whole model in every process. torch's FSDP 2 itself runs on the CPU over gloo (all-gather and
    reduce-scatter of DTensor shards), so the process group is created for the CPU first and then
    marked FSDP; :func:`_attach_fsdp_plugin` gives the accelerator the plugin it would have read
    from the launch's ``FSDP_*`` variables."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    if state.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _attach_fsdp_plugin(acc, mixed_precision: str) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin

    if getattr(acc.state, "fsdp_plugin", None) is None:
        plugin = FullyShardedDataParallelPlugin()
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        acc.state.fsdp_plugin = plugin


def make_accelerator(run: RunConfig, grad_accum: int = 1, model: torch.nn.Module | None = None):
    """The accelerate engine for ``run``; ``model`` (the one to be trained) informs the
    mixed-precision choice (:func:`choose_mixed_precision`)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    check_deepspeed_launch()
    if fsdp_requested():
        check_fsdp_internals()
    memory = memory_setting(run.release_memory)
    mp, why = choose_mixed_precision(run.mixed_precision, model)
    trackers = []
    for name in [n.strip() for n in run.report_to.split(",") if n.strip()]:
        if name == "jsonl":
            continue
        if name == "tensorboard":
            trackers.append("tensorboard")
        elif name in ("wandb", "mlflow"):
            import importlib.util

            if importlib.util.find_spec(name) is None:
                log.warning("report_to=%s but %s is not installed: skipped", name, name)
                continue
            trackers.append(name)
        else:
            raise ValueError(f"run.report_to: unknown logger {name!r}; use jsonl, tensorboard, wandb or mlflow")
    on_cpu = launched_on_cpu_only()
    if on_cpu and fsdp_requested():
        _fsdp_on_cpu_state()
    acc = Accelerator(
        cpu=on_cpu,
        mixed_precision=mp,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=run.output_dir, logging_dir=str(Path(run.output_dir) / "tb")),
    )
    if on_cpu and fsdp_requested():
        _attach_fsdp_plugin(acc, mp)
    if acc.is_main_process:
        print(f"[alignkit] device={acc.device} processes={acc.num_processes} "
              f"engine={str(acc.distributed_type).split('.')[-1]} mixed_precision={mp} ({why}); "
              f"gradient_checkpointing={'on' if run.gradient_checkpointing else 'off'}"
              f"{'' if run.gradient_checkpointing else ' (enable with run.gradient_checkpointing=true to save memory)'}; "
              f"memory: {memory}")
    return acc


# --------------------------------------------------------------------------------------------
# Model preparation, optimizer, schedule
# --------------------------------------------------------------------------------------------


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Turn on activation checkpointing in every transformers model inside ``model`` (the
    outermost one of each nested family: a causal LM, a PPO critic's backbone, a reward model's
    body; through peft wrappers too). Returns how many were switched on.

    The checkpointed layers recompute their activations in the backward pass instead of storing
    them (non-reentrant, so LoRA with frozen embeddings still gets gradients). In ``eval()`` mode,
    as during generation, the layers run normally and keep their KV cache.
    """
    from transformers import PreTrainedModel

    def visit(module: torch.nn.Module) -> int:
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            # transformers 5 renamed it (the old name warns and goes in v6)
            enable = getattr(module, "activation_checkpointing_enable", None) or module.gradient_checkpointing_enable
            enable()
            return 1
        return sum(visit(child) for child in module.children())

    return visit(model)


def prepare_model(model: torch.nn.Module, run: RunConfig, dropout: bool = True) -> torch.nn.Module:
    """Make ``model`` ready to train under ``run``: gradient checkpointing when
    ``run.gradient_checkpointing`` (refused, by name, for a model with nothing to checkpoint) and,
    with ``dropout=False``, every dropout switched off (on-policy methods: π_old and π_θ must be
    one function, see :mod:`alignkit.models.dropout`). Precision is accelerate's, per process."""
    if not dropout:
        from alignkit.models.dropout import disable_dropout

        disable_dropout(model)
    if run.gradient_checkpointing and enable_gradient_checkpointing(model) == 0:
        raise ValueError(f"run.gradient_checkpointing=true, but {type(model).__name__} holds no transformers model "
                         "that supports it; set run.gradient_checkpointing=false")
    return model


def unsharded_architectures(folder: Path) -> None:
    """FSDP 2 renames a sharded class ``FSDP<Class>``, and ``save_pretrained`` writes that name in
    ``config.json``'s ``architectures``: write the model's own class name there instead, so the
    folder is the plain HF directory one process writes."""
    for path in Path(folder).rglob("config.json"):
        cfg = json.loads(path.read_text())
        names = cfg.get("architectures") or []
        fixed = [n[len("FSDP"):] if n.startswith("FSDP") else n for n in names]
        if fixed != names:
            cfg["architectures"] = fixed
            path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP 2 units inside ``model`` (outermost first), empty when it is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP 2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


#: Attribute set on every module of a model while :func:`full_weights` holds its gathered weights.
GATHERED = "_alignkit_full_weights"


@contextmanager
def full_weights(model: torch.nn.Module):
    """Under FSDP 2, the whole model's weights gathered on every process for the duration of the
    block, and sharded again at its end; anywhere else, nothing.

    A sharded model all-gathers each block's weights inside every forward call, a collective every
    process must join. Generation, rollout scoring, evaluation and saving make a *different* number
    of forward calls on each process (their shares differ, responses end at different lengths, the
    main process alone writes the model), which would hang. Inside this block every unit is
    gathered once (one all-gather per unit, in the same order on every process) and stays gathered
    across forward calls (its reshard-after-forward is switched off), so forwards make no
    collectives; the gathered copy is freed as soon as the block ends. Enter it on every process.
    """
    units = fsdp_modules(model)
    if not units:
        yield model
        return
    # The outermost unit must be the root: FSDP 2 makes whichever unit first runs forward the
    # root, and generation may start at an inner one (a PPO policy inside its actor-critic).
    units[0]._get_fsdp_state()._lazy_init()
    # Each unit's reshard-after-forward setting, to put back afterwards (FSDP 2 keeps it as the
    # mesh its parameter groups reshard to, and an "auto" flag for the root).
    saved = [(m._get_fsdp_state(), m._get_fsdp_state()._auto_reshard_after_forward,
              [g.post_forward_mesh_info for g in m._get_fsdp_state()._fsdp_param_groups]) for m in units]
    groups = [g for state, _, _ in saved for g in state._fsdp_param_groups]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    # FSDP's state-dict hooks would reshard the weights at ``state_dict()`` (and a save on the main
    # process alone would then wait forever for the others to gather them): off inside the block,
    # so ``state_dict()`` / ``save_pretrained`` see the gathered, plain weights.
    for g in groups:
        for handles in (g._module_to_pre_save_state_dict_hook_handle, g._module_to_pre_load_state_dict_hook_handle):
            for h in handles.values():
                h.remove()
            handles.clear()
    # Marks the modules gathered: a generator then tells ``generate`` that no process needs to
    # wait for the others (transformers otherwise syncs every token of an FSDP model over all
    # processes, assuming each forward gathers: with different prompt counts that hangs).
    for m in model.modules():
        m.__dict__[GATHERED] = True
    try:
        yield model
    finally:
        for m in model.modules():
            m.__dict__.pop(GATHERED, None)
        for state, auto, meshes in saved:
            state._auto_reshard_after_forward = auto
            for g, mesh in zip(state._fsdp_param_groups, meshes):
                g.post_forward_mesh_info = mesh
        for g in groups:
            g._register_state_dict_hooks()
        for m in units:
            m.reshard()


def _keep_ties_through_sharding(model: torch.nn.Module) -> None:
    """accelerate's FSDP 2 preparation re-creates the parameters (on the meta device, then loaded)
    and re-ties shared weights by calling ``model.tie_weights()``, which only a transformers model
    has. A wrapper (PPO's actor-critic) gets one that re-ties every transformers model inside it;
    otherwise a tied output head would come out as a separate parameter the optimizer never sees."""
    from transformers import PreTrainedModel

    if hasattr(model, "tie_weights"):
        return
    inner = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    if inner:
        model.tie_weights = lambda *args, **kwargs: [m.tie_weights() for m in inner]


def _check_optimizer_holds_every_trainable_parameter(model: torch.nn.Module, optimizer) -> None:
    """After preparation (FSDP replaces parameters), every trainable parameter must be one the
    optimizer steps: one left out would receive gradients and silently never change."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if left:
        raise RuntimeError(f"after preparing the model for {type(model).__name__}, {len(left)} trainable parameter(s) are "
                           f"not in the optimizer ({', '.join(left[:3])}): a weight tie or a parameter was lost in "
                           "sharding. Report it with the model and the accelerate config")


def build_optimizer(model: torch.nn.Module, optim: OptimConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms and biases: no weight decay
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.adam_betas)


def build_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    from transformers import get_scheduler

    names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    if optim.schedule not in names:
        raise ValueError(f"optim.schedule must be one of {', '.join(names)}; got {optim.schedule!r}")
    warmup = int(round(optim.warmup_ratio * total_steps))
    return get_scheduler(names[optim.schedule], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of ``output_dir`` (one with its state file), or None."""
    return next(iter(resumable_checkpoints(output_dir)), None)


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


@dataclass
class StepStats:
    """What one optimizer step measured on *this* process (the driver reduces over processes)."""

    local_units: float = 0.0
    """Loss units (tokens, weighted sequences) of this process's micro-batches, filler excluded."""
    total_units: float = 0.0
    """Loss units of the whole step: all micro-batches of all processes (the loss's divisor)."""
    loss_sum: float = 0.0
    """Σ of the per-unit losses of this process's micro-batches (the loss is loss_sum / total_units)."""
    metrics: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    """Σ metric × units per metric name (extra-loss metrics weighted by local_units)."""
    grad_norm: float | None = None
    """Global gradient norm before clipping (None where the backend does not report it)."""
    skipped: bool = False
    """The update was skipped: the loss or the gradient norm was not finite."""


class Engine:
    """Accelerator, prepared model and optimizer, schedule, checkpoints, logs of one run.

    ``total_steps`` counts what the run's progress and checkpoints count: optimizer steps offline,
    rollouts online (``unit`` names it in messages). ``dropout=False`` switches dropout off.
    """

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, run: RunConfig, total_steps: int,
                 optimizer_steps: int | None = None, name: str = "train", config: Any = None, accelerator=None,
                 dropout: bool = True, unit: str = "step", resume_hint: str = "", data: Any = None):
        from alignkit.train.outputs import OutputLock, claim_output_dir, run_fingerprint

        if run.max_nonfinite_steps < 1:
            raise ValueError(f"run.max_nonfinite_steps={run.max_nonfinite_steps}: must be ≥ 1")
        self.optim, self.run, self.name, self.config = optim, run, name, config
        self.total_steps, self.unit, self.resume_hint = total_steps, unit, resume_hint
        self.acc = accelerator or make_accelerator(run, model=model)
        # The output folder: one writer at a time, no finished model or unfinished run's
        # checkpoints silently overwritten, an interrupted final save finished (train/outputs.py).
        self._lock = None
        if self.acc.is_main_process:
            self._lock = OutputLock(run.output_dir).acquire()
            try:
                claim_output_dir(run.output_dir, run.resume, run.overwrite)
            except BaseException:
                self._release()
                raise
        self.acc.wait_for_everyone()
        # What shapes the result (settings and a digest of ``data``, what the run trains on): a
        # resume must match it (``run.resume_changed`` allows otherwise).
        self.fingerprint = run_fingerprint(config, data, processes=self.acc.num_processes, total_steps=total_steps)
        prepare_model(model, run, dropout=dropout)
        optimizer = build_optimizer(model, optim)
        # The schedule counts optimizer steps (online: several per rollout).
        scheduler = build_scheduler(optimizer, optim, optimizer_steps or total_steps)
        if fsdp_requested():
            _keep_ties_through_sharding(model)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        _check_optimizer_holds_every_trainable_parameter(self.model, self.optimizer)
        # Not prepared: accelerate would step it once per process; total_steps already counts
        # global optimizer steps. Registered so checkpoints still hold its state.
        self.scheduler = scheduler
        self.acc.register_for_checkpointing(scheduler)
        self.skipped_nonfinite = 0
        """Optimizer steps skipped for a non-finite loss or gradient norm since the run began (resume included)."""
        self._nonfinite_streak = 0
        self._state: dict[str, Any] = {}
        self.writer = None
        self.progress = None
        # The caller's callbacks (API calls put them in the run's context, alignkit/context.py).
        from alignkit.context import current
        from alignkit.train.callbacks import Callbacks

        self.callbacks = Callbacks(current().callbacks if current() is not None else None)
        self.stopped_at: int | None = None
        """The step after which a callback stopped the run (None: it ran to the end)."""
        self._last: tuple[int, dict] = (0, {})  # the last step's metrics, for on_end
        self._ended = False

    @property
    def device(self):
        return self.acc.device

    def unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    def register_state(self, state: dict[str, Any]) -> None:
        """Objects with ``state_dict()``/``load_state_dict()`` to keep in checkpoints (a KL
        controller, a Lagrange multiplier); None values are left out. Call before :meth:`resume`."""
        self._state = {k: v for k, v in state.items() if v is not None}

    # ---- the optimizer step --------------------------------------------------------------------
    def step(self, micro: list[tuple[Any, float]], units: Callable[[Any], float],
             loss: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict]],
             extra_loss: Callable[[torch.nn.Module], tuple[torch.Tensor, dict]] | None = None,
             where: str = "") -> StepStats:
        """One optimizer step over this process's micro-batches ``micro`` = [(batch, weight)].

        ``units(batch)`` counts a batch's loss units; ``loss(model, batch)`` returns the *sum* of
        its per-unit losses and metrics (batch means). Each is scaled by weight × processes / (units
        of the whole step over all processes) before ``backward``: DDP averages gradients over
        processes, so the result is Σ(all unit losses) / (all units), the single-big-batch
        gradient. A weight of 0 marks a filler slot (a process with fewer examples runs one so that
        every process makes the same forward/backward calls and collectives). ``extra_loss(model)``
        (PPO-ptx) is added once, unscaled. Then clip, and step unless the guard skips (see
        :meth:`_apply`); ``where`` (e.g. ``"step 12"``) names the step in messages.
        """
        acc = self.acc
        stats = StepStats(local_units=sum(float(units(b)) * w for b, w in micro))
        total_units = acc.reduce(torch.tensor(stats.local_units, device=acc.device), reduction="sum").clamp_min(1e-8)
        stats.total_units = float(total_units)
        for j, (batch, w) in enumerate(micro):
            sync = acc.no_sync(self.model) if j < len(micro) - 1 else nullcontext()
            with sync, acc.autocast():
                loss_sum, metrics = loss(self.model, batch)
                scaled = loss_sum * (w * acc.num_processes) / total_units
            acc.backward(scaled)
            u = float(units(batch)) * w
            stats.loss_sum += float(loss_sum.detach()) * w
            for name, v in metrics.items():
                stats.metrics[name] += float(v) * u
        extra_finite = True
        if extra_loss is not None:
            with acc.autocast():
                extra, metrics = extra_loss(self.model)
            acc.backward(extra)
            extra_finite = math.isfinite(float(extra.detach()))
            for name, v in metrics.items():
                stats.metrics[name] += float(v) * stats.local_units
        # max_norm=inf measures the norm (the guard needs it) and scales the gradients by exactly 1.
        norm = acc.clip_grad_norm_(self.model.parameters(), self.optim.max_grad_norm or math.inf)
        stats.grad_norm = None if norm is None else float(norm)
        self._apply(stats, math.isfinite(stats.loss_sum) and extra_finite, where)
        return stats

    def _apply(self, stats: StepStats, loss_finite: bool, where: str) -> None:
        """The non-finite guard, then the update: skip a step whose loss or gradient norm is not
        finite (the weights and optimizer moments stay as they were), stop the run after
        ``run.max_nonfinite_steps`` such steps in a row. The schedule advances either way, so the
        learning rate stays a function of the step index (and a resumed run's schedule matches)."""
        grad_finite = stats.grad_norm is None or math.isfinite(stats.grad_norm)
        if self.acc.num_processes > 1:  # every process must take the same decision
            flags = torch.tensor([float(not loss_finite), float(not grad_finite)], device=self.acc.device)
            loss_finite, grad_finite = (float(x) == 0 for x in self.acc.reduce(flags, reduction="sum"))
        # Under fp16 loss scaling an overflowing gradient is the scaler's business: its step skips
        # the update and lowers the scale, which is how it finds its scale in the first place.
        scaler_overflow = self.acc.scaler is not None and loss_finite and not grad_finite
        if (loss_finite and grad_finite) or scaler_overflow:
            self.optimizer.step()
            self._nonfinite_streak = 0
        else:
            stats.skipped = True
            self.skipped_nonfinite += 1
            self._nonfinite_streak += 1
            what = "loss" if not loss_finite else "gradient norm"
            if self.acc.is_main_process:
                print(f"[alignkit] {self.name} {where}: non-finite {what} (loss sum {stats.loss_sum:g}, gradient norm "
                      f"{stats.grad_norm}); update skipped ({self._nonfinite_streak} in a row, "
                      f"{self.skipped_nonfinite} in all)")
        with warnings.catch_warnings():  # torch warns when the first optimizer step was the skipped one
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._nonfinite_streak >= self.run.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.name}: {self._nonfinite_streak} optimizer steps in a row (the last: {where or 'this one'}) had a "
                f"non-finite loss or gradient norm and were skipped (run.max_nonfinite_steps="
                f"{self.run.max_nonfinite_steps}); the run stops and no model is saved. The training diverged: {FIXES}")

    # ---- checkpoints and the final model ---------------------------------------------------------
    def save_checkpoint(self, step: int, extra: dict | None = None) -> None:
        """Write a resumable checkpoint after ``step`` (optimizer steps offline, rollouts online):
        model, optimizer, scheduler and RNG through accelerate, plus ``trainer_state.json`` (the
        step, the run length, the registered objects, the non-finite counters and ``extra``).
        Written into a temporary directory renamed into place, so a checkpoint directory is
        complete or absent; only the newest ``run.keep_checkpoints`` are kept."""
        root = Path(self.run.output_dir) / CHECKPOINT_DIR
        final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        # Every process writes its own files into tmp (its RNG state; under FSDP with sharded state
        # dicts its shards): all must have finished before the main process renames tmp, or a
        # slower one finds its folder gone ("Parent directory .tmp-step-N does not exist").
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            state = {"step": step, "total_steps": self.total_steps, "fingerprint": self.fingerprint,
                     "state": {name: obj.state_dict() for name, obj in self._state.items()},
                     "nonfinite": {"skipped": self.skipped_nonfinite, "streak": self._nonfinite_streak},
                     **(extra or {})}
            (tmp / STATE_FILE).write_text(json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # atomic: a checkpoint directory is complete or absent
            old = sorted(root.glob("step-*"), key=checkpoint_step)
            for p in old[: max(0, len(old) - self.run.keep_checkpoints)]:
                shutil.rmtree(p, ignore_errors=True)
            self.callbacks.checkpoint(step, str(final))
        self.acc.wait_for_everyone()

    def resume(self) -> tuple[int, dict]:
        """With ``run.resume``, continue from the newest intact checkpoint: restore model,
        optimizer, scheduler, RNG and the registered objects. Returns (the step to continue from,
        the checkpoint's state dict); (0, {}) when not resuming or there is no checkpoint.

        A damaged checkpoint (a truncated weight or optimizer file, a garbled state file, or one
        that fails to load) is skipped with a message for the previous intact one; a checkpoint
        written with other settings (:mod:`alignkit.train.outputs` fingerprint) stops the run with
        the list of differences, unless ``run.resume_changed``; resuming a finished run says so."""
        from alignkit.train.outputs import check_resume_settings, finished_run, intact_checkpoints

        main = self.acc.is_main_process
        log = print if main else (lambda *_: None)
        if not self.run.resume:
            return 0, {}
        done = finished_run(self.run.output_dir)
        if done is not None:
            # Replaying the end of a finished run (with the same settings, checked below) is
            # legitimate, but never silent: its model will be replaced.
            log(f"[alignkit] resume: {self.run.output_dir} holds a finished run (saved {done.get('finished', '?')}); "
                "continuing from its newest checkpoint replaces that model at the end")
        for ckpt, saved in intact_checkpoints(self.run.output_dir, log):
            check_resume_settings(ckpt, saved.get("fingerprint"), self.fingerprint, self.run.resume_changed, log)
            if saved.get("total_steps") != self.total_steps:
                raise ValueError(f"resume: {ckpt} was written by a run of {saved.get('total_steps')} {self.unit}s but this "
                                 f"run has {self.total_steps}; {self.resume_hint or 'keep the same settings'} to resume")
            try:
                self.acc.load_state(str(ckpt))
                for name, obj in self._state.items():
                    obj.load_state_dict(saved["state"][name])
            except Exception as e:  # damaged in a way the cheap checks missed: the next one restores everything
                log(f"[alignkit] resume: checkpoint {ckpt.name} failed to load ({type(e).__name__}: {e}); "
                    "falling back to the previous one")
                continue
            counters = saved.get("nonfinite", {})
            self.skipped_nonfinite, self._nonfinite_streak = counters.get("skipped", 0), counters.get("streak", 0)
            log(f"[alignkit] resumed from {ckpt} at {self.unit} {saved['step']}/{self.total_steps}")
            return int(saved["step"]), saved
        log(f"[alignkit] resume: no intact checkpoint in {self.run.output_dir}; starting from scratch")
        return 0, {}

    def save_final(self, write: Callable[[Path], Any], output_dir: str | Path | None = None) -> Any:
        """Save the finished model: ``write(folder)`` writes it (``save_model``, a reward model's
        save, a critic's template) on the main process into ``output_dir`` (default
        ``run.output_dir``). Weights that are not finite are refused with an error naming them:
        a diverged run never leaves a NaN model behind. Returns what ``write`` returns (None on
        the other processes)."""
        from alignkit.context import current
        from alignkit.train.card import write_model_card
        from alignkit.train.outputs import check_finite_weights, final_save

        out = Path(output_dir or self.run.output_dir)
        result = None
        record = {"command": self.name, "steps": self.total_steps}
        if self.stopped_at is not None:
            record["stopped_at"] = self.stopped_at
        try:
            # FSDP: the full weights on every process while the main one writes them (a plain HF
            # directory, as from one process); sharded again afterwards.
            with full_weights(self.unwrapped()):
                check_finite_weights(self.unwrapped(), f"{self.name}: the trained model")
                if self.acc.is_main_process:
                    # Atomic: written aside, then moved into place (train/outputs.py final_save); the
                    # model card is among the files, so a finished folder always explains itself.
                    with final_save(out, record) as tmp:
                        result = write(tmp)
                        ctx = current()
                        write_model_card(tmp, getattr(ctx, "command", "") or self.name, self.config,
                                         out / "metrics.jsonl", self.stopped_at)
                        if fsdp_modules(self.unwrapped()):
                            unsharded_architectures(tmp)
                self.acc.wait_for_everyone()
        finally:
            self._release()
        return result

    def _release(self) -> None:
        """Give the output folder's lock back (after the final save, or when the run fails)."""
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None

    def __del__(self):
        try:
            self._release()
        except Exception:  # interpreter shutdown: the kernel drops the lock anyway
            pass

    # ---- metrics, progress, evaluation ---------------------------------------------------------------
    def open_logs(self, start: int) -> None:
        """Start the metrics writer (``metrics.jsonl``, trackers, the run's config) and the
        progress bar at ``start`` of ``total_steps``."""
        from alignkit.train.progress import MetricsWriter, Progress

        self.writer = MetricsWriter(self.run, self.acc, self.config, start=start)
        self.progress = Progress(self.name, self.total_steps, start, enabled=self.run.progress and self.acc.is_main_process)

    def log(self, row: dict, done: int, tokens_per_s: float) -> None:
        """Record the metrics ``row`` of step ``done``: written every ``run.log_every`` steps and
        at the last; the progress bar shows its loss."""
        if done % max(1, self.run.log_every) == 0 or done == self.total_steps:
            self.writer.write(row, done)
        self.progress.update(done, float(row.get("loss", float("nan"))), tokens_per_s)
        self._last = (done, dict(row))
        if self.acc.is_main_process:
            self.callbacks.step(done, row)
        self._sync_stop(done)

    def _sync_stop(self, done: int) -> None:
        """Every process learns whether a callback (run on the main process) asked to stop after
        step ``done``; a request at the last step changes nothing."""
        stop = self.callbacks.stop_requested
        if self.acc.num_processes > 1 and self.callbacks.items:  # every process runs the same call, same callbacks
            stop = float(self.acc.reduce(torch.tensor(float(stop), device=self.acc.device), reduction="sum")) > 0
        if stop and done < self.total_steps and self.stopped_at is None:
            self.stopped_at = done
            if self.acc.is_main_process:
                print(f"[alignkit] {self.name}: a callback asked to stop after {self.unit} {done}/{self.total_steps}; "
                      "saving a resumable checkpoint and the model")

    @property
    def stop_requested(self) -> bool:
        """A callback asked the run to stop (the driver checkpoints and leaves its loop)."""
        return self.stopped_at is not None

    def write(self, row: dict, done: int) -> None:
        """Write a row outside the per-step cadence (the final evaluation)."""
        self.writer.write(row, done)
        self._last = (done, {**(self._last[1] if self._last[0] == done else {}), **row})
        evals = {k: v for k, v in row.items() if k.startswith("eval/")}
        if evals and self.acc.is_main_process:
            self.callbacks.evaluate(done, evals)

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def close_logs(self) -> None:
        self.close_progress()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if not self._ended and self.acc.is_main_process:
            self._ended = True
            self.callbacks.end(*self._last)

    def evaluate(self, fn: Callable[[torch.nn.Module], dict[str, float]]) -> dict[str, float]:
        """``fn(unwrapped model)`` in eval mode without gradients; the training mode is restored."""
        model = self.unwrapped()
        was_training = model.training
        model.eval()
        with torch.no_grad(), full_weights(model):  # FSDP: every process may run a different number of forwards
            out = fn(model)
        model.train(was_training)
        return out

    def due_evaluation(self, done: int) -> bool:
        """True after step ``done`` when ``run.eval_every`` asks for an evaluation there (the last
        step's evaluation is the final one, run separately)."""
        return bool(self.run.eval_every) and done % self.run.eval_every == 0 and done < self.total_steps

    def due_checkpoint(self, done: int) -> bool:
        """True after step ``done`` when ``run.save_every`` asks for a checkpoint there (none after
        the last step: the final model is saved instead)."""
        due = bool(self.run.save_every) and done % self.run.save_every == 0
        return (due or self.stop_requested) and done < self.total_steps
