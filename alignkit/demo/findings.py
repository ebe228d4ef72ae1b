"""The claims the demo measures, stated from its report (the policy names here are the demo's;
:mod:`alignkit.eval.report` renders any report and takes these sentences as an argument)."""

from __future__ import annotations

from alignkit.eval.report import _fmt


def findings(report: dict) -> list[str]:
    """The claims the demo measures, each stated with its numbers (the policy names are the demo's)."""
    pol, out = report["policies"], []
    sft = pol.get("sft")
    if not sft:
        return out
    best = max((n for n in pol if n != "sft"), key=lambda n: pol[n]["gold_reward"], default=None)
    if best:
        b = pol[best]
        verdict = "beats" if b["gold_reward"] > sft["gold_reward"] else "does not beat"
        out.append(f"Preference learning {verdict} SFT: {best} reaches gold reward {b['gold_reward']:.3f} vs "
                   f"{sft['gold_reward']:.3f} at KL {b['kl_to_sft']:.2f} nats to SFT.")
    h, c = pol.get("best_of_n/helpfulness"), pol.get("best_of_n/combined")
    if h and c:
        out.append(f"Safety reward model: safety violations {_fmt(h['safety_violation_rate'], True)} with helpfulness alone, "
                   f"{_fmt(c['safety_violation_rate'], True)} with the safety-gated combination (SFT "
                   f"{_fmt(sft['safety_violation_rate'], True)}); false refusals {_fmt(h['false_refusal_rate'], True)} → "
                   f"{_fmt(c['false_refusal_rate'], True)}.")
    conf = pol.get("best_of_n/confident_labelers")
    if h and conf:
        out.append(f"Hallucination: SFT {_fmt(sft['hallucination_rate'], True)}; a reward from labelers who cannot spot made-up "
                   f"facts gives {_fmt(conf['hallucination_rate'], True)}; from labelers who punish them, "
                   f"{_fmt(h['hallucination_rate'], True)}.")
    ppo_, ptx = pol.get("ppo"), pol.get("ppo_ptx")
    if ppo_ and ptx and ppo_.get("pretrain_loss") is not None:
        out.append(f"Alignment tax: held-out pretraining loss SFT {sft['pretrain_loss']:.3f}, PPO {ppo_['pretrain_loss']:.3f}, "
                   f"PPO-ptx {ptx['pretrain_loss']:.3f} (gold reward {ppo_['gold_reward']:.3f} vs {ptx['gold_reward']:.3f}).")
    free, cons = pol.get("ppo_helpfulness_only"), pol.get("ppo_cost_constrained")
    if free and cons:
        out.append(f"Safe-RLHF cost constraint (helpfulness reward, cost = −safety reward ≤ {cons.get('cost_threshold', 0):g}): "
                   f"safety violations {_fmt(free['safety_violation_rate'], True)} unconstrained, "
                   f"{_fmt(cons['safety_violation_rate'], True)} constrained (mean cost {_fmt(cons.get('initial_cost'))} at the "
                   f"first rollout, {_fmt(cons.get('final_cost'))} over the last three); gold reward {free['gold_reward']:.3f} vs "
                   f"{cons['gold_reward']:.3f}.")
    rounds = sorted((n for n in pol if n.startswith("iterative/round")), key=lambda n: int(n.rsplit("round", 1)[1]))
    if rounds:
        out.append("Iterative rounds: " + ", ".join(f"{n.split('/')[1]} gold reward {pol[n]['gold_reward']:.3f} (KL {pol[n]['kl_to_sft']:.2f})"
                                                   for n in rounds) + f"; SFT {sft['gold_reward']:.3f}.")
    rms = report.get("reward_models", {})
    if rms:
        out.append("Reward-model held-out accuracy: " + ", ".join(f"{k} {_fmt(v['accuracy'], True)}" for k, v in rms.items()) + ".")
    return out
