"""Programming concepts extracted statically from Python source trees (METHOD.md section 2,
phase 1: the concepts that problem prompts are later synthesised around).

    python -m launch.concepts --source=DIR [--source=DIR ...] --out=CONCEPTS.jsonl

Every ``*.py`` file under the source directories (hidden directories, ``__pycache__`` and
``config.exclude_dirs``, default ``site-packages,dist-packages,node_modules,venv``, are not entered:
installed third-party code is not the tree's own; symlinks are not followed) is parsed with :mod:`ast`; nothing is imported or executed.
Three kinds of concept are recorded, each occurrence with its file and line:

``api``  -- library names used, resolved through the file's imports: ``import numpy as np;
  np.sum(x)`` gives ``api:numpy.sum``, ``from collections import Counter; Counter(x)`` gives
  ``api:collections.Counter``, ``import os.path; os.path.join`` gives ``api:os.path.join``.
  The longest dotted chain rooted at an imported name is recorded (attribute reads too, e.g.
  ``api:math.pi``); calls to unshadowed builtins give ``api:builtins.NAME``, and methods on a
  string literal give ``api:str.NAME`` (``", ".join`` -> ``api:str.join``). Method calls on
  other objects are not recorded: their type is unknown statically. One alias table per file
  (the first binding of a name wins, scopes are not tracked); relative imports are
  package-internal and are not resolved; ``import *`` cannot be resolved.

``construct`` -- language constructs: comprehensions (list/set/dict), generator expressions,
  generator functions, ``yield from``, lambdas, closures (a ``def`` inside a ``def``),
  decorators (and ``property`` / ``staticmethod`` / ``classmethod``), context managers (``with``
  statements; defining one by ``__enter__``/``__exit__`` or ``contextlib.contextmanager``),
  recursion (a function calling itself by name, or a method calling ``self.NAME``/``cls.NAME``
  on its own name), exception handling (``try``/``except``, ``finally``, ``except*``,
  ``raise``, custom exception classes), classes (inheritance, dataclasses, enums, named
  tuples, abstract methods, metaclasses, data-model dunder methods, the iterator protocol),
  async functions / ``await`` / ``async with``, ``match``, walrus, f-strings, ``*args`` /
  ``**kwargs`` / keyword-only parameters, type annotations, ``global`` / ``nonlocal``,
  loop ``else``, tuple unpacking, extended (starred) unpacking, slices with a step, chained
  comparisons, conditional expressions, ``assert``. Ubiquitous statements (``def``, ``if``,
  ``for``, assignment, ``return``) are not concepts and are never emitted.

``pattern`` -- recurring algorithmic patterns, found by the syntactic heuristics below. They
  are heuristics: they find the textbook shapes, miss rewritten ones, and can fire on code
  that merely looks alike. Each is tested on a positive and a negative example.

  ============================  ===========================================================
  ``memoization``               ``@functools.cache`` / ``@functools.lru_cache``, or a dict
                                cache: ``if k in D: return D[k]`` plus a store ``D[...] = ``
                                in the same function
  ``binary_search``             a call into ``bisect``, or ``while lo < hi`` (``<``/``<=``
                                between two names) whose body assigns ``(lo + hi) // 2``
                                (or ``>> 1``, or ``lo + (hi - lo) // 2``)
  ``two_pointers``              ``while i < j`` (two names) whose body moves them towards each
                                other (``i += ...`` and ``j -= ...``), no midpoint
  ``sliding_window``            ``for r in range/enumerate(..)`` holding ``while ...: l += 1``
                                (another name) and an expression using both r and l
                                (``r - l + 1``, ``s[l:r]``); or a fixed window: the same loop
                                with ``acc -= x[r - k]``
  ``bfs_queue``                 a ``while`` loop that calls ``Q.popleft()`` (or ``Q.pop(0)``)
                                and ``Q.append``/``Q.extend`` on the same name
  ``dfs_stack``                 ``while S`` (or a test naming S) whose body calls ``S.pop()``
                                and ``S.append``/``S.extend``
  ``priority_queue_loop``       a ``while`` loop calling ``heapq.heappop``
  ``sort_with_key``             ``sorted(..., key=...)`` or ``X.sort(key=...)``
  ``extremum_with_key``         ``min(..., key=...)`` / ``max(..., key=...)``
  ``split_join_parsing``        one function both splits (``.split``, ``.rsplit``,
                                ``.splitlines``) and joins (``.join`` on a non-module)
  ``dp_table``                  ``T = [c] * n`` (or a comprehension of such rows, or of
                                comprehensions), then inside a ``for`` loop
                                ``T[...] = f(T[i - 1] ...)``: a store into T from a read of T
                                at an index computed with ``+``/``-``
  ``frequency_count``           ``d[k] = d.get(k, 0) + 1``, or ``d[k] += 1`` where d was
                                bound to ``{}``, ``dict()``, ``defaultdict(int)`` or
                                ``Counter()`` in the same function
  ``backtracking``              in a recursive function, one block with ``X.append(..)`` (or
                                ``.add``), then the recursive call, then ``X.pop()`` (or
                                ``.remove``/``.discard``)
  ``grid_directions``           ``for ... in`` a literal list/tuple of >= 4 pairs of integer
                                constants (``[(0, 1), (1, 0), (0, -1), (-1, 0)]``)
  ============================  ===========================================================

Filters (every dropped concept counted by reason in the report):

* ``private``: a dotted component starts with ``_`` (``os._exit``, ``__future__``);
* ``trivial``: builtins that nearly every program calls (:data:`TRIVIAL_BUILTINS`) and the
  builtin exception classes (exception handling is covered by the constructs);
* ``local_module`` (on by default, ``--drop_local``): APIs of the scanned trees themselves
  (top-level modules and packages found under the source directories): a repository's own
  helpers are not library concepts;
* ``below_min_count`` / ``below_min_files``: rarer than ``--min_count`` occurrences (default 2)
  or seen in fewer than ``--min_files`` files (default 1).

Concepts are deduplicated by name. Output: one JSON object a line, sorted by kind, then count
descending, then name: ``{"concept", "kind", "count", "files", "example": "path:line"}``
(``example``: the first occurrence in sorted file order; the path as found under the
``--source`` directory given). ``OUT.report.json`` holds the counts, the filter counts and
every skipped file with its reason (``too_large``, ``bad_encoding``, ``null_bytes``,
``syntax_error``, ``too_deep``) and the line where parsing failed. Skipped files never stop
the run.
"""
from __future__ import annotations

import ast
import builtins
import collections
import dataclasses
import io
import json
import logging
import os
import sys
import tokenize
import warnings
from typing import Any, Iterable, Iterator, Sequence

from fdpo import jsonl

log = logging.getLogger("data_tools.concepts")

API, CONSTRUCT, PATTERN = "api", "construct", "pattern"
KINDS = (API, CONSTRUCT, PATTERN)
# Every pattern detector, as documented in the table above (the tests hold one positive and
# one look-alike negative example for each).
PATTERNS = ("memoization", "binary_search", "two_pointers", "sliding_window", "bfs_queue", "dfs_stack",
            "priority_queue_loop", "sort_with_key", "extremum_with_key", "split_join_parsing", "dp_table",
            "frequency_count", "backtracking", "grid_directions")

# Skipped-file reasons.
TOO_LARGE = "too_large"
BAD_ENCODING = "bad_encoding"
NULL_BYTES = "null_bytes"
SYNTAX_ERROR = "syntax_error"
TOO_DEEP = "too_deep"
# Concept filter reasons.
PRIVATE = "private"
TRIVIAL = "trivial"
LOCAL_MODULE = "local_module"
BELOW_MIN_COUNT = "below_min_count"
BELOW_MIN_FILES = "below_min_files"

DEFAULT_MAX_FILE_BYTES = 2_000_000  # larger .py files are generated tables, not idiomatic code

# Builtins nearly every program uses; as concepts they would say nothing about a problem.
TRIVIAL_BUILTINS = frozenset({
    "print", "len", "range", "isinstance", "issubclass", "str", "int", "float", "bool", "list",
    "dict", "set", "tuple", "type", "super", "repr", "getattr", "setattr", "hasattr", "delattr",
    "id", "object", "callable", "format", "hash", "vars", "locals", "globals", "dir", "input",
})
_BUILTIN_NAMES = frozenset(n for n in dir(builtins) if not n.startswith("_"))
_BUILTIN_EXCEPTIONS = frozenset(n for n in _BUILTIN_NAMES
                                if isinstance(getattr(builtins, n), type)
                                and issubclass(getattr(builtins, n), BaseException))

# Data-model methods whose definition is "operator overloading / container protocol".
_DUNDER_PROTOCOL = frozenset({
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__add__", "__sub__",
    "__mul__", "__truediv__", "__floordiv__", "__mod__", "__pow__", "__neg__", "__abs__",
    "__and__", "__or__", "__xor__", "__len__", "__getitem__", "__setitem__", "__delitem__",
    "__contains__", "__call__", "__bool__", "__radd__", "__iadd__", "__matmul__",
})
_ENUM_BASES = frozenset({"enum.Enum", "enum.IntEnum", "enum.Flag", "enum.IntFlag", "enum.StrEnum"})
_MEMO_DECORATORS = frozenset({"functools.cache", "functools.lru_cache", "functools.cached_property"})
_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


# --------------------------------------------------------------------------- extraction

def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None when the chain is not rooted at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


def _walk_local(nodes: Iterable[ast.AST]) -> Iterator[ast.AST]:
    """Like ``ast.walk`` over several roots, but not into nested functions, lambdas or classes
    (their bodies are analysed as scopes of their own, so nothing is counted twice)."""
    todo = [n for n in nodes if not isinstance(n, _SCOPES)][::-1]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, _SCOPES):
                todo.append(child)


def _names_in(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _method_call(node: ast.AST, *names: str) -> ast.Call | None:
    """The call if ``node`` is ``X.m(...)`` with m in names, else None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names:
        return node
    return None


def _receiver_key(call: ast.Call) -> str:
    # Receivers compare by their source form, so ``self.queue`` and ``queue`` both work.
    return ast.dump(call.func.value)


class _FileVisitor(ast.NodeVisitor):
    """Collects (concept, kind, line) occurrences of one parsed module."""

    def __init__(self, tree: ast.Module):
        self.out: list[tuple[str, str, int]] = []
        self.aliases: dict[str, str] = {}
        self.bound: set[str] = set()  # names the file binds itself (they shadow builtins)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        self.aliases.setdefault(a.asname, a.name)
                    else:  # ``import a.b`` binds ``a``
                        top = a.name.split(".")[0]
                        self.aliases.setdefault(top, top)
            elif isinstance(node, ast.ImportFrom):
                if node.level or node.module is None:
                    for a in node.names:  # package-internal: shadows builtins, resolves to nothing
                        self.bound.add(a.asname or a.name)
                    continue
                for a in node.names:
                    if a.name != "*":
                        self.aliases.setdefault(a.asname or a.name, f"{node.module}.{a.name}")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.bound.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                self.bound.add(node.id)
            elif isinstance(node, ast.arg):
                self.bound.add(node.arg)
        self.bound -= set(self.aliases)
        self._func_depth = 0

    # -- helpers
    def add(self, concept: str, kind: str, node: ast.AST) -> None:
        self.out.append((f"{kind}:{concept}", kind, getattr(node, "lineno", 0)))

    def resolve(self, node: ast.AST) -> str | None:
        """The qualified name of a Name/Attribute chain rooted at an import, or of a builtin."""
        parts = _dotted(node)
        if parts is None:
            return None
        root = parts[0]
        if root in self.aliases:
            return ".".join([self.aliases[root]] + parts[1:])
        if len(parts) == 1 and root in _BUILTIN_NAMES and root not in self.bound:
            return "builtins." + root
        return None

    # -- API references
    def visit_Attribute(self, node: ast.Attribute) -> None:
        parts = _dotted(node)
        if parts is not None:
            if parts[0] in self.aliases:
                self.add(self.resolve(node), API, node)
            return  # the whole chain is names and attributes: nothing inside to visit
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        # ``from x import y`` then ``y``: an API reference. A bare module name is not.
        if isinstance(node.ctx, ast.Load) and node.id in self.aliases and "." in self.aliases[node.id]:
            self.add(self.aliases[node.id], API, node)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if isinstance(f, ast.Name) and f.id in _BUILTIN_NAMES and f.id not in self.bound \
                and f.id not in self.aliases:
            self.add("builtins." + f.id, API, node)
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Constant) and isinstance(f.value.value, str):
            self.add("str." + f.attr, API, node)
        if self.resolve(f) in ("collections.namedtuple", "typing.NamedTuple"):  # functional form
            self.add("namedtuple", CONSTRUCT, node)
        self.generic_visit(node)

    # -- constructs
    def _simple(name):
        def visit(self, node):
            self.add(name, CONSTRUCT, node)
            self.generic_visit(node)
        return visit

    visit_ListComp = _simple("list_comprehension")
    visit_SetComp = _simple("set_comprehension")
    visit_DictComp = _simple("dict_comprehension")
    visit_GeneratorExp = _simple("generator_expression")
    visit_YieldFrom = _simple("yield_from")
    visit_Await = _simple("await")
    visit_AsyncWith = _simple("async_with")
    visit_Global = _simple("global_statement")
    visit_Nonlocal = _simple("nonlocal_statement")
    visit_NamedExpr = _simple("walrus")
    visit_JoinedStr = _simple("f_string")
    visit_Match = _simple("match_statement")
    visit_Assert = _simple("assert")
    visit_Raise = _simple("raise")
    visit_IfExp = _simple("conditional_expression")
    visit_Lambda = _simple("lambda")
    visit_TryStar = _simple("exception_group")
    del _simple

    def visit_With(self, node: ast.With) -> None:
        self.add("with_statement", CONSTRUCT, node)
        self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        if node.handlers:
            self.add("try_except", CONSTRUCT, node)
        if node.finalbody:
            self.add("try_finally", CONSTRUCT, node)
        self.generic_visit(node)

    def _loop(self, node):
        if node.orelse:
            self.add("loop_else", CONSTRUCT, node)
        self.generic_visit(node)

    visit_For = visit_While = visit_AsyncFor = _loop

    def visit_Assign(self, node: ast.Assign) -> None:
        for t in node.targets:
            if isinstance(t, (ast.Tuple, ast.List)):
                self.add("tuple_unpacking", CONSTRUCT, node)
                if any(isinstance(e, ast.Starred) for e in t.elts):
                    self.add("extended_unpacking", CONSTRUCT, node)
        self.generic_visit(node)

    def visit_Slice(self, node: ast.Slice) -> None:
        if node.step is not None:
            self.add("slice_step", CONSTRUCT, node)
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        if len(node.ops) > 1:
            self.add("chained_comparison", CONSTRUCT, node)
        self.generic_visit(node)

    def _decorators(self, node) -> list[str]:
        out = []
        for d in node.decorator_list:
            target = d.func if isinstance(d, ast.Call) else d
            out.append(self.resolve(target) or ".".join(_dotted(target) or ["?"]))
        return out

    def _function(self, node) -> None:
        decos = self._decorators(node)
        if decos:
            self.add("decorator", CONSTRUCT, node)
        for d in decos:
            short = d.rsplit(".", 1)[-1]
            if d in ("builtins.property", "builtins.staticmethod", "builtins.classmethod"):
                self.add(short, CONSTRUCT, node)
            elif d in ("contextlib.contextmanager", "contextlib.asynccontextmanager"):
                self.add("context_manager_definition", CONSTRUCT, node)
            elif d == "abc.abstractmethod":
                self.add("abstract_method", CONSTRUCT, node)
            elif d in _MEMO_DECORATORS:
                self.add("memoization", PATTERN, node)
        if isinstance(node, ast.AsyncFunctionDef):
            self.add("async_function", CONSTRUCT, node)
        if self._func_depth:
            self.add("closure", CONSTRUCT, node)
        a = node.args
        if a.vararg:
            self.add("varargs", CONSTRUCT, node)
        if a.kwarg:
            self.add("kwargs", CONSTRUCT, node)
        if a.kwonlyargs:
            self.add("keyword_only_args", CONSTRUCT, node)
        if node.returns is not None or any(x.annotation is not None for x in
                                           a.posonlyargs + a.args + a.kwonlyargs):
            self.add("type_annotations", CONSTRUCT, node)
        local = list(_walk_local(node.body))
        if any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in local):
            self.add("generator_function", CONSTRUCT, node)
        recursive = self._is_recursive(node, local)
        if recursive:
            self.add("recursion", CONSTRUCT, node)
        self._patterns(local, node if recursive else None)
        self._func_depth += 1
        self.generic_visit(node)
        self._func_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def _is_recursive(self, fn, local) -> bool:
        for n in local:
            if isinstance(n, ast.Call):
                f = n.func
                if isinstance(f, ast.Name) and f.id == fn.name:
                    return True
                if (isinstance(f, ast.Attribute) and f.attr == fn.name and isinstance(f.value, ast.Name)
                        and f.value.id in ("self", "cls")):
                    return True
        return False

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.add("class", CONSTRUCT, node)
        bases = [self.resolve(b) or ".".join(_dotted(b) or ["?"]) for b in node.bases]
        bases = [b for b in bases if b != "builtins.object"]
        if bases:
            self.add("inheritance", CONSTRUCT, node)
        for b in bases:
            short = b.rsplit(".", 1)[-1]
            if (b.startswith("builtins.") and short in _BUILTIN_EXCEPTIONS) or short.endswith(("Error", "Exception")):
                self.add("custom_exception", CONSTRUCT, node)
            if b in _ENUM_BASES:
                self.add("enum", CONSTRUCT, node)
            if b == "typing.NamedTuple":
                self.add("namedtuple", CONSTRUCT, node)
            if b in ("abc.ABC", "typing.Protocol"):
                self.add("abstract_base_class", CONSTRUCT, node)
        if any(k.arg == "metaclass" for k in node.keywords):
            self.add("metaclass", CONSTRUCT, node)
        decos = self._decorators(node)
        if decos:
            self.add("decorator", CONSTRUCT, node)
        if any(d in ("dataclasses.dataclass", "attr.s", "attrs.define") for d in decos):
            self.add("dataclass", CONSTRUCT, node)
        methods = {s.name for s in node.body if isinstance(s, _FUNCS)}
        if {"__enter__", "__exit__"} <= methods or {"__aenter__", "__aexit__"} <= methods:
            self.add("context_manager_definition", CONSTRUCT, node)
        if "__iter__" in methods or "__next__" in methods:
            self.add("iterator_protocol", CONSTRUCT, node)
        if methods & _DUNDER_PROTOCOL:
            self.add("dunder_methods", CONSTRUCT, node)
        self.generic_visit(node)

    def visit_Module(self, node: ast.Module) -> None:
        self._patterns(list(_walk_local(node.body)), None)  # script-level code has patterns too
        self.generic_visit(node)

    # -- patterns (one scope: a function body or the module's top level)
    def _patterns(self, local: list[ast.AST], recursive_fn) -> None:
        add = lambda name, node: self.add(name, PATTERN, node)  # noqa: E731
        stores = {ast.dump(n.value) for n in local if isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store)}
        dict_like = set()  # names bound to an empty dict / counter in this scope
        tables = set()  # names bound to a list-of-constants table (``[0] * n`` and 2-D variants)
        splits = joins = None
        for n in local:
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
                v, name = n.value, n.targets[0].id
                if isinstance(v, ast.Dict) and not v.keys:
                    dict_like.add(name)
                elif isinstance(v, ast.Call) and self.resolve(v.func) in (
                        "builtins.dict", "collections.Counter", "collections.defaultdict") and not (
                        self.resolve(v.func) == "collections.defaultdict"
                        and (not v.args or self.resolve(v.args[0]) != "builtins.int")):
                    dict_like.add(name)
                if _is_table(v):
                    tables.add(name)
            if isinstance(n, ast.Call):
                q = self.resolve(n.func)
                if q is not None and q.startswith("bisect."):
                    add("binary_search", n)
                if any(k.arg == "key" for k in n.keywords):
                    if q == "builtins.sorted" or (isinstance(n.func, ast.Attribute) and n.func.attr == "sort"):
                        add("sort_with_key", n)
                    elif q in ("builtins.min", "builtins.max"):
                        add("extremum_with_key", n)
                if _method_call(n, "split", "rsplit", "splitlines") and splits is None:
                    splits = n
                if _method_call(n, "join") and joins is None and (
                        _dotted(n.func.value) is None or _dotted(n.func.value)[0] not in self.aliases):
                    joins = n
            if isinstance(n, ast.If) and isinstance(n.test, ast.Compare) and len(n.test.ops) == 1 \
                    and isinstance(n.test.ops[0], ast.In):
                cache = ast.dump(n.test.comparators[0])
                if cache in stores and any(isinstance(r, ast.Return) and isinstance(r.value, ast.Subscript)
                                           and ast.dump(r.value.value) == cache for r in n.body):
                    add("memoization", n)
            if isinstance(n, ast.While):
                self._while_patterns(n, add)
            if isinstance(n, ast.For):
                self._for_patterns(n, add, tables)
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Subscript):
                t, v = n.targets[0], n.value
                # d[k] = d.get(k, 0) + 1
                if (isinstance(v, ast.BinOp) and isinstance(v.op, ast.Add) and _method_call(v.left, "get")
                        and ast.dump(v.left.func.value) == ast.dump(t.value)):
                    add("frequency_count", n)
            if (isinstance(n, ast.AugAssign) and isinstance(n.op, ast.Add) and isinstance(n.target, ast.Subscript)
                    and isinstance(n.target.value, ast.Name) and n.target.value.id in dict_like
                    and isinstance(n.value, ast.Constant) and n.value.value == 1):
                add("frequency_count", n)
        if splits is not None and joins is not None:
            add("split_join_parsing", splits)
        if recursive_fn is not None:
            self._backtracking(recursive_fn, local, add)

    def _while_patterns(self, n: ast.While, add) -> None:
        body = list(_walk_local(n.body))
        t = n.test
        if (isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.left, ast.Name)
                and isinstance(t.comparators[0], ast.Name)):
            lo, hi = t.left.id, t.comparators[0].id
            if isinstance(t.ops[0], (ast.Lt, ast.LtE)) and any(_is_midpoint(b, lo, hi) for b in body):
                add("binary_search", n)
            else:
                inc = {b.target.id for b in body if isinstance(b, ast.AugAssign) and isinstance(b.target, ast.Name)
                       and isinstance(b.op, ast.Add)}
                dec = {b.target.id for b in body if isinstance(b, ast.AugAssign) and isinstance(b.target, ast.Name)
                       and isinstance(b.op, ast.Sub)}
                if (lo in inc and hi in dec) or (hi in inc and lo in dec):
                    add("two_pointers", n)
        test_names = _names_in(t)
        calls = [b for b in body if isinstance(b, ast.Call) and isinstance(b.func, ast.Attribute)]
        pushed = {_receiver_key(c) for c in calls if c.func.attr in ("append", "extend", "appendleft")}
        for c in calls:
            key = _receiver_key(c)
            if key not in pushed:
                continue
            if c.func.attr == "popleft" or (c.func.attr == "pop" and len(c.args) == 1
                                            and isinstance(c.args[0], ast.Constant) and c.args[0].value == 0):
                add("bfs_queue", n)
                break
            if c.func.attr == "pop" and not c.args and isinstance(c.func.value, ast.Name) \
                    and c.func.value.id in test_names:
                add("dfs_stack", n)
                break
        if any(isinstance(b, ast.Call) and self.resolve(b.func) == "heapq.heappop" for b in body):
            add("priority_queue_loop", n)

    def _for_patterns(self, n: ast.For, add, tables: set[str]) -> None:
        body = list(_walk_local(n.body))
        # grid directions: for dx, dy in [(0, 1), (1, 0), (0, -1), (-1, 0)]
        if isinstance(n.iter, (ast.List, ast.Tuple)) and len(n.iter.elts) >= 4 and all(
                isinstance(e, ast.Tuple) and len(e.elts) == 2 and all(_int_const(x) for x in e.elts)
                for e in n.iter.elts):
            add("grid_directions", n)
        if isinstance(n.target, (ast.Name, ast.Tuple)) and isinstance(n.iter, ast.Call) \
                and self.resolve(n.iter.func) in ("builtins.range", "builtins.enumerate"):
            # The right edge is the loop index (``for r in range`` / ``for r, x in enumerate``).
            r = n.target.id if isinstance(n.target, ast.Name) else getattr(n.target.elts[0], "id", None)
            # Variable window: an inner while advances a left edge l, and some expression uses
            # both edges (``r - l + 1``, ``s[l:r]``).
            both = [b for b in body if isinstance(b, (ast.BinOp, ast.Slice))]
            for w in body:
                if isinstance(w, ast.While):
                    moved = {b.target.id for b in _walk_local(w.body) if isinstance(b, ast.AugAssign)
                             and isinstance(b.op, ast.Add) and isinstance(b.target, ast.Name)} - {r}
                    if any({r, left} <= _names_in(b) for b in both for left in moved):
                        add("sliding_window", n)
                        break
            else:
                # Fixed window: ``acc -= x[r - k]`` (the element leaving the window).
                for b in body:
                    if (isinstance(b, ast.AugAssign) and isinstance(b.op, ast.Sub)
                            and any(isinstance(s, ast.Subscript) and isinstance(s.slice, ast.BinOp)
                                    and isinstance(s.slice.op, ast.Sub) and isinstance(s.slice.left, ast.Name)
                                    and s.slice.left.id == r for s in ast.walk(b.value))):
                        add("sliding_window", n)
                        break
        for b in body:
            if isinstance(b, ast.Assign) and len(b.targets) == 1 and isinstance(b.targets[0], ast.Subscript):
                root = _subscript_root(b.targets[0])
                if root in tables and any(
                        isinstance(s, ast.Subscript) and _subscript_root(s) == root and any(
                            isinstance(ix, ast.BinOp) and isinstance(ix.op, (ast.Add, ast.Sub))
                            for ix in ast.walk(s.slice)) for s in ast.walk(b.value)):
                    add("dp_table", b)
                    return

    def _backtracking(self, fn, local, add) -> None:
        for n in [fn] + local:
            for field in ("body", "orelse"):
                stmts = getattr(n, field, None)
                if not isinstance(stmts, list):
                    continue
                state = {}  # receiver -> stage (1: pushed, 2: recursed after the push)
                for s in stmts:
                    if not isinstance(s, ast.Expr):
                        if state and any(isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
                                         and c.func.id == fn.name for c in ast.walk(s)):
                            state = {k: 2 for k in state}
                        continue
                    call = s.value
                    if _method_call(call, "append", "add"):
                        state[_receiver_key(call)] = 1
                    elif _method_call(call, "pop", "remove", "discard") and state.get(_receiver_key(call)) == 2:
                        add("backtracking", s)
                        return
                    elif any(isinstance(c, ast.Call) and ((isinstance(c.func, ast.Name) and c.func.id == fn.name)
                             or (isinstance(c.func, ast.Attribute) and c.func.attr == fn.name))
                             for c in ast.walk(call)):
                        state = {k: 2 for k in state}


def _int_const(x: ast.AST) -> bool:
    if isinstance(x, ast.UnaryOp) and isinstance(x.op, ast.USub):
        x = x.operand
    return isinstance(x, ast.Constant) and type(x.value) is int


def _is_midpoint(node: ast.AST, lo: str, hi: str) -> bool:
    """``m = (lo + hi) // 2``, ``(lo + hi) >> 1``, ``lo + (hi - lo) // 2`` (any assignment)."""
    if not isinstance(node, ast.Assign):
        return False
    v = node.value
    halves = [b for b in ast.walk(v) if isinstance(b, ast.BinOp) and (
        (isinstance(b.op, ast.FloorDiv) and isinstance(b.right, ast.Constant) and b.right.value == 2)
        or (isinstance(b.op, ast.RShift) and isinstance(b.right, ast.Constant) and b.right.value == 1))]
    return bool(halves) and {lo, hi} <= _names_in(v)


def _is_table(v: ast.AST) -> bool:
    """``[c] * n``, ``[[c] * m for _ in ...]``, ``[[c for ..] for ..]``."""
    if isinstance(v, ast.BinOp) and isinstance(v.op, ast.Mult):
        return isinstance(v.left, ast.List) or isinstance(v.right, ast.List)
    if isinstance(v, ast.ListComp):
        return _is_table(v.elt) or isinstance(v.elt, ast.ListComp)
    return False


def _subscript_root(s: ast.AST) -> str | None:
    while isinstance(s, ast.Subscript):
        s = s.value
    return s.id if isinstance(s, ast.Name) else None


def extract(tree: ast.Module) -> list[tuple[str, str, int]]:
    """(concept, kind, line) for every occurrence in one parsed module, unfiltered."""
    v = _FileVisitor(tree)
    v.visit(tree)
    return v.out


# --------------------------------------------------------------------------------- reading

@dataclasses.dataclass
class Skip:
    path: str
    reason: str
    line: int | None
    detail: str


def parse_file(path: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> ast.Module | Skip:
    """The module's AST, or why it was skipped (never raises for bad content)."""
    size = os.path.getsize(path)
    if size > max_bytes:
        return Skip(path, TOO_LARGE, None, f"{size} bytes > --max_file_bytes={max_bytes}")
    with open(path, "rb") as f:
        data = f.read()
    # PEP 263: honour a coding cookie (and a UTF-8 BOM); default UTF-8.
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        text = data.decode(encoding)
    except SyntaxError as e:  # unknown cookie, or bytes that are not UTF-8 in the first two lines
        line = getattr(e, "lineno", None)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as u:
            line = line or data[:u.start].count(b"\n") + 1
        return Skip(path, BAD_ENCODING, line, str(e))
    except (UnicodeDecodeError, LookupError) as e:
        line = data[:e.start].count(b"\n") + 1 if isinstance(e, UnicodeDecodeError) else None
        return Skip(path, BAD_ENCODING, line, str(e))
    if "\x00" in text:  # ast refuses them (ValueError or SyntaxError depending on the version)
        return Skip(path, NULL_BYTES, text[:text.index("\x00")].count("\n") + 1, "source contains a null byte")
    try:
        with warnings.catch_warnings():  # e.g. invalid escape sequences: legal, only noisy
            warnings.simplefilter("ignore")
            return ast.parse(text, filename=path)
    except SyntaxError as e:
        return Skip(path, SYNTAX_ERROR, e.lineno, e.msg)
    except ValueError as e:  # "source code string cannot contain null bytes"
        return Skip(path, NULL_BYTES, None, str(e))
    except (RecursionError, MemoryError) as e:
        return Skip(path, TOO_DEEP, None, type(e).__name__)


DEFAULT_EXCLUDE_DIRS = ("site-packages", "dist-packages", "node_modules", "venv")


def iter_python_files(sources: Sequence[str], exclude_dirs: Sequence[str] = DEFAULT_EXCLUDE_DIRS) -> list[str]:
    """Sorted ``*.py`` paths; hidden directories, ``__pycache__`` and ``exclude_dirs`` (by name:
    installed third-party code is not the tree's own) are not entered."""
    out = []
    skip = set(exclude_dirs) | {"__pycache__"}
    for src in sources:
        if os.path.isfile(src) and src.endswith(".py"):
            out.append(src)
            continue
        if not os.path.isdir(src):
            raise FileNotFoundError(f"--source={src}: not a directory or .py file")
        for root, dirs, files in os.walk(src):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skip)
            out.extend(os.path.join(root, f) for f in sorted(files) if f.endswith(".py"))
    return out


def local_modules(sources: Sequence[str], files: Sequence[str]) -> set[str]:
    """Top-level module and package names of the scanned trees (their own APIs)."""
    names = set()
    for src in sources:
        if os.path.isfile(src):
            names.add(os.path.splitext(os.path.basename(src))[0])
            continue
        src = os.path.abspath(src)
        if os.path.isfile(os.path.join(src, "__init__.py")):
            names.add(os.path.basename(src))  # the source directory is itself a package
        for path in files:
            rel = os.path.relpath(os.path.abspath(path), src)
            if rel.startswith(".."):
                continue
            first = rel.split(os.sep)[0]
            names.add(os.path.splitext(first)[0])
    return names


# ------------------------------------------------------------------------------ the table

@dataclasses.dataclass(frozen=True)
class Filters:
    min_count: int = 2
    min_files: int = 1
    drop_local: bool = True


def filter_reason(concept: str, kind: str, count: int, files: int, filters: Filters,
                  local: set[str]) -> str | None:
    """Why a concept is dropped, or None to keep it (order: private, trivial, local, rarity)."""
    name = concept.split(":", 1)[1]
    if kind == API:
        parts = name.split(".")
        if any(p.startswith("_") for p in parts):
            return PRIVATE
        if parts[0] == "builtins" and (parts[-1] in TRIVIAL_BUILTINS or parts[-1] in _BUILTIN_EXCEPTIONS):
            return TRIVIAL
        if filters.drop_local and parts[0] in local and parts[0] not in ("builtins", "str"):
            return LOCAL_MODULE
    if count < filters.min_count:
        return BELOW_MIN_COUNT
    if files < filters.min_files:
        return BELOW_MIN_FILES
    return None


class ConceptTable:
    """Occurrence counts, file counts and the first example of every concept."""

    def __init__(self):
        self.count: collections.Counter = collections.Counter()
        self.files: collections.Counter = collections.Counter()
        self.kind: dict[str, str] = {}
        self.example: dict[str, str] = {}

    def add_file(self, path: str, occurrences: Iterable[tuple[str, str, int]]) -> None:
        seen = set()
        for concept, kind, line in occurrences:
            self.count[concept] += 1
            self.kind[concept] = kind
            if concept not in seen:
                seen.add(concept)
                self.files[concept] += 1
            self.example.setdefault(concept, f"{path}:{line}")

    def rows(self, filters: Filters, local: set[str]) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
        """(kept rows, {reason: {"concepts": n, "occurrences": m}})."""
        rows, dropped = [], {}
        for c, n in self.count.items():
            reason = filter_reason(c, self.kind[c], n, self.files[c], filters, local)
            if reason is None:
                rows.append({"concept": c, "kind": self.kind[c], "count": n, "files": self.files[c],
                             "example": self.example[c]})
            else:
                d = dropped.setdefault(reason, {"concepts": 0, "occurrences": 0})
                d["concepts"] += 1
                d["occurrences"] += n
        rows.sort(key=lambda r: (KINDS.index(r["kind"]), -r["count"], r["concept"]))
        return rows, dict(sorted(dropped.items()))


def scan(sources: Sequence[str], filters: Filters = Filters(), *, progress: bool = False,
         max_bytes: int = DEFAULT_MAX_FILE_BYTES,
         exclude_dirs: Sequence[str] = DEFAULT_EXCLUDE_DIRS) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Extracts, deduplicates and filters the concepts of ``sources``: (rows, report)."""
    from tqdm import tqdm

    files = iter_python_files(sources, exclude_dirs)
    local = local_modules(sources, files) if filters.drop_local else set()
    table = ConceptTable()
    skipped: list[Skip] = []
    for path in tqdm(files, desc="concepts", unit=" files", disable=not progress, file=sys.stderr):
        tree = parse_file(path, max_bytes)
        if isinstance(tree, Skip):
            skipped.append(tree)
            continue
        try:
            occ = extract(tree)
        except RecursionError:  # pathologically nested expressions
            skipped.append(Skip(path, TOO_DEEP, None, "RecursionError while visiting"))
            continue
        table.add_file(path, occ)
    rows, dropped = table.rows(filters, local)
    reasons = collections.Counter(s.reason for s in skipped)
    report = {
        "files_seen": len(files),
        "files_parsed": len(files) - len(skipped),
        "files_skipped": len(skipped),
        "skip_reasons": dict(sorted(reasons.items())),
        "occurrences": sum(table.count.values()),
        "concepts_found": len(table.count),
        "concepts_written": len(rows),
        "concepts_by_kind": dict(collections.Counter(r["kind"] for r in rows)),
        "filtered": dropped,
        "filters": dataclasses.asdict(filters),
        "local_modules": len(local),
        "skipped": [dataclasses.asdict(s) for s in skipped],
    }
    return rows, report


def write_jsonl(path: str, rows: Iterable[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_concepts(path: str) -> list[dict[str, Any]]:
    """Reads a concepts JSONL file; malformed lines raise with the line number."""
    out = []
    for where, obj in jsonl.objects(path):
        if not isinstance(obj.get("concept"), str) or obj.get("kind") not in KINDS:
            raise ValueError(f"{where}: expected {{'concept': str, 'kind': one of {KINDS}, ...}}")
        out.append(obj)
    return out


if __name__ == "__main__":
    sys.exit("data_tools.concepts is a library; the program is `python -m launch.concepts` "
             "(filters under --config.*, e.g. --config.min_count=2)")
