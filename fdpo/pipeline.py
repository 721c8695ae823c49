"""The whole Focused-DPO pipeline, stage by stage, each stage one of fdpo's own programs.

    python -m launch.pipeline --config=configs/toy.py --workdir=runs/toy
    Pipeline(cfg, workdir).all()   # the same, in Python

Stages, in order (each skipped when its `stages/NAME.json` marker says it finished with
the same fingerprint, see below; a rerun resumes after an interruption, and programs that
resume themselves — sampling, execution, training — pick up where they stopped):

    data        the miniature's tokenizer, prompts, tests, SFT pairs (toy only)
    init        the initial policy (random tiny model, or an HF import)
    sft_data    SFT records (launch.build on ready pairs)          (warm start only)
    warm_start  supervised warm start with the `sft` preset             (warm start only)
    sample      k codes per prompt from the warm-started policy (launch.sample)
    execute     every code against every test in the sandbox (launch.execute)
    pairs       ranking, error-point pairs, global top-N, ArrayRecord shards (launch.build)
    reference   per-segment reference log-prob sums (launch.precompute_ref)
    train       every method x seed from the same start (launch.train)
    evaluate    greedy pass@1 on the miniature's evaluation splits (seen and held-out, or
                validation and test) or a real run's benchmarks (launch.evaluate)
    analyze     the Phi table of the samples (launch.analyze)
    report      report.md, plots and report.json (launch.report)

A stage's fingerprint is a digest of what it reads: its own config fields (`STAGE_INPUTS`),
the outside files it reads (the prompts file's bytes, the HF directory's file names, sizes
and times) and the fingerprints of the stages it reads from (`Pipeline.upstream`). A marker
holds the fingerprint and those inputs, readable; when they differ from the current ones the
stage reruns, saying what changed, after removing outputs it would otherwise resume from or
skip (`STALE_OUTPUTS`); every stage after it then differs too. `pipeline_config.json` is
written only when every stage matches the config (and removed while they do not), so it
never claims a model or data the stages did not use.

Every stage runs as a subprocess with its log in `logs/NAME.log`, exactly the command a
user would type for a real run; nothing is special-cased for the miniature beyond the
config's values. The config is `configs/toy.py`'s or `configs/real.py`'s (same fields).

Sampling, execution, pairs and analysis pass one file along, the problem record
(fdpo/problem.py, docs/data.md): `samples.jsonl` from launch.sample, `executed.jsonl` (the
same records with their verdicts) from launch.execute, read as it is by launch.build and
launch.analyze. The pipeline writes only the sampler's input, `sample_prompts.jsonl` (the
prompts of the run; for the miniature with its oracle tests and which of them are right,
fields the sampler passes through).

Several hosts (`config.distributed`, the same command on every host, `hosts` saying which
one this is): the JAX stages run on every host over the global mesh, execution and the pair
build are split by process index and merged by process 0, the rest runs on process 0 alone
(`HOST_ROLES`); process 0 alone writes markers and shared outputs, and the hosts meet at
file barriers in the shared workdir (fdpo.multihost, which says why files). A restarted job
reruns only the shares of an interrupted stage that did not finish (`stages/shares/`).
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Sequence

import ml_collections

from fdpo import atomic, fingerprint, jsonl, multihost
from fdpo.tokenization import PROMPT_FORMATS

# The checkout whose programs (`python -m launch.NAME`) and configs the stages run.
REPO = pathlib.Path(__file__).resolve().parents[1]

# The methods a config may list, each with its launch.train preset (configs/focused_dpo.py).
# `step_dpo_like` is the deprecated name of `mid_only` (launch.train warns).
METHOD_PRESETS = {"focused_dpo": "focused_dpo", "dpo": "dpo", "continued_sft": "sft",
                  "mid_only": "mid_only", "step_dpo_like": "step_dpo_like",
                  "target_dpo_like": "target_dpo_like", "dpo_nll": "dpo_nll",
                  "dpop": "dpop", "ipo_length_norm": "ipo_length_norm"}
# Token-level DPO needs the reference's whole distribution at every token: these methods run
# the frozen reference (the start model) in the step instead of the precomputed sums.
METHOD_PRESETS.update(tdpo1="tdpo1", tdpo2="tdpo2")
FROZEN_REFERENCE_METHODS = ("tdpo1", "tdpo2")
# RFT (rejection-sampling fine-tuning): the sft preset on every correct sample of the
# preference prompts, the `rft` records the pairs stage builds beside `pairs/` when a
# configured method needs them (launch.build --config.emit=rft; docs/data.md).
METHOD_PRESETS.update(rft="sft")
SFT_DATA_METHODS = {"rft": "rft"}  # method -> its data directory in the workdir

# The compute dtype of every training run, and so of the frozen reference whose log-prob
# sums the reference stage precomputes (they must be what the train step would compute).
COMPUTE_DTYPE = "float32"

# Optional `warm_start` fields passed to the warm start's optimizer (fdpo.train.OptimizerConfig).
WARM_START_OPTIMIZER = ("decay", "end_lr_ratio", "weight_decay")

# The miniature's evaluation splits per task family (configs/toy_data.py), in report order;
# the last is what the report's verdict is about (never trained on, nor sampled for pairs).
TOY_EVAL_SPLITS = {"lists": ("seen", "held_out"), "decision": ("validation", "test")}


class StageFailed(RuntimeError):
    pass


# Every stage, in the order `Pipeline.all` runs them (some only with the toy data or a warm
# start).
STAGES = ("data", "init", "sft_data", "warm_start", "sample", "execute", "pairs", "reference",
          "train", "evaluate", "analyze", "report")

# The config fields each stage's result depends on (dotted; a sub-config counts whole),
# besides the outside files it reads (`Pipeline.inputs`) and the stages it reads from.
# Fields that change only how fast a result comes or how it is laid out on the devices
# (UNTRACKED_FIELDS) are in no stage: changing them reruns nothing.
STAGE_INPUTS = {
    "data": ("toy",),
    "init": ("init",),
    "sft_data": ("max_len",),
    "warm_start": ("warm_start", "train.beta"),
    "sample": ("sample", "tests_source", "prompt_format"),
    "execute": ("execute.timeout",),
    "pairs": ("build", "max_len", "train.batch_size", "prompt_format"),
    "reference": (),
    "train": ("train", "methods", "seeds", "w_focused_ablation", "method_train"),
    "evaluate": ("evaluate", "sample.response_format", "prompt_format"),
    "analyze": ("analysis", "build.ranker", "build.lam", "tests_source", "prompt_format",
                "sample.max_new_tokens", "sample.response_format", "execute.timeout"),
    "report": (),
}
UNTRACKED_FIELDS = ("name", "mesh_shape", "distributed", "sample.batch_size",
                    "execute.workers", "evaluate.workers",
                    # These decide which stages run (`Pipeline.enabled`), or are read
                    # through the file they name (`Pipeline.inputs`: the prompts' bytes).
                    "toy.enabled", "warm_start.enabled", "prompts")
# Outputs a stage would resume from or skip work by (train runs with a final model,
# evaluation results): removed before the stage reruns for changed inputs. The other stages
# replace their output whole, or resume by content (samples.jsonl, executed.jsonl).
STALE_OUTPUTS = {"warm_start": ("warm_start",), "train": ("train",), "evaluate": ("eval",),
                 "analyze": ("analysis",), "report": ("report",)}

# Several hosts (`--config.distributed=True`, the same command on every host): who runs each
# stage. "all": a JAX program over the global mesh, started on every host (it writes its
# outputs once itself); "shares": CPU work split by process index (host i takes problems
# i, i + n, ...; docs/pipeline.md#multi-host), then process 0 merges; "primary": process 0
# alone (small work), the others wait. Process 0 alone writes markers and shared files.
# `analyze` with the continuation experiment generates over the global mesh and splits its
# sandbox runs by problem inside launch.analyze; without it, it is a small CPU pass
# (`Pipeline.role`).
HOST_ROLES = {"data": "primary", "init": "primary", "sft_data": "primary",
              "warm_start": "all", "sample": "all", "execute": "shares", "pairs": "shares",
              "reference": "all", "train": "all", "evaluate": "all", "analyze": "all",
              "report": "primary"}
# Outputs a sharded stage starts afresh (a resumed one keeps them: hosts whose share is done
# skip it, the others rewrite their own shard files).
SHARE_OUTPUTS = {"pairs": ("pairs",) + tuple(SFT_DATA_METHODS.values())}


def _field(cfg, dotted: str):
    value = cfg
    for key in dotted.split("."):
        value = value[key]
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def _json(value):
    """A config value as JSON reads it back (tuples as lists), for comparing with a marker."""
    return json.loads(json.dumps(value, default=str))


def dir_stamp(path) -> str:
    """Digest of a directory's file names, sizes and modification times (its files are
    model weights: too big to read on every run)."""
    path = pathlib.Path(path)
    rows = [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(path.rglob("*")) if f.is_file()]
    return fingerprint.digest(rows)


def check_inputs(cfg) -> None:
    """What a real run reads from outside the workdir, read before any stage runs (a
    bad prompts file should not wait for the model import), and the method names. Raises
    ValueError."""
    # A study's warm starts (fdpo.study) carry no methods: the study's arms replace them.
    unknown = [m for m in cfg.get("methods", ()) if m not in METHOD_PRESETS]
    if unknown:
        raise ValueError(f"config.methods: unknown method(s) {', '.join(map(repr, unknown))}; "
                         f"the methods are {', '.join(sorted(METHOD_PRESETS))}")
    if cfg.prompt_format and cfg.prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"config.prompt_format={cfg.prompt_format!r}: expected one of "
                         f"{PROMPT_FORMATS} or '' (the tokenizer's default)")
    if cfg.toy.enabled:
        return
    if not cfg.prompts:
        raise ValueError("config.prompts: no prompts file given (configs/real.py:prompts=P)")
    try:
        rows = list(jsonl.objects(cfg.prompts))
    except OSError as e:
        raise ValueError(f"config.prompts={cfg.prompts}: cannot read: {e}") from None
    except jsonl.JsonlError as e:
        raise ValueError(f"config.prompts: {e}") from None
    for where, r in rows:
        if not isinstance(r.get("prompt"), str):
            raise ValueError(f"config.prompts: {where}: no string 'prompt'")
    if not rows:
        raise ValueError(f"config.prompts={cfg.prompts}: no prompts")


class Pipeline:
    """The stages of one run in `workdir`. `only`: run just these stages, their markers
    ignored (`--only`)."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: pathlib.Path, *,
                 only: Sequence[str] = (), hosts: multihost.Hosts = multihost.Hosts(),
                 host_timeout: float = 300.0):
        self.cfg, self.w = cfg, workdir
        self.only = tuple(only)
        # One host unless the config says distributed (then `hosts` says which one this is).
        self.hosts = hosts if cfg.distributed else multihost.Hosts()
        self.host_timeout = host_timeout
        self.sync: multihost.Sync | None = None  # set by `all` when there are several hosts
        self._alone = False  # process 0 runs a stage of its own (HOST_ROLES "primary")
        (workdir / "stages").mkdir(parents=True, exist_ok=True)
        (workdir / "logs").mkdir(exist_ok=True)
        self.timings: dict[str, float] = {}
        self._fingerprints: dict[str, str] = {}

    # ------------------------------------------------------------------ plumbing
    def run(self, stage: str, module: str, *args: str) -> None:
        """Runs `python -m module args` with its output in logs/stage.log (appended)."""
        # Several hosts: process 0 writes logs/STAGE.log, process I logs/STAGE.pI.log.
        log = self.w / "logs" / (f"{stage}.log" if self.hosts.primary
                                 else f"{stage}.p{self.hosts.index}.log")
        cmd = [sys.executable, "-m", module, *map(str, args)]
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode:
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise StageFailed(f"stage {stage}: `{' '.join(cmd[2:])}` exited with "
                              f"{proc.returncode}; last lines of {log}:\n{tail}")

    # ------------------------------------------------------------------ fingerprints
    def enabled(self) -> list[str]:
        """The stages this config runs, in order."""
        c = self.cfg
        return [n for n in STAGES if not (n == "data" and not c.toy.enabled or
                                          n in ("sft_data", "warm_start")
                                          and not c.warm_start.enabled)]

    def upstream(self, name: str) -> list[str]:
        """The stages whose outputs `name` reads (directly)."""
        toy = ["data"] if self.cfg.toy.enabled else []
        start = ["warm_start" if self.cfg.warm_start.enabled else "init"]
        tokenizer = toy or ["init"]
        reads = {"init": toy, "sft_data": toy + ["init"], "warm_start": ["init", "sft_data"],
                 "sample": toy + start, "execute": ["sample"],
                 "pairs": ["execute"] + tokenizer, "reference": ["pairs"] + start,
                 "train": ["reference"] + start, "evaluate": ["train"] + start + toy,
                 "analyze": ["execute"] + start,
                 "report": [n for n in self.enabled() if n != "report"]}
        on = self.enabled()
        return [n for n in dict.fromkeys(reads.get(name, [])) if n in on]

    def inputs(self, name: str) -> dict:
        """What `name` reads besides other stages: its config fields (STAGE_INPUTS) and the
        outside files (digests), as a readable JSON object."""
        c = self.cfg
        if name == "init" and c.init.hf_dir:  # the model's fields and seed are not used
            hf = pathlib.Path(c.init.hf_dir).absolute()
            return {"init.hf_dir": str(hf), "init.hf_files": dir_stamp(hf) if hf.is_dir()
                    else "missing"}
        out = {f: _json(_field(c, f)) for f in STAGE_INPUTS.get(name, ())}
        for field in UNTRACKED_FIELDS:  # within a sub-config a stage reads whole
            group, _, key = field.rpartition(".")
            if group in out:
                out[group].pop(key, None)
        if name == "pairs":  # whether the stage also builds the rft records
            out["sft_data_methods"] = sorted(set(c.get("methods", ())) & set(SFT_DATA_METHODS))
        if name == "sample" and not c.toy.enabled:
            out["prompts_file"] = fingerprint.file_digest(c.prompts)
        if name == "evaluate" and not c.toy.enabled:  # the miniature's come from `data`
            out["benchmark_files"] = {d: fingerprint.file_digest(d)
                                      for _, _, d in self.benchmarks()
                                      if d and pathlib.Path(d).is_file()}
        return out

    def fingerprint(self, name: str) -> str:
        """Digest of `name`'s inputs and of the fingerprints of the stages it reads."""
        if name not in self._fingerprints:
            self._fingerprints[name] = fingerprint.digest(
                {"inputs": self.inputs(name),
                 "upstream": {n: self.fingerprint(n) for n in self.upstream(name)}})
        return self._fingerprints[name]

    def marker(self, name: str) -> dict | None:
        path = self.w / "stages" / f"{name}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # none, or cut off by a kill: the stage runs again
            return None

    def current(self, name: str) -> bool:
        """Whether `name` finished with the inputs the config gives it now."""
        m = self.marker(name)
        return bool(m) and m.get("state") == "done" and m.get("fingerprint") == \
            self.fingerprint(name)

    def changed(self, name: str) -> list[str]:
        """What differs between `name`'s marker and its inputs now: field names, outside
        files, and "upstream X" for a stage it reads whose fingerprint changed ([] when
        there is no marker, or it matches)."""
        m = self.marker(name)
        if m is None or m.get("fingerprint") == self.fingerprint(name):
            return []
        if "fingerprint" not in m:
            return ["no fingerprint"]
        what = fingerprint.changes(m.get("inputs", {}), self.inputs(name))
        if what == ["no fingerprint"]:  # a stage with no inputs of its own
            what = []
        ups = {n: self.fingerprint(n) for n in self.upstream(name)}
        what += [f"upstream {n}" for n in fingerprint.changes(m.get("upstream", {}), ups)
                 if n != "no fingerprint"]
        return what or ["its fingerprint"]

    def _write_marker(self, name: str, **fields) -> None:
        record = {"fingerprint": self.fingerprint(name), "inputs": self.inputs(name),
                  "upstream": {n: self.fingerprint(n) for n in self.upstream(name)}, **fields}
        atomic.write_text(self.w / "stages" / f"{name}.json", json.dumps(record, indent=1) + "\n")

    def stage(self, name: str, fn) -> None:
        if self.sync is None:
            if self._begin(name):
                start = time.time()
                fn()
                self._end(name, time.time() - start)
            return
        # Several hosts: process 0 decides and prepares (markers, stale outputs), every
        # host does its part, process 0 marks the stage done once all have finished.
        if not self.sync.sync(f"{name}.begin", lambda: self._begin(name)):
            self.timings[name] = (self.marker(name) or {}).get("seconds", 0.0)
            return
        start = time.time()
        if self.role(name) != "primary":
            fn()
        elif self.hosts.primary:
            self._alone = True  # the others are not there to meet at a barrier
            try:
                fn()
            finally:
                self._alone = False
        self.sync.sync(f"{name}.end", lambda: self._end(name, time.time() - start))

    def role(self, name: str) -> str:
        """Who runs stage `name` on several hosts (HOST_ROLES)."""
        if name == "init" and self.cfg.init.hf_dir:
            return "all"  # launch.import_hf runs over the global mesh
        if name == "analyze" and not self.cfg.analysis.continuation:
            return "primary"  # the Phi table alone: no model, a short CPU pass
        return HOST_ROLES[name]

    def _begin(self, name: str) -> bool:
        """Whether `name` runs; when it does, its stale outputs are gone and its marker says
        started."""
        marker = self.marker(name)
        if self.current(name) and (not self.only or name not in self.only):
            print(f"[pipeline] {name}: done earlier, skipped")
            self.timings[name] = marker["seconds"]
            return False
        if self.only and name not in self.only:
            print(f"[pipeline] {name}: not run (--only={','.join(self.only)})")
            return False
        resuming = (marker is not None and marker.get("state") == "started"
                    and marker.get("fingerprint") == self.fingerprint(name))
        if not resuming:  # the hosts' shares start afresh too
            shutil.rmtree(self.w / "stages" / "shares" / name, ignore_errors=True)
            if self.sync is not None:
                for rel in SHARE_OUTPUTS.get(name, ()):
                    if (self.w / rel).exists():
                        shutil.rmtree(self.w / rel)
        changed = self.changed(name)
        if changed:
            # Its outputs came from other inputs: nothing of them may be resumed or skipped.
            why = ("its marker has no fingerprint (an older fdpo wrote it)"
                   if changed == ["no fingerprint"] else
                   f"changed since it ran: {', '.join(changed)}")
            print(f"[pipeline] {name}: rerun, {why}")
            for rel in STALE_OUTPUTS.get(name, ()):
                if (self.w / rel).exists():
                    shutil.rmtree(self.w / rel)
        elif marker is not None and marker.get("state") == "started":
            print(f"[pipeline] {name}: resuming (interrupted earlier)")
        print(f"[pipeline] {name} ...", flush=True)
        self._write_marker(name, state="started", started=time.ctime())
        return True

    def _end(self, name: str, seconds: float) -> None:
        self.timings[name] = seconds
        self._write_marker(name, state="done", seconds=seconds, finished=time.ctime())
        print(f"[pipeline] {name}: {seconds:.0f} s", flush=True)

    # ------------------------------------------------------------------ several hosts
    def barrier(self, tag: str, work=None) -> None:
        """All hosts meet; process 0 runs `work` (shared outputs) before releasing them."""
        if self.sync is None or self._alone:
            if work is not None:
                work()
        else:
            self.sync.sync(tag, work)

    def clear(self, stage: str, path: pathlib.Path) -> None:
        """Removes `path` (an output the stage replaces whole) before every host's program
        writes it anew: process 0 alone, the others wait."""
        def remove():
            if path.exists():
                shutil.rmtree(path)
        self.barrier(f"{stage}.clear.{path.name}", remove)

    def share_marker(self, stage: str, part: str) -> pathlib.Path:
        return self.w / "stages" / "shares" / stage / f"{part}-{self.hosts.tag}.json"

    def my_share_done(self, stage: str, part: str) -> bool:
        """Whether this host finished its share of `part` of `stage` in an earlier,
        interrupted run with the same inputs (a restarted job reruns only the shares not
        done; `_begin` removes the share markers when the stage starts afresh)."""
        return multihost.share_done(self.share_marker(stage, part), self.fingerprint(stage))

    def mark_share_done(self, stage: str, part: str) -> None:
        self.share_marker(stage, part).parent.mkdir(parents=True, exist_ok=True)
        multihost.write_share_marker(self.share_marker(stage, part), self.fingerprint(stage))

    # ------------------------------------------------------------------ paths
    @property
    def toy_dir(self):
        return self.w / "data"

    @property
    def tokenizer(self):
        if self.cfg.toy.enabled:
            return self.toy_dir / "tokenizer"
        return self.w / "init" / "hf_extras"  # copied from the HF checkpoint by import_hf

    def jax_flags(self):
        """Mesh and multi-host flags passed to every JAX program."""
        return ["--mesh_shape", ",".join(map(str, self.cfg.mesh_shape)), *self.process_flags()]

    def process_flags(self) -> list[str]:
        """--distributed, and this host's place in the job where the pipeline was given it
        (else each program detects it from the cluster, as the pipeline did)."""
        if not self.cfg.distributed:
            return []
        h = self.hosts
        out = ["--distributed"]
        if h.coordinator:
            out.append(f"--coordinator_address={h.coordinator}")
        if h.count > 1 or h.coordinator:
            out += [f"--num_processes={h.count}", f"--process_id={h.index}"]
        return out

    @property
    def start_model(self):
        """The policy every method starts from (and the frozen reference)."""
        if self.cfg.warm_start.enabled:
            return self.w / "warm_start" / "final"
        return self.w / "init"

    def runs(self):
        """(run name, method, seed, w_focused) for every preference-training run."""
        out = [(f"{m}-s{s}", m, s, None) for m in self.cfg.methods for s in self.cfg.seeds]
        out += [(f"focused_dpo-w{w:g}-s0", "focused_dpo", 0, w)
                for w in self.cfg.w_focused_ablation]
        return out

    # ------------------------------------------------------------------ stages
    def data(self):
        t = self.cfg.toy
        if self.toy_dir.exists():
            shutil.rmtree(self.toy_dir)
        fields = [k for k in t.keys() if k != "enabled"]  # configs/toy_data.py's fields
        self.run("data", "launch.toy_data", "--out", self.toy_dir,
                 *(f"--config.{k}={t[k]}" for k in fields))

    def init(self):
        out = self.w / "init"
        self.clear("init", out)
        if self.cfg.init.hf_dir:
            self.run("init", "launch.import_hf", "--hf_dir", self.cfg.init.hf_dir, "--out", out,
                     *self.jax_flags())
        else:
            fields = self.cfg.init.fields.to_dict()
            self.run("init", "launch.init_model", "--out", out, "--tokenizer", self.tokenizer,
                     *(f"--config.fields.{k}={v}" for k, v in fields.items() if v is not None),
                     f"--config.seed={self.cfg.init.seed}")

    def sft_data(self):
        out = self.w / "sft_data"
        if out.exists():
            shutil.rmtree(out)
        self.run("sft_data", "launch.build", "--input", self.toy_dir / "sft_pairs.jsonl",
                 "--tokenizer", self.tokenizer, "--out", out,
                 f"--config.max_len={self.cfg.max_len}", "--config.val_fraction=0.05",
                 "--noprogress")

    def warm_start(self):
        ws = self.cfg.warm_start
        # Decay, end lr and weight decay when the config sets them; else the train program's
        # (cosine to 0, no weight decay).
        extra = [f"--config.optimizer.{k}={ws[k]}" for k in WARM_START_OPTIMIZER if k in ws]
        self._train("warm_start", self.w / "warm_start", self.w / "init", self.w / "sft_data",
                    preset="sft", steps=ws.steps, batch_size=ws.batch_size, lr=ws.lr,
                    warmup=ws.warmup_steps, seed=0, reference="frozen", extra=extra)

    def _train(self, stage, workdir, model, data, *, preset, steps, batch_size, lr, warmup,
               seed, reference, extra=()):
        t = self.cfg.train
        self.run(stage, "launch.train", f"--workdir={workdir}",
                 f"--config=configs/focused_dpo.py:model={model},data={data},preset={preset}",
                 f"--config.train.num_steps={steps}", f"--config.train.batch_size={batch_size}",
                 f"--config.optimizer.lr={lr}", f"--config.optimizer.warmup_steps={warmup}",
                 f"--config.data.seed={seed}", f"--config.loss.reference={reference}",
                 f"--config.loss.beta={t.beta}", f"--config.model.compute_dtype={COMPUTE_DTYPE}",
                 "--config.log.every_steps=10",
                 # steps <= 0: the config's epochs decide the length; evaluate/save every 200.
                 f"--config.log.eval_every_steps={steps if steps > 0 else 200}",
                 f"--config.checkpoint.every_steps={max(steps // 2, 1) if steps > 0 else 200}",
                 f"--config.mesh_shape={tuple(self.cfg.mesh_shape)}",
                 f"--distributed={self.cfg.distributed}", *self.process_flags()[1:], *extra)

    def sample(self):
        s = self.cfg.sample
        if self.cfg.toy.enabled:
            rows = [r for r in jsonl.records(self.toy_dir / "prompts.jsonl")
                    if r["split"] == s.split]
        else:
            rows = jsonl.records(self.cfg.prompts)
        if s.max_prompts:
            rows = rows[:s.max_prompts]
        if self.cfg.tests_source == "oracle":
            # The miniature's tests come from the oracle (with corrupted expectations) and
            # ride along in the record; a real run uses the tests the policy writes here
            # (METHOD.md section 2).
            oracle = {r["id"]: r for r in jsonl.records(self.toy_dir / "tests.jsonl")}
            rows = [{**r, "tests": oracle[r["id"]]["tests"],
                     "tests_correct": oracle[r["id"]]["tests_correct"]} for r in rows]
        prompts = self.w / "sample_prompts.jsonl"
        self.barrier("sample.prompts", lambda: atomic.write_text(
            prompts, "".join(json.dumps(r) + "\n" for r in rows)))
        self.sample_files("sample", self.start_model, prompts, self.w / "samples.jsonl")

    def sample_files(self, stage: str, checkpoint, prompts, output) -> None:
        """launch.sample of `checkpoint` on `prompts` into `output` with the run's sampling
        settings (resumed by content when `output` exists)."""
        s = self.cfg.sample
        mode = "code" if self.cfg.tests_source == "oracle" else "both"
        self.run(stage, "launch.sample", "--checkpoint", checkpoint, "--input", prompts,
                 "--output", output, "--config=configs/sample.py",
                 f"--config.mode={mode}", f"--config.num_codes={s.num_codes}",
                 f"--config.num_tests={s.num_tests}",
                 f"--config.temperature={s.temperature}", f"--config.top_p={s.top_p}",
                 f"--config.max_new_tokens={s.max_new_tokens}",
                 f"--config.batch_size={s.batch_size}", f"--config.seed={s.seed}",
                 *([f"--config.code_prompt={s.code_prompt}"] if s.code_prompt else []),
                 f"--config.response_format={s.response_format}", *self.prompt_format(),
                 *self.jax_flags())

    def prompt_format(self) -> list[str]:
        """The run's one prompt format for every program that renders prompts (sample,
        build, evaluate, analyze); none given: each takes the tokenizer's default, and build
        and analyze the one the samples recorded."""
        fmt = self.cfg.prompt_format
        return [f"--config.prompt_format={fmt}"] if fmt else []

    def execute_limits(self) -> list[str]:
        """launch.execute's limits from the run's config."""
        e = self.cfg.execute
        return [f"--config.timeout={e.timeout}",
                *([f"--config.workers={e.workers}"] if e.workers else [])]  # 0: all cores

    def execute(self):
        limits = self.execute_limits()
        if self.sync is None:
            self.run("execute", "launch.execute", "--input", self.w / "samples.jsonl",
                     "--output", self.w / "executed.jsonl", *limits)
            return
        # Several hosts: host i executes problems i, i + n, ... into its own file (resumed
        # by content like executed.jsonl), then process 0 merges them in input order.
        shards = self.w / "execute_shards"
        if not self.my_share_done("execute", "execute"):
            shards.mkdir(exist_ok=True)
            lines = (self.w / "samples.jsonl").read_text().splitlines(keepends=True)
            share_in = shards / f"input-{self.hosts.tag}.jsonl"
            share = self.hosts.share(lines)
            atomic.write_text(share_in, "".join(share))
            share_out = shards / f"executed-{self.hosts.tag}.jsonl"
            self._seed_share(share, share_out)
            self.run("execute", "launch.execute", "--input", share_in,
                     "--output", share_out, *limits)
            self.mark_share_done("execute", "execute")
        self.barrier("execute.merge", self._merge_executed)

    def _seed_share(self, share: list[str], out: pathlib.Path) -> None:
        """Gives a host's share output the results executed.jsonl already holds for the
        share's problems that it lacks (a workdir that ran execute on one host, now run on
        several): launch.execute resumes by content, so those whose inputs still match are
        kept and only the rest run."""
        merged = self.w / "executed.jsonl"
        if not merged.exists():
            return

        def parsed(lines):  # (id, line) of the whole JSON lines; launch.execute reports the
            for line in lines:  # others (and a cut-off last line is redone)
                try:
                    yield json.loads(line)["id"], line if line.endswith("\n") else line + "\n"
                except (ValueError, KeyError, TypeError):
                    continue
        lines_of = lambda path: path.read_text().splitlines(keepends=True)  # noqa: E731
        mine = {pid for pid, _ in parsed(share)}
        kept = list(parsed(lines_of(out))) if out.exists() else []
        have = {pid for pid, _ in kept}
        add = [(pid, line) for pid, line in parsed(lines_of(merged))
               if pid in mine and pid not in have]
        if add:
            atomic.write_text(out, "".join(line for _, line in kept + add))

    def _merge_executed(self) -> None:
        """executed.jsonl from the hosts' shares, in samples.jsonl's order."""
        done = {}  # id -> the line as launch.execute wrote it
        for i in range(self.hosts.count):
            tag = multihost.Hosts(i, self.hosts.count).tag
            with open(self.w / "execute_shards" / f"executed-{tag}.jsonl") as f:
                for line in f:
                    if line.strip():
                        done[json.loads(line)["id"]] = line if line.endswith("\n") \
                            else line + "\n"
        order = [r["id"] for r in jsonl.records(self.w / "samples.jsonl")]
        missing = [pid for pid in order if pid not in done]
        if missing:
            raise StageFailed(f"stage execute: {len(missing)} problems of samples.jsonl have no "
                              f"result in {self.w / 'execute_shards'} (first: {missing[0]!r})")
        atomic.write_text(self.w / "executed.jsonl",
                          "".join(done[pid] for pid in order))

    def pairs(self):
        out_dir = self.w / "pairs"
        b = self.cfg.build
        shared = ["--tokenizer", self.tokenizer, f"--config.max_len={self.cfg.max_len}",
                  f"--config.ranker={b.ranker}", f"--config.lam={b.lam}",
                  f"--config.val_fraction={b.val_fraction}", f"--config.truncated={b.truncated}",
                  f"--config.response={b.response}", f"--config.append_eos={b.append_eos}",
                  *self.prompt_format(), "--noprogress"]
        for method in sorted(set(self.cfg.get("methods", ())) & set(SFT_DATA_METHODS)):
            # The same ranking and verdicts as the pairs: every correct sample, no selection.
            rft_dir = self.w / SFT_DATA_METHODS[method]
            self._build(method, rft_dir, "--config.emit=rft", *shared)
            built = json.loads((rft_dir / "manifest.json").read_text())["counts"]
            if built["records_out"]["train"] < self.cfg.train.batch_size:
                raise StageFailed(
                    f"stage pairs: {built['records_out']['train']} {method} training records "
                    f"(correct samples), fewer than one batch ({self.cfg.train.batch_size}); "
                    f"details: {rft_dir}/manifest.json, {rft_dir}/drops-*.jsonl")
        self._build("pairs", out_dir, f"--config.train_pairs={b.train_pairs}",
                    f"--config.val_pairs={b.val_pairs}", *shared)
        # Training needs a batch of pairs; say why there are too few here rather than let
        # every training run fail on it (a policy that writes no program, or no mixed
        # verdicts, gives none).
        counts = json.loads((out_dir / "manifest.json").read_text())["counts"]
        built = counts["records_out"]["train"]
        if built < self.cfg.train.batch_size:
            drops = collections.Counter(
                r["reason"] for path in sorted(out_dir.glob("drops-*.jsonl"))
                for r in jsonl.records(path))
            raise StageFailed(
                f"stage pairs: {built} training pairs from {counts['lines_in']} prompts, fewer "
                f"than one batch ({self.cfg.train.batch_size}); dropped lines by reason "
                f"{dict(drops)}, filtered candidate pairs {counts['candidate_pairs_filtered']} "
                f"(details: {out_dir}/drops-*.jsonl, {self.w / 'executed.jsonl'})")

    def _build(self, part: str, out: pathlib.Path, *args) -> None:
        """launch.build of executed.jsonl into `out`; on several hosts each builds its shard
        (input lines i, i + n, ...) into `out` and process 0 merges the shards' manifests
        (the global selection: the same pairs whatever the number of shards)."""
        if self.sync is None:
            if out.exists():
                shutil.rmtree(out)
            self.run("pairs", "launch.build", "--input", self.w / "executed.jsonl",
                     "--out", out, *args)
            return
        if not self.my_share_done("pairs", part):  # `_begin` removed `out` unless resuming
            h = self.hosts
            self.run("pairs", "launch.build", "--input", self.w / "executed.jsonl",
                     "--out", out, *args, f"--config.shard_index={h.index}",
                     f"--config.num_shards={h.count}")
            self.mark_share_done("pairs", part)
        self.barrier(f"pairs.{part}.merge",
                     lambda: self.run("pairs", "launch.build", "--out", out, "--merge"))

    def reference(self):
        out = self.w / "pairs_ref"
        self.clear("reference", out)
        # The train stage's config (model, compute dtype, chunk, mesh): launch.train checks
        # the provenance this writes against its own.
        self.run("reference", "launch.precompute_ref", "--out", out,
                 f"--config=configs/focused_dpo.py:model={self.start_model},"
                 f"data={self.w / 'pairs'}",
                 f"--config.model.compute_dtype={COMPUTE_DTYPE}",
                 f"--config.mesh_shape={tuple(self.cfg.mesh_shape)}", *self.process_flags())

    def train(self):
        t = self.cfg.train
        for name, method, seed, w in self.runs():
            if (self.w / "train" / name / "final" / "fdpo_model.json").exists():
                continue
            # Per-method learning rate and NLL weight, where the config sets them.
            own = self.cfg.method_train.get(method, {})
            lr, nll = own.get("lr", t.lr), own.get("nll_weight", t.nll_weight)
            extra = [f"--config.loss.w_focused={w if w is not None else t.w_focused}"]
            sft = METHOD_PRESETS[method] == "sft"  # NLL alone: no reference, no NLL weight
            if nll and not sft:
                extra.append(f"--config.loss.nll_weight={nll}")
            data = (self.w / SFT_DATA_METHODS[method] if method in SFT_DATA_METHODS
                    else self.w / "pairs_ref")
            self._train("train", self.w / "train" / name, self.start_model, data,
                        preset=METHOD_PRESETS[method], steps=t.steps, batch_size=t.batch_size,
                        lr=lr, warmup=t.warmup_steps, seed=seed,
                        reference=("frozen" if method in FROZEN_REFERENCE_METHODS
                                   or method in SFT_DATA_METHODS else "precomputed"),
                        extra=extra)

    def models(self):
        """(name, checkpoint) of everything evaluated: the start and every trained run."""
        out = [("warm_start" if self.cfg.warm_start.enabled else "init", self.start_model)]
        out += [(name, self.w / "train" / name / "final") for name, *_ in self.runs()]
        return out

    def benchmarks(self):
        """(name, benchmark, dataset file or '') evaluated for every model."""
        if self.cfg.toy.enabled:
            return [(split, "evalplus", str(self.toy_dir / f"eval_{split}.jsonl"))
                    for split in TOY_EVAL_SPLITS[self.cfg.toy.family]]
        return [tuple(b) for b in self.cfg.evaluate.benchmarks]

    def evaluate(self):
        e = self.cfg.evaluate
        for name, ckpt in self.models():
            for bench_name, benchmark, dataset in self.benchmarks():
                out = self.w / "eval" / name / bench_name
                if (out / "results.json").exists():
                    continue
                self.run("evaluate", "launch.evaluate", "--benchmark", benchmark,
                         *(["--dataset", dataset] if dataset else []), "--checkpoint", ckpt,
                         "--out", out,
                         f"--config.response_format={self.cfg.sample.response_format}",
                         "--config.temperature=0.0",
                         f"--config.max_new_tokens={e.max_new_tokens}",
                         *([f"--config.workers={e.workers}"] if e.workers else []),
                         "--config.k=(1,)", f"--config.min_time_limit={e.min_time_limit}",
                         *self.prompt_format(), *self.jax_flags())

    def analyze(self):
        continuation = []
        if self.cfg.analysis.continuation:
            continuation = ["--checkpoint", self.start_model, "--config.continuation=True",
                            f"--config.num_continuations={self.cfg.analysis.num_continuations}",
                            f"--config.max_new_tokens={self.cfg.sample.max_new_tokens}",
                            f"--config.response_format={self.cfg.sample.response_format}",
                            f"--config.timeout={self.cfg.execute.timeout}",
                            *self.prompt_format(), *self.jax_flags()]
        # The miniature's records name their right tests (tests_correct): correctness is
        # passing all of them, and they judge continuations. A real run has no ground truth:
        # correctness as the data stage decides it (ranked), and continuations judged by the
        # tests its top-ranked code passes (data_tools.analyze.judging_tests), with the
        # build's ranker and lambda, so the reference pair is the one the builder would pick.
        self.analyze_files("analyze", self.w / "executed.jsonl", self.w / "analysis",
                           *continuation)

    def analyze_files(self, stage: str, executed, out, *extra) -> None:
        """launch.analyze (the Phi table) of executed samples into `out`, judged as the
        run's data stage judges them."""
        b = self.cfg.build
        verdict = "all_tests" if self.cfg.tests_source == "oracle" else "ranked"
        self.run(stage, "launch.analyze", "--samples", executed,
                 f"--config.verdict={verdict}", f"--config.ranker={b.ranker}",
                 f"--config.lam={b.lam}", "--out", out, *extra)

    def report(self):
        self.run("report", "launch.report", "--workdir", self.w)

    def check_inputs(self) -> None:
        check_inputs(self.cfg)

    def all(self):
        """Every stage in order (skipping those done earlier with the same fingerprint); the
        config beside them once every stage matches it. On several hosts, first the check
        that they all see this work directory (multihost.connect)."""
        self.check_inputs()
        if self.hosts.count == 1:
            return self._all()
        print(f"[pipeline] process {self.hosts.index} of {self.hosts.count}: checking that "
              f"every host sees {self.w}", flush=True)
        self.sync = multihost.connect(self.w, self.hosts, host_timeout=self.host_timeout)
        try:
            self._all()
        except BaseException as e:
            self.sync.fail(f"{type(e).__name__}: {e}")  # the others stop waiting for us
            raise
        finally:
            self.sync.close()

    def _all(self):
        config_file = self.w / "pipeline_config.json"
        config_text = self.cfg.to_json(indent=2) + "\n"

        def drop_stale_config():
            stale = [n for n in self.enabled() if not self.current(n)]
            if stale and config_file.exists() and config_file.read_text() != config_text:
                # Until those stages ran with this config, neither config describes the
                # workdir.
                config_file.unlink()
                print(f"[pipeline] {config_file.name} removed until {', '.join(stale)} match "
                      "the new config")
        self.barrier("config", drop_stale_config)
        start = time.time()
        for name in self.enabled()[:-1]:
            self.stage(name, getattr(self, name))
        behind = [n for n in self.enabled()[:-1] if not self.current(n)]
        if behind:  # only with --only
            print(f"[pipeline] report: not run, and {config_file.name} not written: "
                  f"{', '.join(behind)} did not run with this config")
            return

        def write_config():
            atomic.write_text(config_file, config_text)
            atomic.write_text(self.w / "timings.json", json.dumps(self.timings, indent=2) + "\n")
        self.barrier("finish", write_config)
        self.stage("report", self.report)
        print(f"[pipeline] finished in {time.time() - start:.0f} s; report: "
              f"{self.w / 'report' / 'report.md'}")
