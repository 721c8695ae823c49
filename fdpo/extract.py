"""Programs and assertions out of model responses (pure Python, no jax).

One extractor for every user: the data stage (`fdpo.selfgen`, `fdpo.continuation`) and the
evaluation (`fdpo.evaluation.generation`) both read programs with `program_from_response`,
so a response means the same program when it is sampled for training data and when it is
scored on a benchmark. Rules, in order (documented in docs/sampling.md):

Fenced blocks are Markdown fences, ```` ```lang ```` ... ```` ``` ````, whose language tag is
empty or Python (`python`, `py`, `python3`, `py3`, case-insensitive, anything after the
first character that is not a letter, digit, `_` or `-` ignored, as in ```` ```python:a.py ````);
blocks in other languages (bash, text, output, ...) are ignored. An opening fence that is
never closed (a response cut by max_new_tokens) counts as a block running to the end, kept
as written (a line cut in the middle stays; `sanitize` drops it). A block whose lines are
all indented (a fence inside a list item) is dedented.

`extract_program(response, entry_point=None)`, among the non-empty Python blocks: the
longest of those defining `entry_point` at their top level (a `def`, `async def` or
`class` of that name); else the longest of those defining any function or class other than
tests (`test*` functions, `Test*` classes: a tests block written after the solution is not
the solution); else the longest block. Ties go to the earlier block. Without any fence, the
response is taken as plain code: leading prose lines are dropped up to the first line that
starts like code (`def`, `class`, `import`, `from`, `@`, `#`, `async def`, or an
unindented line that parses alone as a statement other than a bare name or constant, such
as `n = int(input())`), then trailing lines are dropped until what is left parses
(`ast.parse`); a response where nothing parses gives "". Programs end in one newline.

`sanitize(program, entry_point)`: EvalPlus-style post-processing for evaluation. Trailing
lines are dropped until the program parses; of its top-level statements only imports,
function and class definitions and assignments to names are kept (calls, prints, asserts,
`if __name__ == "__main__":` blocks go), and with an `entry_point` that the program defines,
only the definitions it reaches: the names it uses, transitively (every import is kept).
Without an entry point, or one the program does not define, every definition is kept.
Sanitising only deletes lines: what stays keeps its text, comments and blank lines (runs
of more than two blank lines shortened to two). A program of which no prefix parses is
returned unchanged.

`extract_assertions`: every `assert` statement at the top level of every Python block (or
of the whole response without fences), including those under `if __name__ ==
"__main__":`, each as its own test, source text exactly as written (multi-line ones
included). A block that does not parse falls back to its single lines that start with
`assert` and parse alone. Duplicates are dropped, order is kept.

Response format (`RESPONSE_FORMATS`, `program_from_response`): what a model is asked for and
how its program is read back. "code_block": a response holding the program in a fenced
block (instruct models), read with `extract_program`; "completion": a continuation of the
prompt (base models completing a function, the miniature), the program being prompt +
response.
"""

from __future__ import annotations

import ast
import re
import textwrap

RESPONSE_FORMATS = ("code_block", "completion")
PYTHON_TAGS = {"", "python", "py", "python3", "py3"}
_FENCE = re.compile(r"^[ \t]*```[ \t]*([^\s`]*)[^\n]*$", re.M)
_TAG = re.compile(r"[A-Za-z0-9_-]*")
_CODE_START = re.compile(r"^(def |class |import |from |@|#|async def )")
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def fenced_blocks(response: str) -> list[tuple[str, str]]:
    """[(language tag, body)] of every fenced block, in order; an unclosed last fence runs
    to the end of the response."""
    response = response.replace("\r\n", "\n")
    blocks, opened = [], None
    for m in _FENCE.finditer(response):
        if opened is None:
            opened = (_TAG.match(m.group(1)).group(0).lower(), m.end() + 1)
        else:
            tag, start = opened
            blocks.append((tag, response[start:m.start()]))
            opened = None
    if opened is not None:
        blocks.append((opened[0], response[opened[1]:]))
    return blocks


def python_blocks(response: str) -> list[str] | None:
    """Bodies of the Python blocks, dedented, or None when the response has no fence at all."""
    blocks = fenced_blocks(response)
    if not blocks:
        return None
    return [textwrap.dedent(body) for tag, body in blocks if tag in PYTHON_TAGS]


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError):
        return False


def _defined_names(code: str) -> list[str]:
    """Names of the top-level functions and classes (a regex when the code does not parse,
    e.g. a block cut by the token limit)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return re.findall(r"^(?:async[ \t]+def|def|class)[ \t]+(\w+)", code, re.M)
    return [n.name for n in tree.body if isinstance(n, _DEFINITIONS)]


def _is_test_name(name: str) -> bool:
    return name.startswith(("test", "Test"))


def _choose_block(blocks: list[str], entry_point: str | None) -> str:
    blocks = [b for b in blocks if b.strip()]
    names = [_defined_names(b) for b in blocks]
    for keep in ((lambda ns: entry_point in ns) if entry_point else None,
                 lambda ns: any(not _is_test_name(n) for n in ns),
                 lambda ns: True):
        if keep is None:
            continue
        candidates = [b for b, ns in zip(blocks, names) if keep(ns)]
        if candidates:
            return max(candidates, key=len)  # max keeps the first of equal lengths
    return ""


def _starts_code(line: str) -> bool:
    if _CODE_START.match(line):
        return True
    if not line or line[0].isspace():
        return False
    try:
        tree = ast.parse(line)
    except (SyntaxError, ValueError):
        return False
    # "Solution" or "42" alone parse too: prose, not code.
    return bool(tree.body) and not (isinstance(tree.body[0], ast.Expr) and isinstance(
        tree.body[0].value, (ast.Name, ast.Constant)))


def _parsing_prefix(lines: list[str]) -> str:
    """The longest prefix of `lines` that parses, stripped, or ""."""
    for end in range(len(lines), 0, -1):
        code = "\n".join(lines[:end]).strip("\n")
        if code.strip() and _parses(code):
            return code + "\n"
    return ""


def _plain_code(response: str) -> str:
    lines = response.replace("\r\n", "\n").splitlines()
    start = next((i for i, line in enumerate(lines) if _starts_code(line)), None)
    if start is None:
        return ""
    return _parsing_prefix(lines[start:])


def extract_program(response: str, entry_point: str | None = None) -> str:
    """The program in an instruct response (module docstring); "" when there is none."""
    blocks = python_blocks(response)
    if blocks is None:
        return _plain_code(response)
    chosen = _choose_block(blocks, entry_point)
    return chosen.strip("\n") + "\n" if chosen.strip() else ""


def program_from_response(response: str, prompt: str, response_format: str,
                          entry_point: str | None = None) -> str:
    """The program a response stands for, in `response_format` (module docstring);
    `entry_point`, when known, picks the block that defines it."""
    if response_format == "code_block":
        return extract_program(response, entry_point)
    if response_format == "completion":
        return prompt + response
    raise ValueError(f"response_format={response_format!r}; expected one of {RESPONSE_FORMATS}")


def _bound_names(node: ast.stmt) -> list[str]:
    if isinstance(node, _DEFINITIONS):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    names = []
    for t in targets:
        elts = t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]
        if not all(isinstance(e, ast.Name) for e in elts):
            return []  # x[0] = ..., obj.attr = ...: a statement with effects, not a global
        names += [e.id for e in elts]
    return names


def sanitize(program: str, entry_point: str | None = None) -> str:
    """EvalPlus-style: the definitions `entry_point` needs, and the imports (module docstring)."""
    code = _parsing_prefix(program.replace("\r\n", "\n").splitlines())
    if not code:
        return program
    tree = ast.parse(code)
    lines = code.splitlines()
    kept, defines = [], {}  # defines: name -> indices into kept
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            kept.append((node, None))
        elif isinstance(node, (*_DEFINITIONS, ast.Assign, ast.AnnAssign)):
            names = _bound_names(node)
            if isinstance(node, ast.AnnAssign) and node.value is None:
                names = []
            if names:
                for name in names:
                    defines.setdefault(name, []).append(len(kept))
                kept.append((node, names))
    wanted = set(range(len(kept)))
    if entry_point and entry_point in defines:
        wanted, todo = set(), list(defines[entry_point])
        while todo:
            i = todo.pop()
            if i in wanted:
                continue
            wanted.add(i)
            used = {n.id for n in ast.walk(kept[i][0]) if isinstance(n, ast.Name)}
            todo += [j for name in used for j in defines.get(name, [])]
        wanted |= {i for i, (_, names) in enumerate(kept) if names is None}
    # Delete the lines of what goes; what stays keeps its text, comments and spacing.
    keep_nodes = {id(kept[i][0]) for i in wanted}
    gone = set()
    for node in tree.body:
        if id(node) not in keep_nodes:
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            gone.update(range(first - 1, node.end_lineno))
    out = "\n".join(line for i, line in enumerate(lines) if i not in gone)
    out = re.sub(r"\n{4,}", "\n\n\n", out).strip("\n")
    return out + "\n" if out.strip() else ""


def _assertions_in(code: str) -> list[str]:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        out = []
        for line in code.splitlines():
            stripped = line.strip()
            if stripped.startswith("assert ") and _parses(stripped):
                out.append(stripped)
        return out
    statements = []
    for node in tree.body:
        if isinstance(node, ast.If) and "__name__" in (ast.get_source_segment(code, node.test)
                                                       or ""):
            statements.extend(node.body)
        else:
            statements.append(node)
    return [ast.get_source_segment(code, n) for n in statements if isinstance(n, ast.Assert)]


def extract_assertions(response: str) -> list[str]:
    blocks = python_blocks(response)
    sources = [response] if blocks is None else blocks
    found = []
    for source in sources:
        found.extend(_assertions_in(source))
    return list(dict.fromkeys(a.strip() for a in found if a and a.strip()))


def program_span(response: str) -> tuple[int, int] | None:
    """Character span `[start, end)` of the code `extract_program` takes from a fenced block
    of `response` (the data builder localises error points inside it), or None when the
    response has no fenced block or the program is not found verbatim in it (then the whole
    response counts as code). Built on `extract_program` alone, so it follows whatever
    block that chooses; the first verbatim occurrence is taken."""
    if not fenced_blocks(response):
        return None
    core = extract_program(response).strip("\n")
    start = response.find(core) if core else -1
    return None if start < 0 else (start, start + len(core))
