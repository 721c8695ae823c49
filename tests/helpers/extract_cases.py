"""Realistic instruct responses and the programs expected out of them, shared by the tests of
both users of fdpo.extract: the data stage and the evaluation (tests/fdpo/test_extract.py).

Each case: `name`, `response`, `entry_point` (None where the task has none, as the data
stage's self-written problems), `program` (what extraction must give) and, where given,
`sanitized` (what evaluation's sanitize option must give on top of it). Written by hand in
the styles instruct models answer in (Qwen2.5-Coder, DeepSeek-Coder, Magicoder): prose
around the code, several blocks, usage and tests after the solution, fences cut by the
token limit, indented fences, doctest prompts, stdin programs, refusals.
"""
F = "```"

ADD = "def add(a, b):\n    return a + b\n"

CASES = [
    dict(name="prose_around_one_block", entry_point="add",
         response=f"Here is the function:\n\n{F}python\n{ADD}{F}\n\nIt returns the sum.",
         program=ADD, sanitized=ADD),
    dict(name="bare_fence", entry_point="add",
         response=f"{F}\n{ADD}{F}", program=ADD, sanitized=ADD),
    dict(name="py_tag", entry_point="add",
         response=f"Sure.\n{F}py\n{ADD}{F}\n", program=ADD, sanitized=ADD),
    dict(name="python3_tag", entry_point="add",
         response=f"{F}python3\n{ADD}{F}\nDone.", program=ADD, sanitized=ADD),
    dict(name="capitalised_tag", entry_point="add",
         response=f"{F}Python\n{ADD}{F}", program=ADD, sanitized=ADD),
    dict(name="tag_with_file_name", entry_point="add",
         response=f"{F}python:solution.py\n{ADD}{F}", program=ADD, sanitized=ADD),
    dict(name="space_before_tag", entry_point="add",
         response=f"{F} python\n{ADD}{F}", program=ADD, sanitized=ADD),
    dict(name="crlf_line_ends", entry_point="add",
         response=f"Here:\r\n{F}python\r\ndef add(a, b):\r\n    return a + b\r\n{F}\r\n",
         program=ADD, sanitized=ADD),
    dict(name="blank_lines_inside_fence", entry_point="add",
         response=f"{F}python\n\n\n{ADD}\n\n{F}", program=ADD, sanitized=ADD),
    dict(name="usage_block_after_solution", entry_point="add",
         response=(f"Solution:\n{F}python\n{ADD}{F}\n\nExample usage:\n{F}python\n"
                   f"print(add(1, 2))  # 3\n{F}\n"),
         program=ADD, sanitized=ADD),
    dict(name="asserts_block_after_solution_longer", entry_point="add",
         response=(f"{F}python\n{ADD}{F}\nTests:\n{F}python\nassert add(1, 2) == 3\n"
                   "assert add(-1, 1) == 0\nassert add(0, 0) == 0\nassert add(10, 5) == 15\n"
                   f"{F}"),
         program=ADD, sanitized=ADD),
    dict(name="pytest_block_after_solution_no_entry_point", entry_point=None,
         response=(f"{F}python\n{ADD}{F}\nAnd pytest tests:\n{F}python\n"
                   "from solution import add\n\n\ndef test_add():\n    assert add(1, 2) == 3\n"
                   f"    assert add(2, 2) == 4\n    assert add(0, 5) == 5\n{F}"),
         program=ADD),
    dict(name="unittest_block_after_solution", entry_point=None,
         response=(f"{F}python\n{ADD}{F}\n{F}python\nimport unittest\n\n\n"
                   "class TestAdd(unittest.TestCase):\n    def test_small(self):\n"
                   f"        self.assertEqual(add(1, 2), 3)\n{F}"),
         program=ADD),
    dict(name="shell_and_output_blocks_ignored", entry_point="add",
         response=(f"Run it:\n{F}bash\npython add.py\n{F}\n{F}python\n{ADD}{F}\n"
                   f"Output:\n{F}text\n3\n{F}"),
         program=ADD, sanitized=ADD),
    dict(name="only_non_python_blocks", entry_point="add",
         response=f"{F}javascript\nconst add = (a, b) => a + b;\n{F}", program=""),
    dict(name="snippet_then_full_solution_longest", entry_point=None,
         response=(f"The key step is:\n{F}python\ndef step(x):\n    return x + 1\n{F}\n"
                   f"Full solution:\n{F}python\ndef step(x):\n    return x + 1\n\n\n"
                   f"def solve(xs):\n    return [step(x) for x in xs]\n{F}"),
         program=("def step(x):\n    return x + 1\n\n\n"
                  "def solve(xs):\n    return [step(x) for x in xs]\n")),
    dict(name="entry_point_block_not_longest", entry_point="is_even",
         response=(f"A helper you might also like:\n{F}python\nimport math\n\n\n"
                   "def is_square(n):\n    r = math.isqrt(n)\n    return r * r == n\n\n\n"
                   f"def is_cube(n):\n    r = round(n ** (1 / 3))\n    return r ** 3 == n\n{F}\n"
                   f"The answer:\n{F}python\ndef is_even(n):\n    return n % 2 == 0\n{F}"),
         program="def is_even(n):\n    return n % 2 == 0\n",
         sanitized="def is_even(n):\n    return n % 2 == 0\n"),
    dict(name="import_block_then_function_block", entry_point=None,
         response=(f"{F}python\nimport math\n{F}\n{F}python\n"
                   f"def area(r):\n    return math.pi * r * r\n{F}"),
         program="def area(r):\n    return math.pi * r * r\n"),
    dict(name="unclosed_fence_cut_mid_line", entry_point="add",
         response=f"Here you go:\n{F}python\n{ADD}\nprint(add(1,",
         program=ADD + "\nprint(add(1,\n", sanitized=ADD),
    dict(name="unclosed_fence_after_complete_function", entry_point="add",
         response=f"{F}python\n{ADD}\n# Example\nprint(add(2, 3))\n",
         program=ADD + "\n# Example\nprint(add(2, 3))\n", sanitized=ADD + "\n# Example\n"),
    dict(name="unclosed_fence_cut_inside_function", entry_point="fib",
         response=(f"{F}python\ndef fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
                   "        a, b = b, a + b\n    return"),
         program=("def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
                  "        a, b = b, a + b\n    return\n"),
         sanitized=("def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
                    "        a, b = b, a + b\n    return\n")),
    dict(name="unclosed_second_block_is_tests", entry_point="add",
         response=f"{F}python\n{ADD}{F}\nTests:\n{F}python\nassert add(1, 2) == 3\nassert add(",
         program=ADD, sanitized=ADD),
    dict(name="no_code_refusal", entry_point="add",
         response="I'm sorry, but I can't help with that request.", program=""),
    dict(name="no_code_explanation_only", entry_point=None,
         response=("To add two numbers, use the + operator. For example, adding 2 and 3 "
                   "gives 5.\nSolution"),
         program=""),
    dict(name="empty_response", entry_point=None, response="", program=""),
    dict(name="empty_fence", entry_point="add", response=f"{F}python\n{F}", program=""),
    dict(name="plain_code_no_fence", entry_point="add", response=ADD, program=ADD,
         sanitized=ADD),
    dict(name="plain_code_prose_before_and_after", entry_point="add",
         response=f"Sure! The following does it.\n{ADD}\nThis returns the sum of a and b.",
         program=ADD, sanitized=ADD),
    dict(name="plain_code_starting_with_import", entry_point="area",
         response=("Let me think.\nimport math\n\ndef area(r):\n    return math.pi * r ** 2\n"
                   "That's it."),
         program="import math\n\ndef area(r):\n    return math.pi * r ** 2\n",
         sanitized="import math\n\ndef area(r):\n    return math.pi * r ** 2\n"),
    dict(name="plain_stdin_program", entry_point=None,
         response=("Here is the program:\nn = int(input())\nprint(n * 2)\n"
                   "It reads n and prints twice n."),
         program="n = int(input())\nprint(n * 2)\n"),
    dict(name="stdin_program_fenced", entry_point=None,
         response=(f"{F}python\nimport sys\n\n\ndef main():\n    data = sys.stdin.read().split()\n"
                   f"    print(sum(map(int, data)))\n\n\nmain()\n{F}"),
         program=("import sys\n\n\ndef main():\n    data = sys.stdin.read().split()\n"
                  "    print(sum(map(int, data)))\n\n\nmain()\n")),
    dict(name="indented_fence_in_list_item", entry_point="add",
         response=(f"1. Write the function:\n\n   {F}python\n   def add(a, b):\n"
                   f"       return a + b\n   {F}\n2. Call it."),
         program=ADD, sanitized=ADD),
    dict(name="doctest_in_docstring_kept", entry_point="double",
         response=(f"{F}python\ndef double(x):\n    \"\"\"Twice x.\n\n    >>> double(2)\n    4\n"
                   f"    \"\"\"\n    return 2 * x\n{F}"),
         program=("def double(x):\n    \"\"\"Twice x.\n\n    >>> double(2)\n    4\n"
                  "    \"\"\"\n    return 2 * x\n"),
         sanitized=("def double(x):\n    \"\"\"Twice x.\n\n    >>> double(2)\n    4\n"
                    "    \"\"\"\n    return 2 * x\n")),
    dict(name="humaneval_style_with_typing_and_helper", entry_point="below_zero",
         response=(f"{F}python\nfrom typing import List\n\n\ndef _running(ops):\n    total = 0\n"
                   "    for op in ops:\n        total += op\n        yield total\n\n\n"
                   "def below_zero(operations: List[int]) -> bool:\n"
                   "    return any(t < 0 for t in _running(operations))\n\n\n"
                   f"print(below_zero([1, 2, -4, 5]))\n{F}\nThe helper yields the balance."),
         program=("from typing import List\n\n\ndef _running(ops):\n    total = 0\n"
                  "    for op in ops:\n        total += op\n        yield total\n\n\n"
                  "def below_zero(operations: List[int]) -> bool:\n"
                  "    return any(t < 0 for t in _running(operations))\n\n\n"
                  "print(below_zero([1, 2, -4, 5]))\n"),
         sanitized=("from typing import List\n\n\ndef _running(ops):\n    total = 0\n"
                    "    for op in ops:\n        total += op\n        yield total\n\n\n"
                    "def below_zero(operations: List[int]) -> bool:\n"
                    "    return any(t < 0 for t in _running(operations))\n")),
    dict(name="main_guard_dropped_by_sanitize", entry_point="add",
         response=(f"{F}python\n{ADD}\n\nif __name__ == \"__main__\":\n"
                   f"    print(add(int(input()), int(input())))\n{F}"),
         program=(ADD + "\n\nif __name__ == \"__main__\":\n"
                  "    print(add(int(input()), int(input())))\n"),
         sanitized=ADD),
    dict(name="unused_helper_dropped_by_sanitize", entry_point="add",
         response=f"{F}python\ndef unused():\n    return 0\n\n\n{ADD}{F}",
         program=f"def unused():\n    return 0\n\n\n{ADD}", sanitized=ADD),
    dict(name="global_constant_kept_by_sanitize", entry_point="to_mod",
         response=(f"{F}python\nMOD = 10 ** 9 + 7\nCACHE = {{}}\n\n\ndef to_mod(x):\n"
                   f"    return x % MOD\n\n\nprint(to_mod(10 ** 10))\n{F}"),
         program=("MOD = 10 ** 9 + 7\nCACHE = {}\n\n\ndef to_mod(x):\n    return x % MOD\n\n\n"
                  "print(to_mod(10 ** 10))\n"),
         sanitized="MOD = 10 ** 9 + 7\n\n\ndef to_mod(x):\n    return x % MOD\n"),
    dict(name="class_and_decorator_dependencies", entry_point="solve",
         response=(f"{F}python\nimport functools\n\n\nclass Grid:\n    def __init__(self, n):\n"
                   "        self.n = n\n\n\n@functools.lru_cache(maxsize=None)\ndef paths(n):\n"
                   "    return 1 if n <= 1 else paths(n - 1) * 2\n\n\ndef solve(n):\n"
                   f"    return paths(Grid(n).n)\n{F}"),
         program=("import functools\n\n\nclass Grid:\n    def __init__(self, n):\n"
                  "        self.n = n\n\n\n@functools.lru_cache(maxsize=None)\ndef paths(n):\n"
                  "    return 1 if n <= 1 else paths(n - 1) * 2\n\n\ndef solve(n):\n"
                  "    return paths(Grid(n).n)\n"),
         sanitized=("import functools\n\n\nclass Grid:\n    def __init__(self, n):\n"
                    "        self.n = n\n\n\n@functools.lru_cache(maxsize=None)\ndef paths(n):\n"
                    "    return 1 if n <= 1 else paths(n - 1) * 2\n\n\ndef solve(n):\n"
                    "    return paths(Grid(n).n)\n")),
    dict(name="class_solution_entry_point_is_class", entry_point="Solution",
         response=(f"{F}python\nclass Solution:\n    def twoSum(self, nums, target):\n"
                   "        seen = {}\n        for i, x in enumerate(nums):\n"
                   "            if target - x in seen:\n                return [seen[target - x], i]\n"
                   f"            seen[x] = i\n{F}"),
         program=("class Solution:\n    def twoSum(self, nums, target):\n"
                  "        seen = {}\n        for i, x in enumerate(nums):\n"
                  "            if target - x in seen:\n                return [seen[target - x], i]\n"
                  "            seen[x] = i\n"),
         sanitized=("class Solution:\n    def twoSum(self, nums, target):\n"
                    "        seen = {}\n        for i, x in enumerate(nums):\n"
                    "            if target - x in seen:\n                return [seen[target - x], i]\n"
                    "            seen[x] = i\n")),
    dict(name="two_versions_entry_point_longest", entry_point="rev",
         response=(f"Simple version:\n{F}python\ndef rev(s):\n    return s[::-1]\n{F}\n"
                   f"Without slicing:\n{F}python\ndef rev(s):\n    out = []\n"
                   f"    for ch in s:\n        out.insert(0, ch)\n    return ''.join(out)\n{F}"),
         program=("def rev(s):\n    out = []\n    for ch in s:\n        out.insert(0, ch)\n"
                  "    return ''.join(out)\n")),
    dict(name="magicoder_response_layout", entry_point="count_vowels",
         response=(f"@@ Response\nHere is a Python solution:\n\n{F}python\n"
                   "def count_vowels(s):\n    return sum(ch in 'aeiou' for ch in s.lower())\n"
                   f"{F}\n\nThis function lowercases the string and counts vowels."),
         program="def count_vowels(s):\n    return sum(ch in 'aeiou' for ch in s.lower())\n",
         sanitized="def count_vowels(s):\n    return sum(ch in 'aeiou' for ch in s.lower())\n"),
    dict(name="numbered_explanation_then_code", entry_point="max_gap",
         response=("Approach:\n1. Sort the list.\n2. Compare neighbours.\n\n"
                   f"{F}python\ndef max_gap(xs):\n    xs = sorted(xs)\n"
                   f"    return max((b - a for a, b in zip(xs, xs[1:])), default=0)\n{F}\n"
                   "Complexity: O(n log n)."),
         program=("def max_gap(xs):\n    xs = sorted(xs)\n"
                  "    return max((b - a for a, b in zip(xs, xs[1:])), default=0)\n"),
         sanitized=("def max_gap(xs):\n    xs = sorted(xs)\n"
                    "    return max((b - a for a, b in zip(xs, xs[1:])), default=0)\n")),
    dict(name="inline_backticks_in_prose", entry_point="add",
         response=f"Use `add(a, b)`; it calls `+`.\n{F}python\n{ADD}{F}",
         program=ADD, sanitized=ADD),
    dict(name="async_function", entry_point="fetch",
         response=f"{F}python\nasync def fetch(x):\n    return x\n{F}",
         program="async def fetch(x):\n    return x\n",
         sanitized="async def fetch(x):\n    return x\n"),
    dict(name="comment_only_first_line_plain", entry_point="add",
         response=f"# Solution\n{ADD}\nHope this helps!",
         program=f"# Solution\n{ADD}", sanitized=f"# Solution\n{ADD}"),
    dict(name="tuple_assignment_global", entry_point="span",
         response=(f"{F}python\nLO, HI = 0, 10\n\n\ndef span():\n    return HI - LO\n{F}"),
         program="LO, HI = 0, 10\n\n\ndef span():\n    return HI - LO\n",
         sanitized="LO, HI = 0, 10\n\n\ndef span():\n    return HI - LO\n"),
]
