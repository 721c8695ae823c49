"""fdpo.jsonl: the one JSONL reader and resumable appender, and their rules."""

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
    assert [(type(e), e.line) for e in errors] == [(jsonl.JsonlError, 2), (jsonl.JsonlError, 3)]
    assert str(errors[0]).startswith(f"{path}:2: not valid JSON")
    assert str(errors[1]) == f"{path}:3: expected a JSON object, got list"


def test_bad_utf8_is_a_bad_line_naming_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n{"a": 3}\n')
    with pytest.raises(jsonl.JsonlError, match=rf"^{path}:2: not valid UTF-8 \(byte 0xff"):
        list(jsonl.objects(path))
    errors = []
    assert [r["a"] for _, r in jsonl.objects(path, errors)] == [1, 3]
    assert [e.line for e in errors] == [2]


def test_lines_split_only_at_newline(tmp_path):
    """A bare carriage return is whitespace inside a line, not a line break."""
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a":\r 1}\r\n{"a": 2}\n')
    assert list(jsonl.objects(path)) == [(f"{path}:1", {"a": 1}), (f"{path}:2", {"a": 2})]


def test_resume_returns_the_done_records_by_key(tmp_path):
    path = tmp_path / "out.jsonl"
    assert jsonl.resume(path) == {}  # no output yet
    path.write_text('{"id": "a", "v": 1}\n\n{"id": 7, "v": 2}\n')
    before = path.read_bytes()
    assert jsonl.resume(path) == {"a": (1, {"id": "a", "v": 1}), 7: (3, {"id": 7, "v": 2})}
    assert jsonl.resume(path, key="v") == {1: (1, {"id": "a", "v": 1}), 2: (3, {"id": 7, "v": 2})}
    assert path.read_bytes() == before


def test_resume_truncates_a_partial_last_line_which_is_then_redone(tmp_path, caplog):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "v": [1, 2')
    assert jsonl.resume(path) == {"a": (1, {"id": "a"})}
    assert path.read_bytes() == b'{"id": "a"}\n'
    assert f"{path}:2: truncated last line" in caplog.text
    with jsonl.Appender(path) as out:
        out.write({"id": "b", "v": [1, 2]})
    assert list(jsonl.objects(path)) == [(f"{path}:1", {"id": "a"}),
                                         (f"{path}:2", {"id": "b", "v": [1, 2]})]
    # A multi-byte character cut in two is a partial write too.
    path.write_bytes(b'{"id": "a"}\n' + '{"id": "\u00e9"}'.encode()[:-3])
    assert jsonl.resume(path) == {"a": (1, {"id": "a"})}
    assert path.read_bytes() == b'{"id": "a"}\n'


def test_resume_gives_a_complete_last_line_its_newline(tmp_path, caplog):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}')
    assert jsonl.resume(path) == {"a": (1, {"id": "a"}), "b": (2, {"id": "b"})}
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'
    assert f"{path}:2: last line had no newline; added" in caplog.text


@pytest.mark.parametrize("content, line", [
    (b'{"id": "a"}\n{"id": \n{"id": "c"}\n', 2),       # bad JSON in the middle
    (b'{"id": "a"}\n\xff\n{"id": "c"}\n', 2),           # bad bytes in the middle
    (b'[1]\n{"id": "b"}\n{"id": "c', 1),                 # not an object, and a partial end
    (b'{"id": "a"}\n{"id": \n', 2),                      # a complete last line is no partial write
    (b'{"id": "a"}\n{"v": 1}\n', 2),                     # no key
])
def test_resume_refuses_a_corrupt_line_and_leaves_the_file_as_it_was(tmp_path, content, line):
    path = tmp_path / "out.jsonl"
    path.write_bytes(content)
    with pytest.raises(MyError, match=rf"^{path}:{line}: "):
        jsonl.resume(path, error=MyError)
    assert path.read_bytes() == content


def test_appender_writes_a_flushed_line_per_record_and_repairs_the_end(tmp_path):
    path = tmp_path / "out.jsonl"
    with jsonl.Appender(path) as out:
        out.write({"id": "a", "text": "é\n"})
        assert path.read_text(encoding="utf-8") == '{"id": "a", "text": "\\u00e9\\n"}\n'
    path.write_bytes(path.read_bytes() + b'{"id": "b", "te')  # killed mid-write
    with jsonl.Appender(path) as out:  # no resume called: the partial line still goes
        out.write({"id": "c"})
    assert [r["id"] for _, r in jsonl.objects(path)] == ["a", "c"]
    corrupt = b'{"id": "a"}\n{"id" \n{"id": "b'
    path.write_bytes(corrupt)
    with pytest.raises(jsonl.JsonlError, match=rf"^{path}:2: malformed line"):
        with jsonl.Appender(path):
            pass
    assert path.read_bytes() == corrupt
