"""Every shipped config resolves (no model or data is loaded), and the paper presets hold the
paper's settings (configs/paper/, README "Paper presets")."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedmeerkat.config import ConfigError, build_config, load_config
from fedmeerkat.federated.methods import ordered
from fedmeerkat.tasks.hub import HUB_TASKS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.toml"))
PAPER = sorted((CONFIGS / "paper").glob("*.toml"))
PAPER_TASKS = {"sst2", "agnews", "yelp_polarity", "boolq", "rte", "wsc", "wic"}  # Sec. 3
PAPER_MODELS = {"meta-llama/Llama-3.2-1B", "Qwen/Qwen2-1.5B", "google/gemma-2-2b"}


def test_configs_are_shipped():
    assert len(SHIPPED) >= 8 and len(PAPER) == 6, SHIPPED  # demo, decomfl, 3 models x 2 families


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_resolves_for_every_method(path):
    cfg = load_config(path)
    assert cfg.to_dict()["method"] == cfg.method
    # the resolved config round-trips (what a run folder's config.toml holds)
    assert build_config(cfg.to_dict()).to_dict() == cfg.to_dict()
    # a preset serves every method its downlink and its perturbation directions allow
    one_direction = (cfg.perturbations, cfg.zo_estimator) == (1, "two-point")
    for m in ordered():
        if cfg.downlink in m.downlinks and (one_direction or m.server.directions_ok):
            assert load_config(path, [f"method={m.name}"]).method == m.name
        elif cfg.downlink in m.downlinks:  # refused with the one line, not mid-run
            with pytest.raises(ConfigError, match="one two-point direction"):
                load_config(path, [f"method={m.name}"])


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_presets_hold_the_papers_settings(path):
    cfg = load_config(path)
    assert (cfg.weighting, cfg.partition, cfg.alpha) == ("uniform", "dirichlet-client", 0.5)
    assert (cfg.calib_corpus, cfg.calib_sequences, cfg.density) == ("c4", 128, 1e-3)
    assert (cfg.clients, cfg.batch_size, cfg.local_steps, cfg.method) == (10, 16, 10, "meerkat")
    assert 2e-8 <= cfg.lr <= 2e-4 and cfg.model in PAPER_MODELS
    vp = load_config(path, ["method=meerkat-vp"]).method_settings
    assert (vp.calibration, vp.units, vp.calibration_steps, vp.init_steps, vp.later_steps) == (
        "phase", "raw", 100, 20, 20)
    assert (vp.threshold, vp.quiescent_ratio, vp.later_ratio) == (1.0, 0.5, 5.0)  # Table 5
    assert load_config(path, ["method=meerkat-random-select"]).method_settings == vp
    # a flat override beats the file's [method_keys] (Table 6's RTE values)
    rte = load_config(path, ["method=meerkat-vp", "task=rte", "vp_threshold=0.5"])
    assert rte.method_settings.threshold == 0.5 and rte.method_settings.units == "raw"
    # the method keys reach no other method
    assert "vp_calibration" not in cfg.to_dict()
    # every task the file names resolves
    text = path.read_text()
    for task in PAPER_TASKS:
        if f"task={task}" in text:
            assert load_config(path, [f"task={task}"]).task == task


def test_paper_presets_cover_the_papers_models_and_tasks():
    models = {load_config(p).model for p in PAPER}
    assert models == PAPER_MODELS and PAPER_TASKS <= set(HUB_TASKS)
    for model in PAPER_MODELS:
        named = "".join(p.read_text() for p in PAPER if load_config(p).model == model)
        assert all(f"task={t}" in named for t in PAPER_TASKS), model


def test_method_keys_table_is_checked_whatever_the_method(tmp_path):
    base = tomllib.loads((CONFIGS / "demo.toml").read_text())
    with pytest.raises(ConfigError, match="vp_gradip_units"):
        build_config({**base, "method_keys": {"vp_gradip_units": "cm"}})  # bad, even unused
    with pytest.raises(ConfigError, match="unknown config key 'vp_treshold'"):
        build_config({**base, "method_keys": {"vp_treshold": 1.0}})
    with pytest.raises(ConfigError, match="common key"):
        build_config({**base, "method_keys": {"lr": 1.0}})
    cfg = build_config({**base, "method": "meerkat-vp", "method_keys": {"vp_threshold": 2.0}})
    assert cfg.method_settings.threshold == 2.0
    assert build_config({**base, "method_keys": {"vp_threshold": 2.0}}).method == "meerkat"


@pytest.mark.parametrize("preset, group", [
    ("centralized_600.toml", "rt-central-per-example-cosine"),
    ("centralized_3000.toml", "rt-central-long-per-example-cosine")])
def test_centralized_presets_are_the_learning_benchmarks_picks(preset, group):
    """configs/centralized_600.toml and _3000.toml hold the settings of the seed-0 run of the
    group each cites (its grid picked it on validation, learning.json)."""
    from bench_module import load_benchmark

    lb = load_benchmark("learning")
    kind, runs, _ = lb.PLANS["full"][group]
    assert kind == "grid"
    settings = next(s for _, s in runs
                    if s["seed"] == 0 and s.get("zo_estimator") == "per-example")
    want = {**lb.BASE, **settings}
    want.pop("mask")  # the benchmark reuses its grid's mask file; the preset computes the same
    cfg = load_config(CONFIGS / preset).to_dict()
    expected = build_config({**want, "out": ""}).to_dict()
    differ = {k: (cfg[k], expected[k]) for k in expected if k != "out" and cfg[k] != expected[k]}
    assert not differ, differ


def test_federated_k10_preset_is_the_learning_benchmarks_federated_recipe():
    """configs/federated_k10.toml holds the settings of the rt-federated-k4 run it cites
    (seed 0, Flower's convention), so the file and the benchmark cannot drift apart."""
    from bench_module import load_benchmark

    lb = load_benchmark("learning")
    kind, grid, runs = lb.PLANS["full"]["rt-federated-k4"]
    assert (kind, grid) == ("from-pick", "rt-central-grid")
    settings = next(s for _, s in runs if s["seed"] == 0 and s["partition"] == "dirichlet")
    # the grid's pick (benchmarks/results/learning.json): lr 1e-4 on its central run's settings
    want = {**lb.BASE, **lb.CENTRAL, **lb.ZO_300, "lr": 1e-4, **settings}
    want.pop("mask")  # the benchmark reuses its grid's mask file; the preset computes the same
    cfg = load_config(CONFIGS / "federated_k10.toml").to_dict()
    expected = build_config({**want, "out": ""}).to_dict()
    differ = {k: (cfg[k], expected[k]) for k in expected if k != "out" and cfg[k] != expected[k]}
    assert not differ, differ
