"""The decision family: list tasks with one decision point and planted wrong beliefs.

Each task keeps the numbers that pass a threshold stated in words, transforms each kept
number in 1 + K steps (a first step, then one step repeated K times), and aggregates:

    def solve(xs):
        \"\"\"Keep the numbers that are no more than 17; multiply each by 3, then decrease by
        8 twice; return their sum.\"\"\"
        total = 0
        for x in xs:
            if x <= 17:
                y = x * 3
                y -= 8
                y -= 8
                total += y
        return total

The threshold phrase ("at least", "no more than", "not below", "under", ...) decides the
comparison operator: that is the decision point. In the warm start's SFT data a few "trap"
phrasings are written with a wrong operator with probability `trap_rate` (a competing wrong
belief, e.g. "no more than 7" as `x < 7`), every other phrasing with probability
`noise_rate`. A model trained on it decodes the trap phrasings wrong greedily and samples
both operators there, so preference pairs differ at one span: the `if` condition. Each
prompt names that span by a regex (`oracle_focus`) for the builder's `focus=oracle`.

The K in {0, 2, 4} tail steps after the first transform carry label noise in the SFT data
(`tail_noise`: a step's constant is replaced), so tail tokens are not saturated and the
suffix after the decision point still carries gradient. The tail repeats one stated step
(a tiny model copies three constants from the docstring, not an ordered list of five).
Constants are written as digits: the hard part is the decision, not reading numbers.

Splits are by combination (phrasing, threshold, steps, aggregate): every phrasing occurs in
every split, and no combination occurs in two splits, so validation and test measure whether
a belief about a phrasing was corrected, not composition or memorisation. Inputs contain
the threshold often, so a strict/non-strict slip is visible in the tests.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import re

# (phrase with {c}, operator, trap, wrong operator). A trap's wrong operator is the belief
# planted in the warm start; a non-trap phrasing's noise flips strictness.
PHRASINGS = (
    ("at least {c}", ">=", True, ">"),
    ("no less than {c}", ">=", False, ">"),
    ("not below {c}", ">=", True, ">"),
    ("{c} or more", ">=", False, ">"),
    ("more than {c}", ">", False, ">="),
    ("greater than {c}", ">", False, ">="),
    ("above {c}", ">", False, ">="),
    ("over {c}", ">", False, ">="),
    ("at most {c}", "<=", False, "<"),
    ("no more than {c}", "<=", True, "<"),
    ("not above {c}", "<=", True, "<"),
    ("{c} or less", "<=", False, "<"),
    ("less than {c}", "<", False, "<="),
    ("under {c}", "<", False, "<="),
    ("below {c}", "<", False, "<="),
    ("smaller than {c}", "<", False, "<="),
)
PHRASES = tuple(p[0] for p in PHRASINGS)
OPERATORS = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b,
             "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}
# Each slot has its own numbers and words (thresholds two digits, the first step's constant
# 2-5, the tail's 6-9; "add" first, "increase by" in the tail), so which number goes where
# is plain from the tokens, for a tiny model to learn in a short warm start (how far it gets:
# docs/results/miniature.md).
THRESHOLDS = tuple(range(10, 20))
TAIL_LENGTHS = (0, 2, 4)  # K: the default of `write(tail_lengths=...)`
TIMES = {1: "", 2: " twice", 3: " three times", 4: " four times"}
STEP_OPS = {"+": lambda v, k: v + k, "-": lambda v, k: v - k, "*": lambda v, k: v * k}
FIRST_WORDS = {"+": "add {k} to each", "-": "subtract {k} from each", "*": "multiply each by {k}"}
TAIL_WORDS = {"+": "increase by {k}", "-": "decrease by {k}", "*": "scale by {k}"}
FIRST_CONSTANTS = (2, 3, 4, 5)  # defaults of `write(first_constants=..., tail_constants=...)`
TAIL_CONSTANTS = (6, 7, 8, 9)
AGGREGATES = {"sum": ("return their sum", "total = 0", "total += y", "total"),
              "list": ("return them as a list", "out = []", "out.append(y)", "out")}
SPLITS = ("sft", "dpo", "validation", "test")
ENTRY_POINT = "solve"


def slug(phrase: str) -> str:
    return phrase.replace("{c}", "c").replace(" ", "_")


@dataclasses.dataclass(frozen=True)
class Task:
    phrasing: int  # index into PHRASINGS
    threshold: int
    steps: tuple[tuple[str, int], ...]  # (operator, constant): the first transform, then K
    aggregate: str

    @property
    def task_id(self) -> str:
        steps = "".join({"+": "a", "-": "s", "*": "m"}[op] + str(k) for op, k in self.steps)
        return f"decision/{slug(self.phrase)}-{self.threshold}-{steps}-{self.aggregate}"

    @property
    def phrase(self) -> str:
        return PHRASINGS[self.phrasing][0]

    @property
    def operator(self) -> str:
        return PHRASINGS[self.phrasing][1]

    @property
    def trap(self) -> bool:
        return PHRASINGS[self.phrasing][2]

    @property
    def wrong_operator(self) -> str:
        return PHRASINGS[self.phrasing][3]

    @property
    def description(self) -> str:
        (op, k), tail = self.steps[0], self.steps[1:]
        first = FIRST_WORDS[op].format(k=k)
        if tail:  # the tail repeats one step: "then increase by 7 twice"
            first += f", then {TAIL_WORDS[tail[0][0]].format(k=tail[0][1])}{TIMES[len(tail)]}"
        return (f"Keep the numbers that are {self.phrase.format(c=self.threshold)}; "
                f"{first}; {AGGREGATES[self.aggregate][0]}.")

    @property
    def prompt(self) -> str:
        return f'def {ENTRY_POINT}(xs):\n    """{self.description}"""\n'

    def body(self, operator: str | None = None, steps=None) -> str:
        """The program body with the comparison `operator` (default: the right one) and the
        transform `steps` (default: the stated ones)."""
        _, init, update, result = AGGREGATES[self.aggregate]
        steps = self.steps if steps is None else steps
        lines = [f"    {init}", "    for x in xs:",
                 f"        if x {operator or self.operator} {self.threshold}:"]
        for i, (op, k) in enumerate(steps):
            lines.append(f"            y = x {op} {k}" if i == 0 else f"            y {op}= {k}")
        lines += [f"            {update}", f"    return {result}"]
        return "\n".join(lines) + "\n"

    @property
    def solution(self) -> str:
        return self.body()

    @property
    def oracle_focus(self) -> str:
        """A regex whose first match in a response is the decision span: the `if` condition
        (any comparison operator and constant, so a wrong sample's condition matches too)."""
        return r"if x\s*(?:[<>]=?|[=!]=)\s*-?\d+\s*:"

    def reference(self, xs: list[int], operator: str | None = None):
        """What the program returns on `xs` (with `operator` in place of the right one)."""
        keep = OPERATORS[operator or self.operator]
        values = []
        for x in xs:
            if keep(x, self.threshold):
                y = x
                for op, k in self.steps:
                    y = STEP_OPS[op](y, k)
                values.append(y)
        return sum(values) if self.aggregate == "sum" else values

    def decidable(self) -> bool:
        """Whether the wrong operator changes the result when the threshold is in the list
        (a sum of a kept value that transforms to 0 would hide it)."""
        return self.reference([self.threshold]) != \
            self.reference([self.threshold], self.wrong_operator)


def random_task(rng: random.Random, phrasing: int, tail_lengths=TAIL_LENGTHS,
                first_constants=FIRST_CONSTANTS, tail_constants=TAIL_CONSTANTS) -> Task:
    k = rng.choice(tuple(tail_lengths))
    first = (rng.choice(tuple(STEP_OPS)), rng.choice(tuple(first_constants)))
    tail = (rng.choice(tuple(STEP_OPS)), rng.choice(tuple(tail_constants)))
    steps = (first,) + (tail,) * k
    return Task(phrasing, rng.choice(THRESHOLDS), steps, rng.choice(tuple(AGGREGATES)))


def make_splits(sizes: dict[str, int], seed: int = 0, tail_lengths=TAIL_LENGTHS,
                first_constants=FIRST_CONSTANTS, tail_constants=TAIL_CONSTANTS
                ) -> dict[str, list[Task]]:
    """Disjoint sets of tasks per split, each with every phrasing equally often (round
    robin), drawn at random by combination; no task id is in two splits."""
    rng = random.Random(f"decision-splits-{seed}")
    taken: set[str] = set()
    out = {}
    for split in SPLITS:
        tasks = []
        while len(tasks) < sizes[split]:
            task = random_task(rng, len(tasks) % len(PHRASINGS), tail_lengths, first_constants,
                               tail_constants)
            if task.task_id in taken or not task.decidable():
                continue
            taken.add(task.task_id)
            tasks.append(task)
        rng.shuffle(tasks)
        out[split] = tasks
    return out


def random_inputs(task: Task, rng: random.Random, n: int) -> list[list[int]]:
    """n distinct lists of 1-6 values near the threshold; most contain the threshold
    itself (where a strict/non-strict slip shows); the first always does."""
    inputs, seen = [], set()
    for i in range(20 * n):
        xs = [rng.randint(task.threshold - 5, task.threshold + 5)
              for _ in range(rng.randint(1, 6))]
        if i == 0 or rng.random() < 0.7:
            xs.insert(rng.randint(0, len(xs)), task.threshold)
        if tuple(xs) not in seen:
            seen.add(tuple(xs))
            inputs.append(xs)
        if len(inputs) == n:
            break
    return inputs


def oracle_tests(task: Task, rng: random.Random, n: int, corrupt_fraction: float = 0.0
                 ) -> tuple[list[str], list[bool]]:
    """n assertion tests; `corrupt_fraction` of them (rounded) expect a wrong value.
    Returns (tests, is_correct)."""
    inputs = random_inputs(task, rng, n)
    bad = set(rng.sample(range(len(inputs)), round(corrupt_fraction * len(inputs))))
    tests, ok = [], []
    for i, xs in enumerate(inputs):
        want = task.reference(xs)
        if i in bad:
            want = (want + [rng.randint(1, 9)] if isinstance(want, list)
                    else want + rng.choice([-2, -1, 1, 2]))
        tests.append(f"assert {ENTRY_POINT}({xs!r}) == {want!r}")
        ok.append(i not in bad)
    return tests, ok


def sft_target(task: Task, rng: random.Random, trap_rate: float, noise_rate: float,
               tail_noise: float, tail_constants=TAIL_CONSTANTS) -> tuple[str, bool, int]:
    """The warm start's (possibly wrong) program for `task`: (body, operator planted wrong,
    tail steps with a replaced constant)."""
    wrong = rng.random() < (trap_rate if task.trap else noise_rate)
    steps, noisy = list(task.steps), 0
    for i in range(1, len(steps)):
        if rng.random() < tail_noise:
            op, k = steps[i]
            steps[i] = (op, rng.choice([c for c in tail_constants if c != k]))
            noisy += 1
    return task.body(task.wrong_operator if wrong else None, tuple(steps)), wrong, noisy


CONDITION = re.compile(r"if x ([<>!]=?) (\d+):")


def planted_operator(body: str) -> str:
    """The comparison operator a generated body uses (for checking the planted rates)."""
    m = CONDITION.search(body)
    if not m:
        raise ValueError(f"no `if x OP C:` condition in {body!r}")
    return m.group(1)


def write(out: pathlib.Path, *, seed: int = 0, num_tests: int = 8, eval_tests: int = 16,
          corrupt_fraction: float = 0.25, vocab_size: int = 384, trap_rate: float = 0.65,
          noise_rate: float = 0.05, tail_noise: float = 0.05, num_sft: int = 3000,
          num_dpo: int = 800, num_validation: int = 320, num_test: int = 512,
          tail_lengths=TAIL_LENGTHS, first_constants=FIRST_CONSTANTS,
          tail_constants=TAIL_CONSTANTS) -> dict:
    """The family's files in `out`, with the list family's names and fields (see
    data_tools/toy/data.py), prompt lines carrying `phrasing`, `trap` and `oracle_focus`,
    SFT pairs carrying `planted_wrong` and `tail_noise_steps`, and EvalPlus files
    eval_validation.jsonl and eval_test.jsonl."""
    from data_tools.toy import data as toy_data  # the tokenizer trainer (no JAX)

    sizes = {"sft": num_sft, "dpo": num_dpo, "validation": num_validation, "test": num_test}
    if not set(tail_lengths) <= set(TIMES) | {0}:
        raise ValueError(f"tail_lengths={tuple(tail_lengths)}: each K must be in 0-{max(TIMES)}")
    if len(set(tail_constants)) < 2 or not set(first_constants) | set(tail_constants) <= set(
            range(2, 10)):
        raise ValueError(f"first_constants={tuple(first_constants)}, tail_constants="
                         f"{tuple(tail_constants)}: digits 2-9, at least two tail constants "
                         "(tail noise replaces one by another; 0 and 1 make steps that change "
                         "nothing or, x * 0, hide the decision)")
    out.mkdir(parents=True, exist_ok=True)
    splits = make_splits(sizes, seed, tail_lengths, first_constants, tail_constants)
    every = [t for s in SPLITS for t in splits[s]]
    toy_data.train_tokenizer(out / "tokenizer", [t.prompt + t.solution for t in every]
                             + [t.prompt + t.body(t.wrong_operator) for t in every], vocab_size,
                             individual_digits=True)
    rng = random.Random(seed)
    planted = {"trap": [0, 0], "other": [0, 0]}  # [wrong, total]
    noisy_steps = tail_steps = 0
    with open(out / "prompts.jsonl", "w") as prompts, open(out / "tests.jsonl", "w") as tests, \
            open(out / "eval_tests.jsonl", "w") as evals, \
            open(out / "sft_pairs.jsonl", "w") as sft:
        for split in SPLITS:
            for task in splits[split]:
                prompts.write(json.dumps({
                    "id": task.task_id, "prompt": task.prompt, "entry_point": ENTRY_POINT,
                    "split": split, "phrasing": task.phrase, "trap": task.trap,
                    "oracle_focus": task.oracle_focus}) + "\n")
                t, ok = oracle_tests(task, rng, num_tests, corrupt_fraction)
                tests.write(json.dumps({"id": task.task_id, "tests": t, "tests_correct": ok})
                            + "\n")
                t, _ = oracle_tests(task, rng, eval_tests, 0.0)
                evals.write(json.dumps({"id": task.task_id, "tests": t}) + "\n")
                if split == "sft":
                    body, wrong, noisy = sft_target(task, rng, trap_rate, noise_rate,
                                                    tail_noise, tail_constants)
                    row = planted["trap" if task.trap else "other"]
                    row[0] += wrong
                    row[1] += 1
                    noisy_steps += noisy
                    tail_steps += len(task.steps) - 1
                    # `rejected` (unused by the sft preset) is the same body with `!=`: the
                    # pair differs only at the decision point, and both sides' middles are
                    # non-empty in any tokenization (`>` against `>=` can leave the chosen
                    # middle empty, and launch.build drops such a pair).
                    sft.write(json.dumps({
                        "id": task.task_id, "prompt": task.prompt, "chosen": body,
                        "rejected": body.replace(f"if x {planted_operator(body)} ",
                                                 "if x != ", 1),
                        "planted_wrong": wrong, "tail_noise_steps": noisy}) + "\n")
    eval_rng = random.Random(seed + 1)
    for split in ("validation", "test"):
        with open(out / f"eval_{split}.jsonl", "w") as f:
            for task in splits[split]:
                f.write(json.dumps({
                    "task_id": task.task_id, "prompt": task.prompt, "entry_point": ENTRY_POINT,
                    "canonical_solution": task.solution,
                    "base_input": [[xs] for xs in random_inputs(task, eval_rng, eval_tests)],
                    "plus_input": [], "atol": 0, "phrasing": task.phrase, "trap": task.trap,
                }) + "\n")
    counts = {s: len(splits[s]) for s in SPLITS}
    counts.update({f"eval_{s}": len(splits[s]) for s in ("validation", "test")})
    counts["sft_planted_wrong"] = {k: {"wrong": w, "of": n} for k, (w, n) in planted.items()}
    counts["sft_tail_steps"] = {"noisy": noisy_steps, "of": tail_steps}
    meta = {"family": "decision", "seed": seed, "num_tests": num_tests,
            "eval_tests": eval_tests, "corrupt_fraction": corrupt_fraction,
            "vocab_size": vocab_size, "trap_rate": trap_rate, "noise_rate": noise_rate,
            "tail_noise": tail_noise, "tail_lengths": list(tail_lengths),
            "first_constants": list(first_constants), "tail_constants": list(tail_constants),
            "counts": counts,
            "traps": [p[0] for p in PHRASINGS if p[2]],
            "program": "prompt + response (function body completion)"}
    (out / "toy_data.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
