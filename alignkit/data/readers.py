"""Reading rows from files, saved ``datasets`` directories and the Hugging Face Hub.

Every reader yields ``(location, row)``: ``row`` is a plain dict, ``location`` says where it came
from so later errors can point at it:

=====================  ==========================  =========================================
source                 chosen by                   location
=====================  ==========================  =========================================
JSON Lines             ``.jsonl`` ``.ndjson``       ``data.jsonl:17`` (1-based line)
JSON                   ``.json``: a list of         ``data.json[16]`` (0-based index); a
                       objects or ``{"data": [..]}``  ``.json`` file holding JSON Lines is read
                                                    as JSON Lines
CSV / TSV              ``.csv`` ``.tsv``            ``data.csv:18`` (1-based line, header = 1)
Parquet                ``.parquet`` ``.pq``         ``data.parquet[16]``
saved ``datasets``     a directory written by       ``dir/train[16]`` (``split`` picks from a
                       ``save_to_disk``             ``DatasetDict``)
Hub data set           a name like ``org/name``     ``hub:org/name/train[16]``
                       that is not a local path
=====================  ==========================  =========================================

Text files may be compressed (``.gz``, ``.bz2``, ``.xz`` after the type: ``data.jsonl.gz``) and may
start with a UTF-8 byte-order mark (as Windows tools write), which is dropped. A damaged archive
is an error naming the file.

CSV cells are strings (an empty cell is a missing value); a cell holding a JSON array of chat
messages (``[{"role": ..., "content": ...}]``) is decoded so conversations survive a CSV round trip.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import json
import lzma
import random
import zlib
from collections.abc import Iterator
from pathlib import Path

from alignkit.data.report import DataError

Row = tuple[str, dict]

_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}

#: Compression suffix -> (decompress, the errors a damaged archive raises).
_COMPRESSED = {
    ".gz": (gzip.decompress, (OSError, EOFError, zlib.error)),
    ".bz2": (bz2.decompress, (OSError, EOFError, ValueError)),
    ".xz": (lzma.decompress, (lzma.LZMAError, EOFError)),
}

_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)

_UTF8_FIX = (
    "alignkit reads text files as UTF-8: re-encode the file (e.g. `iconv -f latin1 -t utf-8 "
    "IN > OUT` if it is Latin-1) or fix that line"
)


def read_rows(path: str | Path, split: str = "train", limit: int | None = None) -> Iterator[Row]:
    """Yield ``(location, row)`` from ``path``: a local file, a saved data set, or a hub name.

    ``limit`` stops after that many rows (the first rows of the source, before any shuffling), so
    quick runs on big files stay cheap. ``split`` only matters for ``datasets`` sources.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of rows, got {limit}")
    rows = _rows(path, split)
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        yield row


def _rows(path: str | Path, split: str) -> Iterator[Row]:
    from alignkit.context import is_memory, memory_source

    if is_memory(path):  # given in Python (alignkit.api): read like a file, located as memory:NAME[i]
        return _read_memory(str(path), memory_source(str(path)), split)
    p = Path(path)
    if p.is_dir():
        return _read_saved_dataset(p, split)
    if p.is_file():
        return _READERS[_kind(p)](p)
    if _looks_like_hub_name(str(path)):
        return _read_hub(str(path), split)
    raise DataError(f"{path}: no such file or directory")


def _kind(p: Path) -> str:
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    kind = _SUFFIXES.get(suffixes[-1]) if suffixes else None
    if kind is None:
        raise DataError(
            f"{p}: cannot tell the file type from its name; use one of "
            f"{', '.join(sorted(_SUFFIXES))} (optionally compressed: "
            f"{', '.join(_COMPRESSED)}), or a directory written by datasets' save_to_disk"
        )
    if kind == "parquet" and p.suffix.lower() in _COMPRESSED:
        raise DataError(f"{p}: Parquet files are compressed inside; give the .parquet file itself")
    return kind


def _looks_like_hub_name(name: str) -> bool:
    """``org/name`` or ``name``: no data-file suffix, not absolute or relative-looking."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        return False
    return Path(name).suffix.lower() not in {*_SUFFIXES, *_COMPRESSED}


def has_splits(path: str | Path) -> bool:
    """Whether ``path`` has named splits (a saved data set, a hub name or an in-memory
    ``DatasetDict``), unlike a file."""
    from alignkit.context import is_memory, memory_source

    if is_memory(path):
        return _is_split_dict(memory_source(str(path)))
    p = Path(path)
    return p.is_dir() or (not p.exists() and _looks_like_hub_name(str(path)))


def _read_bytes(p: Path) -> bytes:
    """The file's bytes, decompressed, without a UTF-8 byte-order mark."""
    data = p.read_bytes()
    if p.suffix.lower() in _COMPRESSED:
        decompress, errors = _COMPRESSED[p.suffix.lower()]
        try:
            data = decompress(data)
        except errors as e:
            raise DataError(
                f"{p}: not a readable {p.suffix} archive ({type(e).__name__}: {e}); the file is "
                f"damaged or incomplete (an interrupted download or copy?). Check it with "
                f"`{_TEST_COMMAND[p.suffix.lower()]} {p}` and fetch it again"
            ) from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    elif data.startswith(_UTF16_BOMS):
        raise DataError(
            f"{p}: the file is UTF-16 text (it starts with a UTF-16 byte-order mark); alignkit "
            f"reads UTF-8: re-encode it, e.g. `iconv -f utf-16 -t utf-8 IN > OUT`"
        )
    if not data.strip():
        raise DataError(f"{p}: the file is empty (no rows to read)")
    return data


_TEST_COMMAND = {".gz": "gzip -t", ".bz2": "bzip2 -t", ".xz": "xz -t"}


def _decode(p: Path, data: bytes, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data[: e.start].count(b"\n")
        raise DataError(
            f"{p}:{line}: bytes are not valid UTF-8 (byte {data[e.start:e.start + 1]!r} at "
            f"byte offset {e.start} of the file: {e.reason}). {_UTF8_FIX}"
        ) from None


def _read_jsonl(p: Path, data: bytes | None = None) -> Iterator[Row]:
    data = _read_bytes(p) if data is None else data
    offset = 0
    for lineno, raw in enumerate(data.splitlines(keepends=True), start=1):
        start, offset = offset, offset + len(raw)
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{p}:{lineno}: bytes are not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at "
                f"byte offset {start + e.start} of the file: {e.reason}). {_UTF8_FIX}"
            ) from None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{p}:{lineno}: invalid JSON: {e.msg} (column {e.colno}). Each line of a JSON "
                "Lines file must be one complete JSON object"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{p}:{lineno}: expected a JSON object per line, got {type(row).__name__}"
            )
        yield f"{p}:{lineno}", row


def _read_json(p: Path) -> Iterator[Row]:
    data = _read_bytes(p)
    text = _decode(p, data)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several documents: a JSON Lines file named .json
            yield from _read_jsonl(p, data)
            return
        raise DataError(f"{p}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise DataError(
            f"{p}: expected a JSON list of objects or an object {{\"data\": [...]}}, "
            f"got {type(doc).__name__}"
            + (f" with keys {sorted(doc)}" if isinstance(doc, dict) else "")
        )
    if not doc:
        raise DataError(f"{p}: the JSON list is empty (no rows to read)")
    for i, row in enumerate(doc):
        if not isinstance(row, dict):
            raise DataError(f"{p}[{i}]: expected a JSON object, got {type(row).__name__}")
        yield f"{p}[{i}]", row


def _read_csv(p: Path) -> Iterator[Row]:
    text = _decode(p, _read_bytes(p))
    delimiter = "\t" if ".tsv" in [s.lower() for s in p.suffixes] else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader)
    if len(set(header)) != len(header):
        raise DataError(f"{p}:1: the header repeats a column name: {header}")
    count = 0
    line = reader.line_num + 1
    for cells in reader:
        start, line = line, reader.line_num + 1  # a quoted cell may span several lines
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise DataError(
                f"{p}:{start}: {len(cells)} cells but the header has {len(header)} columns "
                f"({', '.join(header)}); quote cells that contain '{delimiter}' or newlines"
            )
        count += 1
        yield f"{p}:{start}", {k: _csv_cell(v) for k, v in zip(header, cells)}
    if count == 0:
        raise DataError(f"{p}: the CSV file has a header but no rows")


def _csv_cell(value: str):
    if value == "":
        return None
    stripped = value.strip()
    if stripped.startswith("[{") and stripped.endswith("}]"):
        try:
            decoded = json.loads(stripped)
        except json.JSONDecodeError:
            return value
        if all(isinstance(m, dict) and "role" in m for m in decoded):
            return decoded
    return value


def _read_parquet(p: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{p}: not a readable Parquet file ({e})") from None
    if f.metadata.num_rows == 0:
        raise DataError(f"{p}: the Parquet file has no rows")
    i = 0
    for batch in f.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{p}[{i}]", row
            i += 1


def _read_saved_dataset(p: Path, split: str) -> Iterator[Row]:
    if not ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        raise DataError(
            f"{p}: is a directory but not a data set written by datasets' save_to_disk "
            "(no state.json or dataset_dict.json); give a file path instead"
        )
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets/pyarrow raise many types for a damaged directory
        raise DataError(
            f"{p}: a data set saved with save_to_disk that cannot be read ({type(e).__name__}: "
            f"{e}); it is damaged or incomplete: save it again"
        ) from None
    where = str(p)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{p}: no split '{split}'; the data set has splits {sorted(ds)}")
        ds, where = ds[split], f"{p}/{split}"
    if len(ds) == 0:
        raise DataError(f"{where}: the data set is empty")
    for i, row in enumerate(ds):
        yield f"{where}[{i}]", row


def _is_split_dict(source) -> bool:
    """A ``DatasetDict`` (or a plain dict of splits): its ``column_names`` is a dict per split."""
    return isinstance(source, dict) or isinstance(getattr(source, "column_names", None), dict)


def _read_memory(name: str, source, split: str) -> Iterator[Row]:
    """Rows of an in-memory source: a ``datasets.Dataset``, a ``DatasetDict`` (``split`` picks
    one), or a list of dicts in any format the file readers accept."""
    if _is_split_dict(source):
        if split not in source:
            raise DataError(f"{name}: no split '{split}'; the data set has splits {sorted(source)}")
        source, name = source[split], f"{name}/{split}"
    if isinstance(source, (str, bytes)) or not hasattr(source, "__iter__"):
        raise DataError(f"{name}: in-memory data must be a datasets.Dataset, a DatasetDict or a list of dicts; "
                        f"got {type(source).__name__}")
    empty = True
    for i, row in enumerate(source):
        empty = False
        if not isinstance(row, dict):
            raise DataError(f"{name}[{i}]: expected a dict (one record), got {type(row).__name__}")
        yield f"{name}[{i}]", row
    if empty:
        raise DataError(f"{name}: the in-memory data set is empty")


def _read_hub(name: str, split: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, missing split: all end here
        raise DataError(
            f"'{name}' is not a local file or directory, so it was looked up as a Hugging Face "
            f"Hub data set, which failed ({type(e).__name__}: {e}). If you meant a local file, "
            "check the path. A hub data set needs network access, or a copy in the local "
            "datasets cache (HF_DATASETS_OFFLINE=1 reads only the cache)."
        ) from None
    if len(ds) == 0:
        raise DataError(f"hub:{name}/{split}: the data set is empty")
    for i, row in enumerate(ds):
        yield f"hub:{name}/{split}[{i}]", row


#: File type -> reader (each takes the path and yields ``(location, row)``).
_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}


def split_rows(
    rows: list[Row],
    shuffle: bool = True,
    seed: int = 0,
    eval_fraction: float = 0.0,
    eval_size: int | None = None,
) -> tuple[list[Row], list[Row]]:
    """Shuffle (with ``seed``), then hold out the last ``eval_size`` rows or ``eval_fraction``.

    The split is by input row, so the pairs expanded from one ranking never straddle train and
    eval. A positive ``eval_fraction`` holds out at least one row; train must keep at least one.
    """
    if eval_size is not None and eval_fraction:
        raise DataError("give eval_fraction or eval_size, not both")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_size is not None and eval_size < 0:
        raise DataError(f"eval_size must be >= 0, got {eval_size}")
    rows = list(rows)
    if shuffle:
        random.Random(seed).shuffle(rows)
    n_eval = eval_size if eval_size is not None else 0
    if eval_fraction:
        n_eval = max(1, round(len(rows) * eval_fraction))
    if n_eval >= len(rows):
        raise DataError(
            f"an eval split of {n_eval} rows leaves no training rows (only {len(rows)} rows read)"
        )
    cut = len(rows) - n_eval
    return rows[:cut], rows[cut:]
