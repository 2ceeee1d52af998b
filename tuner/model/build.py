"""Build the model a config describes: architecture, pretrained weights, iLoRA adapters.

One place for what the loop, `tuner bench` and serving build, so a size never needs its own
code. `init_from` reads a checkpoint (directory or state.pt) or an MLflow model URI
(`models:/bert4rec-130M/3`, `runs:/<id>/model`): the registered best model of `tuner tune` is
the natural start for fine-tuning.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from tuner.config import Config
from tuner.errors import UserError
from tuner.model.bert4rec import Bert4Rec, Bert4RecConfig

_ARCH = ("hidden", "layers", "heads", "ffn", "max_len", "tied_head")


def fused_add_norm(cfg: Config) -> bool:
    """`model.fused_add_norm`: auto is on where the compiled step replays CUDA graphs (a graph
    compile mode, or `train.step_graph=on`)."""
    setting = cfg.model.fused_add_norm
    if setting == "auto":
        return cfg.train.compile != "off" and cfg.train.replays_graphs
    return setting == "on"


def model_config(cfg: Config, num_items: int) -> Bert4RecConfig:
    m = cfg.model
    return Bert4RecConfig(num_items=num_items, max_len=m.max_len, hidden=m.hidden, layers=m.layers,
                          heads=m.heads, ffn=m.ffn, dropout=m.dropout, attn_dropout=m.attn_dropout,
                          tied_head=m.tied_head, fused_qkv=m.fused_qkv,
                          attention=m.attention, residual=m.residual,
                          fused_add_norm=fused_add_norm(cfg), prune_last_layer=m.prune_last_layer)


def build_model(cfg: Config, num_items: int, pretrained: bool = True) -> Bert4Rec:
    """The model of `cfg`; with `pretrained`, `train.init_from`'s weights loaded before adapters."""
    model = Bert4Rec(model_config(cfg, num_items))
    if pretrained and cfg.train.init_from:
        load_pretrained(model, cfg.train.init_from, cfg.tracking.tracking_uri)
    if cfg.ilora.enabled:
        from tuner.model.ilora import IloraSpec, apply_ilora

        i = cfg.ilora
        apply_ilora(model, IloraSpec(rank=i.rank, experts=i.experts, alpha=i.alpha, dropout=i.dropout,
                                     router=i.router))
    return model


def load_pretrained(model: Bert4Rec, source: str, tracking_uri: Optional[str] = None) -> None:
    """Copy a trained model's best weights into `model` (same architecture and catalog)."""
    from tuner.train.checkpoint import load_checkpoint

    if Path(source).exists():
        state = load_checkpoint(source)
    elif ":/" in source:
        with tempfile.TemporaryDirectory() as tmp:
            state = load_checkpoint(_download(source, tracking_uri, tmp))
    else:
        raise UserError(f"train.init_from={source}: no such checkpoint or MLflow model URI")
    saved = state.get("config", {}).get("model", {})
    ours = {k: getattr(model.cfg, k) for k in _ARCH}
    theirs = {k: saved.get(k) for k in _ARCH}
    if theirs != ours or state.get("num_items") != model.cfg.num_items:
        raise UserError(f"train.init_from={source}: trained as {theirs} on {state.get('num_items')} items, "
                        f"this run is {ours} on {model.cfg.num_items} items")
    weights = state.get("best_model") or state["model"]
    if any("lora_" in k or k.startswith("router.") for k in weights):
        raise UserError(f"train.init_from={source}: an iLoRA model; start from its base model instead")
    model.load_state_dict(weights)


def _download(uri: str, tracking_uri: Optional[str], dst: str) -> Path:
    import logging

    import mlflow

    from tuner.tracking import resolve_tracking_uri

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no store-creation chatter on stderr
    if tracking_uri:
        mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
    except Exception as exc:  # MLflow raises many types for a missing model or an unreachable store
        raise UserError(f"train.init_from={uri}: cannot fetch it ({str(exc).splitlines()[0][:200]})") from None
    found = sorted(local.rglob("model.pt")) + sorted(local.rglob("state.pt"))
    if not found:
        raise UserError(f"train.init_from={uri}: no tuner checkpoint inside this MLflow model")
    return found[0]
