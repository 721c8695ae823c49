"""Decode throughput of fdpo's sampler against transformers' `generate`, on CPU.

    python -m benchmarks.bench_sample [--batch 16] [--new_tokens 128] [--prompt_len 32]

Both generate exactly `new_tokens` tokens (no EOS) for `batch` prompts of `prompt_len`
tokens from the same tiny random model; tokens/s = batch x new_tokens / wall time of the
whole call (prefill included), median of `repeats` runs after one warm-up (fdpo's
compilation is reported apart). The two are timed alternately, run by run, so load from
other processes on a shared machine hits both alike; the load average is printed.
Greedy output is checked to be identical.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

MODELS = {
    # the tests' tiny model (tests/hf_models.py defaults)
    "tiny": dict(),
    # larger, still CPU-sized
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=768,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2),
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch_threads", type=int, default=2)
    ap.add_argument("--models", default="tiny,small")
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch

    from fdpo import sampling, sharding
    from fdpo.models import convert
    from fdpo.models.config import ModelConfig
    from fdpo.testing import make_hf_model

    torch.set_num_threads(args.torch_threads)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    b, n = args.batch, args.new_tokens
    print(f"batch {b}, prompt {args.prompt_len}, {n} new tokens, {jax.devices()[0].platform}, "
          f"{os.cpu_count()} cores, torch threads {args.torch_threads}, load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| model | mode | transformers tok/s | fdpo tok/s | speed-up | fdpo compile s |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            hf = make_hf_model(pathlib.Path(tmp), "qwen2", **MODELS[name])
            cfg = ModelConfig.from_hf_dir(tmp)
            graphdef, state = convert.load_hf_params(tmp, cfg, mesh)
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
                  f"{b * n / t_ours:,.0f} | {t_hf / t_ours:.1f}x | {compile_s:.1f} |",
                  flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
