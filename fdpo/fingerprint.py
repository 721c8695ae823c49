"""Fingerprints: what produced a record (or a pipeline stage's output), so that a rerun keeps
exactly what still matches its inputs and redoes the rest.

    fp = {"prompt": fingerprint.digest(text), "config": {"temperature": 1.5, ...}}
    fingerprint.changes(old_fp, fp)          # ["config.temperature"]: what differs
    plan = fingerprint.plan(existing, {id: fp}, "sample_fingerprint")
    fingerprint.drop_stale(path, existing, plan)   # the output without stale records
    print(plan.summary(path))

A fingerprint is a JSON object {component: value}; a value is a short sha256 digest of an
input (`digest`, `file_digest`) or a readable object of the settings that change the
result. It is stored in the record it describes, so the output stays one readable JSONL
file. Two fingerprints match when they are equal; `changes` names the components (and the
fields of object components) that differ. Standard library only: the executor uses it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from typing import Any

DIGEST_CHARS = 16  # 64 bits of sha256: no accidental collision among the records of a run


def canonical(obj: Any) -> bytes:
    """One byte string per JSON value: keys sorted, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def digest(obj: Any) -> str:
    """Short sha256 hex digest of a JSON value (a str is hashed as its JSON string)."""
    return hashlib.sha256(canonical(obj)).hexdigest()[:DIGEST_CHARS]


def file_digest(path: str | os.PathLike) -> str:
    """Short sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:DIGEST_CHARS]


def changes(old: Any, new: dict) -> list[str]:
    """The components of `new` that `old` lacks or holds another value for; for an object
    component, its differing fields as "component.field". ["no fingerprint"] when `old` is
    not a fingerprint (a record written before fingerprints, or a hand-made one)."""
    if not isinstance(old, dict) or not old:
        return ["no fingerprint"]
    out = []
    for key in dict.fromkeys([*new, *old]):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in dict.fromkeys([*b, *a]) if a.get(k) != b.get(k)]
        else:
            out.append(key)
    return out


def describe(what: list[str]) -> str:
    """`changes`'s list as words: "changed prompt, config.temperature" or "no fingerprint"."""
    return what[0] if what == ["no fingerprint"] else "changed " + ", ".join(what)


@dataclasses.dataclass
class Plan:
    """What a rerun does with an existing output: `keep` (ids whose record matches), `redo`
    ({id: what changed}), `new` (ids not in the output yet), `dropped` ({id: why}: records
    of ids no longer in the input)."""

    keep: list = dataclasses.field(default_factory=list)
    redo: dict = dataclasses.field(default_factory=dict)
    new: list = dataclasses.field(default_factory=list)
    dropped: dict = dataclasses.field(default_factory=dict)

    def todo(self) -> set:
        """Ids to (re)compute."""
        return set(self.redo) | set(self.new)

    def summary(self, path) -> str:
        """One line: how many records were kept, redone (and why), new and dropped."""
        why = collections.Counter(describe(r) for r in self.redo.values())
        reasons = "; ".join(f"{n}: {w}" for w, n in why.most_common())
        text = (f"{path}: {len(self.keep)} records kept, {len(self.redo)} redone"
                f"{f' ({reasons})' if reasons else ''}, {len(self.new)} new")
        if self.dropped:
            text += f", {len(self.dropped)} dropped (id no longer in the input)"
        return text


def plan(existing: dict, expected: dict, field: str) -> Plan:
    """Compares an output's records with the fingerprints the input asks for.

    existing: {id: (line, record)} (`fdpo.jsonl.resume`); expected: {id: fingerprint} in
    input order; field: the record field holding the fingerprint."""
    p = Plan()
    for pid, fp in expected.items():
        if pid not in existing:
            p.new.append(pid)
            continue
        what = changes(existing[pid][1].get(field), fp)
        if what:
            p.redo[pid] = what
        else:
            p.keep.append(pid)
    p.dropped = {pid: "not in the input" for pid in existing if pid not in expected}
    return p


def drop_stale(path: str | os.PathLike, existing: dict, p: Plan) -> None:
    """Rewrites the output `path` with only the records `p` keeps, in their order, through
    a temporary sibling and `os.replace` (a kill leaves the old file or the new one). The
    redone records are appended afterwards; without this their old lines would repeat the
    ids. Nothing is written when every existing record is kept."""
    if not (p.redo or p.dropped):
        return
    keep = set(p.keep)
    rows = sorted((existing[pid] for pid in keep), key=lambda row: row[0])
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path) or ".",
                       f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rec) + "\n" for _, rec in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
