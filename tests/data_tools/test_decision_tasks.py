"""The decision family (data_tools/toy/decision.py): planted rates, splits, programs, the
oracle focus span, and the files launch.toy_data writes for it."""

import json
import math
import random
import re

import pytest

from data_tools.toy import decision as dt

# A strict/non-strict slip, by hand: which operator each phrase means.
MEANING = {"at least": ">=", "no less than": ">=", "not below": ">=", "or more": ">=",
           "more than": ">", "greater than": ">", "above": ">", "over": ">",
           "at most": "<=", "no more than": "<=", "not above": "<=", "or less": "<=",
           "less than": "<", "under": "<", "below": "<", "smaller than": "<"}


def stated_steps(doc):
    """[(op, constant)] in the order the docstring states them ("then add 3 twice": two)."""
    ops = {"add": "+", "subtract": "-", "multiply": "*", "increase": "+", "decrease": "-",
           "scale": "*"}
    words = doc.split(";")[1]
    found = [(ops[w], int(k)) for w, k in re.findall(
        r"(add|subtract|multiply|increase|decrease|scale)\D*?(\d+)", words)]
    times = {"twice": 2, "three times": 3, "four times": 4}
    times = next((n for w, n in times.items() if words.endswith(w)), 1)  # no word: once
    return found[:1] + found[1:] * times


def run(program, xs):
    namespace = {}
    exec(program, namespace)
    return namespace[dt.ENTRY_POINT](xs)


def read(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("decision")
    settings = dict(seed=3, num_sft=1200, num_dpo=160, num_validation=64, num_test=96,
                    trap_rate=0.65, noise_rate=0.05, tail_noise=0.1, num_tests=6,
                    corrupt_fraction=0.5, eval_tests=8, tail_lengths=(0, 1, 2))  # :decision's K
    meta = dt.write(out, **settings)
    return out, meta, settings


def test_phrase_meanings_written_independently():
    # The table in the module and a hand-written reading of each phrase agree (longest
    # matching key, so "no more than" is not read as "more than").
    for phrase, op, _, wrong in dt.PHRASINGS:
        key = max((k for k in MEANING if k in phrase), key=len)
        assert MEANING[key] == op and wrong != op, phrase
    assert sum(p[2] for p in dt.PHRASINGS) >= 2  # some traps, not all
    assert not all(p[2] for p in dt.PHRASINGS)


def test_canonical_programs_match_the_reference_and_the_words():
    rng = random.Random(0)
    # The default tails and every tail length the family can state.
    tasks = [t for lengths in (dt.TAIL_LENGTHS, (0, 1, 2, 3, 4)) for split in dt.make_splits(
        {"sft": 200, "dpo": 50, "validation": 50, "test": 50}, 1, lengths).values()
        for t in split]
    assert {len(t.steps) - 1 for t in tasks} == {0, 1, 2, 3, 4}
    for task in tasks:
        # An independent reading of the docstring: threshold, operator, steps, aggregate.
        doc = task.description
        c = int(re.search(r"\d+", doc).group())
        key = max((k for k in MEANING if k in doc.split(";")[0]), key=len)
        steps = stated_steps(doc)
        assert (c, MEANING[key], steps) == (task.threshold, task.operator, list(task.steps))
        for xs in dt.random_inputs(task, rng, 5) + [[], [c - 1, c, c + 1]]:
            cmp = {">=": c.__le__, ">": c.__lt__, "<=": c.__ge__, "<": c.__gt__}[MEANING[key]]
            values = []
            for x in xs:
                if cmp(x):
                    y = x
                    for op, k in steps:
                        y = y + k if op == "+" else y - k if op == "-" else y * k
                    values.append(y)
            want = sum(values) if doc.endswith("sum.") else values
            assert run(task.prompt + task.solution, xs) == task.reference(xs) == want, task
        # The wrong operator's program is wrong where the threshold is in the list.
        assert run(task.prompt + task.body(task.wrong_operator), [c]) != task.reference([c])


def test_planted_trap_and_noise_rates_are_the_configured_ones(files):
    out, meta, s = files
    prompts = {p["id"]: p for p in read(out / "prompts.jsonl")}
    counts = {True: [0, 0], False: [0, 0]}
    noisy = tail = 0
    for pair in read(out / "sft_pairs.jsonl"):
        p = prompts[pair["id"]]
        right = MEANING[max((k for k in MEANING if k in p["phrasing"]), key=len)]
        wrong = dt.planted_operator(pair["chosen"]) != right
        assert wrong == pair["planted_wrong"]
        counts[p["trap"]][0] += wrong
        counts[p["trap"]][1] += 1
        # Tail noise: the chosen body's step constants against the docstring's.
        stated = [str(k) for _, k in stated_steps(p["prompt"])]
        written = re.findall(r"y (?:=|\+=|-=|\*=) (?:x [-+*] )?(\d+)", pair["chosen"])
        assert len(stated) == len(written) and stated[0] == written[0]
        noisy += sum(a != b for a, b in zip(stated[1:], written[1:]))
        tail += len(stated) - 1
        # The rejected side differs only in the operator (`!=`, wrong for every phrasing).
        assert dt.planted_operator(pair["rejected"]) == "!="
        assert pair["rejected"].replace(dt.planted_operator(pair["rejected"]), "") == \
            pair["chosen"].replace(dt.planted_operator(pair["chosen"]), "")
    for trap, rate in ((True, s["trap_rate"]), (False, s["noise_rate"])):
        wrong, n = counts[trap]
        assert n > 100
        assert abs(wrong / n - rate) <= 4 * math.sqrt(rate * (1 - rate) / n), (trap, wrong, n)
    assert abs(noisy / tail - s["tail_noise"]) <= 4 * math.sqrt(
        s["tail_noise"] * (1 - s["tail_noise"]) / tail)
    assert meta["counts"]["sft_tail_steps"] == {"noisy": noisy, "of": tail}


def test_splits_cover_every_phrasing_and_share_no_combination(files):
    out, meta, s = files
    prompts = read(out / "prompts.jsonl")
    by_split = {}
    for p in prompts:
        by_split.setdefault(p["split"], []).append(p)
    assert {k: len(v) for k, v in by_split.items()} == {
        "sft": s["num_sft"], "dpo": s["num_dpo"], "validation": s["num_validation"],
        "test": s["num_test"]}
    for split, rows in by_split.items():
        assert {r["phrasing"] for r in rows} == set(dt.PHRASES), split
        assert {r["trap"] for r in rows} == {True, False}
    ids = [p["id"] for p in prompts]
    assert len(ids) == len(set(ids))
    # No combination twice, also by the prompt text (what the model sees).
    test_prompts = {p["prompt"] for p in by_split["test"]}
    trained = {p["prompt"] for split in ("sft", "dpo") for p in by_split[split]}
    assert not test_prompts & trained
    assert not test_prompts & {p["prompt"] for p in by_split["validation"]}
    # Deterministic for a seed, different for another.
    again = dt.make_splits({"sft": s["num_sft"], "dpo": s["num_dpo"],
                            "validation": s["num_validation"], "test": s["num_test"]}, s["seed"],
                           s["tail_lengths"])
    assert [t.task_id for t in again["test"]] == [p["id"] for p in by_split["test"]]
    other = dt.make_splits({"sft": 10, "dpo": 10, "validation": 10, "test": 10}, s["seed"] + 1,
                           s["tail_lengths"])
    assert [t.task_id for t in other["test"]] != [p["id"] for p in by_split["test"]][:10]


def test_oracle_focus_marks_the_decision_span(files):
    out, _, _ = files
    prompts = read(out / "prompts.jsonl")
    evals = {r["task_id"]: r for split in ("validation", "test")
             for r in read(out / f"eval_{split}.jsonl")}
    checked = 0
    for p in (p for p in prompts if p["id"] in evals):
        body = evals[p["id"]]["canonical_solution"]
        c = re.search(r"that are \D*(\d+)", p["prompt"]).group(1)
        right = MEANING[max((k for k in MEANING if k in p["phrasing"]), key=len)]
        wrong = next(w for ph, o, _, w in dt.PHRASINGS if ph == p["phrasing"])
        for op in (right, wrong):
            response = body.replace(f"if x {right} ", f"if x {op} ", 1)
            m = re.search(p["oracle_focus"], response)
            line = next(l for l in response.splitlines() if l.strip().startswith("if "))
            assert m and m.group() == f"if x {op} {c}:" == line.strip(), (p["id"], op)
            checked += 1
    assert checked == 2 * len(evals)
    # A sample that writes the condition differently still has its span found.
    focus = prompts[0]["oracle_focus"]
    assert re.search(focus, "    t = 0\n    for x in xs:\n        if x==7:\n").group() == "if x==7:"


def test_files_for_the_pipeline(files):
    out, meta, s = files
    prompts = read(out / "prompts.jsonl")
    tests = {r["id"]: r for r in read(out / "tests.jsonl")}
    evals = {r["id"]: r for r in read(out / "eval_tests.jsonl")}
    assert set(tests) == set(evals) == {p["id"] for p in prompts}
    for split in ("validation", "test"):
        rows = read(out / f"eval_{split}.jsonl")
        assert [r["task_id"] for r in rows] == [p["id"] for p in prompts if p["split"] == split]
        for r in rows[:40]:
            program = r["prompt"] + r["canonical_solution"]
            wrong = program.replace(f"if x {dt.planted_operator(program)} ", "if x ?? ", 1)
            right_op = dt.planted_operator(program)
            wrong_op = next(w for ph, o, _, w in dt.PHRASINGS if ph == r["phrasing"])
            wrong = wrong.replace("??", wrong_op)
            # The tests tell the wrong operator from the right one.
            assert any(run(program, xs) != run(wrong, xs) for (xs,) in r["base_input"]), r
            assert right_op != wrong_op
    # Oracle tests: the stated fraction is corrupted, and exactly those fail the canonical
    # program.
    tasks = {t.task_id: t for split in dt.make_splits(
        {"sft": s["num_sft"], "dpo": s["num_dpo"], "validation": s["num_validation"],
         "test": s["num_test"]}, s["seed"], s["tail_lengths"]).values() for t in split}
    for p in prompts[::20]:
        t = tests[p["id"]]
        assert sum(not ok for ok in t["tests_correct"]) == round(s["corrupt_fraction"] *
                                                                 s["num_tests"])
        namespace = {}
        exec(p["prompt"] + tasks[p["id"]].solution, namespace)
        for test, ok in zip(t["tests"] + evals[p["id"]]["tests"],
                            t["tests_correct"] + [True] * len(evals[p["id"]]["tests"])):
            try:
                exec(test, dict(namespace))
                passed = True
            except AssertionError:
                passed = False
            assert passed == ok, test
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    text = prompts[0]["prompt"] + "    total = 0\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert meta["counts"]["sft_planted_wrong"]["trap"]["of"] == sum(
        p["trap"] for p in prompts if p["split"] == "sft")


@pytest.mark.parametrize("bad", [dict(tail_lengths=(0, 5)), dict(tail_constants=(7,)),
                                 dict(first_constants=(1, 2))])
def test_family_settings_out_of_range_are_refused(tmp_path, bad):
    # Before any file is written: a K with no words, one tail constant (tail noise needs
    # another to swap in), a constant outside the digits 2-9 the slots use.
    with pytest.raises(ValueError, match=next(iter(bad))):
        dt.write(tmp_path / "out", **bad)
    assert not (tmp_path / "out" / "prompts.jsonl").exists()
