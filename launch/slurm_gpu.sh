#!/usr/bin/env bash
# Runs the Focused-DPO pipeline for Qwen2.5-Coder-7B-Instruct on a SLURM GPU cluster: one
# task per node, each a JAX process driving all of its node's GPUs, every task running the
# same pipeline command as launch/tpu_pod.sh (docs/pipeline.md#multi-host).
#
#   HF_DIR=/shared/ckpt/Qwen2.5-Coder-7B-Instruct PROMPTS=/shared/data/prompts.jsonl \
#   WORKDIR=/shared/runs/qwen7b sbatch --nodes=4 launch/slurm_gpu.sh
#
# HF_DIR, PROMPTS, WORKDIR and this checkout (with its .venv, `make install`) must be on a
# filesystem every node sees; the pipeline checks WORKDIR at start (a token process 0 writes
# there) and stops, naming the path, on a node that does not see it.
#
# The coordinator, process count and index are given explicitly (task 0's node, a port from
# the job id) and SLURM_LOCALID is unset for the pipeline: jax.distributed's SLURM detection
# would otherwise give each process only GPU number SLURM_LOCALID (one process per GPU),
# where here one process per node drives all its GPUs. The pipeline passes the three flags
# on to every JAX stage; execution and the pair build are split over the nodes' CPUs.
#
# Untested here: this project's machines have no GPU and no SLURM; the same coordination is
# exercised by 2 local CPU processes in tests/launch/test_pipeline_multihost.py.
#SBATCH --job-name=fdpo
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=fdpo-%j.out
set -euo pipefail
: "${HF_DIR:?}" "${PROMPTS:?}" "${WORKDIR:?}"
REPO=${REPO:-$(pwd)}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=$((61000 + SLURM_JOB_ID % 4000))

srun --ntasks-per-node=1 bash -c "
  set -e
  unset SLURM_LOCALID
  cd $REPO
  .venv/bin/python -m launch.pipeline --workdir=$WORKDIR \
    --config=configs/real.py:hf_dir=$HF_DIR,prompts=$PROMPTS \
    --config.distributed=True --config.mesh_shape='(1, -1, 1)' \
    --coordinator_address=$HEAD_NODE:$PORT --num_processes=\$SLURM_NTASKS \
    --process_id=\$SLURM_PROCID
"
