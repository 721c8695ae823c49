r"""Scoring sequences with a model (`python -m launch.score`).

    python -m launch.score --checkpoint=CKPT --input=IN.jsonl --output=OUT.jsonl \
        [--config.batch_size=16 --config.compute_dtype=float32]

The batching and chunking are `fdpo.policy.Policy`'s (the defaults must agree, a test checks).
"""
import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.batch_size = 8  # sequences per compiled call
    c.length_bucket = 128  # lengths are padded up to a multiple of this (fewer recompilations)
    c.compute_dtype = ""  # "" keeps the checkpoint's; or float32 / bfloat16
    c.logprob_chunk = 256  # positions per chunk of the float32 log-softmax
    c.lock()
    return c
