"""Using the tuned model: the registered pyfunc, `tuner recommend`, and `mlflow models serve`."""

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import ROOT
from tests.test_service import free_port, stop, wait_http
from tuner.config import load_config
from tuner.data.synthetic import generate
from tuner.serving import load_model, recommend, write_item_map
from tuner.train.loop import train_worker
from tuner.train.parallel import local_context
from tuner.train.reporting import ConsoleReporter


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Train tiny briefly, register it as `bert4rec-tiny` in a sqlite store."""
    import mlflow

    from tuner.serving import log_recommender

    tmp = tmp_path_factory.mktemp("serving")
    cfg = load_config(overrides=["data.synthetic_users=600", "data.synthetic_items=120", "train.max_epochs=3",
                                 "model.max_len=16", f"train.checkpoint_dir={tmp / 'ckpt'}"])
    train_worker(cfg, local_context(cfg.train), ConsoleReporter(enabled=False))
    dataset = generate(600, 120, seed=0)
    dataset.item_raw_ids = [f"i{i}" for i in range(1, 121)]  # raw ids differ from internal ones
    items = write_item_map(dataset, tmp / "items.parquet")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serving")
    with mlflow.start_run():
        info = log_recommender(str(tmp / "ckpt"), str(items), "bert4rec-tiny")
    return {"uri": uri, "ckpt": tmp / "ckpt", "model_uri": "models:/bert4rec-tiny/1", "info": info}


def _expected(ckpt, histories, k=5):
    model = load_model(ckpt)
    ids, _ = recommend(model, [[int(x[1:]) for x in h] for h in histories], k=k)
    return [[f"i{i}" for i in row] for row in ids]


def test_registered_pyfunc_gives_the_in_process_top_k(registered):
    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model(registered["model_uri"])
    histories = [["i3", "i7", "i12"], ["i50", "i51"]]
    out = model.predict(pd.DataFrame({"history": [" ".join(histories[0]), " ".join(histories[1] + ["nope"])]}),
                        params={"k": 5})
    assert [list(r) for r in out["items"]] == _expected(registered["ckpt"], histories)
    assert list(out["unknown"][1]) == ["nope"] and list(out["unknown"][0]) == []
    assert all(i not in histories[0] for i in out["items"][0])  # history excluded by default
    assert all(a >= b for a, b in zip(out["scores"][0], out["scores"][0][1:]))


def test_recommend_cli_single_and_batch(registered, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tuner", "recommend", "--model", registered["model_uri"],
                           "--tracking-uri", registered["uri"], "--history", "i3 i7 i12 zz", "--k", "5", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["recommendations"][0]["items"] == _expected(registered["ckpt"], [["i3", "i7", "i12"]])[0]
    assert result["recommendations"][0]["unknown"] == ["zz"]
    batch = tmp_path / "histories.csv"
    batch.write_text('history\n"i1 i2"\n"unknown-only"\n"i5"\n')
    proc = subprocess.run([sys.executable, "-m", "tuner", "recommend", "--model", registered["model_uri"],
                           "--tracking-uri", registered["uri"], "--input", str(batch), "--k", "3"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 3  # the unknown-only row did not break the batch
    assert "unknown item ids ignored: unknown-only" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "tuner", "recommend", "--model", "models:/nope/1",
                          "--tracking-uri", registered["uri"], "--history", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("tuner: error: model models:/nope/1")


@pytest.mark.slow
def test_mlflow_models_serve_answers_over_http(registered, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", registered["model_uri"],
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, proc, log)
        body = json.dumps({"dataframe_split": {"columns": ["history"], "data": [["i3 i7 i12"], ["i50 i51"]]},
                           "params": {"k": 5}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
        got = [row["items"] for row in predictions]
        assert got == _expected(registered["ckpt"], [["i3", "i7", "i12"], ["i50", "i51"]])
    finally:
        stop(proc)
