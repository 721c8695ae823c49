"""Ranker quality on HumanEval+ (issue 5, item 2): labelled code x test matrices from the
canonical solutions, single-point mutants and partly wrong tests, run through the sandboxed
executor; per ranker, how often its top code is truly correct and the Spearman correlation of
its scores with true correctness. Method: data_tools/rank_quality.py (module docstring).

    python -m benchmarks.rank_quality --dataset ../shared/data/evalplus/HumanEvalPlus-v0.1.10.jsonl.gz \
        --out DIR [--tasks N] [--mutants 9] [--tests 10] [--wrong_test_fraction 0.3] [--seed 0]

Writes DIR/report.md (the table), DIR/report.json (config, counts, metrics, timings) and
DIR/tasks.jsonl (per task: codes, mutation descriptions, tests, pass matrix, truth, scores).
"""
from absl import app, flags

from benchmarks.ranking import quality as rq

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "../shared/data/evalplus/HumanEvalPlus-v0.1.10.jsonl.gz",
                    "HumanEval+ style JSON Lines (.gz or plain).")
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_integer("tasks", 0, "Use the first N tasks (0 = all).")
flags.DEFINE_integer("mutants", 9, "Behaviour-changing mutants per task (codes = 1 + this).")
flags.DEFINE_integer("tests", 10, "Tests per task (correct + wrong), fewer if inputs run out.")
flags.DEFINE_float("wrong_test_fraction", 0.3, "Fraction of the tests with a corrupted expected value.")
flags.DEFINE_integer("seed", 0, "Seed for mutants, test choice, corruption and code order.")
flags.DEFINE_integer("workers", 2, "Executor workers (and reference subprocesses).")
flags.DEFINE_float("timeout", 1.0, "Seconds per cell of the code x test run.")
flags.DEFINE_float("screen_timeout", 3.0, "Seconds per screening cell (all correct tests).")
flags.DEFINE_integer("pool_factor", 3, "Mutant pool = pool_factor x mutants, before screening.")
flags.DEFINE_bool("keep_equivalent", False,
                  "Keep mutants equivalent on the inputs, as extra truly correct codes.")
flags.DEFINE_enum("isolation", "full", ["full", "no_cgroup", "none"], "Executor isolation.")


def main(argv):
    del argv
    if not 0.0 <= FLAGS.wrong_test_fraction < 1.0:
        raise app.UsageError("--wrong_test_fraction must be in [0, 1)")
    cfg = rq.Config(dataset=FLAGS.dataset, tasks=FLAGS.tasks, mutants=FLAGS.mutants,
                    tests=FLAGS.tests, wrong_test_fraction=FLAGS.wrong_test_fraction,
                    seed=FLAGS.seed, workers=FLAGS.workers, timeout=FLAGS.timeout,
                    screen_timeout=FLAGS.screen_timeout, pool_factor=FLAGS.pool_factor,
                    keep_equivalent=FLAGS.keep_equivalent, isolation=FLAGS.isolation)
    report, records = rq.build(cfg)
    rq.write(report, records, FLAGS.out)
    print(rq.markdown(report))


if __name__ == "__main__":
    app.run(main)
