"""Building a TaskData from rows: spec validation, label checks, splitting, provenance."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from fedmeerkat.tasks.base import Example, TaskData, TaskSpec
from fedmeerkat.tasks.splits import stratified_split, subsample_indices, take, validation_split

Row = Mapping[str, Any]
# Turns one raw row into (text fields, class index).
Normaliser = Callable[[Row], tuple[dict[str, str], int]]


def make_spec(
    name: str,
    template: str,
    label_words: Sequence[str],
    class_names: Sequence[str] | None,
    available_fields: Iterable[str],
) -> TaskSpec:
    """A TaskSpec whose template only uses fields the data has."""
    spec = TaskSpec(
        name=name,
        template=template,
        label_words=tuple(label_words),
        class_names=tuple(class_names) if class_names else (),
    )
    available = sorted(set(available_fields))
    missing = [f for f in spec.fields if f not in available]
    if missing:
        raise ValueError(
            f"task {name!r}: template {template!r} uses fields {missing} that the data lacks; "
            f"available fields: {available}"
        )
    if not spec.fields:
        raise ValueError(f"task {name!r}: template {template!r} uses no data field")
    if spec.class_names and len(spec.class_names) != spec.num_classes:
        raise ValueError(
            f"task {name!r}: {len(spec.class_names)} class names {list(spec.class_names)} but "
            f"{spec.num_classes} label words {list(spec.label_words)}"
        )
    return spec


def check_label_words(name: str, label_words: Sequence[str] | None, num_classes: int) -> None:
    if label_words is not None and len(label_words) != num_classes:
        raise ValueError(
            f"task {name!r} has {num_classes} classes but {len(label_words)} label words were "
            f"given: {list(label_words)}"
        )


def to_examples(rows: Iterable[Row], normalise: Normaliser, spec: TaskSpec) -> list[Example]:
    out = []
    for i, row in enumerate(rows):
        fields, label = normalise(row)
        if not 0 <= label < spec.num_classes:
            raise ValueError(
                f"task {spec.name!r}: row {i} has label {label}, outside 0..{spec.num_classes - 1}"
                " (an unlabelled split? labels are -1 in GLUE test files)"
            )
        out.append(Example(fields={f: fields[f] for f in spec.fields}, label=label))
    return out


def split_and_cap(
    examples: list[Example],
    *,
    test: list[Example] | None,
    test_fraction: float,
    split_seed: int,
    max_train: int | None,
    max_test: int | None,
) -> tuple[list[Example], list[Example], str]:
    """Split (when no test set exists) then cap both sides; returns a provenance fragment."""
    if test is None:
        tr, te = stratified_split([e.label for e in examples], test_fraction, split_seed)
        train, test = take(examples, tr), take(examples, te)
        how = f"stratified split test_fraction={test_fraction} split_seed={split_seed}"
    else:
        train = examples
        how = f"given train/test splits, split_seed={split_seed}"
    train = take(train, subsample_indices(len(train), max_train, split_seed, "train"))
    test = take(test, subsample_indices(len(test), max_test, split_seed, "test"))
    return train, test, f"{how}; max_train={max_train} max_test={max_test}"


def finish(spec: TaskSpec, train: list[Example], test: list[Example], source: str) -> TaskData:
    if not train or not test:
        raise ValueError(
            f"task {spec.name!r}: empty split (train={len(train)}, test={len(test)}); {source}"
        )
    return TaskData(spec=spec, train=train, test=test, source=source)


def with_validation(task: TaskData, val_fraction: float, max_val: int | None,
                    split_seed: int) -> TaskData:
    """The task with a validation set carved out of its training examples (seeded and
    stratified, tasks.splits.validation_split), before any partition over clients sees them:
    validation examples are never trained on and never test examples. Model selection (lr,
    best round, lr=auto) reads validation metrics only."""
    if not val_fraction:
        return task
    tr, va = validation_split(task.train_labels(), val_fraction, max_val, split_seed)
    if len(va) == 0:
        return task
    return TaskData(spec=task.spec, train=take(task.train, tr), test=task.test,
                    source=f"{task.source}; validation {len(va)} of the training pool "
                           f"(val_fraction={val_fraction} max_val={max_val})",
                    val=take(task.train, va))
