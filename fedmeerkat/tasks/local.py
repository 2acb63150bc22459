"""The generic `local` task: your own CSV / JSONL / Parquet files or any hub dataset.

Template and label words are required (no sensible default exists). The label column may hold
class indices (ints or bools) or strings; strings map to indices in the order of `class_names`
when given, otherwise in sorted order, and the mapping is written into `TaskData.source`.
"""

from __future__ import annotations

from typing import Any

from fedmeerkat.tasks.base import TaskData
from fedmeerkat.tasks.common import Row, make_spec
from fedmeerkat.tasks.tabular import DataFiles, build, open_splits


def _as_index(value: Any) -> int | None:
    """The class index a raw label denotes, or None for a string class name."""
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def load_local_task(
    *,
    data_files: DataFiles | None,
    hf_dataset: str | None,
    template: str | None,
    label_words: list[str] | None,
    label_field: str,
    class_names: list[str] | None,
    split_seed: int,
    test_fraction: float,
    max_train: int | None,
    max_test: int | None,
    name: str = "local",
) -> TaskData:
    if template is None or label_words is None:
        raise ValueError(
            "task 'local' needs a template (e.g. '{text} It was') and label words, one per "
            "class (e.g. [' terrible', ' great'])"
        )
    if data_files is None and hf_dataset is None:
        raise ValueError("task 'local' needs data_files (csv/jsonl/parquet) or hf_dataset")
    hub_id, _, cfg = (hf_dataset or "").partition(":")
    train_ds, test_ds, origin = open_splits(
        data_files=data_files, hub_id=hub_id or None, hub_config=cfg or None
    )

    def check(cols: list[str]) -> None:
        if label_field not in cols:
            raise ValueError(f"label column {label_field!r} not found; columns: {cols}")

    check(list(train_ds.column_names))
    raw = set(train_ds.unique(label_field))
    if test_ds is not None:
        check(list(test_ds.column_names))
        raw |= set(test_ds.unique(label_field))
    mapping: dict[Any, int] = {}
    note = "integer labels"
    if any(_as_index(v) is None for v in raw):
        how = "class_names order" if class_names else "sorted order"
        names = list(class_names) if class_names else sorted(str(v) for v in raw)
        unknown = sorted(str(v) for v in raw if str(v) not in names)
        if unknown:
            raise ValueError(f"labels {unknown} are not among class_names {names}")
        if len(names) != len(label_words):
            raise ValueError(
                f"{len(names)} classes {names} but {len(label_words)} label words {label_words}"
            )
        mapping = {n: i for i, n in enumerate(names)}
        class_names = names
        note = f"string labels in {how}: " + ", ".join(f"{n}={i}" for n, i in mapping.items())

    def normalise(row: Row) -> tuple[dict[str, str], int]:
        fields = {k: "" if v is None else str(v) for k, v in row.items() if k != label_field}
        value = row[label_field]
        index = _as_index(value)
        return fields, index if index is not None else mapping[str(value)]

    spec = make_spec(
        name, template, label_words, class_names, set(train_ds.column_names) - {label_field}
    )

    def check_split(cols: list[str]) -> None:  # the test file needs the template's fields too
        check(cols)
        missing = [f for f in spec.fields if f not in cols]
        if missing:
            raise ValueError(f"columns {missing} of the template are missing from a data file; "
                             f"its columns: {cols}")

    return build(
        spec, normalise, check_split, train_ds=train_ds, test_ds=test_ds,
        origin=f"{origin}; label column {label_field!r}, {note}", split_seed=split_seed,
        test_fraction=test_fraction, max_train=max_train, max_test=max_test,
    )  # fmt: skip
