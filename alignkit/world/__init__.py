"""The embedded alignment world: a synthetic corpus, prompts, a gold judge and simulated labelers.

It lets the whole InstructGPT / Llama 2 recipe (pretrain, SFT, reward model, DPO/PPO) run on a
laptop CPU against a *known* preference. Pure standard library: it imports no torch and nothing
from the training code, so the judge stays apart from what it judges. See docs/world.md.

    >>> from alignkit.world import World
    >>> world = World(seed=0)
    >>> p = world.prompts("arithmetic")[0]
    >>> world.judge.score(p, "1 plus 1 is 2.").category
    'correct'
"""

from .corpus import CORPUS_RATES, DEMO_RATES, CorpusSize, Rates
from .judge import CATEGORIES, REWARD_RANGE, GoldJudge, Judgement
from .labelers import MARGIN_THRESHOLDS, Labeler, margin_label
from .prompts import KINDS, SPLITS, KnowledgeBase, Prompt
from .responses import CLASSES, candidate_responses
from .world import World, WorldConfig

__all__ = [
    "CATEGORIES", "CLASSES", "CORPUS_RATES", "DEMO_RATES", "KINDS", "MARGIN_THRESHOLDS",
    "REWARD_RANGE", "SPLITS", "CorpusSize", "GoldJudge", "Judgement", "KnowledgeBase", "Labeler",
    "Prompt", "Rates", "World", "WorldConfig", "candidate_responses", "margin_label",
]
