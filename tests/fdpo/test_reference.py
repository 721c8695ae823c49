"""fdpo.reference without models: which reference a config names, and the provenance check."""
from __future__ import annotations

import json

import pytest

from configs import focused_dpo
from fdpo import records, reference

OURS = {"identity": "a" * 64, "checkpoint": "/ckpt/policy", "compute_dtype": "bfloat16",
        "logprob_chunk": 256}


def write(tmp_path, ref):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"schema_version": records.SCHEMA_VERSION, "splits": {},
                                **({"reference": ref} if ref else {})}))
    return path


def test_the_reference_is_the_initial_policy_unless_one_is_set():
    c = focused_dpo.get_config("model=/ckpt/policy,data=/d")
    assert reference.source(c) == ("/ckpt/policy", None, True)
    c.reference.hf_dir = "/hf/sft"
    assert reference.source(c) == (None, "/hf/sft", False)
    c.reference.checkpoint = "/ckpt/sft"
    with pytest.raises(ValueError, match="at most one"):
        reference.source(c)


def test_matching_provenance_passes(tmp_path):
    reference.check(write(tmp_path, dict(OURS, checkpoint="/elsewhere/same_weights")), OURS)


@pytest.mark.parametrize("field,theirs,named", [
    ("compute_dtype", "float32", ("compute dtype float32", "compute dtype bfloat16")),
    ("logprob_chunk", 128, ("chunk 128", "chunk 256")),
    ("identity", "b" * 64, ("identity bbbbbbbbbbbbbbbb", "identity aaaaaaaaaaaaaaaa"))])
def test_a_mismatch_is_refused_naming_both_sides(tmp_path, field, theirs, named):
    path = write(tmp_path, dict(OURS, **{field: theirs}))
    with pytest.raises(reference.ProvenanceError) as e:
        reference.check(path, OURS)
    msg = str(e.value)
    assert str(path) in msg and f"{field} differ" in msg
    assert all(n in msg for n in named)


def test_data_without_provenance_is_refused(tmp_path):
    old = {"checkpoint": "/ckpt/policy", "compute_dtype": "float32", "logprob_chunk": 256}
    for ref in (None, old):  # hand-written, or written before provenance existed
        with pytest.raises(reference.ProvenanceError, match="no provenance record"):
            reference.check(write(tmp_path, ref), OURS)
