"""Fuzzing the inputs users type: config overrides and data lines give success or a clean error."""

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuner.config import all_keys, load_config
from tuner.data.prepare import prepare
from tuner.errors import UserError

KEYS = sorted(all_keys())
VALUES = st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["none", "true", "false", "1e-3", "-1", "0", "auto", "fp16", "430M"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=15)), VALUES), max_size=4))
def test_overrides_either_load_or_fail_cleanly(pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        load_config(overrides=overrides)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)


LINE = st.one_of(
    st.tuples(st.integers(0, 50), st.integers(0, 50)).map(lambda t: f"{t[0]} {t[1]}"),
    st.text(alphabet=string.printable, max_size=30),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(LINE, max_size=12), st.sampled_from(["seq.txt", "ratings.csv", "ratings.dat", "r.json"]))
def test_data_files_prepare_or_fail_cleanly(tmp_path, lines, name):
    src = tmp_path / name
    src.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape"))
    out = tmp_path / "out"
    try:
        meta = prepare(str(src), str(out))["meta"]
        assert meta["num_interactions"] >= 1 and (out / "meta.json").is_file()
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)
        assert not out.exists() or (out / "meta.json").is_file()  # never half an output
