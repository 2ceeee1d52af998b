"""Model sizes by name: one table, no per-size copies of the model.

The 5M/85M/130M/430M names are parameter counts with the untied head at the catalog they were
named for (5M: ML-20M's ~18k items; the others: the seed's Amazon Electronics catalog of
159,750 items). The count for the catalog at hand is reported by `count_parameters`.
"""

SIZES: dict[str, dict[str, int]] = {
    # tests: trains in seconds on a CPU
    "tiny": dict(hidden=32, layers=2, heads=2, max_len=32),
    # Sun et al. (CIKM 2019), the paper's configuration
    "bert4rec": dict(hidden=64, layers=2, heads=2, max_len=200),
    "5M": dict(hidden=128, layers=2, heads=4, max_len=50),
    "85M": dict(hidden=256, layers=4, heads=4, max_len=50),
    "130M": dict(hidden=384, layers=4, heads=6, max_len=50),
    "430M": dict(hidden=1024, layers=8, heads=16, max_len=50),
}
