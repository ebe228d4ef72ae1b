"""Loading models and tokenizers from local directories, GGUF files or the hub; LoRA, references.

Every stage reads and writes plain Hugging Face model directories, so any stage can start from any
earlier one's output (SFT → RM, SFT → DPO → PPO) and the results load with plain ``transformers``.

Every load goes through the same checks, so a wrong model fails at once with a message saying what
it is and what would work, never silently:

- ``model.path`` may be a model directory, a ``.gguf`` file (converted once and cached, see
  :mod:`alignkit.models.gguf`) or a hub name (probed once; offline, read from the cache only,
  see :mod:`alignkit.models.hub`);
- damaged files (a truncated ``model.safetensors``, a garbled ``config.json``) are named
  (:mod:`alignkit.models.files`);
- a policy must be causal: position t may not see later tokens (:func:`check_causal`);
- a reward model must be one (:func:`load_reward_model`, :mod:`alignkit.models.identity`);
- float16 weights are never trained (:func:`check_float16`).
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from alignkit.config import ModelConfig
from alignkit.context import current, is_memory, memory_source, note_saved
from alignkit.models import files, gguf, hub, identity
from alignkit.models.errors import ModelLoadError

__all__ = ["ModelLoadError", "load_tokenizer", "load_causal_lm", "load_scalar_head_model", "load_reward_model",
           "add_lora", "freeze", "is_lora", "Reference", "save_model", "check_causal", "check_float16"]

log = logging.getLogger(__name__)

#: Names under which the Python API registers the objects it is given (alignkit/context.py).
MEMORY_MODEL, MEMORY_TOKENIZER, MEMORY_REFERENCE = "memory:model", "memory:tokenizer", "memory:reference"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool((xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available()))


def _resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        # Master weights stay float32; mixed precision (if any) is applied by accelerate's autocast.
        return torch.float32
    if name not in _DTYPES:
        raise ModelLoadError(f"model.dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    if name == "float16" and not _has_accelerator():
        # Measured: `alignkit sft model.dtype=float16` on a CPU saved an all-NaN model after one step.
        raise ModelLoadError(
            "model.dtype=float16 on a CPU is refused: float16 weights cannot be trained (AdamW's ε=1e-8 and small "
            "squared gradients are 0 in float16, so its first step divides by 0 and weights become inf or NaN) and "
            "CPUs have no fast float16 arithmetic. Use model.dtype=bfloat16 (half the memory, float32's range) "
            "or float32 (model.dtype=auto).")
    return _DTYPES[name]


def check_float16(model, cfg: ModelConfig) -> None:
    """Refuse trainable float16 parameters (on any device).

    AdamW divides by √v̂ + ε with ε = 1e-8, which rounds to 0 in float16, as does v̂ = (1−β₂)·g² for
    gradients below ~1e-3: the first step divides by 0 (measured: the tiny model's embeddings all
    ±inf after one step, NaN where a gradient is exactly 0), and the damage spreads to every weight.
    Loss scaling cannot help (it scales gradients, not the optimizer's arithmetic); what works is
    float32 master weights with float16 compute, which is ``run.mixed_precision=fp16``. A frozen
    float16 base under float32 LoRA adapters is fine.
    """
    if cfg.dtype != "float16":
        return
    half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if half:
        raise ModelLoadError(
            f"model.dtype=float16 would train {len(half)} float16 parameters (e.g. {half[0]}): AdamW's ε=1e-8 and "
            "small squared gradients are 0 in float16, so its first step divides by 0 and weights become inf or "
            "NaN. Use model.dtype=bfloat16, or float32 weights (model.dtype=auto) with run.mixed_precision=fp16 "
            "on a GPU (float16 compute, float32 master weights, loss scaling); with model.lora=true the float16 "
            "base stays frozen and the adapters train in float32.")


def _resolve_source(path: str, what: str) -> str:
    """The directory or hub name to load ``path`` from, after checking what can be checked locally.

    A ``.gguf`` file becomes its converted directory; a local directory has its files checked.
    """
    if not path:
        raise ModelLoadError(f"no {what} given: set model.path to a local HF model directory, a .gguf file or a hub name")
    if gguf.is_gguf(path):
        return str(gguf.gguf_model_dir(path))
    if hub.is_hub_name(path):
        return path
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"{path} does not exist. Point model.path at the output directory of an earlier "
                             "alignkit stage, a saved HF model, a .gguf file, or a hub name.")
    if p.is_file():
        raise ModelLoadError(f"{path} is a file, not a model directory: model.path takes a Hugging Face model "
                             "directory (config.json and weights), a .gguf file, or a hub name.")
    if what == "model" and not (p / "config.json").exists():
        raise ModelLoadError(
            f"{path} is not a Hugging Face model directory (no config.json). "
            "Point model.path at the output directory of an earlier alignkit stage or a saved HF model.")
    files.check_model_dir(p)
    return str(p)


def _load_kwargs(source: str, cfg: ModelConfig | None, model: bool = True) -> dict:
    """Keyword arguments of every ``from_pretrained``: the options of ``cfg`` (the attention kernel
    for models only), and cache-only when ``source`` is a hub name and the hub is unusable."""
    kwargs = dict(hub.hub_kwargs(source))
    if cfg is not None:
        kwargs["trust_remote_code"] = cfg.trust_remote_code
        if model and cfg.attn_implementation != "auto":
            kwargs["attn_implementation"] = cfg.attn_implementation
    return kwargs


@contextmanager
def _load_errors(path: str, what: str, cfg: ModelConfig | None = None):
    """Turn what ``from_pretrained`` raises for bad input into a :class:`ModelLoadError` saying how to fix it."""
    from safetensors import SafetensorError

    try:
        yield
    except ModelLoadError:
        raise
    except OSError as e:
        hint = hub.hub_error_hint(path) if hub.is_hub_name(path) else str(e)
        raise ModelLoadError(f"could not load {what} from {path!r}: {hint}") from e
    except ImportError as e:  # e.g. attn_implementation=flash_attention_2 without flash-attn installed
        chosen = cfg is not None and cfg.attn_implementation != "auto"
        option = f" (model.attn_implementation={cfg.attn_implementation})" if chosen else ""
        raise ModelLoadError(f"could not load {what} from {path!r}{option}: {e}") from e
    except SafetensorError as e:
        raise files.damaged(Path(path), f"a weight file cannot be read ({e})") from e
    except (ValueError, RuntimeError) as e:
        msg = str(e)
        if "attn_implementation" in msg and cfg is not None:
            raise ModelLoadError(
                f"model.attn_implementation={cfg.attn_implementation!r} cannot be used for {path}: {msg}") from e
        if "trust_remote_code" in msg:
            raise ModelLoadError(f"{path} needs code from its repository to load: set model.trust_remote_code=true "
                                 f"only if you trust that code. ({msg.splitlines()[0]})") from e
        if "Unrecognized configuration class" in msg:
            raise ModelLoadError(
                f"{path}: transformers has no {what} class for this model type: {msg.splitlines()[0]}") from e
        raise


class _DropLoadReport(logging.Filter):
    """Drops transformers' table of newly initialised weights (logged by us instead, when it matters)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "LOAD REPORT" not in msg and "newly initialized" not in msg


@contextmanager
def _quiet_load_report():
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _DropLoadReport()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def load_tokenizer(source: str | ModelConfig):
    """Load a tokenizer (from ``model.tokenizer`` or ``model.path`` when given a ModelConfig); give it a
    pad token (EOS) if it has none, since batching needs one."""
    from transformers import AutoTokenizer

    cfg = source if isinstance(source, ModelConfig) else None
    path = (cfg.tokenizer or cfg.path) if cfg else source
    if is_memory(path):  # a tokenizer object given through the Python API
        tok = memory_source(path)
        if isinstance(tok, torch.nn.Module):  # a model's name: the tokenizer given with it
            tok = memory_source(MEMORY_TOKENIZER)
        if not callable(getattr(tok, "apply_chat_template", None)) and not hasattr(tok, "encode"):
            raise ModelLoadError(f"{path}: expected a transformers tokenizer, got {type(tok).__name__}")
    else:
        local = _resolve_source(path, "tokenizer")
        with _load_errors(path, "tokenizer", cfg):
            tok = AutoTokenizer.from_pretrained(local, **_load_kwargs(local, cfg, model=False))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token: using EOS (%r) for padding", tok.eos_token)
    tok.padding_side = "right"
    return tok


@torch.no_grad()
def check_causal(model, path: str) -> None:
    """Refuse a model whose positions see later tokens: it cannot be trained or sampled as a policy.

    The test is direct: two sequences that differ only in their last token must give the same logits
    at every earlier position. A bidirectional encoder loaded as a "causal LM" (BERT's
    ``BertLMHeadModel`` without ``is_decoder``) fails it; every decoder passes exactly.
    """
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.tensor([[1, 2, 3], [1, 2, 4]]) % vocab  # (2, 3): rows differ at the last position only
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids.to(model.device), use_cache=False).logits.float()  # (2, 3, V)
    finally:
        model.train(was_training)
    earlier = logits[:, :2]  # (2, 2, V): positions that must not see the last token
    leak = float((earlier[0] - earlier[1]).abs().max())
    if leak > 1e-5 * (1.0 + float(earlier.abs().max())):
        kind = getattr(model.config, "model_type", "?")
        raise ModelLoadError(
            f"{path} is a {kind} model ({type(model).__name__}) whose attention is bidirectional: changing a "
            f"later token changed earlier logits by {leak:.2g}. Training or sampling it as a policy would let each "
            "position read the token it predicts. SFT, DPO, KTO, PPO, GRPO, RLOO, rejection sampling and critics "
            "need a decoder-only causal LM (llama, qwen2, mistral, gemma, phi3, gpt2, gpt_neox, opt, ...); an "
            "encoder like this one can be trained as a reward model with `alignkit rm`.")


def load_causal_lm(cfg: ModelConfig, trainable: bool = True):
    """Load a causal LM from ``cfg.path``; wrap it with LoRA adapters when ``cfg.lora``."""
    from transformers import AutoModelForCausalLM

    if is_memory(cfg.path):  # a model object given through the Python API: the same checks follow
        model = _memory_model(cfg.path, "a causal LM")
    else:
        local = _resolve_source(cfg.path, "model")
        dtype = _resolve_dtype(cfg.dtype)
        with _load_errors(cfg.path, "causal LM", cfg):
            model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype, **_load_kwargs(local, cfg))
    check_causal(model, cfg.path)
    if cfg.lora and trainable:
        model = add_lora(model, cfg, task_type="CAUSAL_LM")
    if not trainable:
        freeze(model)
    check_float16(model, cfg)
    return model


def _head_keys(model, keys) -> list[str]:
    """The keys among ``keys`` that belong to the classification head (outside the backbone, or its pooler)."""
    prefix = model.base_model_prefix + "."
    return sorted(k for k in keys if not k.startswith(prefix) or ".pooler." in k)


def _memory_model(path: str, what: str):
    """The model object a ``memory:NAME`` path names (given through the Python API)."""
    model = memory_source(path)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ModelLoadError(f"{path}: expected {what} (a transformers model object), got {type(model).__name__}")
    return model


def _is_scalar_head(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification") and getattr(model.config, "num_labels", 0) == 1


def _load_scalar_head(cfg: ModelConfig):
    """``(model, missing keys)``: ``cfg.path`` as a one-output ``*ForSequenceClassification``.

    An in-memory model (``memory:NAME``) that already is one is used as it is; an in-memory causal
    LM is written to a temporary folder and read back through the same load as a directory (a fresh
    scalar head on its backbone), so the result equals the command line's."""
    from transformers import AutoModelForSequenceClassification

    if is_memory(cfg.path):
        model = _memory_model(cfg.path, "a model")
        if _is_scalar_head(model):
            if model.config.pad_token_id is None:
                raise ModelLoadError(f"{cfg.path}: config has no pad_token_id; set model.config.pad_token_id "
                                     "(reward models read the last non-pad token)")
            return model, []
        import tempfile

        with tempfile.TemporaryDirectory(prefix="alignkit-memory-model-") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            head, missing = _load_scalar_head(ModelConfig(**{**vars(cfg), "path": tmp}))
        return head, missing
    local = _resolve_source(cfg.path, "model")
    dtype = _resolve_dtype(cfg.dtype)
    with _load_errors(cfg.path, "model", cfg), _quiet_load_report():
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                local, num_labels=1, dtype=dtype, output_loading_info=True, **_load_kwargs(local, cfg))
        except RuntimeError as e:
            if "ignore_mismatched_sizes" not in str(e) and "size mismatch" not in str(e):
                raise
            config = files.read_json(Path(local) / "config.json") if Path(local).is_dir() else {}
            raise ModelLoadError(f"{cfg.path} is {identity.describe(config)}; a reward or value model has one "
                                 "output, and its head's weights do not fit one.") from e
    if model.config.pad_token_id is None:
        raise ModelLoadError(
            f"{cfg.path}: config has no pad_token_id; set one in config.json (reward models read the last non-pad token)"
        )
    return model, sorted(info["missing_keys"])


def load_scalar_head_model(cfg: ModelConfig, trainable: bool = True):
    """Load an LM backbone with a scalar head: a reward or value model to train.

    From a causal-LM directory (e.g. the SFT policy) the unembedding is replaced by a freshly
    initialised linear head with one output, as in InstructGPT (expected, so transformers' table of
    new weights is not shown); from a saved reward model the head is loaded as well. To score with
    a trained reward model use :func:`load_reward_model`, which refuses a fresh head.
    """
    model, missing = _load_scalar_head(cfg)
    head = _head_keys(model, missing)
    if head:
        log.info("%s: new scalar head %s (initialised at random, to be trained)", cfg.path, ", ".join(head))
    others = [k for k in missing if k not in head]
    if others:
        log.warning("%s: %d backbone weights are not in the checkpoint and start at random: %s",
                    cfg.path, len(others), ", ".join(others[:5]) + (" ..." if len(others) > 5 else ""))
    if cfg.lora and trainable:
        model = add_lora(model, cfg, task_type="SEQ_CLS")
    if not trainable:
        freeze(model)
    check_float16(model, cfg)
    return model


def load_reward_model(cfg: ModelConfig, role: str = "a reward model"):
    """Load a trained reward (or cost) model from ``cfg.path``, frozen, for scoring.

    Refuses a directory that is not a reward model, saying what it is (a causal LM, a classifier
    with N labels, ...; see :mod:`alignkit.models.identity`), and any load that would leave weights
    (above all the head) at their random initialisation.
    """
    from transformers import PretrainedConfig

    if is_memory(cfg.path):
        config = _memory_model(cfg.path, role).config.to_dict()
    else:
        local = _resolve_source(cfg.path, "model")
        with _load_errors(cfg.path, "model", cfg):
            config, _ = PretrainedConfig.get_config_dict(local, **hub.hub_kwargs(local))
    identity.check_reward_model_config(config, cfg.path, role)
    model, missing = _load_scalar_head(cfg)
    if missing:
        raise ModelLoadError(
            f"{cfg.path} was given as {role}, but its checkpoint has no weights for {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}: they would be initialised at random and the scores would mean "
            f"nothing. It is {identity.describe(config)}; its weight files may be incomplete (copy it again), or "
            "train a reward model with `alignkit rm`.")
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

    - a frozen deep copy of the policy (``copy``), or the reference model given through the Python
      API (``alignkit.dpo(..., reference=model)``, frozen as it is), or
    - with LoRA, the policy's own base weights with the adapter disabled (``adapter``): no second
      copy of the weights in memory.

    ``with reference.active() as model:`` yields the module to run for reference log-probs.
    """

    def __init__(self, policy, mode: str = "auto"):
        given = current().sources.get(MEMORY_REFERENCE) if current() is not None else None
        if mode == "auto":
            mode = "adapter" if is_lora(policy) and given is None else "copy"
        if mode == "adapter" and not is_lora(policy):
            raise ValueError("reference mode 'adapter' needs a LoRA policy (model.lora=true)")
        self.mode = mode
        self._policy = policy
        self._copy = None
        if mode == "copy":
            # The reference model given through the Python API (frozen as it is), else a frozen copy of the policy.
            self._copy = given if given is not None else copy.deepcopy(policy)
            freeze(self._copy)

    @property
    def separate_model(self):
        """The reference's own module (a copy, or the one given), None in ``adapter`` mode (the policy itself)."""
        return self._copy

    @contextmanager
    def active(self):
        if self.mode == "copy":
            self._follow_policy()
            yield self._copy
        else:
            with self._policy.disable_adapter(), torch.no_grad():
                yield self._policy

    def to(self, device):
        if self._copy is not None:
            self._copy.to(device)
        return self

    def _follow_policy(self):
        """Move the copy to the policy's device if they differ (in place: a reference model given
        through the Python API moves too). The trainers' own runs place it with :meth:`to`, but a
        Python caller that builds a task and hands the policy to a ``Trainer`` (which prepares it
        on the accelerator) would otherwise run a GPU batch through a CPU reference. Not under
        FSDP, whose sharded parameters say nothing of where a whole copy belongs."""
        policy = next(iter(self._policy.parameters()), None)
        mine = next(iter(self._copy.parameters()), None)
        if policy is None or mine is None or mine.device == policy.device or policy.device.type == "meta":
            return
        if not _sharded(self._policy):
            self._copy.to(policy.device)


def _sharded(model) -> bool:
    """Wrapped by FSDP 2 (its units cannot be deep-copied)."""
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


def _merged_in_place(model) -> dict:
    """The merged weights of a LoRA ``model`` without a copy of it (FSDP cannot deep-copy, and a
    copy of a model too big for one device is what sharding avoids): the adapter merged into the
    base weights, their state dict with peft's names mapped back to the base model's, the adapter
    unmerged again. Called inside :func:`alignkit.train.engine.full_weights` (plain weights)."""
    model.merge_adapter()
    try:
        state, seen = {}, set()
        for name, tensor in model.get_base_model().state_dict(keep_vars=True).items():
            if "lora_" in name or id(tensor) in seen:  # a tied weight is written once, as save_pretrained does
                continue
            seen.add(id(tensor))
            state[name.replace(".base_layer.", ".")] = tensor.detach().clone()
    finally:
        model.unmerge_adapter()
    return state


def save_model(model, tokenizer, out_dir: str | Path, extra_config: dict | None = None) -> Path:
    """Save a plain HF directory. LoRA models are merged so later stages and ``transformers`` load
    them without peft; the adapter alone is kept in ``out_dir/adapter``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = None
    if is_lora(model):
        model.save_pretrained(out / "adapter")
        if _sharded(model):
            to_save, state_dict = model.get_base_model(), _merged_in_place(model)
        else:
            to_save = copy.deepcopy(model).merge_and_unload()
    else:
        to_save = model
    if "alignkit" not in (extra_config or {}) and hasattr(to_save.config, "alignkit"):
        # Only the save that trains a reward model marks it as one (see alignkit.models.identity):
        # a policy fine-tuned from a reward-model directory does not inherit the mark.
        del to_save.config.alignkit
    for k, v in (extra_config or {}).items():
        setattr(to_save.config, k, v)
    to_save.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    note_saved(to_save, tokenizer)  # the API returns the saved model
    return out

