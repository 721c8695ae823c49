r"""Trains a policy with the Focused-DPO loss family (the loop: `fdpo.train_loop`).

    python -m launch.train --workdir=WORKDIR \
        --config=configs/focused_dpo.py:model=CKPT,data=DATA_DIR [--config.optimizer.lr=5e-6]

WORKDIR gets `checkpoints/` (orbax: train state, data iterator state and config per
step), `metrics.jsonl`, `tensorboard/`, `config.json`, and at the end `final/` (an fdpo
model checkpoint: `fdpo.models.checkpoint.load_model`, `launch.export_hf`) and, with
`export_hf`, `hf/`. Rerunning the same command resumes from the latest checkpoint, also
after `kill -9`: the parameters come out bitwise equal to an uninterrupted run on CPU, and
each step is logged once.

SIGTERM saves a checkpoint after the current step and exits with status 143; Ctrl-C
(SIGINT) does the same and exits with status 130, and a second Ctrl-C stops at once
(the rerun resumes from the last checkpoint). A loss or
gradient norm that is not finite stops the run (status 1) with a message naming the step;
that step's update is not applied and nothing after the last good checkpoint is saved.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags, logging

from fdpo import train_loop
from fdpo.models import checkpoint
from fdpo.models.config import ATTENTION_IMPLS
from launch import common

CONFIG = common.define_config("config", None, "Run config file (with :arg).",
                              required=True,
                              lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has "
                              "checkpoints).", required=True)

EXIT_SIGTERM = 143


def validate(config) -> None:
    """Every config value a run depends on, checked before JAX starts or WORKDIR is
    touched: ranges and finiteness, the model and data paths, and the data's tokenizer
    vocabulary against the model's (ids past the embedding table give a NaN loss)."""
    num, c = common.check_number, config
    try:
        train_loop.check_config(config)
    except ValueError as e:
        raise common.UsageError(f"--config: {e}") from None
    init_ckpt = c.init_checkpoint or None
    common.check(bool(init_ckpt) != bool(c.init_hf_dir),
                 "set exactly one of config.init_checkpoint (config arg model=) and "
                 "config.init_hf_dir")
    if init_ckpt:
        common.check_readable_file("config.init_checkpoint",
                                   pathlib.Path(init_ckpt) / checkpoint.METADATA_FILE)
    else:
        common.check_readable_file("config.init_hf_dir",
                                   pathlib.Path(c.init_hf_dir) / "config.json")
    common.check_choice("config.model.attention", c.model.attention, ATTENTION_IMPLS)
    o = c.optimizer
    num("config.optimizer.lr", o.lr, lo=0, lo_open=True)
    num("config.optimizer.warmup_steps", o.warmup_steps, lo=0, integer=True)
    common.check_choice("config.optimizer.decay", o.decay, ("cosine", "linear", "constant"))
    num("config.optimizer.end_lr_ratio", o.end_lr_ratio, lo=0, hi=1)
    num("config.optimizer.b1", o.b1, lo=0, hi=1)
    num("config.optimizer.b2", o.b2, lo=0, hi=1)
    num("config.optimizer.eps", o.eps, lo=0, lo_open=True)
    num("config.optimizer.weight_decay", o.weight_decay, lo=0)
    num("config.optimizer.clip_norm", o.clip_norm, lo=0)
    num("config.loss.beta", c.loss.beta, lo=0, lo_open=True)
    num("config.loss.label_smoothing", c.loss.label_smoothing, lo=0, hi=0.5)
    num("config.loss.w_focused", c.loss.w_focused)
    if c.loss.nll_weight is not None:
        num("config.loss.nll_weight", c.loss.nll_weight, lo=0)
    if c.loss.dpop_lambda is not None:
        num("config.loss.dpop_lambda", c.loss.dpop_lambda, lo=0)
    common.check_choice("config.loss.reference", c.loss.reference, ("frozen", "precomputed"))
    num("config.loss.tdpo_alpha", c.loss.tdpo_alpha, lo=0)
    t = c.train
    num("config.train.batch_size", t.batch_size, lo=1, integer=True)
    num("config.train.micro_batches", t.micro_batches, lo=1, integer=True)
    common.check(t.batch_size % t.micro_batches == 0,
                 f"config.train.batch_size={t.batch_size} must be a multiple of "
                 f"config.train.micro_batches={t.micro_batches}")
    num("config.train.num_steps", t.num_steps, integer=True)
    if t.num_steps <= 0:
        num("config.train.num_epochs", t.num_epochs, lo=1, integer=True)
    num("config.train.logprob_chunk", t.logprob_chunk, lo=1, integer=True)
    num("config.train.response_capacity", t.response_capacity, lo=-1, integer=True)
    for name in ("every_steps", "eval_every_steps"):
        num(f"config.log.{name}", c.log[name], lo=1, integer=True)
    num("config.log.grad_share_every", c.log.grad_share_every, lo=-1, integer=True)
    num("config.checkpoint.every_steps", c.checkpoint.every_steps, lo=1, integer=True)
    num("config.checkpoint.keep", c.checkpoint.keep, lo=1, integer=True)
    common.check_mesh_shape(c.mesh_shape)
    manifest_path = pathlib.Path(c.data.dir or "") / "manifest.json"
    common.check_readable_file("config.data.dir", manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as e:
        raise common.UsageError(f"{manifest_path}: not JSON: {e}") from None
    data_vocab = (manifest.get("tokenizer") or {}).get("vocab_size")
    try:  # the model's config alone, not its weights
        model_vocab = checkpoint.read_config(checkpoint=init_ckpt,
                                             hf_dir=None if init_ckpt else c.init_hf_dir
                                             )[0].vocab_size
    except ValueError as e:
        raise common.UsageError(f"{init_ckpt or c.init_hf_dir}: {e}") from None
    common.check(data_vocab is None or model_vocab is None or data_vocab <= model_vocab,
                 f"config.data.dir={c.data.dir}: built with a tokenizer of {data_vocab} "
                 f"tokens ({manifest_path} tokenizer.vocab_size), more than the model's "
                 f"vocab_size {model_vocab} ({init_ckpt or c.init_hf_dir})")


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
        sys.exit(common.EXIT_INTERRUPTED if e.signal == "SIGINT" else EXIT_SIGTERM)
    summary = {k: last["train"].get(k) for k in ("loss", "rewards/accuracies")}
    print(f"done: {WORKDIR.value} {json.dumps(summary)}", flush=True)


if __name__ == "__main__":
    common.run(main)
