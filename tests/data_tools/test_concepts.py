"""Concept extraction: fixture sources with known concepts, bad files, the real stdlib."""
import ast
import dataclasses
import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from data_tools import concepts as C

from tests.conftest import REPO
STDLIB = sysconfig.get_paths()["stdlib"]


def names(src: str) -> set[str]:
    return {c for c, _, _ in C.extract(ast.parse(textwrap.dedent(src)))}


# ------------------------------------------------------------------------------- APIs

def test_api_resolution_through_imports():
    got = names("""
        import numpy as np
        import os.path
        import collections
        from itertools import chain as ch, product
        from . import sibling
        from .pkg import helper
        np.sum(x); np.linalg.norm(x)
        os.path.join("a", "b")
        collections.Counter(xs)
        list(ch(a, b)); product(a, repeat=2)
        sibling.f(); helper()
        y = math.pi   # not imported: not resolved
        ", ".join(parts)
        sorted(xs)
    """)
    for c in ("api:numpy.sum", "api:numpy.linalg.norm", "api:os.path.join", "api:collections.Counter",
              "api:itertools.chain", "api:itertools.product", "api:str.join", "api:builtins.sorted"):
        assert c in got, c
    # Relative imports, unimported names and partial chains are not recorded.
    assert not any("sibling" in c or "helper" in c or "math" in c for c in got)
    assert "api:numpy.linalg" not in got and "api:numpy" not in got


def test_shadowed_builtin_is_not_an_api():
    got = names("""
        def sorted(x):
            return x
        sorted([1])
        max([1])
    """)
    assert "api:builtins.sorted" not in got and "api:builtins.max" in got


def test_filters_private_trivial_local_and_rare(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "util.py").write_text("def helper():\n    return 1\n")
    (pkg / "a.py").write_text(textwrap.dedent("""
        import os
        import mypkg.util
        import heapq
        print(len([1])); print(2)
        os._exit; os._exit
        mypkg.util.helper(); mypkg.util.helper()
        heapq.heappush(h, 1); heapq.heappush(h, 2)
        heapq.heapify(h)
        raise ValueError("x")
    """))
    rows, report = C.scan([str(tmp_path)])
    got = {r["concept"]: r for r in rows}
    assert "api:heapq.heappush" in got and got["api:heapq.heappush"]["count"] == 2
    assert got["api:heapq.heappush"]["files"] == 1
    assert got["api:heapq.heappush"]["example"] == f"{pkg / 'a.py'}:8"
    for dropped in ("api:builtins.print", "api:builtins.len", "api:os._exit", "api:mypkg.util.helper",
                    "api:heapq.heapify", "api:builtins.ValueError"):
        assert dropped not in got, dropped
    f = report["filtered"]
    assert f["trivial"]["concepts"] == 3  # print, len, ValueError
    assert f["private"]["concepts"] == 1 and f["local_module"]["concepts"] == 1
    assert f["below_min_count"]["concepts"] >= 1  # heapify (and other singletons)
    # Without the local filter the package's own API is kept.
    rows, _ = C.scan([str(tmp_path)], C.Filters(min_count=2, drop_local=False))
    assert "api:mypkg.util.helper" in {r["concept"] for r in rows}


# -------------------------------------------------------------------------- constructs

CONSTRUCTS = {
    "list_comprehension": "[x for x in y]",
    "set_comprehension": "{x for x in y}",
    "dict_comprehension": "{x: 1 for x in y}",
    "generator_expression": "sum(x for x in y)",
    "generator_function": "def g():\n    yield 1",
    "yield_from": "def g():\n    yield from h()",
    "lambda": "f = lambda x: x",
    "closure": "def f():\n    def g():\n        return 1\n    return g",
    "decorator": "@functools.wraps(f)\ndef g():\n    pass",
    "property": "class A:\n    @property\n    def x(self):\n        return 1",
    "staticmethod": "class A:\n    @staticmethod\n    def x():\n        return 1",
    "with_statement": "with open(p) as f:\n    pass",
    "context_manager_definition": "class A:\n    def __enter__(self): pass\n    def __exit__(self, *a): pass",
    "recursion": "def fact(n):\n    return 1 if n < 2 else n * fact(n - 1)",
    "try_except": "try:\n    f()\nexcept KeyError:\n    pass",
    "try_finally": "try:\n    f()\nfinally:\n    g()",
    "raise": "raise KeyError(1)",
    "custom_exception": "class MyError(ValueError):\n    pass",
    "class": "class A:\n    pass",
    "inheritance": "class A(B):\n    pass",
    "dataclass": "import dataclasses\n@dataclasses.dataclass\nclass P:\n    x: int",
    "enum": "from enum import Enum\nclass Color(Enum):\n    RED = 1",
    "namedtuple": "from typing import NamedTuple\nclass P(NamedTuple):\n    x: int",
    "metaclass": "class A(metaclass=Meta):\n    pass",
    "async_with": "async def f():\n    async with lock:\n        pass",
    "classmethod": "class A:\n    @classmethod\n    def make(cls):\n        return cls()",
    "abstract_base_class": "from abc import ABC\nclass A(ABC):\n    pass",
    "abstract_method": "import abc\nclass A(abc.ABC):\n    @abc.abstractmethod\n    def f(self): ...",
    "dunder_methods": "class V:\n    def __add__(self, o): return self",
    "iterator_protocol": "class It:\n    def __iter__(self): return self",
    "async_function": "async def f():\n    await g()",
    "await": "async def f():\n    await g()",
    "walrus": "if (n := len(a)) > 1:\n    pass",
    "f_string": "s = f'{x}'",
    "match_statement": "match x:\n    case 1:\n        pass",
    "varargs": "def f(*args):\n    pass",
    "kwargs": "def f(**kw):\n    pass",
    "keyword_only_args": "def f(a, *, b):\n    pass",
    "type_annotations": "def f(a: int) -> int:\n    return a",
    "global_statement": "def f():\n    global X",
    "nonlocal_statement": "def f():\n    x = 1\n    def g():\n        nonlocal x",
    "loop_else": "for x in y:\n    break\nelse:\n    pass",
    "tuple_unpacking": "a, b = b, a",
    "extended_unpacking": "a, *rest = xs",
    "slice_step": "r = s[::-1]",
    "chained_comparison": "ok = 0 < x < 10",
    "conditional_expression": "y = 1 if x else 2",
    "assert": "assert x",
    "exception_group": "try:\n    f()\nexcept* ValueError:\n    pass",
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTS))
def test_construct_detected(name):
    assert f"construct:{name}" in names(CONSTRUCTS[name])


def test_namedtuple_functional_form():
    assert "construct:namedtuple" in names("import collections\nP = collections.namedtuple('P', 'x y')")


def test_every_construct_is_tested():
    import re
    src = open(C.__file__).read()
    emitted = set(re.findall(r'_simple\("(\w+)"\)', src)) | set(re.findall(r'self\.add\("(\w+)", CONSTRUCT', src))
    emitted |= {"property", "staticmethod", "classmethod"}  # added through the decorator's short name
    assert emitted == set(CONSTRUCTS)


def test_no_constructs_for_plain_code():
    got = names("def f(a):\n    x = a + 1\n    if x:\n        return x\n    for i in a:\n        pass\n")
    assert not any(c.startswith(("construct:", "pattern:")) for c in got)


def test_method_recursion_and_non_recursion():
    assert "construct:recursion" in names("class T:\n    def walk(self, n):\n        return self.walk(n.left)")
    assert "construct:recursion" not in names("def f(x):\n    return g(x)")


# ---------------------------------------------------------------------------- patterns

POSITIVE = {
    "memoization": [
        "import functools\n@functools.lru_cache(maxsize=None)\ndef fib(n):\n    return n",
        """
        def fib(n, memo):
            if n in memo:
                return memo[n]
            memo[n] = fib(n - 1, memo) + fib(n - 2, memo)
            return memo[n]
        """],
    "binary_search": [
        "import bisect\ni = bisect.bisect_left(a, x)",
        """
        def search(a, x):
            lo, hi = 0, len(a)
            while lo < hi:
                mid = (lo + hi) // 2
                if a[mid] < x:
                    lo = mid + 1
                else:
                    hi = mid
            return lo
        """],
    "two_pointers": ["""
        def is_pal(s):
            i, j = 0, len(s) - 1
            while i < j:
                if s[i] != s[j]:
                    return False
                i += 1
                j -= 1
            return True
        """],
    "sliding_window": ["""
        def longest(s):
            seen, left, best = set(), 0, 0
            for right in range(len(s)):
                while s[right] in seen:
                    seen.discard(s[left])
                    left += 1
                seen.add(s[right])
                best = max(best, right - left + 1)
            return best
        """, """
        def window_sums(a, k):
            acc = sum(a[:k])
            out = [acc]
            for i in range(k, len(a)):
                acc += a[i]
                acc -= a[i - k]
                out.append(acc)
            return out
        """],
    "bfs_queue": ["""
        from collections import deque
        def bfs(graph, s):
            q, seen = deque([s]), {s}
            while q:
                u = q.popleft()
                for v in graph[u]:
                    if v not in seen:
                        seen.add(v)
                        q.append(v)
            return seen
        """],
    "dfs_stack": ["""
        def dfs(graph, s):
            stack, seen = [s], set()
            while stack:
                u = stack.pop()
                if u not in seen:
                    seen.add(u)
                    stack.extend(graph[u])
            return seen
        """],
    "priority_queue_loop": ["""
        import heapq
        def dijkstra(adj, s):
            dist, pq = {s: 0}, [(0, s)]
            while pq:
                d, u = heapq.heappop(pq)
                for v, w in adj[u]:
                    heapq.heappush(pq, (d + w, v))
            return dist
        """],
    "sort_with_key": ["r = sorted(words, key=len)", "words.sort(key=lambda w: w[1])"],
    "extremum_with_key": ["best = max(items, key=lambda t: t[1])"],
    "split_join_parsing": ["def norm(s):\n    return ' '.join(w for w in s.split())"],
    "dp_table": ["""
        def lcs(a, b):
            dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
            for i in range(1, len(a) + 1):
                for j in range(1, len(b) + 1):
                    dp[i][j] = dp[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(dp[i - 1][j], dp[i][j - 1])
            return dp[-1][-1]
        """, """
        def stairs(n):
            ways = [0] * (n + 1)
            ways[0] = 1
            for i in range(1, n + 1):
                ways[i] = ways[i - 1] + (ways[i - 2] if i > 1 else 0)
            return ways[n]
        """],
    "frequency_count": ["""
        def freq(xs):
            d = {}
            for x in xs:
                d[x] = d.get(x, 0) + 1
            return d
        """, """
        from collections import defaultdict
        def freq(xs):
            d = defaultdict(int)
            for x in xs:
                d[x] += 1
            return d
        """],
    "backtracking": ["""
        def perms(xs, path, out):
            if len(path) == len(xs):
                out.append(list(path))
                return
            for x in xs:
                if x not in path:
                    path.append(x)
                    perms(xs, path, out)
                    path.pop()
        """],
    "grid_directions": ["""
        def neighbours(r, c):
            for dr, dc in [(0, 1), (1, 0), (0, -1), (-1, 0)]:
                yield r + dr, c + dc
        """],
}

# Look-alikes each detector must not fire on.
NEGATIVE = {
    "memoization": "def f(k, d):\n    if k in d:\n        return d[k]\n    return None",  # lookup, no store
    "binary_search": "def f(i, j):\n    while i < j:\n        i += 1\n    return i",
    "two_pointers": "def f(i, j):\n    while i < j:\n        i += 1\n        j += 1",  # same direction
    "sliding_window": """
        def decode(lines):
            for line in lines:
                i = 0
                while i < len(line):
                    c = line[i]
                    i += 1
        """,  # a scanner over each line, not a window
    "bfs_queue": "def f(q):\n    while q:\n        x = q.popleft()",  # nothing enqueued
    "dfs_stack": "def f(s, out):\n    while s:\n        out.append(s.pop())",  # pushes to another list
    "priority_queue_loop": "import heapq\nx = heapq.heappop(h)",  # not in a loop
    "sort_with_key": "r = sorted(words)",
    "extremum_with_key": "m = max(xs)",
    "split_join_parsing": "def f(s):\n    return s.split(',')",
    "dp_table": "def f(n):\n    t = [0] * n\n    for i in range(n):\n        t[i] = i * i\n    return t",
    "frequency_count": "def f(xs):\n    d = [0, 0]\n    for x in xs:\n        d[x] += 1",  # list, not a dict
    "backtracking": "def f(xs, path):\n    path.append(1)\n    path.pop()\n    return g(xs)",  # not recursive
    "grid_directions": "for a, b in [(1, 2), (3, 4)]:\n    pass",  # two pairs
}


@pytest.mark.parametrize("pattern,i", [(p, i) for p, srcs in sorted(POSITIVE.items()) for i in range(len(srcs))])
def test_pattern_detected(pattern, i):
    assert f"pattern:{pattern}" in names(POSITIVE[pattern][i])


@pytest.mark.parametrize("pattern", sorted(NEGATIVE))
def test_pattern_not_detected_on_look_alike(pattern):
    assert f"pattern:{pattern}" not in names(NEGATIVE[pattern])


def test_every_pattern_has_a_positive_and_a_negative_test():
    assert set(C.PATTERNS) == set(POSITIVE) == set(NEGATIVE)
    assert all(f"``{p}``" in C.__doc__ for p in C.PATTERNS)
    # ...and the detectors emit no name outside the documented list.
    emitted = {c.split(":", 1)[1] for srcs in POSITIVE.values() for s in srcs for c in names(s)
               if c.startswith("pattern:")}
    assert emitted <= set(C.PATTERNS)


def test_patterns_counted_once_per_scope():
    # The inner function's loop belongs to the inner scope only.
    src = textwrap.dedent(POSITIVE["bfs_queue"][0]).replace("def bfs", "def outer():\n    pass\ndef bfs")
    src = "def wrapper():\n" + textwrap.indent(src, "    ")
    got = C.extract(ast.parse(src))
    assert sum(c == "pattern:bfs_queue" for c, _, _ in got) == 1


# ------------------------------------------------------------------- files, CLI, stdlib

def _write_tree(root):
    (root / "good.py").write_text("import heapq\nheapq.heappush(h, 1)\nheapq.heappush(h, 2)\n"
                                  "xs = [x for x in y]\n")
    (root / "broken.py").write_text("def f(:\n    pass\n")
    (root / "latin1.py").write_bytes(b"s = '\xe9t\xe9'\n")  # not UTF-8 and no coding cookie
    (root / "cookie.py").write_bytes(b"# -*- coding: latin-1 -*-\nimport heapq\ns = '\xe9'\n")
    (root / "nul.py").write_bytes(b"x = 1\x00\n")
    sub = root / "__pycache__"
    sub.mkdir()
    (sub / "ignored.py").write_text("def f(:\n")
    sp = root / "site-packages"
    sp.mkdir()
    (sp / "thirdparty.py").write_text("import heapq\nheapq.heappush(h, 3)\n")


def test_bad_files_are_counted_not_fatal(tmp_path):
    _write_tree(tmp_path)
    rows, report = C.scan([str(tmp_path)])
    assert report["files_seen"] == 5  # __pycache__ and site-packages not entered
    assert report["files_parsed"] == 2 and report["files_skipped"] == 3
    assert report["skip_reasons"] == {"syntax_error": 1, "bad_encoding": 1, "null_bytes": 1}
    by_path = {os.path.basename(s["path"]): s for s in report["skipped"]}
    assert by_path["broken.py"]["line"] == 1 and by_path["latin1.py"]["line"] == 1
    got = {r["concept"]: r for r in rows}
    assert got["api:heapq.heappush"]["count"] == 2  # the cookie file parsed, site-packages skipped
    assert "construct:list_comprehension" not in got  # one occurrence < min_count


def test_cli(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write_tree(src)
    other = tmp_path / "other"
    other.mkdir()
    (other / "h.py").write_text("import heapq\nheapq.heappush(h, 9)\n")
    out = tmp_path / "c.jsonl"
    r = subprocess.run([sys.executable, "-m", "launch.concepts", "--source", str(src), str(other),
                        "--out", str(out), "--noprogress"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["files_seen"] == 6 and summary["files_skipped"] == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    heappush = next(x for x in rows if x["concept"] == "api:heapq.heappush")
    assert heappush == {"concept": "api:heapq.heappush", "kind": "api", "count": 3, "files": 2,
                        "example": f"{src / 'good.py'}:2"}
    report = json.loads((tmp_path / "c.jsonl.report.json").read_text())
    assert len(report["skipped"]) == 3
    assert C.read_concepts(str(out)) == rows
    r = subprocess.run([sys.executable, "-m", "launch.concepts", "--source", str(tmp_path / "nope"),
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--source=" in r.stderr + r.stdout


def _check_stdlib_run(rows, report):
    assert report["files_parsed"] > 0
    assert report["files_seen"] == report["files_parsed"] + report["files_skipped"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"api", "construct", "pattern"}
    for r in rows:
        path, line = r["example"].rsplit(":", 1)
        assert os.path.isfile(path) and int(line) >= 0


def test_stdlib_subtrees():
    # Real code: json, email, collections, asyncio (a few hundred files, a few seconds).
    dirs = [os.path.join(STDLIB, d) for d in ("json", "email", "collections", "asyncio")]
    rows, report = C.scan(dirs, C.Filters(drop_local=False))
    _check_stdlib_run(rows, report)
    got = {r["concept"] for r in rows}
    for c in ("api:re.compile", "api:collections.deque", "construct:async_function", "construct:generator_function",
              "construct:try_except", "pattern:split_join_parsing"):
        assert c in got, c


@pytest.mark.slow
def test_whole_stdlib():
    # ~40 s on two shared cores; the stdlib ships deliberately broken files under test/.
    rows, report = C.scan([STDLIB], C.Filters(drop_local=False))
    _check_stdlib_run(rows, report)
    assert report["files_seen"] > 1000
    assert report["skip_reasons"].get("syntax_error", 0) >= 1
    assert report["skip_reasons"].get("bad_encoding", 0) >= 1
    assert {"pattern:binary_search", "pattern:bfs_queue", "pattern:memoization"} <= {r["concept"] for r in rows}


def test_concepts_config_defaults_agree_with_the_library():
    from configs import concepts as concepts_config

    c = concepts_config.get_config()
    assert (c.min_count, c.min_files, c.drop_local) == dataclasses.astuple(C.Filters())
    assert c.max_file_bytes == C.DEFAULT_MAX_FILE_BYTES
    assert tuple(c.exclude_dirs) == C.DEFAULT_EXCLUDE_DIRS
