#!/usr/bin/env bash
# Runs the Focused-DPO pipeline for Qwen2.5-Coder-7B-Instruct on a Cloud TPU pod slice:
# the same command on every host, each a JAX process of one global mesh.
#
#   TPU=my-v5p-64 ZONE=us-east5-a HF_DIR=/mnt/ckpt/Qwen2.5-Coder-7B-Instruct \
#   PROMPTS=/mnt/data/prompts.jsonl WORKDIR=/mnt/runs/qwen7b bash launch/tpu_pod.sh
#
# HF_DIR, PROMPTS and WORKDIR must be on storage every host sees (a shared filesystem or a
# gcsfuse mount). On a multi-GPU host, run the same pipeline command directly (one process
# drives all local GPUs; --config.mesh_shape picks the layout); on a SLURM GPU cluster, run
# it with launch/slurm_gpu.sh (the same command under srun).
#
# Every host runs the same pipeline command (docs/pipeline.md#multi-host): the JAX stages
# (import, warm start, sample, precompute_ref, train, evaluate) run over the global mesh on
# every host; execution and the pair build are split by process index over the hosts' CPUs
# and merged by process 0, which alone writes markers, merged files and the report. The
# pipeline first checks that every host sees WORKDIR (a token process 0 writes there).
# jax.distributed detects the pod (process index, count, coordinator) in the pipeline and in
# every program: no --process_id flags are needed here.
#
# Untested here: this project's machines have no TPU; the same coordination is exercised by
# 2 local CPU processes in tests/launch/test_pipeline_multihost.py.
set -euo pipefail
: "${TPU:?}" "${ZONE:?}" "${HF_DIR:?}" "${PROMPTS:?}" "${WORKDIR:?}"
REPO_URL=${REPO_URL:-$(git config --get remote.origin.url)}

gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d fdpo ] || git clone $REPO_URL fdpo
  cd fdpo && make install
  .venv/bin/pip install -q 'jax[tpu]==0.10.2'
  .venv/bin/python -m launch.pipeline --workdir=$WORKDIR \
    --config=configs/real.py:hf_dir=$HF_DIR,prompts=$PROMPTS \
    --config.distributed=True --config.mesh_shape='(1, -1, 4)'
"
