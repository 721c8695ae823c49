"""Inputs checked against the model before work (issue 15, items 3 and 9): a tokenizer larger
than the embedding table and token ids past it are refused before the weights are read; the
prompt room `Policy.check_prompt_lengths` refuses is exactly where the sampler stops; NaN
reference log-probs never reach a dataset."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from fdpo import sampling, scoring, sharding
from fdpo.models import checkpoint
from fdpo.policy import ModelFiles, Policy, PromptTooLong, VocabError
from fdpo.testing import build_tiny_tokenizer, random_pairs, write_dataset

ONE_DEVICE = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


def test_a_tokenizer_larger_than_the_embedding_table_is_refused_before_the_weights(tmp_path):
    ckpt = tmp_path / "ckpt"
    checkpoint.init_random(ckpt, fields=dict(vocab_size=64, **SMALL))
    tok = build_tiny_tokenizer(tmp_path / "tok", chat_template=True)  # 400 tokens
    shutil.copytree(tok, ckpt / checkpoint.EXTRAS_DIR, dirs_exist_ok=True)
    shutil.rmtree(ckpt / checkpoint.PARAMS_DIR)  # reading weights would fail another way
    message = "the tokenizer has 400 tokens but the model has 64 embedding rows"
    with pytest.raises(VocabError, match=message):
        ModelFiles.read(checkpoint=str(ckpt))
    with pytest.raises(VocabError, match=message):
        Policy.load(ONE_DEVICE, checkpoint=str(ckpt))


def test_token_ids_outside_the_vocabulary_are_named(tmp_path):
    checkpoint.init_random(tmp_path / "ckpt", fields=dict(vocab_size=64, **SMALL))
    files = ModelFiles.read(checkpoint=str(tmp_path / "ckpt"))
    assert files.tokenizer is None and files.cfg.vocab_size == 64
    files.check_ids([0, 5, 63], "in.jsonl:1")
    with pytest.raises(VocabError, match=r"in.jsonl:2: token id 64 at position 2 is outside "
                                         r"the model's vocabulary \[0, 64\)"):
        files.check_ids([0, 5, 64, 70], "in.jsonl:2")
    with pytest.raises(VocabError, match="in.jsonl:3: token id -1 at position 0"):
        files.check_ids([-1], "in.jsonl:3")


def test_prompt_room_is_where_the_sampler_stops(tmp_path):
    """max_position_embeddings 128, length_bucket 16, 40 new tokens: prompts are padded to a
    multiple of 16 and that plus 40 must fit in 128, so 80 tokens is the most. The sampler
    takes an 80-token prompt and refuses an 81-token one; the check agrees, naming it."""
    checkpoint.init_random(tmp_path / "ckpt",
                           fields=dict(vocab_size=64, max_position_embeddings=128, **SMALL))
    policy = Policy.load(ONE_DEVICE, checkpoint=str(tmp_path / "ckpt"), length_bucket=16)
    room = (128 - 40) // 16 * 16
    assert policy.prompt_room(40) == room == 80
    fits, too_long = [1] * room, [1] * (room + 1)
    policy.check_prompt_lengths([fits, [1, 2]], 40, ["a", "b"])
    [[c]] = policy.generate([fits], temperature=0.0, max_new_tokens=40)
    assert len(c.tokens) <= 40
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        policy.generate([too_long], temperature=0.0, max_new_tokens=40)
    with pytest.raises(PromptTooLong) as e:
        policy.check_prompt_lengths([fits, too_long, [1] * 200], 40, ["a", "b", "c"])
    assert [ln.split(":")[0] for ln in e.value.lines] == ["b", "c"]
    assert "the prompt is 81 tokens, more than the 80" in e.value.lines[0]
    with pytest.raises(PromptTooLong, match="max_new_tokens=120 leaves no room"):
        policy.check_prompt_lengths([[1]], 120, ["a"])
    assert sampling.prompt_room(128, 120, 16) <= 0


def test_non_finite_reference_log_probs_name_the_record_and_leave_no_dataset(tmp_path):
    """12 pairs in 2 shards (shard k holds pairs k, k + 2, ...): pair 5 is the third record
    of the second shard. A reference that gives it a NaN stops the run there, naming it,
    and the first shard, already written, is removed with the directory this call made."""
    pairs = random_pairs(12, 32, 64, seed=0)
    write_dataset(tmp_path / "data", {"train": pairs}, shards=2)
    bad = pairs[5]

    def score(batch):
        out = np.zeros((len(batch["chosen_ids"]), 2, 5), np.float32)
        for i, ids in enumerate(batch["chosen_ids"]):
            if np.array_equal(ids, bad.chosen_ids):
                out[i, 1, 2] = np.nan
        return out

    shard = "train-00001-of-00002.array_record"
    with pytest.raises(scoring.NonFiniteReference,
                       match=rf"{shard}: record 2 \(pair_id {bad.pair_id}, .* not finite"):
        scoring.precompute_reference(score, tmp_path / "data", tmp_path / "out", batch_size=4)
    assert not (tmp_path / "out").exists()
    manifest = scoring.precompute_reference(lambda b: np.zeros((len(b["chosen_ids"]), 2, 5)),
                                            tmp_path / "data", tmp_path / "out", batch_size=4)
    assert manifest["splits"]["train"]["records"] == 12  # a finite reference goes through
