"""One epoch under the PyTorch profiler: where its wall time goes (`train.profile_epoch`).

The summary answers the first question about a slow epoch: was the device busy, or waiting for
the host? Its header gives the epoch's wall time, the time the device spent in kernels and
copies, and their ratio; the table below lists the operators by self time on the device (by
self time on the CPU when there is no GPU).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import torch

from tuner.errors import UserError


def _write(out: str | Path, text: str, mode: str) -> None:
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, mode) as f:
            f.write(text)
    except OSError as exc:
        raise UserError(f"{out}: cannot write the profile ({exc.strerror or exc})") from None


def check_writable(out: str | Path) -> None:
    """Fail before training rather than after the profiled epoch (appending nothing: a profile
    already there stays until the new one replaces it)."""
    _write(out, "", "a")


@contextlib.contextmanager
def profiled(out: str | Path, label: str, device: torch.device, rows: int = 30) -> Iterator[None]:
    """Profile the body; write the summary to `out` (a clear error if it cannot be written)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        yield
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0  # not the profiler's own stop and collection
    events = prof.key_averages()
    # the device's own events (kernels, copies), as the table's "Self CUDA time total" counts them:
    # the CPU ops that launched them carry the same time again, and user annotations too
    busy = sum(e.self_device_time_total for e in events
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6
    cpu = sum(e.self_cpu_time_total for e in events) / 1e6
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    text = (f"# {label}\n# wall_s {wall:.4f}  device_busy_s {busy:.4f}  device_busy_share {busy / wall:.3f}  "
            f"cpu_op_s {cpu:.4f}\n" + events.table(sort_by=sort, row_limit=rows) + "\n")
    _write(out, text, "w")
