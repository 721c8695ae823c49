"""Self-generation: k codes and tests per prompt sampled from the policy itself, a prompts
JSONL in, a samples JSONL out (the executor's input). `launch.sample` is this with flags:

    from fdpo import selfgen
    selfgen.sample_file("prompts.jsonl", "samples.jsonl", configs.sample.get_config(),
                        lambda: Policy.load(mesh, hf_dir="HF"))

The formats, the resuming and the random streams are described in launch/sample.py and
docs/sampling.md.
"""
from __future__ import annotations

import hashlib
import pathlib
from typing import Callable

from absl import logging
from tqdm import tqdm

from fdpo import extract, jsonl, problem
from fdpo.policy import Policy

MODES = ("code", "tests", "both")


class InputError(ValueError):
    pass


def read_prompts(path: pathlib.Path, locations: dict | None = None
                 ) -> list[tuple[str, str, dict]]:
    """[(id, prompt, line)] in input order; raises InputError listing every bad line.
    `locations`, when given, is filled with {id: "path:line"}."""
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
        if locations is not None:
            locations[pid] = where
        items.append((pid, rec["prompt"], rec))
    if errors:
        raise InputError("\n".join(map(str, errors)))
    return items


def row_seed(pid: str, kind: str, index: int) -> int:
    digest = hashlib.sha256(f"{pid}\0{kind}\0{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def samples_per_prompt(config) -> dict[str, int]:
    """{"code": codes, "test": test responses} sampled per prompt under `config.mode`."""
    return {"code": config.num_codes if config.mode in ("code", "both") else 0,
            "test": config.num_tests if config.mode in ("tests", "both") else 0}


def sample_file(in_path, out_path, config, load_policy: Callable[[], Policy]) -> dict:
    """Samples every prompt of `in_path` not yet in `out_path` and appends one line per
    prompt to it. `config`: configs/sample.py's fields; `load_policy` is called only when
    there is something to sample. Raises InputError (every malformed input line),
    jsonl.JsonlError (a malformed output line before the last) and policy.PromptTooLong
    (every prompt longer than the sampler has room for, found before anything is sampled
    or written). Returns {"prompts", "done" (already in the output), "sampled"}."""
    in_path, out_path = pathlib.Path(in_path), pathlib.Path(out_path)
    locations: dict[str, str] = {}
    items = read_prompts(in_path, locations)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    finished = {str(pid) for pid in jsonl.resume(out_path, key="id")}
    pending = [item for item in items if item[0] not in finished]
    summary = {"prompts": len(items), "done": len(items) - len(pending), "sampled": 0}
    logging.info("%s: %d prompts, %d already in %s", in_path, len(items),
                 len(items) - len(pending), out_path)
    if not pending:
        print(f"nothing to do: all {len(items)} prompts are in {out_path}")
        return summary
    num = samples_per_prompt(config)
    rows_per_prompt = num["code"] + num["test"]
    if rows_per_prompt == 0:
        raise ValueError("nothing to sample: num_codes and num_tests are both 0 here")

    policy = load_policy()
    logging.info("prompt format %s; EOS ids %s", policy.prompt_format, policy.eos_ids)
    # Every prompt is measured before the first is sampled: one over-long prompt would
    # otherwise stop the run at its batch, and every rerun at the same place.
    checked = [(pid, kind, _message(kind, prompt, config)) for pid, prompt, _ in pending
               for kind in ("code", "test") if num[kind]]
    policy.check_prompt_lengths([m for _, _, m in checked], config.max_new_tokens,
                                [f"{locations[pid]}: id {pid!r}, {kind} prompt"
                                 for pid, kind, _ in checked])
    params = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                  top_k=config.top_k, top_p=config.top_p, stop=tuple(config.stop))
    batch = max(config.batch_size, policy.sampler.batch_multiple)
    prompts_per_call = max(1, batch // rows_per_prompt)
    # Every call padded to one row count (one compiled shape), no more than the job needs.
    pad_rows_to = min(batch, len(pending) * rows_per_prompt)

    with jsonl.Appender(out_path) as out, \
            tqdm(total=len(pending), desc="sample", unit="prompt") as bar:
        for start in range(0, len(pending), prompts_per_call):
            group = pending[start:start + prompts_per_call]
            # A template is rendered only when its kind is sampled: code-only mode needs no
            # test prompt at all.
            messages = {pid: {kind: _message(kind, prompt, config)
                              for kind in ("code", "test") if num[kind]}
                        for pid, prompt, _ in group}
            rows = [(pid, kind, i) for pid, _, _ in group for kind in ("code", "test")
                    for i in range(num[kind])]
            completions = policy.generate(
                [messages[pid][kind] for pid, kind, _ in rows], seed=config.seed,
                row_seeds=[row_seed(*r) for r in rows], batch_size=batch,
                pad_rows_to=pad_rows_to, **params)
            by_row = {r: c for r, (c,) in zip(rows, completions)}
            for pid, prompt, line in group:
                out.write(_record(pid, prompt, line, messages[pid], num, by_row, config))
            bar.update(len(group))
    print(f"sampled {len(pending)} prompts ({len(items) - len(pending)} were done) -> "
          f"{out_path}")
    return {**summary, "sampled": len(pending)}


def _message(kind: str, prompt: str, config) -> str:
    if kind == "code":
        return config.code_prompt.format(prompt=prompt)
    return config.test_prompt.format(prompt=prompt, num_asserts=config.num_asserts)


def _record(pid, prompt, line, messages, num, by_row, config) -> dict:
    """The problem record (fdpo.problem) of one prompt: the input line's other fields
    passed through, the sampled code responses with their token ids, programs and finish
    reasons, and the tests (the model's when it wrote tests, else the input line's)."""
    code_c = [by_row[(pid, "code", i)] for i in range(num["code"])]
    test_c = [by_row[(pid, "test", i)] for i in range(num["test"])]
    rec = {k: v for k, v in line.items() if k not in ("id", "prompt")}
    rec.update({"version": problem.VERSION, "id": pid, "problem": prompt,
                "prompt": messages.get("code", ""),
                "response_format": config.response_format,
                "samples": [{"response": c.text, "response_ids": [int(t) for t in c.tokens],
                             "program": extract.program_from_response(
                                 c.text, prompt, config.response_format),
                             "finish": c.finish_reason} for c in code_c]})
    if num["test"]:
        rec["tests"] = list(dict.fromkeys(
            a for c in test_c for a in extract.extract_assertions(c.text)))
        rec["test_prompt"] = messages["test"]
        rec["test_samples"] = [{"response": c.text, "finish": c.finish_reason} for c in test_c]
    else:
        rec.setdefault("tests", [])
    return rec
