"""The start of a GPU benchmark's report: the checks every such script makes, and its header."""

from __future__ import annotations

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
