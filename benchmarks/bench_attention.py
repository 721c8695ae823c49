"""Benchmark: memory and time of the attention implementations on long rows.

    python -m benchmarks.bench_attention [--lengths 4096,8192] [--run_up_to 4096]

For each row length, attention (`ModelConfig.attention` "einsum", "dot_product", and
"dot_product" with `attention_block` = `--block` query blocks) and remat policy ("none",
"full"): XLA's buffer plan (`compiled.memory_analysis()`, compile-only)
of the forward + backward of one shared-prompt row: value-and-grad over all parameters of
the summed float32 log-probs of the row's response tokens
(`fdpo.train.shared_pair_segment_logps`, the train step's own pair function), at a
small-width Qwen2 shape (hidden 256, 4 layers, 8 heads of 32, 2 kv heads, MLP 768,
vocab 8192, float32). The row: prompt 1/4, chosen 3/8, rejected 3/8 of the length (the
branch masks are the real ones). Rows up to `--run_up_to` tokens are also run: median
wall time of `--repeats` calls after a warm-up, the two attentions timed alternately.

`temp` is XLA's temporary allocation (activations kept for the backward, scores,
workspace); `args` the parameters and the batch. The score tensor of one layer,
[heads, L, L] float32, is printed beside them for scale.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from fdpo import sharding, train  # noqa: E402
from fdpo.models import convert  # noqa: E402
from fdpo.models.config import ModelConfig  # noqa: E402
from fdpo.records import Segment  # noqa: E402
from fdpo.testing import random_params  # noqa: E402

GiB = 1024**3


def variants(block: int) -> dict[str, dict]:
    return {"einsum": dict(attention="einsum"), "dot_product": dict(attention="dot_product"),
            f"dot_product, block {block}": dict(attention="dot_product", attention_block=block)}


def bench_shape(args) -> ModelConfig:
    return ModelConfig(architecture="qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.mlp, num_layers=args.layers, num_heads=args.heads,
                       num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                       rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True)


def shared_row(length: int, vocab: int) -> dict:
    """One shared-prompt row [prompt | chosen | rejected], as `pack_shared_prompt` lays it."""
    p, c = length // 4, 3 * length // 8
    r = length - p - c
    rng = np.random.default_rng(0)
    labels = np.array([Segment.PROMPT] * p + [Segment.PREFIX] * (c // 2) +
                      [Segment.MID] * (c - c // 2) + [Segment.PREFIX] * (r // 2) +
                      [Segment.MID] * (r - r // 2), np.int32)
    branch = np.array([0] * p + [1] * c + [2] * r, np.int32)
    positions = np.concatenate([np.arange(p + c), np.arange(p, p + r)]).astype(np.int32)
    parents = np.maximum(np.arange(length) - 1, 0).astype(np.int32)
    parents[p + c] = p - 1
    row = {"ids": rng.integers(1, vocab, length).astype(np.int32), "positions": positions,
           "branch": branch, "labels": labels, "parents": parents}
    return {k: jnp.asarray(v)[None] for k, v in row.items()}


def step_fn(cfg: ModelConfig, chunk: int):
    graphdef = nnx.graphdef(convert.abstract_model(cfg))

    def loss(params, micro):
        return jnp.sum(train.shared_pair_segment_logps(graphdef, params, micro, chunk))

    return jax.jit(jax.value_and_grad(loss))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--run_up_to", type=int, default=4096,
                    help="also time rows up to this length (0: compile only)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--remat", default="none,full")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv_heads", type=int, default=2)
    ap.add_argument("--mlp", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--block", type=int, default=512, help="query block of the third variant")
    args = ap.parse_args()
    base = bench_shape(args)
    print(f"devices: {jax.devices()}; cpus: {os.cpu_count()}; load avg: {os.getloadavg()}")
    print(f"Qwen2 shape: hidden {base.hidden_size}, {base.num_layers} layers, {base.num_heads} "
          f"heads x {base.head_dim} ({base.num_kv_heads} kv), MLP {base.intermediate_size}, "
          f"vocab {base.vocab_size}, {base.num_params / 1e6:.1f}M params, float32; one "
          f"shared-prompt row; value-and-grad of the response log-probs")
    print("| row tokens | remat | attention | temp GiB | args GiB | one layer's scores GiB "
          "| fwd+bwd s |")
    print("|---|---|---|---|---|---|---|")
    with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
        params = random_params(base, 0, scale=0.02)
    for length in (int(x) for x in args.lengths.split(",")):
        micro = shared_row(length, base.vocab_size)
        scores = base.num_heads * length * length * 4 / GiB
        for remat in args.remat.split(","):
            compiled = {}
            for name, fields in variants(args.block).items():
                cfg = base.replace(remat_policy=remat, **fields)
                compiled[name] = step_fn(cfg, args.chunk).lower(params, micro).compile()
            times = {a: [] for a in compiled}
            if length <= args.run_up_to:
                for _ in range(args.repeats + 1):  # the first round warms up
                    for a, fn in compiled.items():
                        t = time.perf_counter()
                        jax.block_until_ready(fn(params, micro))
                        times[a].append(time.perf_counter() - t)
            for a, fn in compiled.items():
                mem = fn.memory_analysis()
                took = f"{statistics.median(times[a][1:]):.2f}" if times[a] else "-"
                print(f"| {length} | {remat} | {a} | {mem.temp_size_in_bytes / GiB:.2f} | "
                      f"{mem.argument_size_in_bytes / GiB:.2f} | {scores:.2f} | {took} |",
                      flush=True)


if __name__ == "__main__":
    main()
