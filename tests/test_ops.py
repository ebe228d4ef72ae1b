"""alignkit.ops against naive loop references on seeded random tensors."""

import math

import pytest
import torch

from alignkit import ops
from alignkit.ops import (
    entropy_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_logps,
    token_logps,
)


def _data(B=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [7, 3, 1, 5][:B]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    return x, mask


def _selected(x, mask):
    return [x[b, t].item() for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]


def test_masked_sum_and_mean_match_loops():
    x, mask = _data()
    vals = _selected(x, mask)
    assert masked_sum(x, mask).item() == pytest.approx(sum(vals))
    assert masked_mean(x, mask).item() == pytest.approx(sum(vals) / len(vals))
    row_sum, row_mean = masked_sum(x, mask, dim=1), masked_mean(x, mask, dim=1)
    for b in range(x.shape[0]):
        row = [x[b, t].item() for t in range(x.shape[1]) if mask[b, t]]
        assert row_sum[b].item() == pytest.approx(sum(row))
        assert row_mean[b].item() == pytest.approx(sum(row) / len(row))


def test_masked_reductions_ignore_nan_under_mask_and_empty_mask_gives_zero():
    x, mask = _data()
    dirty = x.masked_fill(~mask, float("nan"))
    assert torch.isfinite(masked_mean(dirty, mask))
    assert masked_sum(dirty, mask).item() == pytest.approx(masked_sum(x, mask).item())
    empty = torch.zeros_like(mask)
    assert masked_mean(x, empty).item() == 0.0
    assert masked_mean(x, empty, dim=1).tolist() == [0.0] * x.shape[0]


def test_masked_var_matches_loop_and_rejects_too_few_elements():
    x, mask = _data()
    vals = _selected(x, mask)
    n, mean = len(vals), sum(vals) / len(vals)
    ss = sum((v - mean) ** 2 for v in vals)
    assert masked_var(x, mask).item() == pytest.approx(ss / (n - 1))
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(ss / n)
    one = torch.zeros_like(mask)
    one[0, 0] = True
    with pytest.raises(ValueError):
        masked_var(x, one)
    assert masked_var(x, one, unbiased=False).item() == 0.0


def test_masked_whiten_gives_mean_zero_var_one_on_mask():
    x, mask = _data()
    x = 3 * x + 5
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-6)
    assert (w[~mask] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(x, mask).item())
    assert masked_var(kept, mask).item() == pytest.approx(1.0, rel=1e-6)


def _logits_labels(B=3, T=6, V=11, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T + 1, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[2, -1] = -100
    return logits, labels


def _reference_token_logps(logits, labels):
    out = torch.zeros(labels.shape, dtype=torch.float64)
    logp = torch.log_softmax(logits.double(), dim=-1)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] != -100:
                out[b, t] = logp[b, t, labels[b, t]]
    return out


@pytest.fixture(params=["fused", "chunked"])
def token_logps_path(request, monkeypatch):
    """Run a test on both code paths of token_logps: the fused kernel and the chunked one."""
    monkeypatch.setattr(ops, "FUSED_MAX_ELEMENTS", 2**40 if request.param == "fused" else 0)
    return request.param


def test_token_logps_equals_log_softmax_gather_on_a_non_contiguous_view(token_logps_path):
    logits, labels = _logits_labels()
    view = logits[:, :-1]  # what a causal LM passes: not contiguous
    got = token_logps(view, labels)
    assert got.shape == labels.shape
    torch.testing.assert_close(got, _reference_token_logps(view, labels))
    assert (got[labels == -100] == 0).all()


def test_token_logps_gradient_matches_autograd_of_log_softmax(monkeypatch, token_logps_path):
    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 25)  # force several chunks per row (V = 11)
    logits, labels = _logits_labels()
    a = logits[:, :-1].clone().requires_grad_(True)
    b = logits[:, :-1].clone().requires_grad_(True)
    weights = torch.randn(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (token_logps(a, labels) * weights).sum().backward()
    safe = labels.clamp_min(0)
    ref = torch.log_softmax(b, -1).gather(-1, safe[..., None]).squeeze(-1) * (labels != -100)
    (ref * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert torch.autograd.gradcheck(lambda l: token_logps(l, labels), (a.detach().requires_grad_(True),))


def test_token_logps_half_precision_is_computed_in_float32(token_logps_path):
    logits, labels = _logits_labels(dtype=torch.float32)
    got = token_logps(logits[:, :-1].bfloat16(), labels)
    assert got.dtype == torch.float32
    ref = _reference_token_logps(logits[:, :-1].bfloat16().float(), labels)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    logits_bf16 = logits[:, :-1].bfloat16().requires_grad_(True)
    token_logps(logits_bf16, labels).sum().backward()
    assert logits_bf16.grad.dtype == torch.bfloat16


def test_entropy_from_logits_matches_naive_sum(monkeypatch):
    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 30)
    logits, _ = _logits_labels()
    got = entropy_from_logits(logits)
    B, T, V = logits.shape
    for b in range(B):
        for t in range(T):
            p = torch.softmax(logits[b, t], -1).tolist()
            assert got[b, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-10)
    uniform = torch.zeros(1, 2, 8)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((1, 2), math.log(8)))


def test_sequence_logps_sum_and_mean():
    x, mask = _data()
    got_sum, got_mean = sequence_logps(x, mask), sequence_logps(x, mask, average=True)
    for b in range(x.shape[0]):
        row = [x[b, t].item() for t in range(x.shape[1]) if mask[b, t]]
        assert got_sum[b].item() == pytest.approx(sum(row))
        assert got_mean[b].item() == pytest.approx(sum(row) / len(row))
