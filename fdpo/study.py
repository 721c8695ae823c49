"""The pre-registered study (configs/study.py, issue 19): warm starts, per-arm lr tuning,
every arm on every warm start, the paired comparison, a report.

    python -m launch.study --config=configs/study.py --workdir=runs/study
    Study(cfg, workdir).all()   # the same, in Python

Stages, in order, each with a marker in WORKDIR/stages (a rerun skips finished stages and
resumes the others: finished training runs and evaluations inside a stage are kept):

    protocol     WORKDIR/protocol.json: the config and its digest, before any result
                 exists; a directory pre-registered with another digest is refused
    ws{k}        warm start k: the pipeline (fdpo.pipeline) up to its reference stage in
                 WORKDIR/ws{k}, with the warm start's init and data seeds; with
                 `premise_gate`, a warm start whose start model fails the premise on the
                 gate's split is moved to WORKDIR/rejected/ and replaced by the next spare
                 seeds (WORKDIR/warm_starts.json records both), before any arm trains
    variants{k}  the data variants the arms need besides the pairs (launch.build options
                 emit=rft, focus=random|oracle, shuffle_labels), with their reference sums
    tuning       each arm's lr (and NLL weight, where it has several) on warm start
                 `tuning.warm_start`'s tuning split; the choices frozen in tuning.json
                 (a protocol with `tuning.frozen_lrs` trains nothing here: its lrs are
                 written to tuning.json as they stand)
    runs         every arm on every warm start at its frozen lr, and every start model,
                 evaluated on the test split
    phi          on the warm starts `phi_warm_starts`: each arm samples the preference
                 prompts as the warm start's policy did, the samples are executed, and the
                 Phi table (launch.analyze) of every arm and of the start model is written
                 to ws{k}/phi/NAME/analysis
    report       report.md / report.json: the outcome, tuning, per-arm test pass@1, tokens
                 processed, each arm's mechanism values at the end of training (and
                 mechanism.png), the machine and the stage times

Training runs and evaluations are the pipeline's own (`Pipeline._train`, `Pipeline.evaluate`):
the study is a `Pipeline` per warm start whose evaluated models and splits it chooses.
Warm start k's tuning runs, test runs and evaluations all live in its workdir:
`tuning/ARM/lrLR-nllN/`, `runs/ARM/` and `eval/{tuning,runs}/.../SPLIT/results.json`. On the
tuning warm start an arm's test run is its tuning run at the chosen setting (the same
command), evaluated on the test split.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import time

import ml_collections

from matplotlib import figure

from fdpo import atomic, fingerprint, jsonl, pipeline, stats
from fdpo import report as run_report

DATA_VARIANTS = ("pairs", "rft", "random_focus", "oracle_focus", "shuffled")
# The loss presets an arm may name; everything else about the loss is its weight table.
ARM_PRESETS = {"dpo": "sigmoid", "sft": "none", "tdpo1": "tdpo1", "tdpo2": "tdpo2"}
# launch.build options of each data variant beyond the pipeline's own build settings
# (docs/data.md); the seed is the warm start's data seed.
VARIANT_BUILD = {"rft": lambda seed: ["--config.emit=rft"],
                 "random_focus": lambda seed: ["--config.focus=random",
                                               f"--config.focus_seed={seed}"],
                 "oracle_focus": lambda seed: ["--config.focus=oracle"],
                 "shuffled": lambda seed: ["--config.shuffle_labels=True",
                                           f"--config.focus_seed={seed}"]}
# Fields that change only speed or device layout: not part of the protocol's digest.
# The Phi re-run on the arms' samples describes and decides nothing (it runs after the test
# runs), so adding it to a finished study keeps its digest.
UNTRACKED_FIELDS = (*(f"pipeline.{f}" for f in pipeline.UNTRACKED_FIELDS), "phi_warm_starts")


class ProtocolChanged(ValueError):
    """The study directory was pre-registered with another protocol."""


# --------------------------------------------------------------------------- arm names
@dataclasses.dataclass(frozen=True)
class ArmKey:
    """What an arm is: loss type, weight table (2 x 3: chosen, rejected x prefix, mid,
    suffix), NLL weight ("tuned" when tuned with the lr), data variant."""
    loss: str
    table: tuple[tuple[float, ...], tuple[float, ...]]
    nll: float | str
    data: str = "pairs"


_DPO = ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
_ZERO = ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
# The published methods, with their exact published tables: the only arms not named by
# their table.
PUBLISHED = {
    "dpo": ArmKey("sigmoid", _DPO, 0.0),
    "focused_dpo": ArmKey("sigmoid", ((1.0, 2.0, 1.0), (1.0, 1.0, 0.0)), 0.0),
    "rpo": ArmKey("sigmoid", _DPO, "tuned"),
    "tdpo1": ArmKey("tdpo1", _DPO, 0.0),
    "tdpo2": ArmKey("tdpo2", _DPO, 0.0),
    "continued_sft": ArmKey("none", _ZERO, 1.0),
    "rft": ArmKey("none", _ZERO, 1.0, "rft"),
}
_LOSS_PREFIX = {"sigmoid": "", "none": "sft-", "tdpo1": "tdpo1-", "tdpo2": "tdpo2-"}


def _num(x: float) -> str:
    """A weight as a name part: 0.5 -> 0p5, -1 -> m1 (no dots or dashes)."""
    text = f"{float(x):.6f}".rstrip("0").rstrip(".")
    return text.replace(".", "p").replace("-", "m")


def _unnum(s: str) -> float:
    return float(s.replace("p", ".").replace("m", "-"))


def arm_name(key: ArmKey) -> str:
    """The one name of an arm: a published method's name for its exact published table,
    else the table's: `w{w}-rs{rs}-nll{n}` for chosen (1, w, 1) and rejected (1, 1, rs),
    `c{p}_{m}_{s}-r{p}_{m}_{s}-nll{n}` for any other; `sft-`/`tdpo1-`/`tdpo2-` before it
    for those losses, `@VARIANT` after it for data other than the pairs."""
    for name, k in PUBLISHED.items():
        if k == key:
            return name
    (cp, cm, cs), (rp, rm, rs) = key.table
    if (cp, cs, rp, rm) == (1, 1, 1, 1):
        table = f"w{_num(cm)}-rs{_num(rs)}"
    else:
        table = "c{}_{}_{}-r{}_{}_{}".format(*map(_num, (cp, cm, cs, rp, rm, rs)))
    nll = "tuned" if key.nll == "tuned" else _num(key.nll)
    data = "" if key.data == "pairs" else f"@{key.data}"
    return f"{_LOSS_PREFIX[key.loss]}{table}-nll{nll}{data}"


_NUM = r"m?\d+(?:p\d+)?"
_NAME = re.compile(
    rf"^(?P<loss>sft-|tdpo1-|tdpo2-)?(?:w(?P<w>{_NUM})-rs(?P<rs>{_NUM})"
    rf"|c(?P<c>{_NUM}_{_NUM}_{_NUM})-r(?P<r>{_NUM}_{_NUM}_{_NUM}))"
    rf"-nll(?P<nll>tuned|{_NUM})(?:@(?P<data>\w+))?$")


def arm_key(name: str) -> ArmKey:
    """The inverse of `arm_name`. Raises ValueError for a name that is not one (a
    published table under its table name is not: it has its published name)."""
    if name in PUBLISHED:
        return PUBLISHED[name]
    m = _NAME.match(name)
    if not m:
        raise ValueError(f"arm name {name!r}: expected a published method "
                         f"({', '.join(PUBLISHED)}) or a weight-table name such as "
                         "'w2-rs1-nll0', 'c0_1_0-r0_1_0-nll0', 'w2-rs0-nll0@random_focus'")
    if m["w"] is not None:
        table = ((1.0, _unnum(m["w"]), 1.0), (1.0, 1.0, _unnum(m["rs"])))
    else:
        table = (tuple(map(_unnum, m["c"].split("_"))), tuple(map(_unnum, m["r"].split("_"))))
    loss = {"sft-": "none", "tdpo1-": "tdpo1", "tdpo2-": "tdpo2", None: "sigmoid"}[m["loss"]]
    data = m["data"] or "pairs"
    if data not in DATA_VARIANTS or data == "pairs" and m["data"]:
        raise ValueError(f"arm name {name!r}: data variant {data!r}: expected one of "
                         f"{DATA_VARIANTS[1:]} after '@' (none for the pairs)")
    key = ArmKey(loss, table, "tuned" if m["nll"] == "tuned" else _unnum(m["nll"]), data)
    if arm_name(key) != name:
        raise ValueError(f"arm name {name!r}: this table is {arm_name(key)!r}")
    return key


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    preset: str
    weights: tuple[tuple[float, ...], tuple[float, ...]]
    nll_weights: tuple[float, ...]
    data: str
    lr_center: float

    @property
    def key(self) -> ArmKey:
        nll = "tuned" if len(self.nll_weights) > 1 else self.nll_weights[0]
        return ArmKey(ARM_PRESETS[self.preset], self.weights, nll, self.data)


def arms_of(cfg) -> list[Arm]:
    """The config's arms, each checked against the name its table gives. Raises
    ValueError naming the arm."""
    out = []
    for name, a in cfg.arms.items():
        where = f"config.arms[{name!r}]"
        if a.preset not in ARM_PRESETS:
            raise ValueError(f"{where}.preset={a.preset!r}: expected one of {tuple(ARM_PRESETS)}")
        if a.data not in DATA_VARIANTS:
            raise ValueError(f"{where}.data={a.data!r}: expected one of {DATA_VARIANTS}")
        try:
            weights = tuple(tuple(float(w) for w in row) for row in a.weights)
        except (TypeError, ValueError):
            weights = ()
        if len(weights) != 2 or any(len(row) != 3 for row in weights):
            raise ValueError(f"{where}.weights={a.weights!r}: expected ((chosen prefix, mid, "
                             "suffix), (rejected prefix, mid, suffix))")
        nll = tuple(float(n) for n in a.nll_weights)
        if not nll or any(not n >= 0 for n in nll) or len(set(nll)) != len(nll):
            raise ValueError(f"{where}.nll_weights={a.nll_weights!r}: expected distinct "
                             "values >= 0 (one, or several tuned with the lr)")
        if not a.lr_center > 0:
            raise ValueError(f"{where}.lr_center={a.lr_center!r}: expected > 0")
        arm = Arm(name, a.preset, weights, nll, a.data, float(a.lr_center))
        if arm_name(arm.key) != name:
            raise ValueError(f"{where}: its table, NLL weight and data are named "
                             f"{arm_name(arm.key)!r} (arms are named by their weight table)")
        out.append(arm)
    return out


# --------------------------------------------------------------------------- the lr rule
def lr_grid(center: float, points: int, factor: float) -> list[float]:
    """`points` learning rates `factor` apart, centred (geometrically) on `center`, each
    rounded to 3 significant digits (the value in tuning.json and on the command line)."""
    return [_round(center * factor ** (i - (points - 1) / 2)) for i in range(points)]


def _round(lr: float) -> float:
    return float(f"{lr:.3g}")


def best_lr(scores: dict[float, float]) -> float:
    """The lr with the best score; ties: the lower median of the tied learning rates (an
    interior choice when a flat stretch of the grid scores the same)."""
    top = max(scores.values())
    tied = sorted(lr for lr, s in scores.items() if s == top)
    return tied[(len(tied) - 1) // 2]


def next_lr(scores: dict[float, float], factor: float, extensions: int,
            max_extensions: int) -> tuple[float | None, str]:
    """The grid rule: (the lr to add, why) when the best lr sits at an edge of the grid
    and fewer than `max_extensions` points were added, else (None, why the grid stops)."""
    grid = sorted(scores)
    best = best_lr(scores)
    if len(grid) > 1 and grid[0] < best < grid[-1]:
        return None, "best inside the grid"
    if len(grid) == 1:
        side = "below" if extensions % 2 == 0 else "above"  # a one-point grid widens both ways
    else:
        side = "below" if best == grid[0] else "above"
    if extensions >= max_extensions:
        return None, f"best at the {'lower' if side == 'below' else 'upper'} edge after " \
                     f"{extensions} extension(s) (the cap)"
    new = _round(grid[0] / factor) if side == "below" else _round(grid[-1] * factor)
    return new, f"best at the {'lower' if side == 'below' else 'upper'} edge: extended {side}"


# --------------------------------------------------------------------------- the protocol
def protocol_fields(cfg) -> dict:
    """The config as the protocol's digest reads it (speed and layout fields left out)."""
    out = json.loads(cfg.to_json())
    for dotted in UNTRACKED_FIELDS:
        *path, key = dotted.split(".")
        node = out
        for p in path:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(key, None)
    return out


def protocol_digest(cfg) -> str:
    return fingerprint.digest(protocol_fields(cfg))


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def frozen_lrs(cfg) -> dict[str, float] | None:
    """The lrs the protocol fixes in advance (`tuning.frozen_lrs`, a confirmatory run), by
    arm; None when the study tunes them."""
    frozen = cfg.tuning.get("frozen_lrs")
    return None if frozen is None else {k: float(v) for k, v in frozen.items()}


def check_config(cfg) -> None:
    """Every protocol value, before any directory is touched. Raises ValueError naming the
    field."""
    arms = {a.name: a for a in arms_of(cfg)}
    frozen = frozen_lrs(cfg)
    if frozen is not None:
        if set(frozen) != set(arms):
            raise ValueError(f"config.tuning.frozen_lrs: arms {sorted(frozen)}, expected one lr "
                             f"for each arm of config.arms {sorted(arms)}")
        for name, lr in frozen.items():
            if not lr > 0:
                raise ValueError(f"config.tuning.frozen_lrs.{name}={lr}: expected > 0")
            if len(arms[name].nll_weights) != 1:
                raise ValueError(f"config.tuning.frozen_lrs: arm {name!r} has NLL weights "
                                 f"{arms[name].nll_weights}; a frozen arm needs exactly one")
    max_ties = cfg.stats.get("max_ceiling_ties")
    if max_ties is not None and (isinstance(max_ties, bool) or not isinstance(max_ties, int)
                                 or not 0 <= max_ties < len(cfg.warm_starts)):
        raise ValueError(f"config.stats.max_ceiling_ties={max_ties!r}: expected an int from 0 "
                         f"to {len(cfg.warm_starts) - 1} (fewer than the warm starts)")
    keys = [a.key for a in arms.values()]
    if len(set(keys)) != len(keys):
        raise ValueError("config.arms: two arms with the same table, NLL and data")
    ws = [tuple(w) for w in cfg.warm_starts]
    if not ws or any(len(w) != 2 for w in ws):
        raise ValueError(f"config.warm_starts={cfg.warm_starts!r}: expected "
                         "((init seed, data seed), ...)")
    if len({w[0] for w in ws}) != len(ws) or len({w[1] for w in ws}) != len(ws):
        raise ValueError(f"config.warm_starts={cfg.warm_starts!r}: every warm start needs its "
                         "own init seed and its own data seed")
    gate = cfg.get("premise_gate")
    if gate is not None:
        spares = [tuple(w) for w in gate.spares]
        seeds = ws + spares
        if (len({w[0] for w in seeds}) != len(seeds) or len({w[1] for w in seeds}) != len(seeds)
                or any(len(w) != 2 for w in spares)):
            raise ValueError(f"config.premise_gate.spares={gate.spares!r}: expected ((init "
                             "seed, data seed), ...), every seed unused by config.warm_starts "
                             "and the other spares")
        if cfg.family != "decision":
            raise ValueError(f"config.premise_gate: the premise needs trap tasks, which the "
                             f"{cfg.family!r} family has not (family 'decision' has)")
    bad = [k for k in cfg.get("phi_warm_starts", ()) if not 0 <= k < len(ws)]
    if bad:
        raise ValueError(f"config.phi_warm_starts={tuple(cfg.phi_warm_starts)}: {bad[0]} is "
                         f"not an index into config.warm_starts (0..{len(ws) - 1})")
    t = cfg.tuning
    if not 0 <= t.warm_start < len(ws):
        raise ValueError(f"config.tuning.warm_start={t.warm_start}: expected an index into "
                         f"config.warm_starts (0..{len(ws) - 1})")
    if t.points < 1 or t.max_extensions < 0 or not t.factor > 1:
        raise ValueError(f"config.tuning: points={t.points} (>= 1), max_extensions="
                         f"{t.max_extensions} (>= 0), factor={t.factor} (> 1)")
    if cfg.train.steps < 1 or cfg.train.batch_size < 1:
        raise ValueError(f"config.train: steps={cfg.train.steps}, batch_size="
                         f"{cfg.train.batch_size}: expected >= 1 (equal for every arm)")
    for field, (a, b) in [("primary", (cfg.primary.arm, cfg.primary.baseline)),
                          *(("secondary", tuple(p)) for p in cfg.secondary)]:
        missing = [x for x in (a, b) if x not in arms]
        if missing or a == b:
            raise ValueError(f"config.{field}: ({a}, {b}): "
                             + (f"no arm {missing[0]!r}; the arms are {list(arms)}"
                                if missing else "an arm against itself"))
    s = cfg.stats
    if s.interval not in stats.INTERVALS:
        raise ValueError(f"config.stats.interval={s.interval!r}: expected one of "
                         f"{', '.join(stats.INTERVALS)}")
    if s.interval == "cluster_t" and len(ws) < 2:
        raise ValueError("config.stats.interval='cluster_t' needs at least 2 warm starts (it "
                         f"estimates their spread), config.warm_starts has {len(ws)}")
    if s.n_boot < 1 or not 0 < s.level < 1:
        raise ValueError(f"config.stats: n_boot={s.n_boot} (>= 1), level={s.level} "
                         "(strictly between 0 and 1)")
    if not cfg.pipeline.toy.enabled or not cfg.pipeline.warm_start.enabled:
        raise ValueError("config.pipeline: the study needs the miniature (toy.enabled) and "
                         "its warm start (warm_start.enabled)")
    pipeline.check_inputs(cfg.pipeline)


def warm_start_config(cfg, k: int, seeds: tuple[int, int] | None = None
                      ) -> ml_collections.ConfigDict:
    """Warm start k's pipeline config: the protocol's pipeline with its seeds (`seeds`, else
    config.warm_starts[k]), the task family, and the study's batch size (the pairs stage
    needs a batch) and beta."""
    c = copy.deepcopy(cfg.pipeline)
    c.unlock()
    init_seed, data_seed = seeds if seeds is not None else cfg.warm_starts[k]
    c.init.seed = init_seed
    c.toy.seed = data_seed
    c.sample.seed = data_seed
    # Before the decision family existed, configs/toy_data.py had no `family` field: the
    # list family is then the only one and needs no field.
    if "family" in c.toy or cfg.family != "lists":
        c.toy.family = cfg.family
    c.train = ml_collections.ConfigDict(dict(batch_size=cfg.train.batch_size,
                                              beta=cfg.train.beta))
    return c


class WarmStart(pipeline.Pipeline):
    """One warm start's pipeline workdir: its stages up to the reference, then whatever
    models and splits the study evaluates. With `recorded` a list, program commands are
    appended to it as (stage, module, args) instead of run."""

    PREPARE = ("data", "init", "sft_data", "warm_start", "sample", "execute", "pairs",
               "reference")

    def __init__(self, cfg, workdir: pathlib.Path):
        super().__init__(cfg, workdir)
        self.recorded: list | None = None
        self._models: list = []
        self._splits: tuple = ()

    def run(self, stage: str, module: str, *args) -> None:
        if self.recorded is not None:
            self.recorded.append((stage, module, [str(a) for a in args]))
            return
        super().run(stage, module, *args)

    def prepare(self, until: str | None = None) -> None:
        """The stages up to the reference, or up to and including `until`."""
        self.check_inputs()
        for name in self.enabled():
            if name in self.PREPARE:
                self.stage(name, getattr(self, name))
                if name == until:
                    return

    def models(self):
        return self._models

    def benchmarks(self):
        return [(split, "evalplus", str(self.toy_dir / f"eval_{split}.jsonl"))
                for split in self._splits]

    def evaluate_models(self, models, splits) -> None:
        """Greedy pass@1 of each (name, checkpoint) on each split, in eval/NAME/SPLIT
        (kept when it exists)."""
        self._models, self._splits = list(models), tuple(splits)
        self.evaluate()


def _table_flag(table) -> str:
    return "(" + ",".join("(" + ",".join(f"{w:g}" for w in row) + ")" for row in table) + ")"


def pass_rates(results_path: pathlib.Path, metric: str = "base") -> dict[str, float]:
    """{task id: pass rate} of an evaluation's results.json (greedy: 0 or 1)."""
    r = json.loads(results_path.read_text())
    return {row["task_id"]: row[f"{metric}_correct"] / row["n"] for row in r["tasks"]}


def _mean(xs):
    return statistics.mean(xs) if xs else None


# What a warm start is for (issue 19): the planted belief and nothing else, i.e. greedy
# decoding right on the non-trap tasks and wrong on the trap ones. The report checks the
# start model of each warm start against these (test pass@1, points) and says so; the claim
# rules (config.primary, config.secondary) are not changed by it.
PREMISE_MIN_NON_TRAP = 85.0
PREMISE_MAX_TRAP = 20.0


def task_kinds(eval_path: pathlib.Path) -> dict[str, bool]:
    """{task id: trap?} from a decision-family eval file (its records carry "trap"); {} for
    a family without traps."""
    if not eval_path.exists():
        return {}
    kinds = {}
    for row in jsonl.records(eval_path):
        if "trap" not in row:
            return {}
        kinds[row["task_id"]] = bool(row["trap"])
    return kinds


def by_kind(per_task: dict[str, float], kinds: dict[str, bool]) -> dict[str, float | None]:
    """Pass@1 (points) over the trap and the non-trap tasks of `per_task`."""
    out = {}
    for name, want in (("non_trap", False), ("trap", True)):
        vals = [v for t, v in per_task.items() if kinds.get(t) is want]
        out[name] = None if not vals else 100 * statistics.mean(vals)
    return out


class Study:
    """The study in `workdir`. `check_config` first (the program does)."""

    def __init__(self, cfg, workdir: pathlib.Path):
        self.cfg, self.w = cfg, pathlib.Path(workdir)
        self.arms = {a.name: a for a in arms_of(cfg)}
        self.digest = protocol_digest(cfg)
        self.timings: dict[str, float] = {}
        self._ws: dict[int, WarmStart] = {}

    # ------------------------------------------------------------------ plumbing
    def ws(self, k: int) -> WarmStart:
        if k not in self._ws:
            self._ws[k] = WarmStart(warm_start_config(self.cfg, k, self.seeds(k)),
                                    self.w / f"ws{k}")
        return self._ws[k]

    # ------------------------------------------------------------------ the premise gate
    def _gate_record(self) -> dict:
        path = self.w / "warm_starts.json"
        if path.exists():
            return json.loads(path.read_text())
        return {"seeds": {}, "rejected": [], "spares_used": 0}

    def seeds(self, k: int) -> tuple[int, int]:
        """Warm start k's (init seed, data seed): config.warm_starts[k], or the spare the
        premise gate put in its place."""
        got = self._gate_record()["seeds"].get(str(k))
        return tuple(got) if got else tuple(self.cfg.warm_starts[k])

    def start_premise(self, k: int, split: str) -> dict:
        """Greedy pass@1 of warm start k's start model on `split`'s non-trap and trap tasks,
        and whether that meets the premise (PREMISE_MIN_NON_TRAP, PREMISE_MAX_TRAP)."""
        ws = self.ws(k)
        ws.evaluate_models([("start", ws.start_model)], [split])
        kinds = task_kinds(ws.toy_dir / f"eval_{split}.jsonl")
        if not kinds:
            raise ValueError(f"{ws.toy_dir / f'eval_{split}.jsonl'}: no trap field, so the "
                             "premise gate cannot judge this warm start")
        got = by_kind(pass_rates(ws.w / "eval" / "start" / split / "results.json",
                                 self.cfg.metric), kinds)
        holds = got["non_trap"] >= PREMISE_MIN_NON_TRAP and got["trap"] <= PREMISE_MAX_TRAP
        return {**got, "holds": holds}

    def prepare_warm_start(self, k: int) -> None:
        """Warm start k up to its reference; with the premise gate, replaced by the next
        spare seeds while its start model fails the premise (the check reads no arm)."""
        gate = self.cfg.get("premise_gate")
        while True:
            ws = self.ws(k)
            if gate is None or ws.recorded is not None:
                ws.prepare()
                return
            # The check reads only the start model: a rejected warm start costs its warm-start
            # training, not its sampling and execution too.
            ws.prepare(until="warm_start")
            verdict = self.start_premise(k, gate.split)
            record = self._gate_record()
            seeds = list(self.seeds(k))
            if verdict["holds"]:
                record["seeds"][str(k)] = seeds
                atomic.write_text(self.w / "warm_starts.json", json.dumps(record, indent=1))
                ws.prepare()
                return
            used = record["spares_used"]
            if used >= len(gate.spares):
                raise pipeline.StageFailed(
                    f"warm start {k} (seeds {seeds}) fails the premise on {gate.split} (non-"
                    f"trap {verdict['non_trap']:.1f}%, trap {verdict['trap']:.1f}%) and "
                    f"config.premise_gate.spares are used up ({len(gate.spares)}); "
                    f"rejected so far: {self.w / 'warm_starts.json'}")
            moved = self.w / "rejected" / f"ws{k}-seeds{seeds[0]}_{seeds[1]}"
            moved.parent.mkdir(exist_ok=True)
            if moved.exists():
                shutil.rmtree(moved)
            ws.w.rename(moved)
            record["rejected"].append({"warm_start": k, "seeds": seeds, "workdir": str(moved),
                                       "non_trap": verdict["non_trap"],
                                       "trap": verdict["trap"]})
            record["seeds"][str(k)] = list(gate.spares[used])
            record["spares_used"] = used + 1
            atomic.write_text(self.w / "warm_starts.json", json.dumps(record, indent=1))
            print(f"[study] ws{k}: seeds {seeds} fail the premise (non-trap "
                  f"{verdict['non_trap']:.1f}%, trap {verdict['trap']:.1f}% on {gate.split}); "
                  f"replaced by {list(gate.spares[used])}", flush=True)
            del self._ws[k]

    def commands(self, fn, *args, **kwargs) -> list[tuple[str, str, list[str]]]:
        """The program commands `fn(*args)` would run, recorded instead of run."""
        for k in range(len(self.cfg.warm_starts)):
            self.ws(k)
        for ws in self._ws.values():
            ws.recorded = []
        try:
            fn(*args, **kwargs)
            return [c for ws in self._ws.values() for c in ws.recorded]
        finally:
            for ws in self._ws.values():
                ws.recorded = None

    def _marker(self, name):
        try:
            return json.loads((self.w / "stages" / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None

    def stage(self, name: str, fn) -> None:
        m = self._marker(name)
        if m and m.get("state") == "done" and m.get("protocol") == self.digest:
            print(f"[study] {name}: done earlier, skipped")
            self.timings[name] = m["seconds"]
            return
        print(f"[study] {name} ...", flush=True)
        path = self.w / "stages" / f"{name}.json"
        atomic.write_text(path, json.dumps({"state": "started", "protocol": self.digest,
                                            "started": time.ctime()}) + "\n")
        start = time.time()
        fn()
        seconds = time.time() - start
        self.timings[name] = seconds
        atomic.write_text(path, json.dumps({"state": "done", "protocol": self.digest,
                                            "seconds": seconds, "finished": time.ctime()},
                                           indent=1) + "\n")
        print(f"[study] {name}: {seconds:.0f} s", flush=True)

    # ------------------------------------------------------------------ protocol
    def register(self) -> None:
        """Writes protocol.json (config, digest, commit) unless it exists; refuses a
        directory registered with another protocol (ProtocolChanged)."""
        path = self.w / "protocol.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("digest") != self.digest:
                changed = fingerprint.changes(_flat(old.get("config", {})),
                                              _flat(protocol_fields(self.cfg)))
                raise ProtocolChanged(
                    f"{path}: this study was pre-registered with protocol {old.get('digest')}; "
                    f"the config gives {self.digest} (changed: {', '.join(changed)}). Results "
                    "under another protocol cannot be mixed: use a new --workdir")
            return
        self.w.mkdir(parents=True, exist_ok=True)
        (self.w / "stages").mkdir(exist_ok=True)
        atomic.write_text(path, json.dumps(
            {"digest": self.digest, "registered": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
             "commit": _commit(), "config": protocol_fields(self.cfg)}, indent=1) + "\n")

    # ------------------------------------------------------------------ data
    def variants_needed(self) -> list[str]:
        return sorted({a.data for a in self.arms.values()} - {"pairs"})

    def data_dir(self, k: int, variant: str) -> pathlib.Path:
        """The training data of a variant on warm start k (with reference sums where the
        loss needs them)."""
        ws = self.ws(k)
        if variant == "pairs":
            return ws.w / "pairs_ref"
        return ws.w / "variants" / (variant if variant == "rft" else f"{variant}_ref")

    def build_variants(self, k: int) -> None:
        ws = self.ws(k)
        data_seed = self.seeds(k)[1]
        for variant in self.variants_needed():
            out = ws.w / "variants" / variant
            done = self.data_dir(k, variant) / "manifest.json"
            if done.exists():
                continue
            # The pipeline's own build settings (its pairs stage), plus the variant's.
            b = ws.cfg.build
            ws.run("variants", "launch.build", "--input", ws.w / "executed.jsonl",
                   "--tokenizer", ws.tokenizer, "--out", out,
                   f"--config.max_len={ws.cfg.max_len}",
                   *(f"--config.{f}={b[f]}" for f in b.keys()), *ws.prompt_format(),
                   *VARIANT_BUILD[variant](data_seed), "--noprogress")
            if variant != "rft":  # supervised arms need no reference
                ws.run("variants", "launch.precompute_ref", "--out", self.data_dir(k, variant),
                       f"--config=configs/focused_dpo.py:model={ws.start_model},data={out}",
                       f"--config.model.compute_dtype={pipeline.COMPUTE_DTYPE}",
                       f"--config.mesh_shape={tuple(ws.cfg.mesh_shape)}")

    # ------------------------------------------------------------------ training
    def train_arm(self, arm: Arm, k: int, lr: float, nll: float, workdir: pathlib.Path) -> None:
        """One training run of `arm` on warm start k (kept when it finished earlier)."""
        ws = self.ws(k)
        if (workdir / "final" / "fdpo_model.json").exists():
            return
        t = self.cfg.train
        frozen = arm.preset in pipeline.FROZEN_REFERENCE_METHODS or arm.data == "rft"
        ws._train("study_train", workdir, ws.start_model, self.data_dir(k, arm.data),
                  preset=arm.preset, steps=t.steps, batch_size=t.batch_size, lr=lr,
                  warmup=t.warmup_steps, seed=self.seeds(k)[1],
                  reference="frozen" if frozen else "precomputed",
                  extra=[f"--config.loss.weights={_table_flag(arm.weights)}",
                         f"--config.loss.nll_weight={nll:g}"])

    @staticmethod
    def setting(lr: float, nll: float) -> str:
        return f"lr{lr:g}-nll{nll:g}"

    def tuning_score(self, arm: Arm, lr: float, nll: float) -> float:
        """Greedy pass@1 (%) of one tuning run on the tuning split (trains and evaluates it
        unless done)."""
        k, split = self.cfg.tuning.warm_start, self.cfg.splits.tune
        ws = self.ws(k)
        rel = f"tuning/{arm.name}/{self.setting(lr, nll)}"
        self.train_arm(arm, k, lr, nll, ws.w / rel)
        ws.evaluate_models([(rel, ws.w / rel / "final")], [split])
        results = ws.w / "eval" / rel / split / "results.json"
        if ws.recorded is not None:  # a dry run: no results
            return 0.0
        return 100 * _mean(list(pass_rates(results, self.cfg.metric).values()))

    def tune_arm(self, arm: Arm) -> dict:
        """The grid rule of configs/study.py for one arm; returns its tuning.json entry."""
        t = self.cfg.tuning
        lrs = lr_grid(arm.lr_center, t.points, t.factor)
        scores: dict[tuple[float, float], float] = {}
        extensions, history = 0, []
        while True:
            for lr in lrs:
                for nll in arm.nll_weights:
                    if (lr, nll) not in scores:
                        scores[(lr, nll)] = self.tuning_score(arm, lr, nll)
            # Per lr, its best NLL weight (ties: the smaller weight).
            per_lr = {lr: max(scores[(lr, n)] for n in arm.nll_weights) for lr in lrs}
            new, why = next_lr(per_lr, t.factor, extensions, t.max_extensions)
            history.append(why)
            if new is None:
                break
            lrs.append(new)
            extensions += 1
        lr = best_lr(per_lr)
        nll = min(n for n in arm.nll_weights if scores[(lr, n)] == per_lr[lr])
        return {"lr": lr, "nll_weight": nll, "extensions": extensions, "stopped": history[-1],
                "history": history,
                "scores": [{"lr": a, "nll_weight": b, "pass@1": s}
                           for (a, b), s in sorted(scores.items())]}

    def tune(self) -> None:
        path = self.w / "tuning.json"
        if path.exists():  # frozen
            return
        fixed = frozen_lrs(self.cfg)
        if fixed is not None:  # fixed by the protocol: nothing is trained or evaluated
            arms = {name: {"lr": fixed[name], "nll_weight": arm.nll_weights[0],
                           "extensions": 0, "stopped": "frozen by the protocol",
                           "history": [], "scores": []} for name, arm in self.arms.items()}
            if self.ws(0).recorded is None:
                atomic.write_text(path, json.dumps({"warm_start": None, "split": None,
                                                    "protocol": self.digest, "arms": arms},
                                                   indent=1) + "\n")
            return
        k = self.cfg.tuning.warm_start
        ws = self.ws(k)
        split = self.cfg.splits.tune
        ws.evaluate_models([("start", ws.start_model)], [split])
        out = {"warm_start": k, "split": split, "protocol": self.digest,
               "arms": {name: self.tune_arm(arm) for name, arm in self.arms.items()}}
        if ws.recorded is None:  # the start model's score, for the report
            start = pass_rates(ws.w / "eval" / "start" / split / "results.json", self.cfg.metric)
            out["start_pass@1"] = 100 * _mean(list(start.values()))
        if ws.recorded is None:
            atomic.write_text(path, json.dumps(out, indent=1) + "\n")

    def frozen(self) -> dict:
        return json.loads((self.w / "tuning.json").read_text())["arms"]

    def run_path(self, arm: Arm, k: int, setting: dict) -> str:
        """Warm start k's run of `arm` at its frozen setting, relative to the workdir; on
        the tuning warm start it is the tuning run with that setting (the same command)."""
        if k == self.cfg.tuning.warm_start and frozen_lrs(self.cfg) is None:
            return f"tuning/{arm.name}/{self.setting(setting['lr'], setting['nll_weight'])}"
        return f"runs/{arm.name}"

    def run_all(self, frozen: dict | None = None) -> None:
        frozen = frozen or self.frozen()
        test = self.cfg.splits.test
        for k in range(len(self.cfg.warm_starts)):
            ws = self.ws(k)
            models = [("start", ws.start_model)]
            for name, arm in self.arms.items():
                rel = self.run_path(arm, k, frozen[name])
                self.train_arm(arm, k, frozen[name]["lr"], frozen[name]["nll_weight"],
                               ws.w / rel)
                models.append((rel, ws.w / rel / "final"))
            ws.evaluate_models(models, [test])

    def phi_warm_starts(self) -> list[int]:
        return [int(k) for k in self.cfg.get("phi_warm_starts", ())]

    def phi(self) -> None:
        """The Phi table of the start model's samples (the warm start's own) and of each
        arm's, sampled from the same prompts with the same settings and seed."""
        frozen = self.frozen()
        for k in self.phi_warm_starts():
            ws = self.ws(k)
            models = [("start", None)] + [
                (name, ws.w / self.run_path(arm, k, frozen[name]) / "final")
                for name, arm in self.arms.items()]
            for name, model in models:
                out = ws.w / "phi" / name
                if (out / "analysis" / "phi.json").exists():
                    continue
                executed = ws.w / "executed.jsonl"
                if model is not None:  # sample and execute resume by content
                    executed = out / "executed.jsonl"
                    ws.sample_files("phi", model, ws.w / "sample_prompts.jsonl",
                                    out / "samples.jsonl")
                    ws.run("phi", "launch.execute", "--input", out / "samples.jsonl",
                           "--output", executed, *ws.execute_limits())
                ws.analyze_files("phi", executed, out / "analysis")

    def phi_table(self) -> dict:
        """{"ws{k}": {model: phi.json's summary}} for the warm starts that have one."""
        out = {}
        for k in self.phi_warm_starts():
            per = {}
            for name in ("start", *self.arms):
                path = self.ws(k).w / "phi" / name / "analysis" / "phi.json"
                if path.exists():
                    d = json.loads(path.read_text())
                    per[name] = {
                        "phi": {seg: t.get("phi") for seg, t in d["tables"].items()},
                        "problems_in": d.get("problems_in"),
                        "problems_used": d.get("problems_used"),
                        "problems_skipped": d.get("problems_skipped", {}),
                        "samples_in": d.get("samples_in"),
                        "samples_correct": d.get("samples_correct")}
            if per:
                out[f"ws{k}"] = per
        return out

    # ------------------------------------------------------------------ results
    def results(self) -> dict:
        """Per warm start: {arm or "start": {task: pass}} on the test split."""
        frozen, test = self.frozen(), self.cfg.splits.test
        out = []
        for k in range(len(self.cfg.warm_starts)):
            ws = self.ws(k)
            per = {"start": pass_rates(ws.w / "eval" / "start" / test / "results.json",
                                       self.cfg.metric)}
            for name, arm in self.arms.items():
                rel = self.run_path(arm, k, frozen[name])
                per[name] = pass_rates(ws.w / "eval" / rel / test / "results.json",
                                       self.cfg.metric)
            out.append(per)
        return out

    def tokens(self) -> dict:
        """Per arm: pairs and tokens the model ran on per run (tokens: the mean over logged
        steps of the step's `tokens` metric times the steps), mean over warm starts."""
        frozen, t = self.frozen(), self.cfg.train
        out = {}
        for name, arm in self.arms.items():
            per_run = []
            for k in range(len(self.cfg.warm_starts)):
                metrics = self.ws(k).w / self.run_path(arm, k, frozen[name]) / "metrics.jsonl"
                rows = [r["tokens"] for r in jsonl.records(metrics)
                        if r.get("split") == "train" and "tokens" in r] if metrics.exists() else []
                if rows:
                    per_run.append(statistics.mean(rows) * t.steps)
            out[name] = {"pairs": t.steps * t.batch_size, "tokens": _mean(per_run)}
        return out

    def mechanism(self) -> dict:
        """Per arm: {metric: [value per warm start, None where the run logged none]}, the
        run's last validation mechanism values (fdpo.mechanism: unweighted log-prob changes
        from the reference on the validation pairs, the first divergent token's margin, KL,
        gradient share), for the metrics of `fdpo.report.MECHANISM_COLUMNS`."""
        frozen = self.frozen()
        out = {}
        for name, arm in self.arms.items():
            per_ws = [run_report.last_mechanism(
                self.ws(k).w / self.run_path(arm, k, frozen[name]) / "metrics.jsonl")
                for k in range(len(self.cfg.warm_starts))]
            out[name] = {key: [v.get(key) for v in per_ws]
                         for key, _ in run_report.MECHANISM_COLUMNS}
        return out

    def kinds_table(self, results: list[dict]) -> dict:
        """Per arm (and "start"): [per warm start {"non_trap", "trap"} test pass@1 in
        points]; {} for a family without trap tasks."""
        test = self.cfg.splits.test
        kinds = [task_kinds(self.ws(k).toy_dir / f"eval_{test}.jsonl")
                 for k in range(len(results))]
        if not all(kinds):
            return {}
        return {name: [by_kind(per[name], kd) for per, kd in zip(results, kinds)]
                for name in results[0]}

    def ceiling_ties(self, a: dict, b: dict) -> stats.CeilingTies | None:
        """With `stats.max_ceiling_ties` registered: which warm starts have both arms at 100
        points on every test task ({warm start: {task: points}} each), for the sign rule
        (`fdpo.stats.CeilingTies`). None (the strict rule) without it."""
        max_ties = self.cfg.stats.get("max_ceiling_ties")
        if max_ties is None:
            return None
        return stats.CeilingTies(tuple(
            all(v == 100 for v in a[w].values()) and all(v == 100 for v in b[w].values())
            for w in a), int(max_ties))

    def comparisons(self, results: list[dict]) -> list[dict]:
        """The primary comparison (claimed by the CI and the sign in every warm start) and
        the secondary ones (Holm over them; claimed by the adjusted p and the sign), test
        pass@1 in points paired by task (fdpo.stats); the forest plot in forest.png."""
        c = self.cfg.stats
        pairs = [(self.cfg.primary.arm, self.cfg.primary.baseline)]
        pairs += [tuple(p) for p in self.cfg.secondary]
        warm = [f"ws{k}" for k in range(len(results))]

        def points(arm):
            return {w: {t: 100 * v for t, v in per[arm].items()}
                    for w, per in zip(warm, results)}

        boots = [stats.hierarchical_bootstrap(
            stats.paired_differences(points(a), points(b), (a, b)),
            n_boot=c.n_boot, seed=c.seed, level=c.level, interval=c.interval)
            for a, b in pairs]
        adjusted = [None] + list(stats.holm([r.p_value for r in boots[1:]])
                                 if len(boots) > 1 else [])
        out = []
        for (a, b), res, adj in zip(pairs, boots, adjusted):
            ceiling = self.ceiling_ties(points(a), points(b))
            out.append({"arm": a, "baseline": b, "estimate": res.estimate, "ci": list(res.ci),
                        "p_value": res.p_value, "p_holm": None if adj is None else float(adj),
                        "per_warm_start": list(res.per_warm_start),
                        "n_tasks": list(res.n_tasks), "interval": res.interval,
                        "ceiling_ties": None if ceiling is None else list(ceiling.at_ceiling),
                        "claim": (stats.primary_claim(res, ceiling) if adj is None else
                                  stats.secondary_claim(res, adj, ceiling)),
                        "outcome": stats.outcome(res, f"{a} - {b}", p_adjusted=adj,
                                                 ceiling=ceiling)})
        rows = [stats.Row(f"{e['arm']} - {e['baseline']}" + (" (Holm)" if i else " (primary)"),
                          e["estimate"], e["ci"][0], e["ci"][1], e["claim"])
                for i, e in enumerate(out)]
        stats.forest_plot(rows, self.w / "forest.png",
                          xlabel="test greedy pass@1 difference (points)",
                          title=f"{len(results)} warm starts, {100 * c.level:.0f}% CI "
                                "(t over warm starts, floored at task noise)")
        return out

    # ------------------------------------------------------------------ all
    def all(self) -> None:
        self.register()
        start = time.time()
        n = len(self.cfg.warm_starts)
        for k in range(n):
            self.stage(f"ws{k}", lambda k=k: self.prepare_warm_start(k))
        if self.variants_needed():
            for k in range(n):
                self.stage(f"variants{k}", lambda k=k: self.build_variants(k))
        self.stage("tuning", self.tune)
        self.stage("runs", self.run_all)
        if self.phi_warm_starts():
            self.stage("phi", self.phi)
        self.stage("report", self.report)
        print(f"[study] finished in {time.time() - start:.0f} s; report: "
              f"{self.w / 'report.md'}")

    def report(self) -> None:
        results = self.results()
        data = {"protocol": self.digest, "tuning": self.frozen(),
                "test_pass_at_1": {name: [100 * _mean(list(per[name].values()))
                                          for per in results]
                                   for name in ["start", *self.arms]},
                "comparisons": self.comparisons(results), "tokens": self.tokens(),
                "by_kind": self.kinds_table(results), "mechanism": self.mechanism(),
                "phi": self.phi_table(), "premise_gate": self._gate_record(),
                "machine": machine(), "stage_seconds": dict(self.timings),
                "warm_start_stage_seconds": {
                    f"ws{k}": {n: (self.ws(k).marker(n) or {}).get("seconds")
                               for n in WarmStart.PREPARE if n in self.ws(k).enabled()}
                    for k in range(len(self.cfg.warm_starts))}}
        atomic.write_text(self.w / "report.json", json.dumps(data, indent=1, default=str) + "\n")
        mechanism_plot(data["mechanism"], self.w / "mechanism.png")
        atomic.write_text(self.w / "report.md", render(self.cfg, data))


# --------------------------------------------------------------------------- the report
def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        jax_version = importlib.metadata.version("jax")
    except importlib.metadata.PackageNotFoundError:
        jax_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax_version,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "commit": _commit(),
            # What decides the bits besides the CPU (fdpo.runtime, docs/pipeline.md#determinism).
            "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None,
            "cpu_pins": {k: os.environ.get(k, "") for k in ("FDPO_CPU_ISA", "FDPO_CPU_THREADS")}}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=pipeline.REPO,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


_INTERVAL_TEXT = {
    "cluster_t": "Student's t on {df} df over the warm-start means, never narrower than the "
                 "task-noise bootstrap interval",
    "percentile": "percentile bootstrap over warm starts, then tasks within each"}


def _premise_lines(kinds: dict) -> list[str]:
    """The outcome section's check of each warm start's start model against the planted
    belief (PREMISE_*); nothing for a family without trap tasks."""
    start = kinds.get("start")
    if not start:
        return []
    failed = [f"ws{k} (non-trap {_f(v['non_trap'])}%, trap {_f(v['trap'])}%)"
              for k, v in enumerate(start)
              if v["non_trap"] is None or v["trap"] is None
              or v["non_trap"] < PREMISE_MIN_NON_TRAP or v["trap"] > PREMISE_MAX_TRAP]
    rule = (f"the start model right on >= {PREMISE_MIN_NON_TRAP:g}% of the non-trap test "
            f"tasks and on <= {PREMISE_MAX_TRAP:g}% of the trap ones")
    if not failed:
        return [f"Premise (every warm start holds the planted belief and little else: {rule}): "
                "holds on every warm start.", ""]
    return [f"**Premise not met** on {', '.join(failed)} ({rule}): there the start model's "
            "errors are not the planted belief, so its comparisons do not test focusing on "
            "a decision point. The claim rules above do not use this check.", ""]


def _gate_lines(cfg, record: dict) -> list[str]:
    gate = cfg.get("premise_gate")
    if gate is None:
        return []
    rejected = record.get("rejected", [])
    head = (f"Premise gate (pre-registered: a warm start whose start model fails the premise "
            f"on the {gate.split} split is replaced by the next spare seeds before any arm "
            f"trains): ")
    if not rejected:
        return [head + "every warm start passed.", ""]
    return [head + f"{len(rejected)} replaced: " + "; ".join(
        f"ws{r['warm_start']} seeds {tuple(r['seeds'])} (non-trap {r['non_trap']:.1f}%, trap "
        f"{r['trap']:.1f}%)" for r in rejected)
        + ". Seeds used: " + ", ".join(f"ws{k} {tuple(v)}" for k, v in sorted(
            record.get("seeds", {}).items(), key=lambda kv: int(kv[0]))) + ".", ""]


def render(cfg, data: dict) -> str:
    comps = data["comparisons"]
    first = comps[0]
    n_ws = len(cfg.warm_starts)
    lines = [f"# Study report (protocol {data['protocol']})", "", "## Outcome", "",
             f"Primary comparison, test greedy pass@1 of {first['arm']} minus "
             f"{first['baseline']} (points, paired by task, {n_ws} warm starts; CI: "
             f"{_INTERVAL_TEXT[cfg.stats.interval].format(df=n_ws - 1)}; a claim needs the CI "
             f"to exclude 0 and the sign to hold in every warm start"
             + ("" if cfg.stats.get("max_ceiling_ties") is None else
                f" not tied at the ceiling (both arms at 100% on every test task), at most "
                f"{cfg.stats.max_ceiling_ties} such ties") + "):", "",
             f"**{first['outcome']}**", "",
             *_premise_lines(data.get("by_kind", {})),
             *_gate_lines(cfg, data.get("premise_gate", {})),
             "![comparisons](forest.png)", "",
             "## Test greedy pass@1 (%) per warm start", "",
             "| arm | " + " | ".join(f"ws{k}" for k in range(n_ws))
             + " | mean | lr | NLL | pairs | tokens |",
             "|---|" + "---|" * (n_ws + 5)]
    for name, vals in data["test_pass_at_1"].items():
        tun = data["tuning"].get(name, {})
        tok = data["tokens"].get(name, {})
        lines.append(f"| {name} | " + " | ".join(_f(v) for v in vals)
                     + f" | {_f(_mean(vals))} | {_f(tun.get('lr'), '{:g}')} | "
                     f"{_f(tun.get('nll_weight'), '{:g}')} | {tok.get('pairs', '-')} | "
                     f"{_f(tok.get('tokens'), '{:.0f}')} |")
    lines += ["", "## Comparisons (points; the first is primary, the rest Holm-corrected)", "",
              "| comparison | per warm start | estimate | CI | p | p (Holm) | claim |",
              "|---|---|---|---|---|---|---|"]
    for c in comps:
        lines.append(f"| {c['arm']} - {c['baseline']} | "
                     + ", ".join(_f(d, "{:+.1f}") for d in c["per_warm_start"])
                     + f" | {c['estimate']:+.2f} | [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}] | "
                     f"{c['p_value']:.3g} | "
                     + ("(primary)" if c["p_holm"] is None else f"{c['p_holm']:.3g}")
                     + f" | {'yes' if c['claim'] else 'no'} |")
    lines += [""] + [f"- {c['outcome']}" for c in comps[1:]]
    kinds = data.get("by_kind", {})
    if kinds:
        lines += ["", "## Test greedy pass@1 (%) by task kind: non-trap / trap", "",
                  "| arm | " + " | ".join(f"ws{k}" for k in range(n_ws)) + " |",
                  "|---|" + "---|" * n_ws]
        for name, per in kinds.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{_f(v['non_trap'])} / {_f(v['trap'])}" for v in per) + " |")
    lines += _mechanism_lines(data.get("mechanism", {}))
    lines += _phi_lines(data.get("phi", {}))
    if frozen_lrs(cfg) is not None:
        lines += ["", "## Tuning", "", "None: every arm's lr is frozen by the protocol "
                  "(config.tuning.frozen_lrs): " + ", ".join(
                      f"{name} {t['lr']:g}" for name, t in data["tuning"].items()) + "."]
    else:
        lines += _tuning_lines(cfg, data)
    m = data["machine"]
    lines += ["", "## Machine and stage times", "",
              f"- CPU: {m['cpu']} ({m['cores']} cores), {m['platform']}",
              f"- Python {m['python']}, jax {m['jax']}, XLA_FLAGS `{m['xla_flags'] or '(none)'}`",
              f"- CPUs allowed {m.get('cpus_allowed')}; pins "
              + (", ".join(f"{k}={v}" for k, v in m.get("cpu_pins", {}).items() if v) or "none")
              + " (docs/pipeline.md#determinism)",
              f"- commit {m['commit']}", "",
              "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in data["stage_seconds"].items()]
    for ws, per in data.get("warm_start_stage_seconds", {}).items():
        lines.append(f"| {ws}: " + ", ".join(f"{n} {_f(v, '{:.0f}')}" for n, v in per.items())
                     + " | |")
    lines += ["", "Tokens: tokens the model ran on per run (the mean logged per-step count "
              "times the steps), mean over warm starts; pairs = steps x batch, equal for "
              "every arm."]
    return "\n".join(lines) + "\n"


def _logged_columns(mech: dict) -> list[tuple[str, str]]:
    """The (metric, label) of `fdpo.report.MECHANISM_COLUMNS` some run logged."""
    return [(k, label) for k, label in run_report.MECHANISM_COLUMNS
            if any(v is not None for per in mech.values() for v in per.get(k, []))]


def _mechanism_lines(mech: dict) -> list[str]:
    """Each arm's end-of-training mechanism values: mean over warm starts [min, max]."""
    cols = _logged_columns(mech)
    if not cols:
        return []

    def cell(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        return f"{_mean(vals):+.3g} [{min(vals):+.3g}, {max(vals):+.3g}]"

    lines = ["", "## Mechanism at the end of training", "",
             "Validation pairs of each warm start, unweighted: log-prob changes from the "
             "reference (nats per pair; negative: the policy lost probability there), the "
             "change of the logit margin at the first divergent token, KL to the reference "
             "(docs/training.md#mechanism-metrics; metrics no run logged are left out). Mean "
             "over warm starts [min, max].", "",
             "![mechanism](mechanism.png)", "",
             "| arm | " + " | ".join(label for _, label in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, per in mech.items():
        lines.append(f"| {name} | " + " | ".join(cell(per.get(k, [])) for k, _ in cols) + " |")
    return lines


def mechanism_plot(mech: dict, path: pathlib.Path) -> bool:
    """A panel per mechanism metric: each arm's warm starts as dots and their mean as a
    bar. False (and nothing written) when no run logged any."""
    keys = _logged_columns(mech)
    if not keys:
        return False
    arms = list(mech)
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig = figure.Figure(figsize=(3.2 * cols, 2.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (key, label) in zip(axes, keys):
        for i, arm in enumerate(arms):
            vals = [v for v in mech[arm].get(key, []) if v is not None]
            if not vals:
                continue
            ax.bar(i, _mean(vals), color=f"C{i}", alpha=0.35, width=0.7)
            ax.plot([i] * len(vals), vals, "o", color=f"C{i}", ms=3)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xticks(range(len(arms)), arms, rotation=30, fontsize=7, ha="right")
        ax.set_title(label, fontsize=9)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.suptitle("end of training, validation pairs (dots: warm starts; bars: their mean)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


PHI_SEGMENTS = ("common prefix", "prefix + chosen mid", "prefix + rejected mid",
                "common suffix")


def _phi_lines(phi: dict) -> list[str]:
    """The Phi tables of each model's own samples (start model and arms)."""
    if not phi:
        return []
    lines = ["", "## Phi on each model's own samples (preference prompts)", "",
             "The paper's analysis (METHOD.md section 1) on samples of the start model and of "
             "each trained arm, the same prompts, settings and seed: per problem a reference "
             "pair of the model's own correct and wrong samples gives the segments, and Phi "
             "is the correlation of containing a segment with being correct, over the other "
             "samples (docs/analysis.md). A problem needs a correct and a wrong sample; "
             "`used` counts those.", "",
             "| warm start | model | samples correct | problems used / in | "
             + " | ".join(f"Phi {seg}" for seg in PHI_SEGMENTS) + " |",
             "|---|---|---|---|" + "---|" * len(PHI_SEGMENTS)]
    for ws, per in phi.items():
        for name, d in per.items():
            rate = (f"{100 * d['samples_correct'] / d['samples_in']:.1f}%"
                    if d.get("samples_in") else "-")
            lines.append(f"| {ws} | {name} | {rate} | {d['problems_used']} / "
                         f"{d['problems_in']} | "
                         + " | ".join(_f(d["phi"].get(seg), "{:.2f}") for seg in PHI_SEGMENTS)
                         + " |")
    return lines


def _tuning_lines(cfg, data: dict) -> list[str]:
    lines = ["", f"## Tuning (warm start {cfg.tuning.warm_start}, split {cfg.splits.tune})", "",
             "| arm | lr (/NLL): pass@1 | chosen lr | NLL | extensions | stopped |",
             "|---|---|---|---|---|---|"]
    for name, t in data["tuning"].items():
        grid = ", ".join(f"{s['lr']:g}" + (f"/{s['nll_weight']:g}" if len(
            cfg.arms[name].nll_weights) > 1 else "") + f": {s['pass@1']:.1f}"
            for s in t["scores"])
        lines.append(f"| {name} | {grid} | {t['lr']:g} | {t['nll_weight']:g} | "
                     f"{t['extensions']} | {t['stopped']} |")
    return lines


def plan(cfg) -> dict:
    """What the study will run, before tuning decides the extensions: warm starts, data
    variants, the arms' first grids, and the number of training runs."""
    arms = arms_of(cfg)
    t = cfg.tuning
    grids = {a.name: lr_grid(a.lr_center, t.points, t.factor) for a in arms}
    n_ws = len(cfg.warm_starts)
    fixed = frozen_lrs(cfg)
    if fixed is not None:  # no tuning: each arm trains once per warm start at its lr
        grids = {a.name: [fixed[a.name]] for a in arms}
    return {
        "warm_starts": [{"init_seed": i, "data_seed": d, "workdir": f"ws{k}"}
                        for k, (i, d) in enumerate(cfg.warm_starts)],
        "variants": sorted({a.data for a in arms} - {"pairs"}),
        "arms": {a.name: {"preset": a.preset, "weights": a.weights,
                          "nll_weights": a.nll_weights, "data": a.data,
                          "lr_grid": grids[a.name]} for a in arms},
        "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
        "tuning_runs": 0 if fixed else sum(len(grids[a.name]) * len(a.nll_weights)
                                           for a in arms),
        "max_tuning_runs": 0 if fixed else sum(
            (len(grids[a.name]) + t.max_extensions) * len(a.nll_weights) for a in arms),
        # The tuning warm start reuses its tuning runs.
        "test_runs": len(arms) * (n_ws if fixed else n_ws - 1),
        # With the premise gate: the seeds that replace failing warm starts, in order.
        "premise_gate_spares": ([list(w) for w in cfg.premise_gate.spares]
                                if cfg.get("premise_gate") is not None else []),
    }
