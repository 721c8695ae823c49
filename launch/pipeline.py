"""The whole Focused-DPO pipeline, stage by stage, each stage one of fdpo's own programs.

    python -m launch.pipeline --config=configs/toy.py --workdir=runs/toy
    python -m launch.pipeline --config=configs/real.py:hf_dir=HF,prompts=P.jsonl --workdir=runs/x
    python -m launch.pipeline ... --only=train,evaluate     # rerun these stages only
    # several hosts: the same command on every host (docs/pipeline.md#multi-host)
    python -m launch.pipeline ... --config.distributed=True \
        [--coordinator_address=HOST0:PORT --num_processes=N --process_id=I]

Stages (data, init, sft_data, warm_start, sample, execute, pairs, reference, train,
evaluate, analyze, report), their markers in WORKDIR/stages and their logs in WORKDIR/logs:
:mod:`fdpo.pipeline`. With --config.distributed=True the process index and count come from
--process_id/--num_processes (and --coordinator_address, passed on to every JAX stage) or,
where those are not given, from jax.distributed's detection of the cluster (TPU pod, SLURM),
as in every JAX program; the hosts coordinate through the shared workdir (fdpo.multihost).
"""

from __future__ import annotations

import pathlib
import subprocess

from absl import flags

from fdpo import multihost, pipeline
from launch import common

CONFIG = common.define_config("config", None, "Pipeline config (configs/toy.py).",
                              required=True,
                              lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
ONLY = flags.DEFINE_list("only", [], "Run only these stages (their markers are ignored).")
HOST_TIMEOUT = flags.DEFINE_float(
    "host_timeout", 300.0, "With --config.distributed=True: seconds to wait for every host "
    "to see the workdir at start, and for a host that stopped beating its heartbeat.")


def main(argv):
    del argv
    workdir = pathlib.Path(WORKDIR.value).absolute()
    unknown = [n for n in ONLY.value if n not in pipeline.STAGES]
    common.check(not unknown, f"--only: unknown stage(s) {', '.join(unknown)}; the stages are "
                 f"{', '.join(pipeline.STAGES)}")
    common.check_output("--workdir", workdir, directory=True, make_parents=True)
    common.check_number("--host_timeout", HOST_TIMEOUT.value, lo=0, lo_open=True)
    # The pipeline's config says distributed; a --distributed flag here would be ignored.
    common.check(not common.DISTRIBUTED.value, "--distributed: give --config.distributed=True "
                 "(the pipeline passes --distributed to every JAX stage)")
    try:
        pipeline.check_inputs(CONFIG.value)  # before the workdir is touched
    except ValueError as e:
        raise common.UsageError(str(e)) from None
    hosts = multihost.Hosts()
    if CONFIG.value.distributed:
        try:
            hosts = multihost.detect(common.COORDINATOR.value, common.NUM_PROCESSES.value,
                                     common.PROCESS_ID.value, timeout=HOST_TIMEOUT.value)
        except ValueError as e:
            raise common.UsageError(str(e)) from None
        except (multihost.HostError, subprocess.TimeoutExpired) as e:
            raise SystemExit(f"error: {e}")
    try:
        pipeline.Pipeline(CONFIG.value, workdir, only=ONLY.value, hosts=hosts,
                          host_timeout=HOST_TIMEOUT.value).all()
    except (pipeline.StageFailed, multihost.HostError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    common.run(main)
