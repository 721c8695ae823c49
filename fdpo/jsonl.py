"""JSON Lines with locations: the one reader and the one resumable appender of fdpo.

    for where, rec in jsonl.objects(path):           # a bad line raises, naming file:line
    for where, rec in jsonl.objects(path, errors):   # ... or is appended to `errors`, skipped
    rows = jsonl.records(path)                        # [record], a bad line raises

    done = jsonl.resume(path, key="id")               # {id: (line, record)} already written
    with jsonl.Appender(path) as out:
        out.write(record)                             # one line, flushed

The rules, the same for every file: lines are split at b"\\n"; blank lines are skipped;
each line must be valid UTF-8 holding one JSON object, else it is bad and its error names
`file:line`; `.gz` files are read through gzip. An output that a run appends to (and a
rerun resumes) may end in an interrupted write: `resume` truncates a last line that has no
newline and does not parse (its record is redone), gives a complete last line the newline
it lacks, and refuses any other bad line without changing the file. What a record must
contain is the caller's business.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from typing import Any, Iterator

log = logging.getLogger("fdpo.jsonl")


class JsonlError(ValueError):
    pass


def _object(raw: bytes) -> dict:
    """One line -> its JSON object; ValueError saying what is wrong when it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                         ) from None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    return rec


def objects(path: str | os.PathLike, errors: list | None = None, *,
            error: type[Exception] = JsonlError, label: str | None = None
            ) -> Iterator[tuple[str, dict]]:
    """(where, record) for every non-blank line of `path`; where is "label:lineno" (label
    defaults to the path). A bad line raises `error("where: what")`; with `errors` given,
    that exception is appended there instead (its `.line` is the line number) and the
    line skipped."""
    label = str(path) if label is None else label
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{label}:{lineno}"
            try:
                rec = _object(raw)
            except ValueError as e:
                bad = error(f"{where}: {e}")
                bad.line = lineno
                if errors is None:
                    raise bad from None
                errors.append(bad)
                continue
            yield where, rec


def records(path: str | os.PathLike, *, error: type[Exception] = JsonlError,
            label: str | None = None) -> list[dict]:
    """Every record of `path`, without locations; a bad line raises as in `objects`."""
    return [rec for _, rec in objects(path, error=error, label=label)]


def resume(path: str | os.PathLike, key: str | None = "id", *,
           error: type[Exception] = JsonlError) -> dict[Any, tuple[int, dict]]:
    """{record[key]: (line, record)} of the output `path` (empty when there is none), after
    repairing the end of an interrupted write (see the module docstring). A bad line before
    the last raises `error` naming it, the file unchanged. key=None: only the repair."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")  # the last item: what follows the last newline (b"" if none)
    done = {}
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        last = lineno == len(lines)  # no newline after it
        try:
            rec = _object(raw)
        except ValueError as e:
            if not last:
                raise error(f"{path}:{lineno}: malformed line in the existing output ({e}); "
                            "fix or remove it before resuming") from None
            with open(path, "r+b") as f:  # an interrupted write
                f.truncate(len(data) - len(raw))
            log.warning("%s:%d: truncated last line (an interrupted write) removed; its record "
                        "will be redone", path, lineno)
            break
        if key is not None and key not in rec:
            raise error(f"{path}:{lineno}: no {key!r} in the existing output's record; fix or "
                        "remove that line before resuming")
        if last:  # complete, but its newline was not written
            with open(path, "ab") as f:
                f.write(b"\n")
            log.warning("%s:%d: last line had no newline; added", path, lineno)
        if key is not None:
            done[rec[key]] = (lineno, rec)
    return done


class Appender:
    """Appends records to a JSON Lines output, one line each, flushed as it is written, so
    an interrupted run loses at most the line being written. Opening repairs the end of an
    earlier interrupted write (`resume(path, key=None)`) when the file does not end in a
    newline. Use it as a context manager, or call `close`."""

    def __init__(self, path: str | os.PathLike, *, error: type[Exception] = JsonlError):
        if os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    resume(path, key=None, error=error)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
