"""Benchmark: the Focused-DPO train step, and log-prob memory (chunked vs full logits).

    python -m benchmarks.bench_train [--steps 5] [--compute_dtype float32] [--remat none]
    python -m benchmarks.bench_train --loop [--steps 50] [--hidden 512 --layers 8 ...]

1. Train step: a Qwen2-shaped model (hidden 512, 8 layers, 8 heads, 2 KV heads, head_dim 64,
   MLP 2816, vocab 32000, untied), 4 pairs of length 512 per step (8 sequences, 4,096
   tokens, all real), frozen reference in the step (or precomputed), AdamW, one device.
   Reports compile time, median step time, pairs/s, tokens/s, and model FLOP/s against the
   peak float32 `jnp.dot` rate measured in the same process (2048^3 matmuls). Model FLOPs
   per step = tokens x (3 forwards for the policy's forward and backward, + 1 for the frozen
   reference; `--reference precomputed` drops it); forward = 2 x matmul parameters (incl.
   the unembedding) + the attention score and value products over the full L x L (the
   model computes them unmasked).
2. Shared-prompt rows against separate chosen/rejected rows (`--shared`): a smaller model
   (hidden 256, 4 layers, vocab 8192), 4 pairs padded to 512 tokens the way built records
   are (prompt 192, responses 160 = prefix 96 + mid 32 + suffix 32, padding 160), frozen
   reference; both steps compiled in one process and timed alternately, losses compared.
3. The loop's overhead (`--loop`): `fdpo.train_loop.TrainRun` with the default config
   (shared-prompt rows, frozen reference, log every 10 steps, no validation split, one
   checkpoint at the end) on records of the step benchmark's shape, against the bare
   compiled step of the same trainer run back to back on one batch of those records. Loop
   time per step: the logged `step_time` (wall clock between log lines, the compiling first
   step excluded) weighted by the steps of each window; bare: wall clock of `--steps` steps
   dispatched back to back, then waited for, measured before and after the loop (the loop
   continues from the first measurement's state).
4. Memory: XLA's buffer assignment (`compiled.memory_analysis()`) for value-and-grad of
   summed log-probs with respect to the hidden states and the unembedding, at vocab
   152,064, 8 x 512 tokens, hidden 512: the full-logits path (`token_logprobs`) against the
   chunked path (`token_logprobs_from_hidden`). Compile-only: nothing that large is run.
5. Token-level DPO (`--tdpo`): the tdpo2 train step against the dpo step, both with the
   frozen reference in the step, shared-prompt rows, compiled in one process and timed
   alternately (`--steps` rounds after a warm-up), at the `--loop` model shape flags; and
   the memory of item 4 for the KL: value-and-grad of the summed per-position KL plus the
   policy's and reference's target log-probs with respect to the policy's hidden states and
   unembedding, chunked (`target_logprobs_and_kl`) against full logits of both models, at
   vocab 152,064, 8 x 512 tokens, hidden 512; and the whole train steps' temp memory at
   vocab 152,064, 4 pairs = 8 separate rows x 512 tokens, the `--loop` shape otherwise.
   Compile-only.
6. Log-probs only where the loss reads them (`--logprobs`): the focused_dpo train step
   (frozen reference) with `response_capacity` 0 (every position reaches the LM head) or
   the batch's largest response count, and `logprob_recompute` on or off, in both layouts
   (shared-prompt rows and separate rows), at the `--loop` model shape flags, on pairs of
   the shared spec's proportions (prompt 96, prefix 192, mids 24-64, suffix 64, padded to
   `--length`). Per variant: XLA temp memory and the median step time, all variants of a
   layout compiled in one process and timed alternately; the losses must agree.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fdpo import logprobs, records, sharding, train  # noqa: E402
from fdpo import loss as loss_lib  # noqa: E402
from fdpo.models.config import ModelConfig  # noqa: E402
from fdpo.testing import random_params, random_pairs, stack, write_dataset  # noqa: E402

GiB = 1024**3


def bench_shape(compute_dtype: str, remat: str) -> ModelConfig:
    return ModelConfig(architecture="qwen2", vocab_size=32000, hidden_size=512,
                       intermediate_size=2816, num_layers=8, num_heads=8, num_kv_heads=2,
                       head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                       tie_embeddings=False, compute_dtype=compute_dtype, remat_policy=remat)


def forward_flops_per_token(cfg: ModelConfig, length: int) -> float:
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    matmul_params = cfg.num_layers * (d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
                                      + 3 * d * f) + cfg.vocab_size * d
    attention = cfg.num_layers * 2 * 2 * length * cfg.num_heads * hd  # QK^T and PV
    return 2 * matmul_params + attention


def measured_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    dot = jax.jit(lambda x, y: x @ y)
    dot(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dot(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def timed_steps(trainer, state, batch, ref, steps: int) -> dict:
    """Compiles `trainer.train_step` for this batch, runs one warm-up step, then `steps`
    steps, each waited for -> compile_s, step_s (median), temp_GiB (XLA's temp buffers),
    loss and the final state. The one timing loop of a single step (device_check too)."""
    t = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch, ref).compile()
    compile_s = time.perf_counter() - t
    state, m = compiled(state, batch, ref)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, batch, ref)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return {"compile_s": compile_s, "step_s": statistics.median(times), "loss": float(m["loss"]),
            "temp_GiB": compiled.memory_analysis().temp_size_in_bytes / GiB, "state": state}


def alternate(trainers: dict, params, examples, ref, rounds: int) -> dict:
    """Several trainers' steps on the same pairs, each compiled once, then timed in turn
    for `rounds` rounds after a warm-up round (load changes hit every variant alike) ->
    {name: step_s (median), temp_GiB, loss (last step)}."""
    runs = {}
    for name, trainer in trainers.items():
        state = trainer.init_state(train.copy_params(params))
        batch = trainer.make_batch(examples, 1)
        step = trainer.train_step.lower(state, batch, ref).compile()
        runs[name] = {"state": state, "batch": batch, "step": step, "times": [],
                      "temp_GiB": step.memory_analysis().temp_size_in_bytes / GiB}
    for _ in range(rounds + 1):  # the first round warms up
        for r in runs.values():
            t = time.perf_counter()
            r["state"], m = r["step"](r["state"], r["batch"], ref)
            jax.block_until_ready(m)
            r["times"].append(time.perf_counter() - t)
            r["loss"] = float(m["loss"])
    return {name: {"step_s": statistics.median(r["times"][1:]), "temp_GiB": r["temp_GiB"],
                   "loss": r["loss"]} for name, r in runs.items()}


def args_shape(args, vocab: int | None = None) -> ModelConfig:
    """The Qwen2 shape of the --hidden/--layers/--mlp/--vocab flags."""
    return ModelConfig(architecture="qwen2", vocab_size=vocab or args.vocab,
                       hidden_size=args.hidden, intermediate_size=args.mlp,
                       num_layers=args.layers, num_heads=8, num_kv_heads=2,
                       head_dim=args.hidden // 8, rms_norm_eps=1e-6, rope_theta=1e6,
                       qkv_bias=True, tie_embeddings=False, compute_dtype=args.compute_dtype)


def bench_step(args) -> dict:
    cfg = bench_shape(args.compute_dtype, args.remat)
    pairs, length = args.pairs, args.length
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    loss_cfg = loss_lib.preset("focused_dpo", beta=0.1)
    tx, schedule = train.make_optimizer(train.OptimizerConfig(lr=1e-5, warmup_steps=0), 1000)
    trainer = train.Trainer(cfg, loss_cfg, tx, mesh, chunk=args.chunk, schedule=schedule,
                            reference=args.reference)
    params = random_params(cfg, 0, scale=0.02)
    ref = train.copy_params(params) if args.reference == "frozen" else None
    state = trainer.init_state(params)
    rng = np.random.default_rng(0)
    prompt, prefix, suffix = 128, 192, 96
    mid = length - prompt - prefix - suffix
    seg = np.array([1] * prompt + [2] * prefix + [3] * mid + [4] * suffix, np.int8)
    examples = {
        "chosen_ids": rng.integers(0, cfg.vocab_size, (pairs, length)).astype(np.int32),
        "rejected_ids": rng.integers(0, cfg.vocab_size, (pairs, length)).astype(np.int32),
        "chosen_segments": np.tile(seg, (pairs, 1)),
        "rejected_segments": np.tile(seg, (pairs, 1)),
        "ref_logps": np.zeros((pairs, 2, 5), np.float32),
    }
    r = timed_steps(trainer, state, trainer.make_batch(examples, 1), ref, args.steps)
    step = r["step_s"]
    tokens = 2 * pairs * length
    passes = 4 if args.reference == "frozen" else 3
    flops = passes * tokens * forward_flops_per_token(cfg, length)
    return {"params_M": cfg.num_params / 1e6, "compile_s": r["compile_s"], "step_s": step,
            "pairs_per_s": pairs / step, "tokens_per_s": tokens / step,
            "model_flops_per_s": flops / step, "loss": r["loss"]}


def bench_shared(steps: int) -> dict:
    cfg = ModelConfig(architecture="qwen2", vocab_size=8192, hidden_size=256,
                      intermediate_size=1024, num_layers=4, num_heads=4, num_kv_heads=2,
                      head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                      tie_embeddings=False)
    pairs, length = 4, 512
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    rng = np.random.default_rng(0)
    prompt, prefix, mid, suffix = 192, 96, 32, 32
    seg = np.array([1] * prompt + [2] * prefix + [3] * mid + [4] * suffix, np.int8)
    seg = np.pad(seg, (0, length - len(seg)))
    shared_ids = rng.integers(1, cfg.vocab_size, (pairs, length)).astype(np.int32)
    examples = {"chosen_ids": shared_ids * (seg > 0),
                "rejected_ids": np.where(seg == 3, rng.integers(1, cfg.vocab_size, shared_ids.shape),
                                         shared_ids).astype(np.int32) * (seg > 0),
                "chosen_segments": np.tile(seg, (pairs, 1)),
                "rejected_segments": np.tile(seg, (pairs, 1))}
    need = int(records.shared_row_lengths(examples["chosen_segments"],
                                        examples["rejected_segments"]).max())
    trunk = records.trunk_lengths(*(examples[k] for k in (
        "chosen_ids", "rejected_ids", "chosen_segments", "rejected_segments")))
    trunk_need = int(records.shared_row_lengths(examples["chosen_segments"],
                                                examples["rejected_segments"], trunk).max())
    params = random_params(cfg, 0, scale=0.02)
    layouts = {"separate rows": (0, True, 2 * length), "shared-prompt rows": (need, False, need),
               "trunk rows": (trunk_need, True, trunk_need)}
    trainers = {name: train.Trainer(cfg, loss_lib.preset("focused_dpo", beta=0.1),
                                    train.make_optimizer(train.OptimizerConfig(lr=1e-5),
                                                         1000)[0], mesh,
                                    shared_length=shared_length, trunk=trunk)
                for name, (shared_length, trunk, _) in layouts.items()}
    out = alternate(trainers, params, examples, params, steps)
    for name, (_, _, tokens) in layouts.items():
        out[name]["row_tokens"] = pairs * tokens
    return out


def bench_loop(args) -> dict:
    from configs import focused_dpo
    from fdpo import train_loop
    from fdpo.models import checkpoint

    shape = bench_shape(args.compute_dtype, args.remat).replace(
        hidden_size=args.hidden, num_layers=args.layers, intermediate_size=args.mlp,
        vocab_size=args.vocab, head_dim=args.hidden // 8)
    fields = {k: getattr(shape, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
        "num_kv_heads", "head_dim", "tie_embeddings", "rope_theta")}
    quarter = args.length // 4  # prompt, prefix, mid, suffix
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        checkpoint.init_random(tmp / "ckpt", fields=fields)
        pairs = random_pairs(8 * args.pairs, args.length, args.vocab, lengths=(
            (quarter, quarter), (quarter, quarter), (quarter - 8, quarter),
            (quarter - 8, quarter), (quarter, quarter)))
        write_dataset(tmp / "data", {"train": pairs})
        config = focused_dpo.get_config(f"model={tmp / 'ckpt'},data={tmp / 'data'}")
        config.model.compute_dtype, config.model.remat_policy = args.compute_dtype, args.remat
        config.train.num_steps, config.train.batch_size = args.steps + 1, args.pairs
        config.optimizer.warmup_steps = 0
        config.checkpoint.every_steps = 10**9  # one checkpoint, at the end
        config.log.every_steps, config.log.tensorboard = 10, True
        mesh = sharding.make_mesh((1, -1, 1))
        run = train_loop.TrainRun(config, tmp / "run", mesh, handle_sigterm=False)
        batch = run.trainer.make_batch(stack(pairs[:args.pairs]))

        def bare():
            state = run.trainer.train_step(run.state, batch, run.ref_params)[0]  # warm
            jax.block_until_ready(state)
            t = time.perf_counter()
            for _ in range(args.steps):
                state, m = run.trainer.train_step(state, batch, run.ref_params)
            jax.block_until_ready((state, m))
            run.state = state
            return (time.perf_counter() - t) / args.steps

        def loop():
            run.train()
            lines = [json.loads(x) for x in open(tmp / "run" / "metrics.jsonl")]
            steps = [0] + [r["step"] for r in lines]
            windows = [(r["step_time"], s - max(prev, 1)) for r, prev, s in
                       zip(lines, steps, steps[1:]) if "step_time" in r]
            return (sum(t * n for t, n in windows) / sum(n for _, n in windows),
                    lines[0].get("first_step_time"))

        # Bare steps before and after the loop: the machine's load moves between them.
        bare_s = [bare()]
        loop_s, first = loop()
        bare_s.append(bare())
    return {"params_M": shape.num_params / 1e6, "loop_s": loop_s, "bare_s": bare_s,
            "first_step_s": first, "overhead": loop_s / min(bare_s) - 1}


def logprob_memory(vocab: int = 152064, sequences: int = 8, length: int = 512,
                   hidden: int = 512) -> dict:
    h = jax.ShapeDtypeStruct((sequences, length, hidden), jnp.float32)
    w = jax.ShapeDtypeStruct((vocab, hidden), jnp.float32)
    ids = jax.ShapeDtypeStruct((sequences, length), jnp.int32)

    def naive(h, w, ids):
        return logprobs.token_logprobs(jnp.einsum("btd,vd->btv", h, w), ids).sum()

    def chunked(chunk):
        return lambda h, w, ids: logprobs.token_logprobs_from_hidden(h, w, ids, chunk).sum()

    out = {}
    for name, fn in (("full logits", naive), ("chunked 256", chunked(256)),
                     ("chunked 64", chunked(64))):
        grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        mem = grad.lower(h, w, ids).compile().memory_analysis()
        out[name] = {"temp_GiB": mem.temp_size_in_bytes / GiB,
                     "peak_GiB": (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                  + mem.output_size_in_bytes) / GiB}
    out["logits_tensor_GiB"] = sequences * length * vocab * 4 / GiB
    return out


def bench_tdpo(args) -> dict:
    cfg = args_shape(args)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    examples = stack(random_pairs(args.pairs, args.length, cfg.vocab_size, seed=0, lengths=(
        (128, 128), (192, 192), (32, 32), (32, 32), (96, 96))))
    examples.pop("ref_logps", None)
    need = int(records.shared_row_lengths(examples["chosen_segments"],
                                        examples["rejected_segments"]).max())
    params = random_params(cfg, 0, scale=0.02)
    trainers = {name: train.Trainer(cfg, loss_lib.preset(name, beta=0.1),
                                    train.make_optimizer(train.OptimizerConfig(lr=1e-5),
                                                         1000)[0], mesh, chunk=args.chunk,
                                    shared_length=need)
                for name in ("dpo", "tdpo2")}
    out = alternate(trainers, params, examples, train.copy_params(params), args.steps)
    out["params_M"] = cfg.num_params / 1e6
    return out


def step_memory(args, vocab: int = 152064) -> dict:
    """XLA temp memory of the compiled dpo and tdpo2 train steps (separate rows), not run."""
    cfg = args_shape(args, vocab)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    examples = stack(random_pairs(args.pairs, args.length, 1000, seed=0, lengths=(
        (128, 128), (192, 192), (32, 32), (32, 32), (96, 96))))
    examples.pop("ref_logps", None)
    out = {}
    for name in ("dpo", "tdpo2"):
        tx = train.make_optimizer(train.OptimizerConfig(lr=1e-5), 1000)[0]
        trainer = train.Trainer(cfg, loss_lib.preset(name, beta=0.1), tx, mesh,
                                chunk=args.chunk)
        state = jax.eval_shape(trainer._init_state, trainer.abstract_params)
        batch = trainer.make_batch(examples, 1)
        mem = trainer.train_step.lower(state, batch, trainer.abstract_params).compile() \
            .memory_analysis()
        out[name] = mem.temp_size_in_bytes / GiB
    return out


def kl_memory(vocab: int = 152064, sequences: int = 8, length: int = 512,
              hidden: int = 512) -> dict:
    h = jax.ShapeDtypeStruct((sequences, length, hidden), jnp.float32)
    w = jax.ShapeDtypeStruct((vocab, hidden), jnp.float32)
    ids = jax.ShapeDtypeStruct((sequences, length), jnp.int32)

    def naive(h, w, rh, rw, ids):
        logp = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", h, w), -1)
        ref_logp = jax.lax.stop_gradient(
            jax.nn.log_softmax(jnp.einsum("btd,vd->btv", rh, rw), -1))
        kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), -1)
        pick = lambda x: jnp.take_along_axis(x, ids[..., None], -1)[..., 0]  # noqa: E731
        return (kl + pick(logp) + pick(ref_logp)).sum()

    def chunked(chunk):
        return lambda h, w, rh, rw, ids: sum(
            x.sum() for x in logprobs.target_logprobs_and_kl(h, w, rh, rw, ids, chunk))

    def dpo_chunked(h, w, rh, rw, ids):  # the DPO step's share: both models' log-probs
        return (logprobs.target_logprobs(h, w, ids, 256).sum()
                + jax.lax.stop_gradient(logprobs.target_logprobs(rh, rw, ids, 256)).sum())

    out = {}
    for name, fn in (("full logits KL", naive), ("chunked 256 KL", chunked(256)),
                     ("chunked 256 DPO", dpo_chunked)):
        grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        mem = grad.lower(h, w, h, w, ids).compile().memory_analysis()
        out[name] = {"temp_GiB": mem.temp_size_in_bytes / GiB}
    return out


def bench_logprobs(args):
    """Yields (layout, row tokens, largest response count, {(capacity, recompute): result})
    per layout, as each finishes."""
    cfg = args_shape(args)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    examples = stack(random_pairs(args.pairs, args.length, cfg.vocab_size, seed=0, lengths=(
        (96, 96), (192, 192), (24, 64), (24, 64), (64, 64))))
    examples.pop("ref_logps", None)
    params = random_params(cfg, 0, scale=0.02)
    ref = train.copy_params(params)
    need = int(records.shared_row_lengths(examples["chosen_segments"],
                                          examples["rejected_segments"]).max())
    for layout, shared_length in (("shared-prompt rows", need), ("separate rows", 0)):
        if shared_length:
            labels = train.pack_shared_prompt(examples, shared_length)["labels"]
            responses = int((labels >= records.Segment.PREFIX).sum(-1).max())
        else:
            responses = int(max((examples[f"{s}_segments"] >= records.Segment.PREFIX)
                                .sum(-1).max() for s in ("chosen", "rejected")))
        trainers = {
            (capacity, recompute): train.Trainer(
                cfg, loss_lib.preset("focused_dpo", beta=0.1),
                train.make_optimizer(train.OptimizerConfig(lr=1e-5), 1000)[0], mesh,
                chunk=args.chunk, shared_length=shared_length, response_capacity=capacity,
                logprob_recompute=recompute)
            for capacity in (0, responses) for recompute in (True, False)}
        yield layout, shared_length or args.length, responses, alternate(
            trainers, params, examples, ref, args.steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--compute_dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    ap.add_argument("--reference", default="frozen", choices=["frozen", "precomputed"])
    ap.add_argument("--skip_step", action="store_true")
    ap.add_argument("--loop", action="store_true",
                    help="only the loop's time per step against the bare step (item 3)")
    ap.add_argument("--hidden", type=int, default=512, help="--loop model shape")
    ap.add_argument("--layers", type=int, default=8, help="--loop model shape")
    ap.add_argument("--mlp", type=int, default=2816, help="--loop model shape")
    ap.add_argument("--vocab", type=int, default=32000, help="--loop model shape")
    ap.add_argument("--shared", action="store_true",
                    help="only the shared-prompt rows vs separate rows comparison")
    ap.add_argument("--tdpo", action="store_true",
                    help="only the tdpo2 step against the dpo step, and the KL's memory")
    ap.add_argument("--logprobs", action="store_true",
                    help="only response_capacity x logprob_recompute, both layouts (item 6)")
    args = ap.parse_args()
    if args.logprobs:
        print(f"devices: {jax.devices()}; cpus: {os.cpu_count()}; load avg: {os.getloadavg()}")
        print(f"focused_dpo step, frozen reference, hidden {args.hidden}, {args.layers} "
              f"layers, vocab {args.vocab}, {args.pairs} pairs, {args.compute_dtype}, chunk "
              f"{args.chunk}, median of {args.steps} alternating rounds:")
        print("| layout | row tokens | response_capacity | logprob_recompute | temp GiB "
              "| step s | vs all positions + recompute | loss |")
        print("|---|---|---|---|---|---|---|---|", flush=True)
        for layout, row_tokens, responses, runs in bench_logprobs(args):
            base = runs[(0, True)]["step_s"]
            for (capacity, recompute), x in runs.items():
                print(f"| {layout} | {row_tokens} | {capacity or 'all'} | {recompute} "
                      f"| {x['temp_GiB']:.2f} | {x['step_s']:.3f} | {base / x['step_s']:.2f}x "
                      f"| {x['loss']:.6f} |", flush=True)
        print(f"load avg after: {os.getloadavg()}")
        return
    if args.tdpo:
        print(f"devices: {jax.devices()}; cpus: {os.cpu_count()}; load avg: {os.getloadavg()}")
        for name, m in kl_memory().items():
            print(f"  {name:16s} value+grad temp {m['temp_GiB']:6.2f} GiB (vocab 152064, "
                  f"8 x 512 tokens, hidden 512)")
        mem = step_memory(args)
        print(f"train step temp at vocab 152064, {args.pairs} pairs x {args.length} tokens, "
              f"separate rows: dpo {mem['dpo']:.2f} GiB, tdpo2 {mem['tdpo2']:.2f} GiB "
              f"({mem['tdpo2'] / mem['dpo']:.2f}x)")
        r = bench_tdpo(args)
        print(f"tdpo2 vs dpo step, frozen reference, shared-prompt rows, {r['params_M']:.1f}M "
              f"params, {args.pairs} pairs x {args.length} tokens, {args.compute_dtype}:")
        for name in ("dpo", "tdpo2"):
            print(f"  {name:6s} step {r[name]['step_s']:.3f} s (median of {args.steps}) "
                  f"temp {r[name]['temp_GiB']:.2f} GiB loss {r[name]['loss']:.5f}")
        print(f"  tdpo2 / dpo step time: {r['tdpo2']['step_s'] / r['dpo']['step_s']:.2f}x")
        return
    if args.shared:
        print(f"cpus: {os.cpu_count()}; load avg: {os.getloadavg()}")
        res = bench_shared(args.steps)
        base = res["separate rows"]["step_s"]
        print("| layout | tokens per step | step s (median) | speed-up | temp GiB | loss after |")
        print("|---|---|---|---|---|---|")
        for name, r in res.items():
            print(f"| {name} | {r['row_tokens']} | {r['step_s']:.3f} | {base / r['step_s']:.2f}x "
                  f"| {r['temp_GiB']:.2f} | {r['loss']:.6f} |")
        return
    print(f"devices: {jax.devices()}; cpus: {os.cpu_count()}; load avg: {os.getloadavg()}")
    if args.loop:
        r = bench_loop(args)
        print(f"loop vs bare step, {r['params_M']:.1f}M params, {args.pairs} pairs x "
              f"{args.length} tokens, {args.compute_dtype}, {args.steps} steps, log every 10:")
        print(f"  loop {r['loop_s'] * 1e3:.1f} ms/step; bare step "
              f"{', '.join(f'{b * 1e3:.1f}' for b in r['bare_s'])} ms/step (two measurements); "
              f"loop overhead {100 * r['overhead']:+.1f}% (first step, with compilation, "
              f"{r['first_step_s']:.1f} s)")
        return
    mem = logprob_memory()
    print(f"log-prob value+grad, vocab 152064, 8 x 512 tokens, hidden 512 "
          f"(one [8, 512, V] float32 logits tensor = {mem.pop('logits_tensor_GiB'):.2f} GiB):")
    for name, m in mem.items():
        print(f"  {name:12s} temp {m['temp_GiB']:6.2f} GiB   peak (temp+args+outputs) "
              f"{m['peak_GiB']:6.2f} GiB")
    if args.skip_step:
        return
    peak = measured_peak_flops()
    r = bench_step(args)
    print(f"peak jnp.dot float32 (2048^3): {peak / 1e9:.1f} GFLOP/s")
    print(f"train step, {r['params_M']:.1f}M params, {args.pairs} pairs x {args.length} tokens, "
          f"{args.compute_dtype}, remat {args.remat}, {args.reference} reference:")
    print(f"  compile {r['compile_s']:.1f} s; step {r['step_s']:.3f} s (median of {args.steps}); "
          f"{r['pairs_per_s']:.2f} pairs/s; {r['tokens_per_s']:.0f} tokens/s; "
          f"{r['model_flops_per_s'] / 1e9:.1f} model GFLOP/s = "
          f"{100 * r['model_flops_per_s'] / peak:.0f}% of the measured dot peak")


if __name__ == "__main__":
    main()
