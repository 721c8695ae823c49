"""Synthesis: parsing, validation and dedupe of hand-written generations; requests; CLI."""
import json
import re
import subprocess
import sys

import pytest

from configs import synthesize as syn_config
from data_tools import synthesize as S
from fdpo import jsonl

from tests.conftest import REPO

VALID = '''## Description
Given a list of integers and a window size k, return the largest sum of any k consecutive
elements. If the list has fewer than k elements, return None.

## Signature
```python
def max_window_sum(nums: list[int], k: int) -> int | None:
    """Largest sum of k consecutive elements."""
```

## Examples
```python
assert max_window_sum([1, 2, 3, 4], 2) == 7
assert max_window_sum([5], 2) is None
```
'''

LEAKED = VALID.replace('''    """Largest sum of k consecutive elements."""''', '''    if len(nums) < k:
        return None
    best = cur = sum(nums[:k])
    for i in range(k, len(nums)):
        cur += nums[i] - nums[i - k]
        best = max(best, cur)
    return best''')

LEAKED_ELSEWHERE = VALID + '''
Here is how one could solve it:
```python
def max_window_sum(nums, k):
    return max(sum(nums[i:i + k]) for i in range(len(nums) - k + 1))
```
'''

LEAKED_SECTION = VALID + "\n## Solution\nUse a sliding window over the list.\n"

BROKEN_SIGNATURE = VALID.replace("def max_window_sum(nums: list[int], k: int) -> int | None:",
                                 "def max_window_sum(nums: list[int], k: int -> int | None:")

NO_ENTRY_POINT = VALID.replace("def max_window_sum(nums: list[int], k: int) -> int | None:",
                               "max_window_sum(nums, k) -> int")

NOT_CALLING = VALID.replace("assert max_window_sum([5], 2) is None", "assert other([5], 2) is None")

BAD_EXAMPLE_SYNTAX = VALID.replace("assert max_window_sum([5], 2) is None", "max_window_sum([5], 2) -> None")

NO_EXAMPLES = VALID.split("## Examples")[0]

SHORT = VALID.replace('''Given a list of integers and a window size k, return the largest sum of any k consecutive
elements. If the list has fewer than k elements, return None.''', "Window sums.")

BARE_STYLE = '''**Description:**
Return the number of distinct words in a sentence, ignoring case and punctuation marks.

**Signature:**
def count_distinct(sentence: str) -> int:

**Examples:**
assert count_distinct("A a b.") == 2
'''

PARAPHRASE = VALID.replace("return the largest sum", "return the biggest sum")

OTHER = '''## Description
Return True when the string of brackets "()[]{}" given is balanced: every opening bracket is
closed by the matching bracket in the right order.

## Signature
```python
def balanced(s: str) -> bool: ...
```

## Examples
```python
assert balanced("([]{})")
assert not balanced("(]")
```
'''


def test_valid():
    p = S.parse_problem(VALID, concepts=["pattern:sliding_window"])
    assert isinstance(p, S.Problem)
    assert p.entry_point == "max_window_sum"
    assert p.signature == ('def max_window_sum(nums: list[int], k: int) -> int | None:\n'
                           '    """Largest sum of k consecutive elements."""')
    assert p.examples == ["assert max_window_sum([1, 2, 3, 4], 2) == 7", "assert max_window_sum([5], 2) is None"]
    assert p.description.startswith("Given a list") and p.concepts == ["pattern:sliding_window"]


def test_valid_variants():
    p = S.parse_problem(BARE_STYLE)
    assert isinstance(p, S.Problem), p
    assert p.signature == "def count_distinct(sentence: str) -> int:"
    p = S.parse_problem(OTHER)
    assert isinstance(p, S.Problem), p
    assert p.signature == "def balanced(s: str) -> bool:" and len(p.examples) == 2


@pytest.mark.parametrize("text,reason", [
    ("", S.EMPTY),
    ("   \n", S.EMPTY),
    ("just some text without sections", S.MISSING_SECTION),
    (NO_EXAMPLES, S.MISSING_SECTION),
    (LEAKED, S.SOLUTION_LEAKED),
    (LEAKED_ELSEWHERE, S.SOLUTION_LEAKED),
    (LEAKED_SECTION, S.SOLUTION_LEAKED),
    (BROKEN_SIGNATURE, S.BROKEN_SIGNATURE),
    (NO_ENTRY_POINT, S.MISSING_ENTRY_POINT),
    (NOT_CALLING, S.BAD_EXAMPLES),
    (BAD_EXAMPLE_SYNTAX, S.BAD_EXAMPLES),
    (SHORT, S.SHORT_DESCRIPTION),
])
def test_rejections(text, reason):
    r = S.parse_problem(text)
    assert isinstance(r, S.Rejection) and r.reason == reason, r
    assert not r


def test_two_defs_in_signature_is_broken():
    text = VALID.replace('    """Largest sum of k consecutive elements."""',
                         '    """Doc."""\n\ndef helper(x):\n    ...')
    r = S.parse_problem(text)
    assert r.reason == S.BROKEN_SIGNATURE


def test_example_count_limits():
    v = S.Validation(min_description_chars=10, min_examples=3, max_examples=5)
    assert S.parse_problem(VALID, v).reason == S.BAD_EXAMPLES


def test_dedupe_exact_and_near():
    probs = [S.parse_problem(t) for t in (VALID, OTHER, VALID, PARAPHRASE)]
    # Formatting-only differences are exact duplicates after normalisation.
    probs.append(S.parse_problem(VALID.replace("Given a list", "GIVEN  a list,")))
    assert all(isinstance(p, S.Problem) for p in probs)
    kept, dropped = S.dedupe(probs, n=3, threshold=0.7)
    assert kept == [0, 1]
    assert dropped == [(2, S.DUPLICATE, 0), (3, S.NEAR_DUPLICATE, 0), (4, S.DUPLICATE, 0)]
    # A strict threshold keeps the paraphrase.
    kept, _ = S.dedupe(probs, n=3, threshold=0.99)
    assert kept == [0, 1, 3]


def test_jaccard_and_ngrams():
    a = S.ngrams(S.normalise("The quick, brown fox!"), 2)
    assert a == {("the", "quick"), ("quick", "brown"), ("brown", "fox")}
    assert S.jaccard(a, a) == 1.0 and S.jaccard(set(), set()) == 1.0
    assert S.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)


def _config(**kw):
    c = syn_config.get_config()
    c.unlock()
    c.update(kw)
    return c


CONCEPTS = [{"concept": "pattern:binary_search", "kind": "pattern", "count": 30},
            {"concept": "api:collections.Counter", "kind": "api", "count": 100},
            {"concept": "construct:generator_function", "kind": "construct", "count": 5}]


def test_make_requests_deterministic_and_bounded():
    c = _config(per_concept=5)
    reqs = S.make_requests(CONCEPTS, c)
    assert len(reqs) == 15 and [r.index for r in reqs] == list(range(15))
    assert reqs[0].concepts[0] == "api:collections.Counter"  # most frequent seed first
    for r in reqs:
        assert 1 <= len(r.concepts) <= 3 and len(set(r.concepts)) == len(r.concepts)
        assert "{concepts}" not in r.prompt and "## Signature" in r.prompt
        assert all(S.describe_concept(x) in r.prompt for x in r.concepts)
    assert [r.concepts for r in S.make_requests(CONCEPTS, c)] == [r.concepts for r in reqs]
    with pytest.raises(ValueError, match="no concepts of kinds"):
        S.make_requests(CONCEPTS, _config(kinds=("nothing",)))


def test_process_generations_counts_and_format():
    c = _config(per_concept=1)
    reqs = S.make_requests(CONCEPTS, c)
    gens = [[VALID, LEAKED], [VALID, OTHER], [BROKEN_SIGNATURE, ""]]
    records, counts, rejected = S.process_generations(reqs, gens, c)
    assert counts["generations"] == 6 and counts["kept"] == 2 and counts["rejected"] == 4
    by = counts["rejected_by_reason"]
    assert by[S.SOLUTION_LEAKED] == 1 and by[S.DUPLICATE] == 1 and by[S.BROKEN_SIGNATURE] == 1 and by[S.EMPTY] == 1
    assert {(r["request"], r["sample"], r["reason"]) for r in rejected} == {
        (0, 1, S.SOLUTION_LEAKED), (1, 0, S.DUPLICATE), (2, 0, S.BROKEN_SIGNATURE), (2, 1, S.EMPTY)}
    r0 = records[0]
    assert set(r0) == {"id", "prompt", "entry_point", "signature", "concepts", "examples", "description"}
    assert r0["entry_point"] == "max_window_sum" and r0["concepts"] == reqs[0].concepts
    assert r0["id"].startswith("syn-") and len({r["id"] for r in records}) == 2
    assert r0["signature"] in r0["prompt"] and r0["examples"][0] in r0["prompt"]
    # The prompt it writes is itself a problem: the description and signature parse back.
    assert "def max_window_sum" in r0["prompt"] and r0["description"] in r0["prompt"]


@pytest.mark.slow
def test_cli_samples_with_a_tiny_model(tmp_path):
    """One real run through the sampler: a random tiny model writes (nonsense) problems,
    and every generation is accounted for as kept or rejected with a reason."""
    from fdpo.models import checkpoint
    from fdpo.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path / "tok", chat_template=True)
    checkpoint.init_random(tmp_path / "ckpt", fields={"hidden_size": 32, "num_layers": 1,
                                                      "num_heads": 2, "num_kv_heads": 1},
                           tokenizer=str(tok))
    concepts = tmp_path / "c.jsonl"
    concepts.write_text("".join(json.dumps(c) + "\n" for c in CONCEPTS))
    out = tmp_path / "p.jsonl"
    r = subprocess.run([sys.executable, "-m", "launch.synthesize", "--concepts", str(concepts),
                        "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out),
                        "--per_concept", "1", "--config.sampling.max_new_tokens=24",
                        "--save_generations", str(tmp_path / "g.jsonl")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "p.jsonl.report.json").read_text())["counts"]
    gens = [json.loads(l) for l in open(tmp_path / "g.jsonl")]
    n_texts = sum(len(g["texts"]) for g in gens)
    assert n_texts > 0 and all(isinstance(t, str) for g in gens for t in g["texts"])
    kept = sum(1 for _ in open(out))
    rejected = sum(1 for _ in open(str(out) + ".rejected.jsonl"))
    assert kept + rejected == n_texts


def test_cli_with_saved_generations_and_no_jax(tmp_path):
    concepts = tmp_path / "c.jsonl"
    concepts.write_text("".join(json.dumps(c) + "\n" for c in CONCEPTS))
    gens = tmp_path / "g.jsonl"
    texts = [[VALID], [OTHER], [LEAKED]]
    gens.write_text("".join(json.dumps({"request": i, "texts": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "p.jsonl"
    r = subprocess.run([sys.executable, "-m", "launch.synthesize", "--concepts", str(concepts),
                        "--generations", str(gens), "--out", str(out), "--per_concept", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout)
    assert counts["kept"] == 2 and counts["rejected_by_reason"]["solution_leaked"] == 1
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["entry_point"] for x in lines] == ["max_window_sum", "balanced"]
    assert (tmp_path / "p.jsonl.rejected.jsonl").read_text().count("solution_leaked") == 1
    # A missing model flag is a clear error.
    r = subprocess.run([sys.executable, "-m", "launch.synthesize", "--concepts", str(concepts),
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--checkpoint" in r.stderr + r.stdout


def test_module_imports_no_jax():
    r = subprocess.run([sys.executable, "-c", "import sys, data_tools.synthesize, data_tools.concepts; "
                        "assert 'jax' not in sys.modules, 'jax imported'"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------- decontamination

BENCH_PROMPT = '''def longest_run(values: list) -> int:
    """ Return the length of the longest run of equal adjacent values in the list, counting
    a single value as a run of one and an empty list as zero.
    >>> longest_run([1, 1, 2])
    2
    """
'''
# The benchmark's description, copied into the generation layout.
COPIED = '''## Description
Return the length of the longest run of equal adjacent values in the list, counting a single
value as a run of one and an empty list as zero.

## Signature
```python
def run_length(xs: list) -> int:
```

## Examples
```python
assert run_length([1, 1, 2]) == 2
```
'''


def _bench_file(path, prompts):
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"task_id": f"Bench/{i}", "prompt": p, "entry_point": "x"}) + "\n")
    return str(path)


def test_benchmark_overlap_hand_made(tmp_path):
    path = _bench_file(tmp_path / "bench.jsonl.gz", ["def other():\n    'Unrelated.'\n", BENCH_PROMPT])
    idx = S.benchmark_index([path], n=13)
    assert idx.files == [{"path": path, "tasks": 2}] and idx.tasks == 2
    copied, valid = S.parse_problem(COPIED), S.parse_problem(VALID)
    # The copied sentence has 29 words: 17 shared 13-grams, and 2 more that start in the def
    # line, "list int" (HumanEval order: the def line, then the description).
    assert S.benchmark_overlap(copied, idx) == ("Bench/1", 19)
    assert S.benchmark_overlap(valid, idx) is None
    assert S.benchmark_overlap(copied, idx, min_shared=20) is None  # the threshold is used
    # Word shingles of normalised text: case, punctuation and line breaks do not hide a copy.
    shouted = S.parse_problem(COPIED.replace("Return the length", "RETURN  the length,"))
    assert S.benchmark_overlap(shouted, idx) == ("Bench/1", 19)


def test_decontamination_counts_a_reason_and_runs_before_dedupe(tmp_path):
    path = _bench_file(tmp_path / "bench.jsonl", [BENCH_PROMPT])
    c = _config(per_concept=1)
    reqs = S.make_requests(CONCEPTS, c)
    gens = [[COPIED, VALID], [COPIED], [OTHER]]
    records, counts, rejected = S.process_generations(reqs, gens, c, S.benchmark_index([path]))
    assert counts["generations"] == 4 and counts["kept"] == 2
    # Both copies are benchmark overlaps; the second is not called a duplicate of the first.
    assert counts["rejected_by_reason"][S.BENCHMARK_OVERLAP] == 2
    assert counts["rejected_by_reason"][S.DUPLICATE] == 0
    assert [(r["request"], r["sample"], r["reason"]) for r in rejected] == [
        (0, 0, S.BENCHMARK_OVERLAP), (1, 0, S.BENCHMARK_OVERLAP)]
    assert "Bench/0" in rejected[0]["detail"] and "13-grams" in rejected[0]["detail"]
    assert [r["entry_point"] for r in records] == ["max_window_sum", "balanced"]
    # Without benchmark files nothing is checked.
    _, counts, _ = S.process_generations(reqs, gens, c)
    assert counts["rejected_by_reason"][S.BENCHMARK_OVERLAP] == 0
    assert counts["rejected_by_reason"][S.DUPLICATE] == 1


def test_benchmark_file_errors(tmp_path):
    with pytest.raises(ValueError, match="nope.jsonl: no such file"):
        S.benchmark_index([str(tmp_path / "nope.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "a", "prompt": "x"}) + "\n\n{oops\n")
    with pytest.raises(ValueError, match=f"--decontaminate={bad}:3: not valid JSON"):
        S.benchmark_index([str(bad)])
    bad.write_text(json.dumps({"task_id": "a", "question": "x"}) + "\n")
    with pytest.raises(ValueError, match=f"{bad}:1: expected an EvalPlus task"):
        S.benchmark_index([str(bad)])
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no tasks"):
        S.benchmark_index([str(bad)])


def test_generations_file_errors_name_the_line(tmp_path):
    gens = tmp_path / "g.jsonl"
    gens.write_bytes(b'{"request": 1, "texts": ["b"]}\n\n{"request": 0, "texts": ["a"]}\n')
    assert S.read_generations(str(gens), 2) == [["a"], ["b"]]  # blank lines skipped
    label = f"--generations={gens}"
    for content, message in [
            (b'{"request": 0, "texts": []}\n{"request": 0, "texts": ["\xff"]}\n',
             f"{label}:2: not valid UTF-8"),  # was a bare UnicodeDecodeError
            (b'{"request": 0, "texts": []}\n\n{oops\n', f"{label}:3: not valid JSON"),
            (b'{"request": "x", "texts": []}\n', f"{label}:1: expected {{'request': int"),
            (b'{"request": 2, "texts": []}\n', f"{label}:1: request 2 out of range")]:
        gens.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(message)):
            S.read_generations(str(gens), 2)


def _humaneval_copy(task: dict) -> str:
    """A generation that copies a HumanEval prompt into the synthesis layout: the docstring's
    prose as the description, the def line as the signature, a call on its first base input
    as the example."""
    import ast as ast_

    fn = next(n for n in ast_.walk(ast_.parse(task["prompt"]))
              if isinstance(n, ast_.FunctionDef) and n.name == task["entry_point"])
    doc = ast_.get_docstring(fn)
    prose = doc.split(">>>")[0].split("For example")[0].strip()
    def_line = next(l for l in task["prompt"].splitlines() if l.startswith(f"def {fn.name}("))
    call = f"{fn.name}(*{task['base_input'][0]!r})"
    return (f"## Description\n{prose}\n\n## Signature\n```python\n{def_line}\n```\n\n"
            f"## Examples\n```python\nassert {call} == {call}\n```\n")


def test_decontamination_against_humaneval_plus(shared_dir, tmp_path):
    files = sorted((shared_dir / "data" / "evalplus").glob("HumanEvalPlus-*.jsonl.gz"))
    assert files, f"no HumanEvalPlus-*.jsonl.gz in {shared_dir / 'data' / 'evalplus'}"
    tasks = {t["task_id"]: t for t in jsonl.records(files[0])}
    idx = S.benchmark_index([str(files[0])])
    assert idx.tasks == len(tasks) == 164
    for tid in ("HumanEval/0", "HumanEval/12", "HumanEval/129"):
        copy = S.parse_problem(_humaneval_copy(tasks[tid]))
        assert isinstance(copy, S.Problem), copy
        hit = S.benchmark_overlap(copy, idx)
        assert hit is not None and hit[0] == tid, (tid, hit)
    for text in (VALID, OTHER, BARE_STYLE):  # unrelated problems are kept
        assert S.benchmark_overlap(S.parse_problem(text), idx) is None

    # The CLI: --decontaminate with saved generations; counted, reported, nothing else lost.
    concepts = tmp_path / "c.jsonl"
    concepts.write_text("".join(json.dumps(c) + "\n" for c in CONCEPTS))
    gens = tmp_path / "g.jsonl"
    texts = [[_humaneval_copy(tasks["HumanEval/0"])], [VALID], [OTHER]]
    gens.write_text("".join(json.dumps({"request": i, "texts": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "p.jsonl"
    args = [sys.executable, "-m", "launch.synthesize", "--concepts", str(concepts),
            "--generations", str(gens), "--out", str(out), "--per_concept", "1"]
    r = subprocess.run(args + ["--decontaminate", str(files[0])], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout)
    assert counts["kept"] == 2 and counts["rejected_by_reason"]["benchmark_overlap"] == 1
    report = json.loads((tmp_path / "p.jsonl.report.json").read_text())
    assert report["decontamination"]["files"] == [{"path": str(files[0]), "tasks": 164}]
    assert report["config"]["decontaminate"] == {"ngram": 13, "min_shared": 1}
    (rej,) = [json.loads(x) for x in (tmp_path / "p.jsonl.rejected.jsonl").read_text().splitlines()]
    assert rej["reason"] == "benchmark_overlap" and "HumanEval/0" in rej["detail"]
    # A wrong path is an error before any work.
    r = subprocess.run(args + ["--decontaminate", str(tmp_path / "missing.jsonl.gz")], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "missing.jsonl.gz: no such file" in r.stderr + r.stdout
