"""Benchmark: rank + pairs + build for synthetic problems (default 10,000 x 10 codes x 10 tests).

    python -m benchmarks.bench_build [--problems 10000] [--repeats 3]

Prints the median seconds per stage over the repeats. The builder's stages are timed inside
`data_tools.build.build` (parse = reading + JSON + validation; rank; tokenize; pairs = segments,
pair selection and record assembly; write = serialisation + ArrayRecord). `rank only` times the
three rankers alone on the padded [B, 10, 10] batch. The tokenizer is the tiny byte-level BPE of
tests/helpers (vocab 400, so responses are long in tokens: a conservative case).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_tools import build, rank  # noqa: E402
from fdpo.testing import build_tiny_tokenizer  # noqa: E402

OPS = ["sum(xs)", "max(xs)", "min(xs)", "len(xs)", "sorted(xs)[0]", "xs[-1]", "abs(xs[0])"]


def synthetic_problem(i: int, rng: np.random.Generator, k_codes: int = 10, k_tests: int = 10) -> dict:
    """A ~10-line program; each sample mutates one line with probability 0.6. Unmutated samples
    pass the 8 sound tests; 2 tests are unsound (random verdicts); mutated samples pass each
    sound test with probability 0.4."""
    n_lines = 10
    base = [f"def solve_{i}(xs):"] + [f"    v{j} = {OPS[(i + j) % len(OPS)]} + {j}" for j in range(n_lines - 2)]
    base.append("    return v0")
    codes, rows = [], []
    sound = np.ones(k_tests, bool)
    sound[rng.choice(k_tests, 2, replace=False)] = False
    for _ in range(k_codes):
        lines = list(base)
        mutated = rng.random() < 0.6
        if mutated:
            j = int(rng.integers(1, n_lines - 1))
            lines[j] = f"    v{j - 1} = {OPS[int(rng.integers(len(OPS)))]} - {int(rng.integers(100))}"
        codes.append("\n".join(lines) + "\n")
        p = np.where(sound, (rng.random(k_tests) < 0.4) if mutated else True, rng.random(k_tests) < 0.5)
        rows.append(p.tolist())
    # A problem record after launch.execute (fdpo/problem.py): every sample finished by EOS.
    return {"version": 1, "id": f"synthetic-{i}", "prompt": f"Write solve_{i}(xs) for problem {i}.",
            "response_format": "code_block",
            "samples": [{"response": f"```python\n{c}```", "response_ids": [], "program": c,
                         "finish": "eos"} for c in codes],
            "tests": [f"assert solve_{i}([{t}]) == {t}" for t in range(k_tests)], "passed": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max_len", type=int, default=512)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "samples.jsonl")
        problems = [synthetic_problem(i, rng) for i in range(args.problems)]
        with open(inp, "w") as f:
            for p in problems:
                f.write(json.dumps(p) + "\n")
        tok = build_tiny_tokenizer(os.path.join(tmp, "tok"), chat_template=True)

        A, cm, tm = rank.pad_batch([np.array(p["passed"], bool) for p in problems])
        stage_times: dict[str, list[float]] = {}
        for r in range(args.repeats):
            for method in rank.RANKERS:
                t = time.perf_counter()
                res = rank.rank(A, cm, tm, method=method)
                rank.classify(A, res, cm, tm)
                stage_times.setdefault(f"rank only: {method} (+classify)", []).append(time.perf_counter() - t)
            manifest, timings = build.build(inp, str(tok), os.path.join(tmp, f"out{r}"),
                                            build.BuildConfig(max_len=args.max_len))
            for k, v in timings.items():
                stage_times.setdefault(f"build: {k}", []).append(v)
        c = manifest["counts"]
        print(f"{args.problems} problems x 10 codes x 10 tests, max_len {args.max_len}, "
              f"{os.cpu_count()} cpus, {args.repeats} repeats; records out {c['records_out']}, "
              f"drops {manifest['drop_reasons']}")
        print(f"{'stage':44s} {'median s':>9s}")
        for k, v in stage_times.items():
            print(f"{k:44s} {statistics.median(v):9.3f}")


if __name__ == "__main__":
    main()
