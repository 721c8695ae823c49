"""Files for the embedded miniature: a tokenizer, prompts, oracle tests and SFT pairs.

    python -m launch.toy_data --out=DIR [--config.seed=0 --config.held_out_fraction=0.2]

writes, from the task family in `data_tools/toy/tasks.py`:

    DIR/tokenizer/          byte-level BPE trained offline on the family's text (HF format)
    DIR/prompts.jsonl       {"id", "prompt", "entry_point", "split"}: split "sft" (the
                            warm start's tasks), "dpo" (seen combinations the policy samples
                            for preference data, not in the warm start) or "held_out"
    DIR/tests.jsonl         {"id", "tests": [...], "tests_correct": [bool]} oracle tests; a
                            stated fraction expects a wrong value (for ranking to have work)
    DIR/eval_tests.jsonl    {"id", "tests": [...]} uncorrupted tests for pass@1
    DIR/sft_pairs.jsonl     {"id", "prompt", "chosen", "rejected"} for sft tasks: chosen is
                            the canonical body, rejected a wrong variant (ignored by the
                            `sft` loss preset, which trains on the chosen response only)
    DIR/eval_{seen,held_out}.jsonl  EvalPlus-format tasks (prompt, entry_point,
                            canonical_solution, base_input) for `launch.evaluate`: "seen"
                            is `eval_seen` of the dpo tasks
    DIR/toy_data.json       the settings and counts

The model completes a function body after the prompt (signature + docstring), as in
HumanEval, so a program is `prompt + response`.
"""

from __future__ import annotations

import json
import pathlib
import random
import sys

from data_tools.toy import tasks as toy_tasks

EOS = "<|endoftext|>"


def train_tokenizer(out_dir: pathlib.Path, corpus: list[str], vocab_size: int,
                    individual_digits: bool = False) -> None:
    """A byte-level BPE tokenizer trained on `corpus` (the family's programs), saved in HF
    format in `out_dir`; `individual_digits`: every digit its own token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if individual_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(out_dir)


def wrong_variant(task: toy_tasks.Task, rng: random.Random) -> str:
    """A plausible wrong body: the canonical one with the condition or update changed, and
    checked to differ from the reference on some input (a changed operator can be
    equivalent on the task's inputs).

    Every change replaces tokens rather than only inserting some (`>` -> `>=`, `total` ->
    `total + 1` were insertions): an insertion leaves the chosen side's middle empty, and
    launch.build drops such a pair, so a third of the warm start's SFT examples (88 of 258)
    were lost before."""
    body = task.solution
    swaps = [(" > ", " < "), (" < ", " > "), ("== 0", "== 1"), ("== 1", "== 0"),
             ("x * ", "x + "), ("x + ", "x * "), ("x - ", "x + "), ("+= 1", "+= x")]
    rng.shuffle(swaps)
    probe = toy_tasks.random_inputs(random.Random(0), 300) + [list(range(-3, 16))]
    candidates = [body.replace(old, new, 1) for old, new in swaps if old in body]
    candidates += [body.replace("return total", "return 0"),
                   body.replace("return out", "return []")]
    for wrong in candidates:
        if wrong == body:
            continue
        namespace: dict = {}
        exec(task.prompt + wrong, namespace)  # our own generated source, not model output
        if any(namespace[task.entry_point](xs) != task.reference(xs) for xs in probe):
            return wrong
    raise AssertionError(f"{task.task_id}: no wrong variant found")


def write(out: pathlib.Path, *, seed: int = 0, held_out_fraction: float = 0.2,
          num_tests: int = 8, eval_tests: int = 16, corrupt_fraction: float = 0.25,
          vocab_size: int = 384, eval_seen: int = 64, sft_fraction: float = 0.5) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    seen, held = toy_tasks.split_tasks(held_out_fraction, seed=seed)
    train_tokenizer(out / "tokenizer", [t.prompt + t.solution for t in seen + held], vocab_size)
    rng = random.Random(seed)
    # The warm start sees half of the seen combinations; the policy then samples on the
    # other half, where it has generalised only partly (a mix of right and wrong programs).
    order = list(seen)
    rng.shuffle(order)
    n_sft = round(sft_fraction * len(order))
    sft_tasks, dpo_tasks = order[:n_sft], order[n_sft:]
    counts = {"sft": len(sft_tasks), "dpo": len(dpo_tasks), "held_out": len(held)}
    with open(out / "prompts.jsonl", "w") as prompts, open(out / "tests.jsonl", "w") as tests, \
            open(out / "eval_tests.jsonl", "w") as evals, \
            open(out / "sft_pairs.jsonl", "w") as sft:
        for split, tasks in (("sft", sft_tasks), ("dpo", dpo_tasks), ("held_out", held)):
            for task in tasks:
                prompts.write(json.dumps({"id": task.task_id, "prompt": task.prompt,
                                          "entry_point": task.entry_point,
                                          "split": split}) + "\n")
                t, ok = toy_tasks.oracle_tests(task, rng, num_tests, corrupt_fraction)
                tests.write(json.dumps({"id": task.task_id, "tests": t, "tests_correct": ok})
                            + "\n")
                t, _ = toy_tasks.oracle_tests(task, rng, eval_tests, 0.0)
                evals.write(json.dumps({"id": task.task_id, "tests": t}) + "\n")
                if split == "sft":
                    sft.write(json.dumps({"id": task.task_id, "prompt": task.prompt,
                                          "chosen": task.solution,
                                          "rejected": wrong_variant(task, rng)}) + "\n")
    eval_rng = random.Random(seed + 1)
    for split, tasks in (("seen", eval_rng.sample(dpo_tasks, min(eval_seen, len(dpo_tasks)))),
                         ("held_out", held)):
        with open(out / f"eval_{split}.jsonl", "w") as f:
            for task in tasks:
                inputs = toy_tasks.random_inputs(eval_rng, eval_tests)
                f.write(json.dumps({
                    "task_id": task.task_id, "prompt": task.prompt,
                    "entry_point": task.entry_point, "canonical_solution": task.solution,
                    "base_input": [[xs] for xs in inputs], "plus_input": [], "atol": 0,
                }) + "\n")
        counts[f"eval_{split}"] = len(tasks)
    meta = {"seed": seed, "held_out_fraction": held_out_fraction, "sft_fraction": sft_fraction, "num_tests": num_tests,
            "eval_tests": eval_tests, "corrupt_fraction": corrupt_fraction,
            "vocab_size": vocab_size, "counts": counts,
            "program": "prompt + response (function body completion)"}
    (out / "toy_data.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


if __name__ == "__main__":
    sys.exit("data_tools.toy.data is a library; the program is `python -m launch.toy_data`")
