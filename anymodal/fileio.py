"""Atomic writes: a reader (or a resumed run) sees the old file or folder or the new one, never half."""

from __future__ import annotations

import shutil
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to a temporary sibling, then rename it over `path` (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    tmp.replace(path)
    return path


def fresh_dir_beside(out: str | Path, tag: str = "tmp") -> Path:
    """An empty folder next to `out` (same file system) to build `out`'s replacement in."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{tag}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def replace_dir(tmp: str | Path, out: str | Path) -> Path:
    """Put the finished folder `tmp` at `out`: the old `out` (if any) is moved aside first and
    removed last, so `out` is always either the old folder or the new one."""
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.replace(old)
    tmp.replace(out)
    shutil.rmtree(old, ignore_errors=True)
    return out
