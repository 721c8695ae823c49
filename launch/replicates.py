"""Pipeline runs that differ in their warm start, side by side, and the study's statistics.

    python -m launch.pipeline --config=configs/toy.py --workdir=runs/toy-init1 --config.init.seed=1
    python -m launch.replicates --workdirs=runs/toy,runs/toy-init1,runs/toy-init2 --out=runs/replicates

Reads each workdir's `report/report.json` (written by `launch.report`) and writes
`replicates.md`, `replicates.json` and `replicates.png` in --out; with per-task evaluation
results in the workdirs also `statistics.json` and `forest.png`: the paired difference of
--focus minus --baseline (primary) and minus every other method (secondary, Holm) on
--split, with the cluster-t CI over warm starts (:mod:`fdpo.replicates`, :mod:`fdpo.stats`;
at least 2 workdirs).
"""

from __future__ import annotations

import pathlib

from absl import flags

from fdpo import replicates, stats
from launch import common

WORKDIRS = flags.DEFINE_list("workdirs", None, "Pipeline work directories (report/report.json "
                             "in each), one per warm start.", required=True)
OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
FOCUS = flags.DEFINE_string("focus", "focused_dpo", "The method the others are compared to.")
BASELINE = flags.DEFINE_string("baseline", "dpo", "The primary comparison is --focus minus "
                               "this method; every other method is a secondary comparison.")
SPLIT = flags.DEFINE_string("split", None, "Evaluation whose per-task results the statistics "
                            "use (default: test, else held_out, else the only one all "
                            "workdirs share).")
N_BOOT = flags.DEFINE_integer("n_boot", 10000, "Bootstrap resamples.")
LEVEL = flags.DEFINE_float("level", 0.95, "Confidence level of the intervals.")
SEED = flags.DEFINE_integer("seed", 0, "Seed of the bootstrap's resampling.")
INTERVAL = flags.DEFINE_enum("interval", "cluster_t", list(stats.INTERVALS),
                             "cluster_t: Student t over the warm-start means, floored by the "
                             "task-noise bootstrap (needs >= 2 workdirs); percentile: the "
                             "hierarchical percentile bootstrap (docs/analysis.md#statistics).")


def main(argv):
    del argv
    for w in WORKDIRS.value:
        common.check_readable_file("--workdirs", pathlib.Path(w) / "report" / "report.json")
    common.check(len(set(WORKDIRS.value)) == len(WORKDIRS.value),
                 f"--workdirs={','.join(WORKDIRS.value)}: a workdir is named twice (each is "
                 "one warm start)")
    common.check_number("--n_boot", N_BOOT.value, lo=1, integer=True)
    common.check_number("--level", LEVEL.value, lo=0, hi=1, lo_open=True)
    common.check(LEVEL.value < 1, f"--level={LEVEL.value}: must be below 1")
    common.check_output("--out", OUT.value, directory=True, make_parents=True)
    try:
        text = replicates.write(WORKDIRS.value, pathlib.Path(OUT.value), FOCUS.value,
                                BASELINE.value, SPLIT.value, N_BOOT.value, SEED.value,
                                LEVEL.value, INTERVAL.value)
    except replicates.ReportError as e:
        raise SystemExit(f"error: {e}") from e
    print(text)


if __name__ == "__main__":
    common.run(main)
