"""Shared by the GPU micro-benchmarks: the checks and header of a report, CUDA-event timing and
CUDA-graph timing, how far a kernel's output is from its reference, and a failure in one line."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterable

import torch


def start_report(script: str, sizes: Iterable[str], known: Iterable[str]) -> tuple[torch.device, dict]:
    """(the CUDA device, the report header) or a one-line exit: no CUDA device, or an unknown size."""
    known = list(known)
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA device")
    unknown = [s for s in sizes if s not in known]
    if unknown:
        sys.exit(f"{script}: --sizes takes {', '.join(known)}, not {', '.join(unknown)}")
    device = torch.device("cuda")
    return device, {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                    "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:])}


def median_ms(fn, repeats: int, warmup: int = 5) -> float:
    """Median milliseconds of fn() by CUDA events, each call timed alone, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, calls: int = 10) -> float:
    """GPU milliseconds per fn() as the training step runs it: `calls` calls captured in one CUDA
    graph and replayed, so host launch costs (which dominate one layer's attention) drop out."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_ms(graph.replay, repeats=30) / calls


def differs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, relative to the largest magnitude of `b`."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def one_line(exc: BaseException) -> str:
    """A failure as a report row holds it: its type and the first 200 characters of its first line."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
