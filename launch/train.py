r"""Trains a policy with the Focused-DPO loss family (the loop: `fdpo.train_loop`).

    python -m launch.train --workdir=WORKDIR \
        --config=configs/focused_dpo.py:model=CKPT,data=DATA_DIR [--config.optimizer.lr=5e-6]

WORKDIR gets `checkpoints/` (orbax: train state, data iterator state and config per
step), `metrics.jsonl`, `tensorboard/`, `config.json`, and at the end `final/` (an fdpo
model checkpoint: `fdpo.models.checkpoint.load_model`, `launch.export_hf`) and, with
`export_hf`, `hf/`. Rerunning the same command resumes from the latest checkpoint, also
after `kill -9`: the parameters come out bitwise equal to an uninterrupted run on CPU, and
each step is logged once.

SIGTERM saves a checkpoint after the current step and exits with status 143. A loss or
gradient norm that is not finite stops the run (status 1) with a message naming the step;
that step's update is not applied and nothing after the last good checkpoint is saved.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fdpo import train_loop
from launch import common

CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (with :arg).",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has "
                              "checkpoints).", required=True)

EXIT_SIGTERM = 143


def validate(config) -> None:
    """Config errors before JAX starts, as usage errors naming the key."""
    try:
        train_loop.check_config(config)
    except ValueError as e:
        raise app.UsageError(f"--config: {e}") from e


def main(argv):
    del argv
    config = CONFIG.value
    validate(config)
    mesh = common.init_jax(config.mesh_shape)
    try:
        last = train_loop.run(config, WORKDIR.value, mesh)
    except train_loop.NonFiniteLoss as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except train_loop.Terminated as e:
        logging.warning("%s", e)
        print(e, flush=True)
        sys.exit(EXIT_SIGTERM)
    summary = {k: last["train"].get(k) for k in ("loss", "rewards/accuracies")}
    print(f"done: {WORKDIR.value} {json.dumps(summary)}", flush=True)


if __name__ == "__main__":
    app.run(main)
