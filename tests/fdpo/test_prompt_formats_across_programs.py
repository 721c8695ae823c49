"""One prompt format, one prompt: for every named format the sampler (`fdpo.selfgen`, what
`launch.sample` runs), the data builder (`data_tools.build`, given the sampler's record) and
the evaluation's generation (`fdpo.evaluation.generation`) condition the model on the same
token ids. The ids are caught where they enter the model (the policy's Sampler) and read back
from the pair records the builder writes."""
import json

import jax
import numpy as np
import pytest

from configs import evaluate as evaluate_config
from configs import sample as sample_config
from data_tools import build
from fdpo import problem, records, selfgen, sharding
from fdpo.evaluation import generation
from fdpo.evaluation import tasks as tk
from fdpo.policy import Policy
from fdpo.records import Segment
from fdpo.testing import build_tiny_tokenizer, make_hf_model
from fdpo.tokenization import PROMPT_FORMATS, load_tokenizer

pytestmark = pytest.mark.torch
ONE_DEVICE = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
MESSAGE = "Write a Python function that returns the sum of a list of numbers."
GOOD, BAD = "def f(xs):\n    return sum(xs)\n", "def f(xs):\n    return max(xs)\n"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    build_tiny_tokenizer(d, chat_template=True)  # ChatML template: every format applies
    make_hf_model(d, "qwen2", vocab_size=400, tie_word_embeddings=True, hidden_size=32,
                  intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("fmt", PROMPT_FORMATS)
def test_sampler_builder_and_evaluation_feed_the_same_prompt(fmt, hf_dir, tmp_path):
    policy = Policy.load(ONE_DEVICE, hf_dir=str(hf_dir), prompt_format=fmt, length_bucket=32)
    fed = []  # the prompt ids of every row the model is asked to continue
    sampler_generate = policy.sampler.generate

    def spy(prompts, params, **kw):
        fed.append([[int(t) for t in p] for p in prompts])
        return sampler_generate(prompts, params, **kw)

    policy.sampler.generate = spy

    # The sampler: its record holds the format and the ids it fed the model.
    c = sample_config.get_config()
    c.update(dict(mode="code", num_codes=2, num_tests=0, max_new_tokens=3, temperature=1.0,
                  batch_size=8, length_bucket=32, response_format="completion",
                  code_prompt="{prompt}", prompt_format=fmt))
    prompts, samples = tmp_path / "prompts.jsonl", tmp_path / "samples.jsonl"
    prompts.write_text(json.dumps({"id": "p", "prompt": MESSAGE}) + "\n")
    selfgen.sample_file(prompts, samples, c, lambda: policy)
    (rec,) = [json.loads(x) for x in samples.read_text().splitlines()]
    (sampler_rows,) = fed
    assert rec["prompt_format"] == fmt and rec["prompt"] == MESSAGE
    assert sampler_rows == [rec["prompt_ids"]] * 2

    # The builder, on that record with hand-made verdicts (its default: the recorded format).
    rec.update(samples=[{"response": r, "program": r, "finish": "eos"} for r in (GOOD, BAD)],
               tests=["assert f([1, 2]) == 3"], passed=[[1], [0]])
    problem.check(rec, "record", problem.EXECUTED)
    executed = tmp_path / "executed.jsonl"
    executed.write_text(json.dumps(rec) + "\n")
    manifest, _ = build.build(str(executed), str(hf_dir), str(tmp_path / "pairs"),
                              # the tiny vocabulary spells a system line in ~300 tokens
                              build.BuildConfig(max_len=1024, val_fraction=0.0),
                              tokenizer=load_tokenizer(hf_dir))
    assert manifest["tokenizer"]["prompt_format"] == fmt
    src = records.PairDataSource.from_manifest(str(tmp_path / "pairs" / "manifest.json"), "train")
    (pair,) = [src.record(i) for i in range(len(src))]
    for side in ("chosen", "rejected"):
        ids = np.asarray(getattr(pair, f"{side}_ids"))
        seg = np.asarray(getattr(pair, f"{side}_segments"))
        assert ids[seg == Segment.PROMPT].tolist() == rec["prompt_ids"]

    # The evaluation's generation, for a task whose prompt is the same message.
    e = evaluate_config.get_config()
    e.update(dict(n=1, max_new_tokens=3, batch_size=8, response_format="completion",
                  sanitize=False))
    generation.generate(policy, {"t": tk.Task("t", MESSAGE)}, "humaneval+", e)
    assert fed[1] == [rec["prompt_ids"]]
