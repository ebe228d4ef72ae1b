"""Chunked log-probs (alignkit/linear_logps.py, models/output_head.py) against the full logits.

* The op, against log_softmax of the explicit scores with autograd: values, entropy and gradients
  wrt hidden states, weight and bias, with soft-capping, scale, temperature, tied weights, several
  chunks and no rows at all; float64 to 1e-10, float32 to 1e-5, bf16 autocast to its precision;
  and nothing of size N·V kept for backward.
* Models: every family of the head table, the chunked path against the full-logits path (values,
  entropy and the gradient of every parameter), and every trainer's loss (SFT, the DPO family
  under each batching, KTO, the critic) and the eval helper equal on both paths. The conformance
  suite (tests/test_conformance.py) checks the chunked path against per-example HF forwards.
* The choice of path: the table, the refusals, the forced options, the start-up line.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from alignkit import linear_logps as chunked
from alignkit.linear_logps import linear_logps
from alignkit.models.heads import forward_logps, position_logps
from alignkit.models.output_head import HEADS, HeadRule, head_refusal, logps_path, set_logps_path
from alignkit.train.engine import enable_gradient_checkpointing

V, H, PAD = 101, 32, 0


# ---- the op -------------------------------------------------------------------------------------


def _naive(hidden, weight, targets, bias=None, softcap=None, scale=1.0, temperature=1.0):
    """(log π(y), entropy) from the explicit (N, V) scores, differentiated by autograd."""
    z = F.linear(hidden, weight, bias)
    z = z.float() if z.dtype == torch.bfloat16 else z  # the log-sum-exp in float32 under autocast
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = (z * scale / temperature).log_softmax(-1)
    return logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def _inputs(N=23, dtype=torch.float64, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.5).requires_grad_() if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(2, N, generator=g, dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
    return hidden, weight, b, targets, upstream


def _value_and_grads(fn, params, upstream):
    logps, entropy = fn()
    loss = (logps * upstream[0]).sum() + (entropy * upstream[1]).sum()
    return logps.detach(), entropy.detach(), torch.autograd.grad(loss, [p for p in params if p is not None])


# softcap 2.0 saturates the tanh on these scores (|z| up to ~8), so a wrong cap derivative shows.
TRANSFORMS = [dict(), dict(softcap=2.0), dict(scale=0.3), dict(temperature=0.7), dict(softcap=2.0, temperature=1.6)]


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: "-".join(f"{k}={v}" for k, v in t.items()) or "plain")
def test_op_equals_log_softmax_of_the_scores_float64(bias, transform):
    hidden, weight, b, targets, upstream = _inputs(bias=bias)
    params = (hidden, weight, b)
    # 4 rows per chunk: five full chunks and a last one of 3 rows
    got = _value_and_grads(lambda: linear_logps(hidden, weight, targets, b, entropy=True, chunk_elements=4 * V,
                                                **transform), params, upstream)
    want = _value_and_grads(lambda: _naive(hidden, weight, targets, b, **transform), params, upstream)
    for g, w in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_op_float32_and_logps_only():
    hidden, weight, b, targets, upstream = _inputs(dtype=torch.float32, bias=True)
    got = linear_logps(hidden, weight, targets, b, softcap=2.0, chunk_elements=5 * V)
    assert got.entropy is None and got.logps.dtype == torch.float32
    want, _ = _naive(hidden, weight, targets, b, softcap=2.0)
    torch.testing.assert_close(got.logps, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(torch.autograd.grad((got.logps * upstream[0]).sum(), (hidden, weight, b)),
                    torch.autograd.grad((want * upstream[0]).sum(), (hidden, weight, b))):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_op_tied_weight_gets_its_gradient_once():
    """The unembedding is the embedding matrix: its gradient is the lookup's plus the head's."""
    g = torch.Generator().manual_seed(1)
    embedding = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    ids, targets = torch.randint(0, V, (17,), generator=g), torch.randint(0, V, (17,), generator=g)
    mix = torch.randn(H, H, generator=g, dtype=torch.float64)

    def grad(fn):
        hidden = torch.tanh(embedding[ids] @ mix)  # (N, H) a stand-in for the transformer
        return torch.autograd.grad(fn(hidden).sum(), embedding)[0]

    got = grad(lambda h: linear_logps(h, embedding, targets, chunk_elements=3 * V).logps)
    torch.testing.assert_close(got, grad(lambda h: _naive(h, embedding, targets)[0]), atol=1e-10, rtol=1e-10)


def test_op_no_rows():
    hidden, weight, b, targets, _ = _inputs(N=0, bias=True)
    out = linear_logps(hidden, weight, targets, b, entropy=True)
    assert out.logps.shape == (0,) and out.entropy.shape == (0,)
    gh, gw, gb = torch.autograd.grad(out.logps.sum() + out.entropy.sum(), (hidden, weight, b))
    assert gh.shape == (0, H) and not gw.any() and not gb.any()


def test_op_under_bf16_autocast_matches_the_autocast_logits():
    """Under autocast the head's matmul runs in bf16, as the model's own head would; the
    log-sum-exp in float32. The values equal those of the bf16 logits; the weight gradient is
    summed over chunks in float32 (the plain path rounds it to bf16 once): equal to bf16 precision."""
    hidden, weight, _, targets, upstream = _inputs(N=40, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _value_and_grads(lambda: linear_logps(hidden, weight, targets, entropy=True, chunk_elements=7 * V),
                               (hidden, weight), upstream)
        want = _value_and_grads(lambda: _naive(hidden, weight, targets), (hidden, weight), upstream)
    assert got[0].dtype == torch.float32 and got[2][1].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, atol=2e-2 * float(w.abs().max()), rtol=0)
    hidden, weight, _, targets, _ = _inputs(N=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 alone, as F.linear does
        got64 = linear_logps(hidden, weight, targets).logps
    torch.testing.assert_close(got64, _naive(hidden, weight, targets)[0], atol=1e-10, rtol=0)


def _largest_saved(fn) -> int:
    """Elements of the largest tensor autograd saves for backward while ``fn`` runs."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_op_keeps_nothing_of_size_n_times_v_for_backward():
    hidden, weight, b, targets, _ = _inputs(N=300, bias=True)  # N·V = 30,300; N·H = 9,600; V·H = 3,232
    saved = _largest_saved(lambda: linear_logps(hidden, weight, targets, b, softcap=2.0, entropy=True))
    assert saved == hidden.numel()  # the rows themselves; the weight (V·H) is smaller here
    assert _largest_saved(lambda: _naive(hidden, weight, targets, b, softcap=2.0)) >= 300 * V  # what it avoids


# ---- models: every family of the head table, chunked against full ----------------------------------


#: Tiny configs of the head table's families (hidden 32, 2 layers); softcap / scale set so that they matter.
FAMILY_CONFIGS = {
    "llama": dict(intermediate_size=48, num_key_value_heads=1),
    "llama_tied": dict(intermediate_size=48, num_key_value_heads=1, tie_word_embeddings=True),
    "mistral": dict(intermediate_size=48, num_key_value_heads=1),
    "qwen2": dict(intermediate_size=48, num_key_value_heads=1),
    "qwen3": dict(intermediate_size=48, num_key_value_heads=1, head_dim=16),
    "gemma": dict(intermediate_size=48, num_key_value_heads=1, head_dim=16),
    "gemma2": dict(intermediate_size=48, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.05),
    "gemma3_text": dict(intermediate_size=48, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.05),
    "phi3": dict(intermediate_size=48, num_key_value_heads=1),
    "phi": dict(intermediate_size=48),  # lm_head with a bias
    "gpt2": dict(n_inner=48),
    "gpt_neox": dict(intermediate_size=48),
    "opt": dict(ffn_dim=48, word_embed_proj_dim=32),
    "cohere": dict(intermediate_size=48, num_key_value_heads=1, logit_scale=4.0),
    "granite": dict(intermediate_size=48, num_key_value_heads=1, logits_scaling=0.25),
}


def _family(name: str):
    return name.removesuffix("_tied")


_MODELS: dict = {}


def _lm(name: str):
    """A float64 tiny causal LM of the family ``name`` (random weights; cached)."""
    if name not in _MODELS:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(_family(name), vocab_size=V, hidden_size=H, num_attention_heads=2,
                                      num_hidden_layers=2, max_position_embeddings=128, pad_token_id=PAD,
                                      eos_token_id=1, bos_token_id=2, **FAMILY_CONFIGS[name])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").double().eval()
            for p in model.parameters():  # larger weights than the init: logits of a few nats, soft-caps that bite
                p.data.add_(torch.randn_like(p) * 0.1)
        _MODELS[name] = model
    return _MODELS[name]


def _tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


#: (prompt, response) lengths: rows of different lengths, so padding and prompt rows are masked
SFT_ITEMS = [dict(input_ids=_tokens(k, p + r), labels=[-100] * p + _tokens(k, p + r)[p:], length=p + r)
             for k, (p, r) in enumerate([(5, 9), (3, 4), (7, 6)])]


@pytest.fixture
def path():
    """``path(model, option)`` sets run.logps_path on a model; every model is back on auto after the test."""
    used = []

    def use(model, option):
        used.append(model)
        set_logps_path(model, option)
        return model

    yield use
    for model in used:
        set_logps_path(model, "auto")


def _on_both_paths(model, fn, path):
    """fn() → (loss, values...) on the chunked and on the full path: (values, grads) of each."""
    results = []
    for option in ("chunked", "full"):
        path(model, option)
        model.zero_grad(set_to_none=True)
        loss, *values = fn()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append(([torch.as_tensor(v).detach() for v in values], grads))
        model.zero_grad(set_to_none=True)
    return results


def _assert_same(results, tol=1e-10):
    (got_values, got_grads), (want_values, want_grads) = results
    for g, w in zip(got_values, want_values):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)
    assert got_grads.numel() == want_grads.numel()
    torch.testing.assert_close(got_grads, want_grads, atol=tol, rtol=tol)


def _sft_batch():
    from alignkit.data import collate_sft

    return {k: v for k, v in collate_sft(SFT_ITEMS, PAD).items() if torch.is_tensor(v)}


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_every_family_of_the_table_chunked_equals_full(name, path):
    model = _lm(name)
    assert head_refusal(model) is None
    batch = _sft_batch()
    g = torch.Generator().manual_seed(3)
    upstream = torch.randn(2, batch["labels"].shape[0], batch["labels"].shape[1] - 1, generator=g, dtype=torch.float64)

    def run():
        logps, mask = forward_logps(model, batch)
        return (logps * upstream[0]).sum(), logps

    _assert_same(_on_both_paths(model, run, path))
    # with a sampling temperature and the entropy (the online methods' read), through position_logps
    mask = batch["labels"][:, 1:] != -100
    rows, cols = mask.nonzero(as_tuple=True)
    index, targets = rows * batch["input_ids"].shape[1] + cols, batch["labels"][:, 1:][mask]

    def run_tempered():
        out = position_logps(model, batch, index, targets, temperature=0.7, entropy=True)
        return (out.logps * upstream[0][mask]).sum() + (out.entropy * upstream[1][mask]).sum(), out.logps, out.entropy

    _assert_same(_on_both_paths(model, run_tempered, path))


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text", "cohere", "granite"])
def test_the_final_logit_transforms_matter_on_these_models(name, monkeypatch):
    """Without its row of the head table (soft-cap, scale) the chunked path would give other
    numbers here, so the test above checks each transform."""
    model, batch = _lm(name), _sft_batch()
    with torch.no_grad():
        right, _ = forward_logps(model, batch)
        monkeypatch.setitem(HEADS, _family(name), HeadRule())
        wrong, _ = forward_logps(model, batch)
    assert (right - wrong).abs().max() > 1e-2


def test_gradient_checkpointing_and_lora_on_the_chunked_path(path):
    from peft import LoraConfig, get_peft_model

    batch = _sft_batch()
    model = copy.deepcopy(_lm("llama_tied"))
    assert enable_gradient_checkpointing(model) == 1
    model.train()
    _assert_same(_on_both_paths(model, lambda: (forward_logps(model, batch)[0].sum(),), path))
    lora = get_peft_model(copy.deepcopy(_lm("llama")), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert logps_path(lora)[0] == "chunked"  # all-linear leaves the output head alone
    _assert_same(_on_both_paths(lora, lambda: (forward_logps(lora, batch)[0].sum(),), path))


def test_no_vocabulary_sized_tensor_is_kept_for_backward(path):
    model, batch = _lm("llama"), _sft_batch()
    B, T = batch["input_ids"].shape
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    path(model, "chunked")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = position_logps(model, batch, torch.arange(B * T), batch["input_ids"].flatten())
    assert out.output.logits.shape == (B, 0, V)  # the model computed no logits
    assert [s for s in saved if V in s and s not in ((V, H), (H, V))] == []  # only the weight has a V dimension
    path(model, "full")
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        position_logps(model, batch, torch.arange(B * T), batch["input_ids"].flatten())
    assert (B, T, V) in saved or (B * T, V) in saved  # what the chunked path avoids


# ---- every trainer's loss on both paths ---------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch):
    """3 rows per chunk, so every batch below spans several chunks."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 3 * V)


PAIRS = [dict(prompt_ids=_tokens(10 * k, p), chosen_ids=_tokens(10 * k + 1, c), rejected_ids=_tokens(10 * k + 2, r),
              margin=0.0, weight=w, group=-1, length=p + max(c, r))
         for k, ((p, c, r), w) in enumerate(zip([(6, 7, 4), (3, 5, 8), (8, 3, 3)], (1.0, 0.5, 2.0)))]


@pytest.mark.parametrize("padding_free", [False, True])
def test_sft_loss_equal_on_both_paths(padding_free, path, small_chunks):
    from alignkit.train.sft import build_sft_task, sft_batch_loss

    model = _lm("llama_tied")
    batch = build_sft_task(SFT_ITEMS, [], PAD, padding_free=padding_free).collate(SFT_ITEMS)
    _assert_same(_on_both_paths(model, lambda: (sft_batch_loss(model, batch)[0],), path))


def _dpo_cases():
    from alignkit.losses import PREFERENCE_LOSSES

    return [pytest.param(loss, batching, id=f"{loss}-{batching}") for loss in PREFERENCE_LOSSES
            for batching in ("padded", "padding_free", "prefix_shared")]


@pytest.mark.parametrize("loss_type,batching", _dpo_cases())
def test_dpo_family_losses_equal_on_both_paths(loss_type, batching, path, small_chunks):
    from alignkit.models.loading import Reference
    from alignkit.train.dpo import BATCHINGS, DPOConfig, dpo_batch_loss, make_reference

    smoothing = 0.1 if loss_type in ("cdpo", "robust") else 0.0
    cfg = DPOConfig(loss_type=loss_type, label_smoothing=smoothing, sft_weight=0.3)
    model = _lm("llama")
    b = BATCHINGS[batching]
    batch = b.collate(PAIRS, PAD)
    reference = make_reference(model, "copy", loss_type)
    if isinstance(reference, Reference):  # a different π_ref, so the losses are not at their symmetric point
        with torch.no_grad():
            for p in reference._copy.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.05)
    loss = dpo_batch_loss(cfg, b, reference)

    def run():
        value, metrics = loss(model, batch)
        return value, value, torch.tensor([metrics[k] for k in sorted(metrics)], dtype=torch.float64)

    _assert_same(_on_both_paths(model, run, path))


def test_kto_loss_equal_on_both_paths(path, small_chunks):
    from alignkit.models.loading import Reference
    from alignkit.train.kto import KTOConfig, assign_mismatched, collate_kto, kto_batch_loss, unpaired_items

    model = _lm("gemma2")
    reference = Reference(model, "copy")
    with torch.no_grad():
        for p in reference._copy.parameters():
            p.mul_(1.05)
    items = assign_mismatched(unpaired_items(PAIRS), seed=0, max_length=64)
    batch = collate_kto(items, PAD)
    loss = kto_batch_loss(KTOConfig(beta=0.5), reference)
    _assert_same(_on_both_paths(model, lambda: loss(model, batch)[0:1], path))


def test_critic_loss_and_eval_helpers_equal_on_both_paths(path, small_chunks):
    from alignkit.eval.metrics import response_logprobs
    from alignkit.train.critic import build_critic_task
    from alignkit.train.sft import heldout_nll

    model = _lm("phi")
    items = [dict(it, verdict_tokens=2) for it in SFT_ITEMS]
    task = build_critic_task(items, [], PAD, verdict_weight=3.0)
    batch = task.collate(items)
    _assert_same(_on_both_paths(model, lambda: task.loss(model, batch)[0:1], path))
    prompts, responses = [it["prompt_ids"] for it in PAIRS], [it["chosen_ids"] for it in PAIRS]
    values = []
    for option in ("chunked", "full"):
        path(model, option)
        values.append((response_logprobs(model, prompts, responses, PAD), heldout_nll(model, SFT_ITEMS, PAD)["nll"]))
    torch.testing.assert_close(values[0][0], values[1][0], atol=1e-10, rtol=0)
    assert values[0][1] == pytest.approx(values[1][1], abs=1e-10)


# ---- which path, and why ------------------------------------------------------------------------


def test_auto_takes_the_full_logits_where_the_head_cannot_be_split_off(path, caplog):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    assert logps_path(_lm("llama"))[0] == "chunked"
    # a family outside the table
    other = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "starcoder2", vocab_size=V, hidden_size=H, num_attention_heads=2, num_key_value_heads=1,
        num_hidden_layers=1, intermediate_size=48))
    assert logps_path(other) == ("full", "the output head cannot be split off: model_type 'starcoder2' is not among "
                                 "the families whose final logits are known and tested (" + ", ".join(sorted(HEADS)) + ")")
    with pytest.raises(ValueError, match="run.logps_path=chunked cannot be served: model_type 'starcoder2'.*use "
                                         "run.logps_path=auto or full"):
        set_logps_path(other, "chunked")
    # LoRA on the output head itself
    lora = get_peft_model(copy.deepcopy(_lm("llama")), LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    assert logps_path(lora)[0] == "full"
    assert "output head is a peft.tuners.lora.layer.Linear, not a plain torch.nn.Linear" in logps_path(lora)[1]
    # a quantised head (a subclass of nn.Linear, as bitsandbytes' are), a partitioned weight (ZeRO-3)
    quantised = copy.deepcopy(_lm("llama"))

    class Linear8bit(torch.nn.Linear):
        pass

    quantised.lm_head.__class__ = Linear8bit
    assert "output head is a test_linear_logps.Linear8bit" in logps_path(quantised)[1]
    partitioned = copy.deepcopy(_lm("llama"))
    set_logps_path(partitioned, "auto")  # announced chunked; then partitioned (as ZeRO-3 does when it wraps it)
    partitioned.lm_head.weight.ds_id = 3
    caplog.clear()
    with caplog.at_level("WARNING", logger="alignkit.models.output_head"):
        assert "quantised or sharded" in logps_path(partitioned)[1]
        logps_path(partitioned)
    assert [r.getMessage()[:54] for r in caplog.records] == ["log-probs: full from now on, not chunked as announced "]
    # and the full path still gives the same numbers as the chunked one on the plain model
    batch = _sft_batch()
    with torch.no_grad():
        torch.testing.assert_close(forward_logps(quantised, batch)[0], forward_logps(_lm("llama"), batch)[0],
                                   atol=1e-10, rtol=0)


def test_the_option_is_kept_by_copies_and_checked(path):
    model = path(_lm("llama"), "full")
    assert logps_path(model)[0] == "full"
    assert logps_path(copy.deepcopy(model))[0] == "full"  # e.g. a frozen reference copy
    path(model, "auto")
    assert logps_path(model)[0] == "chunked"
    with pytest.raises(ValueError, match="run.logps_path must be one of auto, chunked, full; got 'fast'"):
        set_logps_path(model, "fast")


def test_trainers_print_the_path_at_start_up(tiny_dir, tmp_path, capsys):
    from conftest import write_jsonl

    from alignkit.cli import main

    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "What colour is item 3?", "completion": "Red."}] * 4)
    common = [f"model.path={tiny_dir}", f"data.path={data}", "run.progress=false", "optim.batch_size=4", "optim.max_steps=1"]
    assert main(["sft", *common, f"run.output_dir={tmp_path / 'a'}"]) == 0
    assert "[alignkit] log-probs: chunked (from the last hidden states through the" in capsys.readouterr().out
    assert main(["sft", *common, f"run.output_dir={tmp_path / 'b'}", "run.logps_path=full"]) == 0
    assert "[alignkit] log-probs: full (run.logps_path=full" in capsys.readouterr().out


def test_an_entropy_kept_as_a_metric_holds_no_vocabulary_sized_graph(path):
    """``entropy_grad=False`` (the online losses log the entropy, they do not train on it): it
    keeps nothing for backward beyond what the log-probs alone keep (on the full path a
    differentiable entropy keeps an (N, V) softmax), and on both paths it is detached, with the
    values of the differentiable one."""
    model, batch = _lm("llama"), _sft_batch()
    B, T = batch["input_ids"].shape
    index, targets = torch.arange(B * T), batch["input_ids"].flatten()

    def saved_by(**kwargs):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            out = position_logps(model, batch, index, targets, temperature=0.7, **kwargs)
        return out, sorted(s for s in saved if V in s)

    for option in ("full", "chunked"):
        path(model, option)
        _, plain = saved_by()
        metric, kept = saved_by(entropy=True, entropy_grad=False)
        assert kept == plain, option
        assert not metric.entropy.requires_grad and metric.logps.requires_grad
        trained, kept_trained = saved_by(entropy=True)
        assert trained.entropy.requires_grad
        torch.testing.assert_close(metric.entropy, trained.entropy.detach(), atol=1e-12, rtol=0)
        if option == "full":
            assert len(kept_trained) > len(plain)  # what entropy_grad=False avoids
