"""Single-point, AST-located mutations of a Python program (for labelled ranker data).

Each mutant differs from the original source in exactly one place: the site is found on the
AST, and the edit is spliced into the original text at the node's position, so formatting,
comments and everything else stay byte-identical (the mutant is a realistic "one error point"
sample). Kinds:

``arith``       binary / augmented operators: ``+``<->``-``, ``*``->``//``, ``//``->``*``,
                ``/``->``*``, ``%``->``//``, ``**``->``*``
``compare``     ``<``<->``<=``, ``>``<->``>=``, ``==``<->``!=``
``constant``    integer literal ``n`` -> ``n+1`` or ``n-1``; ``True``<->``False``
``off_by_one``  ``range`` bounds (the stop argument, or the start when there are two or three
                arguments), slice bounds and plain subscript indices: ``x`` -> ``x + 1`` /
                ``x - 1`` (the expression is parenthesised when it is not atomic)
``boolean``     ``and``<->``or`` (the first operator of the chain), ``not x`` -> ``x``,
                ``in``<->``not in`` (filed under ``compare``)
``name``        called builtin or method swapped with a sibling: ``min``<->``max``,
                ``any``<->``all``, ``lower``<->``upper``, ``startswith``<->``endswith``, ...
                (``_NAME_SWAP``), and ``sorted(x)`` -> ``sorted(x, reverse=True)``
``constant`` also covers string literals other than docstrings and f-string parts: a
                non-empty string loses its last character, ``''`` becomes ``' '``.

Only sites starting at or after character offset ``start`` are mutated (e.g. the completion
after a prompt). Annotations are never mutated. Strings (docstrings included) are never
touched.

:func:`mutants` is deterministic for a seed: the candidate edits of each kind are shuffled
with ``random.Random(seed)``, the kinds are visited round-robin in a shuffled order, and each
edit is applied to the original. A candidate is skipped, and counted, when the mutant is
textually identical to the original (``identical``) or to an earlier mutant (``duplicate``),
or does not compile (``compile_error``).
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import random
import re

KINDS = ("arith", "compare", "constant", "off_by_one", "boolean", "name")

_BINOP_SWAP = {
    ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "//"),
    ast.FloorDiv: ("//", "*"), ast.Div: ("/", "*"), ast.Mod: ("%", "//"), ast.Pow: ("**", "*"),
}
_CMP_SWAP = {
    ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
    ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="),
}
_BOOL_SWAP = {ast.And: ("and", "or"), ast.Or: ("or", "and")}
# Builtins / methods swapped with a sibling of the same signature (``name`` kind).
_NAME_SWAP = {
    "min": "max", "max": "min", "any": "all", "all": "any", "lower": "upper", "upper": "lower",
    "isupper": "islower", "islower": "isupper", "startswith": "endswith",
    "endswith": "startswith", "isdigit": "isalpha", "isalpha": "isdigit", "lstrip": "rstrip",
    "rstrip": "lstrip", "index": "rindex", "rindex": "index", "find": "rfind", "rfind": "find",
}


@dataclasses.dataclass(frozen=True)
class Edit:
    kind: str
    start: int  # character offsets into the source, [start, end) replaced by `text`
    end: int
    text: str
    description: str


@dataclasses.dataclass
class MutationStats:
    candidates: int = 0
    produced: int = 0
    identical: int = 0
    duplicate: int = 0
    compile_error: int = 0
    by_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class _Offsets:
    """(lineno, col_offset in UTF-8 bytes) -> character offset in the source."""

    def __init__(self, source: str):
        self.lines = source.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def __call__(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1] if lineno - 1 < len(self.lines) else ""
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col].decode("utf-8", "replace"))


def _span(node, off: _Offsets) -> tuple[int, int]:
    return off(node.lineno, node.col_offset), off(node.end_lineno, node.end_col_offset)


def _find_op(source: str, lo: int, hi: int, symbol: str) -> int | None:
    """Offset of the single operator `symbol` in source[lo:hi] (the gap between two operands,
    which holds only brackets, whitespace, comments and the operator), or None if not unique."""
    gap = source[lo:hi]
    # Blank out comments so a `#` ... `+` in a comment is not matched.
    gap = re.sub(r"#[^\n]*", lambda m: " " * len(m.group()), gap)
    if symbol.isalpha():
        pattern = r"(?<![A-Za-z0-9_])" + symbol + r"(?![A-Za-z0-9_])"
    else:
        pattern = r"(?<![-+*/%<>=!])" + re.escape(symbol) + r"(?![-+*/%<>=!])"
    hits = [m.start() for m in re.finditer(pattern, gap)]
    return lo + hits[0] if len(hits) == 1 else None


def _atomic(node) -> bool:
    return isinstance(node, (ast.Name, ast.Constant, ast.Attribute, ast.Call, ast.Subscript,
                             ast.List, ast.Tuple, ast.Dict, ast.Set))


def _shift(node, source, off, delta: str) -> Edit | None:
    """Edit replacing expression `node` by `node + 1` / `node - 1`."""
    s, e = _span(node, off)
    text = source[s:e]
    if not _atomic(node) or "\n" in text:
        text = f"({text})"
    return Edit("off_by_one", s, e, f"{text} {delta}", "")


def _iter_nodes(tree):
    """ast.walk in a fixed order, without descending into annotations."""
    todo = collections.deque([tree])
    while todo:
        node = todo.popleft()
        yield node
        for name, value in ast.iter_fields(node):
            if name in ("annotation", "returns", "type_comment"):
                continue
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, ast.AST):
                    todo.append(item)


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def candidate_edits(source: str, start: int = 0) -> list[Edit]:
    """All candidate single-point edits (in AST order) at or after offset `start`."""
    tree = ast.parse(source)
    off = _Offsets(source)
    edits: list[Edit] = []
    # Docstrings and f-string parts are never mutated.
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(x) for x in ast.walk(node))
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                skip.add(id(body[0].value))

    def line_of(pos):
        return source.count("\n", 0, pos) + 1

    def add(edit: Edit | None, what: str):
        if edit is not None and edit.start >= start:
            desc = f"{edit.kind}: {what} (line {line_of(edit.start)})"
            edits.append(dataclasses.replace(edit, description=desc))

    for node in _iter_nodes(tree):
        if isinstance(node, (ast.BinOp, ast.AugAssign)):
            left = node.left if isinstance(node, ast.BinOp) else node.target
            right = node.right if isinstance(node, ast.BinOp) else node.value
            swap = _BINOP_SWAP.get(type(node.op))
            if swap:
                old, new = swap
                if isinstance(node, ast.AugAssign):
                    old, new = old + "=", new + "="
                lo, hi = _span(left, off)[1], _span(right, off)[0]
                pos = _find_op(source, lo, hi, old)
                if pos is not None:
                    add(Edit("arith", pos, pos + len(old), new, ""), f"{old} -> {new}")
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for k, op in enumerate(node.ops):
                lo, hi = _span(operands[k], off)[1], _span(operands[k + 1], off)[0]
                swap = _CMP_SWAP.get(type(op))
                if swap:
                    old, new = swap
                    pos = _find_op(source, lo, hi, old)
                    if pos is not None:
                        add(Edit("compare", pos, pos + len(old), new, ""), f"{old} -> {new}")
                elif isinstance(op, ast.In):
                    pos = _find_op(source, lo, hi, "in")
                    if pos is not None:
                        add(Edit("compare", pos, pos + 2, "not in", ""), "in -> not in")
                elif isinstance(op, ast.NotIn):
                    m = re.search(r"\bnot\s+in\b", source[lo:hi])
                    if m is not None:
                        add(Edit("compare", lo + m.start(), lo + m.end(), "in", ""), "not in -> in")
        elif isinstance(node, ast.BoolOp):
            old, new = _BOOL_SWAP[type(node.op)]
            lo, hi = _span(node.values[0], off)[1], _span(node.values[1], off)[0]
            pos = _find_op(source, lo, hi, old)
            if pos is not None:
                add(Edit("boolean", pos, pos + len(old), new, ""), f"{old} -> {new}")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            s, e = _span(node, off)
            os_, oe = _span(node.operand, off)
            text = source[os_:oe]
            if not _atomic(node.operand) and not isinstance(node.operand, ast.Compare):
                text = f"({text})"
            add(Edit("boolean", s, e, text, ""), "drop `not`")
        elif isinstance(node, ast.Constant):
            if id(node) in skip:
                continue
            s, e = _span(node, off)
            if isinstance(node.value, str):
                old = source[s:e]
                if not re.fullmatch(r"[rRbBuU]?(\'[^\'\\\n]*\'|\"[^\"\\\n]*\")", old):
                    continue  # only simple one-line literals without escapes
                quote = old[-1]
                body = old[old.index(quote) + 1:-1]
                new = old[: old.index(quote) + 1] + (body[:-1] if body else " ") + quote
                add(Edit("constant", s, e, new, ""), f"{old} -> {new}")
            elif isinstance(node.value, bool):
                new = "False" if node.value else "True"
                add(Edit("constant", s, e, new, ""), f"{node.value} -> {new}")
            elif isinstance(node.value, int):
                for d in (1, -1):
                    new = str(node.value + d)
                    add(Edit("constant", s, e, new, ""), f"{node.value} -> {new}")
        elif isinstance(node, ast.Call) and _callee(node) in _NAME_SWAP:
            f = node.func
            s, e = _span(f, off)
            if isinstance(f, ast.Attribute):
                s = e - len(f.attr)
                if source[s:e] != f.attr:
                    continue
            add(Edit("name", s, e, _NAME_SWAP[_callee(node)], ""),
                f"{_callee(node)} -> {_NAME_SWAP[_callee(node)]}")
        elif (isinstance(node, ast.Call) and _callee(node) == "sorted" and len(node.args) == 1
              and not any(k.arg == "reverse" for k in node.keywords)):
            e = _span(node, off)[1]
            if source[e - 1] == ")":
                add(Edit("name", e - 1, e, ", reverse=True)", ""), "sorted(..., reverse=True)")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "range" and 1 <= len(node.args) <= 3 and not node.keywords):
            bounds = [("stop", node.args[0] if len(node.args) == 1 else node.args[1])]
            if len(node.args) >= 2:
                bounds.append(("start", node.args[0]))
            for which, arg in bounds:
                for d in ("+ 1", "- 1"):
                    add(_shift(arg, source, off, d), f"range {which} {d}")
        elif isinstance(node, ast.Slice):
            for which in ("lower", "upper"):
                bound = getattr(node, which)
                if bound is not None:
                    for d in ("+ 1", "- 1"):
                        add(_shift(bound, source, off, d), f"slice {which} {d}")
        elif (isinstance(node, ast.Subscript) and not isinstance(node.slice, (ast.Slice, ast.Tuple))
              and not (isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str))):
            for d in ("+ 1", "- 1"):
                add(_shift(node.slice, source, off, d), f"index {d}")
    return edits


def apply(source: str, edit: Edit) -> str:
    return source[: edit.start] + edit.text + source[edit.end:]


def mutants(source: str, n: int, seed: int = 0, start: int = 0,
            kinds: tuple[str, ...] = KINDS) -> tuple[list[tuple[str, str]], MutationStats]:
    """Up to `n` distinct compiling single-point mutants of `source`, as
    (mutated_source, description), and the counts of what was skipped (module docstring)."""
    rng = random.Random(seed)
    stats = MutationStats()
    per_kind: dict[str, list[Edit]] = {k: [] for k in kinds}
    for e in candidate_edits(source, start):
        if e.kind in per_kind:
            per_kind[e.kind].append(e)
    stats.candidates = sum(len(v) for v in per_kind.values())
    order = list(kinds)
    rng.shuffle(order)
    for k in order:
        rng.shuffle(per_kind[k])
    queues = [collections.deque(per_kind[k]) for k in order]
    out: list[tuple[str, str]] = []
    seen = {source}
    while len(out) < n and any(queues):
        for q in queues:
            if not q or len(out) >= n:
                continue
            edit = q.popleft()
            text = apply(source, edit)
            if text == source:
                stats.identical += 1
                continue
            if text in seen:
                stats.duplicate += 1
                continue
            try:
                compile(text, "<mutant>", "exec")
            except (SyntaxError, ValueError):
                stats.compile_error += 1
                continue
            seen.add(text)
            out.append((text, edit.description))
            stats.by_kind[edit.kind] += 1
    stats.produced = len(out)
    return out, stats
