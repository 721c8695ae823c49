"""fdpo's DPO train step on the shared benchmark specification, beside TRL and Tunix.

    python -m benchmarks.bench_dpo [--rounds 2] [--variants separate,prompt,trunk,...]
        [--trl_python $VENV_TRL/bin/python] [--tunix_python $VENV_TUNIX/bin/python]
    python -m benchmarks.bench_dpo --data WORKDIR/pairs     # token counts of a built dataset

The specification (model, initial weights, 64 pairs, batch order, optimizer, timing rule,
contention record) is `../shared/bench/spec.py`, imported by path (`--spec_dir`): the
numbers are never copied here. Every variant and anchor runs in a process of its own (peak
RSS is a process's), one after another, alternating round by round, so every ratio in the
table comes from one window on one machine. Variants of fdpo's step:

    separate           chosen and rejected as two rows of 512 (like TRL and Tunix)
    prompt             one row per pair, the prompt once (`Trainer(trunk=False)`)
    trunk              one row per pair, prompt + common prefix once (the default layout)
    trunk_precomputed  trunk with the reference's log-prob sums computed once before the
                       loop (`reference="precomputed"`; their cost is reported apart)

A variant may carry options after slashes, e.g. `trunk/remat=full/micro=2`: `remat`
(`model.remat_policy`: none, full, dots), `micro` (`train.micro_batches`), `attention`
(`model.attention`: einsum, dot_product), `block` (`model.attention_block`), `chunk`
(`train.logprob_chunk`), `capacity` (`train.response_capacity`: -1 sized from the spec's
batches as a run sizes it from its data, with the trunk apart when the loss allows, 0 every
position, N) and `recompute` (`train.logprob_recompute`: 1 or 0); unset ones take
`configs/focused_dpo.py`'s defaults, so a bare variant measures what a run uses.

All but `trunk_precomputed` run the reference inside every step, as the anchors do. A run
times `--warmup` + `--timed` steps (the spec's 3 + 10 by default): each loop iteration
builds the host batch, runs the step and reads the loss back; the median interval between
step starts is s/step. The compiled step's XLA buffer sizes are recorded
(`memory_analysis`), with the RSS after imports, after loading both models and after
compiling, to say where the peak RSS goes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("separate", "prompt", "trunk", "trunk_precomputed")


def _flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(f"{value!r}: 0 or 1")
    return value == "1"


OPTIONS = {"remat": ("model", "remat_policy", str), "micro": ("train", "micro_batches", int),
           "attention": ("model", "attention", str), "block": ("model", "attention_block", int),
           "capacity": ("train", "response_capacity", int),
           "chunk": ("train", "logprob_chunk", int),
           "recompute": ("train", "logprob_recompute", _flag)}
ANCHORS = {"trl": "trl_dpo.py", "tunix": "tunix_dpo.py"}
MiB = 1024**2


def load_spec(spec_dir: str):
    path = pathlib.Path(spec_dir) / "spec.py"
    if not path.is_file():
        raise SystemExit(f"--spec_dir={spec_dir}: no spec.py there (the shared benchmark "
                         f"folder, ../shared/bench from the project root)")
    module_spec = importlib.util.spec_from_file_location("dpo_bench_spec", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def parse_variant(name: str) -> tuple[str, dict]:
    """"trunk/remat=full/micro=2" -> ("trunk", {"remat_policy": "full", "micro_batches": 2,
    ...}): every option of `OPTIONS`, unset ones at `configs/focused_dpo.py`'s defaults."""
    from configs import focused_dpo

    base, *parts = name.split("/")
    if base not in VARIANTS:
        raise SystemExit(f"--variants: unknown layout {base!r} in {name!r}; known {VARIANTS}")
    defaults = focused_dpo.get_config()
    out = {field: defaults[group][field] if field in defaults[group] else kind()
           for group, field, kind in OPTIONS.values()}
    for part in parts:
        key, _, value = part.partition("=")
        if key not in OPTIONS or not value:
            raise SystemExit(f"--variants: {part!r} in {name!r}; options are "
                             f"{sorted(OPTIONS)} as key=value")
        try:
            out[OPTIONS[key][1]] = OPTIONS[key][2](value)
        except ValueError as e:
            raise SystemExit(f"--variants: {part!r} in {name!r}: {e}") from None
    return base, out


def pair_examples(spec, pairs, b: int) -> dict:
    """Batch b of the spec as fdpo records: [prompt | prefix | mid | suffix | pad] rows of
    SEQ_LEN with their segment ids (the spec's prompts are full length, so no left pad)."""
    import numpy as np

    from fdpo.records import Segment

    idx = spec.batch_indices(b)
    out = {f"{s}_{k}": np.zeros((len(idx), spec.SEQ_LEN), dtype)
           for s in ("chosen", "rejected") for k, dtype in (("ids", np.int32),
                                                            ("segments", np.int8))}
    for row, i in enumerate(idx):
        prompt = pairs[i]["prompt"]
        for side in ("chosen", "rejected"):
            response = pairs[i][side]
            mid = len(response) - spec.PREFIX_LEN - spec.SUFFIX_LEN
            labels = np.repeat([Segment.PROMPT, Segment.PREFIX, Segment.MID, Segment.SUFFIX],
                               [len(prompt), spec.PREFIX_LEN, mid, spec.SUFFIX_LEN])
            tokens = np.concatenate([prompt, response])
            out[f"{side}_ids"][row, :len(tokens)] = tokens
            out[f"{side}_segments"][row, :len(tokens)] = labels
    return out


def row_tokens(examples_list, variant: str) -> dict:
    """Tokens per step the model runs on (real) and is given (padded rows), per layout."""
    import numpy as np

    from fdpo import records

    real, padded = [], []
    for ex in examples_list:
        c, r = ex["chosen_segments"], ex["rejected_segments"]
        if variant == "separate":
            real.append(int((c != 0).sum() + (r != 0).sum()))
            padded.append(2 * c.size)
            continue
        trunk = (records.trunk_lengths(ex["chosen_ids"], ex["rejected_ids"], c, r)
                 if variant != "prompt" else None)
        lengths = records.shared_row_lengths(c, r, trunk)
        real.append(int(lengths.sum()))
        padded.append(int(lengths.max()))  # per row; times rows below
    if variant == "separate":
        return {"real": np.mean(real), "padded": np.mean(padded)}
    width = max(padded)
    return {"real": np.mean(real), "padded": width * examples_list[0]["chosen_ids"].shape[0],
            "row_length": width}


def run_variant(args) -> None:
    """One variant in this process: prints one JSON line (the last line of stdout)."""
    spec = load_spec(args.spec_dir)
    rss = {"after_imports": None}
    import jax
    import numpy as np
    from flax import nnx

    from fdpo import loss as loss_lib
    from fdpo import reference as reference_lib
    from fdpo import data, sharding, train
    from fdpo.models import convert
    from fdpo.models.config import ModelConfig

    rss["after_imports"] = spec.peak_rss_mib()
    variant, options = parse_variant(args.run)
    rec = spec.base_record(f"fdpo-{args.run}")
    pairs = spec.make_pairs()
    steps = args.warmup + args.timed
    if spec.WARMUP_STEPS + spec.TIMED_STEPS < steps:
        raise SystemExit(f"{steps} steps need more than the spec's batches")
    examples = [pair_examples(spec, pairs, b) for b in range(steps)]

    hf_dir = spec_hf_dir(spec)
    cfg = ModelConfig.from_hf_dir(hf_dir, remat_policy=options["remat_policy"],
                                  attention=options["attention"],
                                  attention_block=options["attention_block"])
    micro = options["micro_batches"]
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    params = nnx.to_pure_dict(convert.load_hf_params(hf_dir, cfg, mesh)[1])
    ref = nnx.to_pure_dict(convert.load_hf_params(hf_dir, cfg, mesh)[1])
    rec["num_params"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    assert rec["num_params"] == spec.num_params(), rec["num_params"]
    rss["after_models"] = spec.peak_rss_mib()

    shared = variant != "separate"
    trunk = variant != "prompt"
    length = row_tokens(examples, variant).get("row_length", 0)
    loss_cfg = loss_lib.preset("dpo", beta=spec.BETA)  # every weight 1: sigmoid DPO
    capacity, trunk_capacity = options["response_capacity"], 0
    if capacity < 0:  # as train_loop sizes them from the data: here, the spec's batches
        parts = [data.batch_extents(ex, shared=shared, trunk=trunk) for ex in examples]
        most = data.RowExtents(*map(max, *parts))
        capacity, trunk_capacity = train.lm_head_capacities(
            most, length or spec.SEQ_LEN, shared and trunk, loss_cfg)
    mode = "precomputed" if variant == "trunk_precomputed" else "frozen"
    if mode == "precomputed":  # once per dataset, before training: not in the step time
        t = time.perf_counter()
        score = reference_lib.pair_scorer(cfg, ref, mesh, sharding.DEFAULT_RULES,
                                          options["logprob_chunk"], length)
        for ex in examples:
            ex["ref_logps"] = score(ex)
        rec["precompute_s_per_pair"] = (time.perf_counter() - t) / (
            len(examples) * spec.PAIRS_PER_STEP)
        ref = None
    opt = train.OptimizerConfig(lr=spec.LR, decay="constant", b1=spec.ADAM_B1,
                                b2=spec.ADAM_B2, eps=spec.ADAM_EPS,
                                weight_decay=spec.WEIGHT_DECAY, clip_norm=0)
    tx, schedule = train.make_optimizer(opt, 1000)
    trainer = train.Trainer(cfg, loss_cfg, tx, mesh, reference=mode,
                            chunk=options["logprob_chunk"],
                            schedule=schedule, shared_length=length if shared else 0,
                            trunk=trunk, response_capacity=capacity,
                            trunk_capacity=trunk_capacity,
                            logprob_recompute=options["logprob_recompute"])
    state = trainer.init_state(params)
    del params  # donated into the state by the first step
    t = time.perf_counter()
    step = trainer.train_step.lower(state, trainer.make_batch(examples[0], micro),
                                    ref).compile()
    rec["compile_s"] = round(time.perf_counter() - t, 2)
    mem = step.memory_analysis()
    rec["xla_mib"] = {k: round(getattr(mem, f"{k}_size_in_bytes") / MiB, 1)
                      for k in ("temp", "argument", "output", "alias")}
    rss["after_compile"] = spec.peak_rss_mib()

    starts, snaps, losses = [], [], []
    for b in range(steps):
        starts.append(time.perf_counter())
        snaps.append(spec.cpu_snapshot())
        state, metrics = step(state, trainer.make_batch(examples[b], micro), ref)
        losses.append(float(metrics["loss"]))
        print(f"{args.run} step {b}: loss {losses[-1]:.7f} "
              f"{time.perf_counter() - starts[-1]:.2f} s", file=sys.stderr, flush=True)
    starts.append(time.perf_counter())
    snaps.append(spec.cpu_snapshot())
    timed = list(range(args.warmup, steps))
    intervals = [starts[k + 1] - starts[k] for k in timed]
    median = statistics.median(intervals)
    tokens = row_tokens(examples[args.warmup:], variant)
    rec.update(variant=args.run, options=options, median_s_per_step=median,
               step_seconds=[round(x, 3) for x in intervals],
               pairs_per_s=spec.PAIRS_PER_STEP / median, warmup_steps=args.warmup,
               timed_steps=args.timed, row_length=length, response_capacity=capacity,
               trunk_capacity=trunk_capacity,
               reference=mode, tokens_real_per_step=tokens["real"],
               tokens_padded_per_step=tokens["padded"], step0_loss=losses[0],
               losses=[round(x, 7) for x in losses], peak_rss_mib=spec.peak_rss_mib(),
               rss_mib=rss, jax_devices=str(jax.devices()),
               xla_flags=os.environ.get("XLA_FLAGS", ""))
    rec.update(spec.contention(snaps, timed))
    spec.emit(rec)


def spec_hf_dir(spec) -> str:
    """The spec's initial weights beside a Qwen2 config.json written from `spec.MODEL`
    (fdpo reads the model's shape from the checkpoint's config)."""
    weights = pathlib.Path(spec.init_weights_dir()) / "model.safetensors"
    out = pathlib.Path(spec.CACHE_DIR) / f"fdpo_bench_dpo_{spec.spec_hash()}"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "model.safetensors").exists():
        (out / "model.safetensors").symlink_to(weights)
    m = spec.MODEL
    config = {k: m[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "rope_theta",
                                "rms_norm_eps", "tie_word_embeddings",
                                "max_position_embeddings")}
    config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
                  torch_dtype=m["dtype"], bos_token_id=spec.EOS_ID, eos_token_id=spec.EOS_ID)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def run_all(args) -> list[dict]:
    """Every variant and anchor once per round, alternating; results as they arrive."""
    jobs = [(v, [sys.executable, "-m", "benchmarks.bench_dpo", "--run", v, "--spec_dir",
                 args.spec_dir, "--warmup", str(args.warmup), "--timed", str(args.timed)], REPO)
            for v in args.variants.split(",")]
    for name, python in (("trl", args.trl_python), ("tunix", args.tunix_python)):
        if python:
            jobs.append((name, [python, ANCHORS[name]], args.spec_dir))
    logs = pathlib.Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    for r in range(args.rounds):
        for name, cmd, cwd in jobs:
            t = time.perf_counter()
            log = logs / f"{name.replace('/', '+')}.{r}.err"
            with open(log, "w") as err:
                proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=err,
                                      text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            res = last_json(proc.stdout) if proc.returncode == 0 else None
            if res is None:
                print(f"round {r} {name}: failed (exit {proc.returncode}); see {log}",
                      flush=True)
                continue
            res.update(name=name, round=r, wall_s=round(time.perf_counter() - t, 1))
            results.append(res)
            print(f"round {r} {name}: {res['median_s_per_step']:.2f} s/step, peak RSS "
                  f"{res['peak_rss_mib'] / 1024:.2f} GiB, step-0 loss "
                  f"{res.get('step0_loss')}, foreign load max "
                  f"{res.get('foreign_cores_busy_max')}", flush=True)
            with open(logs / "results.jsonl", "a") as f:
                f.write(json.dumps(res) + "\n")
    return results


def table(results: list[dict]) -> str:
    by = {}
    for r in results:
        by.setdefault(r["name"], []).append(r)
    med = {n: statistics.median(r["median_s_per_step"] for r in rs) for n, rs in by.items()}
    bases = [b for b in ("separate", "trl", "tunix") if b in med]
    cpu = {n: statistics.median(r["own_cpu_s_per_step_median"] for r in rs)
           for n, rs in by.items()}
    # With foreign load, the CPU seconds a step takes from this process compare layouts
    # better than wall time (the scheduler's share moves between runs).
    head = ("| implementation | runs | s/step | pairs/s | " +
            " | ".join(f"vs {b}" for b in bases) +
            " | own CPU s/step | " + " | ".join(f"CPU vs {b}" for b in bases) +
            " | tokens/step (real / given) | peak RSS GiB | RSS GiB after imports / models / "
            "compile | XLA temp MiB | step-0 loss | foreign cores |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for n, rs in by.items():
        r0 = rs[0]
        ratios = " | ".join(f"{med[b] / med[n]:.2f}x" for b in bases)
        ratios += f" | {cpu[n]:.1f} | " + " | ".join(f"{cpu[b] / cpu[n]:.2f}x" for b in bases)
        tokens = (f"{r0['tokens_real_per_step']:.0f} / {r0['tokens_padded_per_step']:.0f}"
                  if "tokens_real_per_step" in r0 else
                  f"{r0.get('nonpad_tokens_per_step', 0):.0f} / "
                  f"{r0.get('padded_tokens_per_step', 0):.0f}")
        temp = r0.get("xla_mib", {}).get("temp", "")
        stages = " / ".join(f"{r0['rss_mib'][k] / 1024:.2f}" for k in
                            ("after_imports", "after_models", "after_compile")
                            ) if "rss_mib" in r0 else ""
        lines.append(
            f"| {n} | {len(rs)} | {med[n]:.2f} | {4 / med[n]:.3f} | {ratios} | {tokens} "
            f"| {max(r['peak_rss_mib'] for r in rs) / 1024:.2f} | {stages} | {temp} "
            f"| {r0.get('step0_loss', float('nan')):.7f} "
            f"| {max(r.get('foreign_cores_busy_max', 0) for r in rs):.2f} |")
    return "\n".join(lines)


def data_tokens(data_dir: str) -> None:
    """Tokens the built dataset's pairs need per layout (the miniature's, or any)."""
    import numpy as np

    from fdpo import records

    manifest = pathlib.Path(data_dir) / "manifest.json"
    L = records.read_manifest(manifest)["max_len"]
    rows = {"separate (2 x L)": [], "separate, real tokens": [], "shared prompt": [],
            "trunk": []}
    for split in records.read_manifest(manifest)["splits"]:
        src = records.PairDataSource.from_manifest(manifest, split)
        if not len(src):
            continue
        recs = src.__getitems__(range(len(src)))
        ex = {k: np.stack([r[k] for r in recs]) for k in
              ("chosen_ids", "rejected_ids", "chosen_segments", "rejected_segments")}
        c, r = ex["chosen_segments"], ex["rejected_segments"]
        rows["separate (2 x L)"].append(np.full(len(c), 2 * L))
        rows["separate, real tokens"].append((c != 0).sum(-1) + (r != 0).sum(-1))
        rows["shared prompt"].append(records.shared_row_lengths(c, r))
        rows["trunk"].append(records.shared_row_lengths(c, r, records.trunk_lengths(**ex)))
    base = np.concatenate(rows["separate, real tokens"]).sum()
    print(f"{data_dir}: {len(np.concatenate(rows['trunk']))} pairs, L = {L}")
    print("| layout | tokens (all pairs) | longest row | vs separate real tokens |")
    print("|---|---|---|---|")
    for name, parts in rows.items():
        x = np.concatenate(parts)
        print(f"| {name} | {x.sum()} | {x.max()} | {x.sum() / base:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec_dir", default=str(REPO.parent / "shared" / "bench"))
    ap.add_argument("--variants", default="separate,prompt,trunk,trunk_precomputed")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timed", type=int, default=10)
    ap.add_argument("--trl_python", default=os.path.join(os.environ["VENV_TRL"], "bin",
                    "python") if os.environ.get("VENV_TRL") else "",
                    help="the TRL venv's python (default $VENV_TRL/bin/python); empty: skip")
    ap.add_argument("--tunix_python", default=os.path.join(os.environ["VENV_TUNIX"], "bin",
                    "python") if os.environ.get("VENV_TUNIX") else "",
                    help="the Tunix venv's python (default $VENV_TUNIX/bin/python)")
    ap.add_argument("--log_dir", default="/tmp/bench_dpo")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # one child run: a variant
    ap.add_argument("--data", help="only print a built dataset's tokens per layout")
    args = ap.parse_args()
    if args.run:
        return run_variant(args)
    if args.data:
        return data_tokens(args.data)
    for name in args.variants.split(","):
        parse_variant(name)  # a misspelt variant or option fails before any run
    print(f"cpus: {os.cpu_count()}; load avg before: {os.getloadavg()}", flush=True)
    results = run_all(args)
    print(f"load avg after: {os.getloadavg()}")
    print(table(results))


if __name__ == "__main__":
    main()
