"""GGUF files as ``model.path``: converted once to a plain Hugging Face directory, then cached.

transformers reads a GGUF file (llama.cpp's format) with ``from_pretrained(dir, gguf_file=name)``,
dequantising every tensor to float32 and rebuilding the tokenizer from the file's metadata. That
takes about a minute for a 135M model and needs the ``gguf`` package, so alignkit does it once per
file: model and tokenizer are saved as a plain HF directory under
``$ALIGNKIT_CACHE/gguf/`` (default ``~/.cache/alignkit/gguf/``), keyed by the file's absolute path,
size and modification time, and every later load reads that directory. Editing or replacing the
file changes the key, so a stale conversion is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from alignkit.models.errors import ModelLoadError

INSTALL_HINT = "pip install 'alignkit[real]'  (or: pip install 'gguf>=0.10')"
#: Written last into a finished conversion; a directory without it is an interrupted one.
DONE_FILE = "alignkit_gguf.json"


def is_gguf(path: str) -> bool:
    return str(path).lower().endswith(".gguf")


def cache_root() -> Path:
    """alignkit's cache directory: ``$ALIGNKIT_CACHE`` or ``~/.cache/alignkit``."""
    return Path(os.environ.get("ALIGNKIT_CACHE") or Path.home() / ".cache" / "alignkit")


def converted_dir_for(path: str | Path) -> Path:
    """Where the conversion of the GGUF file ``path`` lives (whether or not it exists yet)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{p.stem}-{key}"


def _check_file(p: Path) -> None:
    if not p.is_file():
        raise ModelLoadError(f"GGUF file {p} does not exist")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{p} is not a GGUF file (it does not start with the GGUF magic bytes); "
                             "it may be damaged or an interrupted download: download it again")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading the GGUF file {p} needs the `gguf` package, which is not installed: {INSTALL_HINT}")


@contextlib.contextmanager
def _locked(lock_path: Path):
    """One conversion of a file at a time across processes (e.g. every rank of a multi-GPU launch)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; concurrent conversions each write a temporary dir
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _dense(model) -> None:
    """Drop the GGUF quantizer from a dequantised model so it saves as a plain float checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = getattr(quantizer, "packed_modules", None)
    if packed:  # weights left in GGUF blocks: unpack them (older transformers cannot be told up front)
        model.dequantize()
        return
    quantizer.remove_quantization_config(model)


def _convert(p: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {}
    try:  # transformers ≥ 5.2x can keep GGUF blocks packed; ask for a plain dense model
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=p.name, dequantize=True)
    except ImportError:
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32, **kwargs)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise ModelLoadError(f"transformers could not read the GGUF file {p}: {type(e).__name__}: {e}. "
                             "transformers reads GGUF files of the architectures listed in its GGUF documentation "
                             "(llama, mistral, qwen2, gemma, phi3, gpt2, ...); a damaged file: download it again.") from e
    _dense(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def gguf_model_dir(path: str | Path) -> Path:
    """The plain HF directory (model + tokenizer) converted from the GGUF file ``path``, converting on first use."""
    p = Path(path).expanduser()
    _check_file(p)
    final = converted_dir_for(p)
    if (final / DONE_FILE).is_file():
        return final
    with _locked(final.with_name(final.name + ".lock")):
        if (final / DONE_FILE).is_file():  # another process converted it while this one waited
            return final
        print(f"[alignkit] converting {p} to a Hugging Face directory (once; cached in {final})", flush=True)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            _convert(p.resolve(), tmp)
            seconds = time.perf_counter() - start
            st = p.stat()
            (tmp / DONE_FILE).write_text(json.dumps({
                "source": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "seconds": round(seconds, 1)}, indent=2), encoding="utf-8")
            if final.exists():  # an interrupted conversion without its DONE_FILE
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"[alignkit] converted {p.name} in {seconds:.0f} s", flush=True)
    return final
