"""`alignkit demo`: the InstructGPT / Llama 2 recipe end to end on the embedded alignment world.

1. build the world; train a tokenizer on its corpus and pretrain a tiny Llama; SFT it on the
   (imperfect) demonstrations;
2. sample the SFT policy, have the simulated labelers compare the samples (helpfulness and
   safety annotations with margin labels, plus a "confident" labeler who cannot spot made-up
   facts), train the reward models and report their held-out accuracy;
3. run every alignment method from the same SFT policy;
4. score every policy on held-out prompts with the gold judge (which nothing trains on);
5. write ``report.json``, ``report.md`` and the plots.

Everything the pipeline trains on comes from the labelers; the gold judge only evaluates.

The package is a *user* of the library: nothing in ``alignkit`` outside it imports it. Modules,
in the order they depend on each other:

- :mod:`~alignkit.demo.config`: the command's options and the run sizes (full, quick);
- :mod:`~alignkit.demo.context`: what the stages share, the stage runner, I/O and sampling helpers;
- :mod:`~alignkit.demo.labels`: comparison data from the simulated labelers;
- :mod:`~alignkit.demo.pipeline`: base model, SFT, reward models and their gated combination,
  sampling a policy on the held-out prompts;
- :mod:`~alignkit.demo.methods`: the alignment methods, each from the SFT policy;
- :mod:`~alignkit.demo.iterate`: iterative rounds (the ``iterative`` method and `alignkit iterate`);
- :mod:`~alignkit.demo.critic`: the critique-model stage;
- :mod:`~alignkit.demo.evaluate`: the gold judge's scores of every policy;
- :mod:`~alignkit.demo.findings`: the claims the demo measures, and its report.md;
- :mod:`~alignkit.demo.run`: the stages in order (:func:`run_demo`).
"""

from .config import FULL, QUICK, DemoConfig, Scale
from .run import METHODS, QUICK_METHODS, run_demo

__all__ = ["FULL", "METHODS", "QUICK", "QUICK_METHODS", "DemoConfig", "Scale", "run_demo"]
