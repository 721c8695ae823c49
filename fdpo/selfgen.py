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
from flax import nnx
from tqdm import tqdm

from fdpo import extract, fingerprint, jsonl, problem, reference, sharding
from fdpo.models.checkpoint import HF_EXTRA_FILES
from fdpo.policy import Policy

MODES = ("code", "tests", "both")
# With refill, each sampler call holds this many batches of rows (see sample_file).
REFILL_QUEUE_BATCHES = 8
# The record field holding what produced the record (`record_fingerprint`).
FINGERPRINT_FIELD = "sample_fingerprint"


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


def config_fingerprint(config) -> dict:
    """The sampling settings that change what a record holds, readable (templates as
    digests). Batch size, length bucket, stop-check interval and refill are left out: a
    row's sample does not depend on them (fdpo/sampling.py, up to float rounding); so are the
    seed, top-k and top-p of greedy sampling."""
    num = samples_per_prompt(config)
    out = {"temperature": float(config.temperature), "top_p": float(config.top_p),
           "top_k": int(config.top_k), "max_new_tokens": int(config.max_new_tokens),
           "stop": list(config.stop), "seed": int(config.seed),
           "compute_dtype": config.compute_dtype, "num_codes": num["code"],
           "num_tests": num["test"]}
    if out["temperature"] == 0:  # greedy: no draw, so neither the seed nor top-k/p matter
        del out["top_p"], out["top_k"], out["seed"]
    if num["code"]:
        out.update(code_prompt=fingerprint.digest(config.code_prompt),
                   response_format=config.response_format)
    if num["test"]:
        out.update(test_prompt=fingerprint.digest(config.test_prompt),
                   num_asserts=int(config.num_asserts))
    return out


def model_fingerprint(policy: Policy) -> dict:
    """The policy's identity: a digest of its parameter arrays (the same weights loaded
    from a checkpoint or the HF directory it came from agree), of its tokenizer files, its
    prompt format and EOS set. Its path is not part of it: a moved model is the same."""
    tok_dir = pathlib.Path(policy.tokenizer_dir) if policy.tokenizer_dir else None
    files = {name: fingerprint.file_digest(tok_dir / name)
             for name in sorted(HF_EXTRA_FILES)
             if tok_dir is not None and (tok_dir / name).is_file()}
    params = reference.identity(nnx.to_pure_dict(policy.state))[:fingerprint.DIGEST_CHARS]
    return {"params": params, "tokenizer": fingerprint.digest(files),
            "prompt_format": policy.prompt_format, "eos_ids": list(policy.eos_ids)}


def record_fingerprint(prompt: str, line: dict, model: dict, settings: dict) -> dict:
    """What a sampled record is computed from: its input line's prompt and other fields
    (passed through into the record), the model and the sampling settings."""
    return {"prompt": fingerprint.digest(prompt),
            "fields": fingerprint.digest({k: v for k, v in line.items() if k != "prompt"}),
            "model": model, "config": settings}


def sample_file(in_path, out_path, config, load_policy: Callable[[], Policy]) -> dict:
    """Samples every prompt of `in_path` whose record is not yet in `out_path`, or was
    sampled from another prompt line, model or sampling config (its `sample_fingerprint`
    differs: see `record_fingerprint`), and appends one line per prompt to it. Records of
    ids no longer in the input, and the stale ones, are removed first (the output is
    rewritten without them). `config`: configs/sample.py's fields; `load_policy` is
    called when there are prompts (the model's identity is part of the fingerprint).
    Raises InputError (every malformed input line), jsonl.JsonlError (a malformed output
    line before the last) and policy.PromptTooLong (every prompt longer than the sampler
    has room for, found before anything is sampled or written). Returns {"prompts", "done"
    (kept), "redone", "new", "dropped", "sampled"}.

    Several processes (jax.distributed, initialised before this call): every process
    reads the same input and output, samples every prompt with the others over the global
    mesh and computes the same records; process 0 alone writes the output."""
    in_path, out_path = pathlib.Path(in_path), pathlib.Path(out_path)
    locations: dict[str, str] = {}
    items = read_prompts(in_path, locations)
    writer = sharding.is_writer()
    if writer:  # resume repairs an interrupted last line: process 0 alone, before the others read
        out_path.parent.mkdir(parents=True, exist_ok=True)
        existing = jsonl.resume(out_path, key="id")
    sharding.sync("selfgen.sample_file: output repaired")
    if not writer:
        existing = jsonl.resume(out_path, key="id")
    sharding.sync("selfgen.sample_file: output read")  # process 0 may rewrite it now
    existing = {str(pid): row for pid, row in existing.items()}
    num = samples_per_prompt(config)
    rows_per_prompt = num["code"] + num["test"]
    if items and rows_per_prompt == 0:
        raise ValueError("nothing to sample: num_codes and num_tests are both 0 here")
    policy = load_policy() if items else None
    model = model_fingerprint(policy) if items else None
    settings = config_fingerprint(config)
    expected = {pid: record_fingerprint(prompt, line, model, settings)
                for pid, prompt, line in items}
    plan = fingerprint.plan(existing, expected, FINGERPRINT_FIELD)
    if writer:
        fingerprint.drop_stale(out_path, existing, plan)
    todo = plan.todo()
    pending = [item for item in items if item[0] in todo]
    summary = {"prompts": len(items), "done": len(plan.keep), "redone": len(plan.redo),
               "new": len(plan.new), "dropped": len(plan.dropped), "sampled": 0}
    print(plan.summary(out_path))
    for pid, what in plan.redo.items():
        logging.info("%s: id %r redone: %s", out_path, pid, fingerprint.describe(what))
    if not pending:
        print(f"nothing to do: all {len(items)} prompts are in {out_path}")
        return summary

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
    # With refill a call queues several batches of rows for the `batch` cache rows: the
    # longer the queue, the less the rows idle while a call's last samples finish (records
    # are written as calls end, so a crash loses at most one call).
    queued = batch * (REFILL_QUEUE_BATCHES if getattr(config, "refill", False) else 1)
    prompts_per_call = max(1, queued // rows_per_prompt)
    # Every call padded to one row count (one compiled shape), no more than the job needs.
    pad_rows_to = min(batch, len(pending) * rows_per_prompt)

    with (jsonl.Appender(out_path) if writer else _NoOutput()) as out, \
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
                out.write({**_record(pid, prompt, line, messages[pid], num, by_row, config,
                                     policy.prompt_format, prompt_ids.get(pid)),
                           FINGERPRINT_FIELD: expected[pid]})
            bar.update(len(group))
    print(f"sampled {len(pending)} prompts ({len(plan.keep)} were done) -> {out_path}")
    return {**summary, "sampled": len(pending)}


class _NoOutput:
    """The output of a process other than 0: it computes every record, writes none."""

    def __enter__(self) -> _NoOutput:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def write(self, record: dict) -> None:
        del record


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
