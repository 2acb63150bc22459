"""Task data types shared by every task source (hub, packaged stand-in, local files)."""

from __future__ import annotations

import string
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One labelled example: raw text fields (named as in the template) and a class index."""

    fields: dict[str, str]
    label: int


@dataclass(frozen=True)
class TaskSpec:
    """How a task is shown to a causal LM: a prompt template and one label word per class.

    The template is a `str.format` string over the example's fields; the model's next token
    after the rendered prompt is scored against the first (and only) token of each label word.
    Label words carry their own leading space (" great"), because that is how BPE tokenizers
    see a word that follows other text.
    """

    name: str
    template: str
    label_words: tuple[str, ...]
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.label_words) < 2:
            raise ValueError(f"task {self.name!r}: need at least two label words")
        if len(set(self.label_words)) != len(self.label_words):
            raise ValueError(f"task {self.name!r}: label words must be distinct: {self.label_words}")

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.template) if f)

    def render(self, example: Example) -> str:
        return self.template.format(**example.fields)


@dataclass
class TaskData:
    """A task ready for training: its spec plus train, test and (once carved from the
    training pool, tasks.common.with_validation) validation examples."""

    spec: TaskSpec
    train: list[Example]
    test: list[Example]
    source: str  # human-readable provenance (package file, hub id, local path) and split seed
    val: list[Example] = field(default_factory=list)

    def train_labels(self) -> list[int]:
        return [e.label for e in self.train]
