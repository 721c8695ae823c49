"""The problem record: one JSON line per problem, from sampling to pairs (docs/data.md).

    launch.sample  -> {"version", "id", "prompt", "prompt_format", "prompt_ids",
                       "samples": [{response, response_ids, program, finish}], "tests", ...}
    launch.execute -> ... + "passed" (one row per sample, one column per test), "status", ...
    launch.build   -> reads it (ranks, verdicts and pairs go to the pair records)
    launch.analyze -> reads it

Every stage reads the record, adds its own fields and passes through every field it does
not use, so the stages compose with no glue file. Standard library only: the data stage
(no JAX) reads it too.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

from fdpo import jsonl

VERSION = 1
# What each stage needs from the stages before it (checked, naming file:line).
SAMPLED = ("version", "id", "prompt", "samples", "tests")
EXECUTED = SAMPLED + ("passed",)
SAMPLE_FIELDS = ("response", "program", "finish")
# A sample that hit max_new_tokens: its program may be cut off mid-statement.
TRUNCATED = "length"


class RecordError(ValueError):
    """A line that is not a problem record of this version (the message names file:line)."""


def is_record(obj: Any) -> bool:
    """Whether `obj` claims to be a problem record (any version)."""
    return isinstance(obj, dict) and "version" in obj


def check(obj: Any, where: str, needs: tuple[str, ...] = SAMPLED) -> None:
    """Raises RecordError naming `where` and the first missing or malformed field."""
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in needs:
        if key not in obj:
            hint = ""
            if key == "version":
                hint = (" (a line written before problem records, e.g. by an older launch.sample "
                        "with 'codes' and 'raw'; sample again, see docs/data.md)")
            elif key == "passed":
                hint = " (run launch.execute on the samples first)"
            raise RecordError(f"{where}: missing field {key!r}{hint}")
    if obj["version"] != VERSION:
        raise RecordError(f"{where}: problem record version {obj['version']!r}; this code "
                          f"reads version {VERSION}")
    pid = obj["id"]
    if not isinstance(pid, str) or not pid:
        raise RecordError(f"{where}: 'id' must be a non-empty string, got {pid!r}")
    if not isinstance(obj["prompt"], str):
        raise RecordError(f"{where}: 'prompt' must be a string (id {pid!r})")
    # Optional (hand-made records lack them): how the sampler rendered the prompt.
    if "prompt_format" in obj and not isinstance(obj["prompt_format"], str):
        raise RecordError(f"{where}: 'prompt_format' must be a string (id {pid!r})")
    if "prompt_ids" in obj and not (isinstance(obj["prompt_ids"], list) and all(
            type(v) is int and v >= 0 for v in obj["prompt_ids"])):
        raise RecordError(f"{where}: 'prompt_ids' must be a list of non-negative token ids "
                          f"(id {pid!r})")
    samples = obj["samples"]
    if not isinstance(samples, list):
        raise RecordError(f"{where}: 'samples' must be a list (id {pid!r})")
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise RecordError(f"{where}: 'samples[{i}]' must be an object (id {pid!r})")
        for key in SAMPLE_FIELDS:
            if not isinstance(s.get(key), str):
                raise RecordError(f"{where}: 'samples[{i}].{key}' must be a string"
                                  f"{' (missing)' if key not in s else ''} (id {pid!r})")
        ids = s.get("response_ids")
        if ids is not None and not (isinstance(ids, list) and
                                    all(type(v) is int and v >= 0 for v in ids)):
            raise RecordError(f"{where}: 'samples[{i}].response_ids' must be a list of "
                              f"non-negative token ids (id {pid!r})")
        if ids == [] and s["response"]:  # the builder would train on an empty response
            raise RecordError(f"{where}: 'samples[{i}].response_ids' is empty but its response "
                              f"is not; leave response_ids out to tokenise the text (id {pid!r})")
    tests = obj["tests"]
    if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        raise RecordError(f"{where}: 'tests' must be a list of strings (id {pid!r})")
    if "passed" in needs:
        passed = obj["passed"]
        if not isinstance(passed, list) or len(passed) != len(samples):
            n = len(passed) if isinstance(passed, list) else type(passed).__name__
            raise RecordError(f"{where}: 'passed' must have one row per sample "
                              f"({len(samples)}), got {n} (id {pid!r})")
        for i, row in enumerate(passed):
            if not isinstance(row, list) or len(row) != len(tests):
                raise RecordError(f"{where}: 'passed' row {i} must have one verdict per test "
                                  f"({len(tests)}) (id {pid!r})")
            if not all(v is True or v is False or (type(v) is int and v in (0, 1)) for v in row):
                raise RecordError(f"{where}: 'passed' row {i} holds a value that is not a "
                                  f"boolean or 0/1 (id {pid!r})")


def read(path: str | os.PathLike, needs: tuple[str, ...] = SAMPLED
         ) -> Iterator[tuple[str, dict]]:
    """(where, record) of every line of `path`, each checked (`check`); ids must be unique.
    A bad line, or an id that repeats, raises RecordError naming file:line (both lines)."""
    seen: dict[str, str] = {}
    for where, obj in jsonl.objects(path, error=RecordError):
        check(obj, where, needs)
        if obj["id"] in seen:
            raise RecordError(f"{where}: duplicate problem id {obj['id']!r}, first at "
                              f"{seen[obj['id']]}")
        seen[obj["id"]] = where
        yield where, obj


def programs(rec: dict) -> list[str]:
    """The program of every sample, in order (empty where the response held none)."""
    return [s["program"] for s in rec["samples"]]


def usable(rec: dict) -> list[int]:
    """Indices of the samples with a non-empty program: the codes that are ranked."""
    return [i for i, s in enumerate(rec["samples"]) if s["program"].strip()]
