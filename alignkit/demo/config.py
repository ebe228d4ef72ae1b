"""The demo's settings: the command's options (:class:`DemoConfig`) and the sizes of a run
(:class:`Scale`; the full and the quick run differ only there)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DemoConfig:
    """`alignkit demo`: the whole pipeline on the embedded alignment world, measured by its gold judge."""

    out: str = "demo-out"
    """Directory for models, data, report.json, report.md and the plots."""
    seed: int = 0
    """Seed of the world, the models and the sampling."""
    seeds: str = ""
    """Comma-separated seeds (e.g. 0,1,2): one whole run per seed into OUT/seed-N, then one report in OUT with
    every figure's mean and 95% interval over seeds and, per claim, the seeds it held on. Empty: one run of `seed`."""
    quick: bool = False
    """A smaller, faster run (fewer steps and samples, one method per family): about 120 s of one core of this
    project's 2-core AVX-512 machine, budget 180 s (the full run: about 310 s, budget 600 s; README.md, Time)."""
    tiny: bool = False
    """A run of seconds for tests of the machinery (a 1-layer model, fractions of an epoch, one sample per
    prompt): its figures mean nothing. Overrides --quick."""
    methods: str = "default"
    """Comma-separated alignment methods to run after SFT (see `alignkit.demo.METHODS`), 'all', or 'default'
    (all of them; with --quick the core ones: best-of-N, DPO, PPO, GRPO)."""
    threads: int = 1
    """torch CPU threads (0 = torch's default). Tiny models run fastest on one: on this project's 2-core
    machines one thread trained 16.7k tokens/s, two threads far less whenever anything else ran."""


@dataclass
class Scale:
    """Sizes of one demo run (the full and the quick one differ only here)."""

    pretrain_epochs: float
    sft_epochs: float
    samples_per_prompt: int  # SFT samples per train prompt for the comparison data
    rm_epochs: float
    best_of_n: int
    eval_samples: int  # samples per held-out prompt when evaluating a policy
    # Samples per held-out harmful prompt for the violation rate of a sampled policy (0: eval_samples).
    # The extra ones count there only, so the gold reward, KL and win rate keep equal weight per
    # prompt. A violation is rare (SFT: 8-15%), and with 2-3 samples per prompt most of the
    # helpful-and-harmless misses were the measurement's (docs/demo.md, Helpful and harmless together).
    harmful_eval_samples: int = 0
    bon_draws: int = 1  # best-of-N draws per held-out prompt (each costs N samples and N scores per reward)
    dpo_epochs: float = 2
    rs_prompts: int = 0  # prompts per rejection-sampling round (0 = all train prompts)
    rounds: int = 2  # iterative RLHF rounds
    rl_rollouts: int = 10  # rollouts (PPO, GRPO, RLOO)
    constrained_rollouts: int = 10  # rollouts of the Safe-RLHF pair (the Lagrange multiplier needs time to settle)
    max_new_tokens: int = 24
    hidden_size: int = 64
    num_hidden_layers: int = 3
    vocab_size: int = 768


#: Full. To fit 10 minutes of one core the model is 64 wide (96 before: the plain transformers step
#: runs 1.6x faster, benchmarks/bench_demo_model.py), with 6 pretraining epochs (8), 2 reward-model
#: epochs (3), 1 DPO/IPO/KTO epoch (1.5) and 3 samples per held-out prompt (4; each policy's sampling,
#: KL and NLL cost about 7 s, and there are 17 policies). Best-of-N keeps 2 draws per prompt: with one
#: (one response per prompt) its rates' intervals reached ±9 points. The violation rates take 16
#: samples per held-out harmful prompt: with 3, ten of the combined-reward methods' cuts on seeds 3
#: and 4 stayed within their intervals; with 8, PPO's 2-point cut on check seed 5 still did
#: (docs/demo.md, Helpful and harmless). 16 cost about 1 s of CPU more than 8 per sampled policy.
FULL = Scale(pretrain_epochs=6, sft_epochs=2, samples_per_prompt=4, rm_epochs=2, best_of_n=8, eval_samples=3,
             harmful_eval_samples=16, bon_draws=2, dpo_epochs=1, rl_rollouts=12, constrained_rollouts=16, hidden_size=64)
#: Quick: the same model; 4 SFT samples per train prompt for the comparisons, 2 reward-model epochs,
#: 2 held-out samples per prompt (3) and, as at full scale, 1 DPO epoch: with 0.75 (on the combined
#: data of commit fbd4fe9, which leaves out borderline sample-against-sample comparisons) DPO raised
#: false refusals 8 points above SFT's on seed 0; with 1 it raised them on no seed (seed 0: −1 point,
#: within its interval; seeds 1 and 2: −44 and −29; docs/demo.md, Helpful and harmless together).
#: With 3 samples per train prompt (half the pairs) the quick safety reward model fell below chance
#: once the borderline catalogue grew to 45 requests (seed 0: 0.49 held-out accuracy) and two of four
#: methods' violation cuts stayed within their intervals; 4 samples cost about 30 s more (seed 0: 145 s of CPU on the AVX-512 machine, 116 s
#: with 3). Cheaper pretraining costs more: 3 pretraining epochs with 1 reward-model epoch dropped the
#: reward models to 54-57% held-out accuracy and PPO below SFT (seed 0, an earlier world).
#: 16 samples per held-out harmful prompt for the violation rates (2 elsewhere): with 2, DPO's, PPO's
#: and GRPO's cuts on seeds 1 and 2 (1-4 points) stayed within their intervals, while 8 samples of the
#: same policies cut 4-8 points beyond them (benchmarks/demo_violations.py); with 8, PPO's 1-point cut
#: on seed 2 still did. 16 cost about 1 s of CPU more than 8 per sampled policy.
QUICK = Scale(pretrain_epochs=4, sft_epochs=2, samples_per_prompt=4, rm_epochs=2, best_of_n=6, eval_samples=2,
              harmful_eval_samples=16, bon_draws=2, dpo_epochs=1, rl_rollouts=10, rs_prompts=256, hidden_size=64)
#: The tests' scale: every stage runs, in seconds, on a model too small to learn the world.
TINY = Scale(pretrain_epochs=0.2, sft_epochs=0.3, samples_per_prompt=2, rm_epochs=0.3, best_of_n=2, eval_samples=1,
             bon_draws=1, dpo_epochs=0.2, rs_prompts=32, rounds=2, rl_rollouts=2, constrained_rollouts=2,
             max_new_tokens=8, hidden_size=32, num_hidden_layers=1, vocab_size=384)


def scale_of(cfg: DemoConfig) -> Scale:
    """The run sizes a config asks for."""
    return TINY if cfg.tiny else QUICK if cfg.quick else FULL


def report_scale(cfg: DemoConfig) -> str:
    """The name of the run size: tiny, quick or full."""
    return "tiny" if cfg.tiny else "quick" if cfg.quick else "full"


#: The time budget of each scale, CPU seconds of one core (the quick run: 3 minutes, the full run: 10),
#: that the demo's closing line and report.md hold the run against. The default methods only: a
#: quick run with methods=all runs more stages.
BUDGET_SECONDS: dict[str, float] = {"quick": 180, "full": 600}


def budget_line(scale: str, methods_default: bool, cpu_s: float) -> str:
    """How a run's CPU seconds compare with its scale's budget (empty when it has none)."""
    budget = BUDGET_SECONDS.get(scale)
    if budget is None:
        return ""
    if not methods_default:
        return f"budget {budget:.0f} s of CPU for the default methods; this run chose its own"
    return f"{'within' if cpu_s <= budget else 'OVER'} the {scale} budget of {budget:.0f} s of CPU"


#: Typical CPU seconds of each stage on one core of this project's 2-core development machine (AMD
#: EPYC, AVX-512; measured while another run shared the machine); the stage runner scales them by this
#: run's pace for its ETA. A stage missing here turns the ETA off.
STAGE_SECONDS: dict[str, dict[str, float]] = {
    # quick, CPU seconds on the AMD EPYC with AVX-512: the default methods' stages are the mean of seeds
    # 0-2 (commit 490aac6, two runs sharing the 2 cores); IPO, KTO, rejection sampling, the iterative
    # rounds, PPO-ptx, Safe-RLHF, RLOO and the critic (run with methods=all) are seed 0's at commit
    # a8f001a, from `pytest -m demo`
    "quick": {"pretraining": 24, "supervised fine-tuning": 2, "comparison data": 5, "reward models": 41,
              "sample the SFT policy": 4, "best_of_n": 14, "dpo": 14, "ipo": 17, "kto": 14, "rejection_sampling": 8,
              "iterative": 48, "ppo": 7, "ppo_ptx": 10, "ppo_safety_constrained": 17, "grpo": 7, "rloo": 9,
              "critic": 63, "gold-judge evaluation": 1},
    # full, mean of seeds 0-4, CPU seconds (commit faf815a: the run docs/demo-report.json holds)
    "full": {"pretraining": 33, "supervised fine-tuning": 2, "comparison data": 4, "reward models": 36,
             "sample the SFT policy": 4, "best_of_n": 17, "dpo": 13, "ipo": 14, "kto": 12, "rejection_sampling": 12,
             "iterative": 36, "ppo": 8, "ppo_ptx": 11, "ppo_safety_constrained": 19, "grpo": 8, "rloo": 7,
             "critic": 69, "gold-judge evaluation": 2},
    "tiny": {"pretraining": 8, "supervised fine-tuning": 1, "comparison data": 2, "reward models": 2,
             "sample the SFT policy": 1, "best_of_n": 3, "dpo": 2, "ipo": 2, "kto": 2, "rejection_sampling": 2,
             "iterative": 5, "ppo": 2, "ppo_ptx": 2, "ppo_safety_constrained": 4, "grpo": 2, "rloo": 2, "critic": 10,
             "gold-judge evaluation": 1},
}
