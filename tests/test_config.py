"""Typed configs: YAML + _base_ includes + dotlist overrides; clear one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from anymodal.config import check_choice, load_config, resolve_config_path, save_config
from anymodal.errors import ConfigError


@dataclass
class Inner:
    dim: int = 64
    norm: str = "pre"

    def __post_init__(self):
        check_choice("inner.norm", self.norm, ("pre", "swin"))


@dataclass
class Outer:
    name: str = "x"
    lr: float = 1e-3
    inner: Inner = field(default_factory=Inner)


def test_defaults_yaml_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("lr: 0.5\ninner:\n  dim: 8\n")
    (tmp_path / "c.yaml").write_text("_base_: base.yaml\nname: hello\ninner:\n  norm: swin\n")
    cfg = load_config(Outer, tmp_path / "c.yaml", ["inner.dim=16"])
    assert isinstance(cfg, Outer) and isinstance(cfg.inner, Inner)
    assert (cfg.name, cfg.lr, cfg.inner.dim, cfg.inner.norm) == ("hello", 0.5, 16, "swin")
    assert load_config(Outer) == Outer()


def test_unknown_key_names_key_and_choices():
    with pytest.raises(ConfigError) as e:
        load_config(Outer, overrides=["inner.dimm=3"])
    msg = str(e.value)
    assert "inner.dimm" in msg and "dim" in msg and "norm" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="'nmae'.*name, lr, inner"):
        load_config(Outer, overrides=["nmae=3"])


def test_wrong_type_and_bad_choice_and_malformed():
    with pytest.raises(ConfigError, match="inner.dim"):
        load_config(Outer, overrides=["inner.dim=abc"])
    with pytest.raises(ConfigError, match="valid choices: pre, swin"):
        load_config(Outer, overrides=["inner.norm=post"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Outer, overrides=["justakey"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, tmp_path / "bad.yaml")
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(Outer, tmp_path / "loop.yaml")


def test_shipped_configs_resolve_by_name(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not a checkout: only the packaged configs can be found
    p = resolve_config_path("tokenizer/text_demo")
    assert p.name == "text_demo.yaml" and p.is_file()
    assert resolve_config_path("configs/tokenizer/text_demo.yaml") == p


def test_save_and_reload(tmp_path):
    cfg = load_config(Outer, overrides=["inner.dim=7", "name=z"])
    save_config(cfg, tmp_path / "c.yaml", extra={"kind": "test"})
    assert "kind: test" in (tmp_path / "c.yaml").read_text()
    data = __import__("yaml").safe_load((tmp_path / "c.yaml").read_text())
    data.pop("kind")
    assert load_config(Outer, data=data) == cfg
