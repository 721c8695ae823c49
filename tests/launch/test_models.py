"""The import, export, score and init_model programs run as a user runs them, as subprocesses;
the defaults of the score config."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from configs import init_model as init_model_config
from configs import score as score_config
from fdpo import logprobs, scoring, sharding
from fdpo.models import checkpoint
from fdpo.models.config import ConfigError, ModelConfig, field_overrides
from fdpo.policy import Policy
from fdpo.testing import make_hf_model, torch_token_logprobs

from tests.conftest import REPO, run_program

pytestmark = pytest.mark.torch
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def run(module: str, *args: str, check=True) -> subprocess.CompletedProcess:
    return run_program(module, *args, env=ENV, timeout=600, check=check)


def save_tokenizer(out: pathlib.Path, vocab_size: int = 200):
    corpus = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
              "x = [v * 2 for v in xs if v > 0]\n"] * 20
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    model = make_hf_model(out, "qwen2", vocab_size=300, tie_word_embeddings=True,
                          num_key_value_heads=1)
    tokenizer = save_tokenizer(out)
    return out, model, tokenizer


def test_import_score_export_commands(hf_dir, tmp_path):
    hf, torch_model, tokenizer = hf_dir
    ckpt, out = tmp_path / "ckpt", tmp_path / "exported"
    run("launch.import_hf", "--hf_dir", str(hf), "--out", str(ckpt))
    assert (ckpt / "hf_extras" / "tokenizer.json").is_file()
    meta = json.loads((ckpt / "fdpo_model.json").read_text())
    assert meta["layout"]["stacked_layers"] and meta["model_config"]["tie_embeddings"]

    rng = np.random.default_rng(0)
    texts = ["def add(a, b):\n    return a + b\n", "for i in range(3):\n    print(i)\n"]
    ids_lines = [rng.integers(0, 300, n).tolist() for n in (5, 140, 31)]
    with open(tmp_path / "in.jsonl", "w") as f:
        for i, ids in enumerate(ids_lines):
            labels = [1] * 2 + [2] * (len(ids) - 4) + [3] * 2
            f.write(json.dumps({"id": f"ids{i}", "input_ids": ids, "segment_ids": labels}) + "\n")
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"text{i}", "text": text}) + "\n")
    run("launch.score", "--checkpoint", str(ckpt), "--input", str(tmp_path / "in.jsonl"),
        "--output", str(tmp_path / "a.jsonl"), "--config.batch_size=2",
        "--config.length_bucket=16")
    run("launch.score", "--hf_dir", str(hf), "--input", str(tmp_path / "in.jsonl"),
        "--output", str(tmp_path / "b.jsonl"))
    a = [json.loads(l) for l in open(tmp_path / "a.jsonl")]
    b = [json.loads(l) for l in open(tmp_path / "b.jsonl")]
    assert [r["id"] for r in a] == [f"ids{i}" for i in range(3)] + ["text0", "text1"]

    sequences = ids_lines + [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    for rec, rec_b, ids in zip(a, b, sequences):
        ref = torch_token_logprobs(torch_model, np.asarray([ids]))[0]
        assert rec["num_tokens"] == len(ids) - 1
        assert rec["logp_sum"] == pytest.approx(ref.sum(), rel=1e-4)
        assert rec_b["logp_sum"] == pytest.approx(ref.sum(), rel=1e-4)
        if "segment_ids" in rec:
            labels = np.asarray(rec["segment_ids"])
            for seg in ("1", "2", "3"):
                want = ref[(labels == int(seg)) & (np.arange(len(ids)) >= 1)].sum()
                assert rec["segment_logp_sums"][seg] == pytest.approx(want, rel=1e-4, abs=1e-4)
            assert rec["segment_num_tokens"] == {"1": 1, "2": len(ids) - 4, "3": 2}
            assert sum(rec["segment_logp_sums"].values()) == pytest.approx(rec["logp_sum"],
                                                                          rel=1e-5)

    run("launch.export_hf", "--checkpoint", str(ckpt), "--out", str(out))
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / "model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()


def test_score_reports_bad_lines(hf_dir, tmp_path):
    hf, _, _ = hf_dir
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2], "segment_ids": [1]}\n')
    proc = run("launch.score", "--hf_dir", str(hf), "--input", str(bad), "--output",
               str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode != 0
    assert f"{bad}:2: segment_ids must be 2 ints" in proc.stderr
    proc = run("launch.score", "--hf_dir", str(hf), "--input", str(bad), "--output",
               str(tmp_path / "o.jsonl"), "--config.compute_dtype=float16", check=False)
    assert proc.returncode != 0
    assert "--config.compute_dtype='float16'; expected one of" in proc.stderr
    bad.write_bytes(b'{"input_ids": [1, 2, 3]}\n\n{"text": "\xff"}\n')  # was a bare UnicodeDecodeError
    proc = run("launch.score", "--hf_dir", str(hf), "--input", str(bad), "--output",
               str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode != 0 and f"{bad}:3: not valid UTF-8" in proc.stderr
    proc = run("launch.import_hf", "--hf_dir", str(tmp_path / "nope"), "--out",
               str(tmp_path / "ck"), check=False)
    assert proc.returncode != 0 and "no config.json" in proc.stderr


def test_score_config_defaults_agree_with_the_library():
    """configs/score.py spells the defaults out (configs import only ml_collections); they
    must be Policy's."""
    c = score_config.get_config()
    load = inspect.signature(Policy.load).parameters
    score = inspect.signature(Policy.score).parameters
    chunk = inspect.signature(Policy).parameters["logprob_chunk"].default
    assert (c.batch_size, c.length_bucket, c.logprob_chunk) == (
        score["batch_size"].default, score["length_bucket"].default, chunk)
    assert (c.compute_dtype or None) == load["compute_dtype"].default  # "": the checkpoint's


@pytest.mark.slow
def test_import_peak_memory_stays_near_one_tensor(tmp_path):
    """Loading holds the model (on the CPU device, which is host memory) plus about one
    tensor in flight, not a second copy of the model as a state-dict loader would."""
    hf = tmp_path / "big"
    make_hf_model(hf, "llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8)
    model_bytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    assert model_bytes >= 200e6, model_bytes
    largest = 32000 * 1024 * 4  # embed_tokens / lm_head, float32

    # Libraries' import-time peaks would swamp ru_maxrss, so a thread samples RSS from just
    # before the load until it returns.
    code = """
import sys, threading, time, psutil
import jax.numpy as jnp
from fdpo import sharding
from fdpo.models import convert
from fdpo.models.config import ModelConfig
cfg = ModelConfig.from_hf_dir(sys.argv[1])
mesh = sharding.make_mesh((1, 1, 1))
jnp.zeros(1).block_until_ready()
proc = psutil.Process()
start = proc.memory_info().rss
peak = [start]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
graphdef, state = convert.load_hf_params(sys.argv[1], cfg, mesh)
done.set()
print('EXTRA', peak[0] - start)
"""
    # glibc's dynamic mmap threshold keeps freed tensor-sized blocks in the heap, so RSS would
    # count the allocator's cache as live memory (CI saw model + 2.2 tensors; malloc_trim
    # afterwards gave back all but 20 MB). A fixed threshold returns every freed tensor.
    env = {**ENV, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    proc = subprocess.run([sys.executable, "-c", code, str(hf)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    extra = int([l for l in proc.stdout.splitlines() if l.startswith("EXTRA")][0].split()[1])
    print(f"model {model_bytes / 1e6:.0f} MB, largest tensor {largest / 1e6:.0f} MB, "
          f"load peak above start {extra / 1e6:.0f} MB")
    # Measured here: model 570 MB, peak 669 MB above start (model + 0.76 tensors), steady.
    assert extra < model_bytes + 2 * largest, (extra, model_bytes, largest)


@pytest.mark.parametrize("arch_fields", [
    dict(architecture="qwen2", tie_embeddings=True, num_kv_heads=1),
    dict(architecture="llama", qkv_bias=False, tie_embeddings=False, rope_type="linear",
         rope_factor=4.0),
])
def test_init_model_exports_to_a_checkpoint_transformers_loads(tmp_path, arch_fields):
    """A fresh fdpo model (generated config.json, not a copied one) round-trips through HF."""
    fields = dict(arch_fields, hidden_size=32, num_heads=4, vocab_size=97)
    checkpoint.init_random(tmp_path / "ck", fields=fields, seed=3)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    checkpoint.export_hf(tmp_path / "ck", tmp_path / "hf", mesh, max_shard_bytes=1 << 30)
    torch_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    cfg, graphdef, state = checkpoint.load_model(tmp_path / "ck", mesh)
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 30))
    ours = logprobs.token_logprobs(nnx.merge(graphdef, state)(jnp.asarray(ids)), jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(ours), torch_token_logprobs(torch_model, ids), atol=1e-5)


def test_init_model_command_takes_fields_from_its_config(hf_dir, tmp_path):
    """`launch.init_model` reads ModelConfig fields as typed config values; the tokenizer
    gives the vocabulary; a field of the wrong type or name is an error naming it."""
    hf, _, tokenizer = hf_dir
    assert set(init_model_config.get_config().fields) == {
        f.name for f in dataclasses.fields(ModelConfig)}
    run("launch.init_model", f"--out={tmp_path / 'ck'}", f"--tokenizer={hf}",
        "--config.fields.architecture=llama", "--config.fields.hidden_size=48",
        "--config.fields.num_heads=4", "--config.fields.tie_embeddings=True",
        "--config.fields.rope_theta=5e5", "--config.seed=1")
    got = checkpoint.read_metadata(tmp_path / "ck")["model_config"]
    assert (got["architecture"], got["hidden_size"], got["head_dim"], got["tie_embeddings"],
            got["rope_theta"], got["vocab_size"]) == ("llama", 48, 12, True, 5e5, len(tokenizer))
    assert (tmp_path / "ck" / "hf_extras" / "tokenizer.json").is_file()
    with pytest.raises(ConfigError, match="'hidden' is not a ModelConfig field"):
        field_overrides({"hidden": 64})
    with pytest.raises(ConfigError, match="num_layers='2': expected int"):
        field_overrides({"num_layers": "2"})
