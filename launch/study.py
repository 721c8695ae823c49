"""The pre-registered study of issue 19: warm starts, per-arm lr tuning, every arm on every
warm start, the paired comparison with its confidence interval, a report.

    python -m launch.study --config=configs/study.py --workdir=runs/study          # make study
    python -m launch.study --config=configs/study.py:fast --workdir=/tmp/study
    python -m launch.study --config=configs/study.py --workdir=runs/study --plan   # print only

The protocol is configs/study.py; WORKDIR/protocol.json holds it and its digest from the
start, and a WORKDIR pre-registered with another digest is refused. Rerunning the command
resumes. Stages and layout: :mod:`fdpo.study`.
"""

from __future__ import annotations

import json
import pathlib

from absl import flags

from fdpo import pipeline, study
from launch import common

CONFIG = common.define_config("config", None, "Study config (configs/study.py).",
                              required=True, lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
PLAN = flags.DEFINE_bool("plan", False, "Print what the study would run, and stop.")


def main(argv):
    del argv
    cfg = CONFIG.value
    try:
        study.check_config(cfg)
    except ValueError as e:
        raise common.UsageError(str(e)) from None
    if PLAN.value:
        print(json.dumps(study.plan(cfg), indent=1))
        return
    workdir = pathlib.Path(WORKDIR.value).absolute()
    common.check_output("--workdir", workdir, directory=True, make_parents=True)
    try:
        study.Study(cfg, workdir).all()
    except study.ProtocolChanged as e:
        raise common.UsageError(f"--workdir: {e}") from None
    except pipeline.StageFailed as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    common.run(main)
