r"""Self-generation of codes and tests (`launch.sample`), METHOD.md section 2, phase 2.

    python -m launch.sample (--checkpoint CKPT | --hf_dir HF) --input PROMPTS.jsonl \
        --output SAMPLES.jsonl [--config=configs/sample.py[:greedy]] [--config.temperature=0.8]

Paper defaults: k = 10 codes and k = 10 tests per prompt at temperature 1.5 from the policy
itself. Temperature 1.5 suits 7B instruct models; small models (0.5B-1.5B) degenerate into
noise at 1.5, use ~0.8-1.0 there. The `greedy` variant is the pass@1 evaluation setting:
one greedy code per prompt, no tests.

Templates are Python format strings with `{prompt}` (the input line's prompt) and, for
tests, `{num_asserts}`. The rendered message is sent in `prompt_format` (below;
`fdpo.tokenization`): by default one user turn through the tokenizer's chat template when
it has one, else plain text with the tokenizer's special tokens, e.g. BOS; the data
builder, the evaluation and the analysis render it the same way.
"""

from __future__ import annotations

import ml_collections

CODE_PROMPT = (
    "{prompt}\n\n"
    "Write a complete, self-contained Python solution. Put the whole program in one "
    "```python fenced block.")

TEST_PROMPT = (
    "{prompt}\n\n"
    "Do not solve the problem. Write {num_asserts} Python assert statements that a correct "
    "solution must pass, each calling the function the problem asks for with concrete "
    "inputs and comparing against the expected output. Put them in one ```python fenced "
    "block.")

VARIANTS = ("", "greedy")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = (arg or "").strip()
    if arg not in VARIANTS:
        raise ValueError(f"configs/sample.py:{arg}: unknown variant; known: {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.mode = "both"  # "code", "tests" or "both"
    c.num_codes = 10  # sampled code responses per prompt [paper: 10]
    c.num_tests = 10  # sampled test responses per prompt [paper: 10]
    c.num_asserts = 5  # asked for in each test response (each assert becomes one test)
    c.code_prompt = CODE_PROMPT
    # How the program is read from a code response (fdpo.extract.RESPONSE_FORMATS):
    # "code_block": the program in the response's fenced block; "completion": the input
    # prompt + the response (a base model completing a function, the miniature).
    c.response_format = "code_block"
    # How the message becomes the model's prompt (fdpo.tokenization.PROMPT_FORMATS):
    # "" = the tokenizer's default ("chat_template" when it has one, else "plain"), or
    # "chat_template", "plain", "magicoder", "deepseek_instruct". Recorded in each problem
    # record with the prompt's token ids; launch.build and launch.analyze use the recorded one.
    c.prompt_format = ""
    c.test_prompt = TEST_PROMPT

    c.temperature = 1.5  # [paper]; 0 is greedy. Small models: ~0.8
    c.top_p = 1.0  # 1.0: off
    c.top_k = 0  # 0: off
    c.max_new_tokens = 512
    c.stop = ()  # stop strings (checked on the host every stop_check_steps tokens)
    c.seed = 0  # with (id, mode, sample index), fixes every sample; see fdpo/sampling.py

    c.batch_size = 64  # cache rows (prompt x sample); a multiple of data x fsdp
    c.length_bucket = 64  # prompt lengths are padded up to a multiple of this
    c.stop_check_steps = 32
    # Refill (continuous batching): a row whose sample ended takes the next waiting one, so a
    # batch costs the mean, not the longest, response length; the samples do not change.
    c.refill = True
    c.compute_dtype = ""  # "" keeps the checkpoint's; or float32 / bfloat16

    if arg == "greedy":
        c.mode, c.num_codes, c.num_tests, c.temperature = "code", 1, 0, 0.0
    return c
