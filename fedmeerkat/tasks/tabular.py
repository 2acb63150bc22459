"""Row sources read through Hugging Face `datasets`: a hub dataset or local CSV/JSONL/Parquet.

Both go through `datasets.load_dataset`, so a hub task can be tested on tiny local files that
use the hub's column names, through the same code path.

`data_files` forms (documented for users):
  - one path or a list of paths: a single pool, split later (seeded, stratified);
  - a dict {"train": ..., "test": ...} or the string "train=a.csv,test=b.csv": explicit
    splits ("validation" is accepted in place of "test"; a dict with only "train" is split).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedmeerkat.tasks.base import TaskData, TaskSpec
from fedmeerkat.tasks.common import Normaliser, finish, split_and_cap, to_examples
from fedmeerkat.tasks.splits import subsample_indices

DataFiles = str | Sequence[str] | dict[str, str | Sequence[str]]

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
_TEST_NAMES = ("test", "validation")


def parse_data_files(data_files: DataFiles) -> dict[str, list[str]]:
    """Normalise every accepted form to {split name: [paths]}; a single pool is "train"."""
    if isinstance(data_files, dict):
        parsed = {k: [v] if isinstance(v, str | Path) else list(v) for k, v in data_files.items()}
    elif isinstance(data_files, str | Path):
        text = str(data_files)
        parts = [p.strip() for p in text.split(",")]
        if "=" in text and all(p.split("=", 1)[0] in ("train", *_TEST_NAMES) for p in parts):
            parsed = {}
            for p in parts:
                key, path = p.split("=", 1)
                parsed.setdefault(key, []).append(path)
        else:
            parsed = {"train": [text]}
    else:
        parsed = {"train": [str(p) for p in data_files]}
    unknown = set(parsed) - {"train", *_TEST_NAMES}
    if unknown or "train" not in parsed:
        raise ValueError(
            f"data_files split names must be 'train' plus optionally 'test'/'validation'; got "
            f"{sorted(parsed)}"
        )
    parsed = {k: [str(p) for p in v] for k, v in parsed.items()}
    for paths in parsed.values():
        for p in paths:
            if not Path(p).exists():
                raise FileNotFoundError(f"data file not found: {p}")
    return parsed


def _read(datasets: Any, builder: str, paths: list[str], kwargs: dict[str, Any]) -> Any:
    logging = datasets.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity(logging.CRITICAL)  # a bad file is said once, below, not logged too
    try:
        return datasets.load_dataset(builder, data_files={"train": paths}, **kwargs)["train"]
    except Exception as e:  # bad JSON lines, not parquet, unreadable: one line, with the cause
        cause = e.__cause__ or e.__context__ or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ValueError(f"could not read data files {paths}: {type(cause).__name__}: "
                         f"{first}") from None
    finally:
        logging.set_verbosity(level)


def _builder(paths: list[str]) -> tuple[str, dict[str, Any]]:
    suffixes = {Path(p).suffix.lower() for p in paths}
    if len(suffixes) != 1 or (suffix := suffixes.pop()) not in _BUILDERS:
        raise ValueError(
            f"data files must share one of the extensions {sorted(_BUILDERS)}; got {paths}"
        )
    return _BUILDERS[suffix], ({"delimiter": "\t"} if suffix == ".tsv" else {})


def open_splits(
    *,
    data_files: DataFiles | None,
    hub_id: str | None,
    hub_config: str | None = None,
    hub_test_splits: Sequence[str] = _TEST_NAMES,
) -> tuple[Any, Any | None, str]:
    """Return (train Dataset, test Dataset or None when it must be split off, origin text)."""
    import datasets  # deferred: importing datasets costs about a second

    if data_files is not None:
        parsed = _pick_test(parse_data_files(data_files))
        builder, kwargs = _builder([p for v in parsed.values() for p in v])
        # each split on its own: files with different columns get our message, not a
        # datasets schema error
        dd = {split: _read(datasets, builder, paths, kwargs) for split, paths in parsed.items()}
        origin = "local files " + ", ".join(f"{k}={v}" for k, v in parsed.items())
        return dd["train"], dd["test"] if "test" in dd else None, origin
    if hub_id is None:
        raise ValueError("need data_files or a hub dataset id")
    try:
        dd = datasets.load_dataset(hub_id, hub_config)
    except OSError as e:  # no network (ConnectionError) or no such dataset (FileNotFoundError)
        raise ConnectionError(
            f"could not load hub dataset {hub_id!r} ({e}). Offline? Pass data_files= with the "
            "hub's column names, or use an offline stand-in (rotten_tomatoes, bbc_news)"
        ) from e
    origin = f"hub dataset {hub_id}" + (f" ({hub_config})" if hub_config else "")
    for name in hub_test_splits:
        if name in dd:
            return dd["train"], dd[name], f"{origin}, train=train test={name}"
    return dd["train"], None, f"{origin}, train only"


def _pick_test(parsed: dict[str, list[str]]) -> dict[str, list[str]]:
    out = {"train": parsed["train"]}
    for name in _TEST_NAMES:
        if name in parsed:
            out["test"] = parsed[name]
            break
    return out


def build(
    spec: TaskSpec,
    normalise: Normaliser,
    columns_check: Callable[[list[str]], None],
    *,
    train_ds: Any,
    test_ds: Any | None,
    origin: str,
    split_seed: int,
    test_fraction: float,
    max_train: int | None,
    max_test: int | None,
) -> TaskData:
    """Convert Datasets to examples. With a given test split, cap before converting, so a
    560k-row hub split is never turned into Python objects in full."""
    columns_check(list(train_ds.column_names))
    if test_ds is not None:
        columns_check(list(test_ds.column_names))
        tr = subsample_indices(len(train_ds), max_train, split_seed, "train")
        te = subsample_indices(len(test_ds), max_test, split_seed, "test")
        train_ds = train_ds if tr is None else train_ds.select(tr)
        test_ds = test_ds if te is None else test_ds.select(te)
    train = to_examples(train_ds, normalise, spec)
    test = to_examples(test_ds, normalise, spec) if test_ds is not None else None
    train, test, how = split_and_cap(
        train,
        test=test,
        test_fraction=test_fraction,
        split_seed=split_seed,
        max_train=max_train,
        max_test=max_test,
    )
    return finish(spec, train, test, f"{origin}; {how}")
