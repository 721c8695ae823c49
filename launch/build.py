r"""Focused-DPO pair records from sampled codes, tests and verdicts (or from ready pairs).

    python -m launch.build --input=SAMPLES.jsonl --tokenizer=HF_DIR --out=DIR \
        [--config=configs/build.py --config.max_len=2048 --config.ranker=mutual ...]
    python -m launch.build --out=DIR --merge    # after a multi-host build
    # pairs that are already token ids (prompt_ids, chosen_ids, rejected_ids per line)
    python -m launch.build --tokenized --input=PAIRS.jsonl --vocab_size=V --out=DIR

The input format, the outputs and the accounting are described in `data_tools.build`, and
for `--tokenized` in `data_tools.tokenized` (docs/data.md).
"""
import json
import logging

from absl import app, flags

import configs
from data_tools import build, tokenized
from launch import common

CONFIG = common.define_config("config", configs.path("build.py"),
                              "Build config (configs/build.py).", lock_config=True)
INPUT = flags.DEFINE_string("input", None, "JSON Lines of problems or ready pairs.")
TOKENIZER = flags.DEFINE_string("tokenizer", None, "A transformers tokenizer directory "
                                 "(optional with --tokenized).")
TOKENIZED = flags.DEFINE_bool("tokenized", False, "The input holds token ids per pair "
                              "(prompt_ids, chosen_ids, rejected_ids; docs/data.md), not text.")
VOCAB_SIZE = flags.DEFINE_integer("vocab_size", None, "With --tokenized: every token id must "
                                  "be in [0, vocab_size) (default: the --tokenizer's length).")
OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
MERGE = flags.DEFINE_bool("merge", False, "Only merge the shard manifests found in --out into "
                          "manifest.json.")
PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if MERGE.value:
        print(json.dumps(build.merge(OUT.value)["counts"], indent=2))
        return
    if VOCAB_SIZE.value is not None and not TOKENIZED.value:
        raise common.UsageError("--vocab_size applies only with --tokenized")
    config = build.BuildConfig(**CONFIG.value.to_dict())
    # Every check before the tokenizer loads or --out is touched.
    common.check_readable_file("--input", INPUT.value)
    if TOKENIZER.value is not None or not TOKENIZED.value:  # optional with --tokenized
        common.check_dir("--tokenizer", TOKENIZER.value)
    if VOCAB_SIZE.value is not None:
        common.check_number("--vocab_size", VOCAB_SIZE.value, lo=1, hi=2**31 - 1, integer=True)
    try:
        config.validate()
        build.check_output(OUT.value, config)
    except ValueError as e:
        raise common.UsageError(str(e)) from None
    try:
        if TOKENIZED.value:
            manifest, timings = tokenized.build_tokenized(
                INPUT.value, OUT.value, config, vocab_size=VOCAB_SIZE.value,
                tokenizer_path=TOKENIZER.value, progress=PROGRESS.value)
        else:
            manifest, timings = build.build(INPUT.value, TOKENIZER.value, OUT.value, config,
                                            progress=PROGRESS.value)
    except (ValueError, FileNotFoundError) as e:
        raise common.UsageError(str(e)) from None
    print(json.dumps({"counts": manifest["counts"], "drop_reasons": manifest["drop_reasons"]},
                     indent=2))
    print("seconds per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))


if __name__ == "__main__":
    common.run(main)
