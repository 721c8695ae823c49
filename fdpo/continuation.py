"""The continuation experiment (METHOD.md section 1, the paper's second experiment), the
model side: the policy continues from prompt + prefix + chosen mid and from prompt + prefix
+ rejected mid, the programs run in the sandbox against the problem's tests, and pass@1 of
each side is reported. Its input, the continuation jobs, is
``data_tools.analyze.continuation_jobs`` (JAX-free); ``launch.analyze
--config.continuation=True`` is the two with flags.
"""
from __future__ import annotations

import collections
import json
import pathlib
from typing import Callable, Sequence

import jax

from fdpo import extract, sharding
from fdpo.policy import Policy
from fdpo.sandbox.executor import Executor, Limits

# How long a host that finished its share of the sandbox runs waits for the slowest one (a
# real run's share can take hours; a dead host is noticed by jax.distributed before this).
WAIT_FOR_HOSTS_S = 7 * 24 * 3600


def run(jobs: Sequence[dict], skipped: collections.Counter, load_policy: Callable[[], Policy],
        c, out_dir) -> dict:
    """pass@1 of continuations from prefix + chosen mid and prefix + rejected mid. `jobs`:
    [{"id", "prompt", "tests", "starts": (chosen text, rejected text)}]; `skipped`: problems
    left out, by reason; `c`: the continuation settings of configs/analyze.py
    (num_continuations, max_new_tokens, temperature, response_format, timeout). Writes
    continuation.json and continuation.md to `out_dir`; returns the json's content.

    Several processes (jax.distributed, initialised before): every process generates every
    continuation with the others over the global mesh, runs the programs of problems i,
    i + n, ... (process i of n) in its sandbox, and receives the others' verdicts; all
    return the same summary, and process 0 alone writes the files."""
    policy = load_policy()
    by_id = {job["id"]: job for job in jobs}
    rows = []  # (problem id, side, started text, token ids)
    for job in jobs:
        [prompt_ids] = policy.encode_prompts([job["prompt"]])
        for side, text in zip(("chosen", "rejected"), job["starts"]):
            rows += [(job["id"], side, text, prompt_ids + policy.encode_text(text))] * \
                c.num_continuations
    done = policy.generate([r[3] for r in rows], seed=0, row_seeds=range(len(rows)),
                           max_new_tokens=c.max_new_tokens, temperature=c.temperature)
    programs: dict[tuple[str, str], list[str]] = {}
    for (pid, side, started, _), (cont,) in zip(rows, done):
        program = extract.program_from_response(started + cont.text, by_id[pid]["prompt"],
                                                c.response_format)
        programs.setdefault((pid, side), []).append(program)
    # Several processes: every one generated every continuation above (the global mesh);
    # the sandbox work is split by problem, host i running problems i, i + n, ... on its own
    # CPUs, and the verdicts gathered so that every host holds them all, in input order.
    me, hosts = jax.process_index(), jax.process_count()
    mine = {}  # job index -> one verdict per program (chosen continuations, then rejected)
    with Executor(Limits(timeout_s=c.timeout)) as ex:
        for k in range(me, len(jobs), hosts):
            job = jobs[k]
            codes = programs[(job["id"], "chosen")] + programs[(job["id"], "rejected")]
            mine[k] = [all(row) for row in ex.run(codes, job["tests"]).passed]
    verdicts = {}
    for share in sharding.gather({str(k): v for k, v in mine.items()},
                                 "continuation.run: executed", timeout_s=WAIT_FOR_HOSTS_S):
        verdicts.update((int(k), v) for k, v in share.items())
    passed = {"chosen": [], "rejected": []}
    per_problem = []
    n = c.num_continuations
    for k, job in enumerate(jobs):
        ok = verdicts[k]
        passed["chosen"] += ok[:n]
        passed["rejected"] += ok[n:]
        per_problem.append({"id": job["id"], "chosen_passed": sum(ok[:n]),
                            "rejected_passed": sum(ok[n:]), "continuations": n,
                            "tests": len(job["tests"])})
    summary = {side: {"pass@1": 100.0 * sum(v) / len(v) if v else None, "programs": len(v),
                      "passed": sum(v)}
               for side, v in passed.items()}
    summary["problems"] = len(jobs)
    summary["problems_skipped"] = dict(skipped)
    summary["settings"] = {"num_continuations": c.num_continuations,
                           "temperature": c.temperature,
                           "response_format": c.response_format,
                           "prompt_format": policy.prompt_format}
    summary["per_problem"] = per_problem
    if sharding.is_writer():
        _write(pathlib.Path(out_dir), summary, bool(skipped))
    return summary


def _write(out: pathlib.Path, summary: dict, any_skipped: bool) -> None:
    (out / "continuation.json").write_text(json.dumps(summary, indent=2) + "\n")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    skipped_text = json.dumps(summary["problems_skipped"]) if any_skipped else "none"
    n = summary["settings"]["num_continuations"]
    (out / "continuation.md").write_text(
        "| continue from | pass@1 (%) | passed | programs |\n|---|---|---|---|\n"
        f"| prompt + prefix + chosen mid | {fmt(summary['chosen']['pass@1'])} | "
        f"{summary['chosen']['passed']} | {summary['chosen']['programs']} |\n"
        f"| prompt + prefix + rejected mid | {fmt(summary['rejected']['pass@1'])} | "
        f"{summary['rejected']['passed']} | {summary['rejected']['programs']} |\n\n"
        f"{summary['problems']} problems x {n} continuations per side; "
        f"problems left out: {skipped_text}.\n"
        "Paper (Qwen2.5-Coder-7B): 90.02 vs 3.17.\n")
