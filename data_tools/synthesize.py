"""Problem prompts synthesised by the policy around extracted concepts (METHOD.md section 2,
phase 1).

    python -m launch.synthesize --concepts=CONCEPTS.jsonl (--checkpoint=CKPT | --hf_dir=HF) \\
        --out=PROMPTS.jsonl [--per_concept=N] [--config=configs/synthesize.py]

Steps: (1) :func:`make_requests` turns each concept into ``per_concept`` requests, each naming
the seed concept plus up to ``max_concepts_per_problem - 1`` partners (drawn without
replacement, weighted by log occurrence count, seeded), rendered with the config's generation
templates; (2) the policy samples them (`launch.synthesize`: the only part that needs a
model and the sampler); (3) :func:`parse_problem` reads each generation back and validates it; (4)
:func:`dedupe` drops exact and near duplicates; (5) the survivors are written in the format
``launch.sample`` reads.

A generation must hold three Markdown sections (any heading level, case-insensitive):
``Description``, ``Signature`` (a fenced or bare ``def`` line, optionally with a docstring and
imports, and no body) and ``Examples`` (``assert`` statements that call the function).
Rejection reasons, counted in the report:

``empty_generation``        nothing but whitespace
``missing_section``         no Description, Signature or Examples section
``description_too_short``   description under ``validation.min_description_chars``
``missing_entry_point``     no ``def NAME(`` in the signature section
``broken_signature``        the ``def`` does not parse (after adding a ``...`` body when it
                            has none), or it holds more than one function
``solution_leaked``         an implementation of the entry point anywhere: a signature or any
                            fenced code block holding ``def NAME`` with a body beyond a
                            docstring / ``pass`` / ``...`` / ``raise NotImplementedError``,
                            or a section headed Solution / Implementation / Answer
``bad_examples``            an example that does not parse as ``assert`` statements, fewer than
                            ``min_examples`` or more than ``max_examples`` asserts, or an
                            assert that does not call the entry point
``benchmark_overlap``       shares ``decontaminate.min_shared`` or more word n-grams
                            (``decontaminate.ngram``, 13) with one prompt of a benchmark file
                            given with ``--decontaminate`` (see below)
``duplicate``               same normalised description + signature as an earlier problem
``near_duplicate``          word-n-gram Jaccard >= ``dedupe.jaccard`` with an earlier problem

Normalisation for duplicates: lower case, every run of non-alphanumeric characters replaced by
one space. The earlier problem (in request order) is kept. Near-duplicate candidates are found
through an inverted index of n-grams that are shared by at most ``dedupe.max_postings``
problems, then compared exactly; two problems sharing only very common n-grams are never
compared (they are far below any useful threshold in practice).

Decontamination: a policy that saw HumanEval or MBPP in pre-training can write their problems
back almost verbatim, and training on them would inflate the benchmark scores reported later.
``--decontaminate A.jsonl.gz,B.jsonl.gz`` names EvalPlus-format task files (their ``prompt``
fields are indexed; the files are read from where they are, never copied). A problem's text
(description, signature and examples, normalised as for duplicates, in the problem's order and
in the benchmarks' orders: see :func:`contamination_grams`) is split into word n-grams, 13
by default, the n of GPT-3's benchmark decontamination and common practice since: a shorter
n flags ordinary shared phrasing ("return true if the given list ..."), a much longer one
misses copies with small edits. A problem sharing at least
``decontaminate.min_shared`` n-grams (default 1) with any single task is rejected, before
dedupe, so that a clean paraphrase is not dropped as a near duplicate of a contaminated
problem. Problems under n words have one n-gram (all their words) and only match a benchmark
prompt of exactly those words.

Output line (one per kept problem):
``{"id", "prompt", "entry_point", "signature", "concepts": [...], "examples": [...],
"description"}``; ``prompt`` is the config's solve template filled with the description,
signature and examples; ``id`` is ``PREFIX-`` + the first 12 hex digits of the sha256 of
the normalised text (stable across runs, unique after dedupe).

This module imports no jax; the program `launch.synthesize` loads the model.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import hashlib
import logging
import math
import os
import re
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from fdpo import jsonl

log = logging.getLogger("data_tools.synthesize")

EMPTY = "empty_generation"
MISSING_SECTION = "missing_section"
SHORT_DESCRIPTION = "description_too_short"
MISSING_ENTRY_POINT = "missing_entry_point"
BROKEN_SIGNATURE = "broken_signature"
SOLUTION_LEAKED = "solution_leaked"
BAD_EXAMPLES = "bad_examples"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near_duplicate"
BENCHMARK_OVERLAP = "benchmark_overlap"
REASONS = (EMPTY, MISSING_SECTION, SHORT_DESCRIPTION, MISSING_ENTRY_POINT, BROKEN_SIGNATURE,
           SOLUTION_LEAKED, BAD_EXAMPLES, BENCHMARK_OVERLAP, DUPLICATE, NEAR_DUPLICATE)

_HEADING = re.compile(r"^\s*#{1,6}\s*(.+?)\s*:?\s*#*\s*$")
_BOLD_HEADING = re.compile(r"^\s*\*\*(.+?):?\*\*\s*:?\s*$")  # "**Signature**" headings
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.S)
_DEF = re.compile(r"^\s*(?:async\s+)?def\s+([A-Za-z_]\w*)\s*\(", re.M)
_LEAK_HEADINGS = ("solution", "implementation", "answer", "reference solution")


@dataclasses.dataclass
class Problem:
    description: str
    signature: str  # the def line(s), with docstring if given, no body
    entry_point: str
    examples: list[str]  # one assert statement each
    concepts: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Rejection:
    reason: str
    detail: str = ""

    def __bool__(self) -> bool:  # ``if parse_problem(...)`` reads as "parsed"
        return False


@dataclasses.dataclass(frozen=True)
class Validation:
    min_description_chars: int = 40
    min_examples: int = 1
    max_examples: int = 10


# ----------------------------------------------------------------------------- parsing

def split_sections(text: str) -> dict[str, str]:
    """{lower-case heading: body} for Markdown headings (``#`` .. ``######`` or bold lines).
    Headings inside fenced code are ignored. The first occurrence of a heading wins."""
    sections: dict[str, list[str]] = {}
    current = None
    in_fence = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        m = None if in_fence or line.lstrip().startswith("```") else (_HEADING.match(line) or _BOLD_HEADING.match(line))
        if m:
            current = m.group(1).strip().strip("*").strip().lower()
            if current in sections:
                current = "__dup__" + current  # later repeats are ignored
            sections.setdefault(current, [])
            continue
        if current is not None:
            sections[current].append(line)
    return {k: "\n".join(v).strip() for k, v in sections.items() if not k.startswith("__dup__")}


def _find(sections: dict[str, str], *names: str) -> str | None:
    for key, body in sections.items():
        if any(key == n or key.startswith(n) for n in names):
            return body
    return None


def _code(body: str) -> str:
    """The fenced code of a section (all fences joined), or the body itself when unfenced."""
    blocks = [m.group(2) for m in _FENCE.finditer(body)]
    return "\n".join(blocks).strip("\n") if blocks else body.strip("\n")


def _is_stub(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Only a docstring, ``pass``, ``...`` or ``raise NotImplementedError``: no implementation."""
    for s in fn.body:
        if isinstance(s, ast.Pass):
            continue
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and (
                isinstance(s.value.value, str) or s.value.value is Ellipsis):
            continue
        if isinstance(s, ast.Raise) and s.exc is not None and "NotImplementedError" in ast.unparse(s.exc):
            continue
        return False
    return True


def _parse_stub(code: str) -> ast.Module | None:
    """Parses a signature; a ``def`` line without a body gets ``...`` appended."""
    for candidate in (code, code.rstrip() + "\n    ..."):
        try:
            return ast.parse(candidate)
        except SyntaxError:
            continue
    return None


def _leaks(code: str, entry_point: str) -> bool:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        # Unparsable code that still defines the entry point with indented statements after
        # the def line is treated as a leak: a body was written, even if broken.
        m = re.search(rf"^(\s*)def\s+{re.escape(entry_point)}\s*\(.*?:\s*$\n((?:\1\s+.*\n?)+)", code, re.M)
        return bool(m and re.search(r"\b(return|for|while|if)\b", m.group(2)))
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == entry_point
               and not _is_stub(n) for n in ast.walk(tree))


def parse_problem(text: str, validation: Validation = Validation(),
                  concepts: Sequence[str] = ()) -> Problem | Rejection:
    """Reads one generation back into a :class:`Problem`, or says why it cannot be used."""
    if not text or not text.strip():
        return Rejection(EMPTY)
    sections = split_sections(text)
    description = _find(sections, "description", "problem", "task")
    signature_body = _find(sections, "signature", "function signature")
    examples_body = _find(sections, "examples", "example", "tests")
    missing = [n for n, v in (("Description", description), ("Signature", signature_body),
                              ("Examples", examples_body)) if v is None]
    if missing:
        return Rejection(MISSING_SECTION, "no " + ", ".join(missing) + " section")
    # A solution section, or a full implementation anywhere, is a leak whatever else holds.
    for key in sections:
        if any(key == h or key.startswith(h + " ") for h in _LEAK_HEADINGS):
            return Rejection(SOLUTION_LEAKED, f"section {key!r}")
    sig_code = _code(signature_body)
    m = _DEF.search(sig_code)
    if m is None:
        return Rejection(MISSING_ENTRY_POINT, "no 'def NAME(' in the signature section")
    entry = m.group(1)
    blocks = [b.group(2) for b in _FENCE.finditer(text)]
    if any(_leaks(code, entry) for code in blocks + [sig_code]):
        return Rejection(SOLUTION_LEAKED, f"an implementation of {entry}()")
    tree = _parse_stub(sig_code)
    if tree is None:
        return Rejection(BROKEN_SIGNATURE, sig_code.splitlines()[0][:200] if sig_code else "")
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    others = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                          ast.Import, ast.ImportFrom))]
    if len(defs) != 1 or others:
        return Rejection(BROKEN_SIGNATURE, f"expected one def (and imports), got {len(defs)} defs "
                                           f"and {len(others)} other statements")
    if len(description) < validation.min_description_chars:
        return Rejection(SHORT_DESCRIPTION, f"{len(description)} < {validation.min_description_chars} chars")
    ex_code = _code(examples_body)
    try:
        ex_tree = ast.parse(ex_code)
    except SyntaxError as e:
        return Rejection(BAD_EXAMPLES, f"examples line {e.lineno}: {e.msg}")
    if not ex_tree.body or not all(isinstance(s, ast.Assert) for s in ex_tree.body):
        return Rejection(BAD_EXAMPLES, "examples must be assert statements only")
    n = len(ex_tree.body)
    if not validation.min_examples <= n <= validation.max_examples:
        return Rejection(BAD_EXAMPLES, f"{n} examples, expected {validation.min_examples}.."
                                       f"{validation.max_examples}")
    for s in ex_tree.body:
        if not any(isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id == entry
                   for c in ast.walk(s)):
            return Rejection(BAD_EXAMPLES, f"example does not call {entry}(): {ast.unparse(s)[:120]}")
    signature = "\n".join(ast.get_source_segment(sig_code, n) or ast.unparse(n) for n in tree.body
                          if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    fn = defs[0]
    stub = _stub_source(sig_code, fn)
    signature = (signature + "\n" + stub).strip("\n") if signature else stub
    return Problem(description.strip(), signature, entry,
                   [ast.get_source_segment(ex_code, s) or ast.unparse(s) for s in ex_tree.body],
                   list(concepts))


def _stub_source(code: str, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The ``def`` line(s) as written plus the docstring, without a placeholder body."""
    lines = code.splitlines()
    body0 = fn.body[0]
    doc = ast.get_docstring(fn, clean=False)
    if doc is not None:
        end = body0.end_lineno  # keep the docstring
    else:
        end = body0.lineno - 1 if body0.lineno > fn.lineno else fn.lineno
    start = fn.decorator_list[0].lineno if fn.decorator_list else fn.lineno
    out = "\n".join(lines[start - 1:end]) if end <= len(lines) else ""
    if body0.lineno == fn.lineno and doc is None:  # ``def f(x): ...`` on one line: keep the def part
        head = lines[fn.lineno - 1]
        out = head[:head.rindex(":") + 1] if ":" in head else head
    return out.rstrip()


# ---------------------------------------------------------------------------- dedupe

def normalise(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).strip()


def problem_text(p: Problem) -> str:
    return normalise(p.description + " " + p.signature)


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = text.split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def dedupe(problems: Sequence[Problem], *, n: int = 3, threshold: float = 0.7,
           max_postings: int = 200) -> tuple[list[int], list[tuple[int, str, int]]]:
    """(kept indices, [(dropped index, reason, index of the earlier problem it duplicates)])."""
    kept: list[int] = []
    dropped: list[tuple[int, str, int]] = []
    exact: dict[str, int] = {}
    grams: dict[int, set] = {}
    postings: dict[tuple, list[int]] = collections.defaultdict(list)
    for i, p in enumerate(problems):
        text = problem_text(p)
        if text in exact:
            dropped.append((i, DUPLICATE, exact[text]))
            continue
        g = ngrams(text, n)
        shared: collections.Counter = collections.Counter()
        for x in g:
            post = postings.get(x)
            if post and len(post) <= max_postings:
                shared.update(post)
        match = None
        for j, _ in shared.most_common():
            if jaccard(g, grams[j]) >= threshold:
                match = j
                break
        if match is not None:
            dropped.append((i, NEAR_DUPLICATE, match))
            continue
        exact[text] = i
        grams[i] = g
        for x in g:
            postings[x].append(i)
        kept.append(i)
    return kept, dropped


# ----------------------------------------------------------------------- decontamination

@dataclasses.dataclass
class BenchmarkIndex:
    """Word n-grams of benchmark prompts: n-gram -> ids of the tasks whose prompt holds it."""

    n: int
    grams: dict[tuple[str, ...], list[str]]
    files: list[dict[str, Any]]  # {"path", "tasks"} per file, in the order given

    @property
    def tasks(self) -> int:
        return sum(f["tasks"] for f in self.files)


def _benchmark_rows(path: str) -> Iterable[dict]:
    for where, obj in jsonl.objects(path, label=f"--decontaminate={path}"):
        if not isinstance(obj.get("prompt"), str) or "task_id" not in obj:
            raise ValueError(f"{where}: expected an EvalPlus task with 'task_id' and a "
                             "string 'prompt'")
        yield obj


def benchmark_index(paths: Sequence[str], n: int = 13) -> BenchmarkIndex:
    """Indexes the ``prompt`` of every task of EvalPlus-format JSONL(.gz) files."""
    if n < 1:
        raise ValueError(f"decontaminate.ngram must be >= 1, got {n}")
    grams: dict[tuple[str, ...], list[str]] = collections.defaultdict(list)
    files = []
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"--decontaminate={path}: no such file")
        count = 0
        for obj in _benchmark_rows(path):
            tid = str(obj["task_id"])
            for g in ngrams(normalise(obj["prompt"]), n):
                if not grams[g] or grams[g][-1] != tid:
                    grams[g].append(tid)
            count += 1
        if count == 0:
            raise ValueError(f"--decontaminate={path}: no tasks in the file")
        files.append({"path": path, "tasks": count})
    return BenchmarkIndex(n, dict(grams), files)


def contamination_grams(p: Problem, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of everything a benchmark prompt could be copied into, with the parts in
    the orders benchmarks write them: a short description only forms an n-gram together with
    its neighbour, which is the def line in HumanEval (def, then docstring) and the example
    asserts in MBPP (description, then asserts)."""
    orders = ([p.description, p.signature, *p.examples],  # as the problem lists them
              [p.signature, p.description, *p.examples],  # HumanEval
              [p.description, *p.examples])  # MBPP
    return set().union(*(ngrams(normalise(" ".join(parts)), n) for parts in orders))


def benchmark_overlap(p: Problem, index: BenchmarkIndex, min_shared: int = 1
                      ) -> tuple[str, int] | None:
    """(task id, shared n-grams) of the benchmark task ``p`` overlaps most, when it shares at
    least ``min_shared`` n-grams with it; else None."""
    shared: collections.Counter = collections.Counter()
    for g in contamination_grams(p, index.n):
        shared.update(index.grams.get(g, ()))
    if not shared:
        return None
    task, k = shared.most_common(1)[0]
    return (task, k) if k >= max(min_shared, 1) else None


# ------------------------------------------------------------------ requests and output

def describe_concept(concept: str) -> str:
    kind, _, name = concept.partition(":")
    if kind == "api":
        return f"the library API `{name.removeprefix('builtins.')}`"
    if kind == "pattern":
        return f"the algorithmic pattern: {name.replace('_', ' ')}"
    return f"the Python construct: {name.replace('_', ' ')}"


@dataclasses.dataclass
class Request:
    index: int
    concepts: list[str]
    prompt: str


def make_requests(concepts: Sequence[dict[str, Any]], config) -> list[Request]:
    """``per_concept`` requests per seed concept, each with up to ``max_concepts_per_problem``."""
    rows = [c for c in concepts if c["kind"] in tuple(config.kinds)]
    if not rows:
        raise ValueError(f"no concepts of kinds {tuple(config.kinds)} in the concepts file")
    seeds = sorted(rows, key=lambda r: -int(r.get("count", 1)))
    if config.max_seed_concepts:
        seeds = seeds[:config.max_seed_concepts]
    rng = np.random.default_rng(config.seed)
    names = [r["concept"] for r in rows]
    weights = np.array([math.log1p(max(int(r.get("count", 1)), 1)) for r in rows], float)
    templates = list(config.generation_templates)
    p = weights / weights.sum()
    index = {nm: k for k, nm in enumerate(names)}
    out = []
    for seed in seeds:
        for _ in range(config.per_concept):
            extra = min(int(rng.integers(0, config.max_concepts_per_problem)), len(names) - 1)
            chosen = [seed["concept"]]
            if extra:
                # Draw one more than needed over all concepts and drop the seed if drawn: the
                # same as drawing from the others, without an O(#concepts) list per request.
                pick = [k for k in rng.choice(len(names), size=extra + 1, replace=False, p=p)
                        if k != index[seed["concept"]]][:extra]
                chosen += [names[k] for k in sorted(pick)]
            bullets = "\n".join(f"- {describe_concept(c)}" for c in chosen)
            template = templates[len(out) % len(templates)]
            out.append(Request(len(out), chosen, template.replace("{concepts}", bullets)))
    return out


def to_prompt_record(p: Problem, config) -> dict[str, Any]:
    text = problem_text(p)
    pid = f"{config.id_prefix}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]}"
    prompt = (config.solve_template.replace("{description}", p.description)
              .replace("{signature}", p.signature).replace("{examples}", "\n".join(p.examples)))
    return {"id": pid, "prompt": prompt, "entry_point": p.entry_point, "signature": p.signature,
            "concepts": list(p.concepts), "examples": list(p.examples), "description": p.description}


def process_generations(requests: Sequence[Request], generations: Sequence[Sequence[str]], config,
                        benchmarks: BenchmarkIndex | None = None
                        ) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Parse, validate, decontaminate against ``benchmarks`` (when given) and dedupe:
    (prompt records, counts, rejections with request index)."""
    if len(generations) != len(requests):
        raise ValueError(f"{len(generations)} generation lists for {len(requests)} requests")
    v = Validation(config.validation.min_description_chars, config.validation.min_examples,
                   config.validation.max_examples)
    reasons: collections.Counter = collections.Counter()
    rejected: list[dict[str, Any]] = []
    problems: list[Problem] = []
    origin: list[tuple[int, int]] = []
    total = 0
    for req, gens in zip(requests, generations):
        for k, text in enumerate(gens):
            total += 1
            res = parse_problem(text, v, req.concepts)
            if not isinstance(res, Rejection) and benchmarks is not None:
                hit = benchmark_overlap(res, benchmarks, config.decontaminate.min_shared)
                if hit is not None:
                    res = Rejection(BENCHMARK_OVERLAP, f"shares {hit[1]} word {benchmarks.n}-grams "
                                                       f"with benchmark task {hit[0]}")
            if isinstance(res, Rejection):
                reasons[res.reason] += 1
                rejected.append({"request": req.index, "sample": k, "reason": res.reason, "detail": res.detail})
            else:
                problems.append(res)
                origin.append((req.index, k))
    kept, dropped = dedupe(problems, n=config.dedupe.ngram, threshold=config.dedupe.jaccard,
                           max_postings=config.dedupe.max_postings)
    for i, reason, j in dropped:
        reasons[reason] += 1
        rejected.append({"request": origin[i][0], "sample": origin[i][1], "reason": reason,
                         "detail": f"duplicates request {origin[j][0]} sample {origin[j][1]}"})
    records = [to_prompt_record(problems[i], config) for i in kept]
    counts = {"requests": len(requests), "generations": total, "kept": len(records),
              "rejected": sum(reasons.values()), "rejected_by_reason": {r: reasons.get(r, 0) for r in REASONS}}
    assert counts["generations"] == counts["kept"] + counts["rejected"], "bookkeeping bug"
    return records, counts, sorted(rejected, key=lambda r: (r["request"], r["sample"]))


# -------------------------------------------------------------------------- I/O

def read_generations(path: str, num_requests: int) -> list[list[str]]:
    out: list[list[str] | None] = [None] * num_requests
    for where, obj in jsonl.objects(path, error=ValueError, label=f"--generations={path}"):
        try:
            k, texts = int(obj["request"]), obj["texts"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: expected {{'request': int, 'texts': [str]}} ({e})") from e
        if not 0 <= k < num_requests or not isinstance(texts, list):
            raise ValueError(f"{where}: request {k} out of range 0..{num_requests - 1}")
        out[k] = [str(t) for t in texts]
    missing = [k for k, v in enumerate(out) if v is None]
    if missing:
        raise ValueError(f"--generations={path}: no texts for requests {missing[:10]}")
    return out  # type: ignore[return-value]


if __name__ == "__main__":
    sys.exit("data_tools.synthesize is a library; the program is `python -m launch.synthesize` "
             "(same flags)")
