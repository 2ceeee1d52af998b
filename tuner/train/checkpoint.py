"""Checkpoints: one `state.pt` per checkpoint directory, written atomically, loaded safely.

A checkpoint holds everything a resumed run needs to continue exactly: model, optimizer,
scheduler and GradScaler states, RNG states, epoch, step, early-stopping state, the best model's
weights so far (None in an epoch that set the best without a weight average: they are the model's
own, written once), and the config it was trained with. It is written to a temporary file and
renamed, so an interrupted write leaves the previous checkpoint intact; it loads with
`weights_only=True`, so a checkpoint file can never execute code.

Under Ray Train, and in one process with `train.checkpoint_writer=background` (auto's choice on a
GPU), the write runs off the training thread: `Snapshots.take` copies the state into CPU buffers
(pinned for a GPU, kept from one checkpoint to the next) with one synchronisation, and training
goes on while Ray's upload thread or a `BackgroundWriter` writes the copy (`Snapshot.write`). In
line (one process, auto's choice on a CPU) the loop calls `save_checkpoint` itself. The buffers
are reused only once the previous write has released them, so a write slower than an epoch holds the
next checkpoint back instead of piling copies up (for at most `wait_s`: a write that never ends
keeps its buffers and the next snapshot takes new ones).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from tuner.errors import UserError

STATE_FILE = "state.pt"
PREVIOUS_FILE = "state.prev.pt"  # the checkpoint before the latest, kept for a corrupted latest
FORMAT = "tuner-bert4rec-checkpoint-v1"


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    directory = Path(directory)
    target = directory / STATE_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise UserError(f"{directory}: cannot write a checkpoint ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as exc:  # a full disk: torch.save reports it as a RuntimeError
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:200]
        raise UserError(f"{directory}: cannot write a checkpoint ({reason}); "
                        f"the previous checkpoint is intact") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if target.exists():
        os.replace(target, directory / PREVIOUS_FILE)
    os.replace(tmp, target)
    return target


class Snapshot:
    """A checkpoint's state copied off the live model: safe to write while training goes on."""

    def __init__(self, state: dict[str, Any], release: Callable[[], None] = lambda: None):
        self.state = state
        self._release: Optional[Callable[[], None]] = release
        self.write_s: Optional[float] = None  # how long `write` took, once it ended

    def write(self, directory: str | Path) -> Path:
        """`save_checkpoint` of the copy; the buffers are free for the next snapshot afterwards,
        whether the write succeeded or not."""
        t0 = time.perf_counter()
        try:
            return save_checkpoint(directory, self.state)
        finally:
            self.write_s = time.perf_counter() - t0
            self.release()

    @property
    def released(self) -> bool:
        """Whether the buffers are free again: the write ended (or the snapshot was let go)."""
        return self._release is None

    def release(self) -> None:
        if self._release is not None:
            self._release, release = None, self._release
            release()


class Snapshots:
    """Takes snapshots of a training state into CPU buffers reused from one checkpoint to the next."""

    def __init__(self, pin_memory: bool = False, wait_s: float = 600.0):
        self.pin_memory, self.wait_s = pin_memory, wait_s
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._free = threading.Event()
        self._free.set()

    def take(self, state: dict[str, Any], as_is: Sequence[str] = ()) -> Snapshot:
        """Copy every tensor of `state` (nested dicts, lists, tuples); other values are immutable
        scalars and strings, kept as they are, and so are the entries named in `as_is` (the caller
        replaces them rather than changing them in place). Waits for the previous snapshot's write."""
        if not self._free.wait(self.wait_s):
            # a write still running (or one that never started): leave it its buffers, take new ones
            print(f"tuner: warning: the previous checkpoint is still not written after {self.wait_s:.0f} s; "
                  f"copying this one into new buffers", file=sys.stderr)
            self._buffers, self._free = {}, threading.Event()
        self._free.clear()
        try:
            copied = {k: v if k in as_is else self._copy(v, (k,)) for k, v in state.items()}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        except BaseException:
            self._free.set()
            raise
        return Snapshot(copied, release=self._free.set)

    def _copy(self, value: Any, path: tuple) -> Any:
        if isinstance(value, torch.Tensor):
            buffer = self._buffers.get(path)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = torch.empty(value.shape, dtype=value.dtype,
                                     pin_memory=self.pin_memory and value.device.type == "cuda")
                self._buffers[path] = buffer
            return buffer.copy_(value.detach(), non_blocking=value.device.type == "cuda")
        if isinstance(value, dict):
            return {k: self._copy(v, path + (k,)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(v, path + (i,)) for i, v in enumerate(value))
        return value


class BackgroundWriter:
    """Writes snapshots into one directory on a thread of its own, one at a time, while training goes
    on: what Ray Train's upload thread does for a Train run, for the one-process loop
    (`train.checkpoint_writer=background`). A write that failed is raised by the next `submit` or
    `wait`, in the training thread. The thread is not a daemon, so a write under way when
    training stops (an error, Ctrl-C) still ends before the process does: the atomic rename
    leaves either the new checkpoint or the previous one."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, snapshot: Snapshot) -> None:
        """Waits for the write under way (raising its error), then writes `snapshot` on a new thread."""
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(snapshot,), name="tuner-checkpoint-writer")
        self._thread.start()

    def _write(self, snapshot: Snapshot) -> None:
        try:
            snapshot.write(self.directory)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = exc

    def join_quietly(self) -> None:
        """Blocks until the write under way ends, keeping any error for `wait` (for a run that is
        already ending with an error of its own)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> None:
        """Blocks until the write under way ends; raises its error if it failed."""
        self.join_quietly()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def has_checkpoint(directory: str | Path | None) -> bool:
    return directory is not None and (Path(directory) / STATE_FILE).is_file()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint directory or `state.pt`; anything that is not ours is a UserError."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no checkpoint found")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise UserError(f"{file}: not a readable checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{file}: not a tuner BERT4Rec checkpoint")
    return state


def load_resume_state(directory: str | Path, older: Sequence[str | Path] = ()) -> dict[str, Any]:
    """The newest readable checkpoint: `state.pt` in `directory`, else the one written before it
    there, else `state.pt` of each `older` directory in turn (Ray Train's earlier checkpoints).

    An interrupted or corrupted latest checkpoint costs an epoch, never a crash loop.
    """
    directory = Path(directory)
    try:
        return load_checkpoint(directory / STATE_FILE)
    except UserError as latest:
        fallbacks = [(directory / PREVIOUS_FILE, "the previous checkpoint")] if \
            (directory / PREVIOUS_FILE).is_file() else []
        fallbacks += [(Path(d) / STATE_FILE, f"the older checkpoint {Path(d).name}") for d in older]
        for file, what in fallbacks:
            try:
                state = load_checkpoint(file)
            except UserError:
                continue
            print(f"tuner: warning: {latest}; resuming from {what}", file=sys.stderr)
            return state
        raise
