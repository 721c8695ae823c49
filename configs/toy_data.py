"""The miniature's data files (`python -m launch.toy_data`); also the `toy` section of
configs/toy.py.

    python -m launch.toy_data --out=DIR [--config.seed=0 --config.held_out_fraction=0.2]
"""
import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0  # the held-out split and the tests
    c.held_out_fraction = 0.2  # task combinations never trained on
    c.num_tests = 8  # oracle tests per task for self-verification
    c.corrupt_fraction = 0.25  # of those, the fraction expecting a wrong value
    c.vocab_size = 384  # BPE vocabulary
    c.eval_tests = 16  # inputs per task in the evaluation files
    c.eval_seen = 64  # preference-split tasks sampled into eval_seen.jsonl
    c.sft_fraction = 0.5  # seen tasks in the warm start
    return c
