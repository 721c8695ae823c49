"""Benchmark: what the mechanism metrics cost (fdpo/mechanism.py, docs/training.md).

    python -m benchmarks.bench_mechanism [--steps 5] [--hidden 256 --layers 4 --vocab 8192]

A Qwen2-shaped model (default hidden 256, 4 layers, 8 heads, 2 KV heads, MLP 1024, vocab
8192, untied, float32), 8 pairs per batch of prompt 128 + prefix 96 + mid 16/16 + suffix 32
tokens as shared-prompt rows (the default layout), frozen reference, one device. Times
(median of `--steps` calls, after a compiling call; each call waited for) of:
the train step (focused_dpo); the eval step without and with the mechanism metrics; and
the gradient-share step on the same batch. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from fdpo import sharding, train  # noqa: E402
from fdpo import loss as loss_lib  # noqa: E402
from fdpo.models.config import ModelConfig  # noqa: E402
from fdpo.records import shared_row_lengths  # noqa: E402
from fdpo.testing import random_pairs, random_params, stack  # noqa: E402


def timed(fn, steps):
    jax.block_until_ready(fn())  # compiles
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--pairs", type=int, default=8)
    args = p.parse_args()
    cfg = ModelConfig(architecture="qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=4 * args.hidden, num_layers=args.layers, num_heads=8,
                      num_kv_heads=2, head_dim=args.hidden // 8, rms_norm_eps=1e-6,
                      rope_theta=1e6, qkv_bias=True, tie_embeddings=False,
                      compute_dtype="float32")
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    examples = stack(random_pairs(args.pairs, 288, cfg.vocab_size, seed=0, lengths=(
        (128, 128), (96, 96), (16, 16), (16, 16), (32, 32))))
    examples.pop("ref_logps", None)
    length = int(shared_row_lengths(examples["chosen_segments"],
                                    examples["rejected_segments"]).max())
    loss_cfg = loss_lib.preset("focused_dpo")
    tx, _ = train.make_optimizer(train.OptimizerConfig(), 100)
    trainers = {m: train.Trainer(cfg, loss_cfg, tx, mesh, shared_length=length, mechanism=m)
                for m in (False, True)}
    params = random_params(cfg, seed=0)
    ref = random_params(cfg, seed=1)
    batch = trainers[True].make_batch(examples)
    out = {"device": jax.devices()[0].device_kind, "pairs": args.pairs, "row_tokens": length,
           "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab}
    state = trainers[False].init_state(train.copy_params(params))

    def step():
        nonlocal state
        state, m = trainers[False].train_step(state, batch, ref)
        return m

    out["train_step_s"] = timed(step, args.steps)
    for m, name in ((False, "eval_step_s"), (True, "eval_step_mechanism_s")):
        out[name] = timed(lambda: trainers[m].eval_step(params, batch, ref), args.steps)
    out["grad_share_s"] = timed(lambda: trainers[True].grad_share_step(params, batch, ref),
                                args.steps)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
