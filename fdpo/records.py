"""The preference-pair record: one schema shared by the data builder and the trainer.

One record holds one (chosen, rejected) pair, both laid out as
``[prompt tokens | response tokens | padding]`` in a fixed length ``L``, with a per-token
segment id (see :class:`Segment`). The trainer sums per-token log-probs per segment, so
the segment arrays are all it needs to apply the Focused-DPO weight table.

Serialisation is a fixed little-endian binary layout (no pickle, no npz): a 40-byte header
followed by the arrays, decoded with ``np.frombuffer`` views. Layout of version 1::

    offset  size   field
    0       4      magic b"FDPR"
    4       2      schema version (uint16)
    6       2      flags (uint16; bit 0: ref_logps present; bit 1: ref_logps has 5 columns)
    8       4      L (uint32)
    12      4      problem name length in bytes, N (uint32)
    16      8      pair_id (int64)
    24      8      problem_id (int64)
    32      8      reserved (zero)
    40      4L     chosen_ids    int32[L]
    ..      4L     rejected_ids  int32[L]
    ..      L      chosen_segments   int8[L]
    ..      L      rejected_segments int8[L]
    ..      24/40  ref_logps float32[2, 3] or [2, 5]  (only when flag bit 0 is set; 5 columns
                   when bit 1 is set)
    ..      N      problem name, UTF-8

This module is numpy-only (no jax) so the data tools stay light.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import struct
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

SCHEMA_VERSION = 1
MAGIC = b"FDPR"
_HEADER = struct.Struct("<4sHHIIqq8x")  # 40 bytes, see the module docstring
_FLAG_REF_LOGPS = 1
# Records from before the LEAD/TRAIL segments hold float32[2, 3]; they have no LEAD/TRAIL
# tokens, so their missing columns are exactly 0 and `to_dict` pads them.
_FLAG_REF_5 = 2
# Records are read back one at a time by index, so each ArrayRecord chunk holds one record
# (group_size:1): random access then decodes exactly one record, as grain recommends.
ARRAY_RECORD_OPTIONS = "group_size:1"


class Segment(enum.IntEnum):
    """Per-token segment ids stored in ``*_segments``."""

    PAD = 0
    PROMPT = 1
    PREFIX = 2  # common prefix of the two responses
    MID = 3  # the differing middle: the error-prone point
    SUFFIX = 4  # common suffix of the two responses
    # Outside the code span of an instruct response (docs/data.md): prose and fences. Prose
    # differs freely between samples, so the error point is localised within the code span
    # only; completion-format responses are all code and have neither.
    LEAD = 5  # before the code span: leading prose, the opening fence
    TRAIL = 6  # after the code span: the closing fence, trailing prose, the EOS


# What a pair's two sides can share in one row (`fdpo.train.pack_shared_prompt`): the
# prompt, then every token that is the same id with the same label on both sides in the same
# context, from the prompt on: the common prefix, and before it the lead when the two leads
# are identical (a completion pair has none; an instruct pair's prose usually differs, and
# then its prefix follows different contexts and only the prompt is shared).
TRUNK_SEGMENTS = (Segment.PROMPT, Segment.LEAD, Segment.PREFIX)


def trunk_lengths(chosen_ids: np.ndarray, rejected_ids: np.ndarray,
                  chosen_segments: np.ndarray, rejected_segments: np.ndarray) -> np.ndarray:
    """Tokens at the start of each pair [..., L] that both sides share (the trunk): the
    longest run of equal ids with equal labels in `TRUNK_SEGMENTS`. Their log-probs are
    equal on both sides (same tokens, same context), so a shared row computes them once."""
    same = ((np.asarray(chosen_ids) == np.asarray(rejected_ids)) &
            (np.asarray(chosen_segments) == np.asarray(rejected_segments)) &
            np.isin(chosen_segments, np.asarray(TRUNK_SEGMENTS, np.int8)))
    return np.cumprod(same, axis=-1).sum(-1)


def shared_row_lengths(chosen_segments: np.ndarray, rejected_segments: np.ndarray,
                       trunk: np.ndarray | None = None) -> np.ndarray:
    """Tokens each pair needs as one shared row (`fdpo.train.pack_shared_prompt`), from its
    segment ids [..., L]: both sides' tokens less the `trunk` tokens they share (default:
    the prompt alone; `trunk_lengths` for the prompt and the common prefix)."""
    if trunk is None:
        trunk = (chosen_segments == Segment.PROMPT).sum(-1)
    return ((chosen_segments != Segment.PAD).sum(-1) +
            (rejected_segments != Segment.PAD).sum(-1) - trunk)


def side_labels(labels, branch, side: int):
    """One side's labels in shared rows [..., S] (numpy or jax arrays): `side` 1 (chosen) or
    2 (rejected) keeps its own branch and the trunk (branch 0, counted for both sides),
    PAD elsewhere (PAD is 0)."""
    return labels * ((branch == side) | (branch == 0))


# The arrays of a shared row [b, S] (int32), as `pack_shared_prompt` writes them.
SHARED_KEYS = ("ids", "positions", "branch", "labels", "parents")


def pack_shared_prompt(examples: dict[str, np.ndarray], length: int,
                       trunk: bool = True) -> dict[str, np.ndarray]:
    """Pairs (the record layout, [b, L]) -> shared rows [b, length] (`fdpo.train` module
    docstring): the trunk (prompt + common prefix; the prompt only when `trunk` is False)
    once, then the chosen rest, then the rejected rest.

    Raises ValueError naming the pair when its two prompts differ, it has no prompt token
    (its first response token would have no hidden state to be scored from), or it does not
    fit in `length`.
    """
    c_ids, r_ids = examples["chosen_ids"], examples["rejected_ids"]
    c_seg, r_seg = examples["chosen_segments"], examples["rejected_segments"]
    b = c_ids.shape[0]
    out = {k: np.zeros((b, length), np.int32) for k in SHARED_KEYS}
    out["parents"][:] = np.maximum(np.arange(length) - 1, 0)  # the token before
    shared = (trunk_lengths(c_ids, r_ids, c_seg, r_seg) if trunk
              else (c_seg == Segment.PROMPT).sum(-1))
    needed = shared_row_lengths(c_seg, r_seg, shared)
    for i in range(b):
        p = int((c_seg[i] == Segment.PROMPT).sum())
        nc, nr = int((c_seg[i] != Segment.PAD).sum()), int((r_seg[i] != Segment.PAD).sum())
        if p == 0 or int((r_seg[i] == Segment.PROMPT).sum()) != p or \
                not np.array_equal(c_ids[i, :p], r_ids[i, :p]):
            raise ValueError(f"pair {i} of the batch: the chosen and rejected prompts differ "
                             f"or are empty; shared-prompt rows need one common prompt")
        if needed[i] > length:
            raise ValueError(f"pair {i} of the batch needs {needed[i]} tokens as a "
                             f"shared row; shared_length is {length}")
        t = int(shared[i])  # trunk tokens, prompt included
        rejected = slice(nc, nc + nr - t)
        out["ids"][i, :nc], out["ids"][i, rejected] = c_ids[i, :nc], r_ids[i, t:nr]
        out["labels"][i, :nc], out["labels"][i, rejected] = c_seg[i, :nc], r_seg[i, t:nr]
        out["branch"][i, t:nc], out["branch"][i, rejected] = 1, 2
        out["positions"][i, :nc] = np.arange(nc)
        out["positions"][i, rejected] = np.arange(t, nr)
        if nr > t:
            out["parents"][i, nc] = t - 1  # the first rejected token follows the trunk
    return out


# Row/column order of ``ref_logps[side, segment]``.
SIDES = ("chosen", "rejected")
RESPONSE_SEGMENTS = (Segment.PREFIX, Segment.MID, Segment.SUFFIX, Segment.LEAD, Segment.TRAIL)
REF_SHAPES = ((2, 3), (2, len(RESPONSE_SEGMENTS)))  # stored ref_logps: old, current


class RecordError(ValueError):
    """A record that violates the schema (on encode) or a corrupt byte string (on decode)."""


def stable_problem_id(name: str) -> int:
    """A stable non-negative int63 id for a problem name (sha256; no Python ``hash`` salt)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclasses.dataclass
class PairRecord:
    """One preference pair. Arrays have length ``L`` (the dataset's ``max_len``)."""

    chosen_ids: np.ndarray  # int32[L]
    rejected_ids: np.ndarray  # int32[L]
    chosen_segments: np.ndarray  # int8[L], values in Segment
    rejected_segments: np.ndarray  # int8[L]
    pair_id: int
    problem_id: int
    problem_name: str = ""
    # float32[2, 5]: (chosen, rejected) x RESPONSE_SEGMENTS (prefix, mid, suffix, lead, trail);
    # [2, 3] in records written before LEAD/TRAIL existed.
    ref_logps: np.ndarray | None = None

    @property
    def max_len(self) -> int:
        return int(np.asarray(self.chosen_ids).shape[0])

    def validate(self) -> None:
        L = self.max_len
        for name, dtype in (("chosen_ids", np.int32), ("rejected_ids", np.int32),
                            ("chosen_segments", np.int8), ("rejected_segments", np.int8)):
            arr = np.asarray(getattr(self, name))
            if arr.shape != (L,):
                raise RecordError(f"{name} has shape {arr.shape}, expected ({L},)")
            if arr.dtype != dtype:
                raise RecordError(f"{name} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
        for name in ("chosen_segments", "rejected_segments"):
            arr = np.asarray(getattr(self, name))
            if arr.size and (arr.min() < 0 or arr.max() > max(Segment)):
                raise RecordError(f"{name} holds values outside Segment 0..{int(max(Segment))}")
        for name in ("chosen_ids", "rejected_ids"):
            arr = np.asarray(getattr(self, name))
            if arr.size and arr.min() < 0:
                raise RecordError(f"{name} holds negative token ids")
        if self.ref_logps is not None:
            ref = np.asarray(self.ref_logps)
            if ref.shape not in REF_SHAPES or ref.dtype != np.float32:
                raise RecordError(f"ref_logps must be float32[2, 5] (or [2, 3]), got {ref.dtype}{list(ref.shape)}")
        if not 0 <= int(self.problem_id) < 2**63 or not -(2**63) <= int(self.pair_id) < 2**63:
            raise RecordError("pair_id / problem_id must fit in int64 (problem_id non-negative)")

    def to_dict(self) -> dict[str, np.ndarray]:
        """The numeric view the grain source yields (what the trainer batches)."""
        out = {
            "chosen_ids": np.asarray(self.chosen_ids, np.int32),
            "rejected_ids": np.asarray(self.rejected_ids, np.int32),
            "chosen_segments": np.asarray(self.chosen_segments, np.int8),
            "rejected_segments": np.asarray(self.rejected_segments, np.int8),
            "pair_id": np.asarray(self.pair_id, np.int64),
            "problem_id": np.asarray(self.problem_id, np.int64),
        }
        if self.ref_logps is not None:
            ref = np.asarray(self.ref_logps, np.float32)
            out["ref_logps"] = np.pad(ref, ((0, 0), (0, len(RESPONSE_SEGMENTS) - ref.shape[1])))
        return out


def encode(record: PairRecord, validate: bool = True) -> bytes:
    """Serialises one record to the fixed binary layout (see module docstring)."""
    if validate:
        record.validate()
    L = record.max_len
    name = record.problem_name.encode("utf-8")
    flags = 0
    if record.ref_logps is not None:
        flags = _FLAG_REF_LOGPS | (_FLAG_REF_5 if np.shape(record.ref_logps)[1] == 5 else 0)
    parts = [
        _HEADER.pack(MAGIC, SCHEMA_VERSION, flags, L, len(name), int(record.pair_id),
                     int(record.problem_id)),
        np.ascontiguousarray(record.chosen_ids, "<i4").tobytes(),
        np.ascontiguousarray(record.rejected_ids, "<i4").tobytes(),
        np.ascontiguousarray(record.chosen_segments, "i1").tobytes(),
        np.ascontiguousarray(record.rejected_segments, "i1").tobytes(),
    ]
    if flags & _FLAG_REF_LOGPS:
        parts.append(np.ascontiguousarray(record.ref_logps, "<f4").tobytes())
    parts.append(name)
    return b"".join(parts)


def _expected_size(L: int, flags: int, name_len: int) -> int:
    ref = (40 if flags & _FLAG_REF_5 else 24) if flags & _FLAG_REF_LOGPS else 0
    return _HEADER.size + 10 * L + ref + name_len


def decode(data: bytes, expected_len: int | None = None) -> PairRecord:
    """Parses bytes written by :func:`encode`. Arrays are read-only views into ``data``."""
    if len(data) < _HEADER.size:
        raise RecordError(f"record of {len(data)} bytes is shorter than the {_HEADER.size}-byte header")
    magic, version, flags, L, name_len, pair_id, problem_id = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise RecordError(f"bad magic {magic!r}: not an fdpo pair record")
    if version != SCHEMA_VERSION:
        raise RecordError(f"record schema version {version}, this code reads {SCHEMA_VERSION}")
    if len(data) != _expected_size(L, flags, name_len):
        raise RecordError(f"record is {len(data)} bytes, header implies {_expected_size(L, flags, name_len)}")
    if expected_len is not None and L != expected_len:
        raise RecordError(f"record has L={L}, the dataset manifest says {expected_len}")
    off = _HEADER.size
    chosen_ids = np.frombuffer(data, "<i4", L, off); off += 4 * L
    rejected_ids = np.frombuffer(data, "<i4", L, off); off += 4 * L
    chosen_seg = np.frombuffer(data, "i1", L, off); off += L
    rejected_seg = np.frombuffer(data, "i1", L, off); off += L
    ref = None
    if flags & _FLAG_REF_LOGPS:
        cols = 5 if flags & _FLAG_REF_5 else 3
        ref = np.frombuffer(data, "<f4", 2 * cols, off).reshape(2, cols); off += 8 * cols
    name = bytes(data[off:off + name_len]).decode("utf-8")
    return PairRecord(chosen_ids.astype(np.int32, copy=False), rejected_ids.astype(np.int32, copy=False),
                      chosen_seg, rejected_seg, pair_id, problem_id, name, ref)


def decode_to_dict(data: bytes, expected_len: int | None = None) -> dict[str, np.ndarray]:
    return decode(data, expected_len).to_dict()


class RecordWriter:
    """Writes records to one ArrayRecord file. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, options: str = ARRAY_RECORD_OPTIONS):
        from array_record.python import array_record_module  # imported lazily: a C extension

        self.path = os.fspath(path)
        self._writer = array_record_module.ArrayRecordWriter(self.path, options)
        self.count = 0
        self._max_len: int | None = None

    def write(self, record: PairRecord) -> None:
        # One file, one L: the manifest states a single max_len for every shard.
        if self._max_len is None:
            self._max_len = record.max_len
        elif record.max_len != self._max_len:
            raise RecordError(f"{self.path}: record with L={record.max_len} in a file of L={self._max_len}")
        self._writer.write(encode(record))
        self.count += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_array_record(path: str | os.PathLike, records: Iterable[PairRecord]) -> int:
    """Writes all ``records`` to one ArrayRecord file; returns how many were written."""
    with RecordWriter(path) as writer:
        for record in records:
            writer.write(record)
        return writer.count


class PairDataSource:
    """A grain ``RandomAccessDataSource`` over ArrayRecord shards of :class:`PairRecord`.

    ``source[i]`` is a dict of numpy arrays: ``chosen_ids``, ``rejected_ids`` (int32[L]),
    ``chosen_segments``, ``rejected_segments`` (int8[L]), ``pair_id``, ``problem_id`` (int64
    scalars) and, when present, ``ref_logps`` (float32[2, 5]). Picklable (for grain's worker
    processes): the underlying array_record source reopens its readers lazily.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike],
                 max_len: int | None = None):
        from array_record.python import array_record_data_source

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self._paths = [os.fspath(p) for p in paths]
        if not self._paths:
            raise ValueError("PairDataSource needs at least one ArrayRecord path")
        for p in self._paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"ArrayRecord shard not found: {p}")
        self._max_len = max_len
        self._source = array_record_data_source.ArrayRecordDataSource(self._paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return decode_to_dict(self._source[index], self._max_len)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        return [decode_to_dict(b, self._max_len) for b in self._source.__getitems__(indices)]

    def record(self, index: int) -> PairRecord:
        """The full record, including the problem name (for tools and previews)."""
        return decode(self._source[index], self._max_len)

    def __repr__(self) -> str:
        # grain's DataLoader checkpointing keys on repr: keep it deterministic.
        return f"PairDataSource(paths={self._paths!r}, max_len={self._max_len})"

    @classmethod
    def from_manifest(cls, manifest_path: str | os.PathLike, split: str) -> "PairDataSource":
        """The source for one split of a built dataset, checked against its manifest."""
        manifest = read_manifest(manifest_path)
        base = os.path.dirname(os.fspath(manifest_path))
        if split not in manifest["splits"]:
            raise KeyError(f"{manifest_path}: no split {split!r}; has {sorted(manifest['splits'])}")
        listed = manifest["splits"][split]["shards"]
        shards = [os.path.join(base, s["path"]) for s in listed]
        source = cls(shards, max_len=manifest["max_len"])
        # Shards from another build (an interrupted rerun, a copy mixed with another) beside
        # this manifest: refuse rather than train on them.
        from array_record.python import array_record_data_source

        for entry, path in zip(listed, shards):
            n = len(array_record_data_source.ArrayRecordDataSource([path]))
            if n != entry["records"]:
                raise RecordError(f"{manifest_path}: shard {entry['path']} holds {n} records, "
                                  f"the manifest says {entry['records']}; the directory mixes "
                                  "outputs of different builds: rebuild it")
        return source


# --------------------------------------------------------------------------------------------
# Manifest: one JSON file per built dataset (or per builder shard, merged afterwards).

def make_manifest(*, max_len: int, tokenizer: Mapping[str, Any], counts: Mapping[str, Any],
                  drop_reasons: Mapping[str, int], splits: Mapping[str, Any],
                  config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "format": "fdpo.records.PairRecord in ArrayRecord (" + ARRAY_RECORD_OPTIONS + ")",
        "max_len": int(max_len),
        "segments": {s.name.lower(): int(s) for s in Segment},
        "ref_logps_layout": {"rows": list(SIDES), "cols": [s.name.lower() for s in RESPONSE_SEGMENTS]},
        "tokenizer": dict(tokenizer),
        "counts": dict(counts),
        "drop_reasons": dict(sorted(drop_reasons.items())),
        "splits": dict(splits),
        "config": dict(config),
    }


def write_manifest(path: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        manifest = json.load(f)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(f"{path}: manifest schema version {version}, this code reads {SCHEMA_VERSION}")
    return manifest


def merge_manifests(manifests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merges per-shard manifests (from ``--config.num_shards`` builds) into one.

    Counts and drop reasons add up; shard lists concatenate; max_len, tokenizer and the
    builder config (less the shard index) must agree, else this raises.
    """
    if not manifests:
        raise ValueError("no manifests to merge")
    first = manifests[0]

    def _cfg(m):
        return {k: v for k, v in m["config"].items() if k != "shard_index"}

    for m in manifests[1:]:
        for key in ("schema_version", "max_len", "tokenizer"):
            if m[key] != first[key]:
                raise ValueError(f"cannot merge manifests that differ in {key}: {m[key]!r} != {first[key]!r}")
        if _cfg(m) != _cfg(first):
            raise ValueError("cannot merge manifests built with different configs")
    counts: dict[str, Any] = {}
    drops: dict[str, int] = {}
    splits: dict[str, Any] = {}
    for m in manifests:
        for k, v in m["counts"].items():
            if isinstance(v, dict):
                sub = counts.setdefault(k, {})
                for kk, vv in v.items():
                    sub[kk] = sub.get(kk, 0) + vv
            else:
                counts[k] = counts.get(k, 0) + v
        for k, v in m["drop_reasons"].items():
            drops[k] = drops.get(k, 0) + v
        for name, split in m["splits"].items():
            s = splits.setdefault(name, {"records": 0, "shards": []})
            s["records"] += split["records"]
            s["shards"].extend(split["shards"])
    config = _cfg(first)
    return make_manifest(max_len=first["max_len"], tokenizer=first["tokenizer"], counts=counts,
                         drop_reasons=drops, splits=splits, config=config)
