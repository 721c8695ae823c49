"""Programs and assertions out of hand-made responses (fdpo.extract), and the fixture set
shared by its two users, the data stage and the evaluation (tests/helpers/extract_cases.py)."""

from __future__ import annotations

import ast
from types import SimpleNamespace

import pytest

from configs import evaluate as evaluate_config
from fdpo import extract
from fdpo.evaluation import generation
from fdpo.evaluation import tasks as tk
from fdpo.extract import extract_assertions, extract_program, fenced_blocks
from tests.helpers.extract_cases import CASES

SOLUTION = "def add(a, b):\n    return a + b\n"

FENCED = f"""Here is the function:

```python
{SOLUTION}```

It adds two numbers.
"""

SEVERAL = f"""First install nothing:

```bash
pip install nothing
```

The helper and the solution:

```
import math
```

```py
{SOLUTION}```

Usage:

```python
print(add(1, 2))
assert add(1, 2) == 3
```
"""

PLAIN = f"""Sure! The following does it.
{SOLUTION}
This function returns the sum of a and b."""

TRUNCATED = "```python\ndef add(a, b):\n    return a + b\n\nprint(add(1,"


@pytest.mark.parametrize("response,expected", [
    (FENCED, SOLUTION),
    (SEVERAL, SOLUTION),  # skips bash, skips the import-only block, takes the one with a def
    (PLAIN, SOLUTION.rstrip("\n") + "\n"),
    (SOLUTION, SOLUTION),
    (TRUNCATED, "def add(a, b):\n    return a + b\n\nprint(add(1,\n"),  # unclosed fence: kept
    ("I cannot help with that.", ""),
    ("```bash\nls\n```", ""),  # fences, but none in Python
    ("", ""),
])
def test_extract_program(response, expected):
    assert extract_program(response) == expected


def test_program_without_definition_takes_first_python_block():
    assert extract_program("```\nx = 1\n```\n```python\ny = 2\n```") == "x = 1\n"


def test_plain_code_drops_leading_and_trailing_prose():
    response = ("Let me think.\nimport math\n\ndef area(r):\n    return math.pi * r ** 2\n"
                "That's it, area computes the area.")
    got = extract_program(response)
    assert got == "import math\n\ndef area(r):\n    return math.pi * r ** 2\n"
    ast.parse(got)


TESTS_FENCED = """Tests:

```python
from solution import add

assert add(1, 2) == 3
assert add(-1, 1) == 0, "negatives"
assert add(
    2, 2) == 4
print("done")
```
"""

TESTS_SEVERAL = """```python
assert add(1, 2) == 3
```
and more:
```python
if __name__ == "__main__":
    assert add(0, 0) == 0
    assert add(1, 2) == 3
```
```text
assert this_is_not_python
```
"""

TESTS_PLAIN = """assert add(1, 2) == 3
Also check zeros:
assert add(0, 0) == 0
    assert add(5, 5) == 10
assert add(1,
"""


@pytest.mark.parametrize("response,expected", [
    (TESTS_FENCED, ["assert add(1, 2) == 3", 'assert add(-1, 1) == 0, "negatives"',
                    "assert add(\n    2, 2) == 4"]),
    (TESTS_SEVERAL, ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]),  # deduplicated
    # plain, unparsable as a whole: line by line, the incomplete last one dropped
    (TESTS_PLAIN, ["assert add(1, 2) == 3", "assert add(0, 0) == 0",
                   "assert add(5, 5) == 10"]),
    ("No tests here.", []),
    ("```python\ndef test_add():\n    assert add(1, 2) == 3\n```", []),  # needs locals: not top level
    ("", []),
])
def test_extract_assertions(response, expected):
    got = extract_assertions(response)
    assert got == expected
    for a in got:
        assert isinstance(ast.parse(a).body[0], ast.Assert)


def test_fenced_blocks_tags_and_unclosed():
    blocks = fenced_blocks("a\n```Python extra\nx\n```\n```\ny\n")
    assert blocks == [("python", "x\n"), ("", "y\n")]


# ------------------------------------------------- one extractor for data stage and evaluation


def test_fixture_set_is_large_and_varied():
    assert len(CASES) >= 40 and len({c["name"] for c in CASES}) == len(CASES)
    assert sum("sanitized" in c for c in CASES) >= 20
    assert sum(c["program"] == "" for c in CASES) >= 4  # responses without a program


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_data_stage_and_evaluation_read_the_same_program(case):
    task = tk.Task("T/0", "def placeholder():\n    pass\n", entry_point=case["entry_point"] or "")
    # The data stage's call (fdpo.selfgen, fdpo.continuation) and the evaluation's.
    data = extract.program_from_response(case["response"], task.prompt, "code_block",
                                         case["entry_point"])
    evaluation = generation.solution(case["response"], task, "code_block", sanitize=False)
    assert data == evaluation == case["program"]
    if data and case["name"] != "unclosed_fence_cut_mid_line":  # kept as the model wrote it
        ast.parse(data)
    if "sanitized" in case:
        sanitized = generation.solution(case["response"], task, "code_block", sanitize=True)
        assert sanitized == case["sanitized"]
        ast.parse(sanitized)


class _CannedPolicy:
    """Stands in for fdpo.policy.Policy: answers prompt i with response i."""

    def __init__(self, responses):
        self.responses = responses

    def check_prompt_lengths(self, prompts, max_new_tokens, names):
        pass  # the canned answers need no room (the check: tests/fdpo/test_input_checks.py)

    def generate(self, prompts, num_samples, **_):
        assert len(prompts) == len(self.responses) and num_samples == 1
        return [[SimpleNamespace(text=r)] for r in self.responses]


def test_generate_extracts_with_the_shared_extractor_and_sanitizes_by_default():
    c = evaluate_config.get_config()
    assert c.sanitize and c.response_format == "code_block"
    tasks = {f"T/{i}": tk.Task(f"T/{i}", "prompt", entry_point=case["entry_point"] or "")
             for i, case in enumerate(CASES)}
    samples = generation.generate(_CannedPolicy([case["response"] for case in CASES]), tasks,
                                  "evalplus", c)
    for sample, case in zip(samples, CASES):
        expected = case["program"]
        if case["entry_point"] and expected:
            expected = case.get("sanitized", extract.sanitize(expected, case["entry_point"]))
        assert sample.solution == expected, case["name"]


def test_sanitize_keeps_transitive_dependencies_only():
    program = ("import os\nimport re\n\nA = 1\nB = A + 1\nUNUSED = 3\n\n\ndef g():\n    return B\n\n\n"
               "def f():\n    return g() + len(re.findall('x', 'xx'))\n\n\nprint(f())\nassert f() == 4\n")
    got = extract.sanitize(program, "f")
    assert got == ("import os\nimport re\n\nA = 1\nB = A + 1\n\n\ndef g():\n    return B\n\n\n"
                   "def f():\n    return g() + len(re.findall('x', 'xx'))\n")
    namespace = {}
    exec(compile(got, "<sanitized>", "exec"), namespace)
    assert namespace["f"]() == 4
    # No entry point, or one not defined: every definition stays, top-level statements go.
    assert extract.sanitize(program) == extract.sanitize(program, "missing")
    assert "UNUSED = 3" in extract.sanitize(program) and "print" not in extract.sanitize(program)
    assert extract.sanitize("this is ( not python") == "this is ( not python"
