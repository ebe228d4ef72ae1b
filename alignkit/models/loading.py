"""Loading models and tokenizers from local directories (or the hub when online), LoRA, references.

Every stage reads and writes plain Hugging Face model directories, so any stage can start from any
earlier one's output (SFT → RM, SFT → DPO → PPO) and the results load with plain ``transformers``.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from alignkit.config import ModelConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what was tried and how to fix it."""


def _resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        # Master weights stay float32; mixed precision (if any) is applied by accelerate's autocast.
        return torch.float32
    if name not in _DTYPES:
        raise ModelLoadError(f"model.dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


def _check_source(path: str, what: str) -> None:
    if not path:
        raise ModelLoadError(f"no {what} given: set model.path to a local HF model directory")
    p = Path(path)
    looks_local = path.startswith((".", "/", "~")) or p.exists()
    if looks_local and not (p / "config.json").exists() and what == "model":
        raise ModelLoadError(
            f"{path} is not a Hugging Face model directory (no config.json). "
            "Point model.path at the output directory of an earlier alignkit stage or a saved HF model."
        )


@contextmanager
def _hub_errors(path: str, what: str):
    try:
        yield
    except OSError as e:
        hint = (
            "It is not a local directory, and the hub could not be reached or has no such repository. "
            "Offline, give a local directory (see `alignkit.models.factory` for tiny local models)."
            if not Path(path).exists()
            else str(e)
        )
        raise ModelLoadError(f"could not load {what} from {path!r}: {hint}") from e


def load_tokenizer(path: str):
    """Load a tokenizer; give it a pad token (EOS) if it has none, since batching needs one."""
    from transformers import AutoTokenizer

    _check_source(path, "tokenizer")
    with _hub_errors(path, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token: using EOS (%r) for padding", tok.eos_token)
    tok.padding_side = "right"
    return tok


def load_causal_lm(cfg: ModelConfig, trainable: bool = True):
    """Load a causal LM from ``cfg.path``; wrap it with LoRA adapters when ``cfg.lora``."""
    from transformers import AutoModelForCausalLM

    _check_source(cfg.path, "model")
    with _hub_errors(cfg.path, "model"):
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=_resolve_dtype(cfg.dtype))
    if cfg.lora and trainable:
        model = add_lora(model, cfg, task_type="CAUSAL_LM")
    if not trainable:
        freeze(model)
    return model


def load_scalar_head_model(cfg: ModelConfig, trainable: bool = True):
    """Load an LM backbone with a scalar head: a reward or value model.

    From a causal-LM directory (e.g. the SFT policy) the unembedding is replaced by a freshly
    initialised linear head with one output, as in InstructGPT; from a saved reward model the head
    is loaded as well.
    """
    from transformers import AutoModelForSequenceClassification

    _check_source(cfg.path, "model")
    with _hub_errors(cfg.path, "model"):
        model = AutoModelForSequenceClassification.from_pretrained(
            cfg.path, num_labels=1, dtype=_resolve_dtype(cfg.dtype)
        )
    if model.config.pad_token_id is None:
        raise ModelLoadError(
            f"{cfg.path}: config has no pad_token_id; set one in config.json (reward models read the last non-pad token)"
        )
    if cfg.lora and trainable:
        model = add_lora(model, cfg, task_type="SEQ_CLS")
    if not trainable:
        freeze(model)
    return model


def add_lora(model, cfg: ModelConfig, task_type: str):
    """Wrap ``model`` with peft LoRA adapters; the scalar head of a SEQ_CLS model stays trainable."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    lora_cfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type=task_type,
    )
    return get_peft_model(model, lora_cfg)


def freeze(model) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class Reference:
    """The frozen reference policy π_ref, held one of two ways.

    - a frozen deep copy of the policy (``copy``), or
    - with LoRA, the policy's own base weights with the adapter disabled (``adapter``): no second
      copy of the weights in memory.

    ``with reference.active() as model:`` yields the module to run for reference log-probs.
    """

    def __init__(self, policy, mode: str = "auto"):
        if mode == "auto":
            mode = "adapter" if is_lora(policy) else "copy"
        if mode == "adapter" and not is_lora(policy):
            raise ValueError("reference mode 'adapter' needs a LoRA policy (model.lora=true)")
        self.mode = mode
        self._policy = policy
        self._copy = None
        if mode == "copy":
            self._copy = copy.deepcopy(policy)
            freeze(self._copy)

    @contextmanager
    def active(self):
        if self.mode == "copy":
            yield self._copy
        else:
            with self._policy.disable_adapter(), torch.no_grad():
                yield self._policy

    def to(self, device):
        if self._copy is not None:
            self._copy.to(device)
        return self


def save_model(model, tokenizer, out_dir: str | Path, extra_config: dict | None = None) -> Path:
    """Save a plain HF directory. LoRA models are merged so later stages and ``transformers`` load
    them without peft; the adapter alone is kept in ``out_dir/adapter``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_lora(model):
        model.save_pretrained(out / "adapter")
        merged = copy.deepcopy(model).merge_and_unload()
        to_save = merged
    else:
        to_save = model
    for k, v in (extra_config or {}).items():
        setattr(to_save.config, k, v)
    to_save.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out

