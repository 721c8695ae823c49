"""Every program refuses bad input before work: exit status 2, one line on stderr naming the
flag, field or file:line (no traceback), and nothing under the outputs changed or left
behind (issue 15). Programs interrupted over a good output: tests/launch/test_interrupt.py."""
from __future__ import annotations

import gzip
import json
import random
import re

import pytest

from data_tools import build
from fdpo.models import checkpoint
from fdpo.testing import build_tiny_tokenizer

from tests.conftest import SHARED, run_program
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
    _vocab_and_length_inputs(w, tok)
    return w


def _nan_row_checkpoint(src, dst, token: int):
    """A copy of checkpoint `src` whose (untied) embedding row `token` is NaN: a sequence
    holding that token gets non-finite log-probs from there on, the others stay finite."""
    import numpy as np
    from flax import nnx

    from fdpo import sharding

    cfg, _, state = checkpoint.load_model(src, sharding.make_mesh((1, -1, 1)))
    assert not cfg.tie_embeddings  # tied, the NaN row would reach every logit
    params = nnx.to_pure_dict(state)
    params["embed"] = params["embed"].at[token].set(np.nan)
    nnx.replace_by_pure_dict(state, params)
    checkpoint.save_model(dst, cfg, state, extras_from=src / checkpoint.EXTRAS_DIR)


def _vocab_and_length_inputs(w, tok):
    """Items 3 and 9 of issue 15: a checkpoint whose tokenizer outgrew its embedding table,
    one with a NaN embedding row, token ids past the vocabulary, non-UTF-8 bytes, an
    over-long prompt, a corrupt line in the middle of a resumable output."""
    import shutil

    from fdpo.tokenization import Encoder, load_tokenizer

    shutil.copytree(w / "ckpt_small_vocab", w / "ckpt_tok400")  # 64 rows, 400-token tokenizer
    shutil.copytree(tok, w / "ckpt_tok400" / checkpoint.EXTRAS_DIR, dirs_exist_ok=True)
    # The first token of every chat prompt: it precedes every response token of the data.
    nan_token = int(Encoder(load_tokenizer(tok)).prompts(["x"])[0][0])
    checkpoint.init_random(w / "ckpt_untied", tokenizer=str(tok),
                           fields=dict(hidden_size=32, num_layers=1, num_heads=2,
                                       num_kv_heads=1, intermediate_size=64,
                                       tie_embeddings=False))
    _nan_row_checkpoint(w / "ckpt_untied", w / "ckpt_nan", nan_token)
    (w / "score_nan.jsonl").write_text(
        f'{{"id": "a", "input_ids": [5, 6, 8]}}\n{{"id": "b", "input_ids": [5, {nan_token}, 8]}}\n')
    (w / "score_past_vocab.jsonl").write_text('{"input_ids": [1, 2]}\n\n{"input_ids": [1, 400]}\n')
    (w / "score_bytes.jsonl").write_bytes(b'{"input_ids": [1, 2]}\n{"text": "a\xff"}\n')
    (w / "prompts_bytes.jsonl").write_bytes(b'{"id": 1, "prompt": "Add."}\n{"id": 2, "prompt": "\xff"}\n')
    (w / "prompts_long.jsonl").write_text(json.dumps({"id": 1, "prompt": "Add."}) + "\n" +
                                          json.dumps({"id": "big", "prompt": "add " * 3000}) + "\n")
    (w / "samples_corrupt.jsonl").write_text('{"id": "1", "samples": []}\n{"id": "2", "sa\n'
                                             '{"id": "3", "samples": []}\n')
    (w / "samples_bytes.jsonl").write_bytes(b'{"task_id": "HumanEval/0", "solution": "pass"}\n'
                                            b'{"task_id": "HumanEval/0", "solution": "\xff"}\n')
    with gzip.open(SHARED / "data/evalplus/HumanEvalPlus-v0.1.10.jsonl.gz", "rt") as f:
        first = f.readline()
    (w / "humaneval_0.jsonl").write_text(first)


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
    ("toy_data-family", lambda w: ("launch.toy_data", f"--out={w}/toy",
                                   "--config.family=decisions"), "--config.family='decisions'"),
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
    # Tokenizer and token ids against the model's vocabulary (item 3): refused before the
    # weights are read, naming both sizes or the file:line; non-finite log-probs never land
    # in an output.
    ("score-tokenizer-vocab", lambda w: ("launch.score", f"--checkpoint={w}/ckpt_tok400",
                                         f"--input={w}/score_in.jsonl", f"--output={w}/o.jsonl"),
     "the tokenizer has 400 tokens but the model has 64 embedding rows"),
    ("score-id-past-vocab", lambda w: ("launch.score", f"--checkpoint={w}/ckpt",
                                       f"--input={w}/score_past_vocab.jsonl",
                                       f"--output={w}/o.jsonl"),
     "score_past_vocab.jsonl:3: token id 400 at position 1 is outside the model's vocabulary "
     "[0, 400)"),
    ("score-nan", lambda w: ("launch.score", f"--checkpoint={w}/ckpt_nan",
                             f"--input={w}/score_nan.jsonl", f"--output={w}/o.jsonl"),
     "score_nan.jsonl:2: log-prob sum nan is not finite (1 of 2 sequences"),
    ("sample-tokenizer-vocab", lambda w: ("launch.sample", f"--checkpoint={w}/ckpt_tok400",
                                          f"--input={w}/prompts.jsonl", f"--output={w}/s.jsonl"),
     "the tokenizer has 400 tokens but the model has 64 embedding rows"),
    ("evaluate-tokenizer-vocab", lambda w: ("launch.evaluate", "--benchmark=humaneval",
                                            f"--dataset={w}/humaneval_0.jsonl",
                                            f"--checkpoint={w}/ckpt_tok400", f"--out={w}/eval"),
     "the tokenizer has 400 tokens but the model has 64 embedding rows"),
    ("precompute_ref-vocab", lambda w: ("launch.precompute_ref", f"--out={w}/data_ref",
                                        "--config=configs/focused_dpo.py:"
                                        f"model={w}/ckpt_small_vocab,data={w}/data"),
     "more than the reference's 64 embedding rows"),
    ("precompute_ref-nan", lambda w: ("launch.precompute_ref", f"--out={w}/data_ref",
                                      "--config=configs/focused_dpo.py:"
                                      f"model={w}/ckpt_nan,data={w}/data"),
     "reference log-prob sums"),
    # Over-long prompts, bad bytes, a corrupt resumable output (item 9).
    ("sample-long-prompt", lambda w: ("launch.sample", f"--checkpoint={w}/ckpt",
                                      f"--input={w}/prompts_long.jsonl", f"--output={w}/s.jsonl",
                                      "--config.num_tests=0"),
     "prompts_long.jsonl:2: id 'big', code prompt: the prompt is"),
    ("sample-max-new-tokens", lambda w: ("launch.sample", f"--checkpoint={w}/ckpt",
                                         f"--input={w}/prompts.jsonl", f"--output={w}/s.jsonl",
                                         "--config.max_new_tokens=2000"),
     "--config.max_new_tokens=2000 leaves no room for a prompt in the model's 2048 positions"),
    ("evaluate-long-prompt", lambda w: ("launch.evaluate", "--benchmark=humaneval",
                                        f"--dataset={w}/humaneval_0.jsonl",
                                        f"--checkpoint={w}/ckpt", f"--out={w}/eval",
                                        "--config.max_new_tokens=1984"),
     "task HumanEval/0: the prompt is"),
    ("score-bytes", lambda w: ("launch.score", f"--checkpoint={w}/ckpt",
                               f"--input={w}/score_bytes.jsonl", f"--output={w}/o.jsonl"),
     "score_bytes.jsonl:2: not valid UTF-8"),
    ("sample-bytes", lambda w: ("launch.sample", f"--checkpoint={w}/ckpt",
                                f"--input={w}/prompts_bytes.jsonl", f"--output={w}/s.jsonl"),
     "prompts_bytes.jsonl:2: not valid UTF-8"),
    ("evaluate-bytes", lambda w: ("launch.evaluate", "--benchmark=humaneval",
                                  f"--samples={w}/samples_bytes.jsonl", f"--out={w}/eval"),
     "samples_bytes.jsonl:2: not valid UTF-8"),
    ("sample-corrupt-output", lambda w: ("launch.sample", f"--checkpoint={w}/ckpt",
                                         f"--input={w}/prompts.jsonl",
                                         f"--output={w}/samples_corrupt.jsonl"),
     "samples_corrupt.jsonl:2: malformed line in the existing output"),
]


LOG_LINE = re.compile(r"[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")  # absl's prefix
PROGRESS = re.compile(r"\d+%\|")  # tqdm


@pytest.mark.slow
@pytest.mark.parametrize("name,args,names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, name, args, names):
    before = tree_hash(world)
    proc = run_program(*args(world), check=False, timeout=120)
    # Refusals found once the model is loaded (non-finite log-probs) come after the load's
    # log lines and progress bars: those are not part of the error.
    lines = [ln for ln in proc.stderr.splitlines()
             if ln.strip() and not LOG_LINE.match(ln) and not PROGRESS.search(ln)]
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
