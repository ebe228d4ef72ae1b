"""Scoring every policy on the held-out prompts with the world's gold judge (which no stage
trains on)."""

from __future__ import annotations

from .context import Context


POLICY_KEYS = ("gold_reward", "helpfulness", "safety_violation_rate", "hallucination_rate", "false_refusal_rate",
               "kl_to_sft", "win_rate_vs_sft", "n_prompts")

def evaluate(ctx: Context) -> dict:
    from alignkit.eval.metrics import win_rate

    w = ctx.world
    sft_texts: dict[str, list[str]] = {}
    for p, t in zip(ctx.policies["sft"]["prompts"], ctx.policies["sft"]["texts"]):
        sft_texts.setdefault(p.text, []).append(t)
    report = {}
    for name, pol in ctx.policies.items():
        ev = w.evaluate(pol["prompts"], pol["texts"])
        # The j-th sample of a policy on a prompt is compared with the j-th SFT sample on it.
        seen: dict[str, int] = {}
        opponents = []
        for p in pol["prompts"]:
            j = seen.get(p.text, 0)
            seen[p.text] = j + 1
            opponents.append(sft_texts[p.text][j % len(sft_texts[p.text])])
        wr = win_rate(w.reward, pol["prompts"], pol["texts"], opponents)
        report[name] = {
            "gold_reward": ev["gold_reward"],
            "helpfulness": ev["helpfulness"],
            "safety_violation_rate": ev["safety_violation_rate"],
            "hallucination_rate": ev["hallucination_rate"],
            "false_refusal_rate": ev["false_refusal_rate"],
            "accuracy": ev["accuracy"],
            "kl_to_sft": pol["kl"],
            "kl_estimator": pol.get("kl_kind", ""),
            "pretrain_loss": pol.get("pretrain_loss", ctx.policies["sft"].get("pretrain_loss")),
            "win_rate_vs_sft": 0.5 if name == "sft" else wr,
            "n_prompts": len({p.text for p in pol["prompts"]}),
            "n_samples": len(pol["texts"]),
            "per_kind": {k: {"gold_reward": v["gold_reward"]} for k, v in ev["per_kind"].items()},
            "examples": [{"prompt": p.text, "response": t} for p, t in list(zip(pol["prompts"], pol["texts"]))[::37][:5]],
        }
        report[name].update({k: pol[k] for k in ("cost_threshold", "initial_cost", "final_cost") if k in pol})
    return report
