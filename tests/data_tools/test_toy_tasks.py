"""The miniature's task family: references, canonical programs, held-out split, oracle tests."""

import random

import pytest

from data_tools.toy import tasks as tt


def run(task, program, xs):
    namespace = {}
    exec(program, namespace)
    return namespace[task.entry_point](xs)


def test_canonical_programs_match_their_references():
    rng = random.Random(0)
    tasks = tt.all_tasks()
    assert len({t.task_id for t in tasks}) == len(tasks) > 500
    for task in tasks:
        for xs in tt.random_inputs(rng, 10) + [[], [8, 9, 10, 11, 12]]:
            assert run(task, task.prompt + task.solution, xs) == task.reference(xs), task.task_id


def test_hand_checked_examples():
    by_id = {t.task_id: t for t in tt.all_tasks()}
    t = by_id["toy/gt8odd-mul3-sum"]
    assert t.description == ("Keep the odd numbers greater than eight, multiply each by three, "
                             "and return their sum.")
    assert t.reference([7, 9, 10, 11, 3]) == 27 + 33
    assert by_id["toy/even-id-count"].reference([1, 2, 4, -2]) == 3
    assert by_id["toy/lt5-sub2-list"].reference([6, 4, -1]) == [2, -3]
    assert "if x > 8 and x % 2 == 1:" in t.solution


def test_held_out_split_is_disjoint_deterministic_and_covers_every_part():
    seen, held = tt.split_tasks(0.2, seed=0)
    assert not {t.task_id for t in seen} & {t.task_id for t in held}
    assert len(seen) + len(held) == len(tt.all_tasks())
    assert 0.1 < len(held) / (len(seen) + len(held)) < 0.3
    assert [t.task_id for t in tt.split_tasks(0.2, seed=0)[1]] == [t.task_id for t in held]
    assert [t.task_id for t in tt.split_tasks(0.2, seed=1)[1]] != [t.task_id for t in held]
    # Held-out tasks test composition: every part of them also occurs in seen tasks.
    for attr in ("filter", "transform", "aggregate"):
        assert {getattr(t, attr).key for t in held} <= {getattr(t, attr).key for t in seen}


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_oracle_tests_corrupt_the_stated_fraction(fraction):
    task = tt.all_tasks()[123]
    rng = random.Random(1)
    tests, ok = tt.oracle_tests(task, rng, 10, corrupt_fraction=fraction)
    assert len(tests) == 10 and sum(not o for o in ok) == round(10 * fraction)
    namespace = {}
    exec(task.prompt + task.solution, namespace)
    for test, good in zip(tests, ok):
        try:
            exec(test, dict(namespace))
            passed = True
        except AssertionError:
            passed = False
        assert passed == good, test


def test_toy_data_files(tmp_path):
    import json

    from transformers import AutoTokenizer

    from data_tools.toy import data as toy_data

    meta = toy_data.write(tmp_path, seed=0, num_tests=6, corrupt_fraction=0.5)
    prompts = [json.loads(l) for l in open(tmp_path / "prompts.jsonl")]
    tests = {r["id"]: r for r in map(json.loads, open(tmp_path / "tests.jsonl"))}
    sft = [json.loads(l) for l in open(tmp_path / "sft_pairs.jsonl")]
    c = meta["counts"]
    assert len(prompts) == len(tests) == c["sft"] + c["dpo"] + c["held_out"]
    held_eval = [json.loads(l) for l in open(tmp_path / "eval_held_out.jsonl")]
    assert len(held_eval) == c["held_out"] and held_eval[0]["plus_input"] == []
    assert {r["task_id"] for r in held_eval} == {p["id"] for p in prompts
                                                 if p["split"] == "held_out"}
    assert {p["split"] for p in prompts} == {"sft", "dpo", "held_out"}
    assert len(sft) == c["sft"] and abs(c["sft"] - c["dpo"]) <= 1
    seen_eval = {json.loads(l)["task_id"] for l in open(tmp_path / "eval_seen.jsonl")}
    assert seen_eval <= {p["id"] for p in prompts if p["split"] == "dpo"}
    assert all(sum(not ok for ok in r["tests_correct"]) == 3 for r in tests.values())
    by_id = {t.task_id: t for t in tt.all_tasks()}
    for pair in sft[:50]:
        task = by_id[pair["id"]]
        assert pair["chosen"] == task.solution and pair["rejected"] != task.solution
        # The wrong variant is wrong on some input.
        rng = random.Random(0)
        inputs = tt.random_inputs(rng, 200) + [[8, 9, 10, 11, 12, 13, 14, 15]]
        assert any(run(task, pair["prompt"] + pair["rejected"], xs) != task.reference(xs)
                   for xs in inputs), pair
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    text = sft[0]["prompt"] + sft[0]["chosen"]
    assert tok.decode(tok(text)["input_ids"]) == text and tok.eos_token == "<|endoftext|>"
    # Every SFT pair keeps a non-empty chosen middle in tokens, so launch.build drops none
    # (an insertion-only wrong variant, `>` -> `>=`, lost a third of them once).
    for pair in sft:
        a, b = (tok(pair[side])["input_ids"] for side in ("chosen", "rejected"))
        pre = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        suf = 0
        while suf < min(len(a), len(b)) - pre and a[-1 - suf] == b[-1 - suf]:
            suf += 1
        assert len(a) - pre - suf > 0, pair


def test_toy_data_config_defaults_are_the_library_defaults():
    import inspect

    from configs import toy_data as toy_data_config
    from data_tools.toy import data as toy_data
    from data_tools.toy import decision

    # Every field but the family is a parameter of one family's writer or both, with the
    # same default.
    config = toy_data_config.get_config().to_dict()
    assert config.pop("family") == "lists"
    defaults = {}
    for write in (toy_data.write, decision.write):
        for k, p in inspect.signature(write).parameters.items():
            if k != "out":
                assert defaults.setdefault(k, p.default) == p.default, k
    assert config == defaults
