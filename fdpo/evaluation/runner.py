"""Evaluation of samples on a benchmark: executor problems, verdicts, pass@k, reports.

One executor problem per EvalPlus task (codes = the task's samples, tests = the base split
and, for the + benchmarks, the plus split) and one per LiveCodeBench sample. A sample is
correct on HumanEval/MBPP when its base split passes, on HumanEval+/MBPP+ when base and
plus both pass (EvalPlus's rule), on LiveCodeBench when every public and private test
passes. Statuses per split: the executor's (pass, fail, error, timeout, crash,
sandbox_error), where a per-input time limit raised inside the cell also counts as
`timeout`. NumPy only; no jax.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import logging
import pathlib
import time
from typing import Callable, Iterable, Sequence

import numpy as np

from fdpo.sandbox import executor as ex
from fdpo import jsonl
from fdpo.evaluation import tasks as tk

STATUSES = ex.STATUSES
_TIMEOUT_TAG = "EvalTimeout"


# ------------------------------------------------------------------------------- pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task with n samples, c correct: 1 - C(n-c, k) / C(n, k),
    computed as a product (no huge binomials)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(ns: Sequence[int], cs: Sequence[int], ks: Iterable[int] = (1, 10, 100)
                   ) -> dict[str, float]:
    """Mean over tasks, for each k that every task has enough samples for (as EvalPlus)."""
    out = {}
    for k in ks:
        if len(ns) and min(ns) >= k:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in zip(ns, cs)]))
    return out


# ------------------------------------------------------------------------------ samples
@dataclasses.dataclass
class Sample:
    task_id: str
    solution: str
    where: str = ""


class SampleError(ValueError):
    pass


def read_samples(path, tasks: dict[str, tk.Task], benchmark: str) -> list[Sample]:
    """EvalPlus samples JSONL: {"task_id", "solution"} (a whole program) or
    {"task_id", "completion"} (appended to the task's prompt). LiveCodeBench lines may
    also be {"question_id", "code_list": [...]} (its own output format)."""
    out = []
    unknown = collections.Counter()
    for where, rec in jsonl.objects(path, error=SampleError):
        tid = rec.get("task_id", rec.get("question_id"))
        if not isinstance(tid, str):
            raise SampleError(f"{where}: needs a string task_id")
        if tid not in tasks:
            unknown[tid] += 1
            continue
        if "solution" in rec:
            codes = [rec["solution"]]
        elif "completion" in rec:
            codes = [tasks[tid].prompt + rec["completion"]
                     if isinstance(rec["completion"], str) else None]
        elif "code_list" in rec and isinstance(rec["code_list"], list):
            codes = rec["code_list"]
        else:
            raise SampleError(f"{where}: needs 'solution' or 'completion'")
        for code in codes:
            if not isinstance(code, str):
                raise SampleError(f"{where}: the solution must be a string")
            out.append(Sample(tid, code, where))
    if unknown:
        logging.warning("%d samples of %d task ids not in the %s dataset were skipped "
                        "(e.g. %s)", sum(unknown.values()), len(unknown), benchmark,
                        next(iter(unknown)))
    return out



# ------------------------------------------------------------------------------ running
@dataclasses.dataclass
class RunConfig:
    policy: tk.TimePolicy = tk.TimePolicy()
    workers: int | None = None
    isolation: str = "full"
    scratch_dir: str | None = None  # isolation="none" only: see Executor
    memory_mb: int = 4096  # EvalPlus's default cap is 4 GB
    cell_timeout_s: float | None = None  # default: derived from the policy


def _status(raw: str, detail: str) -> str:
    if raw == "error" and detail.startswith(_TIMEOUT_TAG):
        return "timeout"
    return raw


def _cell_timeout(benchmark, tasks, cfg: RunConfig) -> float:
    if cfg.cell_timeout_s:
        return cfg.cell_timeout_s
    p = cfg.policy
    if benchmark == "livecodebench":
        most = max(len(t.tests) for t in tasks.values())
        return most * p.lcb_timeout_s + 30.0
    # the reference's own time on the split is not bounded beforehand: allow as much
    # again as the candidate's budget, plus slack for loading
    return 2 * p.budget_s + 30.0


def run(tasks: dict[str, tk.Task], samples: Sequence[Sample], benchmark: str,
        cfg: RunConfig = RunConfig(), progress: Callable[[int], None] | None = None
        ) -> list[dict]:
    """One record per sample, in the samples' order:
    {"task_id", "solution", "<split>_status", "<split>_detail", "<split>_time_s", ...}."""
    by_task: dict[str, list[int]] = collections.defaultdict(list)
    for i, s in enumerate(samples):
        by_task[s.task_id].append(i)
    splits = tk.splits(benchmark)
    records: list[dict] = [{"task_id": s.task_id, "solution": s.solution} for s in samples]
    problems = []
    if benchmark == "livecodebench":
        for i, s in enumerate(samples):
            t = tasks[s.task_id]
            # stdin programs run inside the test (stdin and stdout redirected per input)
            code = tk.cell_imports() + s.solution if t.testtype == "functional" else ""
            problems.append({"id": str(i), "codes": [code],
                             "tests": [tk.lcb_test(t, s.solution, cfg.policy)]})
    else:
        for tid, idx in by_task.items():
            t = tasks[tid]
            problems.append({"id": tid, "codes": [samples[i].solution for i in idx],
                             "tests": [tk.evalplus_test(t, benchmark, sp, cfg.policy)
                                       for sp in splits]})
    limits = ex.Limits(timeout_s=_cell_timeout(benchmark, tasks, cfg),
                       memory_mb=cfg.memory_mb)
    preload = tuple(ex.DEFAULT_PRELOAD) + ("numpy", "io", "signal")
    with ex.Executor(limits, workers=cfg.workers, isolation=cfg.isolation,
                     preload=preload, scratch_dir=cfg.scratch_dir) as exe:
        for pid, res in exe.map(problems):
            rows = [int(pid)] if benchmark == "livecodebench" else by_task[pid]
            for r, i in enumerate(rows):
                for j, sp in enumerate(splits):
                    raw, detail = res.status[r][j], res.detail[r][j]
                    records[i][f"{sp}_status"] = _status(raw, detail)
                    records[i][f"{sp}_detail"] = detail
                    records[i][f"{sp}_time_s"] = res.time_s[r][j]
            if progress:
                progress(len(rows))
    return records


def correct(rec: dict, benchmark: str) -> bool:
    return all(rec[f"{sp}_status"] == "pass" for sp in tk.splits(benchmark))


# ---------------------------------------------------------------------------- summaries
def summarize(tasks: dict[str, tk.Task], records: Sequence[dict], benchmark: str,
              ks: Sequence[int] = (1, 10, 100)) -> dict:
    """pass@k (base = the plain benchmark; plus = base and plus, EvalPlus's + number),
    status counts per split, per-task rows."""
    per: dict[str, list[dict]] = collections.defaultdict(list)
    for r in records:
        per[r["task_id"]].append(r)
    splits = tk.splits(benchmark)
    rows = []
    for tid in tasks:
        recs = per.get(tid, [])
        if not recs:
            continue
        row = {"task_id": tid, "n": len(recs)}
        if benchmark == "livecodebench":
            row["difficulty"] = tasks[tid].difficulty
            row["correct"] = sum(r["all_status"] == "pass" for r in recs)
        else:
            row["base_correct"] = sum(r["base_status"] == "pass" for r in recs)
            if "plus" in splits:
                row["plus_correct"] = sum(r["base_status"] == r["plus_status"] == "pass"
                                          for r in recs)
        for sp in splits:
            row[f"{sp}_statuses"] = dict(collections.Counter(r[f"{sp}_status"] for r in recs))
        rows.append(row)
    out = {"benchmark": benchmark, "num_tasks": len(rows),
           "num_samples": len(records), "tasks_without_samples":
           sorted(set(tasks) - {r["task_id"] for r in rows})}
    ns = [r["n"] for r in rows]
    if benchmark == "livecodebench":
        out["pass_at_k"] = {"all": mean_pass_at_k(ns, [r["correct"] for r in rows], ks)}
        for d in ("easy", "medium", "hard"):
            sub = [r for r in rows if r["difficulty"] == d]
            if sub:
                out["pass_at_k"][d] = mean_pass_at_k([r["n"] for r in sub],
                                                     [r["correct"] for r in sub], ks)
    else:
        out["pass_at_k"] = {"base": mean_pass_at_k(ns, [r["base_correct"] for r in rows], ks)}
        if "plus" in splits:
            out["pass_at_k"]["plus"] = mean_pass_at_k(ns, [r["plus_correct"] for r in rows], ks)
    out["status_counts"] = {
        sp: {s: sum(r[f"{sp}_status"] == s for r in records) for s in STATUSES}
        for sp in splits}
    out["tasks"] = rows
    return out


def table(summary: dict, fmt: str = "md") -> str:
    """Per-task table, markdown ("md") or CSV."""
    bench = summary["benchmark"]
    splits = tk.splits(bench)
    if bench == "livecodebench":
        cols = ["task_id", "difficulty", "n", "correct"]
    else:
        cols = ["task_id", "n", "base_correct"] + (["plus_correct"] if "plus" in splits else [])
    cols += [f"{sp}_statuses" for sp in splits]

    def cell(row, c):
        v = row[c]
        if isinstance(v, dict):
            return " ".join(f"{k}:{v[k]}" for k in STATUSES if k in v)
        return str(v)

    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        for row in summary["tasks"]:
            w.writerow([cell(row, c) for c in cols])
        return buf.getvalue()
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in summary["tasks"]:
        lines.append("| " + " | ".join(cell(row, c) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir, summary: dict, records: Sequence[dict], meta: dict) -> dict:
    """results.json (summary + settings + per-sample verdicts), tasks.md, tasks.csv."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_by_task: dict[str, list] = collections.defaultdict(list)
    for r in records:
        eval_by_task[r["task_id"]].append(r)
    doc = {**meta, **summary, "eval": eval_by_task}
    paths = {"results": out / "results.json", "table_md": out / "tasks.md",
             "table_csv": out / "tasks.csv"}
    paths["results"].write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    paths["table_md"].write_text(table(summary, "md"))
    paths["table_csv"].write_text(table(summary, "csv"))
    return {k: str(v) for k, v in paths.items()}


def evaluate(benchmark: str, samples_path=None, dataset=None, *, samples=None,
             cfg: RunConfig = RunConfig(), ks=(1, 10, 100), partial: bool = False,
             progress=None, data_dir=None) -> tuple[dict, list[dict], dict]:
    """Loads the tasks (`dataset`, or the release file under `data_dir`) and samples, runs
    them, returns (summary, records, meta)."""
    tasks, path = tk.load_tasks(benchmark, dataset, data_dir)
    if samples is None:
        samples = read_samples(samples_path, tasks, benchmark)
    missing = sorted(set(tasks) - {s.task_id for s in samples})
    if missing and not partial:
        raise SampleError(f"{len(missing)} of {len(tasks)} {benchmark} tasks have no samples "
                          f"(e.g. {missing[:3]}); a score over a subset is not comparable "
                          "with published ones (pass partial=True, --config.partial=True to "
                          "launch.evaluate, to allow it)")
    t0 = time.monotonic()
    records = run(tasks, samples, benchmark, cfg, progress)
    wall = time.monotonic() - t0
    summary = summarize(tasks, records, benchmark, ks)
    meta = {"dataset": str(path), "dataset_sha256": tk.file_sha256(path),
            "partial": bool(missing), "wall_s": round(wall, 3),
            "settings": {**dataclasses.asdict(cfg.policy), "memory_mb": cfg.memory_mb,
                         "isolation": cfg.isolation, "workers": cfg.workers,
                         "cell_timeout_s": _cell_timeout(benchmark, tasks, cfg)}}
    bad = sum(c.get("sandbox_error", 0) for c in summary["status_counts"].values())
    if bad:
        logging.warning("%d cells ended in sandbox_error (counted as not passed): the "
                        "numbers are not trustworthy until that is fixed", bad)
    return summary, records, meta

