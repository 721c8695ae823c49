"""Pipeline runs that differ in their warm start, side by side.

    replicates.write(["runs/toy", "runs/toy-init1"], pathlib.Path("runs/replicates"))

A pipeline run's seeds vary only the data order of preference training; every method starts
from the same warm start. On the miniature, float rounding alone moves the warm start enough
to change the verdict (docs/results/miniature.md), so a claim needs several warm starts. This
reads each workdir's `report/report.json` (written by :mod:`fdpo.report`) and writes
`replicates.md`, `replicates.json` and `replicates.png`: pass@1 per method and replicate
(the mean over that run's seeds), every method's difference to Focused-DPO per replicate,
and the Phi and continuation numbers of each warm start.

When the workdirs hold per-task evaluation results (`eval/MODEL/SPLIT/results.json`, written
by launch.evaluate), it also runs the study's statistics (:mod:`fdpo.stats`) on one split:
the paired per-task difference of `focus` minus `baseline` (primary) and of `focus` minus
every other method (secondary, Holm-corrected), hierarchically bootstrapped over the
workdirs (one warm start each) and their tasks. It writes `statistics.json` and `forest.png`
and a "Statistics" section in `replicates.md` that states the outcome whatever it is.
"""

from __future__ import annotations

import json
import pathlib
import statistics

from matplotlib import figure

from fdpo import report, stats

# Known evaluation names in table order (the miniature's lists family, then the decision
# family's); any other name (a real run's benchmarks) follows in sorted order.
KNOWN_SPLITS = ("held_out", "seen", "validation", "test")
# The split the statistics use by default: the first of these present in every workdir.
PRIMARY_SPLITS = ("test", "held_out")


class ReportError(ValueError):
    """A workdir without a readable report.json."""


def read_reports(workdirs: list[str]) -> dict[str, dict]:
    """{workdir: report.json}; a missing or unreadable report is an error naming it."""
    reports = {}
    for w in workdirs:
        path = pathlib.Path(w) / "report" / "report.json"
        if not path.is_file():
            raise ReportError(f"{path}: no report (run the pipeline there to the end)")
        try:
            reports[w] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}: not valid JSON ({e})") from e
    return reports


def splits_of(reports: dict[str, dict]) -> list[str]:
    """Evaluation names in any report: the known ones in KNOWN_SPLITS order, then the rest."""
    present = {e for r in reports.values() for m in r.get("summary", {}).values() for e in m}
    if not present:  # reports without results still get (empty) tables and a plot
        present = {"held_out"}
    return [e for e in KNOWN_SPLITS if e in present] + sorted(present - set(KNOWN_SPLITS))


def summarise(reports: dict[str, dict], focus: str) -> dict:
    methods = sorted({m for r in reports.values() for m in r.get("summary", {})})
    splits = splits_of(reports)
    table = {split: {m: [r.get("summary", {}).get(m, {}).get(split, {}).get("mean")
                         for r in reports.values()] for m in methods} for split in splits}
    diffs = {}
    if focus in methods:
        for split in splits:
            diffs[split] = {}
            for m in methods:
                if m == focus:
                    continue
                per = [None if a is None or b is None else a - b
                       for a, b in zip(table[split][focus], table[split][m])]
                known = [d for d in per if d is not None]
                diffs[split][m] = {
                    "per_replicate": per,
                    "mean": statistics.mean(known) if known else None,
                    "min": min(known) if known else None, "max": max(known) if known else None,
                    # "ahead" only when every replicate agrees on the sign.
                    "ahead_in_all": bool(known) and all(d > 0 for d in known),
                    "behind_in_all": bool(known) and all(d < 0 for d in known)}
    warm = []
    for r in reports.values():
        tables = r.get("phi", {}).get("tables", {})
        cont = r.get("continuation", {})
        warm.append({
            "phi_prefix": tables.get("common prefix", {}).get("phi"),
            "phi_prefix_chosen_mid": tables.get("prefix + chosen mid", {}).get("phi"),
            "continuation_chosen": cont.get("chosen", {}).get("pass@1"),
            "continuation_rejected": cont.get("rejected", {}).get("pass@1")})
    return {"workdirs": list(reports), "methods": methods, "focus": focus, "splits": splits,
            "pass_at_1": table, "differences": diffs, "warm_starts": warm}


def _f(x, digits=1, signed=False):
    if x is None:
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def render(s: dict) -> str:
    names = [pathlib.Path(w).name for w in s["workdirs"]]
    lines = [f"# {len(names)} replicates (warm starts): {', '.join(names)}", ""]
    for split in s["splits"]:
        lines += [f"## {split.replace('_', '-')} pass@1 (%), mean over each run's seeds", "",
                  "| method | " + " | ".join(names) + " | mean |",
                  "|---|" + "---|" * (len(names) + 1)]
        for m, vals in s["pass_at_1"][split].items():
            known = [v for v in vals if v is not None]
            lines.append(f"| {m} | " + " | ".join(_f(v) for v in vals) +
                         f" | {_f(statistics.mean(known) if known else None)} |")
        lines.append("")
    focus = s["focus"]
    for split, per_method in s["differences"].items():
        lines += [f"## {focus} minus each method, {split.replace('_', '-')} (points)", "",
                  "| method | " + " | ".join(names) + " | mean | verdict |",
                  "|---|" + "---|" * (len(names) + 2)]
        for m, d in per_method.items():
            verdict = ("ahead in every replicate" if d["ahead_in_all"] else
                       "behind in every replicate" if d["behind_in_all"] else "mixed or tied")
            lines.append(f"| {m} | " + " | ".join(_f(v, signed=True) for v in d["per_replicate"])
                         + f" | {_f(d['mean'], signed=True)} | {verdict} |")
        lines.append("")
    lines += ["## The warm starts", "",
              "| replicate | Phi common prefix | Phi prefix + chosen mid | continuation chosen "
              "/ rejected (%) |", "|---|---|---|---|"]
    for name, w in zip(names, s["warm_starts"]):
        lines.append(f"| {name} | {_f(w['phi_prefix'], 3)} | {_f(w['phi_prefix_chosen_mid'], 3)}"
                     f" | {_f(w['continuation_chosen'])} / {_f(w['continuation_rejected'])} |")
    return "\n".join(lines) + "\n"


def plot(s: dict, path: pathlib.Path) -> None:
    names = [pathlib.Path(w).name for w in s["workdirs"]]
    splits = s["splits"]
    fig = figure.Figure(figsize=(5 * len(splits), 4))
    axes = fig.subplots(1, len(splits), sharey=True, squeeze=False)[0]
    for ax, split in zip(axes, splits):
        for k, (m, vals) in enumerate(s["pass_at_1"][split].items()):
            xs = [i + 0.12 * (k - len(s["methods"]) / 2) for i in range(len(names))]
            ax.plot(xs, [v if v is not None else float("nan") for v in vals], "o-", label=m)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_title(f"{split.replace('_', '-')} pass@1 per warm start")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("greedy pass@1 (%)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def task_pass(results: pathlib.Path) -> dict[str, float]:
    """{task id: pass@1 in percent} from a launch.evaluate results.json: the task's correct
    samples over its samples (one sample under greedy decoding, so 0 or 100), on the plain
    benchmark's tests (`base_correct`, the number the report shows; LiveCodeBench's
    `correct`)."""
    try:
        rows = json.loads(results.read_text())["tasks"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ReportError(f"{results}: no per-task results ({type(e).__name__}: {e})") from e
    out = {}
    for k, row in enumerate(rows):
        good = row.get("base_correct", row.get("correct")) if isinstance(row, dict) else None
        if not isinstance(good, int) or not isinstance(row.get("n"), int) or row["n"] < 1 \
                or not isinstance(row.get("task_id"), str):
            raise ReportError(f"{results}: tasks[{k}] needs task_id, n >= 1 and base_correct")
        out[row["task_id"]] = 100.0 * good / row["n"]
    return out


def read_per_task(workdir: str, split: str) -> dict[str, dict[str, float]]:
    """{method: {task id: pass@1 %}} of one workdir's evaluation `split`, each method's
    value the mean over its seeds' runs. Seeds of one method must hold the same tasks (a task
    in one seed's results only is an error naming both files)."""
    by_method: dict[str, list[tuple[pathlib.Path, dict[str, float]]]] = {}
    for results in sorted(pathlib.Path(workdir).glob(f"eval/*/{split}/results.json")):
        method = report.method_of(results.parent.parent.name)
        by_method.setdefault(method, []).append((results, task_pass(results)))
    out = {}
    for method, runs in by_method.items():
        first, tasks = runs[0]
        for path, other in runs[1:]:
            extra = sorted(set(tasks) ^ set(other))
            if extra:
                raise ReportError(f"{first} and {path}: task {extra[0]!r} is evaluated in only "
                                  f"one of these seeds of {method}")
        out[method] = {t: statistics.fmean(r[t] for _, r in runs) for t in tasks}
    return out


def choose_split(workdirs: list[str], split: str | None) -> tuple[str | None, str]:
    """(split, why): the given one, else the first of PRIMARY_SPLITS evaluated in every
    workdir, else the only split all share; None with the reason when there is none."""
    have = [{p.parent.name for p in pathlib.Path(w).glob("eval/*/*/results.json")}
            for w in workdirs]
    common = set.intersection(*have) if have else set()
    if split is not None:
        lacking = [w for w, h in zip(workdirs, have) if split not in h]
        if lacking:
            return None, f"no per-task results for split {split!r} in {', '.join(lacking)}"
        return split, "given"
    for name in PRIMARY_SPLITS:
        if name in common:
            return name, "default"
    if len(common) == 1:
        return next(iter(common)), "the only split every workdir evaluated"
    if not common:
        return None, "no split has per-task results (eval/*/SPLIT/results.json) in every workdir"
    return None, f"several splits and none is {' or '.join(PRIMARY_SPLITS)}: choose one of " \
                 f"{sorted(common)} (--split)"


def run_statistics(workdirs: list[str], focus: str, baseline: str, split: str | None = None,
                   n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                   interval: str = "cluster_t") -> dict:
    """:func:`fdpo.stats.compare` on the per-task results of `split` in each workdir (one
    warm start each); {"split": None, "note": why} when no split was named and none can be
    chosen; a named split missing from a workdir is a ReportError."""
    chosen, why = choose_split(workdirs, split)
    if chosen is None and split is not None:
        raise ReportError(why)  # a split asked for by name must exist
    if chosen is None:
        return {"split": None, "note": why}
    per_task = {w: read_per_task(w, chosen) for w in workdirs}
    try:
        out = stats.compare(per_task, focus, baseline, n_boot=n_boot, seed=seed, level=level,
                            interval=interval)
    except stats.StatsError as e:
        raise ReportError(f"split {chosen!r}: {e}") from e
    out["split"] = chosen
    out["note"] = f"split {chosen!r} ({why})"
    if out["primary"] is None:
        missing = [m for m in (focus, baseline) if m in out["skipped"] or
                   all(m not in per_task[w] for w in workdirs)]
        out["note"] += (f"; no primary comparison: {focus} and {baseline} must differ"
                        if focus == baseline else
                        f"; no primary comparison: {', '.join(missing)} not evaluated in every "
                        "workdir")
    return out


def render_statistics(st: dict) -> str:
    # The interval's name (fdpo.stats.INTERVALS; cluster_t by default) heads the section.
    interval = st.get("interval") or "cluster_t"
    lines = [f"## Statistics: paired per-task differences, {interval} interval over warm "
             "starts and tasks", ""]
    if st["split"] is None:
        return "\n".join(lines + [f"No statistics: {st['note']}.", ""]) + "\n"
    names = [pathlib.Path(w).name for w in st["warm_starts"]]
    pct = f"{100 * st['level']:.0f}%"
    lines += [f"Greedy pass@1 on {_label(st['split'])}, in points: {st['focus']} minus each "
              f"method, task by task within each of the {len(names)} warm starts "
              f"({', '.join(names)}); {st['n_boot']} resamples of warm starts and then tasks "
              f"(seed {st['seed']}); {st['note']}.", ""]
    if len(names) < 3:
        lines += [f"Only {len(names)} warm start(s): the interval barely reflects how warm "
                  "starts vary (the protocol asks for at least 3).", ""]
    if st["primary"]:
        lines += [f"**Primary** ({st['focus']} vs {st['baseline']}): "
                  f"{st['primary']['outcome']}", ""]
    rows = ([("primary", st["primary"])] if st["primary"] else []) + \
        [("secondary", e) for e in st["secondary"]]
    if rows:
        lines += [f"| comparison | kind | difference | {pct} CI | p | Holm p | "
                  + " | ".join(names) + " | claim |", "|---|---|---|---|---|---|"
                  + "---|" * len(names) + "---|"]
        for kind, e in rows:
            holm_p = f"{e['p_holm']:.4f}" if "p_holm" in e else "-"
            lines.append(f"| {e['a']} - {e['b']} | {kind} | {e['estimate']:+.2f} | "
                         f"[{e['ci'][0]:+.2f}, {e['ci'][1]:+.2f}] | {e['p_value']:.4f} | {holm_p} | "
                         + " | ".join(f"{e['per_warm_start'][w]:+.2f}" for w in st["warm_starts"])
                         + f" | {'yes' if e['claim'] else 'no'} |")
        lines.append("")
        lines += [f"- {e['outcome']}" for _, e in rows[1:]]
        lines.append("")
    if st["skipped"]:
        lines += ["Not compared (not evaluated in every warm start): " + "; ".join(
            f"{m} (missing in {', '.join(pathlib.Path(w).name for w in ws)})"
            for m, ws in st["skipped"].items()) + ".", ""]
    lines += ["Claim rule: the primary comparison claims only when its CI excludes 0 and every "
              "warm start's mean difference has the same sign; a secondary one when its "
              f"Holm-adjusted p is below {1 - st['level']:.2f} and the sign holds likewise.", ""]
    return "\n".join(lines) + "\n"


def forest(st: dict, path: pathlib.Path) -> None:
    stats.forest_plot(stats.rows_of(st), path, f"difference in greedy pass@1 on "
                      f"{_label(st['split'])} (points, {100 * st['level']:.0f}% CI)",
                      f"{len(st['warm_starts'])} warm starts; filled = claim")


def _label(name: str) -> str:
    return name.replace("_", "-")


def write(workdirs: list[str], out: pathlib.Path, focus: str = "focused_dpo",
          baseline: str = "dpo", split: str | None = None, n_boot: int = 10000,
          seed: int = 0, level: float = 0.95, interval: str = "cluster_t") -> str:
    """Writes OUT/{replicates.md, replicates.json, replicates.png}, and with per-task results
    also OUT/{statistics.json, forest.png}; returns the markdown. Raises ReportError for a
    workdir without a readable report or with unusable per-task results."""
    summary = summarise(read_reports(workdirs), focus)
    st = run_statistics(workdirs, focus, baseline, split, n_boot, seed, level, interval)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replicates.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = render(summary) + "\n" + render_statistics(st)
    plot(summary, out / "replicates.png")
    images = "\n![replicates](replicates.png)\n"
    if st["split"] is not None:
        (out / "statistics.json").write_text(json.dumps(st, indent=2) + "\n")
        if st["primary"] or st["secondary"]:
            forest(st, out / "forest.png")
            images += "\n![forest](forest.png)\n"
    (out / "replicates.md").write_text(text + images)
    return text
