"""`tuner.tune.relay`: a trial's Train results reach Tune in order, its closing result after them,
and the trial ends, even when the Tune driver is slow with each result (where Ray's
`TuneReportCallback` hangs the trial: `python tests/relay_check.py ray 4 DIR`). Real local Ray."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tune_helpers import kill_session

CHECK = Path(__file__).resolve().parent / "relay_check.py"


def relay_check(tmp_path, delay_s: str, *flags: str, timeout: float = 240) -> dict:
    proc = subprocess.Popen([sys.executable, str(CHECK), "ours", delay_s, str(tmp_path), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        pytest.fail(f"the trial did not end within {timeout:.0f} s (the relay hung)")
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_result_then_the_closing_one_arrive_when_the_driver_is_slow(tmp_path):
    out = relay_check(tmp_path, "4")  # 4 s per result: fit() returns long before the driver catches up
    results = out["results"]
    assert [r["epoch"] for r in results] == [1, 2, 3, None] and results[-1]["closing"] == 1, results
    paths = [r["checkpoint_path"] for r in results]
    assert paths[0] is None and paths[2] is None and paths[3] is None
    assert (Path(paths[1]) / "state.txt").read_text() == "2"  # the epoch's checkpoint, as Train persisted it
    assert out["errors"] == []


@pytest.mark.slow
def test_a_failed_fit_fails_the_trial_with_its_error(tmp_path):
    out = relay_check(tmp_path, "0", "--fail")
    assert [r["epoch"] for r in out["results"]] == [1]  # no closing result after a failure
    assert len(out["errors"]) == 1 and "epoch 2 failed on purpose" in out["errors"][0], out["errors"]
