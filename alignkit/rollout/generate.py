"""Batched sampling behind one small interface, so a faster engine can slot in.

A :class:`Generator` turns chat prompts into sampled responses: ``generate(prompts, n)`` returns
``n`` samples per prompt (consecutive: prompt i's samples are rows ``i*n .. i*n+n-1``). The
trainers and evaluators only use this interface; :class:`HFGenerator` implements it with
``transformers``' ``generate`` (KV cache, left-padded batches, temperature / top-p / top-k, stop
at the chat template's end of turn or EOS, see :func:`alignkit.data.tokenize.chat_format`). A vLLM-backed generator on GPU would implement the same method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    """Interface: sample ``n`` responses per chat prompt."""

    def generate(self, prompts: list[list[dict]], n: int = 1) -> Generations:  # pragma: no cover
        raise NotImplementedError


def encode_prompts(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    """Prompt token ids exactly as the data layer builds them for training."""
    from alignkit.data import encode_prompt

    return [encode_prompt(tokenizer, p) for p in prompts]


class HFGenerator(Generator):
    """``transformers`` ``generate`` with the KV cache on left-padded batches."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig | None = None, max_prompt_length: int = 384):
        from alignkit.data.tokenize import stop_token_ids

        self.model, self.tokenizer = model, tokenizer
        self.sampling = sampling or SamplingConfig()
        self.max_prompt_length = max_prompt_length
        self.stop_ids = stop_token_ids(tokenizer)
        """Sampling stops at any of these: the chat template's end of turn and EOS."""

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[list[int]], n: int = 1, seed: int | None = None) -> Generations:
        s = self.sampling
        tok = self.tokenizer
        stops, pad = set(self.stop_ids), tok.pad_token_id
        model = self.model
        device = next(model.parameters()).device
        expanded = [(i, ids[-self.max_prompt_length :]) for i, ids in enumerate(prompt_ids) for _ in range(n)]
        out_prompt, out_resp, out_fin, out_idx = [], [], [], []
        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for start in range(0, len(expanded), s.generation_batch_size):
            chunk = expanded[start : start + s.generation_batch_size]
            width = max(len(ids) for _, ids in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (_, ids) in enumerate(chunk):  # left padding: the new tokens line up on the right
                input_ids[r, width - len(ids) :] = torch.tensor(ids)
                attention[r, width - len(ids) :] = 1
            kwargs = dict(max_new_tokens=s.max_new_tokens, eos_token_id=list(self.stop_ids), pad_token_id=pad, use_cache=True)
            if s.temperature > 0:
                # top_k=0 (not None): transformers fills None with its default top_k=50, silently truncating
                # the distribution the policy's log-probs are computed under.
                kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if gen is not None:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            seqs = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
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
        model.train(was_training)
        texts = [tok.decode([t for t in r if t not in stops], skip_special_tokens=True).strip() for r in out_resp]
        return Generations(out_prompt, out_resp, texts, out_fin, out_idx)

    def generate(self, prompts: list[list[dict]], n: int = 1, seed: int | None = None) -> Generations:
        return self.generate_ids(encode_prompts(self.tokenizer, prompts), n=n, seed=seed)
