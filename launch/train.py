r"""Trains a policy with the Focused-DPO loss family.

    python -m launch.train --workdir=WORKDIR \
        --config=configs/focused_dpo.py:model=CKPT,data=DATA_DIR [--config.optimizer.lr=5e-6]

WORKDIR gets `checkpoints/` (orbax: train state, data iterator state and config per
step), `metrics.jsonl`, `tensorboard/`, `config.json`, and at the end `final/` (an fdpo
model checkpoint: `fdpo.models.checkpoint.load_model`, `launch.export_hf`) and, with
`export_hf`, `hf/`. Rerunning the same command resumes from the latest checkpoint, also
after `kill -9`: the parameters come out bitwise equal to an uninterrupted run on CPU.

SIGTERM saves a checkpoint after the current step and exits with status 143. A loss or
gradient norm that is not finite stops the run (status 1) with a message naming the step;
that step's update is not applied and nothing after the last good checkpoint is saved.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags, logging
from flax import nnx
from jax.experimental import multihost_utils

from fdpo import data, train
from fdpo import loss as loss_lib
from fdpo.metric_writer import MetricWriter
from fdpo.models import checkpoint, convert
from fdpo.models.config import ModelConfig
from fdpo.records import PairDataSource
from launch import common

CONFIG = common.define_config("config", None, "Run config file (with :arg).",
                              required=True,
                              lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has "
                              "checkpoints).", required=True)

EXIT_SIGTERM = 143


class NonFiniteLoss(RuntimeError):
    pass


def _config_changes(old, new, prefix=""):
    """'key: old -> new' for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class _Sigterm:
    """Remembers a SIGTERM until the loop reaches a step boundary."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True

    def any_process(self) -> bool:
        if jax.process_count() == 1:
            return self.received
        flags_ = multihost_utils.process_allgather(np.asarray(self.received))
        return bool(np.any(flags_))


def run(config, workdir: str | pathlib.Path, mesh) -> dict:
    """Trains to the end (or resumes there); returns the last train and eval metrics."""
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    rules = tuple((name, tuple(a) if isinstance(a, (list, tuple)) else a)
                  for name, a in config.sharding_rules)

    # Model and loss.
    init_ckpt = config.init_checkpoint or None
    if bool(init_ckpt) == bool(config.init_hf_dir):
        raise ValueError("set exactly one of init_checkpoint (config arg model=) and "
                         "init_hf_dir")
    model_cfg, _, state, extras_dir = checkpoint.load_checkpoint_or_hf(
        mesh, checkpoint=init_ckpt, hf_dir=config.init_hf_dir, rules=rules,
        **config.model.to_dict())
    hf_config = (checkpoint.read_metadata(init_ckpt).get("hf_config") if init_ckpt else
                 json.loads((pathlib.Path(config.init_hf_dir) / "config.json").read_text()))
    init_params = nnx.to_pure_dict(state)
    del state
    loss_cfg = loss_lib.from_config(config.loss)

    # Data.
    manifest = pathlib.Path(config.data.dir) / "manifest.json"
    train_src = PairDataSource.from_manifest(manifest, config.data.train_split)
    try:
        eval_src = PairDataSource.from_manifest(manifest, config.data.eval_split)
    except KeyError:
        eval_src = None
    global_batch = config.train.batch_size
    total_steps = config.train.num_steps
    if total_steps <= 0:
        total_steps = config.train.num_epochs * data.steps_per_epoch(len(train_src),
                                                                     global_batch)
    ds = data.train_dataset(train_src, global_batch=global_batch, seed=config.data.seed,
                            process_index=jax.process_index(),
                            process_count=jax.process_count(), shuffle=config.data.shuffle)
    batches = data.train_iterator(ds, num_threads=config.data.num_threads,
                                  prefetch=config.data.prefetch)

    # Step functions.
    tx, schedule = train.make_optimizer(train.OptimizerConfig(**config.optimizer.to_dict()),
                                        total_steps)
    shared_length = 0
    if config.train.shared_prompt:
        shared_length = config.train.shared_length or data.longest_shared_row(
            *[s for s in (train_src, eval_src) if s is not None])
        logging.info("shared-prompt rows of %d tokens (separate rows: 2 x %d)",
                     shared_length, train_src[0]["chosen_ids"].shape[-1])
    trainer = train.Trainer(model_cfg, loss_cfg, tx, mesh, rules,
                            reference=config.loss.reference,
                            chunk=config.train.logprob_chunk, schedule=schedule,
                            shared_length=shared_length)
    logging.info("%s: %d pairs, %d steps of %d pairs; loss %s", config.data.dir,
                 len(train_src), total_steps, global_batch, loss_cfg)

    # State: the latest checkpoint, or fresh from the initial parameters.
    manager = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep,
            enable_async_checkpointing=config.checkpoint.use_async))
    latest = manager.latest_step()
    ref_params = None
    if trainer.loss_cfg.needs_reference and config.loss.reference == "frozen":
        ref_params = train.copy_params(init_params)  # the train state's buffers are donated
    if latest is not None:
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(trainer.abstract_state()),
            data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
        state = restored.state
        batches.set_state(restored.data)
        logging.info("resumed from %s step %d", manager.directory, latest)
        changed = _config_changes(restored.config, json.loads(config.to_json_best_effort()))
        if changed:
            logging.warning("the config differs from the checkpoint's (the run will not "
                            "reproduce an uninterrupted one): %s", "; ".join(changed))
    else:
        state = trainer.init_state(init_params)
    del init_params
    step = int(jax.device_get(state["step"]))

    def save(step, force=False):
        manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(batches.get_state()),
            config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))

    writer = MetricWriter(workdir, tensorboard=config.log.tensorboard, enabled=is_main)
    sigterm = _Sigterm()
    last = {"train": {}, "validation": {}}
    window = {"time": 0.0, "steps": 0, "tokens": 0.0, "pairs": 0.0}

    def evaluate():
        if eval_src is None or len(eval_src) == 0:
            return {}
        sums = None
        max_batches = config.log.eval_max_batches
        for examples, mask in data.eval_batches(
                eval_src, global_batch=global_batch, process_index=jax.process_index(),
                process_count=jax.process_count(),
                max_batches=max_batches if max_batches > 0 else None):
            batch = trainer.make_batch(examples, config.train.micro_batches, mask)
            out = jax.device_get(trainer.eval_step(state["params"], batch, ref_params))
            sums = out if sums is None else jax.tree.map(np.add, sums, out)
        return train.eval_metrics(sums, loss_cfg)

    try:
        while step < total_steps:
            examples = next(batches)
            batch = trainer.make_batch(examples, config.train.micro_batches)
            start = time.perf_counter()
            state, metrics = trainer.train_step(state, batch, ref_params)
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - start
            if not metrics["finite"]:
                manager.wait_until_finished()
                raise NonFiniteLoss(
                    f"step {step + 1}: loss {metrics['loss']}, gradient norm "
                    f"{metrics['grad_norm']}: not finite. The update was not applied; the "
                    f"last good checkpoint is step {manager.latest_step()} in "
                    f"{manager.directory}.")
            step += 1
            if "compile_step" not in last:  # the first step includes compilation
                last["compile_step"] = elapsed
                metrics["first_step_time"] = elapsed
            else:
                window["time"] += elapsed
                window["steps"] += 1
                window["tokens"] += float(metrics["tokens"])
                window["pairs"] += float(metrics["pairs"])
            if step % config.log.every_steps == 0 or step == total_steps:
                scalars = {k: float(np.asarray(v)) for k, v in metrics.items()
                           if k not in ("finite",)}
                if window["steps"]:
                    scalars["step_time"] = window["time"] / window["steps"]
                    scalars["tokens_per_s"] = window["tokens"] / window["time"]
                    scalars["pairs_per_s"] = window["pairs"] / window["time"]
                window = {"time": 0.0, "steps": 0, "tokens": 0.0, "pairs": 0.0}
                writer.write(step, "train", scalars)
                last["train"] = scalars
                logging.info("step %d/%d loss %.4f acc %.3f margin %.4f grad %.3g lr %.3g",
                             step, total_steps, scalars["loss"],
                             scalars["rewards/accuracies"], scalars["rewards/margins"],
                             scalars["grad_norm"], scalars.get("lr", float("nan")))
            if step % config.log.eval_every_steps == 0 or step == total_steps:
                ev = evaluate()
                if ev:
                    writer.write(step, "validation", ev)
                    last["validation"] = ev
                    logging.info("step %d validation loss %.4f acc %.3f", step, ev["loss"],
                                 ev["rewards/accuracies"])
            if step % config.checkpoint.every_steps == 0 or step == total_steps:
                save(step)
            if sigterm.any_process():
                if manager.latest_step() != step:
                    save(step, force=True)
                manager.wait_until_finished()
                msg = f"SIGTERM: saved step {step} to {manager.directory}; exiting"
                logging.warning(msg)
                print(msg, flush=True)
                writer.close()
                sys.exit(EXIT_SIGTERM)
        manager.wait_until_finished()
    finally:
        writer.close()

    # The trained model, in the model checkpoint format (load_model, export_hf).
    final = workdir / "final"
    stale = (final / checkpoint.METADATA_FILE).exists() and \
        checkpoint.read_metadata(final).get("steps") != step
    if stale:  # a finished run continued with more steps: replace its final model
        if is_main:
            shutil.rmtree(final)
            shutil.rmtree(workdir / "hf", ignore_errors=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("fdpo_replace_final")
    if not (final / checkpoint.METADATA_FILE).exists():
        abstract = nnx.split(convert.abstract_model(trainer.model_cfg))[1]
        params_state = nnx.State(abstract)
        nnx.replace_by_pure_dict(params_state, state["params"])
        checkpoint.save_model(final, trainer.model_cfg, params_state, hf_config=hf_config,
                              extras_from=extras_dir if pathlib.Path(extras_dir).is_dir()
                              else None,
                              metadata={"trained_from": str(init_ckpt or config.init_hf_dir),
                                        "steps": step, "loss": loss_cfg.__repr__()})
        logging.info("wrote %s", final)
    if config.export_hf and not (workdir / "hf" / "config.json").exists():
        checkpoint.export_hf(final, workdir / "hf", mesh, 5 * 1024**3)
    return last


def _model_vocab_size(config) -> int | None:
    if config.init_checkpoint:
        meta = checkpoint.read_metadata(config.init_checkpoint)
        return ModelConfig.from_json(meta["model_config"]).vocab_size
    hf = json.loads((pathlib.Path(config.init_hf_dir) / "config.json").read_text())
    return hf.get("vocab_size")


def validate(config) -> None:
    """Every config value a run depends on, checked before JAX starts or WORKDIR is
    touched: ranges and finiteness, the model and data paths, and the data's tokenizer
    vocabulary against the model's (ids past the embedding table give a NaN loss)."""
    num, c = common.check_number, config
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
    common.check_choice("config.loss.reference", c.loss.reference, ("frozen", "precomputed"))
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
    for name in ("every_steps", "eval_every_steps"):
        num(f"config.log.{name}", c.log[name], lo=1, integer=True)
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
    model_vocab = _model_vocab_size(c)
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
        last = run(config, WORKDIR.value, mesh)
    except NonFiniteLoss as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    summary = {k: last["train"].get(k) for k in ("loss", "rewards/accuracies")}
    print(f"done: {WORKDIR.value} {json.dumps(summary)}", flush=True)


if __name__ == "__main__":
    common.run(main)
