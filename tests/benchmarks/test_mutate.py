"""benchmarks.ranking.mutate: each mutation kind on small hand-made functions, single-point splicing,
the start offset, determinism and the skip counts."""
import difflib

import pytest

from benchmarks.ranking import mutate


def edits_of(src, kind=None, start=0):
    return [(mutate.apply(src, e), e) for e in mutate.candidate_edits(src, start)
            if kind is None or e.kind == kind]


def sources(src, kind=None, start=0):
    return {m for m, _ in edits_of(src, kind, start)}


def call(src, name, *args):
    ns = {}
    exec(src, ns)
    return ns[name](*args)


def test_arith_swaps():
    src = "def f(a, b):\n    return a + b\n"
    assert sources(src, "arith") == {"def f(a, b):\n    return a - b\n"}
    assert sources("def f(a, b):\n    return a - b\n", "arith") == {"def f(a, b):\n    return a + b\n"}
    assert sources("def f(a, b):\n    return a * b\n", "arith") == {"def f(a, b):\n    return a // b\n"}
    assert sources("def f(a, b):\n    return a // b\n", "arith") == {"def f(a, b):\n    return a * b\n"}
    assert sources("def f(a, b):\n    return a % b\n", "arith") == {"def f(a, b):\n    return a // b\n"}
    # `**` is one operator, never read as two `*`.
    assert sources("def f(a, b):\n    return a ** b\n", "arith") == {"def f(a, b):\n    return a * b\n"}
    # Augmented assignment; behaviour really changes.
    src = "def f(n):\n    t = 0\n    for i in range(n):\n        t += i\n    return t\n"
    (mut,) = sources(src, "arith")
    assert "t -= i" in mut
    assert call(src, "f", 4) == 6 and call(mut, "f", 4) == -6


def test_arith_operator_inside_brackets_and_comments():
    src = "def f(a, b):\n    return (a  # + not this one\n            + (b))\n"
    (mut,) = sources(src, "arith")
    assert "# + not this one" in mut and "- (b))" in mut
    assert call(mut, "f", 5, 2) == 3


def test_compare_flips():
    got = sources("def f(a, b):\n    return a < b\n", "compare")
    assert got == {"def f(a, b):\n    return a <= b\n"}
    assert sources("def f(a, b):\n    return a >= b\n", "compare") == {"def f(a, b):\n    return a > b\n"}
    assert sources("def f(a, b):\n    return a == b\n", "compare") == {"def f(a, b):\n    return a != b\n"}
    assert sources("def f(a, b):\n    return a != b\n", "compare") == {"def f(a, b):\n    return a == b\n"}
    # Chains: each operator separately.
    assert sources("def f(a, b, c):\n    return a < b <= c\n", "compare") == {
        "def f(a, b, c):\n    return a <= b <= c\n", "def f(a, b, c):\n    return a < b < c\n"}
    assert sources("def f(x, s):\n    return x in s\n", "compare") == {"def f(x, s):\n    return x not in s\n"}
    assert sources("def f(x, s):\n    return x not  in s\n", "compare") == {"def f(x, s):\n    return x in s\n"}


def test_constant_perturbation():
    src = 'def f(x):\n    "Docstring 7 stays."\n    return x * 3 if x else True\n'
    got = sources(src, "constant")
    assert got == {src.replace("3", "4"), src.replace("3", "2"), src.replace("True", "False")}
    # String literals shrink; empty ones grow; f-strings are left alone.
    src = 'def f(xs):\n    return "ab".join(xs) + "" + f"{xs}!"\n'
    assert sources(src, "constant") == {src.replace('"ab"', '"a"'), src.replace('""', '" "')}


def test_off_by_one():
    src = "def f(n):\n    return list(range(n))\n"
    assert sources(src, "off_by_one") == {src.replace("range(n)", "range(n + 1)"),
                                          src.replace("range(n)", "range(n - 1)")}
    src = "def f(a, b):\n    return list(range(a, b))\n"
    assert sources(src, "off_by_one") == {
        src.replace("range(a, b)", "range(a, b + 1)"), src.replace("range(a, b)", "range(a, b - 1)"),
        src.replace("range(a, b)", "range(a + 1, b)"), src.replace("range(a, b)", "range(a - 1, b)")}
    src = "def f(s, i):\n    return s[1:i]\n"
    assert sources(src, "off_by_one") == {src.replace("[1:i]", "[1 + 1:i]"), src.replace("[1:i]", "[1 - 1:i]"),
                                          src.replace("[1:i]", "[1:i + 1]"), src.replace("[1:i]", "[1:i - 1]")}
    # Indices; a compound index is parenthesised; string keys are not shifted.
    src = "def f(s, i, j, d):\n    return s[i + j], d['k']\n"
    assert sources(src, "off_by_one") == {src.replace("s[i + j]", "s[(i + j) + 1]"),
                                          src.replace("s[i + j]", "s[(i + j) - 1]")}
    assert call(src.replace("s[i + j]", "s[(i + j) - 1]"), "f", "abcd", 1, 2, {"k": 0}) == ("c", 0)


def test_boolean():
    src = "def f(a, b, c):\n    return a and b or c\n"
    got = sources(src, "boolean")
    assert "def f(a, b, c):\n    return a and b and c\n" in got  # outer `or` -> `and`
    assert "def f(a, b, c):\n    return a or b or c\n" in got  # inner `and` -> `or`
    src = "def f(a, b):\n    return not (a and b)\n"
    assert src.replace("not (a and b)", "(a and b)") in sources(src, "boolean")
    src = "def f(a, b):\n    return not a < b\n"
    assert src.replace("not a < b", "a < b") in sources(src, "boolean")


def test_name_swaps():
    src = "def f(xs, s):\n    return max(xs), s.lower(), sorted(xs)\n"
    assert sources(src, "name") == {src.replace("max", "min"), src.replace("lower", "upper"),
                                    src.replace("sorted(xs)", "sorted(xs, reverse=True)")}
    # A `sorted` that already has reverse= is left alone.
    assert sources("def f(xs):\n    return sorted(xs, reverse=False)\n", "name") == set()


def test_annotations_and_prompt_are_never_mutated():
    prompt = "from typing import List\n\n\ndef f(xs: List[int], k: int = 3) -> List[int]:\n    \"\"\"1 + 1\"\"\"\n"
    body = "    return xs[:k]\n"
    src = prompt + body
    all_edits = edits_of(src)
    assert all("List[" in m and "List[int + 1]" not in m for m, _ in all_edits)
    tail = edits_of(src, start=len(prompt))
    assert tail and all(e.start >= len(prompt) for _, e in tail)
    assert all(m.startswith(prompt) for m, _ in tail)
    # With start=0 the default argument is fair game, the annotations still are not.
    assert any("k: int = 4" in m for m, _ in all_edits)


def test_every_mutant_is_one_contiguous_edit_that_compiles():
    src = ("def f(xs, n):\n    # keep this comment\n    total = 0\n"
           "    for i in range(1, n):\n        if xs[i] > xs[i - 1] and i % 2 == 0:\n"
           "            total += xs[i] * 2\n    return max(total, 0)\n")
    muts, stats = mutate.mutants(src, 100, seed=0)
    assert stats.produced == len(muts) == stats.candidates - stats.identical - stats.duplicate - stats.compile_error
    assert set(stats.by_kind) == set(mutate.KINDS)
    for m, desc in muts:
        compile(m, "<m>", "exec")
        assert "# keep this comment" in m
        ops = [op for op in difflib.SequenceMatcher(None, src, m).get_opcodes() if op[0] != "equal"]
        first, last = ops[0], ops[-1]
        # Everything outside one window [first change, last change] is unchanged.
        assert src[: first[1]] == m[: first[3]] and src[last[2]:] == m[last[4]:]
        assert desc.split(":")[0] in mutate.KINDS and "(line " in desc


def test_deterministic_for_a_seed_and_kinds_interleaved():
    src = ("def f(xs, n):\n    t = 0\n    for i in range(n):\n        if xs[i] < 3 or i == 1:\n"
           "            t += max(xs[i], 2)\n    return t\n")
    a, _ = mutate.mutants(src, 6, seed=1)
    b, _ = mutate.mutants(src, 6, seed=1)
    c, _ = mutate.mutants(src, 6, seed=2)
    assert a == b
    assert a != c
    # Round-robin over kinds: the first six mutants cover all six kinds.
    assert {d.split(":")[0] for _, d in a} == set(mutate.KINDS)


def test_skips_are_counted(monkeypatch):
    src = "def f(a):\n    return a + 1\n"
    k = src.index("+")
    fake = [
        mutate.Edit("arith", k, k + 1, "+", "arith: same"),  # identical text
        mutate.Edit("arith", k, k + 1, "-", "arith: minus"),
        mutate.Edit("constant", k, k + 1, "-", "constant: minus again"),  # duplicate
        mutate.Edit("constant", k, k + 1, "+ +", "constant: broken"),  # `a + + 1` compiles...
        mutate.Edit("compare", k, k + 1, ")", "compare: broken"),  # ...this does not
    ]
    monkeypatch.setattr(mutate, "candidate_edits", lambda source, start=0: list(fake))
    muts, stats = mutate.mutants(src, 10, seed=0)
    assert stats.identical == 1 and stats.duplicate == 1 and stats.compile_error == 1
    assert sorted(m for m, _ in muts) == ["def f(a):\n    return a + + 1\n",
                                          "def f(a):\n    return a - 1\n"]
    assert stats.produced == 2 and stats.candidates == 5


def test_n_bounds_the_output():
    src = "def f(a, b):\n    return a + b * 2 - (a < b)\n"
    muts, stats = mutate.mutants(src, 2, seed=0)
    assert len(muts) == 2 and stats.candidates > 2
    assert mutate.mutants("x = y\n", 5)[0] == []


@pytest.mark.parametrize("src", ["def f(:\n", "return ("])
def test_unparsable_source_raises(src):
    with pytest.raises(SyntaxError):
        mutate.mutants(src, 3)
