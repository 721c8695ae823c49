r"""Scores sequences with a model: log-prob sums, total and per segment.

    python -m launch.score (--checkpoint CKPT | --hf_dir HF) --input IN.jsonl --output OUT.jsonl \
        [--config.batch_size=8 --config.compute_dtype=float32]

Each input line holds `input_ids` (a list of ints) or `text` (tokenised with the model's
tokenizer, without special tokens added), optionally `segment_ids` (one int label per
token, 0..15), and any other fields, which are copied through (`id`, say). Each output
line adds `logp_sum` = sum over t >= 1 of log p(x_t | x_<t) (float32 log-softmax),
`num_tokens` (tokens scored, length - 1), and with segments `segment_logp_sums` and
`segment_num_tokens`, keyed by label: token t's log-prob counts in the segment of token t.
Output lines are in input order. The model and its tokenizer are a `fdpo.policy.Policy`;
scoring is `Policy.score`, batched and chunked as configs/score.py says. With several
processes (`--distributed`, one per host) every process reads the whole input, the batches
run over the global mesh, every process gets every sum back, and process 0 alone writes
OUTPUT (tests/launch/test_multiprocess_programs.py).

Every input is checked before the weights are read, and a bad one stops the run with exit
status 2, one line naming it, and nothing written: a malformed line (bad JSON or UTF-8, a
missing or wrong field; FILE:LINE), a token id outside the model's vocabulary (FILE:LINE
and the position), a tokenizer with more tokens than the model has embedding rows (both
sizes). A log-prob sum that comes out non-finite (NaN weights, say) is never written as
JSON `NaN`: the run stops the same way, naming the first such line and how many there are,
and writes nothing.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

import configs
from fdpo import jsonl, sharding
from fdpo.policy import ModelFiles, Policy, VocabError, encode_text
from launch import common

CONFIG = common.define_config("config", configs.path("score.py"),
                              "Scoring settings (configs/score.py).",
                              lock_config=True)
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "fdpo checkpoint directory.")
HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory.")
INPUT = flags.DEFINE_string("input", None, "Input JSONL.", required=True)
OUTPUT = flags.DEFINE_string("output", None, "Output JSONL.", required=True)
COMPUTE_DTYPES = ("", "float32", "bfloat16")  # "": the checkpoint's


class InputError(ValueError):
    pass


def parse_record(where, rec, files: ModelFiles):
    """(record, token ids, segment labels or None) of one input line; InputError naming
    `where` when it is malformed or its ids lie outside the model's vocabulary."""
    if "input_ids" in rec:
        ids = rec["input_ids"]
        if not (isinstance(ids, list) and
                all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
            raise InputError(f"{where}: input_ids must be a list of non-negative ints")
    elif "text" in rec:
        if not isinstance(rec["text"], str):
            raise InputError(f"{where}: text must be a string")
        if files.tokenizer is None:
            raise InputError(f"{where}: has 'text' but {files.tokenizer_dir} holds no "
                             "tokenizer")
        ids = encode_text(files.tokenizer, rec["text"])
    else:
        raise InputError(f"{where}: needs 'input_ids' or 'text'")
    if not ids:
        raise InputError(f"{where}: empty sequence")
    files.check_ids(ids, where)
    labels = rec.get("segment_ids")
    if labels is not None:
        if not (isinstance(labels, list) and len(labels) == len(ids) and
                all(isinstance(s, int) and 0 <= s < 16 for s in labels)):
            raise InputError(f"{where}: segment_ids must be {len(ids)} ints in 0..15, one per "
                             f"token")
    return rec, ids, labels


def non_finite(results, wheres) -> list[str]:
    """One message per output record whose log-prob sums are not all finite."""
    bad = []
    for where, rec in zip(wheres, results):
        values = [rec["logp_sum"], *rec.get("segment_logp_sums", {}).values()]
        if not all(math.isfinite(v) for v in values):
            bad.append(f"{where}: log-prob sum {rec['logp_sum']} is not finite")
    return bad


def main(argv):
    del argv
    if (CHECKPOINT.value is None) == (HF_DIR.value is None):
        raise app.UsageError("give exactly one of --checkpoint and --hf_dir")
    c = CONFIG.value
    for field in ("batch_size", "length_bucket", "logprob_chunk"):
        if c[field] < 1:
            raise app.UsageError(f"--config.{field}={c[field]}: must be >= 1")
    if c.compute_dtype not in COMPUTE_DTYPES:
        raise app.UsageError(f"--config.compute_dtype={c.compute_dtype!r}; expected one of "
                             f"{COMPUTE_DTYPES}")
    in_path = pathlib.Path(INPUT.value)
    if not in_path.is_file():
        raise app.UsageError(f"--input={in_path}: no such file")
    # The output is written after all the compute: check it can be, before.
    common.check_output("--output", OUTPUT.value, make_parents=True)
    common.check_mesh_shape()
    files = common.model_files(CHECKPOINT.value, HF_DIR.value)
    # Parse everything first, so a malformed line fails before the weights are read.
    try:
        parsed = [(where, *parse_record(where, rec, files))
                  for where, rec in jsonl.objects(in_path, error=InputError)]
    except (InputError, VocabError) as e:
        raise common.UsageError(str(e)) from None
    logging.info("%s: %d sequences", in_path, len(parsed))
    policy = Policy.load(common.init_jax(), files=files, compute_dtype=c.compute_dtype,
                         logprob_chunk=c.logprob_chunk)

    with tqdm(total=len(parsed), desc="score", unit="seq") as bar:
        res = policy.score([ids for _, _, ids, _ in parsed],
                           [labels for _, _, _, labels in parsed],
                           batch_size=c.batch_size, length_bucket=c.length_bucket,
                           progress=bar.update)
    results = []
    for i, (_, rec, _, labels) in enumerate(parsed):
        rec = dict(rec, logp_sum=float(res.logp_sum[i]), num_tokens=int(res.num_tokens[i]))
        if labels is not None:
            present = sorted(set(labels))
            rec["segment_logp_sums"] = {str(s): float(res.segment_sums[i, s]) for s in present}
            rec["segment_num_tokens"] = {str(s): int(res.segment_counts[i, s])
                                         for s in present}
        results.append(rec)
    # JSON has no NaN: a non-finite sum is the model's failure on that sequence, refused
    # whole rather than written as an invalid line or a null that later stages would drop.
    bad = non_finite(results, [where for where, *_ in parsed])
    if bad:
        raise common.UsageError(
            f"{bad[0]} ({len(bad)} of {len(results)} sequences non-finite under "
            f"{files.source}; nothing written)")

    out_path = pathlib.Path(OUTPUT.value)
    if not sharding.is_writer():  # every process computed the same results; process 0 writes
        return
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    try:
        out_path.absolute().parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            for rec in results:
                f.write(json.dumps(rec) + "\n")
        tmp.replace(out_path)
    except BaseException:  # also Ctrl-C: the old output stays, no temporary beside it
        tmp.unlink(missing_ok=True)
        raise
    total = np.sum([r["num_tokens"] for r in results])
    print(f"scored {len(results)} sequences ({total} tokens) -> {out_path}")


if __name__ == "__main__":
    common.run(main)
