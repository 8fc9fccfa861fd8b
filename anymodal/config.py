"""Typed configs: dataclasses loaded from YAML with OmegaConf, plus `key=value` overrides.

Every component owns one config dataclass. `load_config(Schema, "model/demo.yaml", ["dim=256"])`
merges the schema's defaults, the YAML file (and any `_base_` files it names) and the dotlist
overrides, then builds the dataclass, so `__post_init__` checks run. Any mistake becomes a
`ConfigError` that names the key and what would have been valid.

Config files are found relative to the working directory first, then in the packaged
`anymodal/configs/` folder (the checkout's top-level `configs/` links to it), so
`--config tokenizer/image_demo.yaml` works from a checkout and from an installed wheel.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from .errors import ConfigError
from .fileio import write_atomic

T = TypeVar("T")

CONFIGS_ROOT = Path(__file__).resolve().parent / "configs"


def configs_root() -> Path:
    """The folder holding the shipped configs (inside the package, so wheels carry it)."""
    return CONFIGS_ROOT


def resolve_config_path(path: str | Path, relative_to: Path | None = None) -> Path:
    """Find a config file: next to `relative_to` (a `_base_` include), as given, or inside the
    shipped configs. An include looks beside its own file first, so a same-named file in the
    working directory cannot capture it."""
    p = Path(path)
    candidates = [p]
    if relative_to is not None and not p.is_absolute():
        candidates.insert(0, relative_to / p)
    if not p.is_absolute():
        rel = Path(*p.parts[1:]) if p.parts and p.parts[0] == "configs" else p
        candidates.append(CONFIGS_ROOT / rel)
    for c in list(candidates):
        if c.suffix not in (".yaml", ".yml"):
            candidates.append(c.with_name(c.name + ".yaml"))
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"config file not found: {path} (looked in ., and {CONFIGS_ROOT})")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping; `_base_: other.yaml` (or a list) is merged underneath it."""
    if path in seen:
        raise ConfigError(f"config {path} includes itself through _base_")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a mapping at the top level")
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    merged = OmegaConf.create({})
    for b in [bases] if isinstance(bases, str) else list(bases):
        base = _read_yaml(resolve_config_path(b, relative_to=path.parent), seen + (path,))
        merged = OmegaConf.merge(merged, base)
    return OmegaConf.to_container(OmegaConf.merge(merged, data))  # type: ignore[return-value]


def _fields_at(schema: type, dotted: str) -> list[str]:
    """Field names of the dataclass reached by following `dotted` (for error messages)."""
    cls: Any = schema
    for part in [p for p in dotted.split(".") if p]:
        hints = typing.get_type_hints(cls)
        if not dataclasses.is_dataclass(hints.get(part)):
            return []
        cls = hints[part]
    return [f.name for f in dataclasses.fields(cls)]


def _open_mappings(node: Any, schema: type) -> None:
    """Let overrides add keys to dict-typed fields (e.g. `kind_weights.t2i=2`): their keys are data
    (document kinds, ...) that the schema cannot list, so struct mode must not refuse them; the
    dataclass's `__post_init__` checks them instead."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        child = node.get(f.name) if isinstance(node, DictConfig) else None
        if not isinstance(child, DictConfig):
            continue
        hint = hints[f.name]
        if typing.get_origin(hint) is dict:
            OmegaConf.set_struct(child, False)
        elif dataclasses.is_dataclass(hint):
            _open_mappings(child, hint)


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as e:  # omegaconf raises several types for malformed dotlists
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {e}") from None


def _explain(schema: type, e: Exception) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    if isinstance(e, oc_errors.ConfigKeyError) or "not in struct" in str(e) or "Key '" in str(e):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        valid = _fields_at(schema, parent)
        return ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(valid)}")
    msg = getattr(e, "msg", str(e)).splitlines()[0]
    return ConfigError(f"bad value for config key '{key}': {msg}")


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    data: dict | None = None,
) -> T:
    """Build `schema` from its defaults, a YAML file, a dict and dotlist overrides (in that order)."""
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    _open_mappings(cfg, schema)
    layers: list[Any] = []
    if path is not None:
        layers.append(_read_yaml(resolve_config_path(path)))
    if data is not None:
        layers.append(data)
    overrides = list(overrides)
    if overrides:
        layers.append(_parse_overrides(overrides))
    try:
        for layer in layers:
            cfg = OmegaConf.merge(cfg, layer)
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except ConfigError:
        raise
    except (oc_errors.OmegaConfBaseException, ValueError, TypeError) as e:
        if isinstance(e, ValueError) and not isinstance(e, oc_errors.OmegaConfBaseException):
            raise ConfigError(str(e)) from None
        raise _explain(schema, e) from None


def to_dict(cfg: Any) -> dict:
    """A plain dict of a config dataclass (for saving next to weights)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_config(cfg: Any, path: str | Path, extra: dict | None = None) -> None:
    """Write a config dataclass as YAML (atomically), with optional extra top-level keys."""
    data = to_dict(cfg)
    if extra:
        data = {**extra, **data}
    write_atomic(path, yaml.safe_dump(data, sort_keys=False))


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """For `__post_init__`: a field that must be one of a fixed set of values."""
    if value not in choices:
        raise ConfigError(f"config key '{name}' is {value!r}; valid choices: {', '.join(map(str, choices))}")
