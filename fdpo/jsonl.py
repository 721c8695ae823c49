"""JSON Lines input with locations: every reader in fdpo names `file:line` in its errors.

    for where, rec in jsonl.objects(path):           # a bad line raises, naming file:line
    for where, rec in jsonl.objects(path, errors):   # ... or is listed in `errors`, skipped

Blank lines are skipped; `.gz` files are read through gzip. What a record must contain is the caller's business; this module
only guarantees each yielded record is a JSON object.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Iterator


class JsonlError(ValueError):
    pass


def parse_object(where: str, line: str, error: type[Exception] = JsonlError) -> dict:
    """One line -> its JSON object; `error` naming `where` when it is not one."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(rec, dict):
        raise error(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def objects(path: str | os.PathLike, errors: list[str] | None = None, *,
            error: type[Exception] = JsonlError, label: str | None = None
            ) -> Iterator[tuple[str, dict]]:
    """(where, record) for every non-blank line of `path`; where is "label:lineno" (label
    defaults to the path). A malformed line raises `error`, or with `errors` given, its
    message is appended there and the line skipped."""
    label = str(path) if label is None else label
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{label}:{lineno}"
            try:
                rec = parse_object(where, line, error)
            except error as e:
                if errors is None:
                    raise
                errors.append(str(e))
                continue
            yield where, rec
