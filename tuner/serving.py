"""Recommendations from a trained model: top-K in-process, as an MLflow pyfunc, over HTTP.

`recommend()` encodes histories (with the mask token appended, as in evaluation), scores the
catalog and returns the top-K items, skipping items already in the history by default.
`Bert4RecRecommender` wraps it as an MLflow pyfunc whose artifacts are the checkpoint and the
item-id mapping from `tuner prepare`, so `predict` takes raw ids as in the input data and
returns raw ids: a DataFrame column `history` (raw ids as one space-separated string) in,
columns `items`, `scores` and `unknown` (ids the model has never seen, ignored) out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from tuner.model.bert4rec import Bert4Rec, last_rows


@torch.no_grad()
def recommend(model: Bert4Rec, histories: Sequence[Sequence[int]], k: int = 10, exclude_history: bool = True,
              batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Top-k internal item ids (1..V) and scores per history of internal ids."""
    model.eval()
    cfg = model.cfg
    device = next(model.parameters()).device
    weight, bias = model.output_embedding()
    k = min(k, cfg.num_items)
    all_ids, all_scores = [], []
    for start in range(0, len(histories), batch_size):
        chunk = histories[start:start + batch_size]
        width = cfg.max_len - 1
        ids = np.zeros((len(chunk), cfg.max_len), dtype=np.int64)
        for row, history in enumerate(chunk):
            tail = list(history)[-width:]
            if tail:
                ids[row, width - len(tail):width] = tail
        ids[:, -1] = cfg.mask_token
        ids = torch.from_numpy(ids).to(device)
        hidden = model(ids, rows=last_rows(ids)).float()
        scores = hidden @ weight.float().t() + bias.float()
        if exclude_history:
            for row, history in enumerate(chunk):
                seen = [i - 1 for i in history if 1 <= i <= cfg.num_items]
                if seen:
                    scores[row, seen] = -torch.inf
        top = scores.topk(k, dim=1)
        all_ids.append(top.indices.cpu().numpy() + 1)
        all_scores.append(top.values.cpu().numpy())
    if not all_ids:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
    return np.concatenate(all_ids), np.concatenate(all_scores)


def load_model(checkpoint_path: str | Path) -> Bert4Rec:
    """The best weights of a checkpoint directory or state.pt."""
    from tuner.config import Config
    from tuner.model.build import build_model
    from tuner.train.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint_path)
    cfg = Config.from_dict(state["config"])
    model = build_model(cfg, state["num_items"], pretrained=False)
    model.load_state_dict(state["best_model"] or state["model"])
    return model.eval()


def parse_history(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.replace(",", " ").split()
    return [str(v) for v in value]


try:
    import mlflow.pyfunc

    _PythonModel = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency
    _PythonModel = object


class Bert4RecRecommender(_PythonModel):
    """MLflow pyfunc: raw-id histories in, raw-id top-K out."""

    def __init__(self, k: int = 10, exclude_history: bool = True):
        self.k, self.exclude_history = k, exclude_history

    def load_context(self, context) -> None:
        import pyarrow.parquet as pq

        self.model = load_model(context.artifacts["checkpoint"])
        raw = pq.read_table(context.artifacts["items"]).column("raw_id").to_pylist()
        self.raw_ids = np.array(raw, dtype=object)  # internal id i -> raw_ids[i - 1]
        self.index = {raw_id: i + 1 for i, raw_id in enumerate(raw)}

    def predict(self, context, model_input, params: Optional[dict] = None):
        import pandas as pd

        params = params or {}
        k = int(params.get("k", self.k))
        exclude = bool(params.get("exclude_history", self.exclude_history))
        if "history" not in model_input.columns:
            raise ValueError("input needs a `history` column (a list of item ids or a space-separated string)")
        histories, unknown = [], []
        for value in model_input["history"]:
            raw = parse_history(value)
            histories.append([self.index[r] for r in raw if r in self.index])
            unknown.append([r for r in raw if r not in self.index])
        ids, scores = recommend(self.model, histories, k=k, exclude_history=exclude)
        return pd.DataFrame({"items": [list(self.raw_ids[row - 1]) for row in ids],
                             "scores": [[float(s) for s in row] for row in scores], "unknown": unknown})


def write_item_map(dataset, path: Path) -> Path:
    """items.parquet (internal id -> raw id) for any dataset, synthetic ones included."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = dataset.item_raw_ids if getattr(dataset, "item_raw_ids", None) is not None else \
        [str(i) for i in range(1, dataset.num_items + 1)]
    pq.write_table(pa.table({"item": pa.array(np.arange(1, dataset.num_items + 1, dtype=np.int32)),
                             "raw_id": pa.array([str(r) for r in raw])}), path)
    return path


def log_recommender(checkpoint_path: str, items_path: str, registered_name: Optional[str]):
    """Log the pyfunc (with the tuner package as code) on the active MLflow run; returns ModelInfo."""
    import tempfile

    import mlflow.pyfunc

    import tuner
    from tuner.train.checkpoint import FORMAT, load_checkpoint

    state = load_checkpoint(checkpoint_path)
    package_dir = str(Path(tuner.__file__).resolve().parent)
    with tempfile.TemporaryDirectory() as tmp:
        compact = Path(tmp) / "model.pt"  # best weights, config and catalog size: no optimizer state
        torch.save({"format": FORMAT, "model": state["best_model"] or state["model"], "best_model": None,
                    "config": state["config"], "num_items": state["num_items"]}, compact)
        from mlflow.models import ModelSignature
        from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

        signature = ModelSignature(inputs=Schema([ColSpec("string", "history")]),
                                   params=ParamSchema([ParamSpec("k", "long", 10),
                                                       ParamSpec("exclude_history", "boolean", True)]))
        return mlflow.pyfunc.log_model(
            name="model", python_model=Bert4RecRecommender(), signature=signature,
            artifacts={"checkpoint": str(compact), "items": str(items_path)},
            code_paths=[package_dir], registered_model_name=registered_name,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas", "pyarrow", "pyyaml"])
