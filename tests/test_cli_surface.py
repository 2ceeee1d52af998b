"""The CLI's surface is pinned: a new flag is a deliberate change to this list (torchtitan does this)."""

import argparse

from tuner.cli import build_parser

EXPECTED = {
    "prepare": {"--input", "--output", "--format", "--min-user-interactions", "--min-item-interactions", "--json"},
    "train": {"--size", "--data", "--synthetic-users", "--synthetic-items", "--config", "--set", "--max-epochs",
              "--json", "--ilora", "--init-from", "--max-steps", "--batch-size", "--device", "--checkpoint-dir",
              "--workers", "--run-name", "--storage", "--refit"},
    "tune": {"--size", "--data", "--synthetic-users", "--synthetic-items", "--config", "--set", "--max-epochs",
             "--json", "--ilora", "--init-from", "--search-space", "--num-samples", "--search", "--scheduler",
             "--time-budget", "--experiment", "--storage", "--tracking-uri", "--resume", "--dry-run", "--cluster",
             "--refit"},
    "bench": {"--size", "--num-items", "--hidden", "--batch-size", "--seq-len", "--steps", "--warmup", "--loss",
              "--amp", "--no-amp", "--compile", "--no-compile", "--compile-mode", "--device", "--untied-head",
              "--static-shapes", "--ilora", "--set", "--seed", "--json"},
    "recommend": {"--model", "--tracking-uri", "--history", "--input", "--k", "--include-history", "--json"},
    "report": {"--experiment", "--tracking-uri", "--output", "--json"},
}


def test_cli_flags_are_pinned():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(EXPECTED)
    for name, command in sub.choices.items():
        flags = {opt for action in command._actions for opt in action.option_strings} - {"-h", "--help"}
        assert flags == EXPECTED[name], name
