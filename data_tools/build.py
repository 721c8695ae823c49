"""Builds Focused-DPO pair records from sampled codes, tests and verdicts.

    python -m launch.build --input=SAMPLES.jsonl --tokenizer=HF_DIR --out=DIR --config.max_len=2048

Input: JSON Lines, each line one of

* a problem record (:mod:`fdpo.problem`, docs/data.md) after ``launch.execute``:
  ``{"version", "id", "prompt", "samples": [{response, response_ids, program, finish}],
  "tests", "passed": [[bool]], ...}`` with ``passed[i][j]`` true when sample i's program
  passes test j. The samples with a non-empty program are ranked (``config.ranker``) and
  classified; a sample cut by the token limit (``finish == "length"``) is never chosen, and by
  default not rejected either (``config.truncated``); the best (correct, incorrect) pairs are
  selected (``config.lam``, ``config.pairs_per_problem``). A pair side is, by default
  (``config.response="response"``, on-policy), the policy's own response tokens
  (``response_ids``, else the response tokenised), prose and fences included, with the EOS
  only where ``finish == "eos"``; the error point is found inside the code span (the fenced
  block the extractor chose, ``fdpo.extract.program_span``) and the tokens around it are
  LEAD / TRAIL. ``config.response="program"``: the extracted program (off-policy; EOS only
  with ``config.append_eos``). A line in the format before problem records (``codes`` and no
  ``version``), a record without ``passed``, and a problem id that repeats are errors naming
  file:line;
* a ready pair: ``{"prompt", "chosen", "rejected"}`` (optional ``"id"``), used as given.

After every shard, the global selection keeps the ``config.train_pairs`` training and
``config.val_pairs`` validation pairs of highest Diff (0: all; ties by problem id, then
pair_id), the same whatever the number of shards (``select``).

Tokenisation: the prompt is rendered in ``config.prompt_format`` (:mod:`fdpo.tokenization`:
``chat_template``, ``plain``, ``magicoder``, ``deepseek_instruct``); "" (default) takes the
``prompt_format`` the problem records were sampled with, else the tokenizer's default (its chat
template when it has one, else the plain text with its special tokens, e.g. BOS). A record
sampled with another format, or whose ``prompt_ids`` (the ids the sampler fed the policy)
differ from the prompt rendered here, stops the build with an error naming file:line. The
response follows the prompt directly (plain concatenation).

Responses (docs/data.md). Problem records, ``config.response="response"`` (default,
on-policy): a side is the policy's own response tokens (``response_ids`` when recorded, else
the response tokenised without special tokens), prose and fences included, plus the EOS token
only where ``finish == "eos"`` (the policy ended it; never assumed). The error point is localised inside the code
span (``fdpo.extract.program_span``: the fenced block the extractor chose): prefix / mid /
suffix over its tokens; tokens before it are LEAD, after it (closing fence, prose, EOS) TRAIL.
A response without a fence is all code. ``config.response="program"``: the extracted program,
EOS only with ``config.append_eos`` (off-policy: the policy never wrote it so). Ready
pairs: each text is a finished response, all code, EOS appended (for ChatML tokenizers EOS is
``<|im_end|>``).

Study arms and controls (docs/data.md, "Study arms and controls"): ``config.emit="rft"``
writes one SFT record per correct sample of every problem instead of pairs (chosen side =
the sample, its code span MID; rejected side = the prompt alone; duplicates kept: each
sample once). ``config.focus`` moves the MID class of the pairs ``"error_point"`` selects:
``"random"`` to an equal-length span inside the side's common prefix or suffix, the true
mid taking the decoy's class (``segments.random_focus``), ``"oracle"`` to the tokens
covering the first match of the record's ``oracle_focus`` regex in each side's code span.
``config.shuffle_labels`` exchanges each pair's sides with probability 1/2. The draws come
from ``numpy.random.default_rng([config.focus_seed, pair_id, stream])``.

Output in ``--out`` for shard i of n (``config.shard_index/num_shards``; host i reads input lines
``i, i+n, ...``, 0-based, so hosts write disjoint shards):

* ``train-0000i-of-0000n.array_record``, ``validation-...``: :mod:`fdpo.records` records;
  the split is by a hash of the problem id (``config.val_fraction``), so it is deterministic and a
  problem never lands in both splits;
* ``manifest-0000i-of-0000n.json`` (and ``manifest.json`` when n = 1; ``--merge`` merges the
  shard manifests of a finished multi-host build into ``manifest.json``);
* ``drops-0000i-of-0000n.jsonl``: every dropped input line with its line number and reason
  (``too_long`` and ``empty_chosen_mid`` with their token counts and limits);
* ``pairs-0000i-of-0000n.jsonl``: one line per record written (split, index in its shard,
  pair_id, id, Diff), and ``problem_ids-0000i-of-0000n.json``: the selection's inputs;
* ``{train,validation}-selected.array_record``: the kept pairs, in pair_id order, when the
  global selection cuts a split (the manifest then names this file, not the shards);
* ``preview-0000i-of-0000n.html``: the first pairs with prefix / mid / suffix marked.

Every input line of the shard is either used (yields at least one record) or dropped with one
reason: ``lines_in = lines_used + lines_dropped`` is checked before the manifest is written.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import html
import json
import logging
import math
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Any, Iterator

import numpy as np

from data_tools import rank as rank_lib
from data_tools import segments as seg_lib
from fdpo import atomic, extract, problem, records
from fdpo.tokenization import PROMPT_FORMATS, Encoder, load_tokenizer

log = logging.getLogger("data_tools.build")

# Input-level drop reasons (pipeline reasons live in data_tools.segments).
BLANK_LINE = "blank_line"
MALFORMED_JSON = "malformed_json"
MALFORMED_RECORD = "malformed_record"
MALFORMED_UTF8 = "malformed_utf8"
NO_PROGRAM = "no_program"  # no sample of the problem holds a program
ONLY_TRUNCATED_CORRECT = "only_truncated_correct"  # every correct sample hit the token limit
ONLY_TRUNCATED_INCORRECT = "only_truncated_incorrect"  # (config.truncated = "drop")
RFT_NEEDS_VERDICTS = "ready_pair_without_verdicts"  # emit="rft" reads problem records only
NO_ORACLE_FOCUS = "no_oracle_focus"  # focus="oracle": the record has no "oracle_focus"
ORACLE_FOCUS_INVALID = "oracle_focus_invalid"  # not a string holding a Python regex
ORACLE_FOCUS_NO_MATCH = "oracle_focus_no_match"  # a side's code span holds no match
TRUNCATED_POLICIES = ("drop", "reject_only")
MAX_PAIRS_PER_PROBLEM = 1000  # pair_id = line_number * 1000 + k stays unique and traceable
SPLITS = ("train", "validation")
RESPONSES = ("response", "program")
EMITS = ("pairs", "rft")
FOCUSES = ("error_point", "random", "oracle")
# A sample's finish reason (fdpo.sampling): "eos" when the policy ended it with an EOS token
# (not among its recorded ids), "stop" at a stop string (its ids run through the token that
# completed the stop string, its text ends before it), "length" at max_new_tokens.
ENDED_BY_EOS = "eos"
ENDED_BY_STOP_STRING = "stop"


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    max_len: int = 2048
    ranker: str = "mutual"
    damping: float = rank_lib.DEFAULT_DAMPING
    max_iter: int = rank_lib.DEFAULT_MAX_ITER
    patience: int = rank_lib.DEFAULT_PATIENCE
    lam: float = seg_lib.DEFAULT_LAMBDA
    pairs_per_problem: int = 1
    granularity: str = "token"  # or "line"
    val_fraction: float = 1 / 6  # the paper's 5,000 train : 1,000 validation
    shard_index: int = 0
    num_shards: int = 1
    chunk_size: int = 2048
    preview_pairs: int = 20
    # A sample cut by max_new_tokens is never chosen; "drop": not rejected either (its
    # cut-off end would make the pair's difference the truncation), "reject_only": it may be.
    truncated: str = "drop"
    # Global selection by Diff after all shards; 0 keeps every pair of the split.
    train_pairs: int = 0
    val_pairs: int = 0
    # What a sample's pair side is made of: "response" (on-policy: the policy's own response
    # tokens, EOS only where it stopped by EOS) or "program" (the extracted program:
    # off-policy, EOS only with append_eos).
    response: str = "response"
    append_eos: bool = False  # response="program" only
    # fdpo.tokenization.PROMPT_FORMATS; "": the format the problem records were sampled with
    # (their "prompt_format"), else the tokenizer's default.
    prompt_format: str = ""
    # What the output holds (docs/data.md): "pairs" (preference pairs) or "rft" (one SFT
    # record per correct sample of every problem, for rejection-sampling fine-tuning).
    emit: str = "pairs"
    # Where the MID class (the up-weighted span) lies in each pair (docs/data.md):
    # "error_point" (the divergent tokens), "random" (an equal-length span elsewhere; a
    # control) or "oracle" (the first match of the problem's "oracle_focus" regex).
    focus: str = "error_point"
    focus_seed: int = 0  # random focus and shuffle_labels draw from (focus_seed, pair_id)
    shuffle_labels: bool = False  # control: swap each pair's sides with probability 1/2

    def validate(self) -> None:
        if self.ranker not in rank_lib.RANKERS:
            raise ValueError(f"config.ranker={self.ranker!r}: choose one of {sorted(rank_lib.RANKERS)}")
        if self.granularity not in ("token", "line"):
            raise ValueError(f"config.granularity={self.granularity!r}: choose 'token' or 'line'")
        if self.max_len < 2:
            raise ValueError(f"config.max_len={self.max_len} must be >= 2")
        if not 1 <= self.pairs_per_problem <= MAX_PAIRS_PER_PROBLEM:
            raise ValueError(f"config.pairs_per_problem={self.pairs_per_problem} must be in 1..{MAX_PAIRS_PER_PROBLEM}")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError(f"config.val_fraction={self.val_fraction} must be in [0, 1]")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"config.shard_index={self.shard_index} must be in [0, config.num_shards={self.num_shards})")
        if self.response not in RESPONSES:
            raise ValueError(f"config.response={self.response!r}: choose one of {RESPONSES}")
        if self.chunk_size < 1:
            raise ValueError("config.chunk_size must be >= 1")
        if not (math.isfinite(self.damping) and 0.0 < self.damping <= 1.0):
            raise ValueError(f"config.damping={self.damping} must be in (0, 1]")
        if self.max_iter < 1:
            raise ValueError(f"config.max_iter={self.max_iter} must be >= 1")
        if self.patience < 0:
            raise ValueError(f"config.patience={self.patience} must be >= 0 (0: stop only "
                             "at the fixed point or max_iter)")
        if not math.isfinite(self.lam):
            raise ValueError(f"config.lam={self.lam} must be a finite number")
        if self.preview_pairs < 0:
            raise ValueError(f"config.preview_pairs={self.preview_pairs} must be >= 0")
        if self.prompt_format and self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"config.prompt_format={self.prompt_format!r}: choose one of "
                             f"{PROMPT_FORMATS} or '' (the records' own)")
        if self.truncated not in TRUNCATED_POLICIES:
            raise ValueError(f"config.truncated={self.truncated!r}: choose one of {TRUNCATED_POLICIES}")
        if self.train_pairs < 0 or self.val_pairs < 0:
            raise ValueError(f"config.train_pairs={self.train_pairs}, config.val_pairs={self.val_pairs}: "
                             "must be >= 0 (0 keeps all)")
        if self.emit not in EMITS:
            raise ValueError(f"config.emit={self.emit!r}: choose one of {EMITS}")
        if self.focus not in FOCUSES:
            raise ValueError(f"config.focus={self.focus!r}: choose one of {FOCUSES}")
        if isinstance(self.focus_seed, bool) or not isinstance(self.focus_seed, int) \
                or self.focus_seed < 0:
            raise ValueError(f"config.focus_seed={self.focus_seed!r} must be an integer >= 0")
        if self.emit == "rft":
            # SFT records have no pair: nothing to focus, swap or select by Diff.
            for field, value, default in (("focus", self.focus, "error_point"),
                                          ("shuffle_labels", self.shuffle_labels, False),
                                          ("train_pairs", self.train_pairs, 0),
                                          ("val_pairs", self.val_pairs, 0),
                                          ("pairs_per_problem", self.pairs_per_problem, 1)):
                if value != default:
                    raise ValueError(f"config.{field}={value!r} applies to pairs only; with "
                                     f"config.emit='rft' (every correct sample, no pairs) leave "
                                     f"it at {default!r}")

    def shard_tag(self) -> str:
        return f"{self.shard_index:05d}-of-{self.num_shards:05d}"


@dataclasses.dataclass
class Item:
    """One parsed input line."""

    line: int  # 1-based line number in the input file
    name: str  # problem id (string), drives the split and problem_id
    prompt: str
    codes: list[str]  # for a ready pair: [chosen, rejected]
    passed: np.ndarray | None  # bool[codes, tests]; None for a ready pair
    truncated: np.ndarray | None = None  # bool[codes]: finished by the token limit
    samples: int = 0  # samples in the record, with an empty program or not
    # Per ranked code (problem records; None for a ready pair): the policy's raw response,
    # its token ids when recorded, and its finish reason ("eos" / "stop" / "length").
    responses: list[str] | None = None
    response_ids: list[list[int] | None] | None = None
    finish: list[str] | None = None
    # The problem record's: the prompt's token ids as the sampler fed them (None: not recorded).
    prompt_ids: list[int] | None = None
    # The record's "oracle_focus" (a regex marking the generator's decision span; read only
    # under config.focus="oracle"); None when absent.
    oracle_focus: Any = None
    # For the preview: `kept[k]` is the record's sample index of ranked code k; the tests.
    kept: list[int] | None = None
    tests: list[str] | None = None
    # Set by the ranking, for the preview (per ranked code): {"scores", "ranks", "correct",
    # "ground_truth" (bool per test: passed by the top code), "top" (ranked code index)}.
    ranking: dict[str, Any] | None = None


class Drops:
    """Counts and lists every dropped input line."""

    def __init__(self):
        self.reasons: collections.Counter = collections.Counter()
        self.entries: list[dict[str, Any]] = []

    def add(self, line: int, reason: str, detail: str = "", name: str | None = None,
            numbers: dict[str, Any] | None = None) -> None:
        self.reasons[reason] += 1
        self.entries.append({"line": line, "id": name, "reason": reason, "detail": detail,
                             **(numbers or {})})
        if reason in (MALFORMED_JSON, MALFORMED_RECORD, MALFORMED_UTF8) and self.reasons[reason] <= 20:
            log.warning("line %d dropped (%s): %s", line, reason, detail)


# ------------------------------------------------------------------------------- parsing

class FormatError(ValueError):
    """An input line of the wrong format altogether (not one bad record): stops the build."""


def _parse_line(line_no: int, text: str, drops: Drops, path: str = "input",
                prompt_format: str | None = None) -> Item | None:
    if not text.strip():
        drops.add(line_no, BLANK_LINE)
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        drops.add(line_no, MALFORMED_JSON, f"line {line_no}: {e}")
        return None
    try:
        return _to_item(line_no, obj, path, prompt_format)
    except FormatError:
        raise
    except ValueError as e:
        name = obj.get("id") if isinstance(obj, dict) else None
        drops.add(line_no, MALFORMED_RECORD, f"line {line_no}: {e}", None if name is None else str(name))
        return None


def _record_item(line_no: int, obj: dict, path: str, prompt_format: str | None = None) -> Item:
    """A problem record -> the codes that are ranked: its samples with a program.
    `prompt_format`: the build's; a record sampled with another is an error (file:line)."""
    for key in ("version", "passed"):
        if key not in obj:  # a whole file of the wrong kind, not one bad line
            raise FormatError(f"{path}:{line_no}: missing field {key!r}: "
                              + ("launch.build reads problem records after launch.execute"
                                 if key == "passed" else
                                 "a problem line in the format before problem records ('codes', "
                                 "no 'version'); sample and execute again (docs/data.md)"))
    try:
        problem.check(obj, f"line {line_no}", problem.EXECUTED)
    except problem.RecordError as e:
        raise ValueError(str(e).removeprefix(f"line {line_no}: ")) from None
    recorded = obj.get("prompt_format")
    if prompt_format is not None and recorded is not None and recorded != prompt_format:
        raise FormatError(f"{path}:{line_no}: sampled with prompt_format={recorded!r}, but this "
                          f"build renders prompts as {prompt_format!r}; give "
                          f"--config.prompt_format={recorded} (or leave it empty to use the "
                          "records' own), or sample again")
    keep = problem.usable(obj)
    what = "response" if obj.get("response_format") == "completion" else "program"
    samples = obj["samples"]
    passed = np.array(obj["passed"], bool).reshape(len(samples), len(obj["tests"]))[keep]
    return Item(line_no, obj["id"], obj["prompt"], [samples[i][what] for i in keep], passed,
                np.array([samples[i]["finish"] == problem.TRUNCATED for i in keep], bool),
                len(samples), responses=[samples[i]["response"] for i in keep],
                response_ids=[samples[i].get("response_ids") for i in keep],
                finish=[samples[i]["finish"] for i in keep], prompt_ids=obj.get("prompt_ids"),
                kept=keep, tests=list(obj["tests"]), oracle_focus=obj.get("oracle_focus"))


def _to_item(line_no: int, obj: Any, path: str = "input", prompt_format: str | None = None) -> Item:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "version" in obj or "codes" in obj:
        return _record_item(line_no, obj, path, prompt_format)

    def text(key):
        if key not in obj:
            raise ValueError(f"missing field {key!r}")
        if not isinstance(obj[key], str):
            raise ValueError(f"field {key!r} must be a string, got {type(obj[key]).__name__}")
        return obj[key]

    def ident():
        v = obj.get("id")
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError(f"field 'id' must be a string or an integer, got {type(v).__name__}")
        return str(v)

    if "chosen" in obj or "rejected" in obj:
        prompt, chosen, rejected = text("prompt"), text("chosen"), text("rejected")
        name = ident()
        if name is None:  # same prompt -> same split, so no prompt leaks into validation
            name = "prompt-sha256:" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]
        return Item(line_no, name, prompt, [chosen, rejected], None,
                    oracle_focus=obj.get("oracle_focus"))
    raise ValueError("neither a problem record ('version', 'id', 'prompt', 'samples', 'tests', "
                     "'passed') nor a ready pair ('prompt', 'chosen', 'rejected')")


def _read_chunks(path: str, config: BuildConfig, drops: Drops, progress: bool,
                 counts: collections.Counter, seen: dict[str, int],
                 prompt_format: str | None = None) -> Iterator[list[Item]]:
    """Chunks of this shard's parsed lines; `seen` gets {problem id: line} of its records."""
    from tqdm import tqdm

    chunk: list[Item] = []
    # Binary mode, decoded line by line: one line of bad UTF-8 is dropped with its own line
    # number instead of failing (or mis-numbering) the whole buffered read.
    with open(path, "rb") as f, tqdm(desc=f"read {os.path.basename(path)}", unit=" lines",
                                     disable=not progress, file=sys.stderr) as bar:
        for line_no, raw in enumerate(f, start=1):
            bar.update(1)
            if (line_no - 1) % config.num_shards != config.shard_index:
                continue  # another host's line
            counts["lines_in"] += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                drops.add(line_no, MALFORMED_UTF8, f"line {line_no}: not valid UTF-8: {e}")
                continue
            item = _parse_line(line_no, text, drops, path, prompt_format)
            if item is not None and item.passed is not None:
                if item.name in seen:
                    raise FormatError(f"{path}:{line_no}: duplicate problem id {item.name!r}, "
                                      f"first at {path}:{seen[item.name]}")
                seen[item.name] = line_no
                counts["samples_in"] += item.samples
                counts["samples_empty_program"] += item.samples - len(item.codes)
                counts["samples_truncated"] += int(item.truncated.sum())
            if item is not None:
                counts["problems_in" if item.passed is not None else "ready_pairs_in"] += 1
                chunk.append(item)
            if len(chunk) >= config.chunk_size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------- tokenising

def _token_range(tok, ids: list[int], text: str, span: tuple[int, int]) -> tuple[int, int] | None:
    """Tokens [a, b) of `ids` (which decode to `text`) covering characters `span`: a token
    that straddles a boundary counts as code. None when the ids do not decode to the text."""
    def chars(k):
        return len(tok.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False))

    if chars(len(ids)) != len(text):
        return None
    start, end = span
    lo, hi = 0, len(ids)
    while lo < hi:  # most tokens whose text ends at or before `start`
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if chars(mid) <= start else (lo, mid - 1)
    a, hi = lo, len(ids)
    while lo < hi:  # fewest tokens whose text reaches `end`
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if chars(mid) >= end else (mid + 1, hi)
    return a, lo


def _sample_tokens(it: Item, enc: Encoder, config: BuildConfig, counts: collections.Counter
                   ) -> list[tuple[np.ndarray, int, int, tuple[int, int]]]:
    """(token ids of each sample's pair side, code span start, end in tokens, the code span
    in characters of the side's text) for a problem given as samples (module docstring:
    on-policy responses, or programs)."""
    eos = [] if enc.eos is None else [enc.eos]
    if config.response == "program":
        ids = enc.tok(it.codes, add_special_tokens=False)["input_ids"]
        tail = eos if config.append_eos else []
        return [(np.asarray(list(x) + tail, np.int64), 0, len(x) + len(tail), (0, len(code)))
                for x, code in zip(ids, it.codes)]
    # A stop string's tokens are in the ids but not in the text: tokenise the text instead.
    todo = [k for k, r in enumerate(it.response_ids)
            if r is None or it.finish[k] == ENDED_BY_STOP_STRING]
    made = enc.tok([it.responses[k] for k in todo], add_special_tokens=False)["input_ids"] if todo else []
    given = dict(zip(todo, made))
    out = []
    for k, text in enumerate(it.responses):
        ids = list(given[k] if k in given else it.response_ids[k])
        if ids and ids[-1] == enc.eos:
            ids = ids[:-1]  # recorded with its stop token: the EOS is added below by `finish`
        tail = eos if it.finish[k] == ENDED_BY_EOS else []  # only where the data says so
        span = extract.program_span(text)
        rng = None if span is None else _token_range(enc.tok, ids, text, span)
        counts["code_spans." + ("whole_response" if span is None else
                                "unmapped" if rng is None else "fenced")] += 1
        a, b = rng if rng is not None else (0, len(ids) + len(tail))  # all code: EOS is its end
        chars = span if rng is not None else (0, len(text))
        out.append((np.asarray(ids + tail, np.int64), a, b, chars))
    return out


# ---------------------------------------------------------------------------------- build

def split_of(name: str, val_fraction: float) -> str:
    """Deterministic split by a salted sha256 of the problem id."""
    h = hashlib.sha256(b"fdpo-split:" + name.encode("utf-8")).digest()
    return "validation" if int.from_bytes(h[:8], "little") / 2**64 < val_fraction else "train"


def _make_record(item: Item, pair_index: int, prompt: np.ndarray, chosen: np.ndarray,
                 rejected: np.ndarray, pair: seg_lib.Pair, L: int, pad: int,
                 outside: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
                 ) -> records.PairRecord:
    """`outside`: (lead, trail) token counts of chosen and rejected around their code spans
    (zero for completions and programs: all code)."""
    def side(resp):
        ids = np.full(L, pad, np.int32)
        ids[:len(prompt)] = prompt
        ids[len(prompt):len(prompt) + len(resp)] = resp
        return ids

    return records.PairRecord(
        chosen_ids=side(chosen), rejected_ids=side(rejected),
        chosen_segments=seg_lib.segment_ids(len(prompt), len(chosen), pair.prefix_len, pair.suffix_len, L,
                                            *outside[0]),
        rejected_segments=seg_lib.segment_ids(len(prompt), len(rejected), pair.prefix_len, pair.suffix_len, L,
                                              *outside[1]),
        pair_id=item.line * MAX_PAIRS_PER_PROBLEM + pair_index,
        problem_id=records.stable_problem_id(item.name), problem_name=item.name)


def _ready_pair(chosen: np.ndarray, rejected: np.ndarray, enc: Encoder, config: BuildConfig) -> seg_lib.Pair:
    p, s = seg_lib.common_prefix_suffix(chosen, rejected)
    if config.granularity == "line":
        p, s = seg_lib.snap_to_lines(p, s, seg_lib.line_boundaries(enc.newline_flags(chosen)),
                                     seg_lib.line_boundaries(enc.newline_flags(rejected)))
    longest = max(len(chosen), len(rejected))
    common = (p + s) / longest if longest else 1.0
    # A ready pair has no ranking: rank_diff is 0 and Diff is the common fraction alone.
    return seg_lib.Pair(0, 1, p, s, len(chosen), len(rejected), 0.0, common, config.lam * common)


def swap_sides(rec: records.PairRecord) -> records.PairRecord:
    """The record with its chosen and rejected sides (ids and segments) exchanged."""
    return dataclasses.replace(rec, chosen_ids=rec.rejected_ids, rejected_ids=rec.chosen_ids,
                               chosen_segments=rec.rejected_segments,
                               rejected_segments=rec.chosen_segments)


def _oracle_segments(rx, text: str, chars: tuple[int, int], ids: np.ndarray,
                     span: tuple[int, int], prompt_len: int, enc: Encoder, L: int
                     ) -> tuple[np.ndarray | None, str]:
    """One side's segment ids under focus="oracle" (docs/data.md): MID = the tokens covering
    the first non-empty match of `rx` in the side's code span (`chars` in `text`, `span` in
    tokens), PREFIX / SUFFIX the rest of the code span; (None, why) when there is none."""
    match = rx.search(text, *chars)
    if match is None or match.end() == match.start():
        return None, f"no (non-empty) match of {rx.pattern!r} in the code of {text!r}"
    body = ids[:-1] if enc.eos is not None and len(ids) and ids[-1] == enc.eos else ids
    tokens = _token_range(enc.tok, body.tolist(), text, match.span())
    if tokens is None:
        return None, f"the response tokens do not decode to its text {text!r}"
    (a, b), (ma, mb) = span, tokens
    ma, mb = max(ma, a), min(mb, b)  # a token straddling the code span's edge stays outside
    return seg_lib.segment_ids(prompt_len, len(ids), ma - a, b - mb, L, a, len(ids) - b), ""


def _refocus(rec: records.PairRecord, it: Item, sides_ids, sides, prompt_len: int,
             config: BuildConfig, enc: Encoder) -> tuple[records.PairRecord | None, str, str]:
    """`rec` with its MID class placed by config.focus (docs/data.md), or (None, drop reason,
    detail). `sides`: (text, code span in characters, code span in tokens) per side."""
    if config.focus == "error_point":
        return rec, "", ""
    segs = [rec.chosen_segments, rec.rejected_segments]
    if config.focus == "random":
        for k in (0, 1):
            segs[k] = seg_lib.random_focus(segs[k], seg_lib.focus_rng(config.focus_seed, rec.pair_id, k))
            if segs[k] is None:
                return None, seg_lib.NO_RANDOM_SPAN, (
                    f"the {records.SIDES[k]} mid is longer than its common prefix and suffix")
    else:
        try:
            rx = re.compile(it.oracle_focus)
        except (TypeError, re.error) as e:
            return None, ORACLE_FOCUS_INVALID, f"'oracle_focus' {it.oracle_focus!r}: {e}"
        for k in (0, 1):
            text, chars, span = sides[k]
            segs[k], why = _oracle_segments(rx, text, chars, sides_ids[k], span, prompt_len, enc,
                                            config.max_len)
            if segs[k] is None:
                return None, ORACLE_FOCUS_NO_MATCH, f"{records.SIDES[k]}: {why}"
    return dataclasses.replace(rec, chosen_segments=segs[0], rejected_segments=segs[1]), "", ""


def _rft_records(it: Item, prompt: np.ndarray, full: list[np.ndarray],
                 spans: list[tuple[int, int]], correct: np.ndarray, split: str, L: int,
                 pad: int, counts: collections.Counter, path: str) -> list[tuple]:
    """config.emit="rft": one SFT record per correct sample of the problem (the ranking's
    verdict, truncated samples already excluded), identical programs included (each
    sample once). The chosen side is the sample, its code span MID (LEAD / TRAIL around it,
    as in pairs); the rejected side is the prompt alone: with an empty response, the longest
    common prefix and suffix are empty, so this is the pair rule's own layout. pair_id =
    line * 1000 + the sample's index in the problem record."""
    out, seen = [], set()
    empty = np.zeros(0, np.int64)
    for k in correct:
        ids = full[k]
        counts["rft.correct_samples"] += 1
        if len(prompt) + len(ids) > L:
            counts["rft.samples_too_long"] += 1
            continue
        index = it.kept[k] if it.kept is not None else int(k)
        if index >= MAX_PAIRS_PER_PROBLEM:
            raise FormatError(f"{path}:{it.line}: emit='rft' numbers at most "
                              f"{MAX_PAIRS_PER_PROBLEM} samples per problem (pair_id)")
        key = ids.tobytes()
        counts["rft.duplicate_samples"] += key in seen
        seen.add(key)
        a, b = spans[k]
        pair = seg_lib.Pair(int(k), int(k), 0, 0, b - a, 0, 0.0, 0.0, 0.0)
        rec = _make_record(it, index, prompt, ids, empty, pair, L, pad,
                           ((a, len(ids) - b), (0, 0)))
        counts["rft.records"] += 1
        out.append((split, rec, it, pair, ids, empty, prompt, False))
    return out


def _pair_numbers(pair: seg_lib.Pair, reason: str, prompt_len: int, L: int) -> dict[str, Any]:
    """What a drop record of a filtered ready pair carries: its token counts and limits."""
    numbers = {"chosen_tokens": pair.chosen_len, "rejected_tokens": pair.rejected_len,
               "prefix_tokens": pair.prefix_len, "suffix_tokens": pair.suffix_len}
    if reason == seg_lib.TOO_LONG:
        numbers.update(max_len=L, prompt_tokens=prompt_len, room=L - prompt_len)
    return numbers


def _process_chunk(items: list[Item], enc: Encoder, config: BuildConfig, drops: Drops,
                   counts: collections.Counter, timings: collections.Counter,
                   path: str = "input") -> list[tuple]:
    """Ranks, tokenises and pairs one chunk (a recorded prompt that renders to other ids is
    an error naming `path`:line); returns a list of
    (split, record, item, pair, chosen_ids, rejected_ids, prompt_ids, swapped): the sides
    as written (`swapped`: exchanged by config.shuffle_labels)."""
    L = config.max_len
    t = time.perf_counter()
    # A record with no program has nothing to rank: it is dropped below.
    problems = [it for it in items if it.passed is not None and it.codes]
    verdicts = ranks = None
    if problems:
        A, cm, tm = rank_lib.pad_batch([it.passed for it in problems])
        kwargs = {}
        if config.ranker == "mutual":
            kwargs = dict(damping=config.damping, max_iter=config.max_iter, patience=config.patience)
        res = rank_lib.rank(A, cm, tm, method=config.ranker, **kwargs)
        verdicts = rank_lib.classify(A, res, cm, tm)
        ranks = res.ranks
        # Finish reasons: a truncated sample is never chosen, and under "drop" not rejected.
        cut = np.zeros_like(cm)
        for b, it in enumerate(problems):
            cut[b, :len(it.codes)] = it.truncated
        counts["truncated_not_chosen"] += int((verdicts.correct & cut).sum())
        correct = verdicts.correct & ~cut
        incorrect = verdicts.incorrect
        if config.truncated == "drop":
            counts["truncated_not_rejected"] += int((incorrect & cut).sum())
            incorrect = incorrect & ~cut
        unmasked = verdicts  # for the drop reason of a problem the masks empty
        for b, it in enumerate(problems):
            c, n_tests = len(it.codes), it.passed.shape[1]
            it.ranking = {"scores": res.code_scores[b, :c], "ranks": ranks[b, :c],
                          "correct": verdicts.correct[b, :c],
                          "ground_truth": verdicts.ground_truth[b, :n_tests],
                          "top": int(verdicts.top_code[b])}
        verdicts = dataclasses.replace(verdicts, correct=correct, incorrect=incorrect)
    timings["rank"] += time.perf_counter() - t

    t = time.perf_counter()
    prompt_ids = enc.prompts([it.prompt for it in items])
    for it, ids in zip(items, prompt_ids):
        if it.prompt_ids is not None and ids.tolist() != it.prompt_ids:
            k = next((i for i, (a, b) in enumerate(zip(ids.tolist(), it.prompt_ids)) if a != b),
                     min(len(ids), len(it.prompt_ids)))
            raise FormatError(
                f"{path}:{it.line}: the prompt renders here (prompt_format "
                f"{enc.prompt_format!r}) to {len(ids)} tokens that differ at token {k} from the "
                f"{len(it.prompt_ids)} the sampler fed the policy ('prompt_ids'): build with the "
                "sampler's tokenizer and prompt format")
    # Only problems with both a correct and an incorrect code need their codes tokenised.
    need = {}
    for b, it in enumerate(problems):
        c = len(it.codes)
        if verdicts.correct[b, :c].any() and (config.emit == "rft"
                                              or verdicts.incorrect[b, :c].any()):
            need[id(it)] = b
    texts = []
    for it in items:
        if (it.passed is None or id(it) in need) and it.responses is None:
            texts.extend(it.codes)
    sampled = {id(it): _sample_tokens(it, enc, config, counts) for it in items
               if id(it) in need and it.responses is not None}
    flat = enc.responses(texts)
    timings["tokenize"] += time.perf_counter() - t

    t = time.perf_counter()
    out = []
    pos = 0
    prob_index = {id(it): b for b, it in enumerate(problems)}
    for it, prompt in zip(items, prompt_ids):
        room = L - len(prompt)
        if it.passed is None:
            chosen, rejected = flat[pos], flat[pos + 1]
            pos += 2
            if config.emit == "rft":  # no verdicts: no correct samples to train on
                drops.add(it.line, RFT_NEEDS_VERDICTS, name=it.name)
                continue
            pair = _ready_pair(chosen, rejected, enc, config)
            reason = seg_lib.candidate_reason(pair, room)
            if reason is not None:
                counts["candidate_pairs_filtered." + reason] += 1
                drops.add(it.line, reason, name=it.name, numbers=_pair_numbers(
                    pair, reason, len(prompt), L))
                continue
            sides = tuple((t, (0, len(t)), (0, len(x)))
                          for t, x in ((it.codes[0], chosen), (it.codes[1], rejected)))
            selected = [(pair, chosen, rejected, ((0, 0), (0, 0)), sides)]
        elif not it.codes:
            drops.add(it.line, NO_PROGRAM, name=it.name, numbers={"samples": it.samples})
            continue
        else:
            b = prob_index[id(it)]
            c = len(it.codes)
            if id(it) not in need:
                if not verdicts.correct[b, :c].any():
                    reason = (ONLY_TRUNCATED_CORRECT if unmasked.correct[b, :c].any()
                              else seg_lib.NO_CORRECT)
                else:
                    reason = (ONLY_TRUNCATED_INCORRECT if unmasked.incorrect[b, :c].any()
                              else seg_lib.NO_INCORRECT)
                drops.add(it.line, reason, name=it.name, numbers={
                    "codes": c, "truncated": int(it.truncated.sum()),
                    "correct": int(unmasked.correct[b, :c].sum())})
                continue
            if id(it) in sampled:
                full = [x[0] for x in sampled[id(it)]]
                spans = [(a, b) for _, a, b, _ in sampled[id(it)]]
                chars = [x[3] for x in sampled[id(it)]]
            else:
                full = flat[pos:pos + c]
                pos += c
                spans = [(0, len(x)) for x in full]
                chars = [(0, len(x)) for x in it.codes]
            texts_k = it.codes if config.response == "program" or it.responses is None else it.responses
            if config.emit == "rft":
                made = _rft_records(it, prompt, full, spans, np.nonzero(verdicts.correct[b, :c])[0],
                                    split_of(it.name, config.val_fraction), L, enc.pad, counts, path)
                if not made:  # every correct sample is longer than the record
                    lens = [len(full[k]) for k in np.nonzero(verdicts.correct[b, :c])[0]]
                    drops.add(it.line, seg_lib.TOO_LONG, name=it.name, numbers={
                        "max_len": L, "prompt_tokens": len(prompt), "room": room,
                        "shortest_correct_tokens": min(lens)})
                    continue
                counts["lines_used"] += 1
                out.extend(made)
                continue
            seqs = [x[a:b] for x, (a, b) in zip(full, spans)]  # the code spans
            flags = [enc.newline_flags(s) for s in seqs] if config.granularity == "line" else None
            sel = seg_lib.select_pairs(seqs, ranks[b, :c], verdicts.correct[b, :c], verdicts.incorrect[b, :c],
                                       lam=config.lam, max_pairs=config.pairs_per_problem,
                                       max_response_len=room, newline_flags=flags,
                                       snap_lines=config.granularity == "line",
                                       response_lens=[len(x) for x in full])
            for reason, n in sel.filtered.items():
                counts["candidate_pairs_filtered." + reason] += n
            if not sel.pairs:
                lens = np.array([len(x) for x in full])  # too_long is judged on whole sides
                ci = np.nonzero(verdicts.correct[b, :c])[0]
                ri = np.nonzero(verdicts.incorrect[b, :c])[0]
                drops.add(it.line, sel.drop_reason, name=it.name, numbers={
                    "filtered": dict(sorted(sel.filtered.items())), "max_len": L,
                    "prompt_tokens": len(prompt), "room": room,
                    # the fewest response tokens any (correct, incorrect) pair needs
                    "shortest_pair_tokens": int(np.maximum.outer(lens[ci], lens[ri]).min())})
                continue
            outside = lambda k: (spans[k][0], len(full[k]) - spans[k][1])  # noqa: E731
            side = lambda k: (texts_k[k], chars[k], spans[k])  # noqa: E731
            selected = [(p, full[p.chosen], full[p.rejected], (outside(p.chosen), outside(p.rejected)),
                         (side(p.chosen), side(p.rejected))) for p in sel.pairs]
        if config.focus == "oracle" and it.oracle_focus is None:
            drops.add(it.line, NO_ORACLE_FOCUS, name=it.name)
            continue
        split = split_of(it.name, config.val_fraction)
        made, first = [], None
        for k, (pair, chosen, rejected, outside, sides) in enumerate(selected):
            rec = _make_record(it, k, prompt, chosen, rejected, pair, L, enc.pad, outside)
            rec, reason, detail = _refocus(rec, it, (chosen, rejected), sides, len(prompt), config,
                                           enc)
            if rec is None:
                counts["candidate_pairs_filtered." + reason] += 1
                first = first or (reason, detail)
                continue
            swap = config.shuffle_labels and bool(
                seg_lib.focus_rng(config.focus_seed, rec.pair_id, 2).random() < 0.5)
            if swap:
                rec, chosen, rejected = swap_sides(rec), rejected, chosen
            counts["focus_pairs"] += 1
            made.append((split, rec, it, pair, chosen, rejected, prompt, swap))
        if not made:
            drops.add(it.line, first[0], f"line {it.line}: {first[1]}", name=it.name)
            continue
        counts["lines_used"] += 1
        out.extend(made)
    assert pos == len(flat), "tokenised responses were not all consumed"
    timings["pairs"] += time.perf_counter() - t
    return out


def recorded_prompt_format(path: str, max_lines: int = 100) -> str:
    """The ``prompt_format`` of the first problem record among the first `max_lines` lines of
    `path` ("" when none says): what ``config.prompt_format=""`` builds with. Every other
    record is checked against it as it is read."""
    with open(path, "rb") as f:
        for _, raw in zip(range(max_lines), f):
            try:
                obj = json.loads(raw)
            except ValueError:  # bad JSON or UTF-8: counted as a drop when read
                continue
            if isinstance(obj, dict) and isinstance(obj.get("prompt_format"), str):
                return obj["prompt_format"]
    return ""


def build(input_path: str, tokenizer_path: str, out_dir: str, config: BuildConfig = BuildConfig(),
          progress: bool = False, tokenizer=None) -> tuple[dict[str, Any], dict[str, float]]:
    """Runs the whole builder for one shard; returns (manifest, seconds per stage)."""
    config.validate()
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input: no such file {input_path}")
    check_output(out_dir, config)
    timings: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(tokenizer_path)
        except Exception as e:  # transformers raises many types; name the flag in the error
            raise ValueError(f"--tokenizer={tokenizer_path}: cannot load a tokenizer: {e}") from e
    fmt = config.prompt_format or recorded_prompt_format(input_path)
    try:
        enc = Encoder(tokenizer, fmt or None)
    except ValueError as e:
        where = "config.prompt_format" if config.prompt_format else f"{input_path} (recorded)"
        raise ValueError(f"{where}: {e} (--tokenizer={tokenizer_path})") from None
    timings["load_tokenizer"] += time.perf_counter() - t0
    work_dir = _open_output(out_dir, config)
    try:
        manifest = _build_into(work_dir, input_path, tokenizer_path, enc, config, progress,
                               timings)
        _finish_output(work_dir, out_dir)
    except BaseException:  # also KeyboardInterrupt, in the swap too: leave no temporary
        _abandon_output(work_dir, out_dir)
        raise
    timings["total"] = time.perf_counter() - t0
    return manifest, dict(timings)


def _build_into(out_dir, input_path, tokenizer_path, enc, config, progress, timings):
    tag = config.shard_tag()
    drops = Drops()
    counts: collections.Counter = collections.Counter()
    paths = {s: os.path.join(out_dir, f"{s}-{tag}.array_record") for s in SPLITS}
    writers = {s: records.RecordWriter(paths[s]) for s in SPLITS}
    preview = []
    seen: dict[str, int] = {}
    written = []  # the global selection's input: one entry per record, in write order
    try:
        t_read = time.perf_counter()
        for chunk in _read_chunks(input_path, config, drops, progress, counts, seen,
                                  enc.prompt_format):
            timings["parse"] += time.perf_counter() - t_read
            for split, rec, it, pair, chosen, rejected, prompt, swapped in _process_chunk(
                    chunk, enc, config, drops, counts, timings, input_path):
                t = time.perf_counter()
                extra = {"swapped": swapped} if config.shuffle_labels else {}
                written.append(write_record(writers[split], split, rec, it, pair, **extra))
                timings["write"] += time.perf_counter() - t
                if len(preview) < config.preview_pairs:
                    preview.append((split, rec, it, pair, chosen, rejected, prompt, swapped))
            t_read = time.perf_counter()
        timings["parse"] += time.perf_counter() - t_read
    finally:
        for w in writers.values():
            w.close()

    out_counts = shard_counts(counts, drops, writers) | {
        # samples_in = with a program + samples_empty_program; truncated samples that the
        # verdicts made correct (never chosen) or, under truncated=drop, incorrect.
        "samples": {k: counts[k] for k in ("samples_in", "samples_empty_program", "samples_truncated",
                                           "truncated_not_chosen", "truncated_not_rejected")},
        # Samples of problems with pairs to make: code span from a fenced block, the whole
        # response (no fence), or the whole response because the span could not be mapped to tokens.
        "code_spans": {k.split(".", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("code_spans.")},
    }
    if config.emit == "rft":
        # Correct samples (truncated ones excluded) = records + samples_too_long;
        # duplicate_samples: records whose tokens repeat an earlier sample of the problem.
        out_counts["rft"] = {k: counts["rft." + k] for k in (
            "correct_samples", "records", "samples_too_long", "duplicate_samples")}
    elif config.focus != "error_point":
        out_counts["focus"] = {"pairs": counts["focus_pairs"], **{
            k: counts["candidate_pairs_filtered." + k] for k in (
                (seg_lib.NO_RANDOM_SPAN,) if config.focus == "random" else
                (ORACLE_FOCUS_NO_MATCH, ORACLE_FOCUS_INVALID))}}
    manifest = write_shard_outputs(
        out_dir, config, writers=writers, paths=paths, drops=drops, counts=out_counts,
        tokenizer=enc.identity(tokenizer_path), input_path=input_path, written=written,
        seen=seen)
    _write_preview(os.path.join(out_dir, f"preview-{tag}.html"), preview, enc, manifest)
    return manifest


def write_record(writer: records.RecordWriter, split: str, rec: records.PairRecord, item,
                 pair: seg_lib.Pair, **extra: Any) -> dict[str, Any]:
    """Writes `rec`; returns its entry for the global selection (`pairs-*.jsonl`), with the
    `extra` fields. `item` has the input line's `name` and `line` (an Item, or
    data_tools.tokenized's TokenPair)."""
    entry = {"split": split, "index": writer.count, "pair_id": int(rec.pair_id),
             "id": item.name, "line": item.line, "diff": pair.diff, **extra}
    writer.write(rec)
    return entry


def shard_counts(counts: collections.Counter, drops: Drops, writers) -> dict[str, Any]:
    """The manifest counts every builder reports, after checking that every line read was
    used or dropped once."""
    lines_dropped = sum(drops.reasons.values())
    if counts["lines_in"] != counts["lines_used"] + lines_dropped:
        raise AssertionError(f"bookkeeping bug: {counts['lines_in']} lines in != "
                             f"{counts['lines_used']} used + {lines_dropped} dropped")
    filtered = {k.split(".", 1)[1]: v for k, v in counts.items()
                if k.startswith("candidate_pairs_filtered.")}
    return {"lines_in": counts["lines_in"], "lines_used": counts["lines_used"],
            "lines_dropped": lines_dropped, "problems_in": counts["problems_in"],
            "ready_pairs_in": counts["ready_pairs_in"],
            "records_out": {s: w.count for s, w in writers.items()},
            "candidate_pairs_filtered": dict(sorted(filtered.items()))}


def write_shard_outputs(out_dir: str, config: BuildConfig, *, writers, paths, drops: Drops,
                        counts: dict[str, Any], tokenizer: dict[str, Any], input_path: str,
                        written: list[dict[str, Any]], seen: dict[str, int]) -> dict[str, Any]:
    """A shard's files after its records (`drops-`, `pairs-`, `problem_ids-`, `manifest-`)
    and, for a single shard, the global selection and `manifest.json`; returns the manifest.
    Shared by the text builder and `data_tools.tokenized`."""
    tag = config.shard_tag()
    drops_path = os.path.join(out_dir, f"drops-{tag}.jsonl")
    with open(drops_path, "w") as f:
        for e in sorted(drops.entries, key=lambda e: e["line"]):  # parse and pipeline drops interleave
            f.write(json.dumps(e) + "\n")
    splits = {s: {"records": writers[s].count,
                  "shards": [{"path": os.path.basename(paths[s]), "records": writers[s].count}]}
              for s in SPLITS}
    cfg = dataclasses.asdict(config)
    for k in ("chunk_size", "preview_pairs"):  # do not change the data, so not part of its identity
        cfg.pop(k)
    manifest = records.make_manifest(max_len=config.max_len, tokenizer=tokenizer, counts=counts,
                                     drop_reasons=dict(drops.reasons), splits=splits, config=cfg)
    manifest["input"] = os.path.abspath(input_path)
    manifest["drops_files"] = [os.path.basename(drops_path)]
    with open(os.path.join(out_dir, f"pairs-{tag}.jsonl"), "w") as f:
        f.writelines(json.dumps(w) + "\n" for w in written)
    with open(os.path.join(out_dir, f"problem_ids-{tag}.json"), "w") as f:
        json.dump({"input": os.path.abspath(input_path), "ids": sorted(seen.items())}, f)
        f.write("\n")
    records.write_manifest(os.path.join(out_dir, f"manifest-{tag}.json"), manifest)
    if config.num_shards == 1:
        manifest = select(out_dir, [manifest])
    return manifest


# ------------------------------------------------------------------ the output directory
# A single-host build writes into a temporary sibling of --out and swaps it into place at
# the end (fdpo.atomic): an existing dataset is replaced whole or not at all, also when the
# build is killed or rejected. A multi-host shard writes its tagged files into --out itself
# (other hosts write there too); `merge` writes manifest.json last, and readers check every
# shard's record count against the manifest (PairDataSource.from_manifest).

_TEMP_TAG = "building"


def _is_single(config: BuildConfig) -> bool:
    return config.num_shards == 1


def check_output(out_dir: str, config: BuildConfig) -> None:
    """--out can be (re)placed: absent, empty, or a dataset a build wrote (the whole
    directory is replaced, so a directory holding anything else is refused)."""
    out = pathlib.Path(out_dir).absolute()
    parent = out.parent  # created when missing: its nearest existing ancestor must be writable
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out={out_dir}: cannot write in {parent}")
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out={out_dir}: exists and is not a directory")
    names = [p.name for p in out.iterdir()]
    built = any(n == "manifest.json" or (n.startswith("manifest-") and n.endswith(".json"))
                for n in names)
    if names and not built and _is_single(config):
        raise ValueError(f"--out={out_dir}: a non-empty directory that holds no built dataset "
                         "(no manifest.json); the build replaces --out whole, so give a new "
                         "or empty directory")


def _open_output(out_dir: str, config: BuildConfig) -> str:
    if not _is_single(config):
        os.makedirs(out_dir, exist_ok=True)
        return out_dir
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    atomic.clean(out_dir, _TEMP_TAG)
    work = atomic.temp_sibling(out_dir, _TEMP_TAG)
    work.mkdir()
    return str(work)


def _finish_output(work_dir: str, out_dir: str) -> None:
    if work_dir != out_dir:
        atomic.replace_dir(work_dir, out_dir)


def _abandon_output(work_dir: str, out_dir: str) -> None:
    """After the swap the temporary holds the old dataset: removing it is right either way."""
    if work_dir != out_dir:
        shutil.rmtree(work_dir, ignore_errors=True)


def merge(out_dir: str) -> dict[str, Any]:
    """Merges ``manifest-*-of-*.json`` of a multi-host build into ``manifest.json``."""
    paths = sorted(glob.glob(os.path.join(out_dir, "manifest-*-of-*.json")))
    if not paths:
        raise FileNotFoundError(f"--out={out_dir}: no manifest-*-of-*.json to merge")
    manifests = [records.read_manifest(p) for p in paths]
    n = manifests[0]["config"]["num_shards"]
    found = sorted(m["config"]["shard_index"] for m in manifests)
    if found != list(range(n)):
        raise ValueError(f"--out={out_dir}: expected shard manifests 0..{n - 1}, found {found}")
    return select(out_dir, manifests)


def _check_unique_ids(out_dir: str, tags: list[str]) -> None:
    """Problem ids that repeat across shards (each shard checks its own lines)."""
    first: dict[str, tuple[str, int]] = {}
    for tag in tags:
        with open(os.path.join(out_dir, f"problem_ids-{tag}.json")) as f:
            data = json.load(f)
        for name, line in data["ids"]:
            if name in first:
                (path, a), b = first[name], line
                raise FormatError(f"{path}:{min(a, b)}: problem id {name!r} repeats at "
                                  f"{data['input']}:{max(a, b)}")
            first[name] = (data["input"], line)


def select(out_dir: str, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The global selection over every shard's records, written as ``manifest.json``.

    Keeps per split the ``train_pairs`` / ``val_pairs`` records of highest Diff (0: all), ties
    broken by problem id, then pair_id: a total order on values that do not depend on the
    sharding (pair_id is the input line's), so any number of shards keeps the same pairs. A
    split that is cut, or comes from several shards, is rewritten in pair_id order to
    ``SPLIT-selected.array_record``: the one shard of a single build is in that order too, so
    every number of shards gives the same records in the same order (a training run's
    batches depend on the order).
    """
    config = manifests[0]["config"]
    tags = [BuildConfig(**{**config, "shard_index": m["config"]["shard_index"]}).shard_tag()
            for m in manifests]
    _check_unique_ids(out_dir, tags)
    merged = records.merge_manifests(manifests)
    merged["input"] = manifests[0].get("input")
    merged["drops_files"] = sum((m.get("drops_files", []) for m in manifests), [])
    entries = {s: [] for s in SPLITS}
    for tag in tags:
        with open(os.path.join(out_dir, f"pairs-{tag}.jsonl")) as f:
            for line in f:
                e = json.loads(line)
                entries[e["split"]].append((tag, e))
    limits = {"train": config["train_pairs"], "validation": config["val_pairs"]}
    selection, kept_by = {}, {}
    for split in SPLITS:
        ranked = sorted(entries[split], key=lambda te: (-te[1]["diff"], te[1]["id"], te[1]["pair_id"]))
        limit = limits[split]
        kept = ranked[:limit] if limit else ranked
        kept_by[split] = kept
        selection[split] = {"candidates": len(ranked), "kept": len(kept), "limit": limit,
                            "cut": len(ranked) - len(kept),
                            "min_diff_kept": kept[-1][1]["diff"] if kept else None}
        if len(kept) == len(ranked) and len(tags) == 1:
            continue  # nothing cut, one shard: the shard is the split
        path = os.path.join(out_dir, f"{split}-selected.array_record")
        sources = {}
        with records.RecordWriter(path) as w:
            for tag, e in sorted(kept, key=lambda te: te[1]["pair_id"]):
                if tag not in sources:
                    sources[tag] = records.PairDataSource(
                        os.path.join(out_dir, f"{split}-{tag}.array_record"))
                w.write(sources[tag].record(e["index"]))
        merged["splits"][split] = {"records": len(kept), "shards": [
            {"path": os.path.basename(path), "records": len(kept)}]}
    merged["counts"]["records_out"] = {s: merged["splits"][s]["records"] for s in SPLITS}
    merged["counts"]["selection"] = selection
    if config.get("shuffle_labels"):  # the records kept whose sides were exchanged
        merged["counts"]["label_swaps"] = {s: sum(bool(e.get("swapped")) for _, e in kept_by[s])
                                           for s in SPLITS}
    records.write_manifest(os.path.join(out_dir, "manifest.json"), merged)
    return merged


# -------------------------------------------------------------------------------- preview

_CSS = """body{font-family:sans-serif;margin:2em} pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em}
.prefix{color:#555}.mid-c{background:#c8f7c5}.mid-r{background:#f7c5c5}.suffix{color:#225}
.lead,.trail{color:#888;font-style:italic;background:#fff6d5}
td{vertical-align:top;width:50%}
table.verdicts td,table.verdicts th{width:auto;padding:0 .4em;text-align:center}
.pass{color:#070}.fail{color:#b00}"""
PASS, FAIL = "\u2713", "\u2717"  # the cells of a pass row


def _verdict_html(it: Item, pair: seg_lib.Pair, lam: float) -> str:
    """A problem record's pair, as the ranking saw it: the ground-truth tests, the chosen and
    rejected samples' pass rows against every test, their scores, ranks and verdicts, and
    the pair's Diff with its terms."""
    r = it.ranking
    k = len(it.codes)
    tests = it.tests or []
    head = "".join(f'<th title="{html.escape(t)}">t{j}</th>' for j, t in enumerate(tests))
    gt = "".join(f"<td>{'&#9679;' if g else '&#9675;'}</td>" for g in r["ground_truth"])
    rows = [f'<table class="verdicts"><tr><th>side</th><th>sample</th>{head}<th>passed</th>'
            "<th>score</th><th>rank (0 = best)</th><th>verdict</th><th>finish</th></tr>",
            f'<tr class="ground-truth"><td>ground truth</td><td>{it.kept[r["top"]]} (top)</td>'
            f'{gt}<td>{int(r["ground_truth"].sum())}/{len(tests)}</td>'
            "<td></td><td></td><td></td><td></td></tr>"]
    for side, c in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        row = it.passed[c]
        cells = "".join(f'<td class="{"pass" if v else "fail"}">{PASS if v else FAIL}</td>'
                        for v in row)
        verdict = "correct" if r["correct"][c] else "incorrect"
        rows.append(f'<tr class="{side}"><td>{side}</td><td>{it.kept[c]}</td>{cells}'
                    f"<td>{int(row.sum())}/{len(tests)}</td><td>{r['scores'][c]:.6g}</td>"
                    f"<td>{int(r['ranks'][c])} of {k}</td><td>{verdict}</td>"
                    f"<td>{html.escape(it.finish[c])}</td></tr>")
    rows.append("</table>")
    ranks = r["ranks"]
    longest = max(pair.chosen_len, pair.rejected_len)
    rows.append(f'<p class="diff">Diff = rank diff ({int(ranks[pair.rejected])} - '
                f"{int(ranks[pair.chosen])}) / ({k} - 1) = {pair.rank_diff:.4f} + lam {lam:g} "
                f"&times; common fraction ({pair.prefix_len} + {pair.suffix_len}) / {longest} = "
                f"{pair.common_frac:.4f} &rarr; {pair.diff:.4f}</p>")
    return "\n".join(rows)


def _write_preview(path: str, preview, enc: Encoder, manifest: dict[str, Any]) -> None:
    dec = enc.tok.decode

    def side(resp, segments, mid_class):
        # The record's own segment ids, so the preview shows what training weights.
        seg = np.asarray(segments)[np.asarray(segments) >= records.Segment.PREFIX]
        names = {records.Segment.LEAD: "lead", records.Segment.PREFIX: "prefix", records.Segment.MID: mid_class,
                 records.Segment.SUFFIX: "suffix", records.Segment.TRAIL: "trail"}
        # Runs in token order: under focus="random" a class need not be one contiguous run.
        cuts = [0, *(np.nonzero(np.diff(seg))[0] + 1), len(seg)]
        parts = [(names[records.Segment(seg[a])], resp[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]
        return "".join(f'<span class="{c}">{html.escape(dec(x.tolist()))}</span>' for c, x in parts if len(x))

    rows = [f"<html><head><meta charset='utf-8'><style>{_CSS}</style></head><body>",
            "<h1>fdpo pair preview</h1>",
            f"<p>grey: common prefix; green: chosen mid; red: rejected mid; blue: common suffix; "
            f"yellow italics: outside the code span (lead / trail: prose, fences, EOS after fenced code). "
            f"Pass rows: {PASS} passes, {FAIL} fails each test t0, t1, ... (hover for its text); "
            f"&#9679; marks the ground truth (the tests the top-ranked code passes). "
            f"Counts: <code>{html.escape(json.dumps(manifest['counts']))}</code></p>"]
    rft = manifest["config"].get("emit") == "rft"
    for split, rec, it, pair, chosen, rejected, prompt, *swapped in preview:
        rows.append(f"<h2>line {it.line} &middot; {html.escape(it.name)} &middot; {split} &middot; "
                    f"pair_id {rec.pair_id}</h2>")
        if rft:  # an SFT record: one correct sample, its code span marked as the mid
            rows.append(f"<p>correct sample {it.kept[pair.chosen]} (RFT record; the rejected "
                        f"side is empty)</p><pre>{html.escape(dec(prompt.tolist()))}</pre>"
                        f"<pre>{side(chosen, rec.chosen_segments, 'mid-c')}</pre>")
            continue
        if swapped and swapped[0]:
            rows.append("<p><b>sides exchanged</b> (shuffle_labels): the chosen column is the "
                        "incorrect sample; the numbers below are the true pair's</p>")
        n_out = lambda seg: [int((seg == v).sum()) for v in (records.Segment.LEAD, records.Segment.TRAIL)]  # noqa: E731
        rows.append(f"<p>lead/trail tokens: chosen {n_out(rec.chosen_segments)}, rejected "
                    f"{n_out(rec.rejected_segments)}</p>")
        rows.append(f"<p>chosen code {pair.chosen}, rejected code {pair.rejected}; prefix {pair.prefix_len}, "
                    f"mids {pair.chosen_mid_len}/{pair.rejected_mid_len}, suffix {pair.suffix_len} tokens; "
                    f"rank diff {pair.rank_diff:.3f}, common {pair.common_frac:.3f}, Diff {pair.diff:.3f}</p>")
        if getattr(it, "ranking", None) is not None:  # a problem record (pairs have no verdicts)
            rows.append(_verdict_html(it, pair, manifest["config"]["lam"]))
        rows.append(f"<pre>{html.escape(dec(prompt.tolist()))}</pre>")
        rows.append(f"<table><tr><th>chosen</th><th>rejected</th></tr><tr>"
                    f"<td><pre>{side(chosen, rec.chosen_segments, 'mid-c')}</pre></td>"
                    f"<td><pre>{side(rejected, rec.rejected_segments, 'mid-r')}</pre></td></tr></table>")
    rows.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(rows))


if __name__ == "__main__":
    sys.exit("data_tools.build is a library; the program is `python -m launch.build` "
             "(tunables under --config.*, e.g. --config.max_len=2048)")
