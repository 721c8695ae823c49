"""LiveCodeBench format on hand-written fixtures (functional and stdin problems, difficulty
labels, compressed private tests) and the `launch.evaluate` program end to end."""
import base64
import collections
import dataclasses
import gzip
import inspect
import json
import pickle
import zlib

import pytest

from configs import evaluate as evaluate_config
from fdpo.evaluation import runner as rn
from fdpo.evaluation import tasks as tk
from fdpo.testing import build_tiny_tokenizer, make_hf_model

from tests.conftest import REPO, SHARED, run_program

pytestmark = [pytest.mark.torch, pytest.mark.sandbox]

FIXTURE = REPO / "tests/data/lcb_fixture.jsonl"
CFG = rn.RunConfig(policy=tk.TimePolicy(lcb_timeout_s=1.0), workers=2)

TWO_SUM = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
           "        seen = {}\n        for i, x in enumerate(nums):\n"
           "            if target - x in seen:\n                return (seen[target - x], i)\n"
           "            seen[x] = i\n")
SUM = "n = int(input())\nprint(sum(map(int, input().split())))\n"
SUM_MAIN = ("import sys\ndef main():\n    data = sys.stdin.buffer.read().split()\n"
            "    sys.stdout.write(str(sum(map(int, data[1:]))) + '\\n')\n"
            "if __name__ == '__main__':\n    main()\n")
HALVES = "a, b = map(int, input().split())\nprint(f'{a / b:.2f}', b / a)\n"


def test_loads_fixture():
    tasks = tk.load_lcb(FIXTURE)
    assert {t: (v.testtype, v.difficulty, len(v.tests)) for t, v in tasks.items()} == {
        "lcb-func-1": ("functional", "easy", 3),   # 1 public + 2 compressed private
        "lcb-stdin-1": ("stdin", "medium", 3), "lcb-stdin-2": ("stdin", "hard", 2)}
    assert tasks["lcb-func-1"].entry_point == "twoSum"


def test_refuses_pickled_objects(tmp_path):
    row = json.loads(FIXTURE.read_text().splitlines()[0])
    # any class (os.system in an attack) needs find_class, which is refused
    row["private_test_cases"] = base64.b64encode(zlib.compress(pickle.dumps(
        collections.OrderedDict(a=1)))).decode()
    path = tmp_path / "evil.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(tk.DataError, match="refusing to unpickle"):
        tk.load_lcb(path)


def test_verdicts_and_difficulty_breakdown():
    tasks = tk.load_lcb(FIXTURE)
    samples = [
        rn.Sample("lcb-func-1", TWO_SUM),                                # tuple -> list: ok
        rn.Sample("lcb-func-1", TWO_SUM.replace("return (seen[target - x], i)",
                                                "return [i, seen[target - x]]")),  # wrong
        rn.Sample("lcb-stdin-1", SUM),
        rn.Sample("lcb-stdin-1", SUM_MAIN),                              # __main__, buffer
        rn.Sample("lcb-stdin-1", "while True:\n    pass\n"),             # timeout
        rn.Sample("lcb-stdin-1", "print(6)\n"),                          # wrong on private
        rn.Sample("lcb-stdin-2", HALVES),                                # 0.50 == 0.5
        rn.Sample("lcb-stdin-2", "print('0.5 2.0')\n"),
    ]
    recs = rn.run(tasks, samples, "livecodebench", CFG)
    assert [r["all_status"] for r in recs] == [
        "pass", "fail", "pass", "pass", "timeout", "fail", "pass", "fail"], \
        [r["all_detail"] for r in recs]
    s = rn.summarize(tasks, recs, "livecodebench", ks=(1, 2))
    assert s["pass_at_k"]["easy"] == {"pass@1": 0.5, "pass@2": 1.0}
    assert s["pass_at_k"]["medium"] == {"pass@1": 0.5, "pass@2": pytest.approx(5 / 6)}
    assert s["pass_at_k"]["hard"] == {"pass@1": 0.5, "pass@2": 1.0}
    assert s["status_counts"]["all"]["timeout"] == 1


def run_cli(*args):
    return run_program("launch.evaluate", *args, check=False)


def test_cli_samples_mode(tmp_path):
    tasks, _ = tk.load_tasks("humaneval+", data_dir=SHARED / "data")
    lines = []
    for tid in ("HumanEval/0", "HumanEval/2"):
        t = tasks[tid]
        lines.append({"task_id": tid, "completion": t.reference[len(t.prompt):]})
        lines.append({"task_id": tid, "solution": t.prompt + "    return None\n"})
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    r = run_cli("--benchmark=humaneval+", f"--samples={samples}", f"--out={out}",
                "--config.partial=True", "--config.workers=2", "--config.k=(1,2)")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["pass_at_k"] == {"base": {"pass@1": 0.5, "pass@2": 1.0},
                                "plus": {"pass@1": 0.5, "pass@2": 1.0}}
    assert res["partial"] and res["num_samples"] == 4 and len(res["dataset_sha256"]) == 64
    assert [e["base_status"] for e in res["eval"]["HumanEval/0"]] == ["pass", "fail"]
    md = (out / "tasks.md").read_text().splitlines()
    assert md[0].startswith("| task_id | n | base_correct | plus_correct")
    assert md[2].startswith("| HumanEval/0 | 2 | 1 | 1 | pass:1 fail:1")
    assert (out / "tasks.csv").read_text().splitlines()[1].startswith("HumanEval/0,2,1,1,")
    # without --config.partial, 162 tasks without samples are an error
    r = run_cli("--benchmark=humaneval+", f"--samples={samples}", f"--out={out}")
    assert r.returncode != 0 and "have no samples" in r.stderr


def test_cli_errors(tmp_path):
    r = run_cli("--benchmark=mbpp+", f"--dataset={tmp_path}/nope.jsonl.gz",
                f"--samples={tmp_path}/s.jsonl", f"--out={tmp_path}/o")
    assert r.returncode != 0 and "dataset file not found" in r.stderr
    r = run_cli("--benchmark=livecodebench", f"--samples={tmp_path}/s.jsonl",
                f"--out={tmp_path}/o")
    assert r.returncode != 0 and "livecodebench needs --dataset" in r.stderr
    r = run_cli("--benchmark=humaneval+", f"--samples={tmp_path}/s.jsonl",
                f"--out={tmp_path}/o", "--config.isolation=docker")
    assert r.returncode != 0 and "--config.isolation='docker'; expected one of" in r.stderr


def test_evaluate_config_defaults_agree_with_the_library():
    """configs/evaluate.py spells the defaults out (configs import only ml_collections); they
    must be RunConfig's, TimePolicy's (under the program's names) and runner.evaluate's."""
    c = evaluate_config.get_config()
    run = rn.RunConfig()
    assert (c.workers, c.isolation, c.memory_mb) == (run.workers, run.isolation, run.memory_mb)
    assert dataclasses.asdict(run.policy) == {
        "floor_s": c.min_time_limit, "factor": c.time_limit_factor, "budget_s": c.split_budget,
        "lcb_timeout_s": c.lcb_timeout}
    params = inspect.signature(rn.evaluate).parameters
    assert (c.k, c.partial) == (tuple(params["ks"].default), params["partial"].default)


def test_cli_generates_with_a_policy(tmp_path):
    """--hf_dir: the policy writes the samples; in the completion format each program is the
    task's prompt + the model's continuation, and results.json records how it was asked."""
    hf = build_tiny_tokenizer(tmp_path / "hf", chat_template=False)
    make_hf_model(hf, "qwen2", vocab_size=400, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    with gzip.open(SHARED / "data/evalplus/HumanEvalPlus-v0.1.10.jsonl.gz", "rt") as f:
        rows = [row for row in map(json.loads, f) if row["task_id"] in ("HumanEval/0",
                                                                        "HumanEval/2")]
    dataset = tmp_path / "two.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts = {row["task_id"]: row["prompt"] for row in rows}
    out = tmp_path / "out"
    r = run_cli("--benchmark=humaneval+", f"--dataset={dataset}", f"--hf_dir={hf}",
                f"--out={out}", "--config.response_format=completion", "--config.n=2",
                "--config.temperature=0", "--config.max_new_tokens=4", "--config.workers=2",
                "--config.k=(1,)", "--config.min_time_limit=1",
                # Unsanitised, so the prompt + continuation can be checked as written
                # (sanitize: tests/fdpo/test_extract.py, with the default config).
                "--config.sanitize=False")
    assert r.returncode == 0, r.stderr[-2000:]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["HumanEval/0"] * 2 + ["HumanEval/2"] * 2
    for s in samples:
        assert s["solution"].startswith(prompts[s["task_id"]])
    assert samples[0] == samples[1]  # greedy
    res = json.loads((out / "results.json").read_text())
    assert res["num_samples"] == 4
    assert {k: res["generation"][k] for k in ("response_format", "prompt_format", "n",
                                              "sanitize")} == {
        "response_format": "completion", "prompt_format": "plain", "n": 2, "sanitize": False}
