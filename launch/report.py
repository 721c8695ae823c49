"""The pipeline's report: markdown with plots, and the raw JSON it was drawn from.

    python -m launch.report --workdir RUN

Writes RUN/report/{report.md, report.json, *.png} from what `launch.pipeline` left in RUN
(:mod:`fdpo.report`).
"""

from __future__ import annotations

import pathlib

from absl import flags

from fdpo import report
from launch import common

WORKDIR = flags.DEFINE_string("workdir", None, "Pipeline work directory.", required=True)


def main(argv):
    del argv
    common.check_dir("--workdir", WORKDIR.value)
    print(f"wrote {report.write(pathlib.Path(WORKDIR.value))}")


if __name__ == "__main__":
    common.run(main)
