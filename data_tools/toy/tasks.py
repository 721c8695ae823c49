"""The miniature's task family: small list functions composed from parts, described in words.

Each task is `filter -> transform -> aggregate` over a list of ints, e.g.

    def solve(xs):
        \"\"\"Keep the numbers that are greater than seven and odd, triple each of them, and
        return their sum.\"\"\"
        total = 0
        for x in xs:
            if x > 7 and x % 2 == 1:
                total += x * 3
        return total

The canonical program has the shape the paper observes in real samples: a shared prefix
(signature, initialisation, loop header), a middle where a wrong belief shows (the `if`
condition and the update), and a shared suffix (`return`). The middle is made
systematically hard, so a small model converges with wrong beliefs rather than with
under-training noise: numbers are written as words, filters may have two clauses, and
phrasing varies between templates.

Every (filter, transform, aggregate) combination is a task; a fixed, seeded subset of
combinations is held out for evaluation, so held-out pass@1 measures composition, not
memorisation. Tests come from an oracle: inputs are drawn at random and expected values are
computed from the reference; a stated fraction of tests get a corrupted expected value, so
that code-test ranking has real work to do (the miniature's own tests would otherwise be
meaningless, see docs/pipeline.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
from typing import Callable

NUMBER_WORDS = {
    2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine",
    10: "ten", 11: "eleven", 12: "twelve", 13: "thirteen", 14: "fourteen", 15: "fifteen",
}


@dataclasses.dataclass(frozen=True)
class Part:
    key: str  # stable identifier, e.g. "gt7"
    words: str  # how the docstring says it
    code: str  # the Python expression (in x) or statement fragment
    fn: Callable  # reference semantics


def _filters() -> list[Part]:
    parts = [
        Part("all", "all the numbers", "", lambda x: True),
        Part("even", "the even numbers", "x % 2 == 0", lambda x: x % 2 == 0),
        Part("odd", "the odd numbers", "x % 2 == 1", lambda x: x % 2 == 1),
    ]
    for n in (3, 5, 7, 9, 11):
        parts.append(Part(f"gt{n}", f"the numbers greater than {NUMBER_WORDS[n]}", f"x > {n}",
                          lambda x, n=n: x > n))
        parts.append(Part(f"lt{n}", f"the numbers less than {NUMBER_WORDS[n]}", f"x < {n}",
                          lambda x, n=n: x < n))
    for n in (3, 4):
        parts.append(Part(f"div{n}", f"the multiples of {NUMBER_WORDS[n]}", f"x % {n} == 0",
                          lambda x, n=n: x % n == 0))
    # Two-clause filters: the second clause is where a half-learned model slips.
    for n, parity in itertools.product((4, 8, 10), ("even", "odd")):
        rem = 0 if parity == "even" else 1
        parts.append(Part(f"gt{n}{parity}", f"the {parity} numbers greater than {NUMBER_WORDS[n]}",
                          f"x > {n} and x % 2 == {rem}",
                          lambda x, n=n, rem=rem: x > n and x % 2 == rem))
    return parts


def _transforms() -> list[Part]:
    parts = [Part("id", "", "x", lambda x: x),
             Part("sq", "square each of them", "x * x", lambda x: x * x),
             Part("neg", "negate each of them", "-x", lambda x: -x)]
    for n in (2, 3, 4, 5):
        parts.append(Part(f"mul{n}", f"multiply each by {NUMBER_WORDS[n]}", f"x * {n}",
                          lambda x, n=n: x * n))
    for n in (2, 3, 6, 9):
        parts.append(Part(f"add{n}", f"add {NUMBER_WORDS[n]} to each", f"x + {n}",
                          lambda x, n=n: x + n))
        parts.append(Part(f"sub{n}", f"subtract {NUMBER_WORDS[n]} from each", f"x - {n}",
                          lambda x, n=n: x - n))
    return parts


@dataclasses.dataclass(frozen=True)
class Aggregate:
    key: str
    words: str
    init: str  # initialisation line (prefix)
    update: str  # update line with {v} for the transformed value (mid)
    result: str  # return expression (suffix)
    fn: Callable[[list[int]], int | list[int]]


AGGREGATES = (
    Aggregate("sum", "return their sum", "total = 0", "total += {v}", "total", sum),
    Aggregate("count", "return how many there are", "total = 0", "total += 1", "total", len),
    Aggregate("list", "return them as a list", "out = []", "out.append({v})", "out", list),
)

FILTERS = _filters()
TRANSFORMS = _transforms()


@dataclasses.dataclass(frozen=True)
class Task:
    task_id: str
    filter: Part
    transform: Part
    aggregate: Aggregate
    entry_point: str = "solve"

    @property
    def description(self) -> str:
        steps = [f"Keep {self.filter.words}"]
        if self.aggregate.key != "count" and self.transform.key != "id":
            steps.append(self.transform.words)
        steps.append(self.aggregate.words)
        text = ", ".join(steps[:-1]) + ", and " + steps[-1] if len(steps) > 2 else \
            " and ".join(steps)
        return text + "."

    @property
    def prompt(self) -> str:
        """The function signature and docstring the model completes."""
        return f'def {self.entry_point}(xs):\n    """{self.description}"""\n'

    @property
    def solution(self) -> str:
        """The canonical body (what the model should write after the prompt)."""
        agg = self.aggregate
        value = self.transform.code if agg.key != "count" else "1"
        update = agg.update.format(v=value)
        lines = [f"    {agg.init}"]
        lines.append("    for x in xs:")
        if self.filter.code:
            lines.append(f"        if {self.filter.code}:")
            indent = "            "
        else:
            indent = "        "
        lines.append(indent + update)
        lines.append(f"    return {agg.result}")
        return "\n".join(lines) + "\n"

    def reference(self, xs: list[int]):
        kept = [x for x in xs if self.filter.fn(x)]
        values = [self.transform.fn(x) for x in kept] if self.aggregate.key != "count" else kept
        return self.aggregate.fn(values)


def all_tasks() -> list[Task]:
    tasks = []
    for f, t, a in itertools.product(FILTERS, TRANSFORMS, AGGREGATES):
        if a.key == "count" and t.key != "id":
            continue  # counting ignores the transform: one task per filter
        tasks.append(Task(f"toy/{f.key}-{t.key}-{a.key}", f, t, a))
    return tasks


def split_tasks(held_out_fraction: float = 0.2, seed: int = 0) -> tuple[list[Task], list[Task]]:
    """(seen, held_out): a seeded hash split over whole combinations."""
    seen, held = [], []
    for task in all_tasks():
        h = int.from_bytes(hashlib.sha256(f"{seed}:{task.task_id}".encode()).digest()[:8],
                           "little") / 2**64
        (held if h < held_out_fraction else seen).append(task)
    return seen, held


def random_inputs(rng: random.Random, n: int, length=(0, 7), values=(-3, 16)) -> list[list[int]]:
    return [[rng.randint(*values) for _ in range(rng.randint(*length))] for _ in range(n)]


def oracle_tests(task: Task, rng: random.Random, n: int, corrupt_fraction: float = 0.0
                 ) -> tuple[list[str], list[bool]]:
    """n assertion tests; `corrupt_fraction` of them (rounded) expect a wrong value.

    Returns (tests, is_correct). Inputs are distinct where possible.
    """
    inputs, seen = [], set()
    for xs in random_inputs(rng, 8 * n):
        key = tuple(xs)
        if key not in seen:
            seen.add(key)
            inputs.append(xs)
        if len(inputs) == n:
            break
    n_bad = round(corrupt_fraction * len(inputs))
    bad = set(rng.sample(range(len(inputs)), n_bad))
    tests, ok = [], []
    for i, xs in enumerate(inputs):
        want = task.reference(xs)
        if i in bad:
            want = _corrupt(want, rng)
        tests.append(f"assert {task.entry_point}({xs!r}) == {want!r}")
        ok.append(i not in bad)
    return tests, ok


def _corrupt(value, rng: random.Random):
    if isinstance(value, list):
        return value + [rng.randint(1, 9)] if not value or rng.random() < 0.5 else value[:-1]
    return value + rng.choice([-2, -1, 1, 2])
