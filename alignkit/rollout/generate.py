"""Batched sampling behind one small interface, so a faster engine can slot in.

A :class:`Generator` turns chat prompts into sampled responses: ``generate(prompts, n, seed)``
returns ``n`` samples per prompt (consecutive: prompt i's samples are rows ``i*n .. i*n+n-1``);
the same ``seed`` gives the same samples, and the global torch RNG is never reseeded. Every
sampling method (PPO, GRPO, RLOO, rejection sampling, best-of-N, critique rewards) builds its
generator with :func:`make_generator`, which picks the engine named by ``sampling.backend`` from
:data:`GENERATORS`; a faster engine (vLLM on a GPU, say) registers there and implements
:meth:`Generator.generate_ids`, without touching a trainer.

:class:`HFGenerator`, the default (``backend=hf``), runs ``transformers``' ``generate`` (KV cache,
left-padded batches, temperature / top-p / top-k, stop at the chat template's end of turn or EOS,
see :func:`alignkit.data.tokenize.chat_format`) and draws each token from its own
``torch.Generator``. Logits that are not finite (a diverged policy) stop sampling with a
:class:`~alignkit.numerics.NonFiniteError` that names the cause, never a traceback from inside
``transformers``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from alignkit.numerics import FIXES, NonFiniteError, describe, nonfinite_tensors


@dataclass
class SamplingConfig:
    """How responses are sampled."""

    max_new_tokens: int = 48
    """Longest response in tokens; a response that reaches it without an end of turn or EOS is 'unfinished'."""
    temperature: float = 1.0
    """Softmax temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this total probability (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off; passed to transformers as 0, since None would mean its default 50)."""
    generation_batch_size: int = 64
    """Sequences generated together in one `generate` call (a memory/speed knob; results do not depend on it
    beyond the random stream)."""
    backend: str = "hf"
    """Generation engine: 'hf' (transformers generate with the KV cache); others register in alignkit.rollout.generate.GENERATORS."""


@dataclass
class Generations:
    """Sampled responses; lists are parallel, one entry per sample."""

    prompt_ids: list[list[int]]
    """Token ids of the prompt each sample continues (without padding)."""
    response_ids: list[list[int]]
    """Generated token ids, up to and including the stop token (end of turn or EOS) when the sample finished."""
    texts: list[str]
    """Decoded responses, without the stop token and surrounding whitespace."""
    finished: list[bool]
    """Whether the sample ended with a stop token (the template's end of turn or EOS) before `max_new_tokens`."""
    prompt_index: list[int] = field(default_factory=list)
    """Index into the prompts given to `generate` of each sample's prompt."""


class Generator:
    """Interface: sample ``n`` responses per prompt, reproducibly from ``seed``.

    An engine implements :meth:`generate_ids` (token ids in, :class:`Generations` out) and sets
    ``tokenizer``, ``sampling`` and ``max_prompt_length``; :meth:`generate` encodes chat prompts
    exactly as the data layer does for training. ``seed=None`` draws the seed from torch's global
    stream (reproducible under a seeded run) without reseeding it.
    """

    tokenizer = None
    sampling: SamplingConfig
    max_prompt_length: int

    def generate_ids(self, prompt_ids: list[list[int]], n: int = 1, seed: int | None = None) -> Generations:  # pragma: no cover
        raise NotImplementedError

    def generate(self, prompts: list[list[dict]], n: int = 1, seed: int | None = None) -> Generations:
        return self.generate_ids(encode_prompts(self.tokenizer, prompts), n=n, seed=seed)


def encode_prompts(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    """Prompt token ids exactly as the data layer builds them for training."""
    from alignkit.data import encode_prompt

    return [encode_prompt(tokenizer, p) for p in prompts]


class _NonFiniteLogits(Exception):
    """Raised inside ``generate`` by :class:`_PickToken`; turned into a NonFiniteError with its cause."""

    def __init__(self, rows: int, batch: int, position: int):
        super().__init__(rows, batch, position)
        self.rows, self.batch, self.position = rows, batch, position


class _PickToken:
    """The last logits processor of :class:`HFGenerator`: refuse scores that are not finite, then
    (when sampling) draw the next token from softmax(scores) with this generator's own
    ``torch.Generator`` and return scores that make ``generate``'s greedy argmax pick it.

    ``torch.multinomial`` on the softmax is what ``transformers`` samples with; here it reads a
    local random stream, so sampling never reseeds (or reads) the global one.
    """

    def __init__(self, rng: torch.Generator | None, prompt_width: int):
        self.rng, self.prompt_width = rng, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # (b, V) after temperature / top-k / top-p: a NaN or +inf anywhere, or no finite entry, is a broken row
        bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)
        if bool(bad.any()):
            raise _NonFiniteLogits(int(bad.sum()), scores.shape[0], input_ids.shape[1] - self.prompt_width + 1)
        if self.rng is None:  # greedy
            return scores
        token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=self.rng)  # (b, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


class HFGenerator(Generator):
    """``transformers`` ``generate`` with the KV cache on left-padded batches."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig | None = None, max_prompt_length: int = 384):
        from alignkit.data.tokenize import stop_token_ids

        self.model, self.tokenizer = model, tokenizer
        self.sampling = sampling or SamplingConfig()
        self.max_prompt_length = max_prompt_length
        self.stop_ids = stop_token_ids(tokenizer)
        """Sampling stops at any of these: the chat template's end of turn and EOS."""

    def _processors(self, rng: torch.Generator | None, prompt_width: int):
        """Temperature, top-k, top-p (as transformers orders them when it samples), then the token pick."""
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        s, out = self.sampling, LogitsProcessorList()
        if s.temperature > 0:
            if s.temperature != 1.0:
                out.append(TemperatureLogitsWarper(s.temperature))
            if s.top_k:  # 0 = off (transformers would fill None with its default top_k=50)
                out.append(TopKLogitsWarper(top_k=s.top_k, min_tokens_to_keep=1))
            if s.top_p < 1.0:
                out.append(TopPLogitsWarper(top_p=s.top_p, min_tokens_to_keep=1))
        out.append(_PickToken(rng, prompt_width))
        return out

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[list[int]], n: int = 1, seed: int | None = None) -> Generations:
        s = self.sampling
        tok = self.tokenizer
        stops, pad = set(self.stop_ids), tok.pad_token_id
        model = self.model
        device = next(model.parameters()).device
        expanded = [(i, ids[-self.max_prompt_length :]) for i, ids in enumerate(prompt_ids) for _ in range(n)]
        out_prompt, out_resp, out_fin, out_idx = [], [], [], []
        seeds = torch.Generator().manual_seed(seed) if seed is not None else None  # one seed per chunk
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(expanded), s.generation_batch_size):
                chunk = expanded[start : start + s.generation_batch_size]
                width = max(len(ids) for _, ids in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, (_, ids) in enumerate(chunk):  # left padding: the new tokens line up on the right
                    input_ids[r, width - len(ids) :] = torch.tensor(ids)
                    attention[r, width - len(ids) :] = 1
                rng = None
                if s.temperature > 0:
                    chunk_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=seeds))  # seeds=None: the global stream
                    rng = torch.Generator(device=device).manual_seed(chunk_seed)
                # Greedy decoding of the processed scores: the last processor has already drawn the token.
                seqs = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                      max_new_tokens=s.max_new_tokens, eos_token_id=list(self.stop_ids), pad_token_id=pad,
                                      use_cache=True, do_sample=False, temperature=None, top_p=None, top_k=None,
                                      logits_processor=self._processors(rng, width),
                                      # FSDP weights gathered for the rollout (train/engine.full_weights):
                                      # forwards make no collectives, so no per-token sync across processes
                                      synced_gpus=False if model.__dict__.get("_alignkit_full_weights") else None)
                new = seqs[:, width:].cpu().tolist()  # (b, ≤ max_new_tokens)
                for (i, ids), row in zip(chunk, new):
                    resp, finished = [], False
                    for t in row:
                        resp.append(t)
                        if t in stops:
                            finished = True
                            break
                    # generate pads finished rows with pad; if pad is a stop token, the break above already stopped
                    out_prompt.append(list(ids))
                    out_resp.append(resp)
                    out_fin.append(finished)
                    out_idx.append(i)
        except _NonFiniteLogits as e:
            bad = nonfinite_tensors(model)
            cause = (f"the model's weights are not finite ({describe(bad)}): the training diverged; {FIXES}" if bad else
                     "the weights are finite, so the forward pass overflowed: sample in fp32 (run.mixed_precision=no)")
            raise NonFiniteError(f"sampling: the next-token logits are NaN or inf for {e.rows} of {e.batch} sequences "
                                 f"at generated token {e.position}; {cause}") from None
        finally:
            model.train(was_training)
        texts = [tok.decode([t for t in r if t not in stops], skip_special_tokens=True).strip() for r in out_resp]
        return Generations(out_prompt, out_resp, texts, out_fin, out_idx)


#: Generation engines by ``sampling.backend``: (model, tokenizer, sampling, max_prompt_length) -> Generator.
GENERATORS: dict[str, Callable[..., Generator]] = {"hf": HFGenerator}


def make_generator(model, tokenizer, sampling: SamplingConfig | None = None, max_prompt_length: int = 384) -> Generator:
    """The :class:`Generator` of ``sampling.backend`` for ``model`` (what every sampling method uses)."""
    sampling = sampling or SamplingConfig()
    if sampling.backend not in GENERATORS:
        raise ValueError(f"sampling.backend must be one of {', '.join(GENERATORS)}; got {sampling.backend!r}")
    return GENERATORS[sampling.backend](model, tokenizer, sampling, max_prompt_length)
