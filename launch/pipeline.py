"""The whole Focused-DPO pipeline, stage by stage, each stage one of fdpo's own programs.

    python -m launch.pipeline --config=configs/toy.py --workdir=runs/toy
    python -m launch.pipeline --config=configs/real.py:hf_dir=HF,prompts=P.jsonl --workdir=runs/x
    python -m launch.pipeline ... --only=train,evaluate     # rerun these stages only

Stages (data, init, sft_data, warm_start, sample, execute, pairs, reference, train,
evaluate, analyze, report), their markers in WORKDIR/stages and their logs in WORKDIR/logs:
:mod:`fdpo.pipeline`.
"""

from __future__ import annotations

import pathlib

from absl import flags

from fdpo import pipeline
from launch import common

CONFIG = common.define_config("config", None, "Pipeline config (configs/toy.py).",
                              required=True,
                              lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
ONLY = flags.DEFINE_list("only", [], "Run only these stages (their markers are ignored).")


def main(argv):
    del argv
    workdir = pathlib.Path(WORKDIR.value).absolute()
    unknown = [n for n in ONLY.value if n not in pipeline.STAGES]
    common.check(not unknown, f"--only: unknown stage(s) {', '.join(unknown)}; the stages are "
                 f"{', '.join(pipeline.STAGES)}")
    common.check_output("--workdir", workdir, directory=True, make_parents=True)
    try:
        pipeline.check_inputs(CONFIG.value)  # before the workdir is touched
    except ValueError as e:
        raise common.UsageError(str(e)) from None
    try:
        pipeline.Pipeline(CONFIG.value, workdir, only=ONLY.value).all()
    except pipeline.StageFailed as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    common.run(main)
