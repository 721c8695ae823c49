"""A training run around the compiled step (`fdpo.train.Trainer`): what `launch.train` does,
usable from a notebook or a script with the same behaviour.

    from fdpo import runtime, train_loop
    mesh = runtime.init(config.mesh_shape)              # configs/focused_dpo.py config
    last = train_loop.run(config, "runs/x", mesh)      # or TrainRun(...) step by step

`TrainRun(config, workdir, mesh)` restores the latest checkpoint of `workdir` or starts
from the initial policy; `.train()` runs the loop (periodic log, validation, checkpoints);
`.write_final()` writes `final/` (and `hf/`). Each is a short method below.

Contracts (docs/training.md):
- Exactly-once logs: a run resumed from checkpoint M first drops the lines with step > M
  from `metrics.jsonl` (written to a temporary file, then renamed) and opens TensorBoard
  with `purge_step=M+1`, so every (split, step) is logged once however often it is killed.
- No per-step host sync: the next batch is read while the step runs (its shared rows
  packed by the loader's read-ahead threads, `fdpo.data.train_dataset`); metrics
  stay on the device until a log step. Finiteness is still checked every step, one step
  behind: the host waits for step N's flag only after step N+1 is queued, so the device
  does not idle for it. A non-finite step N is reported as such; its update is not applied
  (the step function keeps the old state) and nothing after the last good checkpoint is
  saved, since saving (at log, validation and checkpoint steps) first checks the step.
- Validation at step N runs at the parameters after N updates (the train line of step N
  is computed at the parameters before its update).
- `final/` and `hf/` are written to a temporary sibling and renamed into place; a `final/`
  without its metadata file (left by an older version) is rebuilt from the last checkpoint.
- SIGTERM or a first Ctrl-C during the loop: the current step is saved, then `Terminated`;
  a second Ctrl-C interrupts at once (`_StopSignals`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from fdpo import atomic, data, reference, train
from fdpo import loss as loss_lib
from fdpo.metric_writer import MetricWriter
from fdpo.models import checkpoint, convert
from fdpo.records import PairDataSource


class NonFiniteLoss(RuntimeError):
    """A step's loss or gradient norm was not finite; the run stopped before it."""


class Terminated(Exception):
    """SIGTERM or Ctrl-C (`signal`: "SIGTERM" or "SIGINT"): the state after `step` was
    saved; rerun to continue."""

    def __init__(self, step: int, directory, signal_name: str = "SIGTERM"):
        super().__init__(f"{signal_name}: saved step {step} to {directory}; exiting")
        self.step, self.signal = step, signal_name


def check_config(config) -> None:
    """Errors a run would otherwise meet late, naming the config key."""
    if bool(config.init_checkpoint) == bool(config.init_hf_dir):
        raise ValueError("set exactly one of init_checkpoint (config arg model=) and "
                         "init_hf_dir")
    if config.loss.reference not in train.REFERENCE_MODES:
        raise ValueError(f"loss.reference={config.loss.reference!r}; expected one of "
                         f"{train.REFERENCE_MODES}")
    tdpo = config.loss.loss_type or config.loss.preset
    if tdpo in loss_lib.TDPO_TYPES and config.loss.reference != "frozen":
        raise ValueError(f"loss {tdpo} (Token-level DPO) needs the reference's whole "
                         f"distribution at every response token, which precomputed ref_logps "
                         f"(per-segment sums) do not hold: set loss.reference=frozen")


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def sharding_rules(config) -> tuple:
    return tuple((name, tuple(a) if isinstance(a, (list, tuple)) else a)
                 for name, a in config.sharding_rules)


@dataclasses.dataclass
class Policy:
    """The initial policy: its config, parameters and where it came from."""
    model_cfg: Any
    params: Any
    hf_config: dict | None
    extras_dir: pathlib.Path | None  # tokenizer files to copy into final/
    source: str


def load_policy(config, mesh, rules) -> Policy:
    ckpt = config.init_checkpoint or None
    model_cfg, _, state, extras = checkpoint.load_checkpoint_or_hf(
        mesh, checkpoint=ckpt, hf_dir=config.init_hf_dir, rules=rules,
        **config.model.to_dict())
    hf_config = (checkpoint.read_metadata(ckpt).get("hf_config") if ckpt else
                 json.loads((pathlib.Path(config.init_hf_dir) / "config.json").read_text()))
    return Policy(model_cfg, nnx.to_pure_dict(state), hf_config,
                  pathlib.Path(extras) if pathlib.Path(extras).is_dir() else None,
                  str(ckpt or config.init_hf_dir))


def reference_params(config, trainer: train.Trainer, policy: Policy):
    """The frozen reference's parameters for the step (None when the step runs none: a
    precomputed reference, after its provenance is checked, or a loss without one). The
    initial policy's are copied, since the train state's buffers are donated; see
    `fdpo.reference.for_run`."""
    return reference.for_run(config, policy.params, trainer.model_cfg, trainer.mesh,
                             needs_reference=trainer.uses_ref_params or
                             trainer.loss_cfg.needs_reference)


class _StopSignals:
    """Remembers a SIGTERM or a first Ctrl-C (SIGINT) until the loop reaches a step
    boundary, where the step is saved and the run stops. A KeyboardInterrupt raised in the
    middle of an asynchronous orbax save leaves its threads unable to finish, and the
    process hangs at exit; so the first Ctrl-C only asks for a stop, and a second one
    interrupts at once (Python's KeyboardInterrupt). `restore_sigint` puts Python's Ctrl-C
    back once the loop is over."""

    def __init__(self, install: bool):
        self.received: str | None = None  # the first signal's name
        self._sigint = None
        if install and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            self._sigint = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        del frame
        self.received = self.received or signal.Signals(signum).name
        if signum == signal.SIGINT:
            self.restore_sigint()  # a second Ctrl-C: KeyboardInterrupt at once
            logging.warning("Ctrl-C: the run stops after saving the current step (press "
                            "Ctrl-C again to stop at once, without saving)")

    def restore_sigint(self) -> None:
        if self._sigint is not None:
            signal.signal(signal.SIGINT, self._sigint)
            self._sigint = None

    def any_process(self) -> bool:
        """Collective with several processes: call it at the same steps on all of them."""
        if jax.process_count() == 1:
            return self.received is not None
        flags_ = multihost_utils.process_allgather(np.asarray(self.received is not None))
        return bool(np.any(flags_))


class TrainRun:
    """One run directory: the set-up (restore or init) happens in the constructor."""

    def __init__(self, config, workdir, mesh, *, handle_sigterm: bool = True):
        check_config(config)
        self.config, self.mesh = config, mesh
        self.workdir = pathlib.Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.is_main = jax.process_index() == 0
        if self.is_main:
            atomic.write_text(self.workdir / "config.json",
                              config.to_json_best_effort(indent=2) + "\n")
        self.rules = sharding_rules(config)
        self.policy = load_policy(config, mesh, self.rules)
        self.loss_cfg = loss_lib.from_config(config.loss)
        self._open_data()
        self.trainer = self._make_trainer()
        self.ref_params = reference_params(config, self.trainer, self.policy)
        self.manager = ocp.CheckpointManager(
            self.workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.checkpoint.keep,
                enable_async_checkpointing=config.checkpoint.use_async))
        self.state, self.step = self._restore_or_init()
        self.policy.params = None  # the train state holds (donated) copies now
        self.stop_signals = _StopSignals(handle_sigterm)

    # -- set-up ----------------------------------------------------------------------------

    def _open_data(self):
        c = self.config
        manifest = pathlib.Path(c.data.dir) / "manifest.json"
        self.train_src = PairDataSource.from_manifest(manifest, c.data.train_split)
        try:
            self.eval_src = PairDataSource.from_manifest(manifest, c.data.eval_split)
        except KeyError:
            self.eval_src = None
        self.total_steps = c.train.num_steps
        if self.total_steps <= 0:
            self.total_steps = c.train.num_epochs * data.steps_per_epoch(
                len(self.train_src), c.train.batch_size)
        # The row length is known before the loader is built, so its read-ahead threads
        # pack the shared rows and the step's host code does not (`Trainer.make_batch`).
        # One pass over the records sizes the rows and, with response_capacity=-1, the
        # positions per row that reach the LM head.
        sources = [s for s in (self.train_src, self.eval_src) if s is not None]
        shared = bool(c.train.shared_prompt)
        most = (data.row_extents(*sources, shared=shared)
                if shared or c.train.response_capacity < 0 else None)
        self.shared_length = (c.train.shared_length or most.length) if shared else 0
        if shared:
            logging.info("shared-prompt rows of %d tokens (separate rows: 2 x %d)",
                         self.shared_length, self.train_src[0]["chosen_ids"].shape[-1])
        self.response_capacity, self.trunk_capacity = int(c.train.response_capacity), 0
        if self.response_capacity < 0:
            row = self.shared_length or self.train_src[0]["chosen_ids"].shape[-1]
            self.response_capacity, self.trunk_capacity = train.lm_head_capacities(
                most, row, shared, self.loss_cfg)
            logging.info("LM head on %s branch + %d trunk positions per row of %d "
                         "(train.response_capacity=-1: the data's most scored)",
                         self.response_capacity or "all", self.trunk_capacity, row)
        ds = data.train_dataset(self.train_src, global_batch=c.train.batch_size,
                                seed=c.data.seed, process_index=jax.process_index(),
                                process_count=jax.process_count(), shuffle=c.data.shuffle,
                                shared_length=self.shared_length)
        self.batches = data.train_iterator(ds, num_threads=c.data.num_threads,
                                           prefetch=c.data.prefetch)

    def _make_trainer(self) -> train.Trainer:
        c = self.config
        tx, schedule = train.make_optimizer(train.OptimizerConfig(**c.optimizer.to_dict()),
                                            self.total_steps)
        logging.info("%s: %d pairs, %d steps of %d pairs; loss %s", c.data.dir,
                     len(self.train_src), self.total_steps, c.train.batch_size,
                     self.loss_cfg)
        return train.Trainer(self.policy.model_cfg, self.loss_cfg, tx, self.mesh, self.rules,
                             reference=c.loss.reference, chunk=c.train.logprob_chunk,
                             schedule=schedule, shared_length=self.shared_length,
                             response_capacity=self.response_capacity,
                             trunk_capacity=self.trunk_capacity,
                             logprob_recompute=c.train.logprob_recompute,
                             mechanism=c.log.mechanism)

    def _restore_or_init(self):
        latest = self.manager.latest_step()
        if latest is None:
            state = self.trainer.init_state(self.policy.params)
            return state, 0
        restored = self.manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(self.trainer.abstract_state()),
            data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
        self.batches.set_state(restored.data)
        logging.info("resumed from %s step %d", self.manager.directory, latest)
        changed = config_changes(restored.config,
                                 json.loads(self.config.to_json_best_effort()))
        if changed:
            logging.warning("the config differs from the checkpoint's (the run will not "
                            "reproduce an uninterrupted one): %s", "; ".join(changed))
        return restored.state, int(jax.device_get(restored.state["step"]))

    # -- the loop --------------------------------------------------------------------------

    def _next_batch(self):
        """(the next step's batch, the iterator state before it): what a checkpoint of the
        steps before that batch must record, as the batch is read ahead."""
        before = self.batches.get_state()
        examples = next(self.batches)
        return self.trainer.make_batch(examples, self.config.train.micro_batches), before

    def _check_finite(self, step: int, metrics) -> None:
        """Blocks until `step` is computed; raises when it was not finite."""
        if float(jax.device_get(metrics["finite"])):
            return
        self.manager.wait_until_finished()
        m = jax.device_get(metrics)
        raise NonFiniteLoss(
            f"step {step}: loss {m['loss']}, gradient norm {m['grad_norm']}: not finite. The "
            f"update was not applied; the last good checkpoint is step "
            f"{self.manager.latest_step()} in {self.manager.directory}.")

    def train(self, writer: MetricWriter | None = None) -> dict:
        """Steps to the end; returns the last logged train and validation scalars. Opens
        (and closes) the metric writer unless one is given."""
        own_writer = writer is None
        if own_writer:
            writer = MetricWriter(self.workdir, tensorboard=self.config.log.tensorboard,
                                  enabled=self.is_main, resume_step=self.step)
        try:
            return self._train(writer)
        finally:
            self.stop_signals.restore_sigint()
            if own_writer:
                writer.close()

    def _train(self, writer: MetricWriter) -> dict:
        c, total = self.config, self.total_steps
        last = {"train": {}, "validation": {}}
        if self.step >= total:
            return last
        every = lambda n: self.step % n == 0 or self.step == total  # noqa: E731
        one_process = jax.process_count() == 1
        pending = None  # (step, metrics) queued on the device, not yet checked
        counts = []  # (tokens, pairs) device scalars since the last log line
        first_step = self.step + 1
        extra = {}
        mark, mark_step = time.perf_counter(), self.step
        batch, _ = self._next_batch()
        while self.step < total:
            self.state, metrics = self.trainer.train_step(self.state, batch, self.ref_params)
            self.step += 1
            if pending is not None:  # the previous step; this one is queued behind it
                self._check_finite(*pending)
            pending = (self.step, metrics)
            counts.append((metrics["tokens"], metrics["pairs"]))
            if self.step < total:  # read (packed by the loader) while the step runs
                batch, data_state = self._next_batch()
            else:
                data_state = self.batches.get_state()
            log, evaluate, save = (every(c.log.every_steps), every(c.log.eval_every_steps),
                                   every(c.checkpoint.every_steps))
            share_every = c.log.grad_share_every
            share = c.log.mechanism and (evaluate if share_every < 0 else
                                         share_every > 0 and every(share_every))
            stop_check = one_process or log or evaluate or save  # collective when multi-host
            stop = stop_check and self.stop_signals.any_process()
            if self.step == first_step or log or evaluate or save or stop or share:
                self._check_finite(*pending)
                pending = None
                now = time.perf_counter()
                if self.step == first_step:  # includes compilation: not in the step time
                    extra["first_step_time"] = now - mark
                    counts, mark, mark_step = [], now, self.step
                if log:
                    scalars = self._train_scalars(metrics, counts, now - mark,
                                                  self.step - mark_step)
                    scalars.update(extra)
                    extra, counts, mark, mark_step = {}, [], now, self.step
                    writer.write(self.step, "train", scalars)
                    last["train"] = scalars
                ev = self.evaluate() if evaluate else {}
                if share:  # in the validation line: one line per (split, step)
                    ev = {**ev, **self.grad_share()}
                if ev:
                    writer.write(self.step, "validation", ev)
                    last["validation"] = ev
                if save or stop:
                    self.save(data_state, writer)
                if stop:
                    self.manager.wait_until_finished()
                    writer.flush()
                    raise Terminated(self.step, self.manager.directory,
                                     self.stop_signals.received or "SIGTERM")
                if evaluate or save or share:  # their time is not step time
                    counts, mark, mark_step = [], time.perf_counter(), self.step
        self.manager.wait_until_finished()
        return last

    def _train_scalars(self, metrics, counts, seconds: float, steps: int) -> dict:
        m = jax.device_get(metrics)
        scalars = {k: float(np.asarray(v)) for k, v in m.items() if k != "finite"}
        if steps and counts:
            tokens, pairs = np.sum(jax.device_get(counts), axis=0)
            scalars["step_time"] = seconds / steps
            scalars["tokens_per_s"] = float(tokens) / seconds
            scalars["pairs_per_s"] = float(pairs) / seconds
        logging.info("step %d/%d loss %.4f acc %.3f margin %.4f grad %.3g lr %.3g", self.step,
                     self.total_steps, scalars["loss"], scalars["rewards/accuracies"],
                     scalars["rewards/margins"], scalars["grad_norm"],
                     scalars.get("lr", float("nan")))
        return scalars

    def evaluate(self) -> dict:
        """Validation metrics at the current parameters (after `self.step` updates)."""
        if self.eval_src is None or len(self.eval_src) == 0:
            return {}
        c, sums = self.config, None
        for examples, mask in data.eval_batches(
                self.eval_src, global_batch=c.train.batch_size,
                process_index=jax.process_index(), process_count=jax.process_count(),
                max_batches=c.log.eval_max_batches if c.log.eval_max_batches > 0 else None):
            batch = self.trainer.make_batch(examples, c.train.micro_batches, mask)
            out = self.trainer.eval_step(self.state["params"], batch, self.ref_params)
            sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
        ev = train.eval_metrics(jax.device_get(sums), self.loss_cfg)
        logging.info("step %d validation (parameters after %d updates) loss %.4f acc %.3f",
                     self.step, self.step, ev["loss"], ev["rewards/accuracies"])
        return ev

    def grad_share(self) -> dict:
        """`mech/grad/...` (fdpo.mechanism) on the first validation batch at the current
        parameters: two extra backward passes."""
        if self.eval_src is None or len(self.eval_src) == 0:
            return {}
        c = self.config
        examples, mask = next(iter(data.eval_batches(
            self.eval_src, global_batch=c.train.batch_size,
            process_index=jax.process_index(), process_count=jax.process_count(),
            max_batches=1)))
        batch = self.trainer.make_batch(examples, c.train.micro_batches, mask)
        out = self.trainer.grad_share_step(self.state["params"], batch, self.ref_params)
        return {k: float(v) for k, v in jax.device_get(out).items()}

    def save(self, data_state, writer: MetricWriter | None = None) -> None:
        """A checkpoint of the current step; the logs up to it are flushed first, so a
        resume from it finds them on disk."""
        if writer is not None:
            writer.flush()
        if self.manager.latest_step() == self.step:
            return
        self.manager.save(self.step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(json.loads(self.config.to_json_best_effort()))))

    # -- the trained model -----------------------------------------------------------------

    def _sync(self, name: str) -> None:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(name)

    def _replace_dir(self, tmp: pathlib.Path, dst: pathlib.Path) -> None:
        if self.is_main:
            os.replace(tmp, dst)
        self._sync(f"fdpo_rename_{dst.name}")

    def _remove(self, *paths: pathlib.Path) -> None:
        if self.is_main:
            for p in paths:
                shutil.rmtree(p, ignore_errors=True)
        self._sync("fdpo_remove")

    @contextlib.contextmanager
    def _removed_on_error(self, tmp: pathlib.Path):
        """A temporary that an error or Ctrl-C stops half-way is removed (a kill -9 leaves
        it to the next run, which removes it before writing)."""
        try:
            yield
        except BaseException:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def write_final(self) -> pathlib.Path:
        """`final/` (an fdpo model checkpoint) from the current state, and `hf/` with
        `export_hf`; each written beside its place and renamed into it."""
        final, hf = self.workdir / "final", self.workdir / "hf"
        meta_file = final / checkpoint.METADATA_FILE
        if meta_file.exists() and checkpoint.read_metadata(final).get("steps") != self.step:
            # A finished run continued with more steps: replace its final model.
            logging.info("%s is from another step count; replacing it", final)
            self._remove(final, hf)
        elif final.exists() and not meta_file.exists():
            logging.warning("%s has no %s (an interrupted final save): rebuilding it from "
                            "checkpoint step %d", final, checkpoint.METADATA_FILE, self.step)
            self._remove(final, hf)
        if not final.exists():
            tmp = self.workdir / ".final.tmp"
            self._remove(tmp)
            params = nnx.State(nnx.split(convert.abstract_model(self.trainer.model_cfg))[1])
            nnx.replace_by_pure_dict(params, self.state["params"])
            with self._removed_on_error(tmp):
                checkpoint.save_model(
                    tmp, self.trainer.model_cfg, params, hf_config=self.policy.hf_config,
                    extras_from=self.policy.extras_dir,
                    metadata={"trained_from": self.policy.source, "steps": self.step,
                              "loss": repr(self.loss_cfg)})
                self._replace_dir(tmp, final)
            logging.info("wrote %s", final)
        if self.config.export_hf:
            if hf.exists() and not (hf / "config.json").exists():
                logging.warning("%s has no config.json (an interrupted export): rebuilding",
                                hf)
                self._remove(hf)
            if not hf.exists():
                tmp = self.workdir / ".hf.tmp"
                self._remove(tmp)
                with self._removed_on_error(tmp):
                    checkpoint.export_hf(final, tmp, self.mesh, 5 * 1024**3)
                    self._replace_dir(tmp, hf)
        return final


def run(config, workdir, mesh, *, handle_sigterm: bool = True) -> dict:
    """Trains to the end (or resumes there) and writes the final model; returns the last
    logged train and validation scalars. Raises `NonFiniteLoss`, or `Terminated` after
    saving when SIGTERM or a first Ctrl-C arrived during the loop (with `handle_sigterm`;
    a second Ctrl-C raises KeyboardInterrupt at once)."""
    r = TrainRun(config, workdir, mesh, handle_sigterm=handle_sigterm)
    last = r.train()
    r.write_final()
    return last
