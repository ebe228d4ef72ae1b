"""Policy measurements: KL from samples, best-of-N KL, win rate, LM loss."""

import math

import pytest
import torch

from alignkit.eval.metrics import best_of_n_kl, kl_to_reference, lm_loss, response_logprobs, win_rate


def test_kl_of_a_policy_to_itself_is_zero_and_to_another_is_not(tiny_dir, tiny_tokenizer):
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm

    a = load_causal_lm(ModelConfig(path=str(tiny_dir)), trainable=False)
    b = load_causal_lm(ModelConfig(path=str(tiny_dir)), trainable=False)
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11, 1], [12, 1]]
    assert kl_to_reference(a, b, prompts, responses, 0) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        b.lm_head.weight.add_(0.5 * torch.randn_like(b.lm_head.weight))
    diff = response_logprobs(a, prompts, responses, 0) - response_logprobs(b, prompts, responses, 0)
    assert kl_to_reference(a, b, prompts, responses, 0) == pytest.approx(float(diff.mean()), rel=1e-6)
    assert abs(float(diff.mean())) > 1e-3
    # per-token log-probs of the responses only: 3 and 2 tokens, each log p < 0
    assert (response_logprobs(a, prompts, responses, 0) < 0).all()


def test_response_logprobs_equal_one_plain_forward_per_sample_in_the_given_order(tiny_dir):
    """Rows are batched by length (not in their order): each value is still its own sample's
    Σ_t log π(y_t | x, y_<t), as a plain forward of that sample alone gives it."""
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm

    model = load_causal_lm(ModelConfig(path=str(tiny_dir)), trainable=False).double()
    g = torch.Generator().manual_seed(0)
    lengths = [(7, 3), (2, 9), (5, 1), (11, 4), (3, 3), (1, 6), (8, 8)]
    prompts = [torch.randint(3, 200, (a,), generator=g).tolist() for a, _ in lengths]
    responses = [torch.randint(3, 200, (b,), generator=g).tolist() for _, b in lengths]
    got = response_logprobs(model, prompts, responses, 0, batch_size=3)
    for k, (x, y) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([x + y])).logits[0].log_softmax(-1)
        want = sum(float(logits[len(x) - 1 + t, tok]) for t, tok in enumerate(y))
        assert float(got[k]) == pytest.approx(want, abs=1e-5), k  # float32 out


def test_best_of_n_kl_formula():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(8) == pytest.approx(math.log(8) - 7 / 8)


def test_win_rate_counts_ties_half():
    score = lambda p, r: len(r)  # noqa: E731
    assert win_rate(score, ["p"] * 3, ["aaa", "a", "aa"], ["a", "aaa", "aa"]) == pytest.approx(0.5)
    assert win_rate(score, ["p"] * 2, ["aaa", "aa"], ["a", "a"]) == 1.0


def test_lm_loss_is_mean_token_nll(tiny_dir, tiny_tokenizer):
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm

    model = load_causal_lm(ModelConfig(path=str(tiny_dir)), trainable=False)
    loss = lm_loss(model, tiny_tokenizer, ["The colour of item 3 is red."])
    ids = tiny_tokenizer("The colour of item 3 is red.", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    assert loss == pytest.approx(float(ref), rel=1e-5)


# ------------------------------------------------------------------ uncertainty (alignkit.eval.uncertainty)


def test_percentile_interval_takes_the_order_statistics():
    from alignkit.eval.uncertainty import percentile_interval

    # B = 100, level 0.9: k = floor(100 · 0.05) = 5 → the 6th smallest and the 6th largest
    assert percentile_interval(list(range(100))[::-1], 0.9) == (5.0, 94.0)
    # B = 40, level 0.95: k = floor(40 · 0.025) = 1 → the 2nd smallest and the 2nd largest
    assert percentile_interval(list(range(40)), 0.95) == (1.0, 38.0)
    with pytest.raises(ValueError):
        percentile_interval([], 0.95)


def test_exact_bootstrap_matches_a_hand_computation():
    """Two prompts with values [0] and [1]: the four equally likely resamples (0,0), (0,1), (1,0),
    (1,1) have means 0, 0.5, 0.5, 1. Level 0.5: k = floor(4 · 0.25) = 1 → (0.5, 0.5); level 0.95:
    k = 0 → (0, 1)."""
    from alignkit.eval.uncertainty import bootstrap_mean

    assert bootstrap_mean([[0.0], [1.0]], resamples=None, level=0.5) == {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 2}
    assert bootstrap_mean([[0.0], [1.0]], resamples=None, level=0.95) == {"mean": 0.5, "low": 0.0, "high": 1.0, "n": 2}
    # Prompts are resampled whole: [1, 1] and [0] give the ratio (2·a + 0·b) / (2·a + 1·b) over the
    # resample's counts a, b of each prompt: (0,0) → 0, (0,1)/(1,0) → 2/3, (1,1) → 1; level 0.5 → (2/3, 2/3)
    r = bootstrap_mean([[1.0, 1.0], [0.0]], resamples=None, level=0.5)
    assert r["mean"] == pytest.approx(2 / 3) and r["low"] == pytest.approx(2 / 3) and r["high"] == pytest.approx(2 / 3)


def test_sampled_bootstrap_approaches_the_normal_interval_and_is_seeded():
    """400 prompts, one 0/1 value each, 120 ones: p = 0.3, se = sqrt(0.3 · 0.7 / 400) = 0.02291, so
    the 95% interval is about 0.3 ± 1.96 · 0.02291 = [0.2551, 0.3449]."""
    from alignkit.eval.uncertainty import bootstrap_mean

    groups = [[1.0]] * 120 + [[0.0]] * 280
    r = bootstrap_mean(groups, resamples=4000, seed=1)
    assert r["mean"] == pytest.approx(0.3)
    assert r["low"] == pytest.approx(0.2551, abs=0.006) and r["high"] == pytest.approx(0.3449, abs=0.006)
    assert bootstrap_mean(groups, resamples=500, seed=3) == bootstrap_mean(groups, resamples=500, seed=3)


def test_bootstrap_resamples_prompts_not_samples():
    """The same 200 values as 50 prompts × 4 identical samples carry the information of 50 values,
    not 200: the interval is about twice as wide (√4) as with 200 prompts of one sample."""
    from alignkit.eval.uncertainty import bootstrap_mean

    flat = [[1.0]] * 80 + [[0.0]] * 120
    clustered = [[1.0] * 4] * 20 + [[0.0] * 4] * 30
    wf, wc = (lambda r: r["high"] - r["low"])(bootstrap_mean(flat)), (lambda r: r["high"] - r["low"])(bootstrap_mean(clustered))
    assert bootstrap_mean(flat)["mean"] == bootstrap_mean(clustered)["mean"] == pytest.approx(0.4)
    assert 1.6 < wc / wf < 2.4
    assert bootstrap_mean([]) is None


def test_paired_difference_is_tighter_than_the_two_intervals():
    """Policy A beats B by 0.1 on every prompt while prompts differ a lot: the paired interval of
    A − B is a point at 0.1 (every resample has the same difference), although the two marginal
    intervals overlap."""
    from alignkit.eval.uncertainty import bootstrap_difference, bootstrap_mean

    base = [[float(g % 7) / 7] for g in range(60)]
    a = [[v[0] + 0.1] for v in base]
    d = bootstrap_difference(a, base)
    assert d["mean"] == pytest.approx(0.1) and d["low"] == pytest.approx(0.1) and d["high"] == pytest.approx(0.1)
    ra, rb = bootstrap_mean(a), bootstrap_mean(base)
    assert ra["low"] < rb["high"]  # the marginal intervals overlap
    with pytest.raises(ValueError):
        bootstrap_difference(a, base[:-1])


def test_seed_interval_is_students_t_by_hand():
    """[1, 2, 3]: mean 2, sd 1, t(2 df) = 4.303 → 2 ± 4.303 / √3 = 2 ± 2.4843."""
    from alignkit.eval.uncertainty import seed_interval

    r = seed_interval([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["sd"] == pytest.approx(1.0) and r["n"] == 3
    assert r["low"] == pytest.approx(2 - 2.4843, abs=1e-4) and r["high"] == pytest.approx(2 + 2.4843, abs=1e-4)
    assert seed_interval([0.5]) == {"mean": 0.5, "low": None, "high": None, "n": 1, "sd": None}
    assert seed_interval([None, None]) is None


def test_prediction_interval_is_students_t_for_one_more_run_by_hand():
    """[1, 2, 3]: 2 ± 4.303·1·√(1 + 1/3) = 2 ± 4.9687, twice the mean's half-width here."""
    from alignkit.eval.uncertainty import prediction_interval, seed_interval

    low, high = prediction_interval(seed_interval([1.0, 2.0, 3.0]))
    assert low == pytest.approx(2 - 4.9687, abs=1e-4) and high == pytest.approx(2 + 4.9687, abs=1e-4)
    assert prediction_interval(seed_interval([0.5])) is None and prediction_interval(None) is None


def test_run_environment_names_the_cpu_libraries_and_threads():
    import torch

    from alignkit.eval.environment import VECTOR_FLAGS, comparable, run_environment

    env = run_environment(seed=7)
    assert env["seed"] == 7 and env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    assert env["cpu_model"] and set(env["cpu_vector_flags"]) <= set(VECTOR_FLAGS)
    assert comparable(env, dict(env)) == []
    assert comparable(env, {**env, "cpu_vector_flags": ["avx512f"], "torch_threads": 99}) == ["cpu_vector_flags", "torch_threads"]


def test_run_environment_names_the_source_commit():
    """A report says which code made it: the checkout's HEAD (with +dirty when alignkit/ differs)."""
    import subprocess
    from pathlib import Path

    from alignkit.eval.environment import run_environment

    root = Path(__file__).resolve().parents[1]
    commit = run_environment()["alignkit_commit"]
    if not (root / ".git").exists():
        assert commit is None
        return
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert commit.removesuffix("+dirty") == head
