"""The accelerator check: train step and sampler at Qwen2.5-Coder shapes, in one run.

    python -m benchmarks.device_check                 # on a lent GPU / TPU (< 10 minutes)
    python -m benchmarks.device_check --tiny          # the same code at toy shapes (CPU)

Runs, on one device, with random weights (no download; the numbers depend on shapes only):

1. The Focused-DPO train step (frozen reference in the step, AdamW, parameters float32,
   compute bfloat16) at the Qwen2.5-Coder-0.5B and 1.5B shapes: compile time, median step
   time, tokens/s, MFU and peak device memory. Model FLOPs per step as in
   benchmarks/bench_train.py (3 policy passes + 1 reference pass per token, the attention
   products over the full L x L); MFU against the device's dense bf16 peak where the
   device kind is known (`PEAK_BF16`), else against a bf16 matmul rate measured here
   (the column says which).
2. The sampler at the 0.5B shape: greedy, equal lengths (no EOS), the plain loop and the
   refill loop; tokens/s and compile time.

Prints a table and, when $OUT is set (the device machine's output folder), writes
$OUT/device_check.json. Each part runs in a `try`: an out-of-memory at one shape is
reported in its row and the rest still runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.bench_train import forward_flops_per_token, timed_steps  # noqa: E402
from fdpo import sampling, sharding, train  # noqa: E402
from fdpo import loss as loss_lib  # noqa: E402
from fdpo.models import convert  # noqa: E402
from fdpo.models.config import ModelConfig  # noqa: E402

# The published configs' shapes (Hugging Face config.json of Qwen/Qwen2.5-Coder-0.5B and
# -1.5B): both tie the embeddings and have q/k/v biases.
QWEN_SHAPES = {
    "qwen2.5-coder-0.5b": dict(hidden_size=896, intermediate_size=4864, num_layers=24,
                               num_heads=14, num_kv_heads=2),
    "qwen2.5-coder-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_layers=28,
                               num_heads=12, num_kv_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2),
}
# Dense bf16 peak FLOP/s by `device_kind` (vendor data sheets, without sparsity).
PEAK_BF16 = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
             "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
             "TPU v6 lite": 918e12}


def shape(name: str, vocab: int, remat: str) -> ModelConfig:
    return ModelConfig(architecture="qwen2", vocab_size=vocab, head_dim=64, rms_norm_eps=1e-6,
                       rope_theta=1e6, qkv_bias=True, tie_embeddings=True,
                       param_dtype="float32", compute_dtype="bfloat16", remat_policy=remat,
                       **QWEN_SHAPES[name])


def random_state(cfg: ModelConfig, mesh, seed: int = 0):
    """(graphdef, nnx state, pure params) drawn on the device (host numpy would take
    minutes at 1.5B): normal(0, 0.02), RMSNorm scales around 1."""
    graphdef, abstract = nnx.split(convert.abstract_model(cfg))
    pure = nnx.to_pure_dict(abstract)
    shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh, sharding.DEFAULT_RULES))
    leaves = jax.tree_util.tree_flatten_with_path(pure)[0]

    def init(key):
        out = []
        for i, (path, leaf) in enumerate(leaves):
            x = 0.02 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, jnp.float32)
            if str(getattr(path[-1], "key", "")) == "scale":
                x = 1.0 + x
            out.append(x.astype(leaf.dtype))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(pure), out)

    params = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))
    state = nnx.State(abstract)
    nnx.replace_by_pure_dict(state, params)
    return graphdef, state, params


def peak_flops(device) -> tuple[float, str]:
    kind = device.device_kind
    for name, value in PEAK_BF16.items():
        if kind == name or kind.startswith(name):
            return value, f"data sheet ({kind})"
    n = 1024 if device.platform == "cpu" else 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    dot = jax.jit(lambda x, y: x @ y)
    dot(a, a).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dot(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times), f"measured bf16 matmul ({kind})"


def peak_memory_gib(device) -> float | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None  # the CPU backend keeps no such statistics
    return stats["peak_bytes_in_use"] / 1024**3


def train_row(name: str, args, mesh, peak: float) -> dict:
    cfg = shape(name, args.vocab, args.remat)
    pairs, length = args.pairs, args.length
    loss_cfg = loss_lib.preset("focused_dpo", beta=0.1)
    tx, schedule = train.make_optimizer(train.OptimizerConfig(lr=1e-6, warmup_steps=0), 1000)
    trainer = train.Trainer(cfg, loss_cfg, tx, mesh, chunk=args.chunk, schedule=schedule,
                            reference="frozen")
    _, _, params = random_state(cfg, mesh)
    ref = train.copy_params(params)
    state = trainer.init_state(params)
    del params
    rng = np.random.default_rng(0)
    # The shared bench spec's proportions: prompt, common prefix, mid, common suffix.
    prompt, prefix, suffix = length * 3 // 16, length * 6 // 16, length * 2 // 16
    seg = np.array([1] * prompt + [2] * prefix + [3] * (length - prompt - prefix - suffix)
                   + [4] * suffix, np.int8)
    examples = {
        "chosen_ids": rng.integers(0, cfg.vocab_size, (pairs, length)).astype(np.int32),
        "rejected_ids": rng.integers(0, cfg.vocab_size, (pairs, length)).astype(np.int32),
        "chosen_segments": np.tile(seg, (pairs, 1)), "rejected_segments": np.tile(seg, (pairs, 1)),
        "ref_logps": np.zeros((pairs, 2, 5), np.float32)}
    r = timed_steps(trainer, state, trainer.make_batch(examples, 1), ref, args.steps)
    step = r["step_s"]
    tokens = 2 * pairs * length
    flops = 4 * tokens * forward_flops_per_token(cfg, length)
    return {"part": "train", "shape": name, "params_M": round(cfg.num_params / 1e6, 1),
            "pairs": pairs, "length": length, "remat": args.remat, "compile_s": r["compile_s"],
            "step_s": step, "tokens_per_s": tokens / step, "mfu": flops / step / peak,
            "loss": r["loss"], "peak_memory_gib": peak_memory_gib(jax.devices()[0])}


def sampler_rows(name: str, args, mesh) -> list[dict]:
    cfg = shape(name, args.vocab, "none")
    graphdef, state, _ = random_state(cfg, mesh)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (args.rows, args.prompt_len)).tolist()
    params = sampling.SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0,
                                     eos_ids=())
    out = []
    for refill in (False, True):
        sampler = sampling.Sampler(cfg, graphdef, state, mesh, length_bucket=args.prompt_len,
                                   refill=refill)
        t = time.perf_counter()
        first = sampler.generate(prompts, params)
        compile_s = time.perf_counter() - t
        times = []
        for _ in range(args.sample_repeats):
            t = time.perf_counter()
            again = sampler.generate(prompts, params)
            times.append(time.perf_counter() - t)
        assert [c.tokens for c in again] == [c.tokens for c in first], "greedy is not repeatable"
        run = statistics.median(times)
        out.append({"part": "sampler", "shape": name, "refill": refill, "rows": args.rows,
                    "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                    "first_call_s": compile_s, "run_s": run,
                    "tokens_per_s": args.rows * args.new_tokens / run,
                    "peak_memory_gib": peak_memory_gib(jax.devices()[0])})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy shapes and sizes (runs on CPU)")
    ap.add_argument("--shapes", default="qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    ap.add_argument("--sampler_shape", default="qwen2.5-coder-0.5b")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--remat", default="full", help="none | full | dots")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=256)
    ap.add_argument("--new_tokens", type=int, default=512)
    ap.add_argument("--sample_repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.tiny:
        args.shapes = args.sampler_shape = "tiny"
        args.vocab, args.pairs, args.length, args.steps = 512, 2, 64, 2
        args.rows, args.prompt_len, args.new_tokens, args.sample_repeats = 4, 8, 8, 1
    device = jax.devices()[0]
    mesh = sharding.make_mesh((1, 1, 1), [device])
    peak, peak_source = peak_flops(device)
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}; "
          f"MFU against {peak / 1e12:.1f} TFLOP/s, {peak_source}", flush=True)
    rows = []
    for name in args.shapes.split(","):
        try:
            rows.append(train_row(name, args, mesh, peak))
        except Exception as e:  # an OOM at one shape must not hide the others
            traceback.print_exc()
            rows.append({"part": "train", "shape": name, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    try:
        rows += sampler_rows(args.sampler_shape, args, mesh)
    except Exception as e:
        traceback.print_exc()
        rows.append({"part": "sampler", "shape": args.sampler_shape,
                     "error": f"{type(e).__name__}: {e}"[:300]})
    print("\n| part | shape | setting | compile s | time s | tokens/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['part']} | {r['shape']} | error: {r['error']} | | | | | |")
            continue
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        if r["part"] == "train":
            print(f"| train | {r['shape']} ({r['params_M']}M) | {r['pairs']} pairs x "
                  f"{r['length']}, remat {r['remat']} | {r['compile_s']:.1f} | "
                  f"{r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
                  f"{mem} |")
        else:
            print(f"| sampler{' refill' if r['refill'] else ''} | {r['shape']} | {r['rows']} "
                  f"rows, prompt {r['prompt_len']}, {r['new_tokens']} new | "
                  f"{r['first_call_s']:.1f} | {r['run_s']:.3f} | {r['tokens_per_s']:,.0f} "
                  f"| - | {mem} |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "device_check.json"), "w") as f:
            json.dump({"device": device.device_kind, "peak_flops": peak,
                       "peak_source": peak_source, "rows": rows}, f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
