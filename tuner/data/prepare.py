"""`tuner prepare`: raw interaction files -> a prepared dataset directory.

Formats (chosen by `--format` or sniffed from the file name and first line):
- `sequences`: SASRec-style `user item` lines, each user's lines in chronological order (.txt/.gz);
- `movielens`: `ratings.csv` (userId,movieId,rating,timestamp) or `ratings.dat` (`::`-separated);
- `amazon`: review JSON lines (reviewerID, asin, unixReviewTime; .json/.json.gz) or the ratings
  CSV (user,item,rating,timestamp, no header).

Pipeline, all in Arrow compute and NumPy (no Python loop per row): read -> stable sort by
(user, time, input order) -> k-core filter iterated to a fixed point -> remap ids to 1..V
(0 = padding, V+1 = mask) -> write `sequences.parquet` (one row per user: `user`, `items`),
`items.parquet` (item id -> raw id), `users.parquet` and `meta.json`, into a temporary
directory renamed into place, so a failure never leaves half an output.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from tuner.errors import UserError

FORMATS = ("auto", "sequences", "movielens", "amazon")
META_FILE = "meta.json"
SEQUENCES_FILE = "sequences.parquet"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
FORMAT_VERSION = 1


@dataclass
class Interactions:
    """Columns of equal length: raw user and item ids, time, and input order (tie-breaker)."""

    user: pa.Array
    item: pa.Array
    time: pa.Array  # int64; the input order when the format has no timestamp

    def __len__(self) -> int:
        return len(self.user)


# ---------------------------------------------------------------- reading

def _open(path: Path):
    """A binary stream, gunzipped if the file is gzip (by magic bytes, not by name)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return pa.input_stream(str(path), compression="gzip" if magic == b"\x1f\x8b" else None)


def _first_line(path: Path) -> str:
    with open(path, "rb") as f:
        opener = gzip.open if f.read(2) == b"\x1f\x8b" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.readline().strip()
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot be read as text ({exc.__class__.__name__})") from None


def sniff_format(path: Path) -> str:
    """Guess the format from the name and the first line."""
    name = path.name.lower().removesuffix(".gz")
    line = _first_line(path)
    if not line:
        raise UserError(f"{path}: the file is empty")
    if name.endswith(".json") or line.startswith("{"):
        return "amazon"
    if "::" in line:
        return "movielens"
    if name.endswith(".csv") or "," in line:
        return "movielens" if line.lower().replace('"', "").startswith("userid") else "amazon"
    if len(line.split()) == 2:
        return "sequences"
    raise UserError(f"{path}: cannot tell the format from its first line {line[:60]!r}; "
                    f"pass --format ({', '.join(FORMATS[1:])})")


def _read_csv(path: Path, names: list[str] | None, delimiter: str, header: bool) -> pa.Table:
    read = pacsv.ReadOptions(column_names=None if header else names, autogenerate_column_names=False,
                             block_size=1 << 24)
    parse = pacsv.ParseOptions(delimiter=delimiter)
    convert = pacsv.ConvertOptions(strings_can_be_null=False)
    with _open(path) as stream:
        return pacsv.read_csv(stream, read_options=read, parse_options=parse, convert_options=convert)


def _as_time(column: pa.ChunkedArray, path: Path) -> pa.Array:
    try:
        return pc.cast(column, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise UserError(f"{path}: timestamps are not integers") from None


def read_interactions(path: Path, fmt: str) -> Interactions:
    """Read one file into `Interactions`; every parse error becomes a UserError naming the file."""
    try:
        if fmt == "sequences":
            table = _read_csv(path, ["user", "item"], " ", header=False)
            if table.num_columns != 2:
                raise UserError(f"{path}: expected 'user item' lines")
            order = pa.array(np.arange(table.num_rows, dtype=np.int64))
            return Interactions(table["user"], table["item"], order)
        if fmt == "movielens":
            if "::" in _first_line(path):
                # '::' is two one-character delimiters with an empty field between them
                table = _read_csv(path, [f"c{i}" for i in range(7)], ":", header=False)
                user, item, time = table["c0"], table["c2"], table["c6"]
            else:
                table = _read_csv(path, None, ",", header=True)
                missing = {"userId", "movieId", "timestamp"} - set(table.column_names)
                if missing:
                    raise UserError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
                user, item, time = table["userId"], table["movieId"], table["timestamp"]
            return Interactions(user, item, _as_time(time, path))
        if fmt == "amazon":
            if _first_line(path).startswith("{"):
                schema = pa.schema([("reviewerID", pa.string()), ("asin", pa.string()),
                                    ("unixReviewTime", pa.int64())])
                parse = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
                with _open(path) as stream:
                    table = pajson.read_json(stream, parse_options=parse,
                                             read_options=pajson.ReadOptions(block_size=1 << 24))
                if table.num_rows and pc.any(pc.is_null(table["unixReviewTime"])).as_py():
                    raise UserError(f"{path}: some records lack unixReviewTime")
                return Interactions(table["reviewerID"], table["asin"], table["unixReviewTime"])
            table = _read_csv(path, ["user", "item", "rating", "timestamp"], ",", header=False)
            return Interactions(table["user"], table["item"], _as_time(table["timestamp"], path))
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError, EOFError, OSError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UserError(f"{path}: not a valid {fmt} file ({first[:160]})") from None
    raise UserError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")


# ---------------------------------------------------------------- transforming

def _null_free(column: pa.Array, name: str, path: Path) -> pa.Array:
    column = pa.chunked_array([column]) if isinstance(column, pa.Array) else column
    column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.null_count:
        raise UserError(f"{path}: {column.null_count} row(s) have an empty {name} id")
    return column


def kcore(user: np.ndarray, item: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """Boolean mask of interactions kept by k-core filtering iterated to a fixed point.

    `user`/`item` are dense int codes. Each round drops users with fewer than `min_user`
    interactions and items with fewer than `min_item`; dropping one can push another under,
    so rounds repeat until nothing changes.
    """
    keep = np.ones(len(user), dtype=bool)
    if min_user <= 1 and min_item <= 1:
        return keep
    while True:
        user_counts = np.bincount(user[keep], minlength=user.max() + 1 if len(user) else 0)
        item_counts = np.bincount(item[keep], minlength=item.max() + 1 if len(item) else 0)
        new_keep = keep & (user_counts[user] >= min_user) & (item_counts[item] >= min_item)
        if new_keep.sum() == keep.sum():
            return new_keep
        keep = new_keep


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def build_sequences(raw: Interactions, path: Path, min_user: int, min_item: int):
    """Sort, filter, remap. Returns (user_raw, item_raw, offsets, items) as Arrow/NumPy arrays."""
    user_col = _null_free(raw.user, "user", path)
    item_col = _null_free(raw.item, "item", path)
    if len(user_col) == 0:
        raise UserError(f"{path}: no valid rows")
    # dense codes in sorted raw-id order: codes sort like the raw ids (numeric ids numerically)
    user_vocab = pc.unique(user_col).sort()
    item_vocab = pc.unique(item_col).sort()
    user_code = pc.index_in(user_col, value_set=user_vocab).to_numpy().astype(np.int64)
    item_code = pc.index_in(item_col, value_set=item_vocab).to_numpy().astype(np.int64)
    keep = kcore(user_code, item_code, min_user, min_item)
    if not keep.any():
        raise UserError(f"{path}: no interactions survive the filters "
                        f"(min user {min_user}, min item {min_item} interactions)")
    time = _null_free(raw.time, "timestamp", path).to_numpy()
    order = np.arange(len(user_code), dtype=np.int64)
    user_code, item_code, time, order = user_code[keep], item_code[keep], time[keep], order[keep]
    # stable chronological order per user; equal timestamps keep input order
    perm = np.lexsort((order, time, user_code))
    user_code, item_code = user_code[perm], item_code[perm]
    # remap survivors to 1..V and 0..U-1, keeping the sorted raw-id order
    kept_items = np.unique(item_code)
    item_new = (np.searchsorted(kept_items, item_code) + 1).astype(np.int32)
    kept_users = np.unique(user_code)
    counts = np.bincount(np.searchsorted(kept_users, user_code), minlength=len(kept_users))
    offsets = np.zeros(len(kept_users) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    user_raw = user_vocab.take(pa.array(kept_users))
    item_raw = item_vocab.take(pa.array(kept_items))
    return user_raw, item_raw, offsets, item_new


# ---------------------------------------------------------------- writing

def write_dataset(out_dir: Path, user_raw: pa.Array, item_raw: pa.Array, offsets: np.ndarray,
                  items: np.ndarray, meta: dict) -> None:
    """Write into a sibling temporary directory, then rename: never half an output."""
    out_dir = out_dir.resolve()
    if out_dir.exists() and not (out_dir / META_FILE).is_file():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise UserError(f"{out_dir}: exists and is not a prepared dataset; refusing to overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a dataset is meant to be shared
        sequences = pa.table({
            "user": pa.array(np.arange(len(offsets) - 1, dtype=np.int32)),
            "items": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(items)),
        })
        pq.write_table(sequences, tmp / SEQUENCES_FILE)
        pq.write_table(pa.table({"item": pa.array(np.arange(1, len(item_raw) + 1, dtype=np.int32)),
                                 "raw_id": pc.cast(item_raw, pa.string())}), tmp / ITEMS_FILE)
        pq.write_table(pa.table({"user": pa.array(np.arange(len(user_raw), dtype=np.int32)),
                                 "raw_id": pc.cast(user_raw, pa.string())}), tmp / USERS_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        backup = None
        if out_dir.exists():
            backup = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(out_dir, backup)
        os.replace(tmp, out_dir)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{out_dir}: cannot write the dataset ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare(input_path: str, output_dir: str | None, fmt: str = "auto",
            min_user_interactions: int = 0, min_item_interactions: int = 0) -> dict:
    """Prepare `input_path`; write to `output_dir` unless it is None. Returns (meta, arrays)."""
    path = Path(input_path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected an interactions file")
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if min_user_interactions < 0 or min_item_interactions < 0:
        raise UserError("--min-user-interactions and --min-item-interactions must be >= 0")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    chosen = sniff_format(path) if fmt == "auto" else fmt
    raw = read_interactions(path, chosen)
    user_raw, item_raw, offsets, items = build_sequences(
        raw, path, min_user_interactions, min_item_interactions)
    meta = {
        "format_version": FORMAT_VERSION,
        "num_users": int(len(offsets) - 1),
        "num_items": int(len(item_raw)),
        "num_interactions": int(len(items)),
        "num_input_rows": int(len(raw)),
        "source": {"path": str(path.resolve()), "sha256": _sha256(path), "format": chosen},
        "filters": {"min_user_interactions": min_user_interactions,
                    "min_item_interactions": min_item_interactions},
        "ids": {"padding": 0, "items": [1, int(len(item_raw))], "mask": int(len(item_raw)) + 1},
    }
    if output_dir is not None:
        write_dataset(Path(output_dir), user_raw, item_raw, offsets, items, meta)
    return {"meta": meta, "offsets": offsets, "items": items, "item_raw": item_raw}
