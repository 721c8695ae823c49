"""fdpo.jsonl: the one JSONL reader behind the programs' inputs."""

from __future__ import annotations

import gzip

import pytest

from fdpo import jsonl


class MyError(ValueError):
    pass


def test_objects_skip_blank_lines_and_name_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert list(jsonl.objects(path)) == [(f"{path}:1", {"a": 1}), (f"{path}:4", {"a": 2})]
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"b": 3}\n'))
    assert list(jsonl.objects(gz, label="--flag=x")) == [("--flag=x:1", {"b": 3})]


def test_bad_lines_raise_the_callers_error_or_are_collected(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": \n[1, 2]\n{"a": 4}\n')
    with pytest.raises(MyError, match=rf"{path}:2: not valid JSON \(.* at column \d+\)"):
        list(jsonl.objects(path, error=MyError))
    errors = []
    assert [r["a"] for _, r in jsonl.objects(path, errors)] == [1, 4]
    assert len(errors) == 2
    assert errors[0].startswith(f"{path}:2: not valid JSON")
    assert errors[1] == f"{path}:3: expected a JSON object, got list"
