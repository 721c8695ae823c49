r"""Problem prompts synthesised by the policy around mined concepts (see
`data_tools.synthesize` for the templates, validation, dedupe and decontamination).

    python -m launch.synthesize --concepts=CONCEPTS.jsonl (--checkpoint=CKPT | --hf_dir=HF) \
        --out=PROMPTS.jsonl [--per_concept=N] [--config=configs/synthesize.py]

Writes OUT (one problem a line, the format `launch.sample` reads), OUT.rejected.jsonl (every
rejected generation with its reason) and OUT.report.json (counts, config).

Many hosts: the same command on every host with `--distributed`. Every process generates
every request with the others over the global mesh and validates the same generations;
process 0 alone writes the outputs (the same lines, in request order, as one process).
"""
import json
import logging
import sys

from absl import app, flags

import configs
from data_tools import concepts as concepts_lib
from data_tools import synthesize
from fdpo import sharding
from fdpo.policy import Policy
from launch import common

log = logging.getLogger("launch.synthesize")

CONFIG = common.define_config(
    "config", configs.path("synthesize.py"),
    "Synthesis config (templates, sampling, validation, dedupe).", lock_config=True)
CONCEPTS = flags.DEFINE_string("concepts", None, "Concepts JSONL from launch.concepts.",
                               required=True)
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "fdpo checkpoint directory of the policy.")
HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face directory of the policy.")
OUT = flags.DEFINE_string("out", None, "Output prompts JSONL (OUT.report.json and "
                          "OUT.rejected.jsonl beside it).", required=True)
PER_CONCEPT = flags.DEFINE_integer("per_concept", None,
                                   "Requests per concept (overrides --config.per_concept).")
GENERATIONS = flags.DEFINE_string(
    "generations", None, "Skip sampling: read generations from this JSONL ({'request': i, "
    "'texts': [...]}, one line per request, as written by --save_generations).")
SAVE_GENERATIONS = flags.DEFINE_string("save_generations", None,
                                       "Also write the raw generations here.")
DECONTAMINATE = flags.DEFINE_list(
    "decontaminate", [], "EvalPlus-format task files (.jsonl or .jsonl.gz, comma-separated), "
    "e.g. HumanEval+ and MBPP+: problems overlapping their prompts are rejected.")


def generate(prompts: list[str], n: int, sampling_cfg, mesh=None) -> list[list[str]]:
    """`n` policy samples per prompt (the user message, in the policy's prompt format), on
    `mesh` (default: JAX set up from the flags now)."""
    # model_files: the tokenizer against the embedding rows, as a one-line error.
    policy = Policy.load(mesh if mesh is not None else common.init_jax(),
                         files=common.model_files(CHECKPOINT.value, HF_DIR.value))
    outs = policy.generate(prompts, num_samples=n, temperature=sampling_cfg["temperature"],
                           top_p=sampling_cfg["top_p"],
                           max_new_tokens=sampling_cfg["max_new_tokens"],
                           batch_size=sampling_cfg["batch_size"], seed=sampling_cfg["seed"])
    return [[c.text for c in cs] for cs in outs]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = CONFIG.value
    if GENERATIONS.value is None and (CHECKPOINT.value is None) == (HF_DIR.value is None):
        raise app.UsageError("give exactly one of --checkpoint and --hf_dir (or --generations)")
    if PER_CONCEPT.value is not None:
        config.per_concept = PER_CONCEPT.value
    # The outputs are written only after generation: check them before it.
    common.check_readable_file("--concepts", CONCEPTS.value)
    for flag, path in (("--out", OUT.value), ("--out", OUT.value + ".rejected.jsonl"),
                       ("--out", OUT.value + ".report.json"),
                       ("--save_generations", SAVE_GENERATIONS.value)):
        if path:
            common.check_output(flag, path)
    if GENERATIONS.value is not None:
        common.check_readable_file("--generations", GENERATIONS.value)
    common.check_number("--config.per_concept", config.per_concept, lo=1, integer=True)
    common.check_number("--config.samples_per_request", config.samples_per_request, lo=1,
                        integer=True)
    common.check_number("--config.sampling.temperature", config.sampling.temperature, lo=0)
    common.check_number("--config.sampling.top_p", config.sampling.top_p, lo=0, hi=1,
                        lo_open=True)
    common.check_number("--config.sampling.max_new_tokens", config.sampling.max_new_tokens,
                        lo=1, integer=True)
    try:
        requests = synthesize.make_requests(concepts_lib.read_concepts(CONCEPTS.value), config)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --concepts={CONCEPTS.value}: {e}")
    log.info("%d requests from %s", len(requests), CONCEPTS.value)
    # Several hosts: jax.distributed before anything is written, to know which process
    # writes (process 0); every process computes the same generations and records.
    mesh, writer = None, True
    if common.DISTRIBUTED.value:
        mesh = common.init_jax()
        writer = sharding.is_writer()
    benchmarks = None
    if DECONTAMINATE.value:
        # Read before sampling: a wrong path should not cost a generation run.
        try:
            benchmarks = synthesize.benchmark_index(DECONTAMINATE.value,
                                                    config.decontaminate.ngram)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        log.info("decontaminating against %d benchmark tasks (%d word %d-grams) from %s",
                 benchmarks.tasks, len(benchmarks.grams), benchmarks.n,
                 ", ".join(DECONTAMINATE.value))
    if GENERATIONS.value is not None:
        generations = synthesize.read_generations(GENERATIONS.value, len(requests))
    else:
        generations = generate([r.prompt for r in requests], config.samples_per_request,
                               dict(config.sampling.to_dict(), seed=config.seed), mesh)
    if SAVE_GENERATIONS.value and writer:
        with open(SAVE_GENERATIONS.value, "w", encoding="utf-8") as f:
            for r, texts in zip(requests, generations):
                f.write(json.dumps({"request": r.index, "concepts": r.concepts,
                                    "texts": texts}) + "\n")
    records, counts, rejected = synthesize.process_generations(requests, generations, config,
                                                               benchmarks)
    if not writer:
        return
    out = OUT.value
    with open(out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(out + ".rejected.jsonl", "w", encoding="utf-8") as f:
        for r in rejected:
            f.write(json.dumps(r) + "\n")
    with open(out + ".report.json", "w", encoding="utf-8") as f:
        decontamination = None if benchmarks is None else {
            "files": benchmarks.files, "ngram": benchmarks.n,
            "min_shared": config.decontaminate.min_shared}
        json.dump({"counts": counts, "decontamination": decontamination,
                   "config": config.to_dict()}, f, indent=2, default=str)
    print(json.dumps(counts, indent=2), file=sys.stdout)


if __name__ == "__main__":
    common.run(main)
