"""Programs and assertions out of hand-made responses (fdpo.extract)."""

from __future__ import annotations

import ast

import pytest

from fdpo.extract import extract_assertions, extract_program, fenced_blocks

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
