"""`tuner prepare`: every input format, chronological order, k-core, id remap, atomic output."""

import gzip
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import ML1M
from tuner.data.dataset import load_prepared
from tuner.data.prepare import kcore, prepare
from tuner.errors import UserError

# three users; u2's items arrive out of time order; u1 and u3 have a timestamp tie
ROWS = [  # user, item, rating, time
    ("u1", "i10", 5, 100), ("u1", "i20", 4, 100), ("u1", "i30", 3, 50),
    ("u2", "i20", 5, 300), ("u2", "i10", 4, 200), ("u2", "i30", 1, 400),
    ("u3", "i30", 2, 10), ("u3", "i20", 2, 10), ("u3", "i40", 2, 5),
]
# chronological per user, ties in input order; items remapped in sorted raw-id order
EXPECTED = {"u1": ["i30", "i10", "i20"], "u2": ["i10", "i20", "i30"], "u3": ["i40", "i30", "i20"]}


def _numeric(raw):
    return int(raw[1:])


def _write(tmp_path, fmt):
    if fmt == "movielens_csv":
        path = tmp_path / "ratings.csv"
        path.write_text("userId,movieId,rating,timestamp\n" + "".join(
            f"{_numeric(u)},{_numeric(i)},{r},{t}\n" for u, i, r, t in ROWS))
    elif fmt == "movielens_dat":
        path = tmp_path / "ratings.dat"
        path.write_text("".join(f"{_numeric(u)}::{_numeric(i)}::{r}::{t}\n" for u, i, r, t in ROWS))
    elif fmt in ("amazon_json", "amazon_json_gz"):
        lines = "".join(json.dumps({"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": t,
                                    "style": {"Format:": "x"}}) + "\n" for u, i, r, t in ROWS)
        if fmt == "amazon_json":
            path = tmp_path / "reviews.json"
            path.write_text(lines)
        else:
            path = tmp_path / "reviews.json.gz"
            path.write_bytes(gzip.compress(lines.encode()))
    elif fmt == "amazon_csv":
        path = tmp_path / "ratings_Electronics.csv"
        path.write_text("".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ROWS))
    else:  # sequences: already chronological per user, no timestamps
        order = sorted(range(len(ROWS)), key=lambda k: (ROWS[k][0], ROWS[k][3], k))
        text = "".join(f"{_numeric(ROWS[k][0])} {_numeric(ROWS[k][1])}\n" for k in order)
        path = tmp_path / ("seq.txt.gz" if fmt == "sequences_gz" else "seq.txt")
        path.write_bytes(gzip.compress(text.encode()) if fmt == "sequences_gz" else text.encode())
    return path


@pytest.mark.parametrize("fmt", ["movielens_csv", "movielens_dat", "amazon_json", "amazon_json_gz",
                                 "amazon_csv", "sequences", "sequences_gz"])
def test_every_format_prepares_chronological_sequences(tmp_path, fmt):
    src = _write(tmp_path, fmt)
    out = tmp_path / "prepared"
    meta = prepare(str(src), str(out))["meta"]
    assert (meta["num_users"], meta["num_items"], meta["num_interactions"]) == (3, 4, 9)
    data = load_prepared(out)
    raw_items = pq.read_table(out / "items.parquet").column("raw_id").to_pylist()
    raw_users = pq.read_table(out / "users.parquet").column("raw_id").to_pylist()
    normalise = (lambda x: str(_numeric(x))) if fmt.startswith(("movielens", "sequences")) else str
    for u, user_raw in enumerate(raw_users):
        seq = data.sequences.items[data.sequences.offsets[u]:data.sequences.offsets[u + 1]]
        expected = [normalise(x) for x in EXPECTED[[k for k in EXPECTED if normalise(k) == user_raw][0]]]
        assert [raw_items[i - 1] for i in seq] == expected
    written = json.loads((out / "meta.json").read_text())
    assert written["source"]["sha256"] and written["ids"] == {"padding": 0, "items": [1, 4], "mask": 5}


def test_kcore_iterates_to_a_fixed_point():
    # dropping item 2 (1 interaction) leaves user 1 with 1 interaction, which then drops item 1 to 1
    user = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    item = np.array([0, 1, 3, 1, 2, 0, 1, 3])
    keep = kcore(user, item, min_user=2, min_item=2)
    assert keep.tolist() == [True, True, True, False, False, True, True, True]
    again = kcore(user[keep], item[keep], 2, 2)
    assert again.all()


def test_filters_apply_and_are_recorded(tmp_path):
    src = _write(tmp_path, "movielens_csv")
    meta = prepare(str(src), str(tmp_path / "out"), min_item_interactions=3)["meta"]
    assert meta["num_items"] == 2 and meta["filters"]["min_item_interactions"] == 3


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"\x00\xff\xfe garbage \x81\n\x02\x03", "cannot"),
    (b"userId,movieId,rating,timestamp\n1,2,3,notatime\n", "timestamps are not integers"),
    (b"a b c d\n", "cannot tell the format"),
])
def test_bad_inputs_are_one_line_errors_without_output(tmp_path, content, message):
    src = tmp_path / "bad.txt"
    src.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(UserError) as info:
        prepare(str(src), str(out))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_missing_file_and_non_dataset_directory(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        prepare(str(tmp_path / "nope.csv"), str(tmp_path / "out"))
    with pytest.raises(UserError, match="not a prepared dataset"):
        load_prepared(tmp_path)


def test_existing_output_is_replaced_only_when_complete(tmp_path):
    src = _write(tmp_path, "movielens_csv")
    out = tmp_path / "out"
    prepare(str(src), str(out))
    bad = tmp_path / "bad.csv"
    bad.write_text("userId,movieId,rating,timestamp\n1,2,3,x\n")
    with pytest.raises(UserError):
        prepare(str(bad), str(out))
    assert load_prepared(out).sequences.num_users == 3  # the previous output is intact


def test_mismatched_meta_is_detected(tmp_path):
    src = _write(tmp_path, "movielens_csv")
    out = tmp_path / "out"
    prepare(str(src), str(out))
    meta = json.loads((out / "meta.json").read_text())
    meta["num_interactions"] = 99
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not match"):
        load_prepared(out)


@pytest.mark.skipif(not ML1M.exists(), reason="the shared ML-1M copy is not beside this checkout")
def test_ml1m_prepares_to_published_counts(tmp_path):
    meta = prepare(str(ML1M), str(tmp_path / "ml1m"))["meta"]
    assert (meta["num_users"], meta["num_items"], meta["num_interactions"]) == (6040, 3416, 987531)
