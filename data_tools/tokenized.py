r"""Builds pair records from pairs that are already token ids (``launch.build --tokenized``).

    python -m launch.build --tokenized --input=PAIRS.jsonl --vocab_size=152064 --out=DIR \
        [--tokenizer=HF_DIR] [--config.max_len=2048 ...]

Input: JSON Lines, one pair per line (docs/data.md, "Pre-tokenised pairs")::

    {"id": "p1", "prompt_ids": [int], "chosen_ids": [int], "rejected_ids": [int],
     "prefix_len": int, "suffix_len": int}

``chosen_ids`` / ``rejected_ids`` are the responses alone (no prompt), used as given: nothing
is appended (add the EOS id yourself if the policy should learn to stop). ``id`` is optional
(the split then hashes the prompt ids); ``prefix_len`` and ``suffix_len`` are optional, both or
neither. Without them the segments follow the text builder's rule on the same ids
(``data_tools.build``: longest common prefix and suffix, line-snapped when
``config.granularity="line"``, which needs ``--tokenizer`` to see newlines). Given ones are
honoured as they are, after checks: in range, the prefix ending before the suffix starts in
both responses, and the prefix / suffix tokens common to both responses (the loss treats them
as shared); a shorter common part than the longest (e.g. line-snapped) is allowed.

Every token id must lie in ``[0, vocab_size)``: ``--vocab_size`` (the model's embedding rows),
or the tokenizer's length when only ``--tokenizer`` is given. An id outside is a drop
(``token_id_out_of_range``, with the field and position), not an error, like every other bad
line: one wrong id does not cost the build, and a wrong ``--vocab_size`` shows as every line
dropped for that reason in the printed counts.

The outputs, split, ``pair_id`` and accounting are the text builder's (same file names, same
manifest fields, the same filters: ``identical_programs``, ``empty_chosen_mid``, ``too_long``),
with two more drop reasons (``token_id_out_of_range``, ``invalid_segments``). Malformed lines
and these two are named ``FILE:LINE`` in ``drops-*.jsonl`` and logged (the first 20 of each).
The manifest's ``tokenizer`` entry says ``"pre_tokenized": true`` with the vocabulary bound
and the pad id written into records (0, or the tokenizer's pad id). Config fields about
ranking (``ranker``, ``damping``, ...) and ``pairs_per_problem`` do not apply here.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np

from data_tools import build
from data_tools import segments as seg_lib
from fdpo import records
from fdpo.tokenization import Encoder, load_tokenizer

log = logging.getLogger("data_tools.tokenized")

TOKEN_ID_OUT_OF_RANGE = "token_id_out_of_range"
INVALID_SEGMENTS = "invalid_segments"
ID_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")
BOUNDARY_FIELDS = ("prefix_len", "suffix_len")
_LOGGED = (TOKEN_ID_OUT_OF_RANGE, INVALID_SEGMENTS)  # build.Drops logs the malformed ones
_MAX_LOGGED = 20


@dataclasses.dataclass
class TokenPair:
    """One parsed input line (``line`` and ``name`` as in ``build.Item``)."""

    line: int
    name: str
    prompt: np.ndarray  # int64 ids
    chosen: np.ndarray  # response ids, without the prompt
    rejected: np.ndarray
    boundaries: tuple[int, int] | None  # (prefix_len, suffix_len) when given


class _Dropped(Exception):
    """A well-formed line that is dropped with `reason`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _drop(drops: build.Drops, line: int, reason: str, detail: str = "", name: str | None = None):
    drops.add(line, reason, detail, name)
    if reason in _LOGGED and drops.reasons[reason] <= _MAX_LOGGED:
        log.warning("line %d dropped (%s): %s", line, reason, detail)


# ------------------------------------------------------------------------------- parsing

def _ids(obj: dict, key: str) -> list[int]:
    if key not in obj:
        raise ValueError(f"missing field {key!r}")
    v = obj[key]
    # JSON integers only: a float, bool or string id is a malformed line, not a rounding.
    if not isinstance(v, list) or not all(type(x) is int for x in v):
        raise ValueError(f"field {key!r} must be a list of integer token ids")
    return v


def _to_pair(line_no: int, obj: Any, vocab_size: int) -> TokenPair:
    """Raises ValueError for a malformed line, _Dropped for a well-formed one to drop."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if not any(k in obj for k in ID_FIELDS):
        raise ValueError(f"none of the token fields {', '.join(ID_FIELDS)} (text pairs and "
                         "problems are read by launch.build without --tokenized)")
    name = obj.get("id")
    if name is not None and (isinstance(name, bool) or not isinstance(name, (str, int))):
        raise ValueError(f"field 'id' must be a string or an integer, got {type(name).__name__}")
    given = [k for k in BOUNDARY_FIELDS if k in obj]
    if len(given) == 1:
        other = BOUNDARY_FIELDS[1 - BOUNDARY_FIELDS.index(given[0])]
        raise ValueError(f"field {given[0]!r} without {other!r}: give both segment boundaries "
                         "or neither")
    for k in given:
        if type(obj[k]) is not int:
            raise ValueError(f"field {k!r} must be an integer, got {type(obj[k]).__name__}")
    ids = {k: _ids(obj, k) for k in ID_FIELDS}  # every field's type before any id's range
    if not ids["prompt_ids"]:
        raise ValueError("field 'prompt_ids' must not be empty (the first response token is "
                         "predicted from the last prompt token)")
    arrays = {}
    for key, v in ids.items():
        try:
            arr = np.asarray(v, np.int64)
            bad = np.nonzero((arr < 0) | (arr >= vocab_size))[0]
        except OverflowError:  # beyond int64: find it the slow way
            bad = [pos for pos, x in enumerate(v) if not 0 <= x < vocab_size]
        if len(bad):
            pos = int(bad[0])
            raise _Dropped(TOKEN_ID_OUT_OF_RANGE,
                           f"{key}[{pos}] = {v[pos]} is outside [0, vocab_size={vocab_size})")
        arrays[key] = arr
    prompt, chosen, rejected = (arrays[k] for k in ID_FIELDS)
    if name is None:  # same prompt -> same split, so no prompt leaks into validation
        name = "prompt-ids-sha256:" + hashlib.sha256(prompt.astype("<i8").tobytes()).hexdigest()[:16]
    bounds = (obj["prefix_len"], obj["suffix_len"]) if given else None
    return TokenPair(line_no, str(name), prompt, chosen, rejected, bounds)


def parse_line(path: str, line_no: int, raw: bytes, drops: build.Drops, vocab_size: int
               ) -> TokenPair | None:
    """One input line -> a TokenPair, or None after recording its drop (named path:line)."""
    where = f"{path}:{line_no}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _drop(drops, line_no, build.MALFORMED_UTF8, f"{where}: not valid UTF-8: {e}")
        return None
    if not text.strip():
        _drop(drops, line_no, build.BLANK_LINE)
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        _drop(drops, line_no, build.MALFORMED_JSON, f"{where}: {e}")
        return None
    name = obj.get("id") if isinstance(obj, dict) else None
    name = None if name is None else str(name)
    try:
        return _to_pair(line_no, obj, vocab_size)
    except _Dropped as e:
        _drop(drops, line_no, e.reason, f"{where}: {e}", name)
    except ValueError as e:
        _drop(drops, line_no, build.MALFORMED_RECORD, f"{where}: {e}", name)
    return None


# ------------------------------------------------------------------------------ segments

def given_pair(chosen: np.ndarray, rejected: np.ndarray, prefix_len: int, suffix_len: int,
               lam: float) -> seg_lib.Pair:
    """The Pair for boundaries given in the input; raises _Dropped(invalid_segments) when they
    are out of range, not ordered, or not common to both responses."""
    p, s = prefix_len, suffix_len
    lens = {"chosen": len(chosen), "rejected": len(rejected)}
    for key, v in (("prefix_len", p), ("suffix_len", s)):
        if v < 0:
            raise _Dropped(INVALID_SEGMENTS, f"{key}={v} is out of range (negative)")
        for side, n in lens.items():
            if v > n:
                raise _Dropped(INVALID_SEGMENTS, f"{key}={v} is out of range: the {side} "
                                                 f"response has {n} tokens")
    for side, n in lens.items():
        if p + s > n:
            raise _Dropped(INVALID_SEGMENTS,
                           f"prefix_len={p} + suffix_len={s} > {n} tokens of the {side} response: "
                           f"the prefix ends after the suffix starts")
    diff = np.nonzero(chosen[:p] != rejected[:p])[0]
    if len(diff):
        raise _Dropped(INVALID_SEGMENTS, f"prefix_len={p}: the prefix is not common, chosen and "
                                         f"rejected differ at response token {int(diff[0])}")
    if s:
        diff = np.nonzero(chosen[len(chosen) - s:] != rejected[len(rejected) - s:])[0]
        if len(diff):
            raise _Dropped(INVALID_SEGMENTS,
                           f"suffix_len={s}: the suffix is not common, chosen and rejected differ "
                           f"at token {s - int(diff[0])} from the end")
    longest = max(lens.values())
    common = (p + s) / longest if longest else 1.0
    # As for a ready text pair: no ranking, so rank_diff is 0 and Diff is the common fraction.
    return seg_lib.Pair(0, 1, p, s, len(chosen), len(rejected), 0.0, common, lam * common)


def pair_of(tp: TokenPair, config: build.BuildConfig, enc: Encoder | None) -> seg_lib.Pair:
    """The segments of one pair: the given boundaries, or the builder's rule."""
    if tp.boundaries is not None:
        return given_pair(tp.chosen, tp.rejected, *tp.boundaries, config.lam)
    return build._ready_pair(tp.chosen, tp.rejected, enc, config)


# ---------------------------------------------------------------------------------- build

def _record(tp: TokenPair, config: build.BuildConfig, enc: Encoder | None, pad: int,
            drops: build.Drops, counts: collections.Counter, path: str
            ) -> tuple[str, records.PairRecord, seg_lib.Pair] | None:
    """(split, record, pair) for one parsed line, or None after recording its drop."""
    L = config.max_len
    try:
        pair = pair_of(tp, config, enc)
    except _Dropped as e:
        _drop(drops, tp.line, e.reason, f"{path}:{tp.line}: {e}", tp.name)
        return None
    # Identical responses with given boundaries shorter than the whole would pass the
    # candidate filter's test (a prefix covering everything): compare the ids.
    if np.array_equal(tp.chosen, tp.rejected):
        reason = seg_lib.IDENTICAL
    else:
        reason = seg_lib.candidate_reason(pair, L - len(tp.prompt))
    if reason is not None:
        counts["candidate_pairs_filtered." + reason] += 1
        drops.add(tp.line, reason, name=tp.name)
        return None
    counts["lines_used"] += 1
    rec = build._make_record(tp, 0, tp.prompt, tp.chosen, tp.rejected, pair, L, pad)
    return build.split_of(tp.name, config.val_fraction), rec, pair


class _IdsAsText:
    """Stands in for a tokenizer in the preview when none is given: ids as numbers."""

    def __init__(self):
        self.tok = self

    @staticmethod
    def decode(ids: list[int]) -> str:
        return "".join(f"{i} " for i in ids)


def build_tokenized(input_path: str, out_dir: str, config: build.BuildConfig = build.BuildConfig(),
                    *, vocab_size: int | None = None, tokenizer_path: str | None = None,
                    progress: bool = False) -> tuple[dict[str, Any], dict[str, float]]:
    """Builds one shard from token-id pairs; returns (manifest, seconds per stage)."""
    config.validate()
    for field, default in (("emit", "pairs"), ("focus", "error_point"), ("shuffle_labels", False)):
        if getattr(config, field) != default:  # these read verdicts, texts or regexes
            raise ValueError(f"config.{field}={getattr(config, field)!r}: --tokenized builds "
                             f"given pairs only; leave it at {default!r}")
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input: no such file {input_path}")
    timings: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    enc = None
    if tokenizer_path is not None:
        try:
            enc = Encoder(load_tokenizer(tokenizer_path))
        except Exception as e:  # transformers raises many types; name the flag in the error
            raise ValueError(f"--tokenizer={tokenizer_path}: cannot load a tokenizer: {e}") from e
    timings["load_tokenizer"] += time.perf_counter() - t0
    if vocab_size is None:
        if enc is None:
            raise ValueError("--tokenized needs --vocab_size (or --tokenizer) to check token ids")
        vocab_size = len(enc.tok)
    if not 1 <= vocab_size < 2**31:  # records store int32 ids
        raise ValueError(f"--vocab_size={vocab_size} must be in [1, 2**31)")
    if config.granularity == "line" and enc is None:
        raise ValueError("config.granularity='line' needs --tokenizer to find the newlines in "
                         "the token ids")
    pad = enc.pad if enc is not None else 0  # padding never enters the loss (segment PAD)
    if not 0 <= pad < vocab_size:
        raise ValueError(f"the tokenizer's pad id {pad} is outside [0, --vocab_size={vocab_size})")

    build.check_output(out_dir, config)
    work_dir = build._open_output(out_dir, config)
    try:
        manifest = _build_into(work_dir, input_path, tokenizer_path, config, enc, pad,
                               vocab_size, progress, timings)
        build._finish_output(work_dir, out_dir)
    except BaseException:  # also KeyboardInterrupt, in the swap too: leave no temporary
        build._abandon_output(work_dir, out_dir)
        raise
    timings["total"] = time.perf_counter() - t0
    return manifest, dict(timings)


def _build_into(out_dir, input_path, tokenizer_path, config, enc, pad, vocab_size, progress,
                timings):
    tag = config.shard_tag()
    drops = build.Drops()
    counts: collections.Counter = collections.Counter()
    paths = {s: os.path.join(out_dir, f"{s}-{tag}.array_record") for s in build.SPLITS}
    writers = {s: records.RecordWriter(paths[s]) for s in build.SPLITS}
    preview = []
    written = []  # the global selection's input (build.select), one entry per record
    try:
        from tqdm import tqdm

        with open(input_path, "rb") as f, tqdm(desc=f"read {os.path.basename(input_path)}",
                                               unit=" lines", disable=not progress,
                                               file=sys.stderr) as bar:
            for line_no, raw in enumerate(f, start=1):
                bar.update(1)
                if (line_no - 1) % config.num_shards != config.shard_index:
                    continue  # another host's line
                counts["lines_in"] += 1
                t = time.perf_counter()
                tp = parse_line(input_path, line_no, raw, drops, vocab_size)
                timings["parse"] += time.perf_counter() - t
                if tp is None:
                    continue
                counts["ready_pairs_in"] += 1
                t = time.perf_counter()
                made = _record(tp, config, enc, pad, drops, counts, input_path)
                timings["pairs"] += time.perf_counter() - t
                if made is None:
                    continue
                split, rec, pair = made
                t = time.perf_counter()
                written.append(build.write_record(writers[split], split, rec, tp, pair))
                timings["write"] += time.perf_counter() - t
                if len(preview) < config.preview_pairs:
                    preview.append((split, rec, tp, pair, tp.chosen, tp.rejected, tp.prompt))
    finally:
        for w in writers.values():
            w.close()

    out_counts = build.shard_counts(counts, drops, writers)  # problems_in: 0 here
    identity = {"pre_tokenized": True, "vocab_size": int(vocab_size), "pad_token_id_in_records": pad,
                "eos_appended": False,
                "tokenizer": enc.identity(tokenizer_path) if enc is not None else None}
    # Ready pairs may share an id (several pairs of one prompt): no problem ids to check.
    manifest = build.write_shard_outputs(
        out_dir, config, writers=writers, paths=paths, drops=drops, counts=out_counts,
        tokenizer=identity, input_path=input_path, written=written, seen={})
    build._write_preview(os.path.join(out_dir, f"preview-{tag}.html"), preview,
                         enc if enc is not None else _IdsAsText(), manifest)
    return manifest


if __name__ == "__main__":
    sys.exit("data_tools.tokenized is a library; the program is `python -m launch.build --tokenized`")
