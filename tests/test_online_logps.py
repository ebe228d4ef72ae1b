"""The online methods' log-probs (PPO, GRPO, RLOO) on the chunked path (alignkit/linear_logps.py
through alignkit/train/online/forward.py) against the full logits.

* ``policy_forward`` on a rollout batch (left-padded prompts, right-padded responses, tokens after
  EOS masked): log π(a_t|s_t) and the entropy at the sampling temperature equal a plain forward's
  ``log_softmax(logits / τ)`` read at the response slice, on both paths; greedy (τ = 0) reads
  the undivided distribution; the gradients of every parameter are equal on both paths.
* Every online loss (PPO with a shared value head and with a separate critic, GRPO, RLOO): the
  per-token losses, the logged metrics and the gradients equal on both paths; PPO's values equal
  the critic on a plain forward (the value path is unaffected); the chunked path computes no
  ``(B, L, V)`` logits.
* One tiny run per method with ``run.logps_path=chunked`` and ``=full``: the same weights.
* ``run.logps_path`` is an option of the online commands, announced at start-up.

Float64 models for the loss tests, so "equal" is 1e-10.
"""

from __future__ import annotations

import pytest
import torch

from alignkit import linear_logps as chunked_op
from alignkit.models.output_head import logps_path, set_logps_path
from alignkit.rollout.batch import build_rollout_batch
from alignkit.rollout.generate import Generations
from alignkit.train.online import LOSS_REDUCTIONS, policy_forward, response_slice
from alignkit.ops import masked_sum

V, H, PAD, EOS = 101, 32, 0, 1


@pytest.fixture(scope="module")
def lm():
    """A float64 tiny Llama (random weights, larger than the init so the logits span a few nats)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=V, hidden_size=H, num_attention_heads=2, num_hidden_layers=2,
                                  intermediate_size=48, num_key_value_heads=1, max_position_embeddings=128,
                                  pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").double().eval()
        for p in model.parameters():
            p.data.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """3 rows per chunk, so every batch below spans several chunks."""
    monkeypatch.setattr(chunked_op, "CHUNK_ELEMENTS", 3 * V)


def _batch():
    """Four episodes: finished, tokens after EOS (masked), never ended, EOS only; prompts of 1–4 tokens."""
    g = torch.Generator().manual_seed(5)

    def ids(n):
        return torch.randint(3, V, (n,), generator=g).tolist()

    gens = Generations(prompt_ids=[ids(3), ids(1), ids(4), ids(2)],
                       response_ids=[ids(2) + [EOS], ids(1) + [EOS] + ids(2), ids(5), [EOS]],
                       texts=["", "", "", ""], finished=[True, True, False, True], prompt_index=[0, 1, 2, 3])
    b = build_rollout_batch(gens, PAD, EOS)
    B, T = b.response_ids.shape
    m = b.response_mask
    b.logps, b.ref_logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 * m, -torch.rand(
        B, T, generator=g, dtype=torch.float64) * 3 * m
    b.values, b.returns = torch.randn(B, T, generator=g, dtype=torch.float64) * m, torch.randn(
        B, T, generator=g, dtype=torch.float64) * m
    b.advantages = torch.randn(B, T, generator=g, dtype=torch.float64) * m
    return b


def _on_both_paths(lm, model, fn):
    """fn() → (loss, values...) on the chunked and on the full path of ``lm``: [(values, grads)] of each."""
    results = []
    try:
        for option in ("chunked", "full"):
            set_logps_path(lm, option)
            model.zero_grad(set_to_none=True)
            loss, *values = fn()
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            results.append(([torch.as_tensor(v).detach() for v in values], grads))
            model.zero_grad(set_to_none=True)
    finally:
        set_logps_path(lm, "auto")
    return results


def _assert_same(results, tol=1e-10):
    (got_values, got_grads), (want_values, want_grads) = results
    assert len(got_values) == len(want_values)
    for g, w in zip(got_values, want_values):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)
    assert got_grads.numel() == want_grads.numel() > 0
    torch.testing.assert_close(got_grads, want_grads, atol=tol, rtol=tol)


# ---- the policy forward ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.7, 1.0, 0.0], ids=["tau=0.7", "tau=1", "greedy"])
def test_policy_forward_equals_a_plain_forward_at_the_sampling_temperature(lm, temperature):
    b = _batch()
    m = b.response_mask.bool()
    with torch.no_grad():
        logits = response_slice(lm(**b.model_inputs()).logits, b) / (temperature or 1.0)  # (B, T, V)
        logp = logits.log_softmax(-1)
        want = logp.gather(-1, b.response_ids[..., None])[..., 0] * m  # (B, T)
        want_entropy = -(logp.exp() * logp).sum(-1) * m
    upstream = torch.randn(2, *m.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run():
        out = policy_forward(lm, b, temperature, entropy=True)
        assert out.logps.requires_grad and not out.entropy.requires_grad  # the entropy is a logged metric
        return (out.logps * upstream[0]).sum() + (out.entropy * upstream[1]).sum(), out.logps, out.entropy

    results = _on_both_paths(lm, lm, run)
    _assert_same(results)
    for values, _ in results:  # each path against the plain forward
        torch.testing.assert_close(values[0], want, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(values[1], want_entropy, atol=1e-10, rtol=1e-10)
        assert (values[0][~m] == 0).all() and (values[1][~m] == 0).all()


def test_the_chunked_path_computes_no_vocabulary_sized_logits(lm):
    b = _batch()
    set_logps_path(lm, "chunked")
    try:
        with torch.no_grad():
            out = policy_forward(lm, b, 0.7)
        assert out.output.logits.shape[1] == 0  # the model computed no logits
        set_logps_path(lm, "full")
        with torch.no_grad():
            assert policy_forward(lm, b, 0.7).output.logits.shape == (*b.input_ids.shape, V)
    finally:
        set_logps_path(lm, "auto")


# ---- every online loss on both paths ---------------------------------------------------------------


def _loss_of(loss_fn, model, b, reduction="token"):
    """The minibatch loss as OnlineLoop.update forms it, the per-token losses and the metrics."""
    losses, metrics = loss_fn(model, b)
    weights, units = LOSS_REDUCTIONS[reduction](b.response_mask)
    loss = masked_sum(losses * weights, b.response_mask) / units
    return loss, losses, torch.tensor([float(metrics[k]) for k in sorted(metrics)], dtype=torch.float64)


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_ppo_loss_equal_on_both_paths_and_values_unaffected(lm, critic):
    import copy

    from transformers import AutoModelForSequenceClassification

    from alignkit.models.heads import ScalarHead
    from alignkit.train.ppo import ActorCritic, PPOConfig, ppo_loss

    cfg = PPOConfig()
    cfg.sampling.temperature = 0.7
    policy = copy.deepcopy(lm)
    if critic == "shared":
        head = torch.nn.Linear(H, 1, dtype=torch.float64)
        torch.nn.init.normal_(head.weight, std=0.3, generator=torch.Generator().manual_seed(2))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            config = copy.deepcopy(lm.config)
            config.num_labels = 1
            head = ScalarHead(AutoModelForSequenceClassification.from_config(
                config, attn_implementation="sdpa").double().eval(), per_token=True)
    model = ActorCritic(policy, head, shared=critic == "shared")
    b = _batch()

    def run():
        loss, losses, metrics = _loss_of(lambda m, mb: ppo_loss(m, mb, cfg, loss_kl_coef=0.1), model, b)
        return loss, losses, metrics

    _assert_same(_on_both_paths(policy, model, run))
    set_logps_path(policy, "chunked")
    try:
        with torch.no_grad():
            out = policy_forward(model, b, 0.7, with_values=True).output
        assert out.logits.shape[1] == 0  # the actor-critic's policy computed no logits ...
        if critic == "shared":  # ... and its values are the head on the plain forward's last hidden state
            plain = policy(**b.model_inputs(), output_hidden_states=True).hidden_states[-1]
            want = head(plain).squeeze(-1)
        else:
            want = head(b.input_ids, b.attention_mask, b.position_ids)
        torch.testing.assert_close(out.values, want.float(), atol=1e-6, rtol=1e-6)
    finally:
        set_logps_path(policy, "auto")


@pytest.mark.parametrize("method", ["grpo", "rloo", "grpo_off_policy"])
def test_grpo_and_rloo_losses_equal_on_both_paths(lm, method):
    from alignkit.train.grpo import GRPOConfig, RLOOConfig, grpo_loss

    cfg = RLOOConfig() if method == "rloo" else GRPOConfig(clip_eps_high=0.28)
    cfg.sampling.temperature = 0.8
    b = _batch()
    b.advantages = torch.randn(len(b), generator=torch.Generator().manual_seed(4), dtype=torch.float64)  # (B,)
    if method != "grpo_off_policy":
        b.logps = None  # on-policy: π_old is the current log-probs, detached
    kl_coef = cfg.kl.kl_coef if cfg.kl.kl_penalty == "loss" else 0.0

    def run():
        return _loss_of(lambda m, mb: grpo_loss(m, mb, cfg, kl_coef), lm, b, cfg.loss_reduction)

    _assert_same(_on_both_paths(lm, lm, run))


# ---- the option, and tiny runs on both paths ----------------------------------------------------------


PROMPTS = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(8)]


def _digits(prompt, response: str) -> float:
    return sum(c.isdigit() for c in response) / max(1, len(response))


def assert_same_training(a: dict, b: dict, start: dict) -> None:
    """Two runs that differ only in float rounding trained alike.

    The log-probs differ by ~1e-7 between the paths. The weights cannot be compared entry by
    entry: Adam's g/√v turns rounding into up to a whole step of LR on entries whose gradient is
    near zero (its first step is the sign of the gradient), and where a minibatch holds
    whole GRPO groups, whose advantages sum to zero, many entries nearly cancel (seen: 15% of a
    32-entry norm weight's update after 8 steps, with losses equal to 3e-8). So the weights are
    compared as one update: the runs' changes must agree to 10% in norm over all weights (a path
    that misplaced log-probs moves them elsewhere altogether, ~100%); the float64 unit tests above
    hold the paths to 1e-10."""
    delta_a = torch.cat([(a[k] - start[k]).flatten() for k in sorted(b)])
    delta_b = torch.cat([(b[k] - start[k]).flatten() for k in sorted(b)])
    assert float((delta_a - delta_b).norm()) <= 0.1 * float(delta_b.norm()), float((delta_a - delta_b).norm() / delta_b.norm())


def _run(method, tiny_dir, out, option):
    from alignkit.config import ModelConfig, OptimConfig, RunConfig
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.rewards import FunctionReward
    from alignkit.train.grpo import GRPOConfig, RLOOConfig, run_grpo
    from alignkit.train.online import RewardConfig, RolloutConfig
    from alignkit.train.ppo import PPOConfig, run_ppo

    cls, run = {"ppo": (PPOConfig, run_ppo), "grpo": (GRPOConfig, run_grpo), "rloo": (RLOOConfig, run_grpo)}[method]
    # GRPO/RLOO keep one layout (padded) so only the log-prob path differs between the runs; the
    # prefix-shared layout against the padded one: tests/test_online_shared_prompts.py.
    layout = {} if method == "ppo" else {"batching": "padded"}
    cfg = cls(model=ModelConfig(path=str(tiny_dir)), **layout,
              optim=OptimConfig(lr=1e-3, batch_size=4, schedule="constant", warmup_ratio=0.0),
              run=RunConfig(output_dir=str(out), progress=False, report_to="jsonl", logps_path=option),
              sampling=SamplingConfig(max_new_tokens=6, temperature=0.9),
              reward=RewardConfig(unfinished_penalty=0.0),
              rollout=RolloutConfig(prompts_per_rollout=4, samples_per_prompt=1 if method == "ppo" else 2,
                                    num_rollouts=2, ppo_epochs=2))
    result = run(cfg, PROMPTS, reward=FunctionReward(_digits))
    from safetensors.torch import load_file

    return result, load_file(str(result.output_dir / "model.safetensors"))


@pytest.mark.parametrize("method", ["ppo", "grpo", "rloo"])
def test_a_tiny_run_gives_the_same_weights_on_both_paths(method, tiny_dir, tmp_path, capsys):
    chunked_run, chunked_weights = _run(method, tiny_dir, tmp_path / "chunked", "chunked")
    assert "log-probs: chunked" in capsys.readouterr().out  # announced at start-up
    full_run, full_weights = _run(method, tiny_dir, tmp_path / "full", "full")
    assert "log-probs: full (run.logps_path=full" in capsys.readouterr().out
    assert chunked_weights.keys() == full_weights.keys()
    from safetensors.torch import load_file

    start = load_file(str(tiny_dir / "model.safetensors"))
    moved = max(float((full_weights[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-4  # the runs trained
    assert_same_training(chunked_weights, full_weights, start)
    assert [h["reward"] for h in chunked_run.history] == [h["reward"] for h in full_run.history]  # same samples


def test_logps_path_is_an_option_of_the_online_commands():
    from alignkit.train.grpo import GRPOConfig, RLOOConfig
    from alignkit.train.ppo import PPOConfig

    for cls in (PPOConfig, GRPOConfig, RLOOConfig):
        assert "run.logps_path" not in getattr(cls, "UNREAD")
