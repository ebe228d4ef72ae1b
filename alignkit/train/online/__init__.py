"""What the online methods share: prompts → rollouts → scores → minibatch updates.

``ppo.py``, ``grpo.py`` (GRPO and RLOO) and ``rejection_sampling.py`` read top to bottom like
their papers' pseudo-code; what they have in common lives here, one file per concern:

- :mod:`~alignkit.train.online.config`: the config sections (:class:`RolloutConfig`,
  :class:`KLConfig` and its β controllers) and the run's result;
- :mod:`~alignkit.train.online.prompts`: the prompts (from any data file with a prompt) and their
  order over rollouts;
- :mod:`~alignkit.train.online.rewards`: the reward (reward models from paths, weighted,
  safety-gated, whitened, clipped) and the penalty for responses that never end;
- :mod:`~alignkit.train.online.forward`: the forward over a
  :class:`~alignkit.rollout.batch.RolloutBatch` (policy log-probs of the sampled tokens under the
  sampling temperature), and the sequence KL;
- :mod:`~alignkit.train.online.reductions`: how per-token losses become a minibatch loss;
- :mod:`~alignkit.train.online.collectives`: sums, maxima and whitening over every process's share;
- :mod:`~alignkit.train.online.loop`: :class:`OnlineLoop`, the driver of the shared
  :class:`~alignkit.train.engine.Engine` (prompts and sampling seeds per rollout, the minibatch
  update, per-rollout logs and checkpoints).

Batch sizes (one definition each, see docs/rl.md): a *rollout* holds
``prompts_per_rollout × samples_per_prompt`` episodes; a *minibatch* is
``optim.batch_size × optim.grad_accum × processes`` episodes and makes one optimizer step;
``optim.batch_size`` episodes go through the model per forward pass.
"""

from alignkit.models.dropout import disable_dropout
from alignkit.train.online.collectives import all_reduce_max, all_reduce_sum, whiten_over_processes
from alignkit.train.online.config import KL_CONTROLLERS, KLConfig, OnlineResult, RolloutConfig, validate_online
from alignkit.train.online.forward import policy_forward, response_slice, rollout_logps, sequence_kl
from alignkit.train.online.loop import PROCESS_SEED_STRIDE, OnlineLoop, online_inputs
from alignkit.train.online.prompts import load_prompts, rollout_prompt_indices
from alignkit.train.online.reductions import LOSS_REDUCTIONS
from alignkit.train.online.rewards import RewardConfig, build_reward, score_responses

__all__ = [
    "KL_CONTROLLERS", "LOSS_REDUCTIONS", "PROCESS_SEED_STRIDE", "KLConfig", "OnlineLoop", "OnlineResult",
    "RewardConfig", "RolloutConfig", "all_reduce_max", "all_reduce_sum", "build_reward", "disable_dropout",
    "load_prompts", "online_inputs", "policy_forward", "response_slice", "rollout_logps", "rollout_prompt_indices", "score_responses",
    "sequence_kl", "validate_online", "whiten_over_processes",
]
