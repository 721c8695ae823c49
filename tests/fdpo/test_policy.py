"""`fdpo.policy.Policy`: one model loaded from a Hugging Face directory or from the fdpo
checkpoint `launch.import_hf` made of it gives the same tokens everywhere; generation is
the Sampler's and scoring the Scorer's."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer

from fdpo import sampling, sharding
from fdpo.models import checkpoint
from fdpo.policy import ROW_SEED_STRIDE, Policy
from fdpo.scoring import Scorer
from fdpo.testing import build_tiny_tokenizer, make_hf_model

from tests.conftest import REPO

pytestmark = pytest.mark.torch
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
ONE_DEVICE = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
# Indented code: transformers' Qwen2Tokenizer (what AutoTokenizer picks when a config.json
# says qwen2) splits "\n    " differently from the tokenizer.json these files hold.
PROMPTS = ["Write a Python function add(a, b).", "def fib(n):\n    if n < 2:\n        return n\n"]
RESPONSES = ["def add(a, b):\n    return a + b\n", "  x  =  1\n\n\tprint(x)"]


@pytest.fixture(scope="module", params=["chat", "plain"])
def model_dirs(request, tmp_path_factory):
    """(HF directory, the fdpo checkpoint launch.import_hf writes from it, chat?)."""
    chat = request.param == "chat"
    base = tmp_path_factory.mktemp(request.param)
    hf = build_tiny_tokenizer(base / "hf", chat_template=chat)  # vocab 400, eos <|im_end|>
    make_hf_model(hf, "qwen2", vocab_size=400, tie_word_embeddings=True)
    proc = subprocess.run([sys.executable, "-m", "launch.import_hf", "--hf_dir", str(hf),
                           "--out", str(base / "ckpt")], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (base / "ckpt" / "hf_extras" / "config.json").exists()
    return hf, base / "ckpt", chat


@pytest.fixture(scope="module")
def policies(model_dirs):
    hf, ckpt, chat = model_dirs
    return (Policy.load(ONE_DEVICE, hf_dir=str(hf)), Policy.load(ONE_DEVICE, checkpoint=str(ckpt)),
            hf, chat)


def test_checkpoint_and_hf_dir_give_the_same_tokens(policies):
    from_hf, from_ckpt, hf, chat = policies
    assert from_hf.prompt_format == from_ckpt.prompt_format == (
        "chat_template" if chat else "plain")
    assert from_hf.encode_prompts(PROMPTS) == from_ckpt.encode_prompts(PROMPTS)
    for a, b in zip(from_hf.encoder.responses(RESPONSES), from_ckpt.encoder.responses(RESPONSES)):
        np.testing.assert_array_equal(a, b)
    # Both read tokenizer.json as it is written.
    own = Tokenizer.from_file(str(hf / "tokenizer.json"))
    for text in RESPONSES:
        want = own.encode(text, add_special_tokens=False).ids
        assert from_hf.encode_text(text) == from_ckpt.encode_text(text) == want
    im_end = own.token_to_id("<|im_end|>")
    assert from_hf.eos_ids == from_ckpt.eos_ids and im_end in from_hf.eos_ids
    greedy = dict(temperature=0.0, max_new_tokens=12)
    a = from_hf.generate(PROMPTS, **greedy)
    b = from_ckpt.generate(PROMPTS, **greedy)
    assert [[c.tokens for c in cs] for cs in a] == [[c.tokens for c in cs] for cs in b]


@pytest.mark.parametrize("model_dirs", ["chat"], indirect=True)
def test_generate_is_the_sampler(policies):
    policy, *_ = policies
    ids = policy.encode_prompts(PROMPTS)
    sampler = policy.sampler  # its compiled programs are reused
    for temperature in (0.0, 1.0):
        params = sampling.SamplingParams(max_new_tokens=10, temperature=temperature,
                                         eos_ids=policy.eos_ids)
        # Strings and token ids mixed; two samples each, default row seeds.
        got = policy.generate([PROMPTS[0], ids[1]], num_samples=2, seed=3,
                              max_new_tokens=10, temperature=temperature)
        want = sampler.generate([ids[0], ids[0], ids[1], ids[1]], params, seed=3,
                                row_seeds=[0, 1, ROW_SEED_STRIDE, ROW_SEED_STRIDE + 1])
        assert [len(cs) for cs in got] == [2, 2]
        flat = [c for cs in got for c in cs]
        assert [(c.tokens, c.finish_reason) for c in flat] == [
            (c.tokens, c.finish_reason) for c in want]
        assert [c.text for c in flat] == [policy.tokenizer.decode(c.tokens,
                                                                   skip_special_tokens=True)
                                          for c in want]
        if temperature == 0:
            assert all(cs[0].tokens == cs[1].tokens for cs in got)
        else:
            assert any(cs[0].tokens != cs[1].tokens for cs in got)


@pytest.mark.parametrize("model_dirs", ["chat"], indirect=True)
def test_score_is_the_scorer(policies):
    policy, *_ = policies
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, policy.cfg.vocab_size, n).tolist() for n in (9, 3, 30, 17, 5)]
    labels = [rng.integers(0, 4, len(s)).tolist() if i % 2 == 0 else None
              for i, s in enumerate(seqs)]
    got = policy.score(seqs, labels, batch_size=2, length_bucket=8)
    scorer = Scorer(policy.cfg, policy.graphdef, policy.state, ONE_DEVICE)
    with_labels = scorer.score(seqs, [lab or [0] * len(s) for lab, s in zip(labels, seqs)])
    # float32 sums over a different padding: equal up to rounding at the sums' scale.
    np.testing.assert_allclose(got.logp_sum, with_labels.logp_sum, rtol=1e-5)
    np.testing.assert_array_equal(got.num_tokens, [len(s) - 1 for s in seqs])
    for i, lab in enumerate(labels):
        if lab is None:  # a row without labels counts nothing in segments
            assert not got.segment_counts[i].any() and not got.segment_sums[i].any()
        else:
            np.testing.assert_array_equal(got.segment_counts[i], with_labels.segment_counts[i])
            np.testing.assert_allclose(got.segment_sums[i], with_labels.segment_sums[i],
                                       rtol=1e-5, atol=1e-5)


def test_prompt_format_can_be_named(model_dirs):
    hf, _, chat = model_dirs
    plain = Policy.load(ONE_DEVICE, hf_dir=str(hf), prompt_format="plain")
    assert plain.prompt_format == "plain"
    assert plain.encode_prompts(PROMPTS) == [plain.tokenizer(p)["input_ids"] for p in PROMPTS]
    if not chat:
        with pytest.raises(ValueError, match="no chat template"):
            Policy.load(ONE_DEVICE, hf_dir=str(hf), prompt_format="chat_template")


def test_checkpoint_without_tokenizer_scores_and_samples_ids(tmp_path):
    checkpoint.init_random(tmp_path / "ckpt", fields=dict(hidden_size=32, num_layers=1,
                                                          num_heads=2, num_kv_heads=1))
    policy = Policy.load(ONE_DEVICE, checkpoint=str(tmp_path / "ckpt"))
    assert policy.tokenizer is None and policy.prompt_format is None
    [[c]] = policy.generate([[1, 2, 3]], temperature=0.0, max_new_tokens=4)
    assert c.text is None and len(c.tokens) <= 4
    assert policy.score([[1, 2, 3]]).num_tokens.tolist() == [2]
    with pytest.raises(ValueError, match="no tokenizer files"):
        policy.generate(["text"], max_new_tokens=4)
