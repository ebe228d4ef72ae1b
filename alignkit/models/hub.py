"""Hub names without a network: decide in a second, not after a minute of retries.

A model path that is not a local file or directory is a Hugging Face hub name. Without a network,
transformers retries every file it looks for (config, tokenizer files, weights) with back-off:
47–80 s before an error. Here the hub is probed once per process (one HEAD request, a 3 s
timeout), and when it cannot be used, names are loaded from the local Hugging Face cache only
(``local_files_only``), failing at once with what was tried and how to fix it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

#: Seconds the one probe of the hub may take.
PROBE_TIMEOUT_S = 3.0


def is_hub_name(path: str) -> bool:
    """True when ``path`` can only mean a hub repository (it is not a local path)."""
    return bool(path) and not path.startswith((".", "/", "~")) and not Path(path).exists()


@functools.cache
def hub_unavailable() -> str | None:
    """Why the hub cannot be used in this process (offline mode, or the probe failed), or None."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1)"
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # any transport error: DNS, refused, timeout, proxy, TLS
        return f"{constants.ENDPOINT} cannot be reached ({type(e).__name__}: {e})"
    return None  # any HTTP answer, even an error status, means the network works


def hub_kwargs(path: str) -> dict:
    """``from_pretrained`` keyword arguments for ``path``: cache only when the hub cannot be used."""
    return {"local_files_only": True} if is_hub_name(path) and hub_unavailable() else {}


def hub_error_hint(path: str) -> str:
    """What was tried for a hub name that failed to load, and how to fix it."""
    from huggingface_hub import constants

    reason = hub_unavailable()
    if reason is None:
        return (f"{path!r} is not a local path, and the hub ({constants.ENDPOINT}) has no such repository or "
                "refused access (private or gated: log in with `hf auth login`). Check the spelling, or give a "
                "local model directory.")
    return (f"{path!r} is not a local path and is not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and the "
            f"hub cannot be used: {reason}. Fix: give a local model directory (an earlier stage's output, or "
            f"`alignkit tiny-model` for a tiny one), or download it where there is a network (`hf download {path}`) "
            f"and copy the cache here{'' if os.environ.get('HF_HUB_CACHE') else ' (or point HF_HUB_CACHE at it)'}.")
