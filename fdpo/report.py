"""A pipeline run's report: markdown with plots, and the raw JSON it was drawn from.

    report.write(pathlib.Path("runs/toy"))     # what `python -m launch.report` does

Reads what the pipeline (:mod:`fdpo.pipeline`) left in a work directory (training metrics,
evaluation results, the Phi analysis, data counts, timings) and writes
WORKDIR/report/{report.md, report.json, *.png}. Every number in the report comes from those
files; the verdict sentences are computed from them, not written in advance.
"""

from __future__ import annotations

import json
import pathlib
import statistics

from matplotlib import figure

from fdpo import atomic, jsonl, problem
from fdpo.pipeline import TOY_EVAL_SPLITS


def method_of(run: str) -> str:
    return run.rsplit("-s", 1)[0]


def collect(w: pathlib.Path) -> dict:
    cfg = json.loads((w / "pipeline_config.json").read_text())
    data = {"config": cfg, "timings": {}, "curves": {}, "pass_at_1": {}, "counts": {}}
    if (w / "timings.json").exists():
        data["timings"] = json.loads((w / "timings.json").read_text())
    for metrics in sorted((w / "train").glob("*/metrics.jsonl")):
        rows = [r for r in jsonl.records(metrics) if r.get("split") == "train"]
        data["curves"][metrics.parent.name] = {
            k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            for k in ("loss", "rewards/margins", "rewards/accuracies", "rewards/margins_mid",
                      "rewards/margins_suffix")}
    for results in sorted((w / "eval").glob("*/*/results.json")):
        r = json.loads(results.read_text())
        model, split = results.parent.parent.name, results.parent.name
        # results.json holds fractions; the report speaks in percent.
        data["pass_at_1"].setdefault(model, {})[split] = 100 * r["pass_at_k"]["base"]["pass@1"]
    manifest = w / "pairs" / "manifest.json"
    if manifest.exists():
        data["counts"]["pairs_manifest"] = json.loads(manifest.read_text()).get("counts")
    if (w / "executed.jsonl").exists():
        codes = correct = problems = mixed = 0
        for r in jsonl.records(w / "executed.jsonl"):  # problem records (fdpo/problem.py)
            # Truly correct: passes every right test where the record names them (the
            # miniature's oracle), else every test. Samples without a program are not codes.
            good = r.get("tests_correct")
            rows = [r["passed"][i] for i in problem.usable(r)]
            truly = [all(p for p, ok in zip(row, good) if ok) if good else all(row)
                     for row in rows]
            problems += 1
            codes += len(truly)
            correct += sum(truly)
            mixed += 0 < sum(truly) < len(truly)
        data["counts"]["samples"] = {"problems": problems, "codes": codes,
                                     "truly_correct_codes": correct,
                                     "problems_with_correct_and_incorrect": mixed}
    data["mechanism"] = mechanism_curves(w)
    cont = w / "analysis" / "continuation.json"
    if cont.exists():
        data["continuation"] = json.loads(cont.read_text())
    phi = w / "analysis" / "phi.json"
    if phi.exists():
        data["phi"] = json.loads(phi.read_text())
    return data


def summarise(data: dict) -> dict:
    """Per method: mean and spread of pass@1 over seeds, per split."""
    by_method: dict[str, dict[str, list[float]]] = {}
    for model, splits in data["pass_at_1"].items():
        for split, value in splits.items():
            by_method.setdefault(method_of(model), {}).setdefault(split, []).append(value)
    out = {}
    for method, splits in by_method.items():
        out[method] = {split: {"mean": statistics.fmean(v), "min": min(v), "max": max(v),
                               "stdev": statistics.stdev(v) if len(v) > 1 else 0.0,
                               "n": len(v), "values": v}
                       for split, v in splits.items()}
    return out


def toy_splits(cfg: dict) -> tuple[str, ...]:
    """The miniature's evaluation splits for the run's task family (a config written before
    families existed is the list family)."""
    return TOY_EVAL_SPLITS[cfg.get("toy", {}).get("family", "lists")]


def evaluations(data: dict, summary: dict) -> list[str]:
    """The evaluation names in report order: the miniature's splits (seen and held-out, or
    validation and test), or a real run's benchmarks in config order."""
    present = {e for splits in summary.values() for e in splits}
    if data["config"].get("toy", {}).get("enabled"):
        order = list(toy_splits(data["config"]))
    else:
        order = [b[0] for b in data["config"].get("evaluate", {}).get("benchmarks", [])]
    return [e for e in order if e in present] + sorted(present - set(order))


def verdict_evaluations(data: dict, summary: dict) -> list[str]:
    """What the verdict is about: the miniature's last split (held-out or test tasks; the
    seen ones are the policy's own sampled prompts, validation picks settings), every
    benchmark in a real run."""
    names = evaluations(data, summary)
    if data["config"].get("toy", {}).get("enabled"):
        return [toy_splits(data["config"])[-1]]
    return names


def _label(name: str) -> str:
    return name.replace("_", "-")


def verdicts(summary: dict, on: list[str]) -> list[str]:
    """Plain sentences comparing Focused-DPO with each other method on each evaluation in
    `on` (pass@1)."""
    lines = []
    for split in on:
        fd = summary.get("focused_dpo", {}).get(split)
        if not fd:
            lines.append(f"Focused-DPO was not evaluated on {_label(split)}.")
            continue
        for other in sorted(summary):
            if other == "focused_dpo" or split not in summary[other]:
                continue
            o = summary[other][split]
            diff = fd["mean"] - o["mean"]
            # "Beat" only when the seed ranges do not overlap; otherwise within noise.
            if fd["min"] > o["max"]:
                word = "beat"
            elif fd["max"] < o["min"]:
                word = "lost to"
            else:
                word = "did not separate from"
            lines.append(f"Focused-DPO {word} {other} on {_label(split)} pass@1: "
                         f"{fd['mean']:.1f} vs {o['mean']:.1f} (difference {diff:+.1f} points; "
                         f"Focused-DPO seeds {fd['min']:.1f}-{fd['max']:.1f}, {other} "
                         f"{o['min']:.1f}-{o['max']:.1f}).")
    return lines


def plots(data: dict, summary: dict, out: pathlib.Path) -> list[str]:
    names = evaluations(data, summary)
    made = []
    for key, fname, title in (("loss", "loss.png", "training loss"),
                              ("rewards/margins", "margins.png", "reward margin (chosen - rejected)")):
        fig = figure.Figure(figsize=(7, 4))
        ax = fig.subplots()
        for run, curves in sorted(data["curves"].items()):
            if run == "warm_start" or not curves.get(key):
                continue
            steps, values = zip(*curves[key])
            ax.plot(steps, values, label=run, alpha=0.8)
        ax.set_xlabel("step")
        ax.set_title(title)
        if ax.lines:
            ax.legend(fontsize=7)
        else:  # e.g. supervised runs only: they log no reward margin
            ax.text(0.5, 0.5, f"no run logged {key}", ha="center", transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        made.append(fname)

    methods = sorted(summary)
    if methods:
        fig = figure.Figure(figsize=(7, 4))
        ax = fig.subplots()
        width = 0.76 / max(len(names), 1)
        for j, split in enumerate(names):
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(methods))]
            means = [summary[m].get(split, {}).get("mean", 0.0) for m in methods]
            lo = [means[i] - summary[m].get(split, {}).get("min", means[i])
                  for i, m in enumerate(methods)]
            hi = [summary[m].get(split, {}).get("max", means[i]) - means[i]
                  for i, m in enumerate(methods)]
            ax.bar(xs, means, width, yerr=[lo, hi], capsize=3, label=_label(split))
        ax.set_xticks(range(len(methods)), methods, rotation=20, fontsize=8)
        ax.set_ylabel("greedy pass@1 (%)")
        ax.set_title("pass@1, mean over seeds (bars: min-max)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "pass_at_1.png", dpi=110)
        made.append("pass_at_1.png")
    return made


def render(data: dict, summary: dict, images: list[str]) -> str:
    cfg = data["config"]
    lines = [f"# fdpo pipeline report: {cfg.get('name', '')}", ""]
    if cfg.get("toy", {}).get("enabled"):
        t, s = cfg["toy"], cfg["sample"]
        lines += [
            "The embedded miniature (configs/toy.py). Where it departs from the paper:",
            f"- tests come from an oracle (reference outputs on random inputs), "
            f"{t['corrupt_fraction']:.0%} of them with a corrupted expected value, not from the "
            "model (a tiny model's own asserts are almost never right);",
            f"- codes are sampled at temperature {s['temperature']} (the paper's 1.5 destroys a "
            "tiny model's samples);",
            f"- held-out tasks are unseen combinations of seen parts "
            f"({t['held_out_fraction']:.0%} of combinations)."
            if t.get("family", "lists") == "lists" else
            f"- the decision family: trap phrasings are written with the wrong operator in "
            f"{t['trap_rate']:.0%} of the warm start's data, the others in "
            f"{t['noise_rate']:.0%}; validation and test are unseen combinations.", ""]
    names = evaluations(data, summary)
    start = "warm start" if cfg.get("warm_start", {}).get("enabled") else "initial policy"
    lines += ["## Verdict", ""]
    lines += [f"- {v}" for v in verdicts(summary, verdict_evaluations(data, summary))] + [""]
    lines += ["## Greedy pass@1 (%)", "",
              "| method | seeds | " + " | ".join(f"{_label(e)} (mean, min-max)" for e in names)
              + " |", "|---|---|" + "---|" * len(names)]
    for m in sorted(summary):
        cells = []
        for split in names:
            v = summary[m].get(split)
            cells.append(f"{v['mean']:.1f} ({v['min']:.1f}-{v['max']:.1f})" if v else "-")
        n = max(v["n"] for v in summary[m].values())
        lines.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    lines.append("")
    if "phi" in data:
        lines += [f"## Where errors are (Phi table of the {start}'s samples)", ""]
        lines += ["| segment | in correct code | in incorrect code | Phi |", "|---|---|---|---|"]
        fmt = lambda v: "undefined" if v is None else f"{v:.3f}"
        for name, t in data["phi"]["tables"].items():
            lines.append(f"| {name} | {fmt(t['in_correct'])} | {fmt(t['in_incorrect'])} | "
                         f"{fmt(t['phi'])} |")
        tables = data["phi"]["tables"]
        prefix = tables.get("common prefix", {}).get("phi")
        mid = tables.get("prefix + chosen mid", {}).get("phi")
        if prefix is not None and mid is not None:
            where = "concentrate" if abs(mid) > abs(prefix) + 0.2 else "do not clearly concentrate"
            lines += ["", f"Errors {where} in the middle: Phi of the common prefix {prefix:.3f} "
                          f"vs prefix + chosen mid {mid:.3f} (paper: 0.068 vs 0.565)."]
        lines.append("")
    if "continuation" in data:
        c = data["continuation"]
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines += [f"## Continuation experiment ({start}, greedy)", "",
                  "| continue from | pass@1 (%) | programs |", "|---|---|---|",
                  f"| prompt + prefix + chosen mid | {fmt(c['chosen']['pass@1'])} | "
                  f"{c['chosen']['programs']} |",
                  f"| prompt + prefix + rejected mid | {fmt(c['rejected']['pass@1'])} | "
                  f"{c['rejected']['programs']} |", "",
                  "Paper (Qwen2.5-Coder-7B): 90.02 vs 3.17.", ""]
    if "samples" in data["counts"]:
        c = data["counts"]["samples"]
        judge = ("truly correct (checked against the uncorrupted tests)"
                 if cfg.get("toy", {}).get("enabled") else
                 "passing every test sampled for their prompt")
        lines += ["## Data", "",
                  f"{c['problems']} prompts, {c['codes']} sampled codes, "
                  f"{c['truly_correct_codes']} {judge}; "
                  f"{c['problems_with_correct_and_incorrect']} prompts had both kinds of "
                  f"samples.", ""]
    if data["counts"].get("pairs_manifest"):
        lines += ["Pair construction counts (launch.build manifest): "
                  f"`{json.dumps(data['counts']['pairs_manifest'])}`", ""]
    lines += mechanism_lines(data)
    for img in images:
        lines += [f"![{img}]({img})", ""]
    if data["timings"]:
        total = sum(data["timings"].values())
        lines += ["## Time per stage (s)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in data["timings"].items()]
        lines += [f"| total | {total:.0f} |", ""]
    return "\n".join(lines) + "\n"


def write(workdir: pathlib.Path) -> pathlib.Path:
    """Writes WORKDIR/report/{report.md, report.json, *.png}; returns report.md's path."""
    out = workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    data = collect(workdir)
    summary = summarise(data)
    images = plots(data, summary, out) + mechanism_plots(data, out)
    atomic.write_text(out / "report.json",
                      json.dumps({**data, "summary": summary}, indent=2) + "\n")
    atomic.write_text(out / "report.md", render(data, summary, images))
    return out / "report.md"


# ----------------------------------------------------------------------------------------
# Mechanism metrics (fdpo/mechanism.py): validation lines of each training run
# ----------------------------------------------------------------------------------------

# One figure per family: (file, title, [(metric, label)]). The segment changes are the
# unweighted policy - reference log-prob sums of validation pairs (docs/training.md).
MECHANISM_FIGURES = (
    ("mech_dlogp.png", "log-prob change from the reference, per pair (nats)",
     [("mech/dlogp/chosen_mid", "chosen mid"), ("mech/dlogp/rejected_mid", "rejected mid"),
      ("mech/dlogp/chosen_suffix", "chosen suffix"),
      ("mech/dlogp/rejected_suffix", "rejected suffix"),
      ("mech/dlogp/chosen_prefix", "chosen prefix"),
      ("mech/dlogp/chosen", "whole chosen response")]),
    ("mech_dlogp_per_token.png", "log-prob change from the reference, per token (nats)",
     [("mech/dlogp_per_token/chosen_mid", "chosen mid"),
      ("mech/dlogp_per_token/rejected_mid", "rejected mid"),
      ("mech/dlogp_per_token/chosen_suffix", "chosen suffix"),
      ("mech/dlogp_per_token/rejected_suffix", "rejected suffix"),
      ("mech/dlogp_per_token/chosen_prefix", "chosen prefix"),
      ("mech/dlogp_per_token/chosen", "whole chosen response")]),
    ("mech_first_margin.png", "logit margin at the first divergent token (chosen - rejected)",
     [("mech/first_margin/policy", "policy"), ("mech/first_margin/reference", "reference"),
      ("mech/first_margin/change", "policy - reference")]),
    ("mech_kl.png", "KL(reference || policy), summed over tokens, per pair",
     [("mech/kl/chosen", "chosen response"), ("mech/kl/chosen_mid", "chosen mid"),
      ("mech/kl/rejected", "rejected response"), ("mech/kl/rejected_mid", "rejected mid")]),
    ("mech_grad.png", "gradient through mid tokens (one validation batch)",
     [("mech/grad/share_mid", "||g_mid|| / (||g_mid|| + ||g_other||)"),
      ("mech/grad/cos_mid_other", "cos(g_mid, g_other)")]),
)


# The values a table shows per run (the study's report too), as (metric, label).
MECHANISM_COLUMNS = (
    ("mech/dlogp/chosen_mid", "chosen mid"), ("mech/dlogp/rejected_mid", "rejected mid"),
    ("mech/dlogp/chosen_suffix", "chosen suffix"),
    ("mech/dlogp/rejected_suffix", "rejected suffix"),
    ("mech/dlogp/chosen", "chosen (whole)"), ("mech/first_margin/change", "first margin change"),
    ("mech/kl/chosen", "KL chosen"), ("mech/grad/share_mid", "grad share mid"))


def last_mechanism(metrics: pathlib.Path) -> dict[str, float]:
    """The `mech/...` values of the last validation line of a run's metrics.jsonl that has
    any ({} when none does or the file is missing)."""
    last: dict[str, float] = {}
    if not metrics.exists():
        return last
    for r in jsonl.records(metrics):
        if r.get("split") != "validation":
            continue
        values = {k: v for k, v in r.items()
                  if k.startswith("mech/") and isinstance(v, (int, float))}
        if values:
            last = values
    return last


def mechanism_curves(w: pathlib.Path) -> dict:
    """{run: {metric: [(step, value), ...]}} of the `mech/...` values in the validation
    lines of WORKDIR/train/*/metrics.jsonl, in file order (a line is an event: the file is
    read as lines, never as a dict keyed by step)."""
    out = {}
    for metrics in sorted((w / "train").glob("*/metrics.jsonl")):
        curves: dict[str, list] = {}
        for r in jsonl.records(metrics):
            if r.get("split") != "validation":
                continue
            for k, v in r.items():
                if k.startswith("mech/") and isinstance(v, (int, float)):
                    curves.setdefault(k, []).append((r["step"], v))
        if curves:
            out[metrics.parent.name] = curves
    return out


def mechanism_plots(data: dict, out: pathlib.Path) -> list[str]:
    """One figure per metric family, a panel per metric, a line per run (arm)."""
    runs = data.get("mechanism", {})
    made = []
    for fname, title, metrics in MECHANISM_FIGURES:
        present = [(k, label) for k, label in metrics
                   if any(curves.get(k) for curves in runs.values())]
        if not present:
            continue
        cols = min(3, len(present))
        rows = -(-len(present) // cols)
        fig = figure.Figure(figsize=(4.2 * cols, 3.2 * rows))
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, (key, label) in zip(axes, present):
            for run, curves in sorted(runs.items()):
                if curves.get(key):
                    steps, values = zip(*curves[key])
                    ax.plot(steps, values, marker=".", label=run, alpha=0.8)
            ax.axhline(0.0, color="grey", lw=0.5)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        for ax in axes[len(present):]:
            ax.set_visible(False)
        axes[0].legend(fontsize=6)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        made.append(fname)
    return made


def mechanism_lines(data: dict) -> list[str]:
    """A markdown table of each run's last mechanism values."""
    runs = data.get("mechanism", {})
    if not runs:
        return []
    cols = MECHANISM_COLUMNS
    last = lambda c, k: f"{c[k][-1][1]:.3g}" if c.get(k) else "-"  # noqa: E731
    lines = ["## Mechanism metrics (validation pairs, last validation step)", "",
             "Log-prob changes from the reference in nats per pair (negative: the policy "
             "lost probability there); docs/training.md defines each.", "",
             "| run | step | " + " | ".join(label for _, label in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for run, c in sorted(runs.items()):
        step = max(s for curve in c.values() for s, _ in curve)
        lines.append(f"| {run} | {step} | " + " | ".join(last(c, k) for k, _ in cols) + " |")
    return lines + [""]
