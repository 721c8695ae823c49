"""The pipeline's `rft` method (issue 16): the pairs stage builds `rft/` beside `pairs/` only
when a configured method needs it, the train stage runs the sft preset on it, and an unknown
method stops the run before any stage, naming the list."""
from __future__ import annotations

import pytest

from configs import toy
from fdpo import pipeline
from tests.conftest import REPO
from tests.launch.test_pipeline import program_config, stage_calls


def _fast(methods):
    cfg = toy.get_config("fast")
    cfg.methods = methods
    return cfg


def test_rft_builds_its_records_and_trains_the_sft_preset_on_them(tmp_path, monkeypatch):
    w = tmp_path / "run"
    calls = stage_calls(_fast(("focused_dpo", "rft")), w)
    monkeypatch.chdir(REPO)
    builds = {args[args.index("--out") + 1]: program_config(module, args)
              for stage, module, args in calls if stage == "pairs"}
    assert sorted(builds) == [str(w / "pairs"), str(w / "rft")]
    rft, pairs = builds[str(w / "rft")], builds[str(w / "pairs")]
    assert (rft.emit, pairs.emit) == ("rft", "pairs")
    # The same ranking, verdicts and tokens as the pairs.
    for field in ("ranker", "lam", "val_fraction", "truncated", "response", "max_len"):
        assert rft[field] == pairs[field], field
    trains = {args[0]: program_config(module, args) for stage, module, args in calls
              if stage == "train"}
    run = trains[f"--workdir={w / 'train' / 'rft-s0'}"]
    assert run.loss.preset == "sft" and run.data.dir == str(w / "rft")
    assert run.loss.nll_weight is None  # the preset's NLL alone, as continued_sft
    assert run.loss.reference == "frozen"  # sft runs no reference: no precomputed sums needed
    fdpo_run = trains[f"--workdir={w / 'train' / 'focused_dpo-s0'}"]
    assert fdpo_run.data.dir == str(w / "pairs_ref")


def test_rft_data_is_built_only_when_a_method_needs_it(tmp_path):
    w = tmp_path / "run"
    calls = stage_calls(_fast(("focused_dpo", "dpo")), w)
    outs = [args[args.index("--out") + 1] for stage, _, args in calls if stage == "pairs"]
    assert outs == [str(w / "pairs")]
    # Adding rft changes the pairs stage's inputs (so it reruns and builds rft/).
    a = pipeline.Pipeline(_fast(("focused_dpo", "dpo")), w).inputs("pairs")
    b = pipeline.Pipeline(_fast(("focused_dpo", "rft")), w).inputs("pairs")
    assert a != b and b["sft_data_methods"] == ["rft"]


def test_unknown_method_is_refused_naming_the_list():
    with pytest.raises(ValueError, match=r"config.methods: unknown method\(s\) 'step_dpo'; "
                                         r"the methods are .*\brft\b"):
        pipeline.check_inputs(_fast(("focused_dpo", "step_dpo")))
