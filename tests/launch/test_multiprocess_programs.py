"""Every JAX program run as 2 processes x 4 CPU devices (jax.distributed on localhost) gives
what 1 process x 8 devices gives, written once: launch.sample (token for token, at
temperature with fixed seeds; with stop strings too), launch.score and launch.precompute_ref
(log-probs to 1e-6), launch.evaluate --checkpoint (greedy samples and results equal),
launch.import_hf (equal parameters), launch.export_hf (bitwise equal safetensors),
launch.analyze with the continuation experiment and launch.synthesize (bitwise equal
outputs).

Each process runs under tests/helpers/write_audit.py, which logs the files it opens for
writing, renames or removes: process 1 must write nothing under an output process 0 owns.
One tiny model, checkpoint and pair dataset serve the whole file; every run shares one
persistent compilation cache.
"""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from fdpo import records, sharding
from fdpo.models import checkpoint, convert
from fdpo.models.config import ModelConfig
from fdpo.testing import build_tiny_tokenizer, make_hf_model, random_pairs, write_dataset

from tests.conftest import REPO, SHARED

pytestmark = [pytest.mark.slow, pytest.mark.torch, pytest.mark.pod]

AUDIT = REPO / "tests" / "helpers" / "write_audit.py"
# Less LLVM optimisation: compiles faster; both sides of every comparison run under it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
VOCAB = 400
PROMPTS = [{"id": f"p{i}", "prompt": text} for i, text in enumerate(
    ["Write a function add(a, b).", "Write is_even(n).", "Return the maximum of a list.",
     "Sum a list of numbers.", "Compute fib(n)."])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Qwen2 (tokenizer with a chat template) as an HF directory and an fdpo
    checkpoint, a pair dataset, and the environment every program runs in."""
    base = tmp_path_factory.mktemp("multiprocess")
    hf = build_tiny_tokenizer(base / "hf", chat_template=True)
    make_hf_model(hf, "qwen2", vocab_size=VOCAB, tie_word_embeddings=True)
    cfg = ModelConfig.from_hf_dir(hf)
    _, state = convert.load_hf_params(hf, cfg, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    checkpoint.save_model(base / "ckpt", cfg, state,
                          hf_config=json.loads((hf / "config.json").read_text()),
                          extras_from=hf)
    write_dataset(base / "pairs", {"train": random_pairs(12, 32, VOCAB, seed=0),
                                   "validation": random_pairs(5, 32, VOCAB, seed=1)})
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               JAX_COMPILATION_CACHE_DIR=str(base / "jaxcache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return base, env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cmd(log, module, args):
    return [sys.executable, str(AUDIT), str(log), module, *map(str, args)]


def run_both(setup, name, module, args_for, timeout=300):
    """Runs `module` with `args_for(out)` as 1 process x 8 devices into BASE/name/one and as
    2 processes x 4 devices into BASE/name/two; returns (one, two, the files process 1
    wrote, removed or renamed into)."""
    base, env = setup
    root = base / name
    root.mkdir()
    one, two = root / "one", root / "two"
    e8 = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
    proc = subprocess.run(_cmd(root / "one.log", module, args_for(one)), cwd=REPO, env=e8,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    e4 = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}")
    port = _free_port()
    procs = [subprocess.Popen(
        _cmd(root / f"two.{i}.log", module,
             [*args_for(two), "--distributed", f"--coordinator_address=localhost:{port}",
              "--num_processes=2", f"--process_id={i}"]),
        cwd=REPO, env=e4, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"
    assert "process 0 of 2" in outs[0][1], outs[0][1][-2000:]
    written = [line.split("\t", 1)[1] for line in
               (root / "two.1.log").read_text().splitlines()]
    return one, two, written


def under(paths, root) -> list[str]:
    """The paths under `root`, except orbax's temporary checkpoint directory, where every
    process writes its own part by orbax's protocol (merged and renamed by process 0)."""
    root = str(pathlib.Path(root).absolute())
    return [p for p in paths if (p == root or p.startswith(root + os.sep))
            and ".orbax-checkpoint-tmp" not in p]


def files(root) -> list[str]:
    """Every file under `root`, relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*")
                  if p.is_file())


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_sample(setup):
    """Codes and tests at temperature 1 (per-row seeds), with refill: the same tokens, in
    input order, one output file written by process 0 alone."""
    base, _ = setup
    prompts = base / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    one, two, written = run_both(setup, "sample", "launch.sample", lambda out: [
        "--checkpoint", base / "ckpt", "--input", prompts, "--output", out / "samples.jsonl",
        "--config.num_codes=3", "--config.num_tests=1", "--config.max_new_tokens=10",
        "--config.temperature=1.0", "--config.batch_size=8", "--config.length_bucket=32",
        "--config.refill=True"])
    want, got = jsonl(one / "samples.jsonl"), jsonl(two / "samples.jsonl")
    assert [r["id"] for r in got] == [p["id"] for p in PROMPTS]
    assert got == want
    # Not every sample is the same: the draws differ by row seed.
    assert len({tuple(s["response_ids"]) for r in got for s in r["samples"]}) > 1
    assert files(two) == ["samples.jsonl"]
    assert under(written, two) == []


def test_score(setup):
    base, _ = setup
    rng = np.random.default_rng(0)
    lines = [{"id": i, "input_ids": rng.integers(0, VOCAB, int(n)).tolist(),
              "segment_ids": rng.integers(0, 3, int(n)).tolist()}
             for i, n in enumerate(rng.integers(2, 40, 11))]
    inp = base / "score_in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    one, two, written = run_both(setup, "score", "launch.score", lambda out: [
        "--checkpoint", base / "ckpt", "--input", inp, "--output", out / "scores.jsonl",
        "--config.batch_size=4", "--config.length_bucket=16"])
    want, got = jsonl(one / "scores.jsonl"), jsonl(two / "scores.jsonl")
    assert [r["id"] for r in got] == list(range(len(lines)))
    for w, g in zip(want, got):
        assert g["num_tokens"] == w["num_tokens"] == len(g["input_ids"]) - 1
        assert g["segment_num_tokens"] == w["segment_num_tokens"]
        np.testing.assert_allclose(g["logp_sum"], w["logp_sum"], rtol=1e-6, atol=1e-6)
        labels = sorted(w["segment_logp_sums"])
        assert sorted(g["segment_logp_sums"]) == labels
        np.testing.assert_allclose([g["segment_logp_sums"][k] for k in labels],
                                   [w["segment_logp_sums"][k] for k in labels],
                                   rtol=1e-6, atol=1e-6)
    assert files(two) == ["scores.jsonl"]
    assert under(written, two) == []


def test_precompute_ref(setup):
    """The training config's mesh (--config.mesh_shape) over all 8 devices of both
    processes; every shard and the manifest written by process 0."""
    base, _ = setup
    one, two, written = run_both(setup, "reference", "launch.precompute_ref", lambda out: [
        f"--config=configs/focused_dpo.py:model={base / 'ckpt'},data={base / 'pairs'}",
        "--config.model.compute_dtype=float32", f"--out={out}", "--batch_size=4"])
    assert files(two) == files(one) == files(base / "pairs")
    m1, m2 = (records.read_manifest(d / "manifest.json") for d in (one, two))
    assert m2["reference"]["identity"] == m1["reference"]["identity"]
    for split, info in m1["splits"].items():
        for shard in info["shards"]:
            a = records.PairDataSource(one / shard["path"])
            b = records.PairDataSource(two / shard["path"])
            assert len(a) == len(b) > 0
            for i in range(len(a)):
                ra, rb = a.record(i), b.record(i)
                assert rb.pair_id == ra.pair_id
                np.testing.assert_allclose(rb.ref_logps, ra.ref_logps, rtol=1e-6, atol=1e-6)
    assert under(written, two) == []


def test_evaluate_checkpoint(setup):
    """Greedy generation (the plain loop, no refill) for three HumanEval+ tasks, then the
    sandbox: equal samples and results; process 1 writes nothing (process 0 writes samples
    and results)."""
    base, _ = setup
    with gzip.open(SHARED / "data/evalplus/HumanEvalPlus-v0.1.10.jsonl.gz", "rt") as f:
        rows = [row for row in map(json.loads, f)
                if row["task_id"] in ("HumanEval/0", "HumanEval/2", "HumanEval/4")]
    dataset = base / "he3.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    one, two, written = run_both(setup, "evaluate", "launch.evaluate", lambda out: [
        "--benchmark=humaneval+", f"--dataset={dataset}", f"--checkpoint={base / 'ckpt'}",
        f"--out={out}", "--config.response_format=completion", "--config.n=2",
        "--config.max_new_tokens=6", "--config.workers=1", "--config.k=(1,)",
        "--config.min_time_limit=1", "--config.refill=False"])
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()
    want, got = (json.loads((d / "results.json").read_text()) for d in (one, two))
    for key in ("pass_at_k", "status_counts", "num_samples"):
        assert got[key] == want[key]
    assert files(two) == files(one)
    assert under(written, two) == []


def test_import_and_export(setup):
    base, _ = setup
    one, two, written = run_both(setup, "import", "launch.import_hf", lambda out: [
        f"--hf_dir={base / 'hf'}", f"--out={out / 'ckpt'}"])
    extras = checkpoint.EXTRAS_DIR
    assert files(two / "ckpt" / extras) == files(one / "ckpt" / extras) != []
    assert (json.loads((two / "ckpt" / checkpoint.METADATA_FILE).read_text())["model_config"]
            == json.loads((one / "ckpt" / checkpoint.METADATA_FILE).read_text())["model_config"])
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    _, _, want = checkpoint.load_model(one / "ckpt", mesh)
    _, _, got = checkpoint.load_model(two / "ckpt", mesh)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    assert under(written, two) == []

    one, two, written = run_both(setup, "export", "launch.export_hf", lambda out: [
        f"--checkpoint={base / 'ckpt'}", f"--out={out / 'hf'}"])
    assert files(two / "hf") == files(one / "hf")
    for name in files(one / "hf"):
        assert (two / "hf" / name).read_bytes() == (one / "hf" / name).read_bytes(), name
    # And the export is the HF model it was imported from.
    exported = load_file(two / "hf" / "model.safetensors")
    source = load_file(base / "hf" / "model.safetensors")
    assert sorted(exported) == sorted(k for k in source if k != "lm_head.weight")
    for k in exported:
        np.testing.assert_array_equal(exported[k], source[k])
    assert under(written, two) == []


def test_sample_with_stop_strings(setup):
    """Stop strings are checked on the host from every row's tokens (gathered from both
    processes): the same cuts, finish reasons and tokens."""
    base, _ = setup
    prompts = base / "prompts_stop.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:3]))
    # Frequent characters of the tiny tokenizer's random text, checked every 2 steps, with
    # refill (the default: a stopped row takes the next sample).
    one, two, written = run_both(setup, "sample_stop", "launch.sample", lambda out: [
        "--checkpoint", base / "ckpt", "--input", prompts, "--output", out / "samples.jsonl",
        "--config.num_codes=3", "--config.num_tests=1", "--config.max_new_tokens=12",
        "--config.temperature=1.0", "--config.batch_size=8", "--config.length_bucket=32",
        "--config.stop_check_steps=2", "--config.stop=('e', 'a')", "--config.refill=True"])
    want, got = jsonl(one / "samples.jsonl"), jsonl(two / "samples.jsonl")
    assert [r["id"] for r in got] == [p["id"] for p in PROMPTS[:3]]
    assert got == want
    finishes = [s["finish"] for r in got for s in r["samples"]]
    assert "stop" in finishes, finishes  # the stop path ran
    for r in got:
        for s in r["samples"]:
            if s["finish"] == "stop":  # cut before the stop string
                assert "e" not in s["response"] and "a" not in s["response"]
    assert under(written, two) == []


@pytest.fixture(scope="module")
def eos_hf(setup):
    """A tiny HF model whose greedy continuation is EOS at once: its final norm's weight is
    0, so every logit is 0 and greedy takes token 0, made the EOS id. A continuation adds
    nothing and every program's verdict is known."""
    import torch
    from transformers import AutoTokenizer

    base, _ = setup
    d = build_tiny_tokenizer(base / "eos_hf", chat_template=False)
    assert AutoTokenizer.from_pretrained(str(d)).convert_ids_to_tokens(0) == "<|endoftext|>"
    model = make_hf_model(d, "qwen2", vocab_size=VOCAB, num_hidden_layers=1,
                          eos_token_id=0, pad_token_id=0, bos_token_id=None)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(d)
    return d


@pytest.mark.sandbox
def test_analyze_with_continuations(setup, eos_hf):
    """The Phi table and the continuation experiment: every process generates, the sandbox
    runs are split by problem (process 0 takes problems 0 and 2, process 1 problem 1) and
    merged in input order; every file equal to 1 process's, bitwise, and written by
    process 0 alone."""
    base, _ = setup

    def line(pid, codes, passed, tests):
        return {"id": pid, "prompt": f"# {pid}\n", "codes": codes, "tests": tests,
                "passed": passed}
    add = ["def f(x):\n    return x + 1\n", "def f(x):\n    return x + 2\n"]
    # Verdicts as given: the x + 2 code is called right here, so its continuation (the
    # program prompt + prefix + its mid) fails the real test and the rejected one passes.
    lines = [line("add", add, [[True], [False]], ["assert f(1) == 2"]),
             line("swapped", add, [[False], [True]], ["assert f(1) == 2"]),
             line("upper", ["def g(s):\n    return s.lower() + 'x'\n",
                            "def g(s):\n    return s.upper()\n"], [[False, False], [True, True]],
                  ["assert g('a') == 'A'", "assert g('') == ''"])]
    samples = base / "analyze_in.jsonl"
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    one, two, written = run_both(setup, "analyze", "launch.analyze", lambda out: [
        "--samples", samples, "--out", out / "analysis", "--hf_dir", eos_hf,
        "--config.continuation=True", "--config.num_continuations=2",
        "--config.max_new_tokens=4", "--config.timeout=5"])
    assert files(two) == files(one)
    for name in files(one):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    cont = json.loads((two / "analysis" / "continuation.json").read_text())
    assert [(p["id"], p["chosen_passed"], p["rejected_passed"]) for p in cont["per_problem"]] \
        == [("add", 2, 0), ("swapped", 0, 2), ("upper", 2, 0)]
    assert cont["chosen"]["passed"] == 4 and cont["rejected"]["passed"] == 2
    assert under(written, two) == []


def test_synthesize(setup):
    """Problem synthesis at temperature: the same generations (saved), records, rejections
    and report, in request order, written by process 0 alone."""
    base, _ = setup
    concepts = base / "concepts.jsonl"
    concepts.write_text("".join(json.dumps(c) + "\n" for c in [
        {"concept": "pattern:binary_search", "kind": "pattern", "count": 30},
        {"concept": "api:collections.Counter", "kind": "api", "count": 100},
        {"concept": "construct:generator_function", "kind": "construct", "count": 5}]))

    def args(out):
        out.mkdir(parents=True, exist_ok=True)  # launch.synthesize needs an existing one
        return ["--concepts", concepts, "--checkpoint", base / "ckpt",
                "--out", out / "p.jsonl", "--save_generations", out / "g.jsonl",
                "--per_concept=1", "--config.samples_per_request=2",
                "--config.sampling.max_new_tokens=8", "--config.sampling.batch_size=8"]

    one, two, written = run_both(setup, "synthesize", "launch.synthesize", args)
    assert files(two) == files(one) == sorted(
        ["g.jsonl", "p.jsonl", "p.jsonl.rejected.jsonl", "p.jsonl.report.json"])
    for name in files(one):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    gens = jsonl(two / "g.jsonl")
    assert [g["request"] for g in gens] == [0, 1, 2]
    assert len({t for g in gens for t in g["texts"]}) > 1  # draws differ
    assert under(written, two) == []


# Process i of 2: meets the other at a barrier, then process 0 fails while process 1 waits
# for it at the next one (as launch.evaluate's process 1 waits for process 0's sandbox runs).
FAILING_JOB = """
import sys, time
import jax
i, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=i)
from fdpo import sharding
with sharding.failures_announced():  # what launch.common.run does under --distributed
    assert sharding.gather(i, "who") == [0, 1]
    if i == 0:
        raise RuntimeError("boom on process 0")
    start = time.monotonic()
    try:
        sharding.sync("results written", timeout_s=600)
    finally:
        print(f"waited {time.monotonic() - start:.1f} s")
"""


def test_a_failure_on_process_0_stops_a_process_waiting_for_it():
    """Process 1 waiting at a barrier (up to 600 s) stops within seconds of process 0's
    error, naming process 0 and the error, instead of waiting for jax.distributed to
    notice."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", FAILING_JOB, str(i), str(port)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert procs[0].returncode != 0 and "boom on process 0" in outs[0][1]
    assert procs[1].returncode != 0, outs[1]
    assert ("ProcessFailed: sync 'results written': process 0 of 2 failed while process 1 "
            "waited for it: RuntimeError: boom on process 0") in outs[1][1], outs[1][1][-2000:]
    waited = float(outs[1][0].split("waited ")[1].split(" s")[0])
    assert waited < 60, waited
