"""The embedded miniature's files: tokenizer, prompts, oracle tests, SFT pairs, evaluation
tasks (see `data_tools.toy.data` for the layout, `data_tools.toy.decision` for the decision
family's additions).

    python -m launch.toy_data --out=DIR [--config.family=decision --config.seed=0]
"""
import inspect
import pathlib

from absl import app, flags

import configs
from data_tools.toy import data as toy_data
from data_tools.toy import decision
from launch import common

CONFIG = common.define_config("config", configs.path("toy_data.py"),
                              "The miniature's data settings.", lock_config=True)
OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
WRITERS = {"lists": toy_data.write, "decision": decision.write}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    c = CONFIG.value
    if c.family not in WRITERS:
        raise app.UsageError(f"--config.family={c.family!r}: expected one of {sorted(WRITERS)}")
    common.check_output("--out", OUT.value, directory=True, make_parents=True)
    for field in ("held_out_fraction", "corrupt_fraction", "sft_fraction", "trap_rate",
                  "noise_rate", "tail_noise"):
        common.check_number(f"--config.{field}", c[field], lo=0, hi=1)
    for field in ("num_tests", "vocab_size", "eval_tests", "eval_seen", "num_sft", "num_dpo",
                  "num_validation", "num_test"):
        common.check_number(f"--config.{field}", c[field], lo=1, integer=True)
    write = WRITERS[c.family]
    # Each family's writer takes the fields it reads (configs/toy_data.py marks them).
    fields = {k: c[k] for k in inspect.signature(write).parameters if k != "out"}
    meta = write(pathlib.Path(OUT.value), **fields)
    print(f"wrote {OUT.value} ({c.family}): {meta['counts']}")


if __name__ == "__main__":
    common.run(main)
