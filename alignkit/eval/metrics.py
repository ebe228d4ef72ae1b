"""Policy measurements: KL to a reference from samples, win rates, held-out LM loss.

``kl_to_reference`` is the mean per-sequence KL(π‖π_ref) estimated from samples y ~ π(·|x) with
the k1 estimator Σ_t [log π(y_t|·) − log π_ref(y_t|·)] summed over the response tokens: unbiased
for the sequence-level KL, though a single sample can be negative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from alignkit.models.heads import forward_logps


def _response_batch(prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], pad_id: int) -> dict:
    from alignkit.data.collate import pad_sequences

    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    return pad_sequences(seqs, [len(p) for p in prompt_ids], pad_id)


@torch.no_grad()
def response_logprobs(model, prompt_ids, response_ids, pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over each response: ``(N,)``, in the order given."""
    device = next(model.parameters()).device
    # Batches of similar lengths: sampled responses to prompts of many lengths padded in their own
    # order waste about a third of the forward pass on padding (demo held-out samples: 1.33x).
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(response_ids[i]))
    out = torch.zeros(len(order), dtype=torch.float32, device="cpu")  # as before, whatever torch's defaults
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        batch = _response_batch([prompt_ids[j] for j in rows], [response_ids[j] for j in rows], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logps, mask = forward_logps(model, batch)
        out[rows] = (logps * mask).sum(1).float().cpu()
    return out


def kl_per_sample(policy, reference, prompt_ids, response_ids, pad_id: int) -> torch.Tensor:
    """The k1 term of each sample of π, Σ_t [log π(y_t|·) − log π_ref(y_t|·)]: ``(N,)``. Its mean is
    :func:`kl_to_reference`; per sample it is what a bootstrap over prompts resamples."""
    if not prompt_ids:
        return torch.zeros(0)
    return response_logprobs(policy, prompt_ids, response_ids, pad_id) - response_logprobs(reference, prompt_ids, response_ids, pad_id)


def kl_to_reference(policy, reference, prompt_ids, response_ids, pad_id: int) -> float:
    """Mean per-sequence KL(π‖π_ref) from samples of π (k1 estimator; see module doc)."""
    if not prompt_ids:
        return 0.0
    return float(kl_per_sample(policy, reference, prompt_ids, response_ids, pad_id).mean())


def best_of_n_kl(n: int) -> float:
    """Analytic KL of best-of-n sampling to the base policy: log n − (n−1)/n (Stiennon et al. 2020;
    an upper bound, Beirami et al. 2024)."""
    import math

    return math.log(n) - (n - 1) / n


def win_rate(score: Callable[[object, str], float], prompts: Sequence, a: Sequence[str], b: Sequence[str]) -> float:
    """Fraction of prompts where response ``a`` scores higher than ``b`` (ties count half)."""
    wins = 0.0
    for p, x, y in zip(prompts, a, b):
        sx, sy = score(p, x), score(p, y)
        wins += 1.0 if sx > sy else 0.5 if sx == sy else 0.0
    return wins / max(len(prompts), 1)


@torch.no_grad()
def lm_nll_per_text(model, tokenizer, texts: Sequence[str], batch_size: int = 32,
                    max_length: int = 256) -> tuple[list[float], list[int]]:
    """Summed NLL and predicted-token count of each text (followed by EOS): two lists of len(texts).
    Their ratio of sums is :func:`lm_loss`; per text they are what a bootstrap over documents
    resamples."""
    from alignkit.data.collate import pad_sequences

    device = next(model.parameters()).device
    sums, counts = [], []
    for i in range(0, len(texts), batch_size):
        seqs = [tokenizer(t, add_special_tokens=False)["input_ids"][: max_length - 1] + [tokenizer.eos_token_id]
                for t in texts[i : i + batch_size]]
        batch = {k: v.to(device) for k, v in pad_sequences(seqs, [0] * len(seqs), tokenizer.pad_token_id).items()}
        logps, mask = forward_logps(model, batch)
        sums += (-(logps * mask).sum(1)).double().tolist()
        counts += mask.sum(1).long().tolist()
    return sums, counts


def lm_loss(model, tokenizer, texts: Sequence[str], batch_size: int = 32, max_length: int = 256) -> float:
    """Mean per-token NLL of ``texts`` (each followed by EOS): the pretraining loss used to measure
    the alignment tax."""
    sums, counts = lm_nll_per_text(model, tokenizer, texts, batch_size, max_length)
    return sum(sums) / max(sum(counts), 1)
