"""Does SDPA's dropout rate have to be a constant of a compiled graph? (issue 5, the SDPA fallback)

Where attention falls back to `F.scaled_dot_product_attention` (V100s, fp32, sequences over 512,
`model.attention=efficient|cudnn|math`), the model passes the attention-dropout rate as SDPA's
`dropout_p`, and torch.compile builds one graph per rate: trials of a search over
`model.attn_dropout` do not share the compiled step. This compiles SDPA with dropout for three
rates in the ways the rate could reach it and counts the graphs Dynamo built (`unique_graphs`), or
records the error that stopped it:

- `constant`: the rate as a module attribute, as the model passes it;
- `float_input`: the rate as a float argument of the compiled function, under
  `torch._dynamo.config.specialize_float = False` (unspecialised floats);
- `tensor_item`: the rate read from a 0-d tensor with `.item()`, under
  `capture_scalar_outputs = True` (a data-dependent float), as `tuner.model.rate_dropout` keeps it.

Runs on the CPU (the check is about tracing, not kernels). Writes a JSON report (`--out`).

    python benchmarks/sdpa_rate_graphs.py --out benchmarks/results/sdpa_rate_graphs_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_report import one_line

RATES = (0.1, 0.2, 0.3)


def graphs(way: str) -> dict:
    """Compile SDPA with dropout for each of RATES passed `way`: {"unique_graphs": n} or {"error": ...}."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    q = torch.randn(2, 2, 8, 4, requires_grad=True)

    class Attend(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = RATES[0]

        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x, dropout_p=self.p)

    def with_input(x, p):
        return F.scaled_dot_product_attention(x, x, x, dropout_p=p)

    def with_item(x, rate):
        return F.scaled_dot_product_attention(x, x, x, dropout_p=rate.item())

    settings = {"float_input": {"specialize_float": False}, "tensor_item": {"capture_scalar_outputs": True}}
    try:
        with dynamo_config.patch(settings.get(way, {})):
            module = Attend()
            fn = {"constant": torch.compile(module, fullgraph=True),
                  "float_input": torch.compile(with_input, fullgraph=True),
                  "tensor_item": torch.compile(with_item, fullgraph=True)}[way]
            for rate in RATES:
                module.p = rate
                args = {"constant": (q,), "float_input": (q, rate), "tensor_item": (q, torch.tensor(rate))}[way]
                fn(*args).sum().backward()
    except Exception as exc:  # noqa: BLE001 - the error is the finding
        return {"error": one_line(exc)}
    return {"unique_graphs": counters["stats"]["unique_graphs"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    report = {"device": "cpu", "torch": torch.__version__, "rates": list(RATES),
              "command": "python benchmarks/sdpa_rate_graphs.py " + " ".join(sys.argv[1:]),
              "ways": {way: graphs(way) for way in ("constant", "float_input", "tensor_item")}}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["ways"]))


if __name__ == "__main__":
    main()
