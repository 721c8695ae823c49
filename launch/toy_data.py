"""The embedded miniature's files: tokenizer, prompts, oracle tests, SFT pairs, evaluation
tasks (see `data_tools.toy.data` for the layout).

    python -m launch.toy_data --out=DIR [--config.seed=0 --config.held_out_fraction=0.2]
"""
import pathlib

from absl import app, flags

import configs
from data_tools.toy import data as toy_data
from launch import common

CONFIG = common.define_config("config", configs.path("toy_data.py"),
                              "The miniature's data settings.", lock_config=True)
OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    c = CONFIG.value
    common.check_output("--out", OUT.value, directory=True, make_parents=True)
    for field in ("held_out_fraction", "corrupt_fraction", "sft_fraction"):
        common.check_number(f"--config.{field}", c[field], lo=0, hi=1)
    for field in ("num_tests", "vocab_size", "eval_tests", "eval_seen"):
        common.check_number(f"--config.{field}", c[field], lo=1, integer=True)
    meta = toy_data.write(pathlib.Path(OUT.value), **CONFIG.value.to_dict())
    print(f"wrote {OUT.value}: {meta['counts']}")


if __name__ == "__main__":
    common.run(main)
