"""Tuning: search spaces, the Ray Tune experiment (Optuna/random + ASHA), resources per trial."""
