"""Benchmark tasks: EvalPlus files (HumanEval(+), MBPP(+)) and LiveCodeBench problems,
and the executor tests that check a solution against them. NumPy-free, no jax.

EvalPlus format (the files the `evalplus` package downloads): one JSON object per line with
task_id, prompt, entry_point, canonical_solution, base_input, plus_input, atol (and test,
contract, assertion, unused here). MBPP+ inputs are stored as JSON, which has no tuples,
sets or complex numbers: `mbpp_inputs` restores them per task as EvalPlus's
`mbpp_deserialize_inputs` (evalplus/data/mbpp.py) does, quirks included (Mbpp/115 turns an
empty inner list into `{}`).

LiveCodeBench format (lcb_runner/benchmarks/code_generation.py): question_id,
question_title, question_content, starter_code, difficulty (easy/medium/hard), platform,
public_test_cases and private_test_cases (JSON strings of [{input, output, testtype}];
private ones may be base64(zlib(pickle(json string))), decoded here with an unpickler that
only accepts plain strings), metadata (JSON string with func_name for functional problems).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import pickle
import zlib

from fdpo import jsonl

# "evalplus": any task file in EvalPlus's format (your own tasks, or the miniature's), with
# no dataset-specific oracles; needs --dataset.
BENCHMARKS = ("humaneval", "humaneval+", "mbpp", "mbpp+", "livecodebench", "evalplus")
# The EvalPlus release files, relative to a data directory (the programs default to the
# `shared/data` folder beside the checkout).
DEFAULT_FILES = {
    "humaneval": "evalplus/HumanEvalPlus-v0.1.10.jsonl.gz",
    "humaneval+": "evalplus/HumanEvalPlus-v0.1.10.jsonl.gz",
    "mbpp": "evalplus/MbppPlus-v0.2.0.jsonl.gz",
    "mbpp+": "evalplus/MbppPlus-v0.2.0.jsonl.gz",
}
CELL_SOURCE_PATH = pathlib.Path(__file__).with_name("_cell.py")


class DataError(ValueError):
    pass


@dataclasses.dataclass
class Task:
    task_id: str
    prompt: str
    entry_point: str = ""
    reference: str = ""  # EvalPlus: prompt + canonical solution
    base_input: list = dataclasses.field(default_factory=list)
    plus_input: list = dataclasses.field(default_factory=list)
    atol: float = 0.0
    # LiveCodeBench
    difficulty: str = ""
    testtype: str = ""  # functional | stdin
    tests: list = dataclasses.field(default_factory=list)  # [(input, output)]
    starter_code: str = ""


def family(benchmark: str) -> str:
    """EvalPlus's dataset name for the oracles: humaneval, mbpp or livecodebench."""
    return benchmark.rstrip("+")


def resolve_dataset(benchmark: str, path: str | os.PathLike | None,
                    data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """`path`, or the benchmark's release file under `data_dir` when `path` is None."""
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark {benchmark!r}; one of {BENCHMARKS}")
    if path is None:
        if benchmark not in DEFAULT_FILES or data_dir is None:
            what = ("a JSONL of LiveCodeBench problems; its data is not shipped with fdpo"
                    if benchmark == "livecodebench" else "a task file in EvalPlus's format")
            raise DataError(f"{benchmark} needs --dataset PATH ({what})")
        path = pathlib.Path(data_dir) / DEFAULT_FILES[benchmark]
    path = pathlib.Path(path)
    if not path.is_file():
        hint = ""
        if benchmark in DEFAULT_FILES:
            hint = (f" (the EvalPlus release file, e.g. {pathlib.Path(DEFAULT_FILES[benchmark]).name}"
                    ", as downloaded by the evalplus package; pass it with --dataset PATH)")
        raise DataError(f"dataset file not found: {path}{hint}")
    return path


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- EvalPlus
def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def mbpp_inputs(task_id: str, inputs: list) -> list:
    """Python values of an MBPP+ task's JSON inputs (EvalPlus's per-task table)."""
    n = int(task_id.split("/")[-1])
    if n in (2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596,
             616, 630, 726, 740, 744, 809):
        return [[tuple(a) for a in inp] for inp in inputs]
    if n in (63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780):
        return [[[tuple(x) for x in a] for a in inp] for inp in inputs]
    if n in (75, 413, 444, 753):
        return [[[tuple(x) for x in inp[0]], inp[1]] for inp in inputs]
    if n in (106, 750):
        return [[inp[0], tuple(inp[1])] for inp in inputs]
    if n == 115:
        return [[[set(x) if isinstance(x, list) and x else {} for x in inp[0]]]
                for inp in inputs]
    if n == 124:
        return [(float(inp[0]), complex(inp[1])) for inp in inputs]
    if n in (250, 405, 446, 617, 720, 763, 808):
        return [[tuple(inp[0]), inp[1]] for inp in inputs]
    if n in (259, 401, 445):
        return [[tuple(tuple(x) for x in a) for a in inp] for inp in inputs]
    if n == 278:
        return [[tuple(tuple(x) if isinstance(x, list) else x for x in inp[0])]
                for inp in inputs]
    if n == 307:
        return [[tuple(inp[0]), inp[1], inp[2]] for inp in inputs]
    if n == 722:
        return [[{k: tuple(v) for k, v in inp[0].items()}] + inp[1:] for inp in inputs]
    if n == 252:
        return [[complex(inp[0])] for inp in inputs]
    if n in (580, 615, 791):
        return [_tuples(inp) for inp in inputs]
    return inputs


def load_evalplus(path, benchmark: str) -> dict[str, Task]:
    fam = family(benchmark)
    tasks = {}
    for k, row in enumerate(jsonl.records(path, error=DataError)):
        missing = [f for f in ("task_id", "prompt", "entry_point", "canonical_solution",
                               "base_input", "plus_input") if f not in row]
        if missing:
            raise DataError(f"{path}: task #{k} lacks {missing}; is this an EvalPlus file?")
        tid = row["task_id"]
        want = {"humaneval": "HumanEval/", "mbpp": "Mbpp/"}.get(fam, "")
        if not tid.startswith(want):
            raise DataError(f"{path}: task {tid!r} is not a {benchmark} task ({want}...)")
        base = row["base_input"] or []
        plus = row["plus_input"] or []  # Mbpp/793 stores {} for "no plus inputs"
        if fam == "mbpp":
            base, plus = mbpp_inputs(tid, base), mbpp_inputs(tid, plus)
        tasks[tid] = Task(
            task_id=tid, prompt=row["prompt"], entry_point=row["entry_point"],
            reference=row["prompt"] + row["canonical_solution"], base_input=list(base),
            plus_input=list(plus), atol=float(row.get("atol") or 0.0))
    if not tasks:
        raise DataError(f"{path}: no tasks")
    return tasks


# ------------------------------------------------------------------------ LiveCodeBench
class _StrOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise DataError(f"refusing to unpickle {module}.{name}: only plain strings are "
                        "accepted in private_test_cases")


def _lcb_cases(value, where):
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a JSON string or a list")
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        raw = zlib.decompress(base64.b64decode(value.encode()))
        text = _StrOnlyUnpickler(io.BytesIO(raw)).load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{where}: neither JSON nor base64/zlib/pickle ({e})") from e
    if not isinstance(text, str):
        raise DataError(f"{where}: the compressed payload is not a string")
    return json.loads(text)


def load_lcb(path) -> dict[str, Task]:
    tasks = {}
    for row in jsonl.records(path, error=DataError):
        tid = str(row.get("question_id") or row.get("task_id") or "")
        where = f"{path}: problem {tid or '?'}"
        if not tid:
            raise DataError(f"{where}: no question_id")
        cases = (_lcb_cases(row.get("public_test_cases", "[]"), where + " public_test_cases")
                 + _lcb_cases(row.get("private_test_cases", "[]"),
                              where + " private_test_cases"))
        if not cases:
            raise DataError(f"{where}: no test cases")
        types = {c.get("testtype") for c in cases}
        if len(types) != 1 or not types <= {"functional", "stdin"}:
            raise DataError(f"{where}: testtype must be one of functional/stdin, the same "
                            f"for all cases; got {sorted(map(str, types))}")
        meta = row.get("metadata") or {}
        if isinstance(meta, str):
            meta = json.loads(meta or "{}")
        testtype = types.pop()
        if testtype == "functional" and not meta.get("func_name"):
            raise DataError(f"{where}: functional problems need metadata.func_name")
        difficulty = str(row.get("difficulty", "")).lower()
        if difficulty not in ("easy", "medium", "hard"):
            raise DataError(f"{where}: difficulty must be easy/medium/hard, got {difficulty!r}")
        tasks[tid] = Task(
            task_id=tid, prompt=row.get("question_content", ""),
            entry_point=meta.get("func_name", "") if testtype == "functional" else "",
            difficulty=difficulty, testtype=testtype,
            tests=[(str(c["input"]), str(c["output"])) for c in cases],
            starter_code=row.get("starter_code", ""))
    if not tasks:
        raise DataError(f"{path}: no problems")
    return tasks


def load_tasks(benchmark: str, path=None, data_dir=None) -> tuple[dict[str, Task], pathlib.Path]:
    path = resolve_dataset(benchmark, path, data_dir)
    if benchmark == "livecodebench":
        return load_lcb(path), path
    return load_evalplus(path, benchmark), path


# ------------------------------------------------------------------- encoding of inputs
def _tag(x):
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x  # NaN / Infinity: json writes and reads them
    if isinstance(x, list):
        return [_tag(v) for v in x]
    if isinstance(x, tuple):
        return {"t": [_tag(v) for v in x]}
    if isinstance(x, frozenset):
        return {"f": [_tag(v) for v in x]}
    if isinstance(x, set):
        return {"s": [_tag(v) for v in x]}
    if isinstance(x, complex):
        return {"c": [x.real, x.imag]}
    if isinstance(x, dict):
        return {"d": [[_tag(k), _tag(v)] for k, v in x.items()]}
    raise TypeError(f"cannot encode a {type(x).__name__} test input")


def encode(value) -> str:
    """Tagged JSON that `_cell.decode` turns back into the same Python value (tuples, sets,
    frozensets, complex, dicts with any hashable keys, inf and nan included)."""
    return json.dumps(_tag(value), allow_nan=True, separators=(",", ":"))


# -------------------------------------------------------------------------------- tests
def cell_source() -> str:
    return CELL_SOURCE_PATH.read_text(encoding="utf-8")


def cell_imports() -> str:
    """The imports LiveCodeBench prepends to every program."""
    from fdpo.evaluation import _cell
    return _cell.LCB_IMPORTS


def _test_source(entry: str, spec: dict) -> str:
    # The test runs in the candidate's namespace; everything of ours lives in `_fdpo_ns`.
    return (f"_fdpo_ns = {{'__name__': '__fdpo_cell__'}}\n"
            f"exec({cell_source()!r}, _fdpo_ns)\n"
            f"_fdpo_ns[{entry!r}](globals(), {json.dumps(spec)!r})\n")


@dataclasses.dataclass(frozen=True)
class TimePolicy:
    """Per-input limit = max(floor_s, factor x the reference's time on that input, measured
    in the same cell); the candidate's summed time on one split is capped at budget_s.
    EvalPlus's defaults: floor 4 s, factor 4, budget 60 s (EVALPLUS_TIMEOUT_PER_TASK).
    LiveCodeBench: lcb_timeout_s per test (its own default 6 s)."""

    floor_s: float = 4.0
    factor: float = 4.0
    budget_s: float = 60.0
    lcb_timeout_s: float = 6.0


def evalplus_test(task: Task, benchmark: str, split: str, policy: TimePolicy) -> str:
    inputs = task.base_input if split == "base" else task.plus_input
    spec = {"dataset": family(benchmark), "entry_point": task.entry_point, "split": split,
            "reference": task.reference, "inputs": encode(inputs), "atol": task.atol,
            "floor_s": policy.floor_s, "factor": policy.factor, "budget_s": policy.budget_s}
    return _test_source("run_evalplus", spec)


def lcb_test(task: Task, solution: str, policy: TimePolicy) -> str:
    spec = {"testtype": task.testtype, "func_name": task.entry_point, "source": solution,
            "tests": task.tests, "timeout_s": policy.lcb_timeout_s}
    return _test_source("run_lcb", spec)


def splits(benchmark: str) -> tuple[str, ...]:
    if benchmark == "livecodebench":
        return ("all",)
    return ("base", "plus") if benchmark.endswith("+") else ("base",)

