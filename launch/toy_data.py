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
    meta = toy_data.write(pathlib.Path(OUT.value), **CONFIG.value.to_dict())
    print(f"wrote {OUT.value}: {meta['counts']}")


if __name__ == "__main__":
    common.run(main)
