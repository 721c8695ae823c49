"""launch.train and launch.precompute_ref as programs: resume after kill -9 and SIGTERM
(bitwise, each step logged once), the non-finite stop, 2 processes x 4 devices = 1 x 8,
precomputed reference, logs, final model and HF export, an incomplete final/ completed.

Every run shares one persistent compilation cache, so only the first run of each program
shape pays for XLA compilation.
"""
from __future__ import annotations

import collections
import json
import os
import pathlib
import signal
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from fdpo import records, scoring, sharding
from fdpo.models import checkpoint, convert
from fdpo.models.config import ModelConfig
from fdpo.testing import make_hf_model, random_pairs, torch_token_logprobs, write_dataset

from tests.conftest import REPO
from tests.helpers import tensorboard
ONE_DEVICE = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
STEPS = 24
BASE = [f"--config.train.num_steps={STEPS}", "--config.train.batch_size=8",
        "--config.checkpoint.every_steps=2", "--config.log.every_steps=1",
        "--config.log.eval_every_steps=12", "--config.optimizer.lr=1e-3",
        "--config.model.compute_dtype=float32"]

# Less LLVM optimisation: compiles ~35% faster, steps run slower; every comparison below is
# between runs under the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"

pytestmark = [pytest.mark.slow, pytest.mark.torch]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("launch")
    e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(base / "jaxcache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TOKENIZERS_PARALLELISM="false",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
    return base, e


@pytest.fixture(scope="module")
def setup(env):
    """A tiny Qwen2 imported into an fdpo checkpoint, and a pair dataset."""
    base, _ = env
    torch_model = make_hf_model(base / "hf", "qwen2", vocab_size=211)
    cfg = ModelConfig.from_hf_dir(base / "hf")
    _, state = convert.load_hf_params(base / "hf", cfg, ONE_DEVICE)
    checkpoint.save_model(base / "ckpt", cfg, state,
                          hf_config=json.loads((base / "hf" / "config.json").read_text()),
                          extras_from=base / "hf")
    write_dataset(base / "data", {"train": random_pairs(40, 32, 211, seed=0),
                                  "validation": random_pairs(6, 32, 211, seed=1)})
    return base, torch_model


def train_cmd(base, workdir, *extra, data="data"):
    return [sys.executable, "-m", "launch.train", f"--workdir={workdir}",
            f"--config=configs/focused_dpo.py:model={base / 'ckpt'},data={base / data},runlocal",
            *BASE, *extra]


def run(cmd, env, timeout=300, check=True):
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd[2]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def start(cmd, env):
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(workdir, step, proc, timeout=240):
    """Waits until checkpoint `step` is committed (orbax renames it into place)."""
    path = pathlib.Path(workdir) / "checkpoints" / str(step)
    deadline = time.time() + timeout
    while not path.is_dir():
        if proc.poll() is not None:
            raise AssertionError(f"run ended ({proc.returncode}) before checkpoint {step}:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"no checkpoint {step} after {timeout} s")
        time.sleep(0.02)


def final_params(workdir):
    _, _, state = checkpoint.load_model(pathlib.Path(workdir) / "final", ONE_DEVICE)
    return jax.device_get(nnx.to_pure_dict(state))


def metrics(workdir, split="train"):
    """{step: line} of one split, read line by line: a step logged twice fails here."""
    lines = [json.loads(x) for x in open(pathlib.Path(workdir) / "metrics.jsonl")]
    steps = collections.Counter(m["step"] for m in lines if m["split"] == split)
    assert all(n == 1 for n in steps.values()), \
        f"{split} steps logged more than once: {[s for s, n in steps.items() if n > 1]}"
    return {m["step"]: m for m in lines if m["split"] == split}


# Wall-clock scalars: their steps depend on where a run was resumed (first_step_time).
TIMING = ("first_step_time", "step_time", "tokens_per_s", "pairs_per_s")


def tensorboard_scalars(workdir):
    """{(tag, step): value} as TensorBoard shows the run, timing scalars left out; a (tag,
    step) twice fails here."""
    rows = [r for r in tensorboard.scalars(pathlib.Path(workdir) / "tensorboard")
            if not r[0].endswith(TIMING)]
    counts = collections.Counter((tag, step) for tag, step, _ in rows)
    assert all(n == 1 for n in counts.values()), \
        f"logged more than once: {sorted(k for k, n in counts.items() if n > 1)[:10]}"
    return {(tag, step): value for tag, step, value in rows}


def assert_logs_equal(workdir, reference):
    """Every (split, step) once, with the reference run's losses, in metrics.jsonl and in
    TensorBoard."""
    for split in ("train", "validation"):
        want, got = metrics(reference, split), metrics(workdir, split)
        assert sorted(got) == sorted(want)
        assert [got[s]["loss"] for s in sorted(want)] == [want[s]["loss"] for s in sorted(want)]
    want, got = tensorboard_scalars(reference), tensorboard_scalars(workdir)
    assert sorted(got) == sorted(want)
    for key in want:
        if key[0].endswith("/loss"):
            assert got[key] == want[key], key


def assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted(setup, env):
    base, _ = setup
    workdir = base / "uninterrupted"
    # The preset's own weight table, given as launch.train takes one on the command line.
    run(train_cmd(base, workdir, "--config.export_hf=True",
                  "--config.loss.weights=((1,2,1),(1,1,0))"), env[1])
    return workdir


def test_run_writes_logs_final_model_and_hf_export(setup, uninterrupted):
    base, torch_model = setup
    train_m, val_m = metrics(uninterrupted), metrics(uninterrupted, "validation")
    assert sorted(train_m) == list(range(1, STEPS + 1)) and sorted(val_m) == [12, 24]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "rewards/margins_mid", "rewards/margins_suffix",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens_per_s",
                "step_time"):
        assert key in train_m[STEPS], key
    assert train_m[STEPS]["loss"] < train_m[1]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    tags = {tag for tag, _ in tensorboard_scalars(uninterrupted)}
    assert {"train/loss", "train/rewards/accuracies", "validation/loss"} <= tags
    assert sorted(os.listdir(uninterrupted / "checkpoints")) == ["20", "22", "24"]  # keep 3
    config = json.loads((uninterrupted / "config.json").read_text())
    assert config["loss"]["weights"] == [[1, 2, 1], [1, 1, 0]]
    # the 2 x 3 table extended to (prefix, mid, suffix, lead, trail): lead as prefix, trail
    # as suffix (fdpo/loss.py)
    assert "weights=((1.0, 2.0, 1.0, 1.0, 1.0), (1.0, 1.0, 0.0, 1.0, 0.0))" in \
        checkpoint.read_metadata(uninterrupted / "final")["loss"]
    # The final model: loadable by load_model, exported HF weights load in transformers.
    from transformers import AutoModelForCausalLM
    import torch

    cfg, graphdef, state = checkpoint.load_model(uninterrupted / "final", ONE_DEVICE)
    hf = AutoModelForCausalLM.from_pretrained(uninterrupted / "hf", dtype=torch.float32)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 24))
    ours = np.asarray(scoring.make_score_fn(cfg, ONE_DEVICE, chunk=8)(
        nnx.to_pure_dict(state), ids, np.full(ids.shape, records.Segment.MID, np.int8)))
    theirs = torch_token_logprobs(hf, ids)[:, 1:].sum(-1)
    np.testing.assert_allclose(ours[:, 1], theirs, rtol=1e-5)
    changed = torch_token_logprobs(torch_model, ids)[:, 1:].sum(-1)
    assert np.abs(changed - theirs).max() > 1e-3  # training moved the weights


def test_sigterm_and_kill_9_then_resume_is_bitwise_exact(setup, env, uninterrupted):
    """SIGTERM (saves, exits 143), resume, kill -9 (possibly mid-save), resume: the final
    parameters and every logged loss equal the uninterrupted run's, bitwise."""
    base, _ = setup
    workdir = base / "interrupted"
    proc = start(train_cmd(base, workdir), env[1])
    wait_for_checkpoint(workdir, 4, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143
    saved = int(out.split("SIGTERM: saved step ")[1].split()[0])
    assert 4 <= saved < STEPS and (workdir / "checkpoints" / str(saved)).is_dir()

    proc = start(train_cmd(base, workdir), env[1])
    wait_for_checkpoint(workdir, max(saved + 2 - saved % 2, 12), proc)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert f"resumed from {workdir / 'checkpoints'} step {saved}" in err
    assert not (workdir / "final").exists()

    resumed = run(train_cmd(base, workdir), env[1])
    assert "resumed from" in resumed.stderr
    assert_bitwise_equal(final_params(uninterrupted), final_params(workdir))
    assert_logs_equal(workdir, uninterrupted)


def wait_for(predicate, proc, what, timeout=240, poll=0.005):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended ({proc.returncode}) before {what}:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(poll)


def test_kill_9_between_checkpoints_and_while_one_is_written(setup, env, uninterrupted):
    """kill -9 right after an odd step is logged (checkpoints are at even steps), and at
    the moment a checkpoint's temporary directory appears, then rerun: the parameters are
    bitwise the uninterrupted run's and every (split, step) is logged once, in
    metrics.jsonl and in TensorBoard."""
    base, _ = setup
    workdir = base / "killed"
    log = workdir / "metrics.jsonl"

    def odd_step_logged():
        return log.exists() and any(json.loads(x)["step"] >= 7 and json.loads(x)["step"] % 2
                                    for x in log.read_text().splitlines() if x.endswith("}"))

    proc = start(train_cmd(base, workdir), env[1])
    wait_for(odd_step_logged, proc, "a train line of an odd step >= 7")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = max(json.loads(x)["step"] for x in log.read_text().splitlines()
                    if x.endswith("}"))

    def temporary_checkpoint():
        return any(".orbax-checkpoint-tmp" in p.name and p.name.split(".")[0].isdigit() and
                   int(p.name.split(".")[0]) > killed_at
                   for p in (workdir / "checkpoints").iterdir())

    proc = start(train_cmd(base, workdir), env[1])
    wait_for(temporary_checkpoint, proc, "a temporary checkpoint directory")
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and "resumed from" in err

    resumed = run(train_cmd(base, workdir), env[1])
    assert "resumed from" in resumed.stderr
    assert_bitwise_equal(final_params(uninterrupted), final_params(workdir))
    assert_logs_equal(workdir, uninterrupted)


def test_final_without_metadata_is_rebuilt_on_rerun(setup, env, uninterrupted):
    """A kill after final/params was written but before its metadata (left by earlier
    versions, which wrote final/ in place): the rerun rebuilds final/ (and hf/) from the
    last checkpoint, saying so, instead of failing."""
    base, _ = setup
    workdir = base / "final_incomplete"
    shutil.copytree(uninterrupted, workdir, ignore=shutil.ignore_patterns("hf"))
    (workdir / "final" / checkpoint.METADATA_FILE).unlink()
    proc = run(train_cmd(base, workdir, "--config.export_hf=True",
                         "--config.loss.weights=((1,2,1),(1,1,0))"), env[1])
    assert f"has no {checkpoint.METADATA_FILE}" in proc.stderr
    assert f"rebuilding it from checkpoint step {STEPS}" in proc.stderr
    assert_bitwise_equal(final_params(uninterrupted), final_params(workdir))
    assert checkpoint.read_metadata(workdir / "final")["steps"] == STEPS
    assert (workdir / "hf" / "config.json").is_file()
    assert not list(workdir.glob(".*.tmp"))
    assert_logs_equal(workdir, uninterrupted)


def test_precomputed_reference_run_matches_frozen(setup, env, uninterrupted):
    base, _ = setup
    run([sys.executable, "-m", "launch.precompute_ref", *train_cmd(base, None)[4:],
         f"--out={base / 'data_ref'}", "--batch_size=8"], env[1])
    manifest = records.read_manifest(base / "data_ref" / "manifest.json")
    assert manifest["reference"]["checkpoint"] == str(base / "ckpt")
    src = records.PairDataSource.from_manifest(base / "data_ref" / "manifest.json", "train")
    orig = records.PairDataSource.from_manifest(base / "data" / "manifest.json", "train")
    assert len(src) == len(orig) == 40 and src.record(3).pair_id == orig.record(3).pair_id
    assert all(np.isfinite(src[i]["ref_logps"]).all() for i in range(len(src)))
    workdir = base / "precomputed"
    run(train_cmd(base, workdir, "--config.loss.reference=precomputed", data="data_ref"),
        env[1])
    want, got = metrics(uninterrupted), metrics(workdir)
    # Reference sums from another compiled program (batch 8 vs 16 rows): float32 rounding.
    np.testing.assert_allclose([got[s]["loss"] for s in sorted(want)],
                               [want[s]["loss"] for s in sorted(want)], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("every", [1, 3], ids=["checkpoint_every_step", "between_checkpoints"])
def test_non_finite_loss_stops_naming_the_step(setup, env, every):
    """Step 4 is not finite. Checked one step behind when step 4 is neither a log nor a
    checkpoint step (every=3: step 5 is already queued), at once otherwise; either way the
    run names step 4 and saves nothing after step 3."""
    base, _ = setup
    items = random_pairs(40, 32, 211, seed=0)
    for i, r in enumerate(items):
        r.ref_logps = np.zeros((2, 3), np.float32)
    items[26].ref_logps[1, 1] = np.nan  # unshuffled: pair 26 is in batch 3 -> step 4
    if not (base / "data_nan").exists():
        write_dataset(base / "data_nan", {"train": items}, shards=1)
    workdir = base / f"nan_{every}"
    proc = run(train_cmd(base, workdir, "--config.loss.reference=precomputed",
                         "--config.data.shuffle=False", f"--config.checkpoint.every_steps={every}",
                         f"--config.log.every_steps={every}",
                         "--config.reference.check_provenance=False",  # written by hand
                         data="data_nan"), env[1], check=False)
    assert proc.returncode == 1
    assert "step 4: loss nan" in proc.stderr and "last good checkpoint is step 3" in proc.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(s) for s in range(every, 4, every)]
    assert sorted(metrics(workdir)) == list(range(every, 4, every))
    assert not (workdir / "final").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_of_4_devices_match_one_of_8(setup, env, uninterrupted):
    """The same run as `uninterrupted` (1 process, 8 devices) as 2 processes x 4 devices
    with jax.distributed: each process reads only its half of every batch."""
    base, _ = setup
    two = base / "two_processes"
    port = _free_port()
    e4 = dict(env[1], XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}")
    procs = [start(train_cmd(base, two, "--config.checkpoint.every_steps=12", "--distributed",
                             f"--coordinator_address=localhost:{port}", "--num_processes=2",
                             f"--process_id={i}"), e4) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "'fsdp': 8" in outs[0][1] and "process 0 of 2" in outs[0][1]
    for split in ("train", "validation"):
        want, got = metrics(uninterrupted, split), metrics(two, split)
        assert sorted(got) == sorted(want)
        np.testing.assert_allclose([got[s]["loss"] for s in sorted(want)],
                                   [want[s]["loss"] for s in sorted(want)], rtol=1e-5)
    # Adam turns rounding noise in near-zero gradients into up to +-lr per step (lr 1e-3),
    # so parameters agree to a fraction of one step, not to float32 rounding.
    for a, b in zip(jax.tree.leaves(final_params(uninterrupted)),
                    jax.tree.leaves(final_params(two))):
        np.testing.assert_allclose(b, a, atol=2e-4)
