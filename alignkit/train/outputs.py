"""The output folder of a run, made so that work is never lost or corrupted.

A run writes into ``run.output_dir``: checkpoints, metrics, its configuration and, at the end, the
model. Four guarantees hold there, each a small function the engine calls:

- **One writer at a time** (:class:`OutputLock`): a lock file held with ``flock`` while the run
  writes; a second run into the same folder refuses, naming the holder. The kernel drops the lock
  when the holder dies, so a crashed run never leaves a stale lock behind.
- **A finished model is not overwritten unless asked** (:func:`claim_output_dir`): a folder that
  holds a finished model (its ``alignkit_done.json``) is refused unless ``run.overwrite``; with it,
  the old model is removed at the start, so a run killed later never leaves the first run's
  weights under the second run's configuration.
- **The final save is atomic** (:func:`final_save`): the model is written into a temporary folder,
  marked complete, then moved into place file by file and ``alignkit_done.json`` written last. A
  kill during the moves leaves a complete journal that the next start finishes
  (:func:`recover_final_save`); a kill before it leaves an incomplete folder that is discarded.
- **Resume from the newest intact checkpoint, with the same settings**
  (:func:`resumable_checkpoints`, :func:`check_checkpoint`, :func:`compare_fingerprints`): every file of
  a checkpoint is checked (safetensors headers and sizes, zip CRCs of torch files, the state
  JSON) and a damaged newest checkpoint falls back to the previous intact one with a message; a
  checkpoint records what shapes the result (the configuration and a digest of the training
  data), and a resume with any of it changed stops and lists the differences unless
  ``run.resume_changed`` allows it.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import socket
import struct
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".alignkit.lock"
DONE_FILE = "alignkit_done.json"
STATE_FILE = "trainer_state.json"
_FINAL_TMP = ".tmp-final"
_COMPLETE = ".complete"
# What a run writes beside its model: never moved or removed by the model's save.
_RUN_FILES = {CHECKPOINT_DIR, "metrics.jsonl", "alignkit_config.yaml", "tb", LOCK_FILE, _FINAL_TMP}


class OutputError(RuntimeError):
    """A run's output folder cannot be used as asked; the message says why and what to do."""


def check_output_path(output_dir: str | Path, field: str = "run.output_dir") -> None:
    """Refuse, before anything is loaded, an output path that is a file, lies under a file, or
    cannot be created or written by this user."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{field}={out} is a file, not a folder; choose a folder path")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{field}={out} cannot be created: {existing} is a file; choose a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{field}={out} is not writable by this user ({existing} is read-only); choose another folder")


# --------------------------------------------------------------------------------------------
# One writer at a time
# --------------------------------------------------------------------------------------------


_HELD: dict[str, list] = {}
"""Lock files this process holds: resolved path → [descriptor, the OutputLock that owns it]."""


class OutputLock:
    """An exclusive lock on an output folder, held while a run writes it.

    ``flock`` on ``output_dir/.alignkit.lock`` (released by the kernel when the process exits,
    however it exits); the file names the holder (host, pid, command, start time) so the refusal
    can say who it is. Within one process the lock is re-entrant: a later run in the same
    process (a notebook cell run again after an error) takes it over.
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        import fcntl

        check_output_path(self.path.parent)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in _HELD:
            # Held by this very process: a run that stopped early (an exception in a notebook, a
            # test's simulated kill) is over, and this process now starts the next one.
            self._fd = _HELD[key][0]
            _HELD[key][1] = self
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise OutputError(
                f"{self.path.parent} is being written by another run ({holder}); wait for it to finish, "
                "stop it, or choose another run.output_dir") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd
        _HELD[key] = [fd, self]
        return self

    def release(self) -> None:
        key = str(self.path.resolve())
        if self._fd is not None and key in _HELD and _HELD[key][1] is self:
            import fcntl

            del _HELD[key]

            # Truncated, not removed: removing would let a third process lock a fresh inode
            # while a second one still holds the old one.
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


# --------------------------------------------------------------------------------------------
# The finished model: not overwritten unless asked, saved atomically
# --------------------------------------------------------------------------------------------


def finished_run(output_dir: str | Path) -> dict | None:
    """The record a finished run left in ``output_dir`` (``alignkit_done.json``), or None."""
    path = Path(output_dir) / DONE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"note": f"unreadable {DONE_FILE}"}


def _model_entries(output_dir: Path) -> list[Path]:
    """The entries the last final save wrote (listed in its ``alignkit_done.json``): only those
    are ever replaced or removed, never what else a run or a user keeps in the folder."""
    done = finished_run(output_dir) or {}
    names = done.get("files") if isinstance(done.get("files"), list) else []
    return [output_dir / n for n in names if n not in _RUN_FILES and n != DONE_FILE and (output_dir / n).exists()]


def claim_output_dir(output_dir: str | Path, resume: bool, overwrite: bool, log=print) -> None:
    """Check that a run may write ``output_dir`` and prepare it. Call with the lock held.

    - An interrupted final save is finished first (:func:`recover_final_save`).
    - A folder holding a finished model is refused unless ``overwrite`` (then the old model and
      its marker are removed now, before any training) or ``resume`` (the caller then finds
      that the run is finished and says so); one holding an unfinished run's checkpoints is
      refused unless ``resume`` or ``overwrite`` (then they are removed), so two runs' steps
      never mix in one folder.
    - A path that is a file, or a folder that cannot be written, is refused.
    """
    out = Path(output_dir)
    check_output_path(out)
    out.mkdir(parents=True, exist_ok=True)
    recover_final_save(out, log)
    done = finished_run(out)
    if resume:
        return
    if done is None:
        if resumable_checkpoints(out) and not overwrite:
            raise OutputError(
                f"{out} holds checkpoints of an unfinished run; set run.resume=true to continue it, "
                "run.overwrite=true to start afresh, or choose another run.output_dir")
        if overwrite:
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        return
    if not overwrite:
        when = f" (finished {done['finished']})" if "finished" in done else ""
        raise OutputError(
            f"{out} holds a finished model{when}; choose another run.output_dir, or set run.overwrite=true "
            "to replace it")
    log(f"[alignkit] run.overwrite: removing the finished model in {out} before training")
    for p in _model_entries(out):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (out / DONE_FILE).unlink()
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)


@contextmanager
def final_save(output_dir: str | Path, record: dict | None = None) -> Iterator[Path]:
    """Write a run's final model atomically: ``with final_save(out) as tmp: save_model(..., tmp)``.

    The body writes into a temporary folder inside ``output_dir``; once it returns, the folder is
    marked complete (the commit point), its entries replace the model's entries in ``output_dir``
    (old model files the new save lacks are removed: only files an earlier final save listed,
    never the run's logs or a user's files) and ``alignkit_done.json`` (``record`` plus
    the time) is written last. A kill before the commit point leaves the old folder untouched
    plus a temporary folder discarded at the next start; a kill after it is finished at the next
    start by :func:`recover_final_save`. Run it on the main process only.
    """
    out = Path(output_dir)
    tmp = out / _FINAL_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    done = {**(record or {}), "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": sorted(p.name for p in tmp.iterdir())}
    (tmp / DONE_FILE).write_text(json.dumps(done, indent=2), encoding="utf-8")
    _fsync_tree(tmp)
    (tmp / _COMPLETE).write_text("")  # commit point
    _fsync_dir(tmp)
    _apply_final_save(out)


def recover_final_save(output_dir: str | Path, log=print) -> None:
    """Finish a final save that was killed after its commit point, or discard one killed before."""
    out = Path(output_dir)
    tmp = out / _FINAL_TMP
    if not tmp.exists():
        return
    if (tmp / _COMPLETE).exists():
        log(f"[alignkit] finishing an interrupted final save in {out}")
        _apply_final_save(out)
    else:
        log(f"[alignkit] discarding an incomplete final save in {tmp}")
        shutil.rmtree(tmp)


def _apply_final_save(out: Path) -> None:
    """Move a committed temporary save into place. Idempotent, so a second kill is safe too."""
    tmp = out / _FINAL_TMP
    new = {p.name for p in tmp.iterdir()} - {_COMPLETE, DONE_FILE}
    for p in _model_entries(out):
        if p.name not in new:  # an old model's file the new one does not have (e.g. adapter/)
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (out / DONE_FILE).unlink(missing_ok=True)  # the folder is not "finished" while files move
    for name in sorted(new):
        dst = out / name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(tmp / name, dst)
    os.replace(tmp / DONE_FILE, out / DONE_FILE)  # last: the folder is finished
    shutil.rmtree(tmp)
    _fsync_dir(out)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_finite_weights(model: torch.nn.Module, what: str = "the model") -> None:
    """Refuse to save weights that are not finite (a diverged run must never leave a NaN model)."""
    bad = [n for n, p in model.state_dict().items()
           if torch.is_tensor(p) and p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise OutputError(f"{what} has non-finite weights ({', '.join(bad[:3])}{more}); not saving it. "
                          "The run diverged: lower optim.lr, check the data's numbers, or use run.mixed_precision=no")


# --------------------------------------------------------------------------------------------
# Checkpoints: newest intact first
# --------------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def resumable_checkpoints(output_dir: str | Path) -> list[Path]:
    """Completed checkpoint folders of ``output_dir`` (those with a state file), newest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.exists():
        return []
    done = [p for p in root.glob("step-*") if p.name.split("-")[1].isdigit() and (p / STATE_FILE).exists()]
    return sorted(done, key=checkpoint_step, reverse=True)


def read_state(ckpt: Path) -> dict:
    """A checkpoint's ``trainer_state.json``, or an :class:`OutputError` naming the file."""
    path = ckpt / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise OutputError(f"{path}: cannot read the checkpoint state ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise OutputError(f"{path}: not a checkpoint state (no integer 'step' field)")
    return state


def check_checkpoint(ckpt: Path) -> None:
    """Raise :class:`OutputError` naming the first damaged file of a checkpoint folder.

    Cheap checks that catch truncation and bit rot without loading tensors: the state JSON
    parses; a safetensors file's header parses and the file is as long as its header says; a
    torch file saved in the zip format passes the zip's CRC check.
    """
    read_state(ckpt)
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                _check_safetensors(path)
            elif zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
                if bad is not None:
                    raise OutputError(f"{path}: damaged entry {bad}")
            elif path.suffix in (".bin", ".pt", ".pkl", ".pth"):
                raise OutputError(f"{path}: not a complete torch file (truncated or damaged)")
        except OutputError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, struct.error) as e:
            raise OutputError(f"{path}: damaged ({e})") from None


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise OutputError(f"{path}: truncated (shorter than a safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise OutputError(f"{path}: truncated (header of {n} bytes in a file of {size})")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise OutputError(f"{path}: truncated or damaged ({size} bytes, the header describes {8 + n + end})")


def intact_checkpoints(output_dir: str | Path, log=print) -> Iterator[tuple[Path, dict]]:
    """Yield ``(checkpoint, state)`` from newest to oldest, skipping damaged ones with a message.

    A generator so the caller can also fall back when loading an intact-looking checkpoint fails.
    """
    for ckpt in resumable_checkpoints(output_dir):
        try:
            check_checkpoint(ckpt)
        except OutputError as e:
            log(f"[alignkit] resume: skipping damaged checkpoint {ckpt.name}: {e}")
            continue
        yield ckpt, read_state(ckpt)


# --------------------------------------------------------------------------------------------
# What shapes the result: the fingerprint a resume must match
# --------------------------------------------------------------------------------------------

# Settings that change where and how a run reports, not what it computes.
NOT_SHAPING = frozenset({
    "run.output_dir", "run.resume", "run.resume_changed", "run.overwrite", "run.progress", "run.log_every",
    "run.report_to", "run.save_every", "run.keep_checkpoints", "run.eval_every",
})


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            out.update(_flatten(getattr(obj, f.name), f"{prefix}{f.name}."))
        return out
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    if isinstance(obj, (list, tuple)):
        return {prefix[:-1]: [o if isinstance(o, (str, int, float, bool, type(None))) else repr(o) for o in obj]}
    return {prefix[:-1]: obj if isinstance(obj, (str, int, float, bool, type(None))) else repr(obj)}


def data_digest(items: Any) -> str:
    """A sha256 over the training items (token ids, labels, weights, in order): what the run reads."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if torch.is_tensor(x):
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                h.update(str(k).encode() + b":")
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            feed({f.name: getattr(x, f.name) for f in dataclasses.fields(x)})
        else:
            h.update(repr(x).encode())

    feed(items)
    return h.hexdigest()


def run_fingerprint(config: Any, data: Any = None, **extra: Any) -> dict[str, Any]:
    """What shapes a run's result: every configuration field except :data:`NOT_SHAPING`, a digest
    of its training data (``data``: the prepared items, or anything else that identifies them)
    and ``extra`` facts (e.g. the number of processes)."""
    fp = {k: v for k, v in _flatten(config).items() if k not in NOT_SHAPING} if config is not None else {}
    if data is not None:
        fp["data"] = data_digest(data)
    fp.update(extra)
    return fp


def compare_fingerprints(saved: dict | None, now: dict) -> list[str]:
    """The differences between a checkpoint's fingerprint and this run's, as ``key: old → new``."""
    if saved is None:
        return []
    diffs = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if a != b:
            if k == "data":
                a, b = f"digest {str(a)[:12]}", f"digest {str(b)[:12]}"
            diffs.append(f"{k}: {a!r} → {b!r}")
    return diffs


def check_resume_settings(ckpt: Path, saved: dict | None, now: dict, allow: bool, log=print) -> None:
    """Stop a resume whose settings differ from the checkpoint's, listing every difference,
    unless ``allow`` (``run.resume_changed``), which logs them and goes on."""
    diffs = compare_fingerprints(saved, now)
    if not diffs:
        return
    listing = "\n  ".join(diffs)
    if allow:
        log(f"[alignkit] resume: run.resume_changed=true, continuing {ckpt} with changed settings:\n  {listing}")
        return
    raise OutputError(
        f"resume: this run's settings differ from those that wrote {ckpt}:\n  {listing}\n"
        "Resume with the same settings, choose another run.output_dir to start afresh, or set "
        "run.resume_changed=true to continue with the new settings anyway.")
