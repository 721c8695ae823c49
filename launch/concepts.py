"""Programming concepts mined statically from Python source trees (the concepts that problem
prompts are synthesised around; see `data_tools.concepts` for what is recorded).

    python -m launch.concepts --source=DIR [--source=DIR ...] --out=CONCEPTS.jsonl

Writes OUT (one concept a line) and OUT.report.json (counts, filters, every skipped file
with its reason).
"""
import json
import logging

from absl import app, flags

import configs
from data_tools import concepts
from launch import common

log = logging.getLogger("launch.concepts")

CONFIG = common.define_config("config", configs.path("concepts.py"),
                              "Concept filters (configs/concepts.py).",
                              lock_config=True)
SOURCE = flags.DEFINE_multi_string("source", None, "Source directory (or .py file); repeat "
                                   "the flag or list several after it.")
OUT = flags.DEFINE_string("out", None, "Output JSONL of concepts (OUT.report.json beside it).",
                          required=True)
PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # ``--source A B C``: absl gives the first to the flag and the rest as positional args.
    sources = list(SOURCE.value or []) + list(argv[1:])
    if not sources:
        raise app.UsageError("--source is required")
    c = CONFIG.value
    if c.min_count < 1 or c.min_files < 1:
        raise app.UsageError("--config.min_count and --config.min_files must be >= 1")
    common.check_output("--out", OUT.value)
    common.check_output("--out", OUT.value + ".report.json")
    filters = concepts.Filters(c.min_count, c.min_files, c.drop_local)
    try:
        rows, report = concepts.scan(sources, filters, progress=PROGRESS.value,
                                     max_bytes=c.max_file_bytes,
                                     exclude_dirs=list(c.exclude_dirs))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    concepts.write_jsonl(OUT.value, rows)
    with open(OUT.value + ".report.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    for s in report["skipped"][:20]:
        log.warning("skipped %s:%s (%s): %s", s["path"], s["line"] or "", s["reason"],
                    s["detail"])
    print(json.dumps({k: v for k, v in report.items() if k != "skipped"}, indent=2))


if __name__ == "__main__":
    common.run(main)
