"""Pair construction (`python -m launch.build`): ranking, error-point pairs, records.

    python -m launch.build --config=configs/build.py --input=SAMPLES.jsonl \
        --tokenizer=HF_DIR --out=DIR --config.max_len=2048 --config.ranker=mutual

The fields are `data_tools.build.BuildConfig`'s (the defaults must agree; a test checks);
see docs/data.md for the [open] choices behind them.
"""
import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.max_len = 2048  # record length L: prompt + response + padding
    c.ranker = "mutual"  # mutual | codet | pass_count
    c.damping = 0.85  # mutual reinforcement: d
    c.max_iter = 1000  # mutual: stops at the fixed point (no score moves by 1e-9) or here
    c.patience = 0  # > 0: stop early after this many updates without a ranking change
    c.lam = 1.0  # Diff = rank difference + lam * common fraction
    c.pairs_per_problem = 1
    c.granularity = "token"  # token | line
    c.val_fraction = 1 / 6  # the paper's 5,000 train : 1,000 validation
    c.shard_index = 0  # this host's shard of the input lines
    c.num_shards = 1
    c.chunk_size = 2048  # problems ranked and tokenised together
    c.preview_pairs = 20
    c.truncated = "drop"  # drop | reject_only: a sample cut by the token limit is never chosen
    c.train_pairs = 0  # global selection by Diff after all shards; 0 keeps all [paper: 5000]
    c.val_pairs = 0  # [paper: 1000]
    # Problems given as samples: "response" trains on the policy's own response tokens (EOS
    # only where it stopped by EOS; on-policy); "program" on the extracted program (off-policy),
    # with an EOS only when append_eos (docs/data.md).
    c.response = "response"
    c.append_eos = False
    # fdpo.tokenization.PROMPT_FORMATS; "": the one the problem records were sampled with
    # (else the tokenizer's default). A record sampled with another format, or whose
    # prompt_ids differ from the prompt rendered here, is an error naming file:line.
    c.prompt_format = ""
    # "pairs" (preference pairs) | "rft": one SFT record per correct sample (train it with
    # configs/focused_dpo.py:preset=sft; docs/data.md).
    c.emit = "pairs"
    # Controls of the focusing study (docs/data.md): where the MID class lies in each pair,
    # "error_point" | "random" (an equal-length span elsewhere) | "oracle" (the problem
    # record's "oracle_focus" regex); and label-shuffled pairs (sides swapped with prob. 1/2).
    c.focus = "error_point"
    c.focus_seed = 0
    c.shuffle_labels = False
    c.lock()
    return c
