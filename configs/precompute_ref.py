r"""Reference log-prob sums for pair records (`python -m launch.precompute_ref`).

    python -m launch.precompute_ref --checkpoint=CKPT --data=DIR --out=DIR2 \
        [--config.batch_size=16 --config.shard_index=I --config.num_shards=N]

The fields are `fdpo.scoring.precompute_reference`'s keyword arguments (logprob_chunk is its
chunk; the defaults must agree, a test checks).
"""
import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.batch_size = 16  # pairs per compiled call (rounded up to the data-parallel devices)
    # The frozen reference's compute dtype in training (float32 | bfloat16): the sums must be
    # what the train step would have computed.
    c.compute_dtype = "float32"
    c.logprob_chunk = 256  # positions per chunk of the float32 log-softmax
    c.shard_index = 0  # this invocation scores the shard files shard_index, + num_shards, ...
    c.num_shards = 1  # invocations sharing the work (one per host)
    c.lock()
    return c
