"""GRPO / RLOO forward passes with a group's prompt computed once (``batching=prefix_shared``,
alignkit/train/online/forward.py ``shared_prompt_inputs``) against a plain forward per episode.

* On every decoder family alignkit shares prompts for (eager and sdpa, sliding windows included):
  log π(a_t|s_t) at the sampling temperature, the entropy and the gradient of a weighted sum of
  the log-probs equal those of one unpadded forward per episode ``x ‖ y`` (float64, 1e-5 as in
  tests/test_conformance.py), for groups of unequal responses, tokens after EOS, an unfinished
  response, and a forward batch that holds only part of a group.
* The row plan: a long response to a short prompt keeps a row of its own when sharing would cost
  more attention than it saves.
* The GRPO and RLOO losses (values, metrics, gradients) are the padded layout's.
* A tiny GRPO run with ``batching=prefix_shared`` trains to the weights of ``batching=padded``;
  ``auto`` shares where it is exact and falls back to padded elsewhere; a forced
  ``prefix_shared`` on a model it cannot serve is refused before training.
"""

from __future__ import annotations

import pytest
import torch
from test_conformance import CONFIGS, DECODERS, NO_SDPA, V, _get, _grads, _tokens
from test_online_logps import assert_same_training

from alignkit.rollout.batch import build_rollout_batch
from alignkit.rollout.generate import Generations
from alignkit.train.online import policy_forward
from alignkit.train.online.forward import shared_prompt_inputs

EOS, TAU = 1, 0.7
#: (prompt length, [response lengths of its G = 3 samples]); responses end with EOS unless noted.
GROUPS = [(5, [6, 11, 3]), (9, [12, 4, 9]), (7, [2, 8, 10])]


def _rollout():
    """Three prompts × three samples, consecutive per group as the generator returns them; sample
    (0, 1) has tokens after its EOS (masked out), sample (2, 2) never ends."""
    prompts, responses, prompt_index = [], [], []
    for g, (p, lengths) in enumerate(GROUPS):
        prompt = _tokens(1000 + g, p)
        for j, n in enumerate(lengths):
            body = _tokens(2000 + 10 * g + j, n - 1)
            response = body if (g, j) == (2, 2) else body + [EOS]
            if (g, j) == (0, 1):
                response = response + _tokens(3000, 3)
            prompts.append(prompt)
            responses.append(response)
            prompt_index.append(g)
    gens = Generations(prompt_ids=prompts, response_ids=responses, texts=[""] * len(prompts),
                       finished=[True] * len(prompts), prompt_index=prompt_index)
    return build_rollout_batch(gens, 0, EOS), prompts, responses


def _reference(model, batch, prompts, rows=None):
    """(B, T) log-probs and entropies from one unpadded forward per episode (through its EOS)."""
    rows = range(len(batch)) if rows is None else rows
    B, T = batch.response_ids.shape
    logps = torch.zeros(B, T, dtype=torch.float64)
    entropy = torch.zeros(B, T, dtype=torch.float64)
    for i in rows:
        n = int(batch.response_mask[i].sum())
        x, y = prompts[i], batch.response_ids[i, :n].tolist()
        logits = model(input_ids=torch.tensor([x + y])).logits[0, len(x) - 1 : len(x) - 1 + n] / TAU  # (n, V)
        lp = logits.log_softmax(-1)
        logps[i, :n] = lp.gather(1, torch.tensor(y)[:, None])[:, 0]
        entropy[i, :n] = -(lp.exp() * lp).sum(-1)
    return logps, entropy


def _weights(batch):
    return torch.randn(batch.response_ids.shape, generator=torch.Generator().manual_seed(7),
                       dtype=torch.float64) * batch.response_mask


@pytest.mark.parametrize("family,attention", [pytest.param(f, a, id=f"{f}-{a}") for f in DECODERS
                                              for a in ("eager", "sdpa") if not (a == "sdpa" and f in NO_SDPA)])
def test_shared_prompt_logps_and_gradients_equal_one_forward_per_episode(family, attention):
    model = _get(family, "lm", attention)
    batch, prompts, _ = _rollout()
    w = _weights(batch)
    ref_logps, ref_entropy = _reference(model, batch, prompts)
    (ref_logps * w).sum().backward()
    ref_grads = _grads(model)

    out = policy_forward(model, batch, TAU, entropy=True, share_prompts=True)
    (out.logps * w).sum().backward()
    rows = out.output.logits.shape[0] if out.output.logits.numel() else None
    assert rows is None or rows < len(batch)  # the full path's logits have the shared layout's rows
    torch.testing.assert_close(out.logps, ref_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy, ref_entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(_grads(model), ref_grads, atol=1e-5, rtol=0)
    assert (out.logps[batch.response_mask == 0] == 0).all()


def test_the_layout_shares_each_prompt_and_keeps_part_of_a_group_exact():
    model = _get("llama", "lm", "sdpa")
    batch, prompts, _ = _rollout()
    layout = shared_prompt_inputs(model, batch)
    assert layout.inputs["input_ids"].shape[0] == len(GROUPS)  # one row per prompt
    lengths = batch.response_mask.sum(1).long()
    assert int(layout.inputs["input_ids"].ne(0).sum()) == sum(p for p, _ in GROUPS) + int(lengths.sum())
    # a forward batch holding part of group 0, all of group 1 and one sample of group 2
    part = [1, 2, 3, 4, 5, 8]
    sub = batch.select(part)
    with torch.no_grad():
        logps = policy_forward(model, sub, TAU, share_prompts=True).logps
        ref, _ = _reference(model, batch, prompts, rows=part)
    torch.testing.assert_close(logps, ref[part], atol=1e-5, rtol=0)


def test_a_long_response_to_a_short_prompt_keeps_its_own_row():
    model = _get("llama", "lm", "sdpa")
    prompt = _tokens(1, 2)
    gens = Generations(prompt_ids=[prompt, prompt], response_ids=[_tokens(2, 90) + [EOS], _tokens(3, 90) + [EOS]],
                       texts=["", ""], finished=[True, True], prompt_index=[0, 0])
    batch = build_rollout_batch(gens, 0, EOS)
    layout = shared_prompt_inputs(model, batch)
    assert layout.inputs["input_ids"].shape[0] == 2  # 2 + 2·91 tokens in one row would attend to 4× the pairs
    with torch.no_grad():
        logps = policy_forward(model, batch, TAU, share_prompts=True).logps
        ref, _ = _reference(model, batch, [prompt, prompt])
    torch.testing.assert_close(logps, ref, atol=1e-5, rtol=0)


def test_under_eager_attention_shared_rows_hold_no_more_attention_scores_than_padded_ones():
    """Eager attention stores each row's L × L scores for backward: its plan keeps Σ L² at or below
    that of one row per episode (sdpa's flash kernels store none, so its plan counts FLOPs)."""
    batch, _, _ = _rollout()
    lengths = batch.response_mask.sum(1).long()
    alone = sum((p + int(n)) ** 2 for (p, ns), n in zip([(p, ns) for p, ns in GROUPS for _ in ns], lengths))
    eager = shared_prompt_inputs(_get("llama", "lm", "eager"), batch).inputs["input_ids"]
    sdpa = shared_prompt_inputs(_get("llama", "lm", "sdpa"), batch).inputs["input_ids"]
    rows = lambda ids: [int(r.ne(0).sum()) for r in ids]  # noqa: E731  (real tokens per row; pad id 0)
    assert sum(L * L for L in rows(eager)) <= alone
    assert len(rows(eager)) > len(rows(sdpa)) == len(GROUPS)  # eager splits groups that sdpa keeps in one row


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_grpo_and_rloo_losses_equal_on_both_layouts(method):
    from alignkit.train.grpo import GRPOConfig, RLOOConfig, grpo_loss
    from alignkit.train.online import LOSS_REDUCTIONS
    from alignkit.ops import masked_sum

    model = _get("llama", "lm", "sdpa")
    cfg = RLOOConfig() if method == "rloo" else GRPOConfig(clip_eps_high=0.28)
    cfg.sampling.temperature = TAU
    batch, _, _ = _rollout()
    g = torch.Generator().manual_seed(4)
    m = batch.response_mask.double()
    batch.response_mask = m
    batch.logps = -torch.rand(m.shape, generator=g, dtype=torch.float64) * 3 * m
    batch.ref_logps = -torch.rand(m.shape, generator=g, dtype=torch.float64) * 3 * m
    batch.advantages = torch.randn(len(batch), generator=g, dtype=torch.float64)
    kl_coef = cfg.kl.kl_coef if cfg.kl.kl_penalty == "loss" else 0.0
    results = []
    for share in (False, True):
        losses, metrics = grpo_loss(model, batch, cfg, kl_coef, share_prompts=share)
        weights, units = LOSS_REDUCTIONS[cfg.loss_reduction](m)
        (masked_sum(losses * weights, m) / units).backward()
        results.append((losses.detach(), {k: float(v) for k, v in metrics.items()}, _grads(model)))
    (l0, m0, g0), (l1, m1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-7, rtol=0)
    assert m0.keys() == m1.keys() and all(abs(m0[k] - m1[k]) < 1e-7 for k in m0)
    torch.testing.assert_close(g1, g0, atol=1e-7, rtol=0)


def test_a_mask_that_is_not_a_prefix_and_extra_forward_arguments_are_refused():
    model = _get("llama", "lm", "sdpa")
    batch, _, _ = _rollout()
    batch.response_mask[0, 1] = 0  # a hole inside a response: the shared layout would misplace log-probs
    with pytest.raises(ValueError, match="prefix of its row .* use batching=padded"):
        policy_forward(model, batch, TAU, share_prompts=True)
    batch, _, _ = _rollout()
    with pytest.raises(ValueError, match="does not take other forward arguments \\(output_hidden_states\\)"):
        policy_forward(model, batch, TAU, share_prompts=True, output_hidden_states=True)


# ---- the option, and tiny runs -----------------------------------------------------------------

PROMPTS = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(8)]


def _digits(prompt, response: str) -> float:
    return sum(c.isdigit() for c in response) / max(1, len(response))


def _run(tiny_dir, out, batching):
    from alignkit.config import ModelConfig, OptimConfig, RunConfig
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.rewards import FunctionReward
    from alignkit.train.grpo import GRPOConfig, run_grpo
    from alignkit.train.online import RewardConfig, RolloutConfig

    # Four minibatches per pass (8 episodes, batch_size 2 = one group): both layouts shuffle whole
    # groups, so they make the same optimizer steps and must train to the same weights.
    cfg = GRPOConfig(model=ModelConfig(path=str(tiny_dir)), batching=batching,
                     optim=OptimConfig(lr=1e-3, batch_size=2, schedule="constant", warmup_ratio=0.0),
                     run=RunConfig(output_dir=str(out), progress=False, report_to="jsonl"),
                     sampling=SamplingConfig(max_new_tokens=6, temperature=0.9),
                     reward=RewardConfig(unfinished_penalty=0.0),
                     rollout=RolloutConfig(prompts_per_rollout=4, samples_per_prompt=2, num_rollouts=2, ppo_epochs=2))
    result = run_grpo(cfg, PROMPTS, reward=FunctionReward(_digits))
    from safetensors.torch import load_file

    return result, load_file(str(result.output_dir / "model.safetensors"))


def test_a_tiny_grpo_run_gives_the_same_weights_on_both_layouts(tiny_dir, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    import alignkit.train.grpo as grpo_module

    seen = []
    original = grpo_module.grpo_loss

    def recording(model, mb, *args):
        seen.append(mb.prompt_index.tolist())
        return original(model, mb, *args)

    monkeypatch.setattr(grpo_module, "grpo_loss", recording)
    shared_run, shared = _run(tiny_dir, tmp_path / "shared", "prefix_shared")
    assert len(seen) == 2 * 2 * 4 and all(len(set(p)) == 1 and len(p) == 2 for p in seen)  # whole groups per step
    out = capsys.readouterr().out
    assert "batching=prefix_shared" in out and "not a multiple" not in out  # announced at start-up
    padded_run, padded = _run(tiny_dir, tmp_path / "padded", "padded")
    assert "batching=padded" in capsys.readouterr().out
    start = load_file(str(tiny_dir / "model.safetensors"))
    assert max(float((padded[k] - start[k]).abs().max()) for k in start) > 1e-4  # the runs trained
    assert_same_training(shared, padded, start)  # float rounding through Adam (its docstring)
    assert [h["reward"] for h in shared_run.history] == [h["reward"] for h in padded_run.history]  # same samples


def test_auto_shares_only_where_exact_and_a_forced_share_is_refused_before_training():
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.train.grpo import GRPOConfig, share_group_prompts

    assert share_group_prompts(GRPOConfig(), _get("mistral", "lm", "eager"))
    assert not share_group_prompts(GRPOConfig(batching="padded"), _get("llama", "lm", "sdpa"))
    gptj = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gptj", vocab_size=V, n_embd=32, n_layer=1, n_head=2, rotary_dim=8, n_positions=64))
    assert not share_group_prompts(GRPOConfig(), gptj)  # auto: padded on a family not tested for sharing
    with pytest.raises(ValueError, match="the policy: grpo batching=prefix_shared is exact only on the decoder families"):
        share_group_prompts(GRPOConfig(batching="prefix_shared"), gptj)
    llama = _get("llama", "lm", "sdpa")  # a reference model given through the Python API is checked too
    assert not share_group_prompts(GRPOConfig(), llama, reference=gptj)
    with pytest.raises(ValueError, match="the reference model: grpo batching=prefix_shared"):
        share_group_prompts(GRPOConfig(batching="prefix_shared"), llama, reference=gptj)
    with pytest.raises(ValueError, match="batching must be auto, padded or prefix_shared; got 'packed'"):
        GRPOConfig(batching="packed").validate()


def test_a_batch_size_that_splits_groups_is_announced(tiny_dir, tmp_path, capsys):
    from alignkit.config import ModelConfig, OptimConfig, RunConfig
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.rewards import FunctionReward
    from alignkit.train.grpo import GRPOConfig, run_grpo
    from alignkit.train.online import RewardConfig, RolloutConfig

    cfg = GRPOConfig(model=ModelConfig(path=str(tiny_dir)),
                     optim=OptimConfig(lr=1e-3, batch_size=3, schedule="constant", warmup_ratio=0.0),
                     run=RunConfig(output_dir=str(tmp_path / "out"), progress=False, report_to="jsonl"),
                     sampling=SamplingConfig(max_new_tokens=4), reward=RewardConfig(unfinished_penalty=0.0),
                     rollout=RolloutConfig(prompts_per_rollout=2, samples_per_prompt=2, num_rollouts=1, ppo_epochs=1))
    run_grpo(cfg, PROMPTS[:2], reward=FunctionReward(_digits))
    assert "optim.batch_size=3 is not a multiple of the group size 2" in capsys.readouterr().out
