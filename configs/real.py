r"""A real Focused-DPO run: an HF checkpoint, a prompt file, real benchmarks, any mesh.

    python -m launch.pipeline --workdir=runs/qwen7b \
        --config=configs/real.py:hf_dir=/ckpt/Qwen2.5-Coder-7B-Instruct,prompts=prompts.jsonl

Prompts are `{"id", "prompt"}` lines (e.g. from `launch.synthesize`). The policy writes
k = 10 codes and 10 tests per prompt at temperature 1.5 [paper], every code runs against
every test, codes are ranked, error-point pairs built, reference sums precomputed, and
Focused-DPO and DPO are trained from the imported checkpoint with the same learning rate,
then evaluated greedily on HumanEval(+) and MBPP(+). The same program, stages and fields as
`configs/toy.py` (tests/launch/test_pipeline.py checks that they agree); only values differ.
On a pod, run the same command on every host with `--config.distributed=True` (see
launch/tpu_pod.sh). Not run here: no weights can be downloaded on this machine.
"""

from __future__ import annotations

import ml_collections

from configs import init_model, toy_data
from configs.common import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, hf_dir="", prompts="", prompt_format="")
    c = ml_collections.ConfigDict()
    c.name = "real"

    # The miniature's data is not made: its fields are here only so that both configs have
    # the same fields.
    c.toy = toy_data.get_config()
    c.toy.enabled = False

    # The initial policy and frozen reference, imported from Hugging Face (launch.import_hf).
    c.init = ml_collections.ConfigDict(dict(hf_dir=arg.hf_dir, seed=0))
    c.init.fields = init_model.get_config().fields  # unused: the model comes from hf_dir
    c.prompts = arg.prompts  # {"id", "prompt"} lines
    c.tests_source = "model"  # the policy writes the tests (the paper)
    c.mesh_shape = (1, -1, 1)  # FSDP over every device; e.g. (1, -1, 4) adds tensor parallel
    c.distributed = False  # multi-host: jax.distributed.initialize() in every program
    c.max_len = 2048  # record length L for pairs
    # How sample, build, evaluate and analyze render a prompt (fdpo.tokenization.PROMPT_FORMATS):
    # "" = the tokenizer's chat template when it has one, else plain text; "magicoder" or
    # "deepseek_instruct" for those models' own layouts (e.g. :prompt_format=magicoder for
    # MagiCoder-S-DS-6.7B, whose tokenizer has no chat template).
    c.prompt_format = arg.prompt_format

    # No warm start: its SFT pairs come from the miniature's data.
    c.warm_start = ml_collections.ConfigDict(dict(
        enabled=False, steps=0, batch_size=0, lr=0.0, warmup_steps=0))

    # Self-generation (launch.sample) in prompt_format; code_prompt "" is
    # launch.sample's own code message.
    c.sample = ml_collections.ConfigDict(dict(
        num_codes=10, temperature=1.5, top_p=1.0, max_new_tokens=768, batch_size=256,
        response_format="code_block", seed=0, max_prompts=0,  # 0: every prompt
        split="",  # the miniature's prompt split; a real run samples every line of `prompts`
        num_tests=10, code_prompt=""))
    c.execute = ml_collections.ConfigDict(dict(timeout=10.0, workers=0))  # 0: all cores
    # The paper keeps 5,000 training and 1,000 validation pairs (top Diff over all
    # problems); a truncated sample is never chosen, nor (drop) rejected. response:
    # "response" (the policy's own tokens; on-policy) or "program" (the extracted program,
    # off-policy; EOS only with append_eos). docs/data.md.
    c.build = ml_collections.ConfigDict(dict(ranker="mutual", lam=1.0, val_fraction=1 / 6,
                                             truncated="drop", train_pairs=5000, val_pairs=1000,
                                             response="response", append_eos=False))

    c.methods = ("focused_dpo", "dpo")
    c.seeds = (0,)
    # steps -1: the train config's epochs decide the length. lr 5e-6 as CodeDPO (METHOD.md).
    c.train = ml_collections.ConfigDict(dict(
        steps=-1, batch_size=64, lr=5e-6, beta=0.1, nll_weight=0.0, w_focused=2.0,
        warmup_steps=10))
    c.w_focused_ablation = ()  # e.g. (1.0, 5.0): extra focused_dpo runs at seed 0
    # Every method at train.lr and train.nll_weight (lr and NLL matched, METHOD.md); an entry
    # {method: {lr, nll_weight}} would override them (configs/toy.py has some).
    c.method_train = ml_collections.ConfigDict()

    # The continuation experiment (METHOD.md section 1), judged by the tests passed by the
    # top-ranked code: no ground truth exists here.
    c.analysis = ml_collections.ConfigDict(dict(continuation=True, num_continuations=1))

    # (name, benchmark, dataset path or "" for the release file) per evaluation.
    c.evaluate = ml_collections.ConfigDict(dict(
        max_new_tokens=768, workers=0, min_time_limit=4.0,
        benchmarks=(("humaneval+", "humaneval+", ""), ("mbpp+", "mbpp+", ""))))
    return c
