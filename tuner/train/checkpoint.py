"""Checkpoints: one `state.pt` per checkpoint directory, written atomically, loaded safely.

A checkpoint holds everything a resumed run needs to continue exactly: model, optimizer,
scheduler and GradScaler states, RNG states, epoch, step, early-stopping state, the best model's
weights so far, and the config it was trained with. It is written to a temporary file and
renamed, so an interrupted write leaves the previous checkpoint intact; it loads with
`weights_only=True`, so a checkpoint file can never execute code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from tuner.errors import UserError

STATE_FILE = "state.pt"
PREVIOUS_FILE = "state.prev.pt"  # the checkpoint before the latest, kept for a corrupted latest
FORMAT = "tuner-bert4rec-checkpoint-v1"


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / STATE_FILE
    try:
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
    import sys

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
