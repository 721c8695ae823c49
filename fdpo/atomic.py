"""Outputs that are either the old one or the new one whole, also after `kill -9`.

A directory output (a built dataset, a Hugging Face export) is written into a temporary
sibling, ``.NAME.TAG-PID`` beside ``NAME``, and swapped into place when complete: with
Linux's ``renameat2(RENAME_EXCHANGE)`` the swap is one atomic step; elsewhere it is two
renames with the old output parked as ``.NAME.old-PID`` in between, which `clean` puts back
if a kill lands there. The next writer of the same output removes temporaries left by a
killed run (`clean`). No JAX here: the data stage uses it too."""

from __future__ import annotations

import ctypes
import os
import pathlib
import shutil

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def temp_sibling(dest: str | os.PathLike, tag: str) -> pathlib.Path:
    dest = pathlib.Path(dest).absolute()
    return dest.parent / f".{dest.name}.{tag}-{os.getpid()}"


def _siblings(dest: pathlib.Path, tag: str) -> list[pathlib.Path]:
    return sorted(dest.parent.glob(f".{dest.name}.{tag}-*"))


def clean(dest: str | os.PathLike, tag: str) -> None:
    """Removes the temporaries of killed writers of `dest` (tag `tag`) and restores an old
    output parked by an interrupted two-rename swap. Two writers of one output at the same
    time are not supported."""
    dest = pathlib.Path(dest).absolute()
    parked = _siblings(dest, "old")
    if parked and not dest.exists():
        os.rename(parked[-1], dest)
    for p in _siblings(dest, tag) + _siblings(dest, "old"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without it
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                     _RENAME_EXCHANGE) == 0


def replace_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Puts the complete directory `tmp` at `dest`, replacing what was there whole. When an
    exception (Ctrl-C included) stops it, `dest` is the old or the new output, and `tmp`
    whatever the caller must remove (the new output, or after the exchange the old one)."""
    tmp, dest = pathlib.Path(tmp).absolute(), pathlib.Path(dest).absolute()
    if not dest.exists():
        os.rename(tmp, dest)
        return
    if _exchange(tmp, dest):  # tmp now holds the old output
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        return
    parked = temp_sibling(dest, "old")
    os.rename(dest, parked)
    try:
        os.rename(tmp, dest)
    except BaseException:  # also KeyboardInterrupt: the old output goes back in place
        if not dest.exists():
            os.rename(parked, dest)
        raise
    shutil.rmtree(parked) if parked.is_dir() else parked.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes a file through a temporary sibling and `os.replace`."""
    path = pathlib.Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
