"""Every program refuses bad input before work: exit status 2, one line on stderr naming the
flag, field or file:line (no traceback), and nothing under the outputs changed or left
behind (issue 15). Programs interrupted over a good output: tests/launch/test_interrupt.py."""
from __future__ import annotations

import json
import random

import pytest

from data_tools import build
from fdpo.models import checkpoint
from fdpo.testing import build_tiny_tokenizer

from tests.conftest import run_program
from tests.helpers.files import tree_hash

SUM = "def f(xs):\n    return sum(xs)\n"
MAX = "def f(xs):\n    return max(xs)\n"


def _pairs(n: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        a, b = rng.sample(range(100), 2)
        lines.append(json.dumps({"prompt": f"Task {i}: add {a}.",
                                 "chosen": SUM.replace("sum", f"sum({a}) + sum"),
                                 "rejected": MAX.replace("max", f"max({b}) + max")}))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Good inputs and good existing outputs for every program, in one directory."""
    w = tmp_path_factory.mktemp("bad_inputs")
    tok = build_tiny_tokenizer(w / "tok", chat_template=True)
    (w / "pairs.jsonl").write_text(_pairs(12, seed=0))
    build.build(str(w / "pairs.jsonl"), str(tok), str(w / "data"), build.BuildConfig(max_len=96))
    checkpoint.init_random(w / "ckpt", tokenizer=str(tok),
                           fields=dict(hidden_size=32, num_layers=1, num_heads=2,
                                       num_kv_heads=1, intermediate_size=64))
    checkpoint.init_random(w / "ckpt_small_vocab",
                           fields=dict(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                                       num_kv_heads=1, intermediate_size=64))
    (w / "export").mkdir()
    (w / "export" / "config.json").write_text("{}\n")  # an earlier export
    (w / "prompts.jsonl").write_text('{"id": 1, "prompt": "Add."}\n')
    (w / "prompts_bad.jsonl").write_text('{"id": 1, "prompt": "Add."}\n\n{"id": 2, "prom\n')
    (w / "score_in.jsonl").write_text('{"input_ids": [1, 2, 3]}\n')
    (w / "concepts.jsonl").write_text('{"concept": "dict"}\n')
    (w / "a_file").write_text("x\n")
    (w / "samples.jsonl").write_text('{"task_id": "HumanEval/0", "solution": "pass"}\n')
    return w


def _train(w, *extra, ckpt="ckpt"):
    return ("launch.train", f"--workdir={w}/train_run",
            f"--config=configs/focused_dpo.py:model={w}/{ckpt},data={w}/data", *extra)


# (id, program and arguments given the world directory, what the one line must name).
CASES = [
    ("build-damping", lambda w: ("launch.build", f"--input={w}/pairs.jsonl", f"--tokenizer={w}/tok",
                                 f"--out={w}/data", "--config.damping=5"), "config.damping=5"),
    ("build-lam-nan", lambda w: ("launch.build", f"--input={w}/pairs.jsonl", f"--tokenizer={w}/tok",
                                 f"--out={w}/data", "--config.lam=nan"), "config.lam=nan"),
    ("build-typo", lambda w: ("launch.build", f"--out={w}/data", "--config.dampnig=0.5"),
     "'dampnig'"),
    ("build-int", lambda w: ("launch.build", f"--out={w}/data", "--config.max_len=abc"),
     "--config.max_len=abc"),
    ("build-no-input", lambda w: ("launch.build", f"--out={w}/data", f"--tokenizer={w}/tok"),
     "--input is required"),
    ("build-out-not-dataset", lambda w: ("launch.build", f"--input={w}/pairs.jsonl",
                                         f"--tokenizer={w}/tok", f"--out={w}/tok"),
     "no built dataset"),
    ("toy_data-unknown-flag", lambda w: ("launch.toy_data", f"--out={w}/toy", "--bogus=1"),
     "'bogus'"),
    ("pipeline-only", lambda w: ("launch.pipeline", "--config=configs/toy.py",
                                 f"--workdir={w}/run", "--only=smaple"), "smaple"),
    ("pipeline-prompts", lambda w: ("launch.pipeline",
                                    f"--config=configs/real.py:hf_dir={w}/hf,"
                                    f"prompts={w}/prompts_bad.jsonl", f"--workdir={w}/run"),
     "prompts_bad.jsonl:3"),
    ("synthesize-out-dir", lambda w: ("launch.synthesize", f"--concepts={w}/concepts.jsonl",
                                      f"--checkpoint={w}/ckpt", f"--out={w}/missing/p.jsonl"),
     "does not exist"),
    ("train-no-config", lambda w: ("launch.train", f"--workdir={w}/train_run"),
     "--config is required"),
    ("train-lr-negative", lambda w: _train(w, "--config.optimizer.lr=-1"),
     "config.optimizer.lr=-1"),
    ("train-lr-nan", lambda w: _train(w, "--config.optimizer.lr=nan"), "config.optimizer.lr=nan"),
    ("train-vocab", lambda w: _train(w, ckpt="ckpt_small_vocab"), "vocab_size 64"),
    ("sample-temperature", lambda w: ("launch.sample", f"--checkpoint={w}/ckpt",
                                      f"--input={w}/prompts.jsonl", f"--output={w}/s.jsonl",
                                      "--config.temperature=nan"), "--config.temperature=nan"),
    ("sample-num-codes", lambda w: ("launch.sample", f"--checkpoint={w}/ckpt",
                                    f"--input={w}/prompts.jsonl", f"--output={w}/s.jsonl",
                                    "--config.num_codes=-1"), "--config.num_codes=-1"),
    ("score-unwritable", lambda w: ("launch.score", f"--checkpoint={w}/ckpt",
                                    f"--input={w}/score_in.jsonl",
                                    f"--output={w}/a_file/out.jsonl"), "--output="),
    ("export-shard-size", lambda w: ("launch.export_hf", f"--checkpoint={w}/ckpt",
                                     f"--out={w}/export", "--max_shard_size_mb=-1"),
     "--max_shard_size_mb=-1"),
    ("init_model-vocab", lambda w: ("launch.init_model", f"--out={w}/ckpt2", f"--tokenizer={w}/tok",
                                    "--config.fields.vocab_size=100"), "vocab_size=100"),
    ("evaluate-k-zero", lambda w: ("launch.evaluate", "--benchmark=humaneval",
                                   f"--samples={w}/samples.jsonl", f"--out={w}/eval",
                                   "--config.k=(0,)"), "--config.k="),
    ("evaluate-k-abc", lambda w: ("launch.evaluate", "--benchmark=humaneval",
                                  f"--samples={w}/samples.jsonl", f"--out={w}/eval",
                                  "--config.k=abc"), "config.k"),
    ("execute-timeout", lambda w: ("launch.execute", f"--input={w}/pairs.jsonl",
                                   f"--output={w}/v.jsonl", "--config.timeout=nan"),
     "--config.timeout=nan"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,args,names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, name, args, names):
    before = tree_hash(world)
    proc = run_program(*args(world), check=False, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) <= 3, proc.stderr[-3000:]  # absl may log a line before the error
    program = args(world)[0]
    assert lines[-1].startswith(f"{program}: error: ") and lines[-1].endswith("(see --help)")
    assert names in lines[-1], lines[-1]
    assert tree_hash(world) == before  # nothing changed, no temporary left behind


def test_reader_refuses_shards_that_do_not_match_the_manifest(world, tmp_path):
    """A shard of another build beside the manifest (what an interrupted non-atomic rerun
    left): reading the split fails, naming the manifest and the shard."""
    import shutil

    from fdpo import records

    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    (tmp_path / "more.jsonl").write_text(_pairs(40, seed=3))
    build.build(str(tmp_path / "more.jsonl"), str(world / "tok"), str(tmp_path / "more"),
                build.BuildConfig(max_len=96))
    name = "train-00000-of-00001.array_record"
    shutil.copy(tmp_path / "more" / name, data / name)
    with pytest.raises(records.RecordError, match=f"manifest.json: shard {name} holds"):
        records.PairDataSource.from_manifest(data / "manifest.json", "train")
    assert len(records.PairDataSource.from_manifest(world / "data" / "manifest.json",
                                                    "train")) > 0


def test_export_over_an_old_export_leaves_only_the_new_files(world, tmp_path):
    """An old sharded export (index + shards) replaced by an unsharded one: the directory
    holds exactly what an export into an empty directory holds (no stale index that
    import_hf would prefer), and no temporary is left beside it."""
    from fdpo import sharding

    mesh = sharding.make_mesh((1, -1, 1))
    out, fresh = tmp_path / "hf", tmp_path / "fresh"
    checkpoint.export_hf(world / "ckpt", out, mesh, max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists()
    checkpoint.export_hf(world / "ckpt_small_vocab", out, mesh)
    checkpoint.export_hf(world / "ckpt_small_vocab", fresh, mesh)
    assert tree_hash(out) == tree_hash(fresh)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "hf"]
