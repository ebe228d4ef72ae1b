"""Typed configuration: dataclasses composed from shared sections, YAML files, ``key=value`` overrides.

Every field carries a one-line docstring directly under it; :func:`field_docs` reads those from the
source, so ``alignkit <command> --help`` lists every field with its doc and default without the
docs being written twice. A config is built in three layers, later ones winning::

    dataclass defaults  <  --config file.yaml  <  key=value overrides on the command line

Keys are dotted paths (``optim.lr=1e-4``); a leaf name that is unique in the config may be given
alone (``lr=1e-4``). An unknown or misspelt key is rejected with the nearest valid names.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which model to start from and how to adapt it."""

    path: str = ""
    """Local HF model directory (or hub name when online) to start from, e.g. the output of an earlier stage."""
    tokenizer: str = ""
    """Tokenizer directory or name; empty means the same as `path`."""
    lora: bool = False
    """Train LoRA adapters (peft) instead of all weights; the frozen base doubles as the reference model."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_target_modules: str = "all-linear"
    """Modules that get adapters: 'all-linear' or a comma-separated list of module names."""
    dtype: str = "auto"
    """Weight dtype: 'auto' (float32 master weights), 'float32', 'bfloat16' or 'float16' (frozen weights only, on a GPU: trained float16 weights turn NaN; use run.mixed_precision=fp16)."""
    attn_implementation: str = "auto"
    """Attention kernel passed to transformers: 'auto' (transformers' default for the model), 'eager', 'sdpa', 'flash_attention_2', 'flex_attention', ..."""
    trust_remote_code: bool = False
    """Run model and tokenizer code shipped in the model's repository (needed by some hub models; only for sources you trust)."""


@dataclass
class DataConfig:
    """Where training data comes from and how it is cut into tokens."""

    path: str = ""
    """Training data: a .jsonl/.json/.parquet/.csv file, a saved `datasets` directory, or a hub name when online."""
    format: str = "auto"
    """Record format: auto, pairwise, hh, ranked, unpaired, ratings, response, sft, text, prompt, critique_pair or critique_point ('auto' detects it from each row's fields)."""
    split: str = "train"
    """Split to read from a `datasets` dataset."""
    limit: int = 0
    """Read at most this many records (0 = all)."""
    shuffle: bool = True
    """Shuffle the records (with `run.seed`) before the train/eval split."""
    eval_path: str = ""
    """Separate evaluation file; empty means carve `eval_fraction` / `eval_size` out of `path`."""
    eval_split: str = ""
    """Split of a `datasets` source to evaluate on (e.g. test), read from `eval_path` if set, else from `path`."""
    eval_fraction: float = 0.0
    """Fraction of records held out for evaluation when no `eval_path` is given."""
    eval_size: int = 0
    """Number of records held out for evaluation (overrides `eval_fraction` when > 0)."""
    max_length: int = 512
    """Longest tokenised sequence (prompt + response); longer ones are truncated and counted."""
    max_prompt_length: int = 384
    """Longest prompt; longer prompts keep their end (the most recent turns)."""
    margin_labels: dict[str, float] = field(default_factory=dict)
    """Overrides of the numeric margin given to Llama 2 label strings, e.g. {"significantly better": 3.0}."""
    group_rankings: bool = False
    """Keep the k(k-1)/2 pairs of one k-way ranking in one batch, weighted as one example (InstructGPT)."""
    strict: bool = False
    """Fail on records that would otherwise be skipped and counted (identical pairs, empty responses, unsplittable HH transcripts)."""
    assistant_turns: str = "all"
    """SFT `messages` rows: train every assistant turn ('all', as TRL's assistant_only_loss: each was written as a reply to its context) or only the final reply ('last'); system, user and tool turns are never trained."""


@dataclass
class OptimConfig:
    """Optimiser, schedule and batch sizes. One definition of each batch size:

    - ``batch_size``: examples per device per forward pass (a micro-batch);
    - global batch = ``batch_size`` × ``grad_accum`` × number of processes = examples per optimizer step.
    """

    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    batch_size: int = 8
    """Examples per device per forward pass (micro-batch)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed); ignored when `max_steps` > 0."""
    max_steps: int = 0
    """Optimizer steps to run (0 = derive from `epochs`)."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    schedule: str = "cosine"
    """Decay after warm-up: cosine, linear or constant."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""


@dataclass
class RunConfig:
    """Output, checkpoints, logging and the compute set-up of a run."""

    output_dir: str = "runs/out"
    """Directory for the final model, checkpoints and logs."""
    seed: int = 0
    """Seed for data order, initialisation and sampling; the same seed repeats a run."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0 = only at the end)."""
    save_every: int = 0
    """Write a resumable checkpoint every N optimizer steps (0 = only the final model)."""
    keep_checkpoints: int = 2
    """Checkpoints to keep on disk (older ones are deleted)."""
    resume: bool = False
    """Continue from the newest checkpoint in `output_dir` (model, optimizer, scheduler, RNG, data position)."""
    resume_changed: bool = False
    """Allow `resume` to continue a checkpoint written with other settings (data, model, optimiser, seed, method); the differences are logged."""
    overwrite: bool = False
    """Replace the finished model (or an unfinished run's checkpoints) already in `output_dir`; otherwise such a folder is refused."""
    log_every: int = 1
    """Write metrics every N optimizer steps."""
    report_to: str = "jsonl,tensorboard"
    """Comma-separated loggers: jsonl, tensorboard, wandb, mlflow (the last two through accelerate, when installed)."""
    tracker_project: str = "alignkit"
    """Project of the trackers in report_to: the W&B project, the MLflow experiment, the TensorBoard subfolder of output_dir/tb."""
    run_name: str = ""
    """Name of this run in W&B and MLflow (empty: the tracker picks one)."""
    mixed_precision: str = "auto"
    """'auto' (bf16 on a CUDA GPU with bf16, or on a CPU with native bf16 instructions for hidden size ≥ 256; else fp32), 'no', 'bf16' or 'fp16'."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (slower); applies to every model trained (a PPO critic too)."""
    max_nonfinite_steps: int = 3
    """Optimizer steps in a row with a non-finite loss or gradient norm (each skipped, counted as skipped_nonfinite) that stop the run with an error."""
    progress: bool = True
    """Show a progress bar with loss, tokens/s and ETA."""
    padding_free: bool = False
    """Pack several examples per row with block-diagonal attention instead of padding (SFT, RM)."""
    release_memory: bool = True
    """Return freed CPU memory to the OS (glibc: blocks of 1 MiB or more get their own pages), so the resident memory tracks what is alive; false keeps the allocator's defaults (alignkit/train/memory.py)."""
    logps_path: str = "auto"
    """Log-probs of sft, dpo, kto, critic, rs, ppo, grpo, rloo (at the sampling temperature): 'chunked' (through the output head in chunks, no (B, T, V) logits), 'full' (from the logits), 'auto' (chunked where the head can be split off)."""


# --------------------------------------------------------------------------------------------
# Reading field docs, building, overriding
# --------------------------------------------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass ``cls`` (and its bases) to the docstring written under it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # pragma: no cover - classes built at run time
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def unread_options(cls: type) -> dict[str, str]:
    """Options of the shared sections that command config ``cls`` never reads (its ``UNREAD``
    class attribute: dotted key → why): not offered in ``--help`` and refused when given, so a
    command only has options it reads."""
    return dict(getattr(cls, "UNREAD", {}) or {})


def flat_fields(cls: type, prefix: str = "") -> dict[str, tuple[type, Any, str]]:
    """All leaf fields of a (nested) config class as ``dotted.key -> (type, default, doc)``,
    less the options the command does not read (:func:`unread_options`)."""
    out: dict[str, tuple[type, Any, str]] = {}
    hints = _hints(cls)
    docs = field_docs(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            out.update(flat_fields(tp, prefix + f.name + "."))
        else:
            out[prefix + f.name] = (tp, value, docs.get(f.name, ""))
    if not prefix:
        for key in unread_options(cls):
            out.pop(key, None)
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to type ``tp`` or fail clearly."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot use {value!r}")
    if isinstance(value, str) and tp is not str:
        # Values from the command line arrive as strings; parse them as YAML scalars/collections.
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse {value!r}: {e}") from None
    want = origin or tp
    if want is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if want is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads "3e-4" as a string; Python reads it as the number users mean
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if want is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if want is tuple:
        if not isinstance(value, (list, tuple)) or (args and len(value) != len(args)):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if want is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], key) if args else v for v in value]
    if want is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping like {{a: 1}}, got {value!r}")
        kt, vt = args if args else (str, Any)
        return {_coerce(k, kt, key): (v if vt is Any else _coerce(v, vt, key)) for k, v in value.items()}
    if want is Any:
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _resolve_key(cls: type, key: str) -> str:
    """Turn a user key (dotted or a unique leaf name) into its full dotted path."""
    fields = flat_fields(cls)
    if key in fields:
        return key
    matches = [k for k in fields if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"'{key}' is ambiguous: say one of {', '.join(matches)}")
    unread = unread_options(cls)
    for k, why in unread.items():
        if key in (k, k.rsplit(".", 1)[-1]):
            raise ConfigError(f"'{key}' is not an option of this command: {why}")
    leaves = list(fields) + sorted({k.rsplit('.', 1)[-1] for k in fields})
    close = difflib.get_close_matches(key, leaves, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown config key '{key}'.{hint} (`--help` lists every key)")


def _set(obj: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        obj = getattr(obj, p)
    setattr(obj, parts[-1], value)


def _flatten_mapping(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """Nested YAML mapping -> dotted keys; stops at keys that are dict-typed fields themselves."""
    out = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not key.endswith("margin_labels") and not key.endswith("weights"):
            out.update(_flatten_mapping(v, key + "."))
        else:
            out[key] = v
    return out


def build_config(cls: type, yaml_path: str | Path | None = None, overrides: list[str] | None = None):
    """Build ``cls`` from defaults, an optional YAML file and ``key=value`` overrides."""
    cfg = cls()
    items: list[tuple[str, Any, str]] = []
    if yaml_path:
        path = Path(yaml_path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        items += [(k, v, f"{path}: ") for k, v in _flatten_mapping(data).items()]
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' is not of the form key=value")
        k, v = ov.split("=", 1)
        items.append((k.strip(), v, ""))
    return _apply(cfg, items)


def apply_overrides(cfg: Any, overrides: dict[str, Any]):
    """``cfg`` with ``overrides`` (dotted or unique leaf names -> values) applied exactly as
    ``key=value`` command-line overrides are (the same names, type checks and range checks), then
    every number range-checked and the config validated. ``cfg`` itself is changed and returned."""
    return _apply(cfg, [(k, v, "") for k, v in overrides.items()])


def _apply(cfg: Any, items: list[tuple[str, Any, str]]):
    cls = type(cfg)
    fields = flat_fields(cls)
    for key, value, where in items:
        try:
            full = _resolve_key(cls, key)
            value = _coerce(value, fields[full][0], full)
            _check_range(full, value, fields[full][2])
            _set(cfg, full, value)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
    check_numbers(cfg)  # the defaults too, and values set on the dataclass in Python
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _check_range(key: str, value: Any, doc: str) -> None:
    from alignkit.config_checks import problem

    why = problem(key, value)
    if why:
        raise ConfigError(f"{why} — {doc}" if doc else why)


def _get(obj: Any, dotted: str) -> Any:
    for p in dotted.split("."):
        obj = getattr(obj, p)
    return obj


def check_numbers(cfg: Any) -> None:
    """Range-check every number of config ``cfg`` (see :mod:`alignkit.config_checks`); ConfigError if one is out."""
    for key, (_, _, doc) in flat_fields(type(cfg)).items():
        _check_range(key, _get(cfg, key), doc)


def config_to_dict(cfg: Any) -> dict:
    """A plain nested dict of ``cfg`` (for saving next to a run's outputs)."""
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Any) -> str:
    """``cfg`` as YAML (tuples written as lists), as saved in alignkit_config.yaml and shown in model cards."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return yaml.safe_dump(plain(config_to_dict(cfg)), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg), encoding="utf-8")


def help_text(cls: type) -> str:
    """Every field with its type, default and doc, grouped by section."""
    lines = []
    section = None
    for key, (tp, default, doc) in flat_fields(cls).items():
        sec = key.rsplit(".", 1)[0] if "." in key else ""
        if sec != section:
            section = sec
            lines.append(f"\n[{sec or 'options'}]")
        tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
        lines.append(f"  {key}={default!r}  ({tname})")
        if doc:
            lines.append(textwrap.fill(doc, width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)
