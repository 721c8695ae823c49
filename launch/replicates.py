"""Pipeline runs that differ in their warm start, side by side.

    python -m launch.pipeline --config=configs/toy.py --workdir=runs/toy-init1 --config.init.seed=1
    python -m launch.replicates --workdirs=runs/toy,runs/toy-init1,runs/toy-init2 --out=runs/replicates

Reads each workdir's `report/report.json` (written by `launch.report`) and writes
`replicates.md`, `replicates.json` and `replicates.png` in --out (:mod:`fdpo.replicates`
says what they hold and why a claim needs several warm starts).
"""

from __future__ import annotations

import pathlib

from absl import flags

from fdpo import replicates
from launch import common

WORKDIRS = flags.DEFINE_list("workdirs", None, "Pipeline work directories (report/report.json "
                             "in each).", required=True)
OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
FOCUS = flags.DEFINE_string("focus", "focused_dpo", "The method the others are compared to.")


def main(argv):
    del argv
    for w in WORKDIRS.value:
        common.check_readable_file("--workdirs", pathlib.Path(w) / "report" / "report.json")
    common.check_output("--out", OUT.value, directory=True, make_parents=True)
    try:
        text = replicates.write(WORKDIRS.value, pathlib.Path(OUT.value), FOCUS.value)
    except replicates.ReportError as e:
        raise SystemExit(f"error: {e}") from e
    print(text)


if __name__ == "__main__":
    common.run(main)
