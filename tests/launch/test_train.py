"""launch.train and launch.precompute_ref as programs: resume after kill -9 and SIGTERM
(bitwise), the non-finite stop, 2 processes x 4 devices = 1 x 8, precomputed reference,
logs, final model and HF export.

Every run shares one persistent compilation cache, so only the first run of each program
shape pays for XLA compilation.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from tensorboardX.proto import event_pb2

from fdpo import records, scoring, sharding
from fdpo.models import checkpoint, convert
from fdpo.models.config import ModelConfig
from fdpo.testing import make_hf_model, random_pairs, torch_token_logprobs, write_dataset

from tests.conftest import REPO
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
    lines = [json.loads(x) for x in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return {m["step"]: m for m in lines if m["split"] == split}


def assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def read_tensorboard_tags(logdir) -> set[str]:
    """Scalar tags in tensorboardX event files (TFRecord framing around Event protos)."""
    tags = set()
    for f in pathlib.Path(logdir).glob("events.out.tfevents.*"):
        data = f.read_bytes()
        off = 0
        while off < len(data):
            (n,) = struct.unpack_from("<Q", data, off)
            event = event_pb2.Event.FromString(data[off + 12:off + 12 + n])
            tags.update(v.tag for v in event.summary.value)
            off += 12 + n + 4
    return tags


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
    assert {"train/loss", "train/rewards/accuracies", "validation/loss"} <= \
        read_tensorboard_tags(uninterrupted / "tensorboard")
    assert sorted(os.listdir(uninterrupted / "checkpoints")) == ["20", "22", "24"]  # keep 3
    config = json.loads((uninterrupted / "config.json").read_text())
    assert config["loss"]["weights"] == [[1, 2, 1], [1, 1, 0]]
    assert "weights=((1.0, 2.0, 1.0), (1.0, 1.0, 0.0))" in \
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
    want, got = metrics(uninterrupted), metrics(workdir)  # steps repeated after kill -9 too
    assert sorted(got) == sorted(want) and all(got[s]["loss"] == want[s]["loss"] for s in want)


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


def test_non_finite_loss_stops_naming_the_step(setup, env):
    base, _ = setup
    items = random_pairs(40, 32, 211, seed=0)
    for i, r in enumerate(items):
        r.ref_logps = np.zeros((2, 3), np.float32)
    items[26].ref_logps[1, 1] = np.nan  # unshuffled: pair 26 is in batch 3 -> step 4
    write_dataset(base / "data_nan", {"train": items}, shards=1)
    workdir = base / "nan"
    proc = run(train_cmd(base, workdir, "--config.loss.reference=precomputed",
                         "--config.data.shuffle=False", "--config.checkpoint.every_steps=1",
                         "--config.reference.check_provenance=False",  # written by hand
                         data="data_nan"), env[1], check=False)
    assert proc.returncode == 1
    assert "step 4: loss nan" in proc.stderr and "last good checkpoint is step 3" in proc.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3"]
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
