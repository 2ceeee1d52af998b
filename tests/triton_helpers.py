"""Run a check script of the Triton kernels under Triton's interpreter, in a process of its own:
TRITON_INTERPRET must be set before the kernels are defined, so it cannot share pytest's."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def interpreted(script: str) -> dict:
    """The JSON object that tests/`script` prints last, run with TRITON_INTERPRET=1 on the CPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / script)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
