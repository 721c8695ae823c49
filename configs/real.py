r"""A real Focused-DPO run: an HF checkpoint, a prompt file, real benchmarks, any mesh.

    python -m launch.pipeline --workdir=runs/qwen7b \
        --config=configs/real.py:hf_dir=/ckpt/Qwen2.5-Coder-7B-Instruct,prompts=prompts.jsonl

Prompts are `{"id", "prompt"}` lines (e.g. from `launch.synthesize`). The policy writes
k = 10 codes and 10 tests per prompt at temperature 1.5 [paper], every code runs against
every test, codes are ranked, error-point pairs built, reference sums precomputed, and
Focused-DPO and DPO are trained from the imported checkpoint, then evaluated greedily on
HumanEval(+) and MBPP(+). The same program and stages as `configs/toy.py`; only values differ.
On a pod, run the same command on every host with `--config.distributed=True` (see
launch/tpu_pod.sh). Not run here: no weights can be downloaded on this machine.
"""

from __future__ import annotations

from configs import toy
from configs.common import parse_arg


def get_config(arg: str | None = None):
    arg = parse_arg(arg, hf_dir="", prompts="")
    c = toy.get_config()
    c.name = "real"
    c.toy.enabled = False
    c.init.hf_dir = arg.hf_dir
    c.warm_start.enabled = False
    c.prompts = arg.prompts
    c.tests_source = "model"
    c.mesh_shape = (1, -1, 1)  # FSDP over every device; e.g. (1, -1, 4) adds tensor parallel
    c.max_len = 2048
    c.sample.update(dict(num_codes=10, num_tests=10, temperature=1.5, top_p=1.0,
                         max_new_tokens=768, batch_size=256, response_format="code_block",
                         code_prompt="", max_prompts=0))
    c.execute.update(dict(timeout=10.0, workers=0))  # 0: all cores
    c.build.update(dict(val_fraction=1 / 6))
    # Judged by the tests passed by the top-ranked code (no ground truth exists here).
    c.analysis.continuation = True
    c.methods = ("focused_dpo", "dpo")
    c.seeds = (0,)
    c.train.update(dict(steps=-1, batch_size=64, lr=5e-6, beta=0.1, nll_weight=0.0,
                        warmup_steps=10))
    c.evaluate.update(dict(max_new_tokens=768, workers=0, min_time_limit=4.0,
                           benchmarks=(("humaneval+", "humaneval+", ""),
                                       ("mbpp+", "mbpp+", ""))))
    return c
