"""Checking a model directory's files before loading them.

A truncated ``model.safetensors`` (a copy or download cut short, a disk that filled up) or a
garbled ``config.json`` otherwise fails deep inside safetensors or transformers with a message
that names neither the file nor a fix. These checks read only file headers, so they cost
milliseconds even for large models.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from alignkit.models.errors import ModelLoadError

#: The JSON files a model directory may hold that transformers reads.
JSON_FILES = (
    "config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.json", "added_tokens.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
)

FIX = ("copy or download the model again, or re-run the stage that wrote it "
       "(an interrupted alignkit run leaves its last intact checkpoints under checkpoints/)")


def damaged(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"{path} is damaged: {what}. Fix: {FIX}.")


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a :class:`ModelLoadError` naming the file and the position."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise damaged(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise damaged(path, f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise damaged(path, f"expected a JSON object, found {type(data).__name__}")
    return data


def check_safetensors(path: Path) -> None:
    """The file holds the 8-byte header length, the JSON header and exactly the data it describes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise damaged(path, f"{size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise damaged(path, f"truncated: the header alone should be {n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise damaged(path, "the safetensors header is not valid JSON") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise damaged(path, f"{state}: {size} bytes where the header describes {expected}")


def check_torch_bin(path: Path) -> None:
    """A ``torch.save`` zip archive whose central directory (at the end of the file) is intact."""
    with open(path, "rb") as f:
        if f.read(2) != b"PK":
            return  # a legacy (pre-zip) pickle: nothing cheap to check
    try:
        zipfile.ZipFile(path).close()
    except zipfile.BadZipFile as e:
        raise damaged(path, f"truncated or corrupt torch archive ({e})") from None


def check_model_dir(directory: str | Path) -> None:
    """Raise :class:`ModelLoadError` naming the first damaged file of a local model directory."""
    d = Path(directory)
    if not d.is_dir():
        return
    for name in JSON_FILES:
        if (d / name).is_file():
            data = read_json(d / name)
            if name.endswith(".index.json"):
                for shard in sorted(set((data.get("weight_map") or {}).values())):
                    if not (d / shard).is_file():
                        raise damaged(d / name, f"it lists the weight file {shard}, which is missing")
    for path in sorted(d.glob("*.safetensors")):
        check_safetensors(path)
    for path in sorted(d.glob("*.bin")):
        if path.name != "training_args.bin":
            check_torch_bin(path)
