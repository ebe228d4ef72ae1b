"""A critique (generative) reward model as a reward source.

The critic (trained by ``alignkit critic``) first writes a critique, then a verdict. Scoring:

1. render the critic's prompt with its template (saved with it as ``critic.json``) and generate
   the critique (greedy by default) up to the verdict prefix ``Verdict:``;
2. append ``Verdict:`` to the generated critique and read the probability of each verdict option
   o_k from the model: p_k = exp(ℓ_k) / Σ_j exp(ℓ_j), where ℓ_k = log π(o_k | prompt, critique,
   "Verdict:"). When every option is a single token (``A``/``B``, ``1``..``5`` with the usual
   tokenizers) this is the softmax of the next-token logits restricted to the option tokens; else
   ℓ_k is the option's summed token log-prob with the chat template's end of turn appended (so no
   option is a prefix of another). The p_k sum to one over the options by construction.

Pairwise: P(a ≻ b) = p_A for the prompt showing a as A and b as B. A critic may favour a position;
with ``average_orders=True`` both orders are judged and averaged,
P(a ≻ b) = ½ (p_A(a, b) + p_B(b, a)), so swapping a and b swaps the probabilities exactly.
:func:`order_stats` measures the bias from both orders.

Pointwise: the reward is the expected score Σ_k s_k p_k on the scale 1..max_score.

:meth:`CritiqueReward.judge` and :meth:`CritiqueReward.rate` return the critiques with the
probabilities, so a person can read why; calling the source (the :class:`RewardSource` interface)
returns scores only and keeps the last call's critiques in ``.last``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from alignkit.rollout.rewards import Messages, RewardSource

MODES = ("pointwise", "pairwise")


class CritiqueReward(RewardSource):
    """A trained critic as a reward source.

    Args:
        model_or_path: a critic directory (output of ``alignkit critic``) or a loaded causal LM.
        tokenizer: needed with a loaded model; read from the directory otherwise.
        mode: ``"pointwise"`` (reward = expected score) or ``"pairwise"`` (reward = P(response ≻
            reference), with ``references``).
        references: for pairwise mode, the reference response of each prompt: a function
            ``(prompt messages) -> str`` or a mapping from the prompt's last user message to it.
        average_orders: judge pairs in both orders and average (removes position bias; twice
            the cost).
        max_new_tokens: longest critique; one that reaches it is cut there and the verdict read.
        temperature: 0 = greedy critiques (deterministic); > 0 samples them with ``seed``.
        template: the :class:`~alignkit.data.critique_template.CritiqueTemplate`; default: the one saved
            with the critic.
    """

    def __init__(self, model_or_path, tokenizer=None, mode: str = "pointwise",
                 references: Callable[[Messages], str] | Mapping[str, str] | None = None,
                 average_orders: bool = False, max_new_tokens: int = 96, temperature: float = 0.0,
                 batch_size: int = 32, max_prompt_length: int = 384, template=None, seed: int = 0,
                 device: str | torch.device = "cpu", name: str = "critique"):
        from alignkit.rollout.generate import SamplingConfig, make_generator
        from alignkit.data.critique_template import CritiqueTemplate

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
            from alignkit.config import ModelConfig
            from alignkit.models.loading import load_causal_lm, load_tokenizer

            path = str(model_or_path)
            model = load_causal_lm(ModelConfig(path=path), trainable=False)
            tokenizer = tokenizer or load_tokenizer(path)
            template = template or CritiqueTemplate.load(path)
        else:
            model = model_or_path
            if tokenizer is None:
                raise ValueError("CritiqueReward: pass the tokenizer with a loaded model")
        self.model, self.tokenizer = model.to(device), tokenizer
        self.template = template or CritiqueTemplate()
        self.mode, self.references, self.average_orders = mode, references, average_orders
        self.batch_size, self.seed, self.name = batch_size, seed, name
        self.generator = make_generator(model, tokenizer, SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, generation_batch_size=max(batch_size, 1)),
            max_prompt_length=max_prompt_length)
        self.max_prompt_length = max_prompt_length
        self.last: list[dict] = []

    # ---- the RewardSource interface -------------------------------------------------------------
    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str]) -> Tensor:
        self._check(prompts, responses)
        if self.mode == "pointwise":
            self.last = self.rate(prompts, responses)
            return torch.tensor([r["score"] for r in self.last], dtype=torch.float32)
        refs = [self._reference(p) for p in prompts]
        self.last = self.judge(prompts, responses, refs)
        return torch.tensor([r["p_a"] for r in self.last], dtype=torch.float32)

    def preference(self, prompts: Sequence[Messages], a: Sequence[str], b: Sequence[str]) -> Tensor:
        """P(a_i ≻ b_i) for each pair: ``(N,)``; its mean is the critic's win rate of a over b."""
        return torch.tensor([r["p_a"] for r in self.judge(prompts, a, b)], dtype=torch.float32)

    # ---- pairwise -------------------------------------------------------------------------------
    def judge(self, prompts: Sequence[Messages], a: Sequence[str], b: Sequence[str],
              both_orders: bool | None = None) -> list[dict]:
        """Critique each pair. Each result has ``critique`` (a shown as A), ``p_first`` (p_A in
        that order), ``p_a`` = P(a ≻ b), ``p_b`` = 1 − p_a and ``verdict`` (``"A"`` if p_a ≥ ½,
        i.e. a is better). Judged in both orders (``both_orders``, default ``average_orders``) it
        also has ``critique_swapped`` and ``p_first_swapped`` (p_A with b shown as A), and p_a is
        the average of both orders."""
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"{self.name}: {len(prompts)} prompts, {len(a)} and {len(b)} responses")
        both = self.average_orders if both_orders is None else both_orders
        t = self.template
        critiques, probs = self._critique([t.pair_prompt(list(p), x, y) for p, x, y in zip(prompts, a, b)], t.pair_options)
        results = [{"critique": c, "p_first": float(p[0])} for c, p in zip(critiques, probs)]
        if both:
            swapped, sprobs = self._critique([t.pair_prompt(list(p), y, x) for p, x, y in zip(prompts, a, b)], t.pair_options)
            for r, c, p in zip(results, swapped, sprobs):
                r["critique_swapped"], r["p_first_swapped"] = c, float(p[0])
        for r in results:
            # With both orders: p(a ≻ b) = ½ (p_A(a, b) + p_B(b, a)), where p_B(b, a) = 1 − p_A(b, a).
            p_a = 0.5 * (r["p_first"] + 1.0 - r["p_first_swapped"]) if both else r["p_first"]
            r.update(p_a=p_a, p_b=1.0 - p_a, verdict="A" if p_a >= 0.5 else "B")
        return results

    def _reference(self, prompt: Messages) -> str:
        if self.references is None:
            raise ValueError(f"{self.name}: pairwise mode needs references (a function or mapping prompt -> response)")
        if callable(self.references):
            return self.references(prompt)
        users = [m["content"] for m in prompt if m["role"] == "user"]
        try:
            return self.references[users[-1]]
        except (KeyError, IndexError):
            raise KeyError(f"{self.name}: no reference response for prompt {users[-1:]!r}") from None

    # ---- pointwise -------------------------------------------------------------------------------
    def rate(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[dict]:
        """Critique each response alone. Each result has ``critique``, ``probs`` (score -> p),
        ``score`` (the expected score Σ s·p_s) and ``verdict`` (the most probable score)."""
        self._check(prompts, responses)
        t = self.template
        critiques, probs = self._critique([t.point_prompt(list(p), r) for p, r in zip(prompts, responses)], t.point_options)
        scores = torch.arange(1, len(t.point_options) + 1, dtype=torch.float32)
        out = []
        for c, p in zip(critiques, probs):
            out.append({"critique": c, "probs": {o: float(x) for o, x in zip(t.point_options, p)},
                        "score": float((p * scores).sum()), "verdict": t.point_options[int(p.argmax())]})
        return out

    # ---- generation and verdict probabilities ------------------------------------------------------
    def _critique(self, critic_prompts: list[Messages], options: Sequence[str]) -> tuple[list[str], Tensor]:
        """Generate a critique for each critic prompt, then the verdict distribution ``(N, K)``."""
        from alignkit.rollout.generate import encode_prompts

        if not critic_prompts:
            return [], torch.zeros(0, len(options))
        prompt_ids = [ids[-self.max_prompt_length:] for ids in encode_prompts(self.tokenizer, critic_prompts)]
        gens = self.generator.generate_ids(prompt_ids, n=1, seed=self.seed)  # greedy critiques draw nothing
        critiques = [self.template.critique_of(t) for t in gens.texts]
        sep = self._separator(critic_prompts[0])
        contexts, tails = [], []
        for ids, critique in zip(prompt_ids, critiques):
            ctx, opt_tails = self._option_tails(sep, critique, options)
            contexts.append(ids + ctx)
            tails.append(opt_tails)
        return critiques, verdict_probs(self.model, contexts, tails, self.tokenizer.pad_token_id, self.batch_size)

    def _separator(self, messages: Messages) -> str:
        """What the chat template puts between the prompt and a reply's text (the same for every
        prompt of one template): a space in the plain layout, nothing in ChatML."""
        from alignkit.data.tokenize import reply_prefix

        return reply_prefix(self.tokenizer, messages)

    def _option_tails(self, sep: str, critique: str, options: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """Token ids of the completion up to where the options differ, and each option's tail.

        Each option's completion is tokenised whole, exactly as training tokenised it, and the
        common prefix split off. If every tail is one token, tails are read from one next-token
        distribution; otherwise the end of turn is appended so no tail is a prefix of another."""
        from alignkit.data.tokenize import chat_format

        tok = self.tokenizer
        full = [tok(sep + self.template.completion(critique, o), add_special_tokens=False)["input_ids"] for o in options]
        n = 0
        while all(len(f) > n + 1 for f in full) and len({f[n] for f in full}) == 1:
            n += 1
        tails = [f[n:] for f in full]
        if not all(len(t) == 1 for t in tails) or len({t[0] for t in tails}) < len(tails):
            end = chat_format(tok).end_of_turn_id
            tails = [t + [end] for t in tails]
        return full[0][:n], tails


@torch.no_grad()
def verdict_probs(model, contexts: list[list[int]], tails: list[list[list[int]]], pad_id: int,
                  batch_size: int = 32) -> Tensor:
    """p_k = softmax_k(log π(tail_k | context)) for each row: ``(N, K)``, rows sum to one.

    Single-token tails need one forward pass per row (the next-token log-probs at the context's
    end); longer tails are scored as whole sequences."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    for i in range(0, len(contexts), batch_size):
        ctx, tl = contexts[i : i + batch_size], tails[i : i + batch_size]
        if all(len(t) == 1 for row in tl for t in row):
            rows.append(_next_token_logps(model, ctx, [[t[0] for t in row] for row in tl], pad_id, device))
        else:
            rows.append(_sequence_option_logps(model, ctx, tl, pad_id, batch_size))
    model.train(was_training)
    logps = torch.cat(rows)  # (N, K) log π(option | context)
    return torch.softmax(logps, dim=-1)


def _next_token_logps(model, contexts, option_ids, pad_id: int, device) -> Tensor:
    width = max(len(c) for c in contexts)
    input_ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(contexts), width), dtype=torch.long)
    for r, ids in enumerate(contexts):  # left padding: every row's last real token is at width - 1
        input_ids[r, width - len(ids) :] = torch.tensor(ids)
        attention[r, width - len(ids) :] = 1
    position_ids = (attention.cumsum(1) - 1).clamp_min(0)  # positions count real tokens only
    inputs = dict(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                  position_ids=position_ids.to(device), use_cache=False)
    try:  # only the last position's logits are needed
        logits = model(**inputs, logits_to_keep=1).logits
    except TypeError:  # an architecture without logits_to_keep
        logits = model(**inputs).logits
    next_logps = torch.log_softmax(logits[:, -1].float(), dim=-1)  # (B, V)
    return next_logps.gather(1, torch.tensor(option_ids, device=device)).cpu()  # (B, K)


def _sequence_option_logps(model, contexts, tails, pad_id: int, batch_size: int) -> Tensor:
    from alignkit.eval.metrics import response_logprobs

    k = len(tails[0])
    prompts = [c for c in contexts for _ in range(k)]  # (B·K) rows: row i·K + j is option j of pair i
    responses = [t for row in tails for t in row]
    return response_logprobs(model, prompts, responses, pad_id, batch_size).view(len(contexts), k)


def order_stats(results: Sequence[dict]) -> dict[str, float]:
    """Position bias from pairs judged in both orders (results of ``judge(..., both_orders=True)``).

    - ``position_bias`` = mean_i ½ (p_A(a_i, b_i) + p_A(b_i, a_i)) − ½, in [−½, ½]: how much more
      probability the first-shown response gets than an order-blind critic would give it
      (positive: favours A, negative: favours B, 0: no bias on average).
    - ``order_consistency``: fraction of pairs whose verdict names the same response in both
      orders.
    - ``order_gap`` = mean_i |p_A(a_i, b_i) − (1 − p_A(b_i, a_i))|: how far one order's P(a ≻ b)
      is from the swapped order's, pair by pair (0 for a perfectly order-consistent critic).
    """
    both = [r for r in results if "p_first_swapped" in r]
    if not both:
        raise ValueError("order_stats needs pairs judged in both orders (judge(..., both_orders=True))")
    n = len(both)
    bias = sum(0.5 * (r["p_first"] + r["p_first_swapped"]) for r in both) / n - 0.5
    consistent = sum((r["p_first"] >= 0.5) != (r["p_first_swapped"] >= 0.5) for r in both) / n
    gap = sum(abs(r["p_first"] - (1.0 - r["p_first_swapped"])) for r in both) / n
    return {"position_bias": bias, "order_consistency": consistent, "order_gap": gap}
