"""The miniature's data files (`python -m launch.toy_data`); also the `toy` section of
configs/toy.py.

    python -m launch.toy_data --out=DIR [--config.family=decision --config.seed=0]

Two task families (docs/pipeline.md): "lists" (data_tools/toy/tasks.py: composition of
filter, transform and aggregate; evaluated on seen and held-out combinations) and "decision"
(data_tools/toy/decision.py: one decision point with planted wrong beliefs; evaluated on
validation and test combinations). Each family reads the fields marked for it.
"""
import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.family = "lists"  # or "decision"
    c.seed = 0  # the splits and the tests
    c.num_tests = 8  # oracle tests per task for self-verification
    c.corrupt_fraction = 0.25  # of those, the fraction expecting a wrong value
    c.vocab_size = 384  # BPE vocabulary
    c.eval_tests = 16  # inputs per task in the evaluation files
    # lists
    c.held_out_fraction = 0.2  # task combinations never trained on
    c.eval_seen = 64  # preference-split tasks sampled into eval_seen.jsonl
    c.sft_fraction = 0.5  # seen tasks in the warm start
    # decision
    c.trap_rate = 0.65  # trap phrasings written with the wrong operator in the SFT data
    c.noise_rate = 0.05  # every other phrasing written with the wrong operator
    c.tail_noise = 0.05  # per tail step: a replaced constant in the SFT data
    c.tail_lengths = (0, 2, 4)  # K: steps repeated after the first transform
    c.first_constants = (2, 3, 4, 5)  # digits of the first step
    c.tail_constants = (6, 7, 8, 9)  # and of the repeated step (>= 2: tail noise swaps them)
    c.num_sft = 3000  # tasks (combinations) per split: warm start,
    c.num_dpo = 800  # preference prompts,
    c.num_validation = 320  # validation (eval_validation.jsonl),
    c.num_test = 512  # and test (eval_test.jsonl)
    return c
