"""Comparing output directories byte for byte."""
from __future__ import annotations

import hashlib
import os
import pathlib


def tree_hash(root: pathlib.Path) -> dict[str, str]:
    """{relative path: sha256} of every file (and directory) under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def temporaries(dest: pathlib.Path) -> list[str]:
    """The hidden siblings `.NAME.*` of `dest` (fdpo.atomic's temporaries and parked old
    outputs)."""
    return sorted(p.name for p in pathlib.Path(dest).parent.glob(f".{pathlib.Path(dest).name}.*"))
