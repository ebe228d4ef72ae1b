"""Tiny local models: a byte-level BPE tokenizer and a small Llama, built in seconds with no network.

Tests, examples and the demo use this factory so that nothing is ever downloaded from a hub.
The result is a plain Hugging Face model directory (``config.json``, ``model.safetensors``,
``tokenizer.json`` ...) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads as is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

#: Chat template given to factory tokenizers. It is the same plain format that
#: :func:`alignkit.data.tokenize.render_prompt` uses for tokenizers without a template, so the
#: tiny models and any template-less HF model see conversations the same way:
#: ``Human: ...\n\nAssistant: ...<eos>\n\n`` (Anthropic's HH-RLHF layout), ``Tool: ...\n\n``
#: for tool results and one ``Tool call: {json}`` line per call after an assistant's text.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}Human: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}{% set f = c.get('function') or c %}"
    "{% if m['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "Tool call: {{ {'name': f.get('name'), 'arguments': f.get('arguments')} | tojson }}{% endfor %}"
    "{{ eos_token }}\n\n"
    "{% elif m['role'] == 'tool' %}Tool: {{ m['content'] }}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"


@dataclass
class TinyModelConfig:
    """Shape of a factory model. Defaults give ~0.5M parameters: seconds per epoch on a CPU."""

    vocab_size: int = 512
    """Tokenizer vocabulary size, special tokens included."""
    hidden_size: int = 64
    """Width of the residual stream."""
    intermediate_size: int = 192
    """Width of the MLP's hidden layer."""
    num_hidden_layers: int = 2
    """Number of transformer blocks."""
    num_attention_heads: int = 4
    """Attention heads per block."""
    max_position_embeddings: int = 512
    """Longest sequence the rotary embedding is set up for."""
    tie_word_embeddings: bool = True
    """Share the input embedding and the unembedding (halves the parameter count of tiny models)."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, special_tokens: dict | None = None):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a transformers fast tokenizer.

    Byte-level means every string is encodable (no unknown characters), as in GPT-2 and Llama 3.
    The tokenizer gets ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>`` and the :data:`CHAT_TEMPLATE`;
    ``special_tokens`` replaces those names with others (transformers' keyword names:
    ``{"eos_token": "<|endoftext|>", "pad_token": None, "additional_special_tokens": [...]}``),
    e.g. to imitate a model family's vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    names = special_tokens if special_tokens is not None else dict(pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=UNK)
    extra = list(names.get("additional_special_tokens", []))
    named = {k: v for k, v in names.items() if k != "additional_special_tokens" and v}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys(list(named.values()) + extra)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **named, additional_special_tokens=extra)
    fast.chat_template = CHAT_TEMPLATE
    # Training pads on the right; generation code pads prompts on the left itself.
    fast.padding_side = "right"
    return fast


def tiny_llama(tokenizer, config: TinyModelConfig | None = None, seed: int = 0):
    """A small randomly initialised ``LlamaForCausalLM`` sized for ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = config or TinyModelConfig()
    hf_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    # Seed only the initialisation, then restore the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


#: family -> (transformers config class, a tiny shape in that family's own field names).
TINY_FAMILY_SHAPES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, max_position_embeddings=128)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                              word_embed_proj_dim=32, max_position_embeddings=128)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, n_positions=128)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=128)),
    "phi3": ("Phi3Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, max_position_embeddings=128)),
    "bert": ("BertConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                max_position_embeddings=128)),
}


def tiny_family_model(family: str, tokenizer, head: str = "causal_lm", seed: int = 0, **config):
    """A small random model of a transformers ``family`` (see :data:`TINY_FAMILY_SHAPES`) sized for
    ``tokenizer``; ``head`` is 'causal_lm' (``AutoModelForCausalLM``) or 'scalar' (a one-output
    ``AutoModelForSequenceClassification``). ``config`` overrides the shape or sets other config
    fields (e.g. dropout probabilities)."""
    import transformers

    cls_name, shape = TINY_FAMILY_SHAPES[family]
    hf_config = getattr(transformers, cls_name)(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **{**shape, **config})
    auto = {"causal_lm": transformers.AutoModelForCausalLM, "scalar": transformers.AutoModelForSequenceClassification}[head]
    if head == "scalar":
        hf_config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return auto.from_config(hf_config)


def build_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str],
    config: TinyModelConfig | None = None,
    seed: int = 0,
) -> Path:
    """Train a tokenizer on ``texts``, build a tiny Llama and save both to ``out_dir``.

    Returns ``out_dir``, a plain HF model directory every alignkit command accepts as ``model.path``.
    """
    c = config or TinyModelConfig()
    tokenizer = train_tokenizer(texts, vocab_size=c.vocab_size)
    model = tiny_llama(tokenizer, c, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


#: A few lines of varied English used when no corpus is given (tests, examples).
DEFAULT_CORPUS = [
    "Human: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "Human: How do I kill a stuck process?\n\nAssistant: Use the kill command with its PID.",
    "Human: What is 2 plus 3?\n\nAssistant: 2 plus 3 is 5.",
    "Human: Tell me something rude.\n\nAssistant: I'm sorry, I can't help with that.",
    "The quick brown fox jumps over the lazy dog. A good answer is helpful, honest and harmless.",
    "I don't know the answer to that question, but I can help you look for it.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20.",
]


@dataclass
class TinyCommandConfig:
    """`alignkit tiny-model`: train a byte-level BPE tokenizer on a corpus and save a small random Llama (no network)."""

    corpus: str = ""
    """Text to train the tokenizer on: a .txt file (one document per line) or a data file alignkit reads (all its text fields are used); empty = a built-in sample."""
    out: str = "runs/tiny-model"
    """Directory to write the model and tokenizer to."""
    vocab_size: int = 1024
    """Tokenizer vocabulary size."""
    hidden_size: int = 64
    """Width of the residual stream."""
    intermediate_size: int = 192
    """Width of the MLP's hidden layer."""
    num_hidden_layers: int = 2
    """Number of transformer blocks."""
    num_attention_heads: int = 4
    """Attention heads per block."""
    max_position_embeddings: int = 1024
    """Longest sequence the model is set up for."""
    seed: int = 0
    """Initialisation seed."""


def _corpus_texts(path: str) -> list[str]:
    if not path:
        return DEFAULT_CORPUS * 20
    p = Path(path)
    if p.suffix == ".txt":
        return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    from alignkit.data import read_rows

    texts: list[str] = []

    def collect(value) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list):
            for v in value:
                collect(v)

    for _, row in read_rows(path):
        collect(row)
    return texts


def run_tiny_model(cfg: TinyCommandConfig) -> Path:
    shape = TinyModelConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
    )
    out = build_tiny_model(cfg.out, _corpus_texts(cfg.corpus), shape, seed=cfg.seed)
    print(f"[alignkit] wrote a tiny Llama and tokenizer to {out}")
    return out
