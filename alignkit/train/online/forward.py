"""Forward passes over a rollout batch: the policy's log-probs of the sampled tokens.

The log-probs (and the entropy, where logged) are read at the response positions only, through
:func:`alignkit.models.heads.position_logps`: from the last hidden states through the output head
in chunks (no ``(B, P+T, V)`` logits), or from the model's logits where the head cannot be split
off or ``run.logps_path=full`` (:mod:`alignkit.models.output_head` says which and why). Both
give the same numbers and gradients up to float rounding (tests/test_online_logps.py).

GRPO and RLOO sample a group of G responses per prompt, so a forward batch holds the same prompt
G times. With ``share_prompts`` the batch is laid out as one row ``x ‖ y_1 ‖ … ‖ y_k`` per prompt
(:func:`shared_prompt_inputs`): the prompt is computed once, each response sees the prompt and
itself at the positions of its own sequence, so its log-probs are those of the padded layout up to
float rounding (tests/test_online_shared_prompts.py), on G − 1 fewer copies of the prompt.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import Tensor

from alignkit.data.prefix_sharing import collate_prompt_groups
from alignkit.models.heads import position_logps
from alignkit.models.masks import unwrap
from alignkit.models.scoring import plan_rows, row_costs
from alignkit.ops import masked_sum
from alignkit.rollout.batch import RolloutBatch


def response_slice(x: Tensor, batch: RolloutBatch) -> Tensor:
    """Columns of a (B, P+T, ...) model output that predict / evaluate the response: (B, T, ...).

    Position P−1+t sees x and a_<t, i.e. the state s_t, and predicts a_t.
    """
    P, T = batch.prompt_width, batch.response_ids.shape[1]
    return x[:, P - 1 : P - 1 + T]


class PolicyForward(NamedTuple):
    """What :func:`policy_forward` returns."""

    logps: Tensor
    """(B, T) log π(a_t|s_t) at the sampling temperature, 0 outside ``response_mask``."""
    entropy: Tensor | None
    """(B, T) H(π(·|s_t)) at the sampling temperature, 0 outside the mask, detached (a logged metric); None unless asked for."""
    output: object
    """The model's own output (PPO's ``values`` ride on it; its ``logits`` are ``(B, 0, V)`` on the chunked path)."""


class SharedPromptInputs(NamedTuple):
    """What :func:`shared_prompt_inputs` returns."""

    inputs: dict
    """Model inputs of the shared layout: ``input_ids``, ``position_ids`` (R, L) and the bool ``attention_mask`` (R, 1, L, L)."""
    index: Tensor
    """(N,) flat index into the (R·L) positions of the position predicting each response token."""
    rows: Tensor
    """(N,) the episode (row of the rollout batch) of each response token."""
    cols: Tensor
    """(N,) its step t in that episode."""


_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _row_costs(model) -> tuple[float, float]:
    """:func:`~alignkit.models.scoring.row_costs` of ``model``, computed once per model (it walks every parameter)."""
    if model not in _COSTS:
        _COSTS[model] = row_costs(model)
    return _COSTS[model]


def shared_prompt_inputs(model, batch: RolloutBatch) -> SharedPromptInputs:
    """The episodes of ``batch`` with one row per distinct prompt, ``x ‖ y_1 ‖ … ‖ y_k``, for
    log π(a_t|s_t) of every counted response token (layout: :func:`collate_prompt_groups`).

    Token t of response y_j is predicted by the position before it in its branch, and the first
    one (t = 0) by the prompt's last token, exactly as P−1+t predicts a_t in the padded layout.
    Responses join their prompt's row only while :func:`~alignkit.models.scoring.plan_rows`
    estimates that cheaper than a row of their own (a row's attention grows with its square), so
    long responses to a short prompt may keep separate rows."""
    P = batch.prompt_width
    ids, responses = batch.input_ids.cpu(), batch.response_ids.cpu()  # one copy, not one per episode
    mask = batch.response_mask.cpu().bool()
    counts = mask.sum(dim=1)
    if not torch.equal(mask, torch.arange(mask.shape[1]) < counts[:, None]):
        raise ValueError("share_prompts needs each episode's counted response tokens to be a prefix of its row "
                         "(response_mask 1 … 1 0 … 0, as build_rollout_batch makes it); this batch masks tokens "
                         "inside a response: use batching=padded")
    lengths = counts.tolist()
    prompt_mask = batch.attention_mask[:, :P].cpu().bool()
    items = [{"prompt_ids": ids[i, :P][prompt_mask[i]].tolist(),
              "response_ids": responses[i, : lengths[i]].tolist()} for i in range(len(batch))]
    per_token, per_pair = _row_costs(model)
    if getattr(unwrap(model).config, "_attn_implementation", None) == "eager":
        # Eager attention keeps every row's (L × L) scores for the backward pass: plan by attention
        # pairs alone, so the shared rows never hold more scores than one padded row per episode.
        per_token = 0.0
    plan = plan_rows(items, per_token, per_pair)
    layout = collate_prompt_groups([(prompt, [items[i]["response_ids"] for i in idx]) for prompt, idx in plan], 0)
    L = layout["input_ids"].shape[1]
    index, rows, cols = [], [], []
    for r, (prompt, idx) in enumerate(plan):
        start = r * L + len(prompt)  # flat index of the row's first response token
        for i in idx:
            n = lengths[i]
            if n:
                predictors = torch.arange(start - 1, start + n - 1)
                predictors[0] = r * L + len(prompt) - 1  # every response's first token: the prompt's last
                index.append(predictors)
                rows.append(torch.full((n,), i))
                cols.append(torch.arange(n))
            start += n
    device = batch.input_ids.device
    inputs = {k: layout[k].to(device) for k in ("input_ids", "position_ids", "attention_mask")}
    empty = torch.zeros(0, dtype=torch.long)
    index, rows, cols = (torch.cat(x) if x else empty for x in (index, rows, cols))
    return SharedPromptInputs(inputs, index.to(device), rows.to(device), cols.to(device))


def policy_forward(model, batch: RolloutBatch, temperature: float, entropy: bool = False,
                   share_prompts: bool = False, **kwargs) -> PolicyForward:
    """One forward of ``model`` over [x | y]: log π(a_t|s_t) of the sampled tokens under the
    distribution they were drawn from (the logits divided by the sampling ``temperature``; 0,
    greedy, reads the undivided distribution), and its entropy if ``entropy`` (detached: the online
    losses only log it, so the full path keeps no ``(N, V)`` softmax for a backward pass).

    ``share_prompts``: episodes with the same prompt share one row (:func:`shared_prompt_inputs`;
    the caller checks that ``model`` is served exactly with that layout,
    :func:`alignkit.models.masks.batching_refusal`). The model's own output then has the shared
    layout's rows, not the batch's."""
    if share_prompts:
        if kwargs:  # e.g. PPO's value head: its per-position outputs would have the shared layout's rows
            raise ValueError(f"share_prompts does not take other forward arguments ({', '.join(kwargs)}): the model's "
                             "outputs would have the shared layout's rows, not the batch's")
        inputs, index, rows, cols = shared_prompt_inputs(model, batch)
    else:
        B, L = batch.input_ids.shape
        rows, cols = batch.response_mask.bool().nonzero(as_tuple=True)  # (N,) each: the response tokens that count
        index = rows * L + batch.prompt_width - 1 + cols  # (N,) flat into the (B·L) positions; P−1+t predicts a_t
        inputs = batch.model_inputs()
    tau = temperature if temperature > 0 else 1.0
    out = position_logps(model, inputs, index, batch.response_ids[rows, cols], temperature=tau,
                         entropy=entropy, entropy_grad=False, **kwargs)
    shape = batch.response_ids.shape  # (B, T)
    logps = out.logps.new_zeros(shape).index_put((rows, cols), out.logps)  # (B, T)
    ent = None if out.entropy is None else out.entropy.new_zeros(shape).index_put((rows, cols), out.entropy)
    return PolicyForward(logps, ent, out.output)


@torch.no_grad()
def rollout_logps(model, batch: RolloutBatch, temperature: float, batch_size: int, **kwargs) -> tuple[Tensor, list]:
    """log π(a_t|s_t) for a whole rollout in forward batches of ``batch_size``: ((B, T), outputs)."""
    logps, outs = [], []
    for start in range(0, len(batch), batch_size):
        mb = batch.select(slice(start, start + batch_size))
        lp, _, out = policy_forward(model, mb, temperature, **kwargs)
        logps.append(lp.float())
        outs.append(out)
    return torch.cat(logps), outs


def sequence_kl(kl: Tensor, mask: Tensor) -> Tensor:
    """(B,) Σ_t KL_t over each response: the sequence-level KL the logs and controllers use."""
    return masked_sum(kl, mask, dim=1)
