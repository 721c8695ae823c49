"""Record schema: byte round-trip, validation, ArrayRecord + grain source."""
import json

import numpy as np
import pytest

from fdpo import records
from fdpo.records import PairRecord, Segment
from tests.conftest import REPO


def _record(L=16, pair_id=7, name="prob/1", ref=5, seed=0):
    rng = np.random.default_rng(seed)
    cseg = np.zeros(L, np.int8)
    cseg[:3] = Segment.PROMPT
    cseg[3:6] = Segment.PREFIX
    cseg[6:9] = Segment.MID
    cseg[9:11] = Segment.SUFFIX
    rseg = cseg.copy()
    rseg[6:10] = Segment.MID
    rseg[10:12] = Segment.SUFFIX
    return PairRecord(
        chosen_ids=rng.integers(0, 150_000, L).astype(np.int32),
        rejected_ids=rng.integers(0, 150_000, L).astype(np.int32),
        chosen_segments=cseg, rejected_segments=rseg, pair_id=pair_id,
        problem_id=records.stable_problem_id(name), problem_name=name,
        ref_logps=rng.normal(size=(2, ref)).astype(np.float32) if ref else None)


@pytest.mark.parametrize("ref", [5, 3, 0])  # 3: records from before LEAD/TRAIL existed
def test_roundtrip_bytes(ref):
    rec = _record(ref=ref)
    data = records.encode(rec)
    assert len(data) == 40 + 10 * 16 + 8 * ref + len("prob/1")
    back = records.decode(data)
    for key in ("chosen_ids", "rejected_ids", "chosen_segments", "rejected_segments"):
        got = getattr(back, key)
        np.testing.assert_array_equal(got, getattr(rec, key))
        assert got.dtype == getattr(rec, key).dtype
    assert back.pair_id == 7 and back.problem_id == rec.problem_id and back.problem_name == "prob/1"
    if ref:
        np.testing.assert_array_equal(back.ref_logps, rec.ref_logps)  # bit-exact float32
        # The trainer always sees 5 columns; an old record has no LEAD/TRAIL tokens, so its
        # missing sums are 0.
        padded = back.to_dict()["ref_logps"]
        np.testing.assert_array_equal(padded[:, :ref], rec.ref_logps)
        np.testing.assert_array_equal(padded[:, ref:], 0.0)
        assert padded.shape == (2, 5)
    else:
        assert back.ref_logps is None and "ref_logps" not in back.to_dict()


def test_unicode_name_and_stable_id():
    rec = _record(name="задача-λ")
    assert records.decode(records.encode(rec)).problem_name == "задача-λ"
    # sha256-based, so it is the same in every process (Python's hash() is salted).
    assert records.stable_problem_id("a") == records.stable_problem_id("a")
    assert records.stable_problem_id("a") != records.stable_problem_id("b")
    assert 0 <= records.stable_problem_id("x") < 2**63


def test_validation_errors():
    rec = _record()
    rec.chosen_segments = rec.chosen_segments.copy()
    rec.chosen_segments[0] = 7  # past Segment.TRAIL
    with pytest.raises(records.RecordError, match="outside Segment"):
        records.encode(rec)
    rec = _record()
    rec.rejected_ids = rec.rejected_ids[:-1]
    with pytest.raises(records.RecordError, match="shape"):
        records.encode(rec)
    rec = _record()
    rec.chosen_ids = rec.chosen_ids.astype(np.int64)
    with pytest.raises(records.RecordError, match="dtype"):
        records.encode(rec)


def test_decode_rejects_corrupt_bytes():
    data = records.encode(_record())
    with pytest.raises(records.RecordError, match="magic"):
        records.decode(b"XXXX" + data[4:])
    with pytest.raises(records.RecordError, match="bytes"):
        records.decode(data[:-1])
    with pytest.raises(records.RecordError, match="L=16"):
        records.decode(data, expected_len=32)


def test_array_record_and_grain_source(tmp_path):
    import grain

    recs_a = [_record(pair_id=i, seed=i) for i in range(5)]
    recs_b = [_record(pair_id=100 + i, seed=100 + i, ref=False) for i in range(3)]
    pa, pb = tmp_path / "a.array_record", tmp_path / "b.array_record"
    assert records.write_array_record(pa, recs_a) == 5
    assert records.write_array_record(pb, recs_b) == 3
    src = records.PairDataSource([pa, pb], max_len=16)
    assert len(src) == 8
    assert isinstance(src, grain.sources.RandomAccessDataSource)
    for i, rec in enumerate(recs_a + recs_b):
        got = src[i]
        np.testing.assert_array_equal(got["chosen_ids"], rec.chosen_ids)
        np.testing.assert_array_equal(got["rejected_segments"], rec.rejected_segments)
        assert int(got["pair_id"]) == rec.pair_id
    assert src.record(0).problem_name == "prob/1"
    # grain's worker processes receive the source pickled: it must survive a round trip.
    import pickle
    clone = pickle.loads(pickle.dumps(src))
    assert len(clone) == 8 and int(clone[7]["pair_id"]) == 102 and repr(clone) == repr(src)

    # Through grain itself: a shuffled, batched MapDataset sees every pair exactly once.
    # Only records of one kind batch together (ref_logps present or not), so use shard a.
    ds = grain.MapDataset.source(records.PairDataSource([pa])).shuffle(seed=3).batch(2)
    batches = list(ds)
    ids = np.concatenate([b["pair_id"] for b in batches])
    assert sorted(ids.tolist()) == [0, 1, 2, 3, 4]
    assert batches[0]["chosen_ids"].shape == (2, 16) and batches[0]["chosen_ids"].dtype == np.int32
    assert batches[0]["ref_logps"].shape == (2, 2, 5)

    # And through the DataLoader (the trainer's path), which needs a picklable, repr-able source.
    loader = grain.DataLoader(
        data_source=records.PairDataSource([pb]),
        sampler=grain.samplers.IndexSampler(num_records=3, shuffle=False, num_epochs=1, seed=0),
        operations=[grain.transforms.Batch(batch_size=3)], worker_count=0)
    (batch,) = list(loader)
    np.testing.assert_array_equal(batch["pair_id"], [100, 101, 102])


def test_writer_rejects_mixed_lengths(tmp_path):
    with records.RecordWriter(tmp_path / "x.array_record") as w:
        w.write(_record(L=16))
        with pytest.raises(records.RecordError, match="L=8"):
            w.write(_record(L=8))


def test_source_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.array_record"):
        records.PairDataSource([tmp_path / "nope.array_record"])


def test_manifest_roundtrip_and_merge(tmp_path):
    def man(shard, n_train, drops):
        return records.make_manifest(
            max_len=16, tokenizer={"name_or_path": "tok"},
            counts={"lines_in": n_train + sum(drops.values()), "lines_used": n_train},
            drop_reasons=drops,
            splits={"train": {"records": n_train, "shards": [{"path": f"t{shard}", "records": n_train}]}},
            config={"ranker": "mutual", "shard_index": shard, "num_shards": 2})

    m0, m1 = man(0, 3, {"malformed_json": 1}), man(1, 2, {"malformed_json": 2, "no_correct_code": 1})
    path = tmp_path / "m.json"
    records.write_manifest(path, m0)
    assert records.read_manifest(path) == json.loads(json.dumps(m0))
    merged = records.merge_manifests([m0, m1])
    assert merged["counts"] == {"lines_in": 9, "lines_used": 5}
    assert merged["drop_reasons"] == {"malformed_json": 3, "no_correct_code": 1}
    assert merged["splits"]["train"]["records"] == 5
    assert [s["path"] for s in merged["splits"]["train"]["shards"]] == ["t0", "t1"]
    bad = man(1, 2, {})
    bad["max_len"] = 32
    with pytest.raises(ValueError, match="max_len"):
        records.merge_manifests([m0, bad])


def test_data_modules_do_not_import_jax():
    """The data tools stay light: records, rank, segments and build never import jax."""
    import subprocess
    import sys

    code = ("import sys; import fdpo.records, data_tools.rank, data_tools.segments, data_tools.build; "
            "sys.exit(1 if 'jax' in sys.modules else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert res.returncode == 0, "a data module imported jax: " + res.stderr
