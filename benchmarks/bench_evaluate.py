"""Wall time to evaluate every canonical solution of HumanEval+ and MBPP+ (base + plus
splits, EvalPlus's default time limits) in the sandbox.

    python -m benchmarks.bench_evaluate [--workers 2]
"""
import argparse
import os
import pathlib
import time

from fdpo.evaluation import runner as rn
from fdpo.evaluation import tasks as tk

DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    print(f"cores {os.cpu_count()}, workers {args.workers}, load {os.getloadavg()[0]:.1f}")
    print("| benchmark | tasks | inputs (base + plus) | pass@1 base | pass@1 plus | wall s |")
    print("|---|---|---|---|---|---|")
    for bench in ("humaneval+", "mbpp+"):
        tasks, _ = tk.load_tasks(bench, data_dir=DATA_DIR)
        samples = [rn.Sample(t, tasks[t].reference) for t in tasks]
        t0 = time.monotonic()
        recs = rn.run(tasks, samples, bench, rn.RunConfig(workers=args.workers))
        wall = time.monotonic() - t0
        s = rn.summarize(tasks, recs, bench, ks=(1,))
        n_in = sum(len(t.base_input) + len(t.plus_input) for t in tasks.values())
        print(f"| {bench} | {len(tasks)} | {n_in} | {100 * s['pass_at_k']['base']['pass@1']:.1f}"
              f" | {100 * s['pass_at_k']['plus']['pass@1']:.1f} | {wall:.1f} |", flush=True)
        for r in recs:
            if not rn.correct(r, bench):
                print("  not passed:", r["task_id"], r["base_status"], r["plus_status"],
                      r["plus_detail"][:120])
    print(f"load after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
