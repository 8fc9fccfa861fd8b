"""Atomic writes: a reader (or a resumed run) sees the old file or folder or the new one, never half."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it is renamed over `path`, on an
    exception it is removed and `path` is left as it was. Parents are created. The temporary name is
    `path` + ".tmp" (copies skip `*.tmp`), so a writer that picks a format by file suffix (PIL,
    soundfile) must be told the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


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
