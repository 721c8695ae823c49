r"""The Phi analysis and the continuation experiment (`python -m launch.analyze`).

    python -m launch.analyze --samples=S.jsonl --verdicts=V.jsonl --out=DIR \
        [--config.pair_rule=first --config.verdict=ranked --config.unit=line]
    python -m launch.analyze --samples=S.jsonl --out=DIR --checkpoint=CKPT \
        --config.continuation=True [--config.num_continuations=4]

The table's settings are `data_tools.analyze.Options`' fields (the defaults must agree, a
test checks); docs/analysis.md says what each choice means.
"""
import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    # The Phi table (data_tools.analyze.Options).
    c.pair_rule = "diff"  # reference pair: diff (the builder's rule) | first (correct, incorrect)
    c.verdict = "all_tests"  # correct = all_tests (passes its row) | ranked (the data stage's)
    c.unit = "char"  # segment unit: char | line
    c.ranker = "mutual"  # data_tools.rank.RANKERS: ranks for the diff rule and ranked verdicts
    c.lam = 1.0  # lambda of the diff rule (rank difference + lam x common fraction)
    c.exclude_reference = True  # leave the reference pair's two samples out (both reported)

    # The continuation experiment (needs --checkpoint or --hf_dir): the policy continues from
    # prompt + prefix + chosen mid and from prompt + prefix + rejected mid.
    c.continuation = False
    c.num_continuations = 1  # per side and problem
    c.temperature = 0.0  # 0: greedy
    c.max_new_tokens = 256
    # The program: prompt + text (completion) or the code block of the text (code_block);
    # fdpo.extract.RESPONSE_FORMATS.
    c.response_format = "completion"
    # fdpo.tokenization.PROMPT_FORMATS; "": the one the samples were recorded with (else the
    # tokenizer's default); a different one is an error naming the record.
    c.prompt_format = ""
    c.timeout = 5.0  # seconds per (program, test) in the sandbox
    c.lock()
    return c
