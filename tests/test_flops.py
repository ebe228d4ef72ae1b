"""Model FLOPs (6·N·tokens + attention) against PyTorch's own FLOP counter; MFU in the loop's log."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from alignkit.train.flops import (
    FlopCounter, attention_pairs, known_peak, matmul_params, measure_peak_flops, real_tokens, set_peak,
)


def _model(tiny_dir):
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm

    return load_causal_lm(ModelConfig(path=str(tiny_dir)))


def test_six_n_tokens_is_what_a_training_step_multiplies(tiny_dir):
    model = _model(tiny_dir)
    # eager attention: its two batched matmuls are what PyTorch's counter sees (the CPU sdpa kernel
    # is not counted by it); the FLOPs are the same
    model.config._attn_implementation = "eager"
    B, T = 3, 12
    ids = torch.randint(4, model.config.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False).logits.float().pow(2).mean().backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    matmuls = sum(n for op, n in by_op.items() if op.split(".")[-1] in ("mm", "addmm"))
    # QKᵀ and AV, forward and backward, inside the attention modules (some transformers releases
    # compute the rotary angles with a batched matmul too: not attention)
    attention = sum(n for module, ops in counter.get_flop_counts().items() if module.endswith(".self_attn")
                    for op, n in ops.items() if str(op) == "aten.bmm")
    N = matmul_params(model)
    # every nn.Linear (the tied unembedding included): 2·N per token forward, 4·N backward
    assert matmuls == 6 * N * B * T
    # PyTorch counts the full T×T score matrix; alignkit counts the T(T+1)/2 pairs a causal mask
    # allows: the same 12·L·d per pair.
    c = FlopCounter(model)
    assert attention == 12 * c.layers * c.width * B * T * T
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long)}
    assert attention_pairs(batch) == B * T * (T + 1) // 2
    assert c(batch) == 6 * N * B * T + 12 * c.layers * c.width * B * T * (T + 1) // 2


def test_a_reward_read_counts_only_the_rows_its_last_mlp_computed(tiny_dir):
    from alignkit.config import ModelConfig
    from alignkit.models.heads import ScalarHead, sequence_rewards
    from alignkit.models.loading import load_scalar_head_model

    head = ScalarHead(load_scalar_head_model(ModelConfig(path=str(tiny_dir))))
    head.model.config._attn_implementation = "eager"
    B, T = 2, 10
    batch = {"input_ids": torch.randint(4, 100, (B, T)), "attention_mask": torch.ones(B, T, dtype=torch.long)}
    with FlopCounterMode(display=False) as counter:
        sequence_rewards(head, batch).sum().backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    matmuls = sum(n for op, n in by_op.items() if op.split(".")[-1] in ("mm", "addmm"))
    c = FlopCounter(head)
    assert head.last_mlp_rows == B and 0 < c.n_last_mlp < c.n
    assert c(batch) - 12 * c.layers * c.width * attention_pairs(batch) == matmuls


def test_padding_and_packed_rows_count_only_real_tokens_and_allowed_pairs():
    padded = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    assert real_tokens(padded) == 8 and attention_pairs(padded) == 6 + 15
    # two sequences of 2 and 3 tokens packed in one row with a block-diagonal causal mask
    seq = torch.tensor([0, 0, 1, 1, 1])
    mask = (seq[:, None] == seq[None, :]) & torch.ones(5, 5, dtype=torch.bool).tril()
    packed = {"input_ids": torch.zeros(1, 5, dtype=torch.long), "attention_mask": mask[None, None]}
    assert real_tokens(packed) == 5 and attention_pairs(packed) == 3 + 6
    assert real_tokens({**packed, "num_tokens": torch.tensor(4)}) == 4  # prefix-shared batches say it


def test_peak_is_measured_and_can_be_set(monkeypatch):
    assert measure_peak_flops(sizes=(64,), seconds=0.01) > 1e6
    assert measure_peak_flops(sizes=(64,), seconds=0.01, clock="cpu") > 1e6
    monkeypatch.delenv("ALIGNKIT_PEAK_FLOPS", raising=False)
    set_peak(None)
    assert known_peak() is None
    monkeypatch.setenv("ALIGNKIT_PEAK_FLOPS", "2e9")
    assert known_peak() == 2e9
    set_peak(3e9)
    assert known_peak() == 3e9
    set_peak(None)


def test_the_loop_logs_mfu_when_a_peak_is_known(tiny_dir, tiny_tokenizer, tmp_path):
    from alignkit.config import OptimConfig, RunConfig
    from alignkit.data import SFTExample, tokenize_records
    from alignkit.train.loop import Trainer
    from alignkit.train.sft import build_sft_task

    recs = [SFTExample(prompt=[{"role": "user", "content": f"Item {i}?"}], completion=f"Item {i} is red.")
            for i in range(8)]
    items, _ = tokenize_records(recs, tiny_tokenizer, max_length=64)
    task = build_sft_task(items, [], tiny_tokenizer.pad_token_id, padding_free=False)
    optim = OptimConfig(batch_size=4, max_steps=2, warmup_ratio=0.0)
    run = RunConfig(output_dir=str(tmp_path), progress=False, report_to="jsonl")
    set_peak(1e15)  # far above any CPU: the utilisation is a small positive fraction
    try:
        result = Trainer(_model(tiny_dir), task, optim, run).fit()
    finally:
        set_peak(None)
    row = result.history[-1]
    assert row["flops_per_s"] > 0 and 0 < row["mfu"] < 1
    counter = FlopCounter(_model(tiny_dir))  # a fresh model: every token through the head

    def step_flops(batch):  # the chunked log-probs ran the head at the label positions only
        rows = int((batch["labels"][:, 1:] != -100).sum())
        return counter(batch) - 6 * counter.n_head * (real_tokens(batch) - rows)

    expected = sum(step_flops(task.collate(items[i : i + 4])) for i in (0, 4))
    assert abs(result.flops_per_s * result.wall_s - expected) < 1e-6 * expected


def test_chunked_log_probs_count_the_head_at_the_label_rows_only(tiny_dir):
    """The chunked path runs the output head (V·H) on the label positions only: the counter leaves
    the other rows' 6·V·H out. The head's matmuls per label row are 2·V·H forward and, backward,
    2·V·H recomputing the logits (not model FLOPs, like activation checkpointing), 2·V·H for the
    hidden-state gradient and 2·V·H for the weight gradient; PyTorch's counter has no formula for
    the in-place ``addmm_`` that accumulates the last one, so it sees exactly the model FLOPs."""
    from alignkit.models.heads import forward_logps

    model = _model(tiny_dir)
    model.config._attn_implementation = "eager"
    B, T = 3, 12
    ids = torch.randint(4, model.config.vocab_size, (B, T))
    labels = ids.clone()
    labels[:, :5] = -100  # prompts
    labels[2, 9:] = -100  # padding
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "labels": labels}
    rows = int((labels[:, 1:] != -100).sum())
    with FlopCounterMode(display=False) as counter:
        logps, mask = forward_logps(model, batch)
        logps.sum().backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    matmuls = sum(n for op, n in by_op.items() if op.split(".")[-1] in ("mm", "addmm"))
    c = FlopCounter(model)
    VH = model.get_output_embeddings().weight.numel()
    assert model.last_head_rows == rows and c.n_head == VH
    assert "aten.addmm_" not in by_op
    recompute, unseen_weight_grad = 2 * VH * rows, 2 * VH * rows
    assert c(batch) - 12 * c.layers * c.width * attention_pairs(batch) + recompute == matmuls + unseen_weight_grad
    assert c(batch) < 6 * c.n * B * T + 12 * c.layers * c.width * attention_pairs(batch)
