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

from absl import app, flags
from ml_collections import config_flags

from fdpo import pipeline

CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config (configs/toy.py).",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
ONLY = flags.DEFINE_list("only", [], "Run only these stages (their markers are ignored).")


def main(argv):
    del argv
    workdir = pathlib.Path(WORKDIR.value).absolute()
    try:
        pipeline.Pipeline(CONFIG.value, workdir, only=ONLY.value).all()
    except pipeline.StageFailed as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
