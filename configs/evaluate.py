r"""Benchmark evaluation (`python -m launch.evaluate`): generation, pass@k, sandbox, time limits.

    python -m launch.evaluate --benchmark=humaneval+ --samples=S.jsonl --out=DIR \
        [--config.k='(1, 10)' --config.partial=True --config.workers=8]
    python -m launch.evaluate --benchmark=mbpp+ --checkpoint=CKPT --out=DIR \
        [--config.n=10 --config.temperature=0.8 --config.response_format=completion]

The time limits and the sandbox settings are `fdpo.evaluation.runner.RunConfig`'s and its
`tasks.TimePolicy`'s under the names below (the defaults must agree, a test checks);
docs/evaluation.md says why they are what they are.
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    # Generation, with --checkpoint or --hf_dir (fdpo.policy.Policy.generate).
    c.n = 1  # samples per task
    c.temperature = 0.0  # 0: greedy
    c.top_p = 0.95  # nucleus sampling
    c.max_new_tokens = 768
    c.batch_size = 32  # cache rows of the sampler
    c.refill = True  # a row whose sample ended takes the next (fdpo/sampling.py); same samples
    c.seed = 0
    # What the model is asked for (fdpo.extract.RESPONSE_FORMATS): "code_block", a whole
    # program in a fenced block, extracted; "completion", the task's prompt as it is, the
    # model's continuation appended to it (base models, the miniature). The prompt is
    # rendered in the policy's prompt format (chat template when the tokenizer has one).
    c.response_format = "code_block"
    # fdpo.tokenization.PROMPT_FORMATS; "": the tokenizer's default (chat_template when it
    # has one, else plain). Give the run's sampling format for a model without a template.
    c.prompt_format = ""
    # Generated programs go through fdpo.extract.sanitize (EvalPlus's post-processing: keep
    # the entry point, what it uses and the imports; drop prints, asserts, __main__ blocks),
    # as EvalPlus's codegen does by default before its evaluate. Samples files are evaluated
    # as given. No effect on tasks without an entry point (LiveCodeBench stdin).
    c.sanitize = True

    c.k = (1, 10, 100)  # pass@k for each k (those with n >= k on every task)
    c.partial = False  # allow samples for only some tasks (not comparable with published scores)

    # The sandbox (fdpo.evaluation.runner.RunConfig).
    c.workers = config_dict.placeholder(int)  # parallel sandboxes; None: all cores
    c.isolation = "full"  # full | no_cgroup | none, as for launch.execute (docs/sandbox.md)
    c.memory_mb = 4096  # per program (EvalPlus: 4 GB)

    # Time limits (fdpo.evaluation.tasks.TimePolicy): per input, max(min_time_limit,
    # time_limit_factor x the reference's time); a sample's summed time on one split is
    # capped at split_budget; LiveCodeBench has a fixed limit per test.
    c.min_time_limit = 4.0  # seconds (TimePolicy.floor_s)
    c.time_limit_factor = 4.0  # (TimePolicy.factor)
    c.split_budget = 60.0  # seconds (TimePolicy.budget_s)
    c.lcb_timeout = 6.0  # seconds per LiveCodeBench test (TimePolicy.lcb_timeout_s)
    c.lock()
    return c
