"""Conformance: every batching alignkit accepts gives the numbers of a plain per-example
Hugging Face forward, on tiny random models of eleven decoder families and two encoders, under
eager and sdpa attention, sliding windows included; every batching it cannot serve exactly is
refused before training with a message naming the one that works.

For each family × batching × attention implementation, through the project's own collate
functions and batch functions (the ones the trainers run):

* SFT (``sft_batch_loss`` on padded and packed rows): the summed response-token NLL and its
  gradient;
* DPO (``BATCHINGS[...]`` padded / padding_free / prefix_shared, ``dpo_batch_loss``): each
  response's log-prob and the loss gradient;
* reward models (``pairwise_batch_loss`` → ``sequence_rewards``, i.e. the one-position read
  with the last-MLP shortcut where it applies): each reward equals what
  ``AutoModelForSequenceClassification`` returns for that sequence alone, and the loss gradient;

against the same quantities summed over one unpadded forward per sequence. Float64 models, so
"equal" means 1e-5 absolute (float32 cannot resolve 1e-5 on sums near −100).

On a GPU: ``ALIGNKIT_TEST_GPU=1 ALIGNKIT_CONFORMANCE_DEVICE=cuda`` runs the numerical tests
there (models, batches and references on that device; the first variable lets the suite see the
GPU: tests/conftest.py), and ``ALIGNKIT_CONFORMANCE_DTYPE=float32`` in float32, where
the attention kernels of a GPU differ from the CPU's (sdpa takes its fused kernels in float32,
never in float64). Float32 "equal" is 1e-3 absolute on the log-probs and 1e-3 relative error of
the whole gradient: rounding stays near 1e-5 and 6e-5, while a dropped window or a leaked mask
moves a log-prob by 0.1 or more.

The SFT and DPO log-probs take the chunked path (hidden states through the output head a few
rows at a time, custom backward: alignkit/linear_logps.py) on every family here; the tests
assert it, and the chunks are made 4 rows long so that every batch spans several of them.

The windows are small (8 tokens) and most sequences longer, so a dropped window shows (0.1–0.4
nats before the fix). Lengths within a padded batch differ by less than the window: a padding
query more than a window past its row's last real token sees no key at all, and in float64
transformers' eager softmax turns that row's float64 −max into float32 −inf, i.e. NaN (float32
and bfloat16 masks stay finite; the real tokens never see padding either way).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from alignkit.data import collate_pairs
from alignkit.losses import pairwise_rm_loss
from alignkit.models.heads import ScalarHead, head_outputs, sequence_rewards
from alignkit import linear_logps
from alignkit.models.masks import FAMILIES
from alignkit.models.output_head import logps_path
from alignkit.train.common import PAIR_COLLATES, check_batching
from alignkit.train.dpo import BATCHINGS, DPOConfig, dpo_batch_loss, dpo_losses
from alignkit.train.rm import pairwise_batch_loss
from alignkit.train.sft import build_sft_task, sft_batch_loss

V, PAD, WINDOW = 101, 0, 8
#: Where and in what precision the numerical tests run (module docstring): CPU float64 by default.
DEVICE = torch.device(os.environ.get("ALIGNKIT_CONFORMANCE_DEVICE", "cpu"))
_DTYPE_NAME = os.environ.get("ALIGNKIT_CONFORMANCE_DTYPE", "float64")
if _DTYPE_NAME not in ("float64", "float32"):
    raise ValueError(f"ALIGNKIT_CONFORMANCE_DTYPE={_DTYPE_NAME!r}: use float64 (the default) or float32")
DTYPE = getattr(torch, _DTYPE_NAME)
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytestmark = pytest.mark.skip(reason="ALIGNKIT_CONFORMANCE_DEVICE=cuda needs a visible GPU: add ALIGNKIT_TEST_GPU=1 "
                                         "(tests/conftest.py hides GPUs otherwise)")
#: The tolerance of "equal" in that precision (module docstring).
TOL = {torch.float64: 1e-5, torch.float32: 1e-3}[DTYPE]
_LLAMA_LIKE = dict(intermediate_size=48, num_key_value_heads=1)
#: Tiny configs: hidden 32, 2 layers (the first sliding, the second full where layers alternate).
CONFIGS = {
    "llama": dict(_LLAMA_LIKE),
    "qwen2": dict(_LLAMA_LIKE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(_LLAMA_LIKE, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "mistral": dict(_LLAMA_LIKE, sliding_window=WINDOW),
    "gemma": dict(_LLAMA_LIKE, head_dim=16),
    "gemma2": dict(_LLAMA_LIKE, head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(_LLAMA_LIKE, head_dim=16, sliding_window=WINDOW,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(_LLAMA_LIKE, sliding_window=WINDOW),
    "gpt2": dict(n_inner=48),
    "gpt_neox": dict(intermediate_size=48),
    "opt": dict(ffn_dim=48, word_embed_proj_dim=32),
    "bert": dict(intermediate_size=48),
    "deberta-v2": dict(intermediate_size=48),
}
DECODERS = [f for f in CONFIGS if f not in ("bert", "deberta-v2")]
ENCODERS = ["bert", "deberta-v2"]
WINDOWED = [f for f in DECODERS if "sliding_window" in CONFIGS[f]]
#: transformers implements Gemma 2 in eager only and DeBERTa-v2 without sdpa (it refuses to load otherwise).
NO_SDPA = {"gemma2", "deberta-v2"}


def _cases(families, batchings):
    return [pytest.param(f, a, b, id=f"{f}-{a}-{b}") for f in families for a in ("eager", "sdpa")
            if not (a == "sdpa" and f in NO_SDPA) for b in batchings]


@functools.cache
def _model(family: str, kind: str):
    """A tiny model of ``family`` in ``DTYPE`` on ``DEVICE``: ``lm`` (causal LM) or ``rm`` (one-output
    sequence classifier)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.for_model(family, vocab_size=V, hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                                  max_position_embeddings=128, pad_token_id=PAD, eos_token_id=1, bos_token_id=2,
                                  num_labels=1, **CONFIGS[family])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        auto = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
        return auto.from_config(config).to(DEVICE, DTYPE).eval()


def _get(family: str, kind: str, attention: str):
    model = _model(family, kind)
    model.set_attn_implementation(attention)
    return model


def _tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (n,), generator=g).tolist()  # never PAD, so HF's own pooling reads the last token


#: (prompt, chosen, rejected) lengths: multi-token prompts, responses of unequal lengths on both
#: sides, totals 17–23 (longer than the window, spread < the window: see the module docstring).
PAIR_SHAPES = [(8, 14, 9), (12, 6, 11), (10, 12, 8)]
PAIRS = [dict(prompt_ids=_tokens(10 * k, p), chosen_ids=_tokens(10 * k + 1, c), rejected_ids=_tokens(10 * k + 2, r),
              margin=0.0, weight=w, group=-1, length=p + max(c, r))
         for k, ((p, c, r), w) in enumerate(zip(PAIR_SHAPES, (1.0, 0.5, 2.0)))]
SFT_ITEMS = [dict(input_ids=_tokens(100 + k, p + r), labels=[-100] * p + _tokens(100 + k, p + r)[p:], length=p + r)
             for k, (p, r) in enumerate([(9, 13), (6, 11), (12, 6), (7, 14)])]
SEQUENCES = [(it["prompt_ids"], it[side]) for side in ("chosen_ids", "rejected_ids") for it in PAIRS]  # (2B,)


def _grads(model) -> torch.Tensor:
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return grads


def _on_device(batch: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.fixture
def on_device():
    """Tensors made without a device (the references' inputs, the losses' constants) land on
    ``DEVICE``. On the CPU nothing changes (a default device slows every op by about half)."""
    if DEVICE.type == "cpu":
        yield
        return
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


def _value_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    value, out = loss_fn()
    value.backward()
    return out.detach(), _grads(model)


# ---- references: one plain forward per sequence ------------------------------------------------


def _alone_logps(model, prompt, response) -> torch.Tensor:
    ids = torch.tensor([prompt + response])
    logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]  # (L-1,)
    return logps[len(prompt) - 1 :].sum()  # Σ log π(y_t | x, y_<t) over the response


@functools.cache
def _reference(family: str, attention: str, what: str):
    """(value, gradient) of each objective computed one unpadded sequence at a time."""
    if what == "dpo":
        model, cfg = _get(family, "lm", attention), DPOConfig()

        def loss():
            logps = torch.stack([_alone_logps(model, p, r) for p, r in SEQUENCES])  # (2B,)
            counts = torch.tensor([float(len(r)) for _, r in SEQUENCES], dtype=logps.dtype)
            losses, _ = dpo_losses(cfg, logps, torch.zeros_like(logps), counts)
            return (losses * torch.tensor([it["weight"] for it in PAIRS])).sum(), logps
    elif what == "rm":
        model = _get(family, "rm", attention)

        def loss():
            rewards = torch.stack([model(input_ids=torch.tensor([p + r])).logits[0, 0] for p, r in SEQUENCES])
            B = len(PAIRS)
            losses, _ = pairwise_rm_loss(rewards[:B].float(), rewards[B:].float())
            return (losses * torch.tensor([it["weight"] for it in PAIRS])).sum(), rewards.float()
    else:  # sft: summed NLL of the response tokens
        model = _get(family, "lm", attention)

        def loss():
            nll = torch.stack([-_alone_logps(model, it["input_ids"][:n], it["input_ids"][n:])
                               for it in SFT_ITEMS for n in [it["labels"].count(-100)]])
            return nll.sum(), nll.sum()
    return _value_and_grads(model, loss)


# ---- the batchings, through the trainers' own functions ------------------------------------------


def _assert_grads_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """float64: elementwise within 1e-5. float32: many entries are near 0 and rounding noise
    dominates them elementwise, so the whole gradient's relative error, ‖got − want‖ / ‖want‖,
    must stay under 1e-3 (at most 6e-5 on this project's CPU)."""
    if DTYPE == torch.float64:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        rel = float((got - want).norm() / want.norm())
        assert rel < 1e-3, f"gradient relative error {rel:.2e}"


@pytest.fixture
def chunked(monkeypatch):
    """The log-probs of ``model`` take the chunked path, 4 rows per chunk."""
    monkeypatch.setattr(linear_logps, "CHUNK_ELEMENTS", 4 * V)

    def check(model):
        assert logps_path(model)[0] == "chunked", logps_path(model)

    return check


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("family,attention,batching", _cases(DECODERS, list(BATCHINGS)))
def test_dpo_logps_and_gradients(family, attention, batching, chunked):
    model = _get(family, "lm", attention)
    chunked(model)
    check_batching(batching, model)  # accepted at start-up ...
    b = BATCHINGS[batching]
    batch = _on_device(b.collate(PAIRS, PAD))
    batch["ref_logps"] = torch.zeros(2 * len(PAIRS), dtype=DTYPE)  # the reference's role is not tested here
    loss = dpo_batch_loss(DPOConfig(), b, reference=None)

    def run():
        return loss(model, batch)[0], b.logps(model, batch)[0]

    logps, grads = _value_and_grads(model, run)
    want_logps, want_grads = _reference(family, attention, "dpo")
    torch.testing.assert_close(logps, want_logps, atol=TOL, rtol=0)  # ... and exact
    _assert_grads_close(grads, want_grads)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("family,attention,batching", _cases(DECODERS, list(PAIR_COLLATES)))
def test_reward_model_rewards_and_gradients(family, attention, batching):
    model = _get(family, "rm", attention)
    check_batching(batching, model)
    head = ScalarHead(model)
    batch = _on_device(PAIR_COLLATES[batching](PAIRS, PAD))
    loss = pairwise_batch_loss(use_margin=False)

    def run():
        return loss(head, batch)[0], sequence_rewards(head, batch, ends=batch.get("last_index"))

    rewards, grads = _value_and_grads(model, run)
    want_rewards, want_grads = _reference(family, attention, "rm")
    torch.testing.assert_close(rewards, want_rewards, atol=TOL, rtol=0)
    _assert_grads_close(grads, want_grads)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("family,attention,batching", _cases(DECODERS, ["padded", "padding_free"]))
def test_sft_nll_and_gradients(family, attention, batching, chunked):
    model = _get(family, "lm", attention)
    chunked(model)
    check_batching(batching, model)
    task = build_sft_task(SFT_ITEMS, [], PAD, padding_free=batching == "padding_free")
    batch = _on_device(task.collate(SFT_ITEMS))

    def run():
        nll = sft_batch_loss(model, batch)[0]
        return nll, nll

    nll, grads = _value_and_grads(model, run)
    want_nll, want_grads = _reference(family, attention, "sft")
    torch.testing.assert_close(nll, want_nll, atol=TOL, rtol=0)
    _assert_grads_close(grads, want_grads)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("family", WINDOWED)
def test_the_windows_matter_on_this_data(family):
    """Without its sliding window the model gives other log-probs here, so the tests above would
    catch a dropped window."""
    model = _get(family, "lm", "eager")
    with torch.no_grad():
        windowed = torch.stack([_alone_logps(model, p, r) for p, r in SEQUENCES])
        model.config.sliding_window = 10_000
        try:
            full = torch.stack([_alone_logps(model, p, r) for p, r in SEQUENCES])
        finally:
            model.config.sliding_window = WINDOW
    assert (windowed - full).abs().max() > 1e-2


@pytest.mark.usefixtures("on_device")
def test_the_one_position_read_shortcut_runs_where_it_applies():
    """The reward tests above cover the last-MLP shortcut: it runs on the families with
    ``layers[-1].mlp`` and is skipped (everything computed) on the others."""
    used = {}
    for family in DECODERS:
        head = ScalarHead(_get(family, "rm", "eager"))
        with torch.no_grad():
            sequence_rewards(head, _on_device(collate_pairs(PAIRS, PAD)))
        used[family] = head.last_mlp_rows is not None
    assert used == {f: f not in ("gpt2", "opt") for f in DECODERS}


# ---- encoders: padded reward models, every other batching refused -----------------------------


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("family,attention", [(f, a) for f in ENCODERS for a in ("eager", "sdpa")
                                               if not (a == "sdpa" and f in NO_SDPA)])
def test_encoder_reward_models_score_as_their_own_classifier(family, attention):
    model = _get(family, "rm", attention)
    head = ScalarHead(model)
    assert head.pooled
    batch = _on_device(collate_pairs(PAIRS, PAD))
    loss = pairwise_batch_loss(use_margin=False)
    rewards, grads = _value_and_grads(model, lambda: (loss(head, batch)[0], sequence_rewards(head, batch)))
    want_rewards, want_grads = _reference(family, attention, "rm")
    torch.testing.assert_close(rewards, want_rewards, atol=TOL, rtol=0)
    _assert_grads_close(grads, want_grads)
    with pytest.raises(ValueError, match="not a value at every position"):
        head_outputs(head, batch)
    with pytest.raises(ValueError, match="a value model needs a value at every position"):
        ScalarHead(model, per_token=True)


@pytest.mark.parametrize("family", ENCODERS)
@pytest.mark.parametrize("batching", ["padding_free", "prefix_shared"])
def test_encoders_refuse_packed_and_prefix_shared_batches(family, batching):
    model = _get(family, "rm", "eager")
    check_batching("padded", model)
    with pytest.raises(ValueError, match=f"batching={batching} .*encoder.*use batching=padded"):
        check_batching(batching, model)
    batch = PAIR_COLLATES[batching](PAIRS, PAD)  # and if run anyway, the read refuses it
    with pytest.raises(ValueError, match="padded batches only"):
        sequence_rewards(ScalarHead(model), batch, ends=batch["last_index"])


# ---- refusals by attention implementation and family ---------------------------------------------


def _with_attention(family: str, attention: str):
    model = _model(family, "lm")
    model.config._attn_implementation = attention  # only the check reads it here; no kernel runs
    return model


@pytest.mark.parametrize("attention", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_takes_packed_rows_but_not_prefix_sharing(attention):
    try:
        for family in DECODERS:
            model = _with_attention(family, attention)
            check_batching("padded", model)
            with pytest.raises(ValueError, match="flash-attention takes sequence boundaries.*use batching=padding_free"
                               if FAMILIES[family].packs_by_position_ids else "use batching=padded"):
                check_batching("prefix_shared", model)
            if FAMILIES[family].packs_by_position_ids:
                check_batching("padding_free", model)  # position ids become cu_seqlens, as transformers packs
            else:  # OPT's masks ignore position ids
                with pytest.raises(ValueError, match="use batching=padded.*or load the model with model.attn_implementation"):
                    check_batching("padding_free", model)
    finally:
        for family in DECODERS:
            _model(family, "lm").set_attn_implementation("eager")


def test_untested_attention_and_families_are_refused(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = _with_attention("llama", "flex_attention")
    try:
        for batching in ("padding_free", "prefix_shared"):
            with pytest.raises(ValueError, match=f"batching={batching} under attn_implementation='flex_attention'"
                                                 ".*use batching=padded"):
                check_batching(batching, model)
    finally:
        model.set_attn_implementation("eager")
    # A family outside the table (here one with a sliding window) gets padded batches only.
    config = AutoConfig.for_model("starcoder2", vocab_size=V, hidden_size=32, num_attention_heads=2,
                                  num_key_value_heads=1, num_hidden_layers=1, intermediate_size=48, sliding_window=WINDOW)
    other = AutoModelForCausalLM.from_config(config)
    check_batching("padded", other)
    for batching in ("padding_free", "prefix_shared"):
        with pytest.raises(ValueError, match="model_type 'starcoder2' is not one of them: use batching=padded"):
            check_batching(batching, other)
        # a library caller that skips the check gets the same refusal from the forward helpers
        with pytest.raises(ValueError, match="model_type 'starcoder2' is not one of them"):
            BATCHINGS[batching].logps(other, PAIR_COLLATES[batching](PAIRS, PAD))
        with pytest.raises(ValueError, match="model_type 'starcoder2' is not one of them"):
            sft_batch_loss(other, build_sft_task(SFT_ITEMS, [], PAD, padding_free=True).collate(SFT_ITEMS))


# ---- every trainer refuses at start-up, before any training step --------------------------------


@pytest.fixture(scope="module")
def model_dirs(tiny_tokenizer, tmp_path_factory):
    """Saved tiny models with the test tokenizer: a family outside the table (starcoder2, with a
    sliding window) and an encoder reward model (BERT)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("families")
    ids = dict(pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
               bos_token_id=tiny_tokenizer.bos_token_id)
    shapes = dict(vocab_size=len(tiny_tokenizer), hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                  intermediate_size=48, **ids)
    dirs = {}
    for name, auto, extra in (("starcoder2", AutoModelForCausalLM, dict(num_key_value_heads=1, sliding_window=WINDOW)),
                              ("bert", AutoModelForSequenceClassification, dict(num_labels=1))):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = auto.from_config(AutoConfig.for_model(name, **shapes, **extra))
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tiny_tokenizer.save_pretrained(dirs[name])
    return dirs


def _cli(command: str, model_dir, data, out, *options) -> int:
    from alignkit.cli import main

    return main([command, f"model.path={model_dir}", f"data.path={data}", f"run.output_dir={out}",
                 "run.progress=false", "optim.batch_size=4", *options])


@pytest.mark.parametrize("command,option", [
    ("sft", "run.padding_free=true"), ("critic", "run.padding_free=true"),
    ("dpo", "batching=padding_free"), ("dpo", "batching=prefix_shared"),
    ("rm", "batching=padding_free"), ("rm", "batching=prefix_shared"),
])
def test_trainers_refuse_an_unserved_batching_before_training(model_dirs, tmp_path, capsys, command, option):
    from conftest import write_jsonl

    rows = ([{"prompt": "What colour is item 3?", "completion": "Red."}] * 8 if command == "sft" else
            [{"prompt": "What colour is item 3?", "chosen": "Red.", "rejected": "No."}] * 8)
    if command == "critic":
        rows = [{"prompt": "Is it red?", "response": "Yes.", "critique": "It answers.", "score": 4}] * 8
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    code = _cli(command, model_dirs["starcoder2"], data, tmp_path / "out", option)
    err = capsys.readouterr().err
    assert code == 1 and "model_type 'starcoder2' is not one of them" in err and "use batching=padded" in err, err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # refused before the first step


def test_an_encoder_reward_model_trains_padded_and_refuses_prefix_sharing(model_dirs, tmp_path, capsys):
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl",
                       [{"prompt": f"Item {i}?", "chosen": "Red, thank you.", "rejected": "No."} for i in range(8)])
    assert _cli("rm", model_dirs["bert"], data, tmp_path / "bad", "batching=prefix_shared") == 1
    assert "encoder" in capsys.readouterr().err
    assert _cli("rm", model_dirs["bert"], data, tmp_path / "rm", "batching=padded", "optim.epochs=1") == 0
    from transformers import AutoModelForSequenceClassification

    assert type(AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")).__name__ == "BertForSequenceClassification"
