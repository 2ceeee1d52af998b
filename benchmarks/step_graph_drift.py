"""How far a captured step's training drifts from the uncaptured step's, against two uncaptured runs.

Trains tests/test_step_graph.py's tiny model for 10 steps three times on CUDA (the learning rate
moving at every step, clipping acting): without the step graph twice, with it once. Prints, per
weight, the distance between the two uncaptured runs and between the captured run and the first
uncaptured one, each as a share of how far the first run moved that weight. fp32 weights (torch's
fused AdamW) first, then bf16 weights (MasterWeightAdamW). Usage: python benchmarks/step_graph_drift.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_step_graph import _setup, _weights  # noqa: E402

for weights in ("fp32", "bf16"):
    factors = [0.25, 0.5, 1.0, 0.5, 1.5, 0.25, 2.0, 1.0, 0.125, 1.0]
    runs = []
    for graph in (False, False, True):
        model, _, _, step, batches = _setup(graph, weights, grad_clip=0.05, factors=factors)
        start = _weights(model)
        for b in batches:
            step(b)
        runs.append(_weights(model))
    worst = {}
    for name in start:
        moved = (runs[0][name] - start[name]).norm().item()
        worst[name] = ((runs[1][name] - runs[0][name]).norm().item() / moved,
                       (runs[2][name] - runs[0][name]).norm().item() / moved)
    print(weights, "plain-vs-plain max", max(v[0] for v in worst.values()),
          "graph-vs-plain max", max(v[1] for v in worst.values()))
    for n, v in worst.items():
        print(" ", n, "%.2e %.2e" % v)
