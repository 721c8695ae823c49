"""Samples codes and tests for prompts from the policy itself (self-generation).

    python -m launch.sample (--checkpoint CKPT | --hf_dir HF) --input PROMPTS.jsonl \
        --output SAMPLES.jsonl [--config=configs/sample.py[:greedy]] [--config.num_codes=10]

Input lines: `{"id": str or int, "prompt": str, ...}`. Malformed lines (bad JSON, a
missing or non-string prompt, a missing or repeated id) are all reported with their line
numbers and nothing runs.

Output lines, one per prompt, in the executor's input format (`launch.execute`) and
readable by `launch.build` once verdicts are added:

    {"id", "prompt", "codes": [program, ...], "tests": [assertion, ...],
     "raw": {"problem", "test_prompt", "code_responses", "code_finish", "test_responses",
             "test_finish"}}

`prompt` is the user message the codes were sampled from (the code template applied to
the input prompt), so DPO later conditions on exactly what the policy saw; the input
prompt is kept as `raw.problem`. `codes` holds the non-empty programs of the code
responses (`--config.response_format`: the fenced block of each, or input prompt +
response), `tests` every distinct assertion extracted from the test responses
(`fdpo.extract`); the responses themselves are in `raw`. The model, its tokenizer, prompt
format and EOS set come from `fdpo.policy.Policy`.

Resuming: ids already in OUTPUT are skipped (`fdpo.jsonl.resume`: a cut-off last line is
dropped and redone, any other malformed line is refused, naming it, and nothing runs);
lines are appended as prompts finish. Each sample's random stream is fixed by
(--config.seed, id, code/test, sample index), so a resumed run writes what an
uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from fdpo import extract, jsonl
from fdpo.policy import Policy
from launch import common

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "fdpo checkpoint directory.")
HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory.")
INPUT = flags.DEFINE_string("input", None, "Prompts JSONL.", required=True)
OUTPUT = flags.DEFINE_string("output", None, "Samples JSONL (appended to, resumed from).",
                             required=True)
CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "sample.py"),
    "Sampling config (configs/sample.py[:greedy]).", lock_config=True)

MODES = ("code", "tests", "both")


class InputError(ValueError):
    pass


def read_prompts(path: pathlib.Path) -> list[tuple[str, str]]:
    """[(id, prompt)] in input order; raises InputError listing every bad line."""
    items, errors, seen = [], [], {}
    for where, rec in jsonl.objects(path, errors):
        pid = rec.get("id")
        if isinstance(pid, bool) or not isinstance(pid, (str, int)) or pid == "":
            errors.append(f"{where}: 'id' must be a non-empty string or an integer")
            continue
        pid = str(pid)
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            errors.append(f"{where}: 'prompt' must be a non-empty string (id {pid!r})")
            continue
        if pid in seen:
            errors.append(f"{where}: id {pid!r} repeats line {seen[pid]}")
            continue
        seen[pid] = where.rpartition(":")[2]
        items.append((pid, rec["prompt"]))
    if errors:
        raise InputError("\n".join(map(str, errors)))
    return items


def row_seed(pid: str, kind: str, index: int) -> int:
    digest = hashlib.sha256(f"{pid}\0{kind}\0{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def main(argv):
    del argv
    cfg_s = CONFIG.value
    if (CHECKPOINT.value is None) == (HF_DIR.value is None):
        raise app.UsageError("give exactly one of --checkpoint and --hf_dir")
    if cfg_s.response_format not in extract.RESPONSE_FORMATS:
        raise app.UsageError(f"--config.response_format={cfg_s.response_format!r}; expected "
                             f"one of {extract.RESPONSE_FORMATS}")
    if cfg_s.mode not in MODES:
        raise app.UsageError(f"--config.mode={cfg_s.mode!r}; expected one of {MODES}")
    in_path, out_path = pathlib.Path(INPUT.value), pathlib.Path(OUTPUT.value)
    if not in_path.is_file():
        raise app.UsageError(f"--input={in_path}: no such file")
    items = read_prompts(in_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    finished = {str(pid) for pid in jsonl.resume(out_path, key="id")}
    pending = [(pid, p) for pid, p in items if pid not in finished]
    logging.info("%s: %d prompts, %d already in %s", in_path, len(items),
                 len(items) - len(pending), out_path)
    if not pending:
        print(f"nothing to do: all {len(items)} prompts are in {out_path}")
        return
    num = {"code": cfg_s.num_codes if cfg_s.mode in ("code", "both") else 0,
           "test": cfg_s.num_tests if cfg_s.mode in ("tests", "both") else 0}
    rows_per_prompt = num["code"] + num["test"]
    if rows_per_prompt == 0:
        raise app.UsageError("nothing to sample: num_codes and num_tests are both 0 here")

    common.quiet_tokenizers()
    mesh = common.init_jax()
    policy = Policy.load(mesh, checkpoint=CHECKPOINT.value, hf_dir=HF_DIR.value,
                         compute_dtype=cfg_s.compute_dtype, length_bucket=cfg_s.length_bucket,
                         stop_check_steps=cfg_s.stop_check_steps)
    logging.info("prompt format %s; EOS ids %s", policy.prompt_format, policy.eos_ids)
    params = dict(max_new_tokens=cfg_s.max_new_tokens, temperature=cfg_s.temperature,
                  top_k=cfg_s.top_k, top_p=cfg_s.top_p, stop=tuple(cfg_s.stop))
    batch = max(cfg_s.batch_size, policy.sampler.batch_multiple)
    prompts_per_call = max(1, batch // rows_per_prompt)
    # Every call padded to one row count (one compiled shape), no more than the job needs.
    pad_rows_to = min(batch, len(pending) * rows_per_prompt)

    with jsonl.Appender(out_path) as out, \
            tqdm(total=len(pending), desc="sample", unit="prompt") as bar:
        for start in range(0, len(pending), prompts_per_call):
            group = pending[start:start + prompts_per_call]
            messages = {pid: {"code": cfg_s.code_prompt.format(prompt=prompt),
                              "test": cfg_s.test_prompt.format(prompt=prompt,
                                                               num_asserts=cfg_s.num_asserts)}
                        for pid, prompt in group}
            rows = [(pid, kind, i) for pid, _ in group for kind in ("code", "test")
                    for i in range(num[kind])]
            completions = policy.generate(
                [messages[pid][kind] for pid, kind, _ in rows], seed=cfg_s.seed,
                row_seeds=[row_seed(*r) for r in rows], batch_size=batch,
                pad_rows_to=pad_rows_to, **params)
            by_row = {r: c for r, (c,) in zip(rows, completions)}
            for pid, prompt in group:
                code_c = [by_row[(pid, "code", i)] for i in range(num["code"])]
                test_c = [by_row[(pid, "test", i)] for i in range(num["test"])]
                programs = [extract.program_from_response(c.text, prompt, cfg_s.response_format)
                            for c in code_c]
                tests = list(dict.fromkeys(
                    a for c in test_c for a in extract.extract_assertions(c.text)))
                record = {
                    "id": pid, "prompt": messages[pid]["code"],
                    "codes": [p for p in programs if p.strip()], "tests": tests,
                    "raw": {"problem": prompt, "test_prompt": messages[pid]["test"],
                            "code_responses": [c.text for c in code_c],
                            "code_finish": [c.finish_reason for c in code_c],
                            "test_responses": [c.text for c in test_c],
                            "test_finish": [c.finish_reason for c in test_c]}}
                out.write(record)
            bar.update(len(group))
    print(f"sampled {len(pending)} prompts ({len(items) - len(pending)} were done) -> "
          f"{out_path}")


if __name__ == "__main__":
    try:
        app.run(main)
    except InputError as e:
        raise SystemExit(f"error: malformed input lines:\n{e}")
    except jsonl.JsonlError as e:
        raise SystemExit(f"error: {e}")
