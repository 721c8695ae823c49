r"""The embedded miniature: the whole Focused-DPO pipeline on a laptop CPU.

    python -m launch.pipeline --config=configs/toy.py --workdir=runs/toy
    python -m launch.pipeline --config=configs/toy.py:fast --workdir=/tmp/toy   # CI smoke run
    python -m launch.pipeline --config=configs/toy.py:decision --workdir=runs/toy-decision

A built-in family of list tasks (`data_tools/toy/tasks.py`; `:decision`: the decision family
of `data_tools/toy/decision.py`, with planted wrong beliefs), a tokenizer trained offline,
and a tiny Qwen2-architecture model given a supervised warm start through the same train
program (the `sft` preset); then the paper's pipeline: sample codes, execute them against
tests, rank, build error-point pairs, precompute reference log-probs, train Focused-DPO and
the baselines from the same start over several seeds, evaluate greedy pass@1 on seen and
held-out task combinations, analyse (Phi table), report.

Where the miniature departs from the paper, and why (the report repeats this):
- tests come from an oracle (reference outputs on random inputs) with a stated fraction of
  corrupted expected values, not from the model: a tiny model's own asserts are almost
  never right, which would make ranking meaningless;
- sampling temperature is lower than the paper's 1.5, which destroys a tiny model's samples.
"""

from __future__ import annotations

import ml_collections

from configs import init_model, toy_data
from configs.common import parse_arg

# Focused-DPO, DPO, and continued supervised training on the chosen (correct) samples of
# the same pairs for the same steps: the baseline any preference method must beat.
METHODS = ("focused_dpo", "dpo", "continued_sft")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, fast=False, decision=False)
    c = ml_collections.ConfigDict()
    c.name = "toy"

    # The miniature's data (launch.toy_data, configs/toy_data.py). A real run sets toy.enabled = False and
    # gives prompts, a tokenizer and an initial checkpoint instead (see configs/real.py).
    c.toy = toy_data.get_config()
    c.toy.enabled = True

    # The initial policy: a random tiny Qwen2 (launch.init_model: fields of ModelConfig, as
    # in configs/init_model.py), warm-started by SFT.
    c.init = ml_collections.ConfigDict(dict(hf_dir="", seed=0))
    c.init.fields = init_model.get_config().fields
    c.init.fields.update(dict(architecture="qwen2", hidden_size=96, num_layers=3, num_heads=4,
                              num_kv_heads=2, intermediate_size=256, tie_embeddings=True))
    c.prompts = ""  # a real run's prompt file ({"id", "prompt"} lines); the toy writes its own
    c.tests_source = "oracle"  # or "model": the policy writes the tests (the paper)
    c.mesh_shape = (1, -1, 1)  # (data, fsdp, tensor) for every JAX program
    c.distributed = False  # multi-host: jax.distributed.initialize() in every program
    c.max_len = 96  # record length L for pairs and SFT data (toy programs: <= 75 tokens)
    c.prompt_format = ""  # the tokenizer's default: plain (the miniature's has no template)

    c.warm_start = ml_collections.ConfigDict(dict(
        enabled=True, steps=300, batch_size=16, lr=3e-3, warmup_steps=30))

    # Self-generation (launch.sample) on the seen prompts.
    c.sample = ml_collections.ConfigDict(dict(
        num_codes=10, temperature=1.0, top_p=1.0, max_new_tokens=64, batch_size=128,
        response_format="completion", seed=0, max_prompts=0,  # 0: every prompt of the split
        split="dpo",  # seen combinations that were not in the warm start
        num_tests=0, code_prompt="{prompt}"))
    c.execute = ml_collections.ConfigDict(dict(timeout=2.0, workers=2))
    # Every pair is kept (0: no global top-N); truncated samples neither chosen nor rejected;
    # pairs on the policy's own response tokens.
    c.build = ml_collections.ConfigDict(dict(ranker="mutual", lam=1.0, val_fraction=0.1,
                                             truncated="drop", train_pairs=0, val_pairs=0,
                                             response="response", append_eos=False))

    # Preference training: every method from the same warm start, for each seed.
    c.methods = METHODS
    c.seeds = (0, 1, 2)
    c.train = ml_collections.ConfigDict(dict(
        steps=150, batch_size=16, lr=5e-5, beta=0.1, nll_weight=1.0, w_focused=2.0,
        warmup_steps=10))
    c.w_focused_ablation = ()  # e.g. (1.0, 5.0): extra focused_dpo runs at seed 0
    # Per-method overrides of train.lr / train.nll_weight, each method at its best setting
    # on the *seen* tasks in a one-seed probe of lr {5e-5, 2e-4} x NLL weight {0, 1}
    # (docs/results/miniature.md): Focused-DPO 5e-5 + NLL 1 (the defaults above), DPO
    # 2e-4 + NLL 1, continued SFT 2e-4.
    c.method_train = ml_collections.ConfigDict(dict(
        dpo=dict(lr=2e-4), continued_sft=dict(lr=2e-4)))

    # The toy evaluates its own seen / held-out task files; a real run lists
    # (name, benchmark, dataset path or "") triples, e.g. ("humaneval+", "humaneval+", "").
    # The continuation experiment of METHOD.md section 1 (greedy, from the start model),
    # judged by the miniature's right tests; a real run judges by the tests the data stage
    # takes as ground truth (data_tools.analyze.judging_tests).
    c.analysis = ml_collections.ConfigDict(dict(continuation=True, num_continuations=1))

    c.evaluate = ml_collections.ConfigDict(dict(max_new_tokens=64, workers=2,
                                                min_time_limit=1.0, benchmarks=()))

    if arg.decision:
        c.toy.family = "decision"
        # Enough merges that each comparison operator is one token (the family's tokenizer
        # splits digits): the decision point is one token.
        c.toy.vocab_size = 448
        # Tails of K in {0, 1, 2} steps and 6000 warm-start tasks: with K in {0, 2, 4} and
        # 3000 tasks 900 steps left the constants uncopied (greedy validation pass@1 1-5%).
        c.toy.tail_lengths = (0, 1, 2)
        c.toy.num_sft = 6000
        c.max_len = 96  # its programs are up to 84 tokens (prompt + response)
        # 8 heads (4 kv heads) and 1500 steps: on each of the study's three warm starts every
        # part of every validation program is right but the operator on trap phrasings,
        # which is the planted belief (non-trap 100%, trap 0-2.5%: docs/results/study.md).
        # 1100 steps did it without remat (r24-r26, docs/results/miniature.md) but not with
        # model.remat_policy=full, the same math rounded otherwise: warm start 0 then left
        # the first-step constant uncopied (non-trap 26%). With 4 heads the operator's
        # direction is learned in a late transition that missed on warm start 1 at 900 and
        # 1100 steps (83%, 43%: r17, r20); lr 1.5e-3 was slower (r18), 5e-3 unstable (r19).
        # Seeds 0-4 meet that premise, 3 of seeds 5-12 do not (non-trap 7.6, 75.8, 43.5%:
        # the study's confirm run): the recipe was chosen on the first seeds.
        # :fast keeps the 4 heads its plumbing test was sized with.
        if not arg.fast:
            c.init.fields.update(dict(num_heads=8, num_kv_heads=4))
        c.warm_start.update(steps=1500, warmup_steps=50)

    if arg.fast:  # a few steps per stage: checks the plumbing, not the method
        c.toy.eval_seen = 8
        c.toy.held_out_fraction = 0.05
        c.toy.num_validation = 16
        c.toy.num_test = 16
        c.init.fields.update(dict(hidden_size=64, num_layers=2, intermediate_size=128))
        # Enough to write some right and some wrong programs, so that pairs exist.
        c.warm_start.steps = 200
        c.sample.num_codes = 4
        c.sample.max_prompts = 24
        c.train.steps = 4
        c.train.batch_size = 4
        c.seeds = (0,)
        c.methods = ("focused_dpo", "dpo")
    return c
