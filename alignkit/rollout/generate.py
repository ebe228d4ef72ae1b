"""Batched sampling behind one small interface, so a faster engine can slot in.

A :class:`Generator` turns chat prompts into sampled responses: ``generate(prompts, n, seed)``
returns ``n`` samples per prompt (consecutive: prompt i's samples are rows ``i*n .. i*n+n-1``);
the same ``seed`` gives the same samples, and the global torch RNG is never reseeded. Every
sampling method (PPO, GRPO, RLOO, rejection sampling, best-of-N, critique rewards) builds its
generator with :func:`make_generator`, which picks the engine named by ``sampling.backend`` from
:data:`GENERATORS`; a faster engine (vLLM on a GPU, say) registers there and implements
:meth:`Generator.generate_ids`, without touching a trainer.

:class:`HFGenerator`, the default (``backend=hf``), samples from a ``transformers`` model with its
KV cache in a decode loop of its own (length-sorted left-padded batches, each prompt prefilled once
for its ``n`` samples, temperature / top-p / top-k, each row stopping at the chat template's end of
turn or EOS, see :func:`alignkit.data.tokenize.chat_format`), drawing each sample's tokens from its
own ``torch.Generator``; every sample equals ``model.generate`` on its prompt alone with that stream. Logits that are not finite (a diverged policy) stop sampling with a
:class:`~alignkit.numerics.NonFiniteError` that names the cause, never a traceback from inside
``transformers``.
"""

from __future__ import annotations

import inspect
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
    """Raised inside the decode loop by :func:`_refuse_nonfinite`; turned into a NonFiniteError with its cause."""

    def __init__(self, rows: int, batch: int, position: int):
        super().__init__(rows, batch, position)
        self.rows, self.batch, self.position = rows, batch, position


#: Prefill each prompt of a batch alone when a left-padded batch would be more than this fraction
#: padding (measured: SmolLM2-135M, 8 HH prompts at 23% padding, one thread: see docs/scaling.md).
PAD_TO_SPLIT = 0.10


def _cache_of(out):
    """The KV cache a forward returned (``cache`` in transformers ≥ 5.2x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def draw_tokens(scores: torch.Tensor, rngs: list[torch.Generator]) -> torch.Tensor:
    """One token per row from softmax(scores), row ``b`` reading only ``rngs[b]``: (b, V) -> (b,).

    Inverse-CDF sampling: one uniform u_b per row from its own stream, token = the first index whose
    cumulative probability exceeds u_b · total (a token of probability 0, e.g. cut by top-k/top-p,
    can never be drawn). Exactly a draw from the categorical distribution, with one tiny random
    draw per row: ``torch.multinomial`` would need a call per row to keep the streams apart, and
    costs ~17x more (SmolLM2's 49,152-token vocabulary, 32 rows, one thread).
    """
    probs = torch.softmax(scores.double(), dim=-1)  # float64: the cumulative sum stays exact enough over 10^5 tokens
    cdf = probs.cumsum(-1)  # (b, V)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=scores.device) for g in rngs])  # (b,)
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # (b,) first index with cdf > u
    return token.clamp(max=scores.shape[-1] - 1)


def _refuse_nonfinite(scores: torch.Tensor, position: int) -> None:
    """(b, V) scores after temperature / top-k / top-p: a NaN or +inf anywhere, or no finite entry,
    is a broken row (a diverged policy or an overflowing forward)."""
    bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)
    if bool(bad.any()):
        raise _NonFiniteLogits(int(bad.sum()), scores.shape[0], position)


class HFGenerator(Generator):
    """Sampling from a ``transformers`` causal LM with its KV cache, in a decode loop of our own.

    What it does beyond ``model.generate`` (each an optimisation, never a different answer; see
    ``tests/test_rollout.py``, which checks every sample against ``model.generate`` run on that
    prompt alone with the same random stream):

    * **one random stream per sample**: sample ``j`` of a call draws every token from its own
      ``torch.Generator``, seeded from ``(seed, j)``, by inverse-CDF sampling (:func:`draw_tokens`); so a sample does not depend on which other
      samples share its batch, their order, or when they stop, and the batching below is free;
    * **length-sorted batches**: samples are sorted by prompt length (longest first) before being
      cut into ``generation_batch_size`` batches, so a batch pads little; results come back in
      the caller's order;
    * **the prompt computed once per group**: the ``n`` samples of a prompt share its prefill
      (the KV cache is computed for each distinct prompt of a batch, then repeated), which is
      most of the work for short responses (GRPO's group of G, best-of-N);
    * **no padding in the prefill** where a batch's prompt lengths differ by much (more than
      :data:`PAD_TO_SPLIT` of the batch would be padding): each prompt's cache is computed alone
      and left-padded with zeros (the padding's keys are masked anyway);
    * **only the last position's logits** (``logits_to_keep=1``): the prefill never builds a
      (b, prompt length, V) logits tensor;
    * **per-row stopping**: a sample stops at its first end of turn or EOS and leaves the batch
      (its rows of the KV cache are dropped), so finished samples cost nothing afterwards.
    """

    def __init__(self, model, tokenizer, sampling: SamplingConfig | None = None, max_prompt_length: int = 384):
        from alignkit.data.tokenize import stop_token_ids

        self.model, self.tokenizer = model, tokenizer
        self.sampling = sampling or SamplingConfig()
        self.max_prompt_length = max_prompt_length
        self.stop_ids = stop_token_ids(tokenizer)
        """Sampling stops at any of these: the chat template's end of turn and EOS."""

    def _processors(self):
        """Temperature, top-k, top-p (as transformers orders them when it samples)."""
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        s, out = self.sampling, LogitsProcessorList()
        if s.temperature > 0:
            if s.temperature != 1.0:
                out.append(TemperatureLogitsWarper(s.temperature))
            if s.top_k:  # 0 = off (transformers would fill None with its default top_k=50)
                out.append(TopKLogitsWarper(top_k=s.top_k, min_tokens_to_keep=1))
            if s.top_p < 1.0:
                out.append(TopPLogitsWarper(top_p=s.top_p, min_tokens_to_keep=1))
        return out

    def sample_seeds(self, count: int, seed: int | None) -> list[int]:
        """The seed of each sample's random stream: from ``seed``, else from torch's global stream
        (reproducible under a seeded run; read, never reseeded)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return torch.randint(0, 2**31 - 1, (count,), generator=gen).tolist()

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[list[int]], n: int = 1, seed: int | None = None) -> Generations:
        s = self.sampling
        tok = self.tokenizer
        stops = set(self.stop_ids)
        model = self.model
        expanded = [(i, ids[-self.max_prompt_length :]) for i, ids in enumerate(prompt_ids) for _ in range(n)]
        seeds = self.sample_seeds(len(expanded), seed) if s.temperature > 0 else [None] * len(expanded)
        # Longest prompts first (stable: a prompt's samples stay together, so they share a batch
        # and its prefill); results are written back at each sample's position.
        order = sorted(range(len(expanded)), key=lambda j: -len(expanded[j][1]))
        out_resp: list[list[int]] = [[] for _ in expanded]
        out_fin = [False] * len(expanded)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(order), s.generation_batch_size):
                rows = order[start : start + s.generation_batch_size]
                resp, fin = self._decode([expanded[j] for j in rows], [seeds[j] for j in rows], stops)
                for j, r, f in zip(rows, resp, fin):
                    out_resp[j], out_fin[j] = r, f
        except _NonFiniteLogits as e:
            bad = nonfinite_tensors(model)
            cause = (f"the model's weights are not finite ({describe(bad)}): the training diverged; {FIXES}" if bad else
                     "the weights are finite, so the forward pass overflowed: sample in fp32 (run.mixed_precision=no)")
            raise NonFiniteError(f"sampling: the next-token logits are NaN or inf for {e.rows} of {e.batch} sequences "
                                 f"at generated token {e.position}; {cause}") from None
        finally:
            model.train(was_training)
        texts = [tok.decode([t for t in r if t not in stops], skip_special_tokens=True).strip() for r in out_resp]
        return Generations([list(ids) for _, ids in expanded], out_resp, texts, out_fin, [i for i, _ in expanded])

    def _prefill_unpadded(self, prompts: list[list[int]], width: int, device):
        """Each prompt's KV cache computed alone (no padding, causal attention without a mask),
        then left-padded with zeros to ``width`` and stacked: the padding costs no compute (its keys
        are masked in every later step). Returns (cache, last-position logits (u, V)), or
        (None, None) when the model's cache is not made of plain growing layers (sliding windows,
        static or quantised caches): the caller then prefills one padded batch."""
        from transformers.cache_utils import DynamicLayer

        caches, logits = [], []
        for ids in prompts:
            out = self.model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
            cache = _cache_of(out)
            if not all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
                return None, None
            caches.append(cache)
            logits.append(out.logits[:, -1, :].float())  # (1, V)
        if len(caches) > 1:
            first = caches[0]
            for n, layer in enumerate(first.layers):  # (u, heads, width, head_dim), zeros on the left
                for name in ("keys", "values"):
                    setattr(layer, name, torch.cat([
                        torch.nn.functional.pad(getattr(c.layers[n], name), (0, 0, width - len(ids), 0))
                        for c, ids in zip(caches, prompts)]))
        return caches[0], torch.cat(logits)

    def _decode(self, chunk: list[tuple[int, list[int]]], seeds: list[int | None], stops: set[int]):
        """Sample one batch: (prompt index, prompt ids) per row, that row's stream seed (None: greedy).
        Returns (response ids, finished) per row."""
        s, model = self.sampling, self.model
        device = next(model.parameters()).device
        pad = self.tokenizer.pad_token_id
        # Distinct prompts of the batch (rows of one prompt are adjacent), prefilled once each.
        uniq: dict[int, int] = {}
        for i, _ in chunk:
            uniq.setdefault(i, len(uniq))
        prompts = {i: ids for i, ids in chunk}
        width = max(len(ids) for ids in prompts.values())
        # transformers ≥ 5.2x calls the KV cache argument `cache` (`past_key_values` before, deprecated after)
        # (asked of the transformers model itself: a peft wrapper's forward takes **kwargs and passes them on)
        from alignkit.models.masks import unwrap

        cache_arg = "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"
        attention = torch.zeros((len(uniq), width), dtype=torch.long)
        for i, u in uniq.items():  # left padding: the new tokens line up on the right
            attention[u, width - len(prompts[i]) :] = 1
        # Padding that would be computed in one batch; below PAD_TO_SPLIT of its tokens, one call
        # beats one call per prompt (each forward has a fixed cost, which dominates small models).
        padding = 1 - sum(len(prompts[i]) for i in uniq) / (len(uniq) * width)
        cache = logits = None
        if padding > PAD_TO_SPLIT:
            cache, logits = self._prefill_unpadded([prompts[i] for i in uniq], width, device)
        if cache is None:  # little padding, or a cache this loop cannot pad: one left-padded batch
            input_ids = torch.full((len(uniq), width), pad, dtype=torch.long)
            for i, u in uniq.items():
                input_ids[u, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            # Positions count real tokens only (as model.generate computes them for left padding).
            positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (u, width)
            out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                        position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
            cache, logits = _cache_of(out), out.logits[:, -1, :].float()  # (u, V)
        expand = torch.tensor([uniq[i] for i, _ in chunk], device=device)  # (b,) row -> its prompt's prefill row
        if len(uniq) != len(chunk):
            cache.batch_select_indices(expand)
        logits = logits[expand]  # (b, V)
        attention = attention.to(device)[expand]  # (b, width)
        next_pos = attention.sum(-1)  # (b,) position of each row's next token
        rngs = [torch.Generator(device=device).manual_seed(x) if x is not None else None for x in seeds]
        processors = self._processors()
        live = list(range(len(chunk)))  # batch row -> chunk row, for the rows still sampling
        resp: list[list[int]] = [[] for _ in chunk]
        fin = [False] * len(chunk)
        for step in range(s.max_new_tokens):
            scores = processors(None, logits)  # (b, V); temperature / top-k / top-p read no input ids
            _refuse_nonfinite(scores, step + 1)
            if seeds[0] is None:  # greedy (a call is all greedy or all sampled)
                token = scores.argmax(-1)  # (b,)
            else:
                token = draw_tokens(scores, [rngs[r] for r in live])  # (b,) each row from its own stream
            keep = []
            for b, (r, t) in enumerate(zip(live, token.tolist())):
                resp[r].append(t)
                if t in stops:
                    fin[r] = True
                else:
                    keep.append(b)
            if not keep or step + 1 == s.max_new_tokens:
                break
            if len(keep) < len(live):  # finished rows leave the batch and the cache
                idx = torch.tensor(keep, device=device)
                cache.batch_select_indices(idx)
                token, attention, next_pos = token[idx], attention[idx], next_pos[idx]
                live = [live[b] for b in keep]
            attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)  # (b, width + step + 1)
            out = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_pos[:, None],
                        use_cache=True, logits_to_keep=1, **{cache_arg: cache})
            cache, logits = _cache_of(out), out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        return resp, fin


#: Generation engines by ``sampling.backend``: (model, tokenizer, sampling, max_prompt_length) -> Generator.
GENERATORS: dict[str, Callable[..., Generator]] = {"hf": HFGenerator}


def make_generator(model, tokenizer, sampling: SamplingConfig | None = None, max_prompt_length: int = 384) -> Generator:
    """The :class:`Generator` of ``sampling.backend`` for ``model`` (what every sampling method uses)."""
    sampling = sampling or SamplingConfig()
    if sampling.backend not in GENERATORS:
        raise ValueError(f"sampling.backend must be one of {', '.join(GENERATORS)}; got {sampling.backend!r}")
    return GENERATORS[sampling.backend](model, tokenizer, sampling, max_prompt_length)
