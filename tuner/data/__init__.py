"""Data: preparation of raw files, the in-memory layout and split, synthetic data, batching."""
