"""Resume by content (issue 15): a rerun keeps exactly the records and pipeline stages whose
inputs did not change, redoes the others, and says how many of each and why.

Changed here, one at a time: one code, one test, the execution limits, one prompt,
`num_codes`, the temperature, the model (`hf_dir`), the prompts file and other config
fields. The expected counts are written out per case; the redone records are checked
against a fresh run on the new inputs, the kept ones byte for byte.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import pytest

from configs import real, sample as sample_config, toy
from fdpo import fingerprint, jsonl, pipeline, problem, selfgen, sharding
from fdpo.policy import Policy
from fdpo.sandbox import executor, files
from fdpo.testing import build_tiny_tokenizer, make_hf_model

ONE_DEVICE = sharding.make_mesh((1, 1, 1), jax.devices()[:1])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def by_id(path) -> dict[str, str]:
    """{id: the line as written}: kept records must keep their bytes."""
    return {json.loads(line)["id"]: line for line in path.read_text().splitlines()}


# ------------------------------------------------------------------------------ fingerprints


def test_changes_names_the_components_and_fields_that_differ():
    old = {"prompt": "a1", "config": {"temperature": 1.0, "num_codes": 2}, "model": "m"}
    new = {"prompt": "a2", "config": {"temperature": 0.5, "num_codes": 2}, "model": "m"}
    assert fingerprint.changes(old, new) == ["prompt", "config.temperature"]
    assert fingerprint.changes(old, old) == []
    assert fingerprint.changes(None, new) == ["no fingerprint"]
    # Digests are of the value, not of how it is spelt (key order).
    assert fingerprint.digest({"a": 1, "b": [2]}) == fingerprint.digest({"b": [2], "a": 1})
    assert fingerprint.digest("x") != fingerprint.digest("y")


# ------------------------------------------------------------------------------ execute


def record(pid, programs, tests):
    """A problem record as launch.sample writes it (fdpo/problem.py)."""
    return {"version": problem.VERSION, "id": pid, "problem": f"Write f ({pid}).",
            "prompt": f"Write f ({pid}).", "response_format": "code_block",
            "samples": [{"response": f"```python\n{p}```", "response_ids": [1, 2],
                         "program": p, "finish": "eos"} for p in programs],
            "tests": tests}


RECORDS = [record("a", ["def f(x): return x + 1\n", "def f(x): return x\n"],
                  ["assert f(1) == 2", "assert f(0) == 0"]),
           record("b", ["def f(x): return 2 * x\n"], ["assert f(2) == 4", "assert f(0) == 1"]),
           record("c", ["def f(x): return -x\n"], ["assert f(1) == -1"])]


def execute(inp, out, timeout=5.0):
    return files.execute_file(inp, out, executor.Limits(timeout_s=timeout), workers=2,
                              progress=False)


@pytest.mark.sandbox
def test_execute_output_is_in_input_order_whatever_the_finishing_order(tmp_path,
                                                                       monkeypatch):
    """Results are appended as they finish; the finished file is in the input's order, so
    the same input gives the same executed.jsonl (launch.build numbers pairs by line)."""
    slow = record("slow", ["import time\ntime.sleep(1.0)\ndef f(x): return x\n"],
                  ["assert f(1) == 1"])
    rows = [slow] + RECORDS  # the first input finishes last on 2 workers
    inp, out = tmp_path / "samples.jsonl", tmp_path / "executed.jsonl"
    write_jsonl(inp, rows)
    appended = []
    real_write = jsonl.Appender.write
    monkeypatch.setattr(jsonl.Appender, "write", lambda self, obj: (
        appended.append(obj["id"]), real_write(self, obj))[1])
    assert execute(inp, out)["new"] == 4
    monkeypatch.undo()
    assert appended[0] != "slow"  # finishing order is not input order...
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert ids == [r["id"] for r in rows]  # ...but the file is
    # A resumed run that runs only the slow one again ends in input order too.
    rows[0] = record("slow", ["import time\ntime.sleep(0.5)\ndef f(x): return x\n"],
                     ["assert f(1) == 1"])
    write_jsonl(inp, rows)
    summary = execute(inp, out)
    assert (summary["done"], summary["redone"]) == (3, 1)
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [r["id"] for r in rows]


@pytest.mark.sandbox
def test_execute_redoes_exactly_the_records_whose_codes_tests_or_limits_changed(tmp_path):
    inp, out = tmp_path / "samples.jsonl", tmp_path / "executed.jsonl"
    write_jsonl(inp, RECORDS)
    assert execute(inp, out)["new"] == 3
    first = by_id(out)
    assert json.loads(first["a"])["passed"] == [[True, False], [False, True]]

    def rerun(rows, **kw):
        write_jsonl(inp, rows)
        before = by_id(out)
        summary = execute(inp, out, **kw)
        after = by_id(out)
        fresh_out = tmp_path / "fresh.jsonl"
        fresh_out.unlink(missing_ok=True)
        execute(inp, fresh_out, **kw)  # what a run from nothing writes for this input
        fresh = by_id(fresh_out)
        assert set(after) == set(fresh)
        for pid in after:
            got, want = json.loads(after[pid]), json.loads(fresh[pid])
            for field in ("wall_s", "time_s", "detail"):  # timings differ run to run
                got.pop(field), want.pop(field)
            assert got == want
        kept = {pid for pid in after if before.get(pid) == after[pid]}
        return summary, kept

    # Nothing changed: everything kept, nothing run.
    summary, kept = rerun(RECORDS)
    assert (summary["done"], summary["redone"], summary["run"]) == (3, 0, 0)
    assert kept == {"a", "b", "c"}

    # One code of one record: that record alone is run again.
    changed = json.loads(json.dumps(RECORDS))
    changed[0]["samples"][1]["program"] = "def f(x): return x * 0\n"
    summary, kept = rerun(changed)
    assert (summary["done"], summary["redone"], summary["new"], summary["run"]) == (2, 1, 0, 1)
    assert kept == {"b", "c"}
    assert json.loads(by_id(out)["a"])["passed"] == [[True, False], [False, True]]

    # One test of another record.
    changed[1]["tests"][1] = "assert f(0) == 0"
    summary, kept = rerun(changed)
    assert (summary["done"], summary["redone"], summary["run"]) == (2, 1, 1)
    assert kept == {"a", "c"} and json.loads(by_id(out)["b"])["passed"] == [[True, True]]

    # The limits: every verdict was reached under the old ones.
    summary, kept = rerun(changed, timeout=3.0)
    assert (summary["done"], summary["redone"], summary["run"]) == (0, 3, 3) and kept == set()
    assert json.loads(by_id(out)["c"])[files.FINGERPRINT_FIELD]["limits"]["timeout_s"] == 3.0

    # A record gone from the input: its result goes too (nothing else is touched).
    summary, kept = rerun(changed[:2], timeout=3.0)
    assert (summary["done"], summary["dropped"], summary["run"]) == (2, 1, 0)
    assert kept == {"a", "b"}


@pytest.mark.sandbox
def test_execute_says_what_it_kept_and_redid(tmp_path, capsys):
    inp, out = tmp_path / "samples.jsonl", tmp_path / "executed.jsonl"
    write_jsonl(inp, RECORDS)
    execute(inp, out)
    changed = json.loads(json.dumps(RECORDS))
    changed[2]["tests"] = ["assert f(2) == -2"]
    write_jsonl(inp, changed)
    capsys.readouterr()
    execute(inp, out)
    assert (f"{out}: 2 records kept, 1 redone (1: changed tests), 0 new"
            in capsys.readouterr().err)


# ------------------------------------------------------------------------------ sample

PROMPTS = [{"id": "p0", "prompt": "Write a function add(a, b)."},
           {"id": "p1", "prompt": "Write is_even(n).", "extra": "passed through"},
           {"id": "p2", "prompt": "Return the maximum of a list."}]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Two tiny models with the same tokenizer and different weights."""
    dirs = []
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"hf{seed}")
        build_tiny_tokenizer(d, chat_template=True)
        make_hf_model(d, "qwen2", seed=seed, vocab_size=400, tie_word_embeddings=True)
        dirs.append(d)
    return dirs


def config(**changes):
    c = sample_config.get_config()
    c.update(dict(num_codes=2, num_tests=1, max_new_tokens=6, temperature=1.0, batch_size=8,
                  length_bucket=32))
    c.update(changes)
    return c


@pytest.mark.slow
@pytest.mark.torch
def test_sample_redoes_exactly_the_records_whose_prompt_config_or_model_changed(hf_dirs,
                                                                               tmp_path):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "samples.jsonl"
    policies = {}

    def load(hf):
        def load_policy():
            if hf not in policies:
                policies[hf] = Policy.load(ONE_DEVICE, hf_dir=str(hf), length_bucket=32)
            return policies[hf]
        return load_policy

    def rerun(prompts, hf=hf_dirs[0], **changes):
        write_jsonl(inp, prompts)
        before = by_id(out) if out.exists() else {}
        summary = selfgen.sample_file(inp, out, config(**changes), load(hf))
        after = by_id(out)
        fresh_out = tmp_path / "fresh.jsonl"
        fresh_out.unlink(missing_ok=True)
        selfgen.sample_file(inp, fresh_out, config(**changes), load(hf))
        # Kept and redone records alike are what a run from nothing writes.
        assert {k: json.loads(v) for k, v in after.items()} == \
            {k: json.loads(v) for k, v in by_id(fresh_out).items()}
        kept = {pid for pid in after if before.get(pid) == after[pid]}
        return summary, kept, {pid: json.loads(line) for pid, line in after.items()}

    summary, kept, recs = rerun(PROMPTS)
    assert (summary["new"], summary["sampled"]) == (3, 3)
    fp = recs["p1"][selfgen.FINGERPRINT_FIELD]
    assert fp["config"]["temperature"] == 1.0 and fp["model"]["prompt_format"] == "chat_template"

    summary, kept, _ = rerun(PROMPTS)
    assert (summary["done"], summary["sampled"]) == (3, 0) and kept == {"p0", "p1", "p2"}

    # One prompt: its record alone.
    prompts = json.loads(json.dumps(PROMPTS))
    prompts[1]["prompt"] = "Write is_odd(n)."
    summary, kept, recs = rerun(prompts)
    assert (summary["done"], summary["redone"], summary["sampled"]) == (2, 1, 1)
    assert kept == {"p0", "p2"} and recs["p1"]["problem"] == "Write is_odd(n)."

    # A field passed through into the record is part of what produced it.
    prompts[2]["difficulty"] = "easy"
    summary, kept, recs = rerun(prompts)
    assert (summary["redone"], kept) == (1, {"p0", "p1"})
    assert recs["p2"]["difficulty"] == "easy"

    # num_codes: every record (each has one sample more now).
    summary, kept, recs = rerun(prompts, num_codes=3)
    assert (summary["done"], summary["redone"], kept) == (0, 3, set())
    assert all(len(r["samples"]) == 3 for r in recs.values())

    # The temperature: every record.
    summary, kept, recs = rerun(prompts, num_codes=3, temperature=0.7)
    assert (summary["done"], summary["redone"], kept) == (0, 3, set())

    # Settings that do not change a sample (the batch size) redo nothing.
    summary, kept, _ = rerun(prompts, num_codes=3, temperature=0.7, batch_size=16)
    assert (summary["done"], summary["sampled"]) == (3, 0)

    # Another model (hf_dir): every record. The same weights at another path: none.
    summary, kept, recs = rerun(prompts, hf=hf_dirs[1], num_codes=3, temperature=0.7)
    assert (summary["done"], summary["redone"], kept) == (0, 3, set())
    moved = tmp_path / "moved"
    shutil.copytree(hf_dirs[1], moved)
    summary, kept, _ = rerun(prompts, hf=moved, num_codes=3, temperature=0.7)
    assert (summary["done"], summary["sampled"]) == (3, 0)

    # A prompt gone from the input: its record goes, the others stay.
    summary, kept, _ = rerun(prompts[:2], hf=moved, num_codes=3, temperature=0.7)
    assert (summary["done"], summary["dropped"], kept) == (2, 1, {"p0", "p1"})


# ------------------------------------------------------------------------------ pipeline


def fake_pipeline(cfg, w, fail=()):
    """A Pipeline whose stages record that they ran instead of running programs."""
    p = pipeline.Pipeline(cfg, w)
    p.ran = []

    def make(name):
        def run():
            if name in fail:
                raise pipeline.StageFailed(f"stage {name}: failed on purpose")
            p.ran.append(name)
        return run

    for name in pipeline.STAGES:
        setattr(p, name, make(name))
    return p


def real_config(tmp_path, hf="hf", **changes):
    c = real.get_config(f"hf_dir={tmp_path / hf},prompts={tmp_path / 'prompts.jsonl'}")
    for dotted, value in changes.items():
        group, _, key = dotted.rpartition(".")
        (c[group] if group else c)[key] = value
    return c


# After a change of ..., the stages that run again (configs/real.py: no warm start).
AFTER_SAMPLE = ["sample", "execute", "pairs", "reference", "train", "evaluate", "analyze",
                "report"]
CASES = [
    ("nothing", {}, []),
    ("hf_dir", {"hf": "hf2"}, ["init"] + AFTER_SAMPLE),
    ("one prompt", {"prompt": "Write g."}, AFTER_SAMPLE),
    ("num_codes", {"sample.num_codes": 3}, AFTER_SAMPLE),
    ("temperature", {"sample.temperature": 0.8}, AFTER_SAMPLE),
    ("execute.timeout", {"execute.timeout": 3.0},
     ["execute", "pairs", "reference", "train", "evaluate", "analyze", "report"]),
    ("build.lam", {"build.lam": 0.5},
     ["pairs", "reference", "train", "evaluate", "analyze", "report"]),
    ("train.lr", {"train.lr": 1e-6}, ["train", "evaluate", "report"]),
    ("evaluate.max_new_tokens", {"evaluate.max_new_tokens": 99}, ["evaluate", "report"]),
    ("workers, mesh", {"execute.workers": 3, "mesh_shape": (1, 1, -1)}, []),
]


@pytest.mark.parametrize("what,change,expected", CASES, ids=[c[0] for c in CASES])
def test_pipeline_reruns_the_stage_a_change_affects_and_every_stage_after_it(
        tmp_path, capsys, what, change, expected):
    for hf in ("hf", "hf2"):
        (tmp_path / hf).mkdir()
        (tmp_path / hf / "config.json").write_text(json.dumps({"model": hf}))
    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    w = tmp_path / "run"
    first = fake_pipeline(real_config(tmp_path), w)
    first.all()
    assert first.ran == first.enabled()
    # Outputs a stage would skip work by are removed when it reruns for changed inputs.
    (w / "train" / "dpo-s0" / "final").mkdir(parents=True)

    change = dict(change)
    if "prompt" in change:
        rows = json.loads(json.dumps(PROMPTS))
        rows[1]["prompt"] = change.pop("prompt")
        write_jsonl(tmp_path / "prompts.jsonl", rows)
    capsys.readouterr()
    again = fake_pipeline(real_config(tmp_path, **change), w)
    again.all()
    assert again.ran == expected
    printed = capsys.readouterr().out
    assert printed.count("done earlier, skipped") == len(first.ran) - len(expected)
    assert (w / "train" / "dpo-s0" / "final").exists() == ("train" not in expected)
    if what == "hf_dir":
        assert "[pipeline] init: rerun, changed since it ran: init.hf_dir, init.hf_files" in printed
        assert "[pipeline] sample: rerun, changed since it ran: upstream init" in printed
        assert json.loads((w / "stages" / "init.json").read_text())["inputs"][
            "init.hf_dir"] == str(tmp_path / "hf2")
    if what == "one prompt":
        assert "[pipeline] sample: rerun, changed since it ran: prompts_file" in printed
    if what == "temperature":
        assert "[pipeline] sample: rerun, changed since it ran: sample.temperature" in printed


def test_pipeline_config_never_claims_a_model_the_stages_did_not_use(tmp_path):
    for hf in ("hf", "hf2"):
        (tmp_path / hf).mkdir()
        (tmp_path / hf / "config.json").write_text(json.dumps({"model": hf}))
    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    w = tmp_path / "run"
    fake_pipeline(real_config(tmp_path), w).all()
    claimed = lambda: json.loads((w / "pipeline_config.json").read_text())["init"]["hf_dir"]
    assert claimed() == str(tmp_path / "hf")

    # Another model whose sampling fails: the init stage used it, sampling did not; the
    # config file is gone rather than claiming either model for the whole workdir.
    with pytest.raises(pipeline.StageFailed):
        fake_pipeline(real_config(tmp_path, hf="hf2"), w, fail=("sample",)).all()
    assert not (w / "pipeline_config.json").exists()
    # A rerun completes the stages left (init is done with hf2) and writes the config.
    p = fake_pipeline(real_config(tmp_path, hf="hf2"), w)
    p.all()
    assert p.ran == AFTER_SAMPLE and claimed() == str(tmp_path / "hf2")

    # Back to the first model: init and everything after it run again.
    p = fake_pipeline(real_config(tmp_path), w)
    p.all()
    assert p.ran == ["init"] + AFTER_SAMPLE and claimed() == str(tmp_path / "hf")


def test_an_interrupted_stage_resumes_and_keeps_its_outputs(tmp_path, capsys):
    w = tmp_path / "run"
    (tmp_path / "hf").mkdir()
    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    with pytest.raises(pipeline.StageFailed):
        fake_pipeline(real_config(tmp_path), w, fail=("train",)).all()
    (w / "train" / "dpo-s0" / "final").mkdir(parents=True)  # a run the stage finished
    p = fake_pipeline(real_config(tmp_path), w)
    p.all()
    assert p.ran == ["train", "evaluate", "analyze", "report"]
    assert "[pipeline] train: resuming (interrupted earlier)" in capsys.readouterr().out
    assert (w / "train" / "dpo-s0" / "final").is_dir()


@pytest.mark.parametrize("cfg", [toy.get_config(), real.get_config("hf_dir=h,prompts=p")],
                         ids=["toy", "real"])
def test_every_config_field_is_an_input_of_a_stage_or_named_untracked(cfg):
    # A new config field no stage claims would change results without rerunning anything.
    def fields(c, prefix=""):
        for k, v in c.items():
            if hasattr(v, "items") and k != "method_train":  # method_train: a map, read whole
                yield from fields(v, f"{prefix}{k}.")
            else:
                yield prefix + k

    claimed = [f for names in pipeline.STAGE_INPUTS.values() for f in names]
    claimed += list(pipeline.UNTRACKED_FIELDS)
    missing = [f for f in fields(cfg)
               if not any(f == c or f.startswith(c + ".") for c in claimed)]
    assert missing == []


def test_markers_without_fingerprints_rerun_their_stages(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    w = tmp_path / "run"
    fake_pipeline(real_config(tmp_path), w).all()
    (w / "train" / "dpo-s0" / "final").mkdir(parents=True)
    for marker in (w / "stages").iterdir():  # a workdir of an fdpo before fingerprints
        marker.write_text(json.dumps({"seconds": 1.0, "finished": "x"}))
    capsys.readouterr()
    p = fake_pipeline(real_config(tmp_path), w)
    p.all()
    assert p.ran == p.enabled()
    assert "[pipeline] train: rerun, its marker has no fingerprint (an older fdpo wrote it)" \
        in capsys.readouterr().out
    assert not (w / "train").exists()  # what it would have skipped by is gone
