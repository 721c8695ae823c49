"""fdpo.atomic: a directory output is the old one or the new one whole, also when Ctrl-C
lands inside the swap (the programs around it: tests/launch/test_interrupt.py)."""
from __future__ import annotations

import os

import pytest

from fdpo import atomic


def _dirs(tmp_path):
    dest, new = tmp_path / "out", atomic.temp_sibling(tmp_path / "out", "building")
    dest.mkdir()
    (dest / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    return dest, new


def test_exchange_leaves_only_the_new_output(tmp_path):
    dest, new = _dirs(tmp_path)
    atomic.replace_dir(new, dest)
    assert (dest / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_ctrl_c_between_the_two_renames_puts_the_old_output_back(tmp_path, monkeypatch):
    """Without renameat2 the swap is two renames; a KeyboardInterrupt after the first one
    moves the old output back, and the caller removes its temporary as after any error."""
    dest, new = _dirs(tmp_path)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    renames = []

    def rename(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:
            raise KeyboardInterrupt
        os.replace(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_dir(new, dest)
    monkeypatch.undo()
    assert (dest / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", new.name])


def test_clean_restores_a_parked_output_after_a_kill(tmp_path):
    """kill -9 between the two renames: the next writer's `clean` puts the old output back
    and removes the temporaries."""
    dest, new = _dirs(tmp_path)
    os.rename(dest, atomic.temp_sibling(dest, "old"))
    atomic.clean(dest, "building")
    assert (dest / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_model_save_interrupted_leaves_no_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    """init_model / import_hf write through `save_model_whole`: Ctrl-C after the params are
    written (before the metadata) leaves no `out`, so no reader meets params without
    metadata; the rerun writes the whole checkpoint."""
    from fdpo.models import checkpoint

    out = tmp_path / "ckpt"
    real_save = checkpoint.save_model

    def save_then_interrupt(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        (path / checkpoint.METADATA_FILE).unlink()  # as if killed before the metadata
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_model", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.init_random(out, fields={"vocab_size": 64})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(checkpoint, "save_model", real_save)
    assert checkpoint.init_random(out, fields={"vocab_size": 64}) == out
    assert checkpoint.read_metadata(out)["model_config"]["vocab_size"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint.init_random(out, fields={"vocab_size": 64})
