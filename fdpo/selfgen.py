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


def read_prompts(path: pathlib.Path) -> list[tuple[str, str, dict]]:
    """[(id, prompt, line)] in input order; raises InputError listing every bad line."""
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
    there is something to sample. Raises InputError (every malformed input line) and
    jsonl.JsonlError (a malformed output line before the last). Returns {"prompts",
    "done" (already in the output), "sampled"}."""
    in_path, out_path = pathlib.Path(in_path), pathlib.Path(out_path)
    items = read_prompts(in_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    existing = jsonl.resume(out_path, key="id")
    finished = {str(pid) for pid in existing}
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
    for line, rec in existing.values():  # one file, one prompt format
        fmt = rec.get("prompt_format") if isinstance(rec, dict) else None
        if fmt is not None and fmt != policy.prompt_format:
            raise jsonl.JsonlError(
                f"{out_path}:{line}: sampled with prompt_format={fmt!r}, this run uses "
                f"{policy.prompt_format!r}; resume with the same --config.prompt_format or "
                "write a new --output")
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
            # Rendered here, once, so the record holds the very ids the policy was fed.
            coded = [pid for pid in messages if "code" in messages[pid]]
            prompt_ids = dict(zip(coded, policy.encode_prompts(
                [messages[pid]["code"] for pid in coded]) if coded else []))
            completions = policy.generate(
                [prompt_ids[pid] if kind == "code" else messages[pid][kind]
                 for pid, kind, _ in rows], seed=config.seed,
                row_seeds=[row_seed(*r) for r in rows], batch_size=batch,
                pad_rows_to=pad_rows_to, **params)
            by_row = {r: c for r, (c,) in zip(rows, completions)}
            for pid, prompt, line in group:
                out.write(_record(pid, prompt, line, messages[pid], num, by_row, config,
                                  policy.prompt_format, prompt_ids.get(pid)))
            bar.update(len(group))
    print(f"sampled {len(pending)} prompts ({len(items) - len(pending)} were done) -> "
          f"{out_path}")
    return {**summary, "sampled": len(pending)}


def _message(kind: str, prompt: str, config) -> str:
    if kind == "code":
        return config.code_prompt.format(prompt=prompt)
    return config.test_prompt.format(prompt=prompt, num_asserts=config.num_asserts)


def _record(pid, prompt, line, messages, num, by_row, config, prompt_format,
            prompt_ids) -> dict:
    """The problem record (fdpo.problem) of one prompt: the input line's other fields
    passed through, the prompt format and the code prompt's token ids, the sampled code
    responses with their token ids, programs and finish reasons, and the tests (the
    model's when it wrote tests, else the input line's)."""
    code_c = [by_row[(pid, "code", i)] for i in range(num["code"])]
    test_c = [by_row[(pid, "test", i)] for i in range(num["test"])]
    rec = {k: v for k, v in line.items() if k not in ("id", "prompt")}
    rec.update({"version": problem.VERSION, "id": pid, "problem": prompt,
                "prompt": messages.get("code", ""), "prompt_format": prompt_format,
                "response_format": config.response_format,
                "samples": [{"response": c.text, "response_ids": [int(t) for t in c.tokens],
                             "program": extract.program_from_response(
                                 c.text, prompt, config.response_format),
                             "finish": c.finish_reason} for c in code_c]})
    if prompt_ids is not None:
        rec["prompt_ids"] = [int(t) for t in prompt_ids]
    if num["test"]:
        rec["tests"] = list(dict.fromkeys(
            a for c in test_c for a in extract.extract_assertions(c.text)))
        rec["test_prompt"] = messages["test"]
        rec["test_samples"] = [{"response": c.text, "finish": c.finish_reason} for c in test_c]
    else:
        rec.setdefault("tests", [])
    return rec
