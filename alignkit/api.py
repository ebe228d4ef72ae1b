"""The Python API: one function per method, the same run functions the command line calls.

::

    import alignkit

    sft = alignkit.sft(model="HuggingFaceTB/SmolLM2-135M-Instruct", data=rows, output_dir="runs/sft", max_steps=50)
    dpo = alignkit.dpo(model=sft.model, tokenizer=sft.tokenizer, data=pairs, output_dir="runs/dpo", beta=0.1)
    print(dpo.metrics["loss"], dpo.output_dir)

Every function takes:

- ``config``: the method's typed config (``SFTConfig``, ``DPOConfig``, ...; default: its defaults).
  It is copied, never changed;
- ``**overrides``: options by the names the command line takes (``lr=1e-5``, ``max_steps=3``,
  ``output_dir="out"``; a dotted name through ``**{"optim.lr": 1e-5}``), checked exactly as
  ``key=value`` arguments are (names, types, ranges), applied on top of ``config``;
- ``model`` / ``tokenizer``: a path or hub name (as ``model.path`` / ``model.tokenizer``), or the
  objects themselves. A model object goes through the loader's checks (causal, float16) and is
  trained in place, at its own dtype and device (``model.dtype`` applies to paths only); with
  ``lora=True`` it is wrapped in adapters and ``Result.model`` is the merged copy. It needs its
  tokenizer, which gets a pad token and right padding if it lacks them. For ``rm`` a causal-LM
  object gets a fresh scalar head, as a causal-LM directory does;
- ``data`` / ``eval_data``: a path, or in-memory data: a ``datasets.Dataset``, a ``DatasetDict``
  (``split`` / ``eval_split`` pick from it) or a list of dicts in any format the file readers
  accept. In-memory rows go through the same reading, validation (errors name ``memory:data[i]``
  and the field), tokenisation and data report as rows of a file;
- ``callbacks``: :class:`~alignkit.train.callbacks.Callback` objects (``EarlyStopping``);
- per method: ``reference`` (a reference-model object for dpo, kto, ppo, grpo, rloo; for dpo and
  kto a string is the ``reference`` option), ``reward`` (ppo, grpo, rloo, rs: a batched callable
  ``reward(prompts, responses) -> N floats``, or a ``RewardSource``; added to any configured
  reward models), ``cost`` (ppo).

Each returns a :class:`Result`. Objects are registered in the run's context under
``memory:NAME`` paths (:mod:`alignkit.context`), which the saved ``alignkit_config.yaml`` and the
model card show, so the command line and the API share every line of the run.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: API function -> (command of alignkit.cli.COMMANDS, Python-only inputs it takes beyond the common ones)
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sft": ("sft", ()),
    "rm": ("rm", ()),
    "eval_rm": ("eval-rm", ()),
    "score": ("score", ()),
    "dpo": ("dpo", ("reference",)),
    "kto": ("kto", ("reference",)),
    "ppo": ("ppo", ("reference", "reward", "cost")),
    "grpo": ("grpo", ("reference", "reward")),
    "rloo": ("rloo", ("reference", "reward")),
    "rs": ("rs", ("reward",)),
    "critic": ("critic", ()),
}


@dataclass
class Result:
    """What an API call returns."""

    command: str
    """The method run (sft, dpo, ...)."""
    output_dir: Path | None
    """Where the model, its card (README.md), config and metrics were saved (score: the scores file)."""
    model: Any = None
    """The trained model as saved (LoRA merged); None for eval_rm and score."""
    tokenizer: Any = None
    """Its tokenizer (as saved)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Final metrics: every metric ``metrics.jsonl`` holds at the last step (training and final
    evaluation, the model card's figures); eval_rm: its accuracy metrics."""
    eval_metrics: dict[str, float] = field(default_factory=dict)
    """The final evaluation's ``eval/...`` metrics (empty without evaluation data)."""
    history: list[dict] = field(default_factory=list)
    """Every row of ``metrics.jsonl``."""
    data_reports: list = field(default_factory=list)
    """(source, DataReport) of every data source read: read, kept, skipped, truncated."""
    config: Any = None
    """The config the run used (overrides applied; in-memory inputs as memory:NAME paths)."""
    raw: Any = None
    """What the run function returned (TrainResult, OnlineResult, metrics dict, path)."""
    stopped_at: int | None = None
    """The step after which a callback stopped the run (None: it ran to the end)."""


def _describe(value: Any) -> str:
    """A short form of an argument for the stated API call (no dumps of data or weights)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return repr(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
        return repr(value)
    n = len(value) if hasattr(value, "__len__") else None
    kind = type(value).__name__
    if isinstance(value, list):
        return f"<list of {n} records>"
    if hasattr(value, "num_rows") and not isinstance(getattr(value, "num_rows"), dict):
        return f"<{kind} of {value.num_rows} rows>"
    name = getattr(value, "name_or_path", "") or ""
    if hasattr(value, "parameters") or hasattr(value, "apply_chat_template"):  # a model or a tokenizer
        return f"<{kind}{' ' + str(name) if name else ''}>"
    if callable(value):
        return f"<function {getattr(value, '__name__', kind)}>"
    return f"<{kind} of {n}>" if n is not None else f"<{kind}>"


def _run(name: str, config: Any, inputs: dict[str, Any], callbacks: list | None, overrides: dict[str, Any]) -> Result:
    from alignkit.cli import COMMANDS
    from alignkit.config import apply_overrides
    from alignkit.context import RunContext, run_context
    from alignkit.models.loading import MEMORY_MODEL, MEMORY_REFERENCE, MEMORY_TOKENIZER
    from alignkit.train.card import evaluations, final_metrics, read_metrics

    command, extra = METHODS[name]
    module, cfg_name, fn_name, _ = COMMANDS[command]
    mod = importlib.import_module(module)
    cfg_cls, run = getattr(mod, cfg_name), getattr(mod, fn_name)
    if config is not None and not isinstance(config, cfg_cls):
        raise TypeError(f"alignkit.{name}: config must be a {cfg_cls.__name__}, got {type(config).__name__}")
    cfg = copy.deepcopy(config) if config is not None else cfg_cls()
    call = [f"{k}={_describe(v)}" for k, v in {**inputs, **overrides}.items() if v is not None]
    if config is not None:
        call.insert(0, f"config={cfg_cls.__name__}(...)")
    if callbacks:
        call.append(f"callbacks=[{', '.join(type(c).__name__ for c in callbacks)}]")
    ctx = RunContext(command=command, invocation=f"alignkit.{name}({', '.join(call)})", callbacks=list(callbacks or []))

    model, tokenizer = inputs.get("model"), inputs.get("tokenizer")
    reference = inputs.get("reference")
    if isinstance(reference, str):  # dpo / kto: the `reference` option (auto, copy, adapter, precomputed)
        overrides = {**overrides, "reference": reference}
        reference = None
    paths: dict[str, Any] = {}
    if model is not None:
        if isinstance(model, (str, Path)):
            paths["model.path"] = str(model)
        else:
            ctx.sources[MEMORY_MODEL] = model
            paths["model.path"] = MEMORY_MODEL
            if tokenizer is None and not overrides.get("tokenizer") and not cfg.model.tokenizer:
                raise ValueError(f"alignkit.{name}: a model object needs its tokenizer: pass tokenizer=")
    if tokenizer is not None:
        if isinstance(tokenizer, (str, Path)):
            paths["model.tokenizer"] = str(tokenizer)
        else:
            ctx.sources[MEMORY_TOKENIZER] = tokenizer
            paths["model.tokenizer"] = MEMORY_TOKENIZER
    if reference is not None:  # only the methods with a reference take the argument
        ctx.sources[MEMORY_REFERENCE] = reference
    for key, field_path in (("data", "data.path"), ("eval_data", "data.eval_path")):
        value = inputs.get(key)
        if value is None:
            continue
        if isinstance(value, (str, Path)):
            paths[field_path] = str(value)
        else:
            ctx.sources[f"memory:{key}"] = value
            paths[field_path] = f"memory:{key}"
    apply_overrides(cfg, {**paths, **overrides})
    # The given model is π_ref only where a reference is a model (alignkit.models.loading.Reference):
    # not where log-probs are precomputed from the policy, nor with the LoRA base as reference.
    if reference is not None and getattr(cfg, "reference", "auto") not in ("auto", "copy"):
        raise ValueError(f"alignkit.{name}: a reference model was given, but reference={cfg.reference!r} would not run "
                         "it; leave reference=auto (or copy)")

    kwargs = {k: inputs[k] for k in ("reward", "cost") if k in extra and inputs.get(k) is not None}
    with run_context(ctx):
        raw = run(cfg, **kwargs)
    out = Path(cfg.run.output_dir) if hasattr(cfg, "run") else None
    result = Result(command=command, output_dir=out, config=cfg, raw=raw, data_reports=list(ctx.data_reports))
    if ctx.saved:
        result.model, result.tokenizer = ctx.saved[-1]
        if out is not None:
            # A later stage given these objects names this folder as its base model (model card).
            for obj in (result.model, getattr(result.model, "config", None), result.tokenizer):
                for attr in ("name_or_path", "_name_or_path"):
                    if obj is not None and hasattr(obj, attr):
                        setattr(obj, attr, str(out))
    if out is not None:
        rows = read_metrics(out / "metrics.jsonl")
        result.history = rows
        _, result.metrics = final_metrics(rows)
        evals = evaluations(rows)
        result.eval_metrics = evals[-1][1] if evals and evals[-1][0] == max(r.get("step", 0) for r in rows) else {}
        from alignkit.train.outputs import finished_run

        result.stopped_at = (finished_run(out) or {}).get("stopped_at")
    if command == "eval-rm":
        result.metrics = dict(raw)
    if command == "score":
        result.output_dir = Path(raw)
    return result


def sft(config=None, *, model=None, tokenizer=None, data=None, eval_data=None, callbacks=None, **overrides) -> Result:
    """Supervised fine-tuning on demonstrations (prompt/completion or chat ``messages`` rows), as
    ``alignkit sft``. See :mod:`alignkit.api` for the arguments; returns a :class:`Result`."""
    return _run("sft", config, dict(model=model, tokenizer=tokenizer, data=data, eval_data=eval_data), callbacks, overrides)


def rm(config=None, *, model=None, tokenizer=None, data=None, eval_data=None, callbacks=None, **overrides) -> Result:
    """Train a reward model (pairwise comparisons with margins, or regression on ratings), as
    ``alignkit rm``. ``model`` may be a causal LM (a fresh scalar head is put on it) or a one-label
    ``*ForSequenceClassification``. Returns a :class:`Result` whose model is the reward model."""
    return _run("rm", config, dict(model=model, tokenizer=tokenizer, data=data, eval_data=eval_data), callbacks, overrides)


def eval_rm(config=None, *, model=None, tokenizer=None, data=None, eval_data=None, **overrides) -> Result:
    """Reward-model accuracy overall and per margin bucket on comparisons, as ``alignkit eval-rm``;
    ``Result.metrics`` holds them."""
    return _run("eval_rm", config, dict(model=model, tokenizer=tokenizer, data=data, eval_data=eval_data), None, overrides)


def score(config=None, *, model=None, tokenizer=None, data=None, **overrides) -> Result:
    """Score (prompt, response) rows with a reward model, as ``alignkit score``; writes the scores
    file (``output``), whose path is ``Result.output_dir``."""
    return _run("score", config, dict(model=model, tokenizer=tokenizer, data=data), None, overrides)


def dpo(config=None, *, model=None, tokenizer=None, data=None, eval_data=None, reference=None, callbacks=None,
        **overrides) -> Result:
    """Direct preference optimisation and its variants (``loss_type``) on comparisons, as ``alignkit
    dpo``. ``reference``: a reference-model object (default: a frozen copy of ``model``), or a string,
    the ``reference`` option. Returns a :class:`Result`."""
    return _run("dpo", config, dict(model=model, tokenizer=tokenizer, data=data, eval_data=eval_data, reference=reference),
                callbacks, overrides)


def kto(config=None, *, model=None, tokenizer=None, data=None, eval_data=None, reference=None, callbacks=None,
        **overrides) -> Result:
    """KTO on completions labelled desirable/undesirable (or on pairs), as ``alignkit kto``;
    ``reference`` as for :func:`dpo`. Returns a :class:`Result`."""
    return _run("kto", config, dict(model=model, tokenizer=tokenizer, data=data, eval_data=eval_data, reference=reference),
                callbacks, overrides)


def ppo(config=None, *, model=None, tokenizer=None, data=None, eval_data=None, reward=None, cost=None, reference=None,
        callbacks=None, **overrides) -> Result:
    """Actor-critic PPO from a reward, as ``alignkit ppo``. ``data``: prompts (any format with a
    prompt); ``reward``: a batched ``reward(prompts, responses) -> N floats`` or a RewardSource (added
    to the configured ``reward_models``, if any); ``cost``: a cost source for the constraint;
    ``reference``: a reference-model object. Returns a :class:`Result`."""
    return _run("ppo", config, dict(model=model, tokenizer=tokenizer, data=data, eval_data=eval_data, reward=reward,
                                    cost=cost, reference=reference), callbacks, overrides)


def grpo(config=None, *, model=None, tokenizer=None, data=None, eval_data=None, reward=None, reference=None,
         callbacks=None, **overrides) -> Result:
    """Group-relative policy optimisation from a reward, as ``alignkit grpo``; ``reward`` and
    ``reference`` as for :func:`ppo`. Returns a :class:`Result`."""
    return _run("grpo", config, dict(model=model, tokenizer=tokenizer, data=data, eval_data=eval_data, reward=reward,
                                     reference=reference), callbacks, overrides)


def rloo(config=None, *, model=None, tokenizer=None, data=None, eval_data=None, reward=None, reference=None,
         callbacks=None, **overrides) -> Result:
    """REINFORCE leave-one-out from a reward, as ``alignkit rloo``; ``reward`` and ``reference`` as
    for :func:`ppo`. Returns a :class:`Result`."""
    return _run("rloo", config, dict(model=model, tokenizer=tokenizer, data=data, eval_data=eval_data, reward=reward,
                                     reference=reference), callbacks, overrides)


def rs(config=None, *, model=None, tokenizer=None, data=None, reward=None, callbacks=None, **overrides) -> Result:
    """Rejection sampling (best of N under the reward, then fine-tuning on the best), as ``alignkit
    rs``; ``reward`` as for :func:`ppo`. Callbacks see each round's fine-tuning. Returns a
    :class:`Result`."""
    return _run("rs", config, dict(model=model, tokenizer=tokenizer, data=data, reward=reward), callbacks, overrides)


def critic(config=None, *, model=None, tokenizer=None, data=None, eval_data=None, callbacks=None, **overrides) -> Result:
    """Train a critique (generative) reward model on written critiques ending in a verdict, as
    ``alignkit critic``. Returns a :class:`Result`."""
    return _run("critic", config, dict(model=model, tokenizer=tokenizer, data=data, eval_data=eval_data), callbacks,
                overrides)
