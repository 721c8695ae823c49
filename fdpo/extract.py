"""Programs and assertions out of model responses (pure Python, no jax).

Rules, in order (documented in docs/sampling.md):

Fenced blocks are Markdown fences, ```` ```lang ```` ... ```` ``` ````, whose language tag is
empty or Python (`python`, `py`, `python3`, `py3`; case-insensitive); blocks in other
languages (bash, text, output, ...) are ignored. An opening fence that is never closed (a
response cut by max_new_tokens) counts as a block running to the end.

`extract_program`: the first Python block that defines a function or a class at its top
level, else the first Python block. Without any fence, the response is taken as plain
code: leading prose lines are dropped up to the first line that starts like code (`def`,
`class`, `import`, `from`, `@`, `#`, `async def`), then trailing lines are dropped until
what is left parses (`ast.parse`); a response where nothing parses gives "".

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

RESPONSE_FORMATS = ("code_block", "completion")
PYTHON_TAGS = {"", "python", "py", "python3", "py3"}
_FENCE = re.compile(r"^[ \t]*```[ \t]*([^\s`]*)[^\n]*$", re.M)
_CODE_START = re.compile(r"^(def |class |import |from |@|#|async def )")


def fenced_blocks(response: str) -> list[tuple[str, str]]:
    """[(language tag, body)] of every fenced block, in order; an unclosed last fence runs
    to the end of the response."""
    blocks, opened = [], None
    for m in _FENCE.finditer(response):
        if opened is None:
            opened = (m.group(1).lower(), m.end() + 1)
        else:
            tag, start = opened
            blocks.append((tag, response[start:m.start()]))
            opened = None
    if opened is not None:
        blocks.append((opened[0], response[opened[1]:]))
    return blocks


def python_blocks(response: str) -> list[str] | None:
    """Bodies of the Python blocks, or None when the response has no fence at all."""
    blocks = fenced_blocks(response)
    if not blocks:
        return None
    return [body for tag, body in blocks if tag in PYTHON_TAGS]


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError):
        return False


def _defines(code: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return bool(re.search(r"^(async def|def|class) ", code, re.M))
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
               for n in tree.body)


def _plain_code(response: str) -> str:
    lines = response.splitlines()
    start = next((i for i, line in enumerate(lines) if _CODE_START.match(line)), None)
    if start is None:
        return response.strip() if _parses(response) and response.strip() else ""
    lines = lines[start:]
    for end in range(len(lines), 0, -1):
        code = "\n".join(lines[:end]).strip()
        if code and _parses(code):
            return code + "\n"
    return ""


def extract_program(response: str) -> str:
    blocks = python_blocks(response)
    if blocks is None:
        return _plain_code(response)
    if not blocks:
        return ""
    chosen = next((b for b in blocks if _defines(b)), blocks[0])
    return chosen.strip("\n") + "\n" if chosen.strip() else ""


def program_from_response(response: str, prompt: str, response_format: str) -> str:
    """The program a response stands for, in `response_format` (module docstring)."""
    if response_format == "code_block":
        return extract_program(response)
    if response_format == "completion":
        return prompt + response
    raise ValueError(f"response_format={response_format!r}; expected one of {RESPONSE_FORMATS}")


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
