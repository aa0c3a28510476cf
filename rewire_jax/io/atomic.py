"""The one way this library writes a directory: atomically.

Everything is written into a temporary sibling directory that is renamed to the target at the end;
an existing target (with overwrite=True) is moved aside first and restored if the final rename
fails, then deleted. A reader never sees a half-written directory under the target name, and a
failure (or Ctrl-C) leaves nothing behind but the untouched old directory.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(out_dir, overwrite: bool = False, mode: int = 0o755):
    """with atomic_directory(out) as tmp: write files into tmp -> they appear as `out` at the end."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose a new directory or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, mode)   # mkdtemp makes it 0700
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old / "previous")
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old / "previous", out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
