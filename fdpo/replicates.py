"""Pipeline runs that differ in their warm start, side by side.

    replicates.write(["runs/toy", "runs/toy-init1"], pathlib.Path("runs/replicates"))

A pipeline run's seeds vary only the data order of preference training; every method starts
from the same warm start. On the miniature, float rounding alone moves the warm start enough
to change the verdict (docs/results/miniature.md), so a claim needs several warm starts. This
reads each workdir's `report/report.json` (written by :mod:`fdpo.report`) and writes
`replicates.md`, `replicates.json` and `replicates.png`: pass@1 per method and replicate
(the mean over that run's seeds), every method's difference to Focused-DPO per replicate,
and the Phi and continuation numbers of each warm start.
"""

from __future__ import annotations

import json
import pathlib
import statistics

from matplotlib import figure

from fdpo import report


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


def splits(reports: dict[str, dict]) -> list[str]:
    """The evaluation names of the reports, the verdict's first (the miniature's held-out or
    test split; a report without its config: alphabetical)."""
    names: list[str] = []
    for r in reports.values():
        summary = r.get("summary", {})
        order = (list(reversed(report.evaluations(r, summary))) if "config" in r else
                 sorted({e for per in summary.values() for e in per}))
        names += [e for e in order if e not in names]
    return names


def summarise(reports: dict[str, dict], focus: str) -> dict:
    methods = sorted({m for r in reports.values() for m in r.get("summary", {})})
    names = splits(reports)
    table = {split: {m: [r.get("summary", {}).get(m, {}).get(split, {}).get("mean")
                         for r in reports.values()] for m in methods} for split in names}
    diffs = {}
    if focus in methods:
        for split in names:
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
    return {"workdirs": list(reports), "methods": methods, "focus": focus, "splits": names,
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
    fig = figure.Figure(figsize=(5 * len(s["splits"]), 4))
    axes = fig.subplots(1, len(s["splits"]), sharey=True, squeeze=False)[0]
    for ax, split in zip(axes, s["splits"]):
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


def write(workdirs: list[str], out: pathlib.Path, focus: str = "focused_dpo") -> str:
    """Writes OUT/{replicates.md, replicates.json, replicates.png}; returns the tables as
    markdown. Raises ReportError for a workdir without a readable report."""
    summary = summarise(read_reports(workdirs), focus)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replicates.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = render(summary)
    plot(summary, out / "replicates.png")
    (out / "replicates.md").write_text(text + "\n![replicates](replicates.png)\n")
    return text
