"""Decode throughput of fdpo's sampler against transformers' `generate`, on CPU.

    python -m benchmarks.bench_sample [--workload equal,spread] [--models tiny,small,spec]

Two workloads, each on the same tiny random model(s) in both libraries; tokens/s = response
tokens / wall time of the whole call (prefill included), median of `repeats` runs after one
warm-up (fdpo's compilation is reported apart). The contenders are timed alternately, run
by run, so load from other processes on a shared machine hits them alike; the load average
is printed.

equal: `batch` prompts of `prompt_len` tokens, exactly `new_tokens` new tokens each (no
    EOS); greedy output is checked identical to transformers'.

spread: `prompts` prompts (lengths drawn in 8..prompt_len) on `batch` rows, sampled at
    T=1.5 (the paper's setting), with response lengths drawn from a wide distribution:
    `--lengths loguniform` (default; log-uniform in [min_len, max_new_tokens], many short
    responses and a long tail, as sampling at T=1.5 gives: early EOS or a run to the limit)
    or `uniform`. Lengths are forced the same way in both libraries, by a logits hook
    (fdpo: `Sampler(logits_hook=...)`; transformers: a LogitsProcessor): before sample i's
    drawn length L_i the EOS logit is -inf, at step L_i every other logit is, so sample i
    is exactly L_i tokens and an EOS (or L_i = max_new_tokens tokens, cut by the limit).
    Contenders: transformers `generate` and fdpo without refill, each `batch` prompts at a
    time (a batch runs until its longest sample ends), and fdpo with refill (all prompts
    queued for `batch` rows). The refill and plain outputs are checked identical per
    prompt. "bound" is the speed-up refill would have if a step cost the same in both:
    sum over batches of the longest length x batch / sum of lengths; "queue" the speed-up
    with this queue's tail counted: the plain loop's steps over the steps refill takes if
    each row that frees takes the next prompt at once.
"""

from __future__ import annotations

import argparse
import heapq
import os
import pathlib
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODELS = {
    # the tests' tiny model (tests/hf_models.py defaults)
    "tiny": dict(),
    # larger, still CPU-sized
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=768,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2),
    # the train-step benchmark's model (../shared/bench/README.md: 55.3M parameters, vocab
    # 32k), closer in shape to a real model than the two above
    "spec": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                 num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                 tie_word_embeddings=False, initializer_range=0.02),
}


def timed_alternately(fns, repeats):
    """Median wall time of each function, timing them in turn `repeats` times."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def draw_lengths(rng, n, lo, hi, kind):
    if kind == "loguniform":
        return np.exp(rng.uniform(np.log(lo), np.log(hi + 1), n)).astype(int).clip(lo, hi)
    if kind == "uniform":
        return rng.integers(lo, hi + 1, n)
    raise ValueError(f"--lengths={kind}; expected loguniform or uniform")


def equal_workload(args, name, cfg, hf, graphdef, state, mesh):
    from fdpo import sampling
    b, n = args.batch, args.new_tokens
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (b, args.prompt_len))
    ids = torch.as_tensor(prompts)
    sampler = sampling.Sampler(cfg, graphdef, state, mesh, length_bucket=args.prompt_len)
    for mode, kw in (("greedy", dict(do_sample=False)),
                     ("T=1.5 top_p=0.95", dict(do_sample=True, temperature=1.5,
                                                top_p=0.95, top_k=0))):
        def run_hf():
            with torch.no_grad():
                return hf.generate(ids, attention_mask=torch.ones_like(ids),
                                   max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                   pad_token_id=0, **kw)

        params = sampling.SamplingParams(
            max_new_tokens=n, temperature=kw.get("temperature", 0.0) if kw["do_sample"]
            else 0.0, top_p=kw.get("top_p", 1.0), eos_ids=())
        t = time.perf_counter()
        ours = sampler.generate(prompts.tolist(), params)
        compile_s = time.perf_counter() - t
        if mode == "greedy":
            ref = run_hf()[:, args.prompt_len:].tolist()
            same = sum(c.tokens == r for c, r in zip(ours, ref))
            assert same == b, f"greedy differs from transformers on {b - same} rows"
        t_hf, t_ours = timed_alternately(
            [run_hf, lambda: sampler.generate(prompts.tolist(), params)], args.repeats)
        print(f"| {name} ({cfg.num_params / 1e6:.2f}M) | {mode} | {b * n / t_hf:,.0f} | "
              f"{b * n / t_ours:,.0f} | {t_hf / t_ours:.1f}x | {compile_s:.1f} |", flush=True)


def spread_workload(args, name, cfg, hf, graphdef, state, mesh):
    import jax.numpy as jnp
    from transformers import LogitsProcessor, LogitsProcessorList

    from fdpo import sampling
    b, n_new, n = args.batch, args.max_new_tokens, args.prompts
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, cfg.vocab_size, k).tolist()
               for k in rng.integers(8, args.prompt_len + 1, n)]
    lengths = draw_lengths(rng, n, args.min_len, n_new, args.lengths)
    eos = cfg.vocab_size - 1
    # The lengths are fixed in the compiled hook (a constant): one sampler per workload.
    target = jnp.asarray(lengths, jnp.int32)
    vocab_is_eos = jnp.arange(cfg.vocab_size) == eos

    def hook(logits, sample, step):
        end = (step >= target[jnp.minimum(sample, n - 1)])[:, None]
        return jnp.where(vocab_is_eos, jnp.where(end, 0.0, -jnp.inf),
                         jnp.where(end, -jnp.inf, logits))

    params = sampling.SamplingParams(max_new_tokens=n_new, temperature=1.5, eos_ids=(eos,))
    kw = dict(length_bucket=args.prompt_len, logits_hook=hook)
    plain = sampling.Sampler(cfg, graphdef, state, mesh, **kw)
    refill = sampling.Sampler(cfg, graphdef, state, mesh, refill=True, **kw)

    class PlantEos(LogitsProcessor):  # the hook, for transformers (rows = a batch's prompts)
        def __init__(self, first, prompt_len):
            self.lengths = torch.as_tensor(lengths[first:first + b])
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - self.prompt_len
            end = (step >= self.lengths[:scores.shape[0]])[:, None]
            is_eos = torch.arange(scores.shape[1]) == eos
            inf = torch.tensor(-float("inf"))
            return torch.where(is_eos, torch.where(end, 0.0, inf), torch.where(end, inf, scores))

    def run_hf():
        out = []
        for first in range(0, n, b):
            part = prompts[first:first + b]
            width = max(map(len, part))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in part])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part])
            with torch.no_grad():
                seq = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=1.5,
                                  top_k=0, top_p=1.0, max_new_tokens=n_new, eos_token_id=eos,
                                  pad_token_id=0,
                                  logits_processor=LogitsProcessorList([PlantEos(first, width)]))
            out += [row[width:].tolist() for row in seq]
        return out

    run_plain = lambda: plain.generate(prompts, params, seed=3, batch_rows=b)
    run_refill = lambda: refill.generate(prompts, params, seed=3, batch_rows=b)
    compile_s = []
    for fn in (run_plain, run_refill):
        t = time.perf_counter()
        got = fn()
        compile_s.append(time.perf_counter() - t)
        assert [len(c.tokens) for c in got] == lengths.tolist(), "lengths not as planted"
    a, r = run_plain(), run_refill()
    differ = sum(x.tokens != y.tokens for x, y in zip(a, r))
    assert differ == 0, f"refill differs from the plain loop on {differ} of {n} prompts"
    if args.transformers:
        hf_lengths = [next((i for i, t in enumerate(row) if t == eos), len(row))
                      for row in run_hf()]
        assert hf_lengths == lengths.tolist(), "transformers' lengths not as planted"
        t_hf, t_plain, t_refill = timed_alternately([run_hf, run_plain, run_refill],
                                                    args.repeats)
    else:
        t_hf = None
        t_plain, t_refill = timed_alternately([run_plain, run_refill], args.repeats)
    tokens = int(lengths.sum())
    bound = sum(lengths[i:i + b].max() * len(lengths[i:i + b]) for i in range(0, n, b)) / tokens
    # What refill can gain with this queue: the plain loop's steps over the steps refill
    # needs if each free row takes the next prompt at once (its tail: the last samples run
    # on few rows). `bound` above assumes every row is always busy.
    free = [0] * b
    for length in lengths:
        heapq.heappush(free, heapq.heappop(free) + int(length))
    queue_bound = sum(lengths[i:i + b].max() for i in range(0, n, b)) / max(free)
    hf_cols = (f"{tokens / t_hf:,.0f}", f"{t_hf / t_plain:.1f}x", f"{t_hf / t_refill:.1f}x") \
        if t_hf else ("-", "-", "-")
    print(f"| {name} ({cfg.num_params / 1e6:.2f}M) | {args.lengths} {args.min_len}-{n_new}, "
          f"mean {lengths.mean():.0f} | {hf_cols[0]} | {tokens / t_plain:,.0f} | "
          f"{tokens / t_refill:,.0f} | {t_plain / t_refill:.2f}x "
          f"(bound {bound:.2f}x, queue {queue_bound:.2f}x) | "
          f"{hf_cols[1]} | {hf_cols[2]} | {compile_s[0]:.0f} / {compile_s[1]:.0f} |",
          flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="equal,spread")
    ap.add_argument("--batch", type=int, default=16, help="rows")
    ap.add_argument("--new_tokens", type=int, default=128, help="equal: new tokens per row")
    ap.add_argument("--prompt_len", type=int, default=32, help="the prompt bucket")
    ap.add_argument("--prompts", type=int, default=64, help="spread: prompts")
    ap.add_argument("--max_new_tokens", type=int, default=768, help="spread: the limit")
    ap.add_argument("--min_len", type=int, default=20, help="spread: the shortest response")
    ap.add_argument("--lengths", default="loguniform", help="spread: loguniform or uniform")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch_threads", type=int, default=2)
    ap.add_argument("--models", default="tiny,small", help="of " + ",".join(MODELS))
    ap.add_argument("--no_transformers", dest="transformers", action="store_false",
                    help="spread: fdpo's plain and refill loops only (transformers' generate "
                         "on the spec model takes minutes a run on 2 cores)")
    args = ap.parse_args()

    import jax

    from fdpo import sharding
    from fdpo.models import convert
    from fdpo.models.config import ModelConfig
    from fdpo.testing import make_hf_model

    torch.set_num_threads(args.torch_threads)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    workloads = args.workload.split(",")
    models = {}
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            hf = make_hf_model(pathlib.Path(tmp), "qwen2", **MODELS[name])
            cfg = ModelConfig.from_hf_dir(tmp)
            models[name] = (cfg, hf, *convert.load_hf_params(tmp, cfg, mesh))
    print(f"{jax.devices()[0].platform}, {os.cpu_count()} cores, torch threads "
          f"{args.torch_threads}, load average {os.getloadavg()[0]:.1f}")
    if "equal" in workloads:
        print(f"\nequal: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new "
              f"tokens, median of {args.repeats}")
        print("| model | mode | transformers tok/s | fdpo tok/s | speed-up | fdpo compile s |")
        print("|---|---|---|---|---|---|")
        for name, (cfg, hf, graphdef, state) in models.items():
            equal_workload(args, name, cfg, hf, graphdef, state, mesh)
    if "spread" in workloads:
        print(f"\nspread: {args.prompts} prompts of 8-{args.prompt_len} tokens on "
              f"{args.batch} rows, T=1.5, median of {args.repeats}")
        print("| model | response lengths | transformers tok/s | fdpo plain tok/s | "
              "fdpo refill tok/s | refill / plain | plain / transformers | "
              "refill / transformers | compile s (plain / refill) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, (cfg, hf, graphdef, state) in models.items():
            spread_workload(args, name, cfg, hf, graphdef, state, mesh)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
