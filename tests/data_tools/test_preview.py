"""The build's preview (preview-*.html): each pair from a problem record shows its chosen and
rejected samples' pass rows against every test, their scores, ranks and verdicts, and the
pair's Diff. The expected values are computed here from the hand-made record."""
import html
import json
import re

import numpy as np
import pytest

from data_tools import build
from fdpo import problem
from tests.helpers.tokenizer import tiny_tokenizer_dirs  # noqa: F401  (fixture)

TESTS = ["assert f(1) == 1", "assert f(2) == 4", "assert f(3) == 9", "assert f(0) == 0"]
RESPONSES = ["def f(x):\n    return x * x\n",       # sample 0: passes all four
             "def f(x):\n    return x + x\n",       # sample 1: passes t1, t3
             "",                                    # sample 2: no program (not ranked)
             "def f(x):\n    return x + 1\n",       # sample 3: passes none
             "def f(x):\n    return abs(x) * x\n"]  # sample 4: passes all, cut by the limit
PASSED = [[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
FINISH = ["eos", "eos", "eos", "eos", "length"]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dirs):  # noqa: F811
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dirs["plain"])


def _common(a, b):
    """Longest common prefix, then the longest common suffix not overlapping it."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(len(a), len(b)) - p and a[-1 - s] == b[-1 - s]:
        s += 1
    return p, s


def _cells(row_html):
    return re.findall(r"<td[^>]*>(.*?)</td>", row_html)


def test_preview_shows_pass_rows_scores_ranks_and_diff(tmp_path, tok):
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in RESPONSES]
    rec = {"version": problem.VERSION, "id": "sq", "prompt": "Write f(x) = x squared.",
           "samples": [{"response": r, "response_ids": i, "program": r, "finish": f}
                       for r, i, f in zip(RESPONSES, ids, FINISH)],
           "tests": TESTS, "passed": PASSED}
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(rec) + "\n")
    lam = 0.5
    build.build(str(inp), "", str(tmp_path / "out"),
                build.BuildConfig(max_len=256, val_fraction=0.0, ranker="pass_count", lam=lam),
                tokenizer=tok)
    page = (tmp_path / "out" / "preview-00000-of-00001.html").read_text(encoding="utf-8")

    # Ranked: samples 0, 1, 3, 4 (2 has no program). pass_count: scores 4, 2, 0, 4; ties
    # by sample order, so ranks 0, 2, 3, 1 and the top code is sample 0, whose tests (all
    # four) are the ground truth. Correct: 0 and 4; 4 is truncated, so never chosen; under
    # truncated=drop the rejected is 1 or 3, whichever has the larger Diff.
    kept = [0, 1, 3, 4]
    rank = {0: 0, 4: 1, 1: 2, 3: 3}
    k = len(kept)
    eos = [tok.eos_token_id]
    seqs = {i: ids[i] + eos for i in kept}
    diffs = {}
    for r in (1, 3):
        p, s = _common(seqs[0], seqs[r])
        if p + s == len(seqs[0]):
            continue  # no chosen mid: not a candidate (data_tools.segments)
        longest = max(len(seqs[0]), len(seqs[r]))
        rank_diff = (rank[r] - rank[0]) / (k - 1)
        diffs[r] = (rank_diff + lam * (p + s) / longest, rank_diff, (p + s) / longest, p, s,
                    longest)
    assert diffs  # the record is made so that a pair exists
    rejected = max(diffs, key=lambda r: diffs[r][0])
    diff, rank_diff, common, p, s, longest = diffs[rejected]

    table = page[page.index('<table class="verdicts">'):]
    table = table[:table.index("</table>")]
    heads = re.findall(r'<th title="([^"]*)">(t\d+)</th>', table)
    assert heads == [(html.escape(t), f"t{j}") for j, t in enumerate(TESTS)]
    rows = {m.group(1): m.group(0) for m in re.finditer(r'<tr class="([a-z-]+)">.*?</tr>', table)}
    assert _cells(rows["ground-truth"])[:2 + len(TESTS)] == \
        ["ground truth", "0 (top)"] + ["&#9679;"] * len(TESTS)
    for side, sample in (("chosen", 0), ("rejected", rejected)):
        row = PASSED[sample]
        expected = ([side, str(sample)] + [build.PASS if v else build.FAIL for v in row]
                    + [f"{sum(row)}/{len(TESTS)}", f"{float(sum(row)):.6g}",
                       f"{rank[sample]} of {k}", "correct" if side == "chosen" else "incorrect",
                       FINISH[sample]])
        assert _cells(rows[side]) == expected
    m = re.search(r'<p class="diff">(.*?)</p>', page)
    assert m.group(1) == (
        f"Diff = rank diff ({rank[rejected]} - {rank[0]}) / ({k} - 1) = {rank_diff:.4f} + lam "
        f"{lam:g} &times; common fraction ({p} + {s}) / {longest} = {common:.4f} &rarr; "
        f"{diff:.4f}")
    # The pair written is the one previewed.
    (entry,) = [json.loads(x) for x in (tmp_path / "out" / "pairs-00000-of-00001.jsonl")
                .read_text().splitlines()]
    assert np.isclose(entry["diff"], diff)


def test_ready_pairs_have_no_verdict_table(tmp_path, tok):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "p", "chosen": "def f():\n    return 1\n",
                               "rejected": "def f():\n    return 2\n"}) + "\n")
    build.build(str(inp), "", str(tmp_path / "out"), build.BuildConfig(max_len=128), tokenizer=tok)
    page = (tmp_path / "out" / "preview-00000-of-00001.html").read_text(encoding="utf-8")
    assert "<h2>" in page and '<table class="verdicts">' not in page
