"""The error-prone-point observation (METHOD.md section 1): the Phi table.

For every problem with at least one correct and one incorrect sample, one (correct,
incorrect) *reference pair* is chosen, and its common prefix, common suffix and the two mids
are computed with :func:`data_tools.segments.common_prefix_suffix` (the suffix never overlaps
the prefix). Then every sample of that problem is tested for four segments *at the same
position*:

==========================  ==================================================
``common prefix``           the sample starts with the prefix
``common suffix``           the sample ends with the suffix
``prefix + chosen mid``     the sample starts with prefix + the chosen mid
``prefix + rejected mid``   the sample starts with prefix + the rejected mid
==========================  ==================================================

Counts over all problems form one 2x2 table per segment: ``n11`` contains and correct,
``n10`` contains and incorrect, ``n01`` lacks it and correct, ``n00`` lacks it and incorrect.
The table reports the frequency among correct samples ``n11 / (n11 + n01)``, among incorrect
samples ``n10 / (n10 + n00)``, and ``phi = (n11*n00 - n10*n01) / sqrt(n1. n0. n.1 n.0)``.
When a margin is zero (e.g. every sample starts with an empty prefix) Phi is undefined and
reported as such (``None``; "undefined" in Markdown): never a division by zero.

Choices [open], with their options:

* reference pair (``pair_rule``): ``diff`` (default) -- the builder's selection rule,
  :func:`data_tools.segments.select_pairs` with ranks from ``ranker`` and ``lam``: highest
  ``rank difference + lam * common fraction``, identical programs and empty chosen mids
  filtered; ``first`` -- the first correct and the first incorrect sample by index;
* correctness (``verdict``): ``all_tests`` (default) -- a sample is correct when it passes
  every test of its row (use it with ground-truth tests, e.g. HumanEval's); ``ranked`` -- as the
  data stage does, :func:`data_tools.rank.classify` after ``ranker`` on the sampled tests;
* unit (``unit``): ``char`` (default; characters of the code string) or ``line`` (whole
  lines, so segments end on line boundaries). Token-level analysis needs a tokenizer and is
  not done here;
* the reference pair's own two samples are left out of the counts (``exclude_reference=True``,
  default) or counted. They are chosen *because* one is correct and the other is not and
  each contains its own mid, so counting them pushes Phi of the mids towards +-1 by
  construction; both tables are reported (``tables`` per the option, ``tables_other``
  with the other setting).

Problems that cannot be used are counted by reason: ``no_correct_code``,
``no_incorrect_code``, ``identical_programs`` / ``empty_chosen_mid`` (every candidate pair
filtered, ``diff`` rule), and, at input, ``malformed`` lines and ``no_verdicts``. An id on
two lines of one input file is an error (:class:`DuplicateIdError`) naming both lines
(file:line), as every message here names the file and the line.

numpy and matplotlib only; no jax.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np

from data_tools import rank as rank_lib
from data_tools import segments as seg_lib
from fdpo import jsonl, problem

log = logging.getLogger("data_tools.analyze")

SEGMENTS = ("common prefix", "common suffix", "prefix + chosen mid", "prefix + rejected mid")
PAIR_RULES = ("diff", "first")
VERDICTS = ("all_tests", "ranked")
UNITS = ("char", "line")
MALFORMED = "malformed"
NO_VERDICTS = "no_verdicts"


def phi(n11: int, n10: int, n01: int, n00: int) -> float | None:
    """Phi coefficient of a 2x2 table (rows: contains / lacks; columns: correct / incorrect).

    None when any margin is zero: the correlation is undefined, and no division happens.
    """
    counts = (n11, n10, n01, n00)
    if any(c < 0 for c in counts):
        raise ValueError(f"negative count in 2x2 table {counts}")
    r1, r0 = n11 + n10, n01 + n00  # contains / lacks
    c1, c0 = n11 + n01, n10 + n00  # correct / incorrect
    if r1 == 0 or r0 == 0 or c1 == 0 or c0 == 0:
        return None
    # Python ints: exact products, no overflow; sqrt of the product of margins in float.
    return (n11 * n00 - n10 * n01) / math.sqrt(float(r1) * r0 * c1 * c0)


@dataclasses.dataclass
class Table:
    """One segment's 2x2 counts."""

    n11: int = 0  # contains, correct
    n10: int = 0  # contains, incorrect
    n01: int = 0  # lacks, correct
    n00: int = 0  # lacks, incorrect

    def add(self, contains: bool, correct: bool) -> None:
        if contains:
            if correct:
                self.n11 += 1
            else:
                self.n10 += 1
        elif correct:
            self.n01 += 1
        else:
            self.n00 += 1

    @property
    def in_correct(self) -> float | None:
        n = self.n11 + self.n01
        return self.n11 / n if n else None

    @property
    def in_incorrect(self) -> float | None:
        n = self.n10 + self.n00
        return self.n10 / n if n else None

    @property
    def phi(self) -> float | None:
        return phi(self.n11, self.n10, self.n01, self.n00)

    def to_dict(self) -> dict[str, Any]:
        return {"n11": self.n11, "n10": self.n10, "n01": self.n01, "n00": self.n00,
                "in_correct": self.in_correct, "in_incorrect": self.in_incorrect, "phi": self.phi}


@dataclasses.dataclass(frozen=True)
class Options:
    pair_rule: str = "diff"
    verdict: str = "all_tests"
    unit: str = "char"
    ranker: str = "mutual"
    lam: float = seg_lib.DEFAULT_LAMBDA
    exclude_reference: bool = True

    def validate(self) -> None:
        for name, allowed in (("pair_rule", PAIR_RULES), ("verdict", VERDICTS), ("unit", UNITS),
                              ("ranker", tuple(rank_lib.RANKERS))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {list(allowed)}")


@dataclasses.dataclass
class ProblemSegments:
    """The reference pair of one problem and its segments, in units."""

    id: str
    chosen: int
    rejected: int
    prefix: np.ndarray
    mid_chosen: np.ndarray
    mid_rejected: np.ndarray
    suffix: np.ndarray
    contains: dict[str, list[bool]]  # segment -> per sample
    correct: list[bool]


def encode_units(codes: Sequence[str], unit: str) -> list[np.ndarray]:
    """Codes as int arrays: code points (``char``) or per-problem line ids (``line``)."""
    if unit == "char":
        return [np.frombuffer(c.encode("utf-32-le"), np.uint32).astype(np.int64) for c in codes]
    ids: dict[str, int] = {}
    return [np.array([ids.setdefault(line, len(ids)) for line in c.splitlines(keepends=True)], np.int64)
            for c in codes]


def decode_units(units: np.ndarray, unit: str, lines_of: Sequence[str] | None = None) -> str:
    if unit == "char":
        return np.asarray(units, np.uint32).tobytes().decode("utf-32-le")
    return "".join(lines_of[i] for i in units)


def _startswith(x: np.ndarray, seg: np.ndarray) -> bool:
    return len(x) >= len(seg) and bool(np.array_equal(x[:len(seg)], seg))


def _endswith(x: np.ndarray, seg: np.ndarray) -> bool:
    return len(x) >= len(seg) and bool(np.array_equal(x[len(x) - len(seg):], seg))


def verdicts(passed: np.ndarray, options: Options) -> tuple[np.ndarray, np.ndarray]:
    """(correct bool[k], ranks int[k]) of one problem's codes from its pass matrix [k, tests]."""
    passed = np.asarray(passed, bool)
    k = passed.shape[0]
    kwargs = {}
    res = rank_lib.rank(passed[None], method=options.ranker, **kwargs)
    ranks = res.ranks[0, :k]
    if options.verdict == "ranked":
        correct = rank_lib.classify(passed[None], res).correct[0, :k]
    else:
        # No tests at all is no evidence of correctness.
        correct = passed.all(axis=1) & (passed.shape[1] > 0)
    return correct, ranks


def problem_segments(pid: str, codes: Sequence[str], correct: Sequence[bool], ranks: Sequence[int],
                     options: Options) -> ProblemSegments | str:
    """The reference pair's segments and per-sample containment, or a skip reason."""
    correct = np.asarray(correct, bool)
    if not correct.any():
        return seg_lib.NO_CORRECT
    if correct.all():
        return seg_lib.NO_INCORRECT
    seqs = encode_units(codes, options.unit)
    if options.pair_rule == "first":
        i, j = int(np.argmax(correct)), int(np.argmax(~correct))
        p, s = seg_lib.common_prefix_suffix(seqs[i], seqs[j])
    else:
        sel = seg_lib.select_pairs(seqs, ranks, correct, ~correct, lam=options.lam)
        if not sel.pairs:
            return sel.drop_reason
        pair = sel.pairs[0]
        i, j, p, s = pair.chosen, pair.rejected, pair.prefix_len, pair.suffix_len
    c, r = seqs[i], seqs[j]
    prefix, suffix = c[:p], c[len(c) - s:]
    mid_c, mid_r = c[p:len(c) - s], r[p:len(r) - s]
    pc, pr = np.concatenate([prefix, mid_c]), np.concatenate([prefix, mid_r])
    contains = {name: [] for name in SEGMENTS}
    for x in seqs:
        contains["common prefix"].append(_startswith(x, prefix))
        contains["common suffix"].append(_endswith(x, suffix))
        contains["prefix + chosen mid"].append(_startswith(x, pc))
        contains["prefix + rejected mid"].append(_startswith(x, pr))
    return ProblemSegments(pid, i, j, prefix, mid_c, mid_r, suffix, contains, correct.tolist())


@dataclasses.dataclass
class PhiResult:
    tables: dict[str, Table]
    problems_used: int
    samples_counted: int
    skipped: dict[str, int]
    per_problem: list[dict[str, Any]]
    segments: list[ProblemSegments] = dataclasses.field(default_factory=list)
    # The same tables with the reference pair's samples the other way round (counted when
    # the options exclude them, excluded when they count them), and its sample count.
    tables_other: dict[str, Table] = dataclasses.field(default_factory=dict)
    samples_counted_other: int = 0
    # Every sample of every problem read, and how many the verdict calls correct: the
    # policy's sample pass rate, whether or not its problem has a pair.
    samples_in: int = 0
    samples_correct: int = 0


def phi_tables(problems: Iterable[tuple[str, Sequence[str], np.ndarray]], options: Options = Options()
               ) -> PhiResult:
    """Aggregates the four 2x2 tables over ``(id, codes, passed[k, tests])`` problems."""
    options.validate()
    tables = {name: Table() for name in SEGMENTS}
    tables_other = {name: Table() for name in SEGMENTS}
    skipped: collections.Counter = collections.Counter()
    per_problem = []
    kept_segments = []
    used = samples = samples_other = samples_in = samples_correct = 0
    for pid, codes, passed in problems:
        correct, ranks = verdicts(passed, options)
        samples_in += len(codes)
        samples_correct += int(correct.sum())
        seg = problem_segments(pid, codes, correct, ranks, options)
        if isinstance(seg, str):
            skipped[seg] += 1
            continue
        used += 1
        for k, ok in enumerate(seg.correct):
            counted = not (options.exclude_reference and k in (seg.chosen, seg.rejected))
            counted_other = not (not options.exclude_reference and k in (seg.chosen, seg.rejected))
            samples += counted
            samples_other += counted_other
            for name in SEGMENTS:
                if counted:
                    tables[name].add(seg.contains[name][k], ok)
                if counted_other:
                    tables_other[name].add(seg.contains[name][k], ok)
        kept_segments.append(seg)
        per_problem.append({"id": pid, "chosen": seg.chosen, "rejected": seg.rejected,
                            "prefix_len": len(seg.prefix), "suffix_len": len(seg.suffix),
                            "mid_chosen_len": len(seg.mid_chosen), "mid_rejected_len": len(seg.mid_rejected),
                            "correct": int(sum(seg.correct)), "incorrect": len(seg.correct) - int(sum(seg.correct)),
                            "contains": {n: [int(b) for b in v] for n, v in seg.contains.items()}})
    return PhiResult(tables, used, samples, dict(sorted(skipped.items())), per_problem,
                     kept_segments, tables_other, samples_other, samples_in, samples_correct)


def continuation_prefixes(codes: Sequence[str], seg: ProblemSegments, unit: str) -> tuple[str, str]:
    """(prefix + chosen mid, prefix + rejected mid) as text: what the continuation experiment
    appends to the prompt before sampling the rest of the program."""
    lines = None
    if unit == "line":
        ids: dict[str, int] = {}
        for c in codes:
            for line in c.splitlines(keepends=True):
                ids.setdefault(line, len(ids))
        lines = list(ids)
    cat = lambda a, b: decode_units(np.concatenate([a, b]), unit, lines)  # noqa: E731
    return cat(seg.prefix, seg.mid_chosen), cat(seg.prefix, seg.mid_rejected)


def judging_tests(tests: Sequence[str], passed: Any, ranker: str = "mutual") -> list[str]:
    """The tests that judge continuations of one problem when there is no ground truth.

    In a real run every test was written by the policy, and the data stage decides which codes
    are correct by ranking the code-test graph: the tests passed by the top-ranked code are
    its ground truth (:func:`data_tools.rank.classify`). The same tests judge continuations,
    so "passes" means what it means for the chosen and rejected codes of the ``ranked``
    verdict: the reference pair's chosen code passes every one of them, the rejected code
    fails at least one. ``passed[i][j]``: code i passes ``tests[j]``; ``ranker`` must be the
    data stage's. A problem whose top code passes nothing gets no tests (no evidence).
    """
    passed = np.asarray(passed, bool)
    if passed.size == 0:
        passed = passed.reshape(len(passed), len(tests))
    if passed.ndim != 2 or passed.shape[1] != len(tests):
        raise ValueError(f"pass matrix of shape {passed.shape} for {len(tests)} tests")
    if passed.shape[0] == 0:
        return []
    res = rank_lib.rank(passed[None], method=ranker)
    truth = rank_lib.classify(passed[None], res).ground_truth[0]
    return [t for t, keep in zip(tests, truth) if keep]


# ----------------------------------------------------------------------------- reporting

def _fmt(x: float | None, digits: int = 3) -> str:
    return "undefined" if x is None else f"{x:.{digits}f}"


def markdown(result: PhiResult, options: Options, paper: bool = True) -> str:
    rows = ["| segment | in correct code | in incorrect code | Phi | n11 | n10 | n01 | n00 |",
            "|---|---|---|---|---|---|---|---|"]
    for name in SEGMENTS:
        t = result.tables[name]
        rows.append(f"| {name} | {_fmt(t.in_correct)} | {_fmt(t.in_incorrect)} | {_fmt(t.phi)} | "
                    f"{t.n11} | {t.n10} | {t.n01} | {t.n00} |")
    head = [
        "# Error-prone points: the Phi table",
        "",
        f"{result.problems_used} problems, {result.samples_counted} samples counted; skipped problems: "
        f"{json.dumps(result.skipped) if result.skipped else 'none'}.",
        f"Options: reference pair `{options.pair_rule}`, verdict `{options.verdict}`, unit `{options.unit}`, "
        f"ranker `{options.ranker}`, lambda {options.lam}, reference samples "
        f"{'excluded' if options.exclude_reference else 'included'}.",
        "n11: contains the segment and correct; n10: contains, incorrect; n01: lacks, correct; "
        "n00: lacks, incorrect. Phi is undefined when a margin is zero.",
        "",
    ]
    other = "counted" if options.exclude_reference else "excluded"
    out = head + rows
    if result.tables_other:
        out += ["", f"With the reference pair's samples {other} ({result.samples_counted_other} "
                    "samples): Phi " + "; ".join(
                        f"{n} {_fmt(result.tables_other[n].phi)}" for n in SEGMENTS) + "."]
    if paper:
        out += ["", "Paper (Qwen2.5-Coder-7B, 20 samples per prompt): prefix 0.791 / 0.733 / 0.068; "
                    "suffix 0.848 / 0.786 / 0.080; prefix + chosen mid 0.637 / 0.091 / 0.565; "
                    "prefix + rejected mid 0.012 / 0.558 / -0.609."]
    return "\n".join(out) + "\n"


def plot(result: PhiResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(SEGMENTS))
    corr = [result.tables[n].in_correct for n in SEGMENTS]
    inc = [result.tables[n].in_incorrect for n in SEGMENTS]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    w = 0.38
    ax.bar(x - w / 2, [v if v is not None else 0 for v in corr], w, label="in correct code", color="#4c9a2a")
    ax.bar(x + w / 2, [v if v is not None else 0 for v in inc], w, label="in incorrect code", color="#c0392b")
    for k, n in enumerate(SEGMENTS):
        ax.text(x[k], 1.03, f"Phi {_fmt(result.tables[n].phi)}", ha="center", fontsize=9)
    ax.set_xticks(x, [n.replace(" + ", "\n+ ") for n in SEGMENTS])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("fraction of samples containing the segment")
    ax.set_title(f"{result.problems_used} problems, {result.samples_counted} samples")
    # Below the axes: inside, it would cover the Phi labels above the bars.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------- reading

@dataclasses.dataclass
class InputProblems:
    problems: list[tuple[str, list[str], np.ndarray]]
    dropped: dict[str, int]
    drops: list[dict[str, Any]]  # {"file", "line", "id", "reason", "detail"}


class DuplicateIdError(ValueError):
    """One id on two lines of an input file (the message names both, file:line)."""


def _read_jsonl(path: str, drops: list, dropped: collections.Counter) -> Iterable[tuple[int, dict]]:
    """(line, record) of every record with an 'id'; the other lines are dropped as malformed.
    Raises DuplicateIdError at the second line of an id."""
    def drop(line, detail):
        dropped[MALFORMED] += 1
        drops.append({"file": path, "line": line, "id": None, "reason": MALFORMED, "detail": detail[:200]})

    errors, seen = [], {}
    for where, obj in jsonl.objects(path, errors):
        line = int(where.rpartition(":")[2])
        if "id" not in obj:
            drop(line, "expected a JSON object with an 'id'")
            continue
        pid = str(obj["id"])
        if pid in seen:
            # Two problems under one id would share a row of the table and its reference pair.
            raise DuplicateIdError(f"{path}:{line}: id {pid!r} repeats {path}:{seen[pid]}")
        seen[pid] = line
        yield line, obj
    for e in errors:
        drop(e.line, str(e).removeprefix(f"{path}:{e.line}: "))


def _passed_matrix(passed: Any, n_codes: int) -> np.ndarray:
    if not isinstance(passed, list) or len(passed) != n_codes:
        raise ValueError(f"'passed' must have one row per code ({n_codes})")
    width = {len(r) if isinstance(r, list) else -1 for r in passed}
    if len(width) > 1 or -1 in width:
        raise ValueError("'passed' rows must be lists of equal length")
    if not all(v is True or v is False or (type(v) is int and v in (0, 1)) for r in passed for v in r):
        raise ValueError("'passed' holds a value that is not a boolean or 0/1")
    return np.array(passed, bool).reshape(n_codes, width.pop() if width else 0)


def record_view(rec: dict) -> dict[str, Any]:
    """What the analysis reads from a problem record (fdpo/problem.py) after launch.execute:
    {"codes": the responses of the samples with a program (what the policy wrote, and what a
    continuation extends), "passed": their verdict rows, "tests"}. Where the record names the
    right tests (``tests_correct``, the miniature's oracle), only those columns are kept:
    correctness is then judged by the truth."""
    keep = problem.usable(rec)
    tests, passed = rec["tests"], [rec["passed"][i] for i in keep]
    right = rec.get("tests_correct")
    if isinstance(right, list) and len(right) == len(tests):
        tests = [t for t, ok in zip(tests, right) if ok]
        passed = [[v for v, ok in zip(row, right) if ok] for row in passed]
    return {"codes": [rec["samples"][i]["response"] for i in keep], "passed": passed,
            "tests": tests, "judged_by_truth": isinstance(right, list)}


def read_inputs(samples_path: str, verdicts_path: str | None) -> InputProblems:
    """Joins ``{"id", "codes"}`` lines with ``{"id", "passed"}`` lines by id (or reads ``passed``
    from the sample lines themselves when no verdict file is given). Bad lines are counted.
    A problem record (``version``; :func:`record_view`) carries its own verdicts: it needs
    no verdict file, and a record without ``passed`` is an error naming file:line."""
    dropped: collections.Counter = collections.Counter()
    drops: list[dict[str, Any]] = []
    verdict_rows: dict[str, tuple[int, Any]] = {}
    if verdicts_path is not None:
        for i, obj in _read_jsonl(verdicts_path, drops, dropped):
            verdict_rows[str(obj["id"])] = (i, obj.get("passed"))
    problems = []
    for i, obj in _read_jsonl(samples_path, drops, dropped):
        pid = str(obj["id"])
        where = {"file": samples_path, "line": i, "id": pid}
        if problem.is_record(obj):
            if "passed" not in obj:  # not run through launch.execute: a file of the wrong kind
                raise problem.RecordError(f"{samples_path}:{i}: missing field 'passed' (run "
                                          "launch.execute on the samples first)")
            try:
                problem.check(obj, f"{samples_path}:{i}", problem.EXECUTED)
            except problem.RecordError as e:
                dropped[MALFORMED] += 1
                drops.append(dict(where, reason=MALFORMED, detail=str(e)))
                continue
            view = record_view(obj)
            problems.append((pid, view["codes"], _passed_matrix(view["passed"], len(view["codes"]))
                             .reshape(len(view["codes"]), len(view["tests"]))))
            continue
        codes = obj.get("codes")
        if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
            dropped[MALFORMED] += 1
            drops.append(dict(where, reason=MALFORMED, detail="'codes' must be a list of strings"))
            continue
        if verdicts_path is None:
            passed = obj.get("passed")
        elif pid in verdict_rows:
            where = {"file": verdicts_path, "line": verdict_rows[pid][0], "id": pid}
            passed = verdict_rows[pid][1]
        else:
            dropped[NO_VERDICTS] += 1
            drops.append(dict(where, reason=NO_VERDICTS, detail=f"no line with this id in {verdicts_path}"))
            continue
        try:
            matrix = _passed_matrix(passed, len(codes))
        except ValueError as e:
            dropped[MALFORMED] += 1
            drops.append(dict(where, reason=MALFORMED, detail=str(e)))
            continue
        problems.append((pid, codes, matrix))
    for d in drops[:20]:
        log.warning("%s:%s dropped (%s): %s", d["file"], d["line"], d["reason"], d["detail"])
    return InputProblems(problems, dict(dropped), drops)


def write_report(out_dir: str, result: PhiResult, options: Options, inputs: InputProblems) -> dict[str, str]:
    """phi.md, phi.png, phi.json (tables, counts, options), phi_problems.jsonl, drops.jsonl."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, v) for k, v in (
        ("markdown", "phi.md"), ("png", "phi.png"), ("json", "phi.json"),
        ("problems", "phi_problems.jsonl"), ("drops", "drops.jsonl"))}
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown(result, options))
    plot(result, paths["png"])
    summary = {"tables": {n: t.to_dict() for n, t in result.tables.items()},
               "tables_other": {n: t.to_dict() for n, t in result.tables_other.items()},
               "tables_other_reference_samples": ("counted" if options.exclude_reference
                                                  else "excluded"),
               "samples_counted_other": result.samples_counted_other,
               "problems_in": len(inputs.problems) + sum(inputs.dropped.values()),
               "lines_dropped": inputs.dropped, "problems_used": result.problems_used,
               "problems_skipped": result.skipped, "samples_counted": result.samples_counted,
               "samples_in": result.samples_in, "samples_correct": result.samples_correct,
               "options": dataclasses.asdict(options)}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    with open(paths["problems"], "w", encoding="utf-8") as f:
        for p in result.per_problem:
            f.write(json.dumps(p) + "\n")
    with open(paths["drops"], "w", encoding="utf-8") as f:
        for d in inputs.drops:
            f.write(json.dumps(d) + "\n")
    return paths


def analyze_files(samples_path: str, verdicts_path: str | None, out_dir: str,
                  options: Options, write: bool = True) -> PhiResult:
    """What ``launch.analyze`` does without the continuation: reads the inputs
    (:func:`read_inputs`; FileNotFoundError for a missing file), computes the tables, writes
    the report (:func:`write_report`; not with ``write=False``: the other processes of a
    multi-host run, which compute the same tables) and prints the table and the counts."""
    inputs = read_inputs(samples_path, verdicts_path)
    result = phi_tables(inputs.problems, options)
    if write:
        paths = write_report(out_dir, result, options, inputs)
        log.info("wrote %s", ", ".join(paths.values()))
    print(markdown(result, options, paper=False))
    print(json.dumps({"lines_dropped": inputs.dropped, "problems_used": result.problems_used,
                      "problems_skipped": result.skipped}))
    return result


class ContinuationInputError(ValueError):
    """A sample line the continuation experiment uses lacks what it needs (file:line)."""


def continuation_lines(samples_path: str, ids) -> dict[str, tuple[int, dict]]:
    """{id: (line number, record)} of the sample lines the Phi table used, checked for what
    a continuation needs. Lines that ``read_inputs`` dropped (bad JSON, no id) are already
    counted in drops.jsonl and are skipped here; lines of problems the table did not use need
    no prompt or tests."""
    needed = set(ids)
    found: dict[str, tuple[int, dict]] = {}
    for where, rec in jsonl.objects(samples_path, errors=[]):  # bad lines: counted already
        if str(rec.get("id")) not in needed:
            continue
        pid, lineno = str(rec["id"]), int(where.rpartition(":")[2])
        if pid in found:
            # Two used problems under one id: their continuations could not be told apart.
            raise ContinuationInputError(
                f"{where}: id {pid!r} repeats line {found[pid][0]}; "
                "--config.continuation needs unique ids")
        if problem.is_record(rec):
            found[pid] = (lineno, rec)  # checked by read_inputs
            continue
        tests = rec.get("tests")
        if not isinstance(rec.get("prompt"), str) or not isinstance(tests, list) or \
                not all(isinstance(t, str) for t in tests):
            raise ContinuationInputError(
                f"{where}: --config.continuation needs 'prompt' (str) and "
                "'tests' (list of str) in every sample line it uses")
        found[pid] = (lineno, rec)
    return found


def continuation_prompt_format(jobs: list[dict], requested: str = "") -> str:
    """The prompt format the continuations must be rendered in: the one the jobs' samples
    were recorded with (``prompt_format`` of their problem records), which ``requested``
    (configs/analyze.py's ``prompt_format``), when given, must equal; "" when neither says
    (the tokenizer's default). Raises ContinuationInputError naming the record that
    disagrees, so a continuation never conditions on a prompt its samples did not see."""
    first: dict[str, str] = {}
    for job in jobs:
        fmt = job.get("prompt_format")
        if fmt is not None:
            first.setdefault(fmt, job.get("where", f"problem {job['id']!r}"))
    if len(first) > 1:
        (a, wa), (b, wb) = list(first.items())[:2]
        raise ContinuationInputError(f"{wb}: sampled with prompt_format={b!r}, but {wa} with "
                                     f"{a!r}; one run, one prompt format")
    if requested and first and requested not in first:
        [(fmt, where)] = first.items()
        raise ContinuationInputError(f"{where}: sampled with prompt_format={fmt!r}, but "
                                     f"--config.prompt_format={requested!r}")
    return requested or next(iter(first), "")


def continuation_jobs(samples_path: str, result: PhiResult, unit: str, ranker: str = "mutual"
                      ) -> tuple[list[dict], collections.Counter]:
    """The continuation experiment's input, JAX-free: ([{"id", "prompt", "tests", "starts":
    (prefix + chosen mid, prefix + rejected mid)}] of every used problem with tests, problems
    left out by reason). Raises ContinuationInputError (:func:`continuation_lines`). The
    model side is :func:`fdpo.continuation.run`. A problem record's continuations are judged
    by its right tests where it names them, else by :func:`judging_tests` with ``ranker``
    (the data stage's ground truth)."""
    found = continuation_lines(samples_path, [s.id for s in result.segments])
    lines_at = {pid: lineno for pid, (lineno, _) in found.items()}
    lines = {}
    for pid, (_, rec) in found.items():
        if problem.is_record(rec):
            view = record_view(rec)
            tests = view["tests"] if view["judged_by_truth"] else judging_tests(
                view["tests"], np.array(view["passed"], bool).reshape(
                    len(view["codes"]), len(view["tests"])), ranker)
            rec = {"prompt": rec["prompt"], "codes": view["codes"], "tests": tests,
                   "prompt_format": rec.get("prompt_format")}
        lines[pid] = rec
    skipped: collections.Counter = collections.Counter()
    jobs = []
    for seg in result.segments:
        rec = lines[seg.id]
        if rec["tests"]:
            jobs.append({"id": seg.id, "prompt": rec["prompt"], "tests": rec["tests"],
                         "starts": continuation_prefixes(rec["codes"], seg, unit),
                         "prompt_format": rec.get("prompt_format"),
                         "where": f"{samples_path}:{lines_at[seg.id]}"})
        else:
            # No test would pass every continuation (all([]) is True): not evidence.
            skipped["no_tests"] += 1
            log.warning("%s:%d: problem %r has no tests; left out of the continuation",
                        samples_path, lines_at[seg.id], seg.id)
    return jobs, skipped
