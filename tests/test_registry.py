"""One registry of methods: config keys, checks, `fedmeerkat methods` and the README derive
from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedmeerkat.cli.main import main
from fedmeerkat.config import METHODS, ConfigError, load_config
from fedmeerkat.federated.methods import get_method, markdown_table, ordered

README = Path(__file__).parent.parent / "README.md"


def test_every_method_module_registers_one_method_and_config_lists_them():
    import importlib
    import pkgutil

    import fedmeerkat.federated.methods as pkg

    names = [importlib.import_module(f"{pkg.__name__}.{i.name}").METHOD.name
             for i in pkgutil.iter_modules(pkg.__path__)]
    assert sorted(names) == sorted(METHODS) and len(METHODS) == 7
    assert METHODS == tuple(m.name for m in ordered())


def test_readme_methods_table_is_the_registry(capsys):
    assert markdown_table() in README.read_text(), "README's table: paste `fedmeerkat methods`"
    assert main(["methods"]) == 0
    assert capsys.readouterr().out.strip() == markdown_table()


def test_method_keys_are_typed_and_belong_to_their_methods():
    cfg = load_config(None, ["method=meerkat-random-select", "vp_later_ratio=2"])
    assert cfg.method_settings.later_ratio == 2.0 and cfg.to_dict()["vp_later_ratio"] == 2.0
    assert "vp_later_ratio" not in load_config(None, []).to_dict()
    with pytest.raises(ConfigError, match=re.escape("vp_threshold: read by method meerkat-vp / "
                                                    "meerkat-random-select only")):
        load_config(None, ["vp_threshold=3"])
    with pytest.raises(ConfigError, match="lora_rank: expected int"):
        load_config(None, ["method=lora-fedzo", "lora_rank=x"])
    with pytest.raises(ConfigError, match="feddyn_alpha: must be > 0"):
        load_config(None, ["method=meerkat-feddyn", "feddyn_alpha=0"])
    with pytest.raises(ConfigError, match="downlink: method meerkat-feddyn needs"):
        load_config(None, ["method=meerkat-feddyn", "downlink=scalars"])
    # a resolved config written before the registry listed every key at its default: loads
    assert load_config(None, ["trainable=mask", "feddyn_alpha=0.01"]).method == "meerkat"


def test_config_lists_method_keys_with_their_methods(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^feddyn_alpha\s+= 0.01\s+\[meerkat-feddyn\]", out, re.M)
    assert re.search(r"^lora_rank\s+= 16\s+\[lora-fedzo, fedavg-backprop\]", out, re.M)


def test_space_and_downlinks_come_from_the_method():
    assert get_method("full-fedzo").space(None) == "dense"
    bp = get_method("fedavg-backprop")
    assert bp.space(load_config(None, ["method=fedavg-backprop", "trainable=lora"]).method_settings) == "lora"
    assert bp.downlinks == ("sparse-weights",)
    assert get_method("meerkat").downlinks == ("sparse-weights", "scalars")
    with pytest.raises(NotImplementedError, match="choose one of meerkat, meerkat-vp"):
        get_method("nope")
