"""Scores sequences with a model: log-prob sums, total and per segment.

    python -m launch.score (--checkpoint CKPT | --hf_dir HF) --input IN.jsonl --output OUT.jsonl

Each input line holds `input_ids` (a list of ints) or `text` (tokenised with the model's
tokenizer, without special tokens added), optionally `segment_ids` (one int label per
token, 0..15), and any other fields, which are copied through (`id`, say). Each output
line adds `logp_sum` = sum over t >= 1 of log p(x_t | x_<t) (float32 log-softmax),
`num_tokens` (tokens scored, length - 1), and with segments `segment_logp_sums` and
`segment_num_tokens`, keyed by label: token t's log-prob counts in the segment of token t.
Output lines are in input order. Malformed lines stop the run with the line number.
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags, logging

from fdpo import jsonl
from launch import common

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "fdpo checkpoint directory.")
HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory.")
INPUT = flags.DEFINE_string("input", None, "Input JSONL.", required=True)
OUTPUT = flags.DEFINE_string("output", None, "Output JSONL.", required=True)
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per compiled call.")
LENGTH_BUCKET = flags.DEFINE_integer(
    "length_bucket", 128, "Pad lengths up to a multiple of this (fewer recompilations).")
COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"],
                                  "Compute dtype; default: the checkpoint's.")
CHUNK = flags.DEFINE_integer("logprob_chunk", 256, "Positions per chunk of the log-softmax.")

flags.register_validator("length_bucket", lambda v: v >= 1, "--length_bucket must be >= 1")
flags.register_validator("batch_size", lambda v: v >= 1, "--batch_size must be >= 1")


class InputError(ValueError):
    pass


def parse_line(path, lineno, line, tokenizer_fn):
    where = f"{path}:{lineno}"
    rec = jsonl.parse_object(where, line, InputError)
    if "input_ids" in rec:
        ids = rec["input_ids"]
        if not (isinstance(ids, list) and all(isinstance(t, int) and t >= 0 for t in ids)):
            raise InputError(f"{where}: input_ids must be a list of non-negative ints")
    elif "text" in rec:
        if not isinstance(rec["text"], str):
            raise InputError(f"{where}: text must be a string")
        ids = tokenizer_fn(where)(rec["text"])
    else:
        raise InputError(f"{where}: needs 'input_ids' or 'text'")
    if not ids:
        raise InputError(f"{where}: empty sequence")
    labels = rec.get("segment_ids")
    if labels is not None:
        if not (isinstance(labels, list) and len(labels) == len(ids) and
                all(isinstance(s, int) and 0 <= s < 16 for s in labels)):
            raise InputError(f"{where}: segment_ids must be {len(ids)} ints in 0..15, one per "
                             f"token")
    return rec, ids, labels


def main(argv):
    del argv
    import numpy as np
    from tqdm import tqdm

    from fdpo import scoring
    from fdpo.models import checkpoint

    if (CHECKPOINT.value is None) == (HF_DIR.value is None):
        raise app.UsageError("give exactly one of --checkpoint and --hf_dir")
    in_path = pathlib.Path(INPUT.value)
    if not in_path.is_file():
        raise app.UsageError(f"--input={in_path}: no such file")
    mesh = common.init_jax()
    overrides = {"compute_dtype": COMPUTE_DTYPE.value} if COMPUTE_DTYPE.value else {}
    cfg, graphdef, state, tok_dir = checkpoint.load_checkpoint_or_hf(
        mesh, checkpoint=CHECKPOINT.value, hf_dir=HF_DIR.value, **overrides)
    scorer = scoring.Scorer(cfg, graphdef, state, mesh, chunk=CHUNK.value)

    tokenizer = None

    def tokenizer_fn(where):
        nonlocal tokenizer
        if tokenizer is None:
            common.quiet_tokenizers()
            from transformers import AutoTokenizer
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
            except Exception as e:  # transformers raises many types here
                raise InputError(f"{where}: has 'text' but no tokenizer could be loaded from "
                                 f"{tok_dir} ({e})") from e
        return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]

    # Parse everything first, so a malformed line fails before any compute.
    records = []
    with open(in_path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                records.append(parse_line(in_path, lineno, line, tokenizer_fn))
    logging.info("%s: %d sequences", in_path, len(records))

    bucket = LENGTH_BUCKET.value
    results = [None] * len(records)
    order = sorted(range(len(records)), key=lambda i: len(records[i][1]))
    with tqdm(total=len(records), desc="score", unit="seq") as bar:
        for start in range(0, len(order), BATCH_SIZE.value):
            idx = order[start:start + BATCH_SIZE.value]
            seqs = [records[i][1] for i in idx]
            has_labels = any(records[i][2] is not None for i in idx)
            labels = [records[i][2] or [0] * len(records[i][1]) for i in idx] \
                if has_labels else None
            pad_to = -(-max(len(s) for s in seqs) // bucket) * bucket
            res = scorer.score(seqs, labels, pad_to=pad_to)
            for j, i in enumerate(idx):
                rec = dict(records[i][0])
                rec["logp_sum"] = float(res.logp_sum[j])
                rec["num_tokens"] = int(res.num_tokens[j])
                if records[i][2] is not None:
                    present = sorted(set(records[i][2]))
                    rec["segment_logp_sums"] = {str(s): float(res.segment_sums[j, s])
                                                for s in present}
                    rec["segment_num_tokens"] = {str(s): int(res.segment_counts[j, s])
                                                 for s in present}
                results[i] = rec
            bar.update(len(idx))

    out_path = pathlib.Path(OUTPUT.value)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for rec in results:
            f.write(json.dumps(rec) + "\n")
    tmp.replace(out_path)
    total = np.sum([r["num_tokens"] for r in results])
    print(f"scored {len(results)} sequences ({total} tokens) -> {out_path}")


if __name__ == "__main__":
    try:
        app.run(main)
    except InputError as e:
        raise SystemExit(f"error: {e}")
