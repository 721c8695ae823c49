"""The pre-registered study (configs/study.py, fdpo/study.py, launch.study): the lr-grid rule,
arm names from weight tables, the protocol digest, the train commands every arm gives
launch.train, the `:fast` plan, the report from planted results; slow: the `:fast` study end
to end (on the list family's splits until the decision family lands)."""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import shutil

import pytest
from absl import flags
from ml_collections import config_flags

from configs import study as study_config
from configs import toy_data
from fdpo import loss, pipeline, study

from tests.conftest import REPO, run_program


def config(arg=None):
    return study_config.get_config(arg)


# ------------------------------------------------------------------------- the lr rule
def test_lr_grid_is_log_spaced_around_its_centre():
    grid = study.lr_grid(1e-4, 5, 3.0)
    ratios = [b / a for a, b in zip(grid, grid[1:])]
    assert all(abs(r - 3.0) < 3.0 * 2e-3 for r in ratios), ratios  # 3 digits of rounding
    assert math.isclose(math.sqrt(grid[0] * grid[-1]), 1e-4, rel_tol=2e-3)
    assert grid[2] == 1e-4
    two = study.lr_grid(1e-4, 2, 4.0)
    assert two == [5e-5, 2e-4]


def test_best_at_an_edge_extends_the_grid_on_that_side():
    low = {1e-5: 60.0, 3e-5: 50.0, 1e-4: 40.0}
    new, why = study.next_lr(low, 3.0, extensions=0, max_extensions=2)
    assert new == pytest.approx(1e-5 / 3, rel=2e-3) and "lower" in why
    high = {1e-5: 40.0, 3e-5: 50.0, 1e-4: 60.0}
    new, why = study.next_lr(high, 3.0, extensions=1, max_extensions=2)
    assert new == pytest.approx(3e-4, rel=2e-3) and "upper" in why


def test_an_interior_best_stops_and_the_cap_stops():
    assert study.next_lr({1e-5: 40.0, 3e-5: 70.0, 1e-4: 60.0}, 3.0, 0, 2)[0] is None
    new, why = study.next_lr({1e-5: 40.0, 3e-5: 50.0, 1e-4: 60.0}, 3.0, 2, 2)
    assert new is None and "cap" in why


def test_ties_take_the_lower_median_of_the_tied_lrs():
    assert study.best_lr({1.0: 5.0, 2.0: 5.0, 3.0: 5.0, 4.0: 1.0}) == 2.0
    assert study.best_lr({1.0: 5.0, 2.0: 5.0, 3.0: 5.0, 4.0: 5.0}) == 2.0
    assert study.best_lr({1.0: 1.0, 2.0: 5.0, 3.0: 5.0}) == 2.0
    # A flat grid stops (its lower median is inside it); a tie at the two lowest extends.
    assert study.next_lr({1.0: 5.0, 3.0: 5.0, 9.0: 5.0}, 3.0, 0, 2)[0] is None
    assert study.next_lr({1.0: 5.0, 3.0: 5.0, 9.0: 1.0}, 3.0, 0, 2)[0] == pytest.approx(1 / 3,
                                                                                        rel=2e-3)


def _tune(tmp_path, score_of_lr, points=3, max_extensions=2):
    cfg = config("fast")
    cfg.tuning.points, cfg.tuning.max_extensions, cfg.tuning.factor = points, max_extensions, 3.0
    s = study.Study(cfg, tmp_path)
    s.tuning_score = lambda arm, lr, nll: score_of_lr(lr)
    return s.tune_arm(s.arms["dpo"])


def test_tuning_widens_until_the_best_is_bracketed(tmp_path):
    # Peaked at 5e-6, far below the grid around 1e-4: two extensions below reach 3.7e-6.
    out = _tune(tmp_path, lambda lr: -abs(math.log(lr / 5e-6)), max_extensions=5)
    lrs = [s["lr"] for s in out["scores"]]
    assert out["extensions"] == 3 and out["stopped"] == "best inside the grid"
    assert out["lr"] == min(lrs, key=lambda lr: abs(math.log(lr / 5e-6)))
    assert min(lrs) < out["lr"] < max(lrs)


def test_tuning_stops_at_the_cap_with_the_best_at_the_edge(tmp_path):
    out = _tune(tmp_path, lambda lr: lr, max_extensions=2)  # the larger the better
    lrs = sorted(s["lr"] for s in out["scores"])
    assert out["extensions"] == 2 and "cap" in out["stopped"] and out["lr"] == lrs[-1]
    assert len(lrs) == 5


def test_an_interior_best_needs_no_extension(tmp_path):
    out = _tune(tmp_path, lambda lr: -abs(math.log(lr / 1e-4)))
    assert out["extensions"] == 0 and out["lr"] == 1e-4 and len(out["scores"]) == 3


# ------------------------------------------------------------------------- arm names
def test_every_arm_of_the_full_protocol_maps_to_one_name_and_back():
    arms = study.arms_of(config("full"))
    keys = [a.key for a in arms]
    assert len(set(keys)) == len(keys) == len(study_config.all_arms())
    for arm in arms:
        assert study.arm_name(arm.key) == arm.name
        assert study.arm_key(arm.name) == arm.key
    names = {a.name for a in arms}
    # The factorial (12 cells, two of them published), mid-only, RPO, TDPO, SFT, RFT and
    # the three controls.
    assert {"dpo", "focused_dpo", "w5-rs1-nll1", "w1-rs0-nll0", "c0_1_0-r0_1_0-nll0", "rpo",
            "tdpo1", "tdpo2", "continued_sft", "rft", "w2-rs0-nll0@random_focus",
            "w2-rs0-nll0@oracle_focus", "w2-rs0-nll0@shuffled"} <= names
    assert len(names) == 12 + 1 + 1 + 2 + 2 + 3


@pytest.mark.parametrize("key", [
    study.ArmKey("sigmoid", ((1, 0.5, 1), (1, 1, 0)), 0.25),
    study.ArmKey("sigmoid", ((0, 1, 2), (1, 0, 0)), 1.0, "oracle_focus"),
    study.ArmKey("tdpo2", ((1, 2, 1), (1, 1, 0)), 0.0),
    study.ArmKey("none", ((0, 0, 0), (0, 0, 0)), 1.0, "shuffled"),
    study.ArmKey("sigmoid", ((1, 2, 1), (1, 1, 0)), "tuned"),
])
def test_a_table_maps_to_one_name_and_back(key):
    name = study.arm_name(key)
    back = study.arm_key(name)
    assert back.loss == key.loss and back.data == key.data and back.nll == key.nll
    assert back.table == tuple(tuple(float(w) for w in row) for row in key.table)


def test_published_tables_have_their_published_names_only():
    assert study.arm_name(study.ArmKey("sigmoid", ((1, 2, 1), (1, 1, 0)), 0.0)) == "focused_dpo"
    assert study.arm_name(study.ArmKey("sigmoid", ((1, 1, 1), (1, 1, 1)), 0.0)) == "dpo"
    with pytest.raises(ValueError, match="'focused_dpo'"):
        study.arm_key("w2-rs0-nll0")
    with pytest.raises(ValueError, match="weight-table name"):
        study.arm_key("step_dpo_like")


def test_warm_starts_argument_sets_only_the_number_of_warm_starts():
    base, five = config(), config("warm_starts=5")
    assert five.warm_starts == tuple((k, k) for k in range(5))
    assert base.warm_starts == five.warm_starts[:3]
    five.warm_starts = base.warm_starts
    assert five.to_dict() == base.to_dict()  # nothing else moved
    assert config("fast,warm_starts=3").warm_starts == ((0, 0), (1, 1), (2, 2))
    with pytest.raises(ValueError, match="warm_starts=1: the study needs at least 2"):
        config("warm_starts=1")


def test_the_confirmatory_run_uses_fresh_warm_starts_and_the_tuned_lrs(tmp_path):
    """`confirm`: the primary pair only, on warm starts no other variant uses, at the lrs
    the default protocol's tuning chose; no tuning run, every warm start its own runs."""
    cfg = config("confirm")
    study.check_config(cfg)
    used = {w for arg in (None, "full", "fast", "warm_starts=5") for w in config(arg).warm_starts}
    assert len(cfg.warm_starts) == 8 and not set(cfg.warm_starts) & used
    assert config("confirm,warm_starts=3").warm_starts == ((5, 5), (6, 6), (7, 7))
    assert sorted(cfg.arms) == ["dpo", "focused_dpo"] and cfg.secondary == ()
    assert study.frozen_lrs(cfg) == {"dpo": 3.33e-5, "focused_dpo": 3.33e-5}
    assert study.frozen_lrs(config()) is None
    p = study.plan(cfg)
    assert p["tuning_runs"] == p["max_tuning_runs"] == 0 and p["test_runs"] == 2 * 8
    s = study.Study(cfg, tmp_path)
    assert s.commands(s.tune) == []
    s.tune()
    tuned = json.loads((tmp_path / "tuning.json").read_text())["arms"]
    assert {n: (t["lr"], t["nll_weight"]) for n, t in tuned.items()} == {
        "dpo": (3.33e-5, 0.0), "focused_dpo": (3.33e-5, 0.0)}
    trained = [a for _, m, a in s.commands(s.run_all) if m == "launch.train"]
    assert sorted(a[0] for a in trained) == sorted(
        f"--workdir={tmp_path}/ws{k}/runs/{n}" for k in range(8) for n in ("dpo", "focused_dpo"))
    assert all("--config.optimizer.lr=3.33e-05" in a for a in trained)
    with pytest.raises(ValueError, match="exclude each other"):
        config("confirm,fast")


def test_the_second_confirmatory_run_is_gated_short_and_on_unused_warm_starts():
    """`confirm50`: the primary pair at 50 steps and lrs frozen by the pilot, the premise gate
    on, warm starts and spares that no other variant uses."""
    cfg = config("confirm50")
    study.check_config(cfg)
    used = {w for arg in (None, "full", "fast", "warm_starts=5", "confirm")
            for w in config(arg).warm_starts}
    fresh = set(cfg.warm_starts) | set(cfg.premise_gate.spares)
    assert len(cfg.warm_starts) == 8 and len(fresh) == 8 * 3 and not fresh & used
    assert cfg.train.steps == 50 and sorted(cfg.arms) == ["dpo", "focused_dpo"]
    assert study.frozen_lrs(cfg) == {"dpo": 1e-4, "focused_dpo": 1e-4}
    p = study.plan(cfg)
    assert p["tuning_runs"] == 0 and p["test_runs"] == 2 * 8
    # The earlier protocols keep their digests (their finished studies stay resumable).
    assert study.protocol_digest(config("confirm")) == "75915ff2e668d24c"
    assert study.protocol_digest(config()) == "bd606eacda04fe21"
    with pytest.raises(ValueError, match="exclude each other"):
        config("confirm,confirm50")


@pytest.mark.parametrize("frozen, message", [
    (dict(dpo=3.33e-5), r"frozen_lrs: arms \['dpo'\], expected one lr for each arm"),
    (dict(dpo=3.33e-5, focused_dpo=0.0), r"frozen_lrs.focused_dpo=0.0: expected > 0"),
])
def test_bad_frozen_lrs_are_errors_naming_the_field(frozen, message):
    cfg = config("confirm")
    cfg.tuning.frozen_lrs = frozen
    with pytest.raises(ValueError, match=message):
        study.check_config(cfg)


def test_a_misnamed_arm_in_the_config_is_an_error_naming_it():
    cfg = config("fast")
    cfg.arms.dpo.weights = ((1.0, 2.0, 1.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"arms\['dpo'\].*'w2-rs1-nll0'"):
        study.check_config(cfg)


@pytest.mark.parametrize("field, value, message", [
    ("warm_starts", ((0, 0), (0, 1)), "own init seed"),
    ("secondary", (("focused_dpo", "rft"),), "no arm 'rft'"),
    ("tuning.factor", 1.0, "factor=1.0"),
    ("stats.interval", "wald", r"stats.interval='wald': expected one of cluster_t, percentile"),
    ("warm_starts", ((0, 0),), "cluster_t' needs at least 2 warm starts"),
    ("stats.level", 1.0, "level=1.0"),
    ("phi_warm_starts", (0, 2), r"phi_warm_starts=\(0, 2\): 2 is not an index"),
])
def test_bad_protocol_values_are_errors_naming_the_field(field, value, message):
    cfg = config("fast")
    group, _, key = field.rpartition(".")
    (cfg[group] if group else cfg)[key] = value
    with pytest.raises(ValueError, match=message):
        study.check_config(cfg)


# ------------------------------------------------------------------------- the protocol
def test_the_digest_is_written_first_and_a_changed_protocol_is_refused(tmp_path):
    cfg = config("fast")
    study.Study(cfg, tmp_path).register()
    written = json.loads((tmp_path / "protocol.json").read_text())
    assert written["digest"] == study.protocol_digest(cfg)
    assert written["config"]["train"]["steps"] == cfg.train.steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["protocol.json", "stages"]

    study.Study(config("fast"), tmp_path).register()  # the same protocol: continues
    faster = config("fast")
    faster.pipeline.execute.workers = 7  # speed only: not part of the protocol
    study.Study(faster, tmp_path).register()

    changed = config("fast")
    changed.train.steps = cfg.train.steps + 1
    with pytest.raises(study.ProtocolChanged, match="changed: train.steps"):
        study.Study(changed, tmp_path).register()


def test_the_program_refuses_a_changed_protocol(tmp_path):
    study.Study(config("fast"), tmp_path).register()
    before = (tmp_path / "protocol.json").read_text()
    r = run_program("launch.study", "--config=configs/study.py:fast",
                    "--config.tuning.max_extensions=3", f"--workdir={tmp_path}", check=False,
                    timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "pre-registered" in r.stderr and "tuning.max_extensions" in r.stderr
    assert (tmp_path / "protocol.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["protocol.json", "stages"]


# ------------------------------------------------------------------------- the commands
def program_config(module_config: str, args: list[str]):
    """The config `launch.train` parses from these arguments (locked, as the program)."""
    argv = ["launch.train"] + [a for a in args if a.startswith("--config")]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", module_config, flag_values=values,
                                    lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def test_every_arm_gives_launch_train_its_table_nll_and_data(tmp_path, monkeypatch):
    cfg = config("full")
    s = study.Study(cfg, tmp_path)
    monkeypatch.chdir(REPO)  # config paths are the checkout's
    k = 1
    seen_steps = set()
    for arm in s.arms.values():
        nll = arm.nll_weights[-1]
        calls = s.commands(s.train_arm, arm, k, 3e-5, nll, tmp_path / "run" / arm.name)
        assert [(st, m) for st, m, _ in calls] == [("study_train", "launch.train")]
        args = calls[0][2]
        c = program_config(None, args)
        lc = loss.from_config(c.loss)
        assert lc.weights == loss.full_weights(arm.weights), arm.name
        assert lc.nll_weight == nll
        assert lc.loss_type == study.ARM_PRESETS[arm.preset]
        assert study.arm_name(study.ArmKey(lc.loss_type, arm.weights,
                                           "tuned" if len(arm.nll_weights) > 1 else nll,
                                           arm.data)) == arm.name
        data = pathlib.Path(c.data.dir)
        expected = {"pairs": "ws1/pairs_ref", "rft": "ws1/variants/rft"}.get(
            arm.data, f"ws1/variants/{arm.data}_ref")
        assert data == tmp_path / expected, arm.name
        frozen = arm.preset in ("tdpo1", "tdpo2") or arm.data == "rft"
        assert c.loss.reference == ("frozen" if frozen else "precomputed"), arm.name
        assert c.init_checkpoint == str(tmp_path / "ws1" / "warm_start" / "final")
        assert c.optimizer.lr == 3e-5 and c.data.seed == cfg.warm_starts[k][1]
        seen_steps.add((c.train.num_steps, c.train.batch_size, c.optimizer.warmup_steps))
    assert seen_steps == {(cfg.train.steps, cfg.train.batch_size, cfg.train.warmup_steps)}


def test_each_warm_start_trains_with_the_configured_schedule(tmp_path, monkeypatch):
    """The warm start's launch.train gets `warm_start`'s steps, lr, warmup and (when set)
    decay and end lr; its lr follows linear warmup, then cosine from lr to lr x end ratio,
    written out here."""
    from fdpo import train

    cfg = config()
    ws = cfg.pipeline.warm_start
    s = study.Study(cfg, tmp_path)
    monkeypatch.chdir(REPO)
    for k in range(len(cfg.warm_starts)):
        calls = s.commands(s.ws(k).warm_start)
        assert [(st, m) for st, m, _ in calls] == [("warm_start", "launch.train")]
        c = program_config(None, calls[0][2])
        assert c.train.num_steps == ws.steps and c.optimizer.lr == ws.lr
        assert c.optimizer.warmup_steps == ws.warmup_steps
        assert c.init_checkpoint == str(tmp_path / f"ws{k}" / "init")
    assert c.optimizer.decay == ws.get("decay", "cosine")
    end = ws.get("end_lr_ratio", 0.0)
    assert c.optimizer.end_lr_ratio == end
    fields = {f: c.optimizer[f] for f in ("lr", "warmup_steps", "decay", "end_lr_ratio")}
    schedule = train.make_schedule(train.OptimizerConfig(**fields), ws.steps)
    w, n, lr = ws.warmup_steps, ws.steps, ws.lr
    for t in (0, w // 2, w, (w + n) // 2, n - 1, n):
        want = lr * t / w if t < w else \
            lr * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * (t - w) / (n - w))))
        assert float(schedule(t)) == pytest.approx(want, rel=1e-5, abs=lr * 1e-6), t  # float32


def test_the_variants_are_built_with_their_builder_options(tmp_path):
    s = study.Study(config("full"), tmp_path)
    calls = s.commands(s.build_variants, 2)
    builds = {pathlib.Path(a[a.index("--out") + 1]).name: a for _, m, a in calls
              if m == "launch.build"}
    assert sorted(builds) == ["oracle_focus", "random_focus", "rft", "shuffled"]
    assert "--config.emit=rft" in builds["rft"]
    assert {"--config.focus=random", "--config.focus_seed=2"} <= set(builds["random_focus"])
    assert "--config.focus=oracle" in builds["oracle_focus"]
    assert {"--config.shuffle_labels=True", "--config.focus_seed=2"} <= set(builds["shuffled"])
    for a in builds.values():  # the pipeline's own pairs settings, from the same samples
        assert a[a.index("--input") + 1] == str(tmp_path / "ws2" / "executed.jsonl")
        assert "--config.ranker=mutual" in a and "--config.max_len=96" in a
    refs = [a[a.index("--out") + 1] for _, m, a in calls if m == "launch.precompute_ref"]
    assert sorted(pathlib.Path(r).name for r in refs) == [
        "oracle_focus_ref", "random_focus_ref", "shuffled_ref"]  # RFT trains without one


# ------------------------------------------------------------------------- the plans
def test_the_fast_plan():
    cfg = config("fast")
    study.check_config(cfg)
    p = study.plan(cfg)
    assert len(p["warm_starts"]) == 2
    assert len({w["init_seed"] for w in p["warm_starts"]}) == 2
    assert len({w["data_seed"] for w in p["warm_starts"]}) == 2
    assert sorted(p["arms"]) == ["dpo", "focused_dpo"]
    assert all(len(a["lr_grid"]) == 1 for a in p["arms"].values())
    assert p["variants"] == [] and p["tuning_runs"] == p["max_tuning_runs"] == 2
    assert p["test_runs"] == 2
    assert p["steps"] * p["batch_size"] <= 16


def test_the_fast_study_tunes_on_validation_of_warm_start_0_and_tests_everywhere(tmp_path):
    s = study.Study(config("fast"), tmp_path)
    tuning = s.commands(s.tune)
    trained = [a for _, m, a in tuning if m == "launch.train"]
    evaluated = [a for _, m, a in tuning if m == "launch.evaluate"]
    assert trained and all(f"--workdir={tmp_path}/ws0/tuning/" in a[0] for a in trained)
    assert all(a[a.index("--dataset") + 1].endswith("ws0/data/eval_validation.jsonl")
               for a in evaluated)
    assert len(evaluated) == len(trained) + 1  # and the start model
    frozen = {name: {"lr": 1e-4, "nll_weight": 0.0} for name in s.arms}
    runs = s.commands(s.run_all, frozen)
    trained = [a for _, m, a in runs if m == "launch.train"]
    # Warm start 0's test runs are its tuning runs at the chosen lr (kept when they exist;
    # nothing exists in this dry run), the other warm starts' are their own.
    assert sorted(a[0] for a in trained) == sorted(
        [f"--workdir={tmp_path}/ws0/tuning/{n}/lr0.0001-nll0" for n in ("dpo", "focused_dpo")]
        + [f"--workdir={tmp_path}/ws1/runs/{n}" for n in ("dpo", "focused_dpo")])
    evaluated = [a for _, m, a in runs if m == "launch.evaluate"]
    assert len(evaluated) == 2 * 3  # start + 2 arms on each warm start
    assert all(a[a.index("--dataset") + 1].endswith("eval_test.jsonl") for a in evaluated)


def test_phi_samples_each_trained_arm_and_analyzes_it_beside_the_start_model(tmp_path):
    """The phi stage: each arm's final model samples the warm start's prompts with the warm
    start's settings, its samples are executed, and launch.analyze runs on them; the start
    model's own samples are analyzed as they are. Not part of the digest."""
    cfg = config("fast")
    s = study.Study(cfg, tmp_path)
    frozen = {name: {"lr": 1e-4, "nll_weight": 0.0} for name in s.arms}
    (tmp_path / "tuning.json").write_text(json.dumps({"arms": frozen}))
    cmds = s.commands(s.phi)
    ws0 = tmp_path / "ws0"
    sampled = {a[a.index("--checkpoint") + 1]: a for _, m, a in cmds if m == "launch.sample"}
    assert sorted(sampled) == sorted(f"{ws0}/tuning/{n}/lr0.0001-nll0/final"
                                     for n in ("dpo", "focused_dpo"))
    smp = cfg.pipeline.sample
    for args in sampled.values():  # the warm start's prompts, settings and seed
        assert args[args.index("--input") + 1] == str(ws0 / "sample_prompts.jsonl")
        assert {f"--config.temperature={smp.temperature}", f"--config.top_p={smp.top_p}",
                f"--config.num_codes={smp.num_codes}",
                f"--config.seed={cfg.warm_starts[0][1]}"} <= set(args)
    analyzed = [a[a.index("--samples") + 1] for _, m, a in cmds if m == "launch.analyze"]
    assert sorted(analyzed) == sorted([f"{ws0}/executed.jsonl"] + [
        f"{ws0}/phi/{n}/executed.jsonl" for n in ("dpo", "focused_dpo")])
    assert all(f"{tmp_path}/ws1" not in " ".join(map(str, a)) for _, _, a in cmds)  # ws0 only
    assert study.protocol_digest(cfg) == study.protocol_digest(_without_phi())


def _without_phi():
    c = config("fast")
    del c["phi_warm_starts"]
    return c


def test_the_program_prints_the_plan_and_touches_nothing(tmp_path):
    r = run_program("launch.study", "--config=configs/study.py:fast", "--plan",
                    f"--workdir={tmp_path / 'study'}", timeout=120)
    assert json.loads(r.stdout) == json.loads(json.dumps(study.plan(config("fast"))))
    assert not (tmp_path / "study").exists()


def test_the_default_and_full_variants():
    for arg, n_ws in ((None, 3), ("full", 5)):
        cfg = config(arg)
        study.check_config(cfg)
        assert len(cfg.warm_starts) == n_ws
        assert cfg.primary.arm == "focused_dpo" and cfg.primary.baseline == "dpo"
    assert len(config("full").arms) == len(study_config.all_arms())


def _results(path, passed: dict[str, int]):
    path.mkdir(parents=True, exist_ok=True)
    tasks = [{"task_id": t, "n": 1, "base_correct": v} for t, v in passed.items()]
    (path / "results.json").write_text(json.dumps({"tasks": tasks}))


def test_the_report_from_planted_results(tmp_path):
    """Per-task results planted on disk (focused_dpo passes 3 of 40 tasks more than dpo in
    warm start 0, 5 more in warm start 1): the report's numbers are those differences."""
    cfg = config("fast")
    s = study.Study(cfg, tmp_path)
    s.register()
    tasks = [f"t{i}" for i in range(40)]
    setting = {"lr": 5.77e-05, "nll_weight": 0.0}
    (tmp_path / "tuning.json").write_text(json.dumps({"arms": {
        n: {**setting, "extensions": 1, "stopped": "best inside the grid", "history": [],
            "scores": [{"lr": 5.77e-05, "nll_weight": 0.0, "pass@1": 50.0}]}
        for n in ("dpo", "focused_dpo")}}))
    for k, extra in ((0, 3), (1, 5)):
        ws = tmp_path / f"ws{k}"
        base = {t: int(i < 20) for i, t in enumerate(tasks)}
        better = {t: int(i < 20 + extra) for i, t in enumerate(tasks)}
        _results(ws / "eval" / "start" / "test", base)
        for name, passed in (("dpo", base), ("focused_dpo", better)):
            rel = s.run_path(s.arms[name], k, setting)
            _results(ws / "eval" / rel / "test", passed)
            (ws / rel).mkdir(parents=True, exist_ok=True)
            # Two validation lines: the report takes the last one's mechanism values.
            mid = {"dpo": 0.5, "focused_dpo": 1.5}[name] + k
            (ws / rel / "metrics.jsonl").write_text(
                "".join(json.dumps({"step": i, "split": "train", "tokens": 100 + i}) + "\n"
                        for i in (1, 3))
                + json.dumps({"step": 2, "split": "validation", "mech/dlogp/chosen_mid": -9.0})
                + "\n" + json.dumps({"step": 3, "split": "validation", "loss": 0.6,
                                     "mech/dlogp/chosen_mid": mid}) + "\n")
    for name, correct, chosen_phi in (("start", 60, 0.9), ("focused_dpo", 95, None)):
        out = tmp_path / "ws0" / "phi" / name / "analysis"
        out.mkdir(parents=True)
        (out / "phi.json").write_text(json.dumps({
            "tables": {"common prefix": {"phi": 0.25}, "prefix + chosen mid": {"phi": chosen_phi}},
            "problems_in": 20, "problems_used": 7, "problems_skipped": {"no_wrong_code": 13},
            "samples_in": 200, "samples_correct": correct}))
    s.report()
    data = json.loads((tmp_path / "report.json").read_text())
    assert sorted(data["phi"]["ws0"]) == ["focused_dpo", "start"]  # dpo has none
    assert data["phi"]["ws0"]["start"]["phi"]["prefix + chosen mid"] == 0.9
    primary = data["comparisons"][0]
    assert (primary["arm"], primary["baseline"]) == ("focused_dpo", "dpo")
    assert primary["per_warm_start"] == pytest.approx([100 * 3 / 40, 100 * 5 / 40])
    assert primary["estimate"] == pytest.approx(100 * 4 / 40)
    assert data["test_pass_at_1"]["start"] == [50.0, 50.0]
    assert data["tokens"]["dpo"] == {"pairs": cfg.train.steps * cfg.train.batch_size,
                                     "tokens": 102 * cfg.train.steps}  # mean(101, 103)
    report = (tmp_path / "report.md").read_text()
    assert primary["outcome"] in report and "## Machine and stage times" in report
    assert data["mechanism"]["dpo"]["mech/dlogp/chosen_mid"] == [0.5, 1.5]
    assert data["mechanism"]["focused_dpo"]["mech/dlogp/chosen_mid"] == [1.5, 2.5]
    assert data["mechanism"]["dpo"]["mech/kl/chosen"] == [None, None]  # not logged
    assert "| focused_dpo | +2 [+1.5, +2.5] |" in report  # the only column logged
    assert (tmp_path / "mechanism.png").stat().st_size > 0
    assert "| ws0 | start | 30.0% | 7 / 20 | 0.25 | 0.90 | - | - |" in report
    assert "| ws0 | focused_dpo | 47.5% | 7 / 20 | 0.25 | - | - | - |" in report
    assert (tmp_path / "forest.png").stat().st_size > 0


def test_the_report_splits_trap_tasks_and_checks_the_premise(tmp_path):
    """Planted per-task results on 10 trap and 30 non-trap tasks: warm start 0's start
    model fails 12 non-trap tasks (60% right: the premise fails there), warm start 1's
    passes every non-trap task and no trap one (it holds). The by-kind table has those
    rates, and the outcome names warm start 0 alone."""
    cfg = config("fast")
    s = study.Study(cfg, tmp_path)
    s.register()
    trap = {f"t{i}": i < 10 for i in range(40)}
    setting = {"lr": 1e-4, "nll_weight": 0.0}
    (tmp_path / "tuning.json").write_text(json.dumps({"arms": {
        n: {**setting, "extensions": 0, "stopped": "cap", "history": [],
            "scores": [{"lr": 1e-4, "nll_weight": 0.0, "pass@1": 50.0}]}
        for n in ("dpo", "focused_dpo")}}))
    for k, non_trap_wrong in ((0, 12), (1, 0)):
        ws = tmp_path / f"ws{k}"
        (ws / "data").mkdir(parents=True)
        (ws / "data" / "eval_test.jsonl").write_text("".join(
            json.dumps({"task_id": t, "trap": is_trap}) + "\n" for t, is_trap in trap.items()))
        start = {t: int(not is_trap and int(t[1:]) >= 10 + non_trap_wrong)
                 for t, is_trap in trap.items()}
        fixed = {t: int(v or t in ("t0", "t1")) for t, v in start.items()}  # 2 traps fixed
        _results(ws / "eval" / "start" / "test", start)
        for name, passed in (("dpo", start), ("focused_dpo", fixed)):
            _results(ws / "eval" / s.run_path(s.arms[name], k, setting) / "test", passed)
    s.report()
    kinds = json.loads((tmp_path / "report.json").read_text())["by_kind"]
    assert kinds["start"] == [{"non_trap": pytest.approx(100 * 18 / 30), "trap": 0.0},
                              {"non_trap": 100.0, "trap": 0.0}]
    assert kinds["focused_dpo"][1] == {"non_trap": 100.0, "trap": pytest.approx(20.0)}
    report = (tmp_path / "report.md").read_text()
    assert "**Premise not met** on ws0 (non-trap 60.0%, trap 0.0%" in report
    assert "ws1 (" not in report
    assert "| focused_dpo | 60.0 / 20.0 | 100.0 / 20.0 |" in report


@pytest.mark.parametrize("max_ties", [None, 1])
def test_the_report_flags_ties_at_the_ceiling_only_where_a_rule_registers_them(tmp_path,
                                                                               max_ties):
    """Planted results: in warm start 0 both arms pass all 40 test tasks (a tie at the
    ceiling), in warm start 1 focused_dpo passes 5 more than dpo. With
    `stats.max_ceiling_ties` the comparison flags warm start 0 as set aside from the sign
    rule and the report states the rule; without it (every protocol before replicate50) the
    strict rule stands and nothing is flagged."""
    cfg = config("fast")
    if max_ties is not None:
        cfg.stats.max_ceiling_ties = max_ties
    s = study.Study(cfg, tmp_path)
    s.register()
    setting = {"lr": 1e-4, "nll_weight": 0.0}
    (tmp_path / "tuning.json").write_text(json.dumps({"arms": {
        n: {**setting, "extensions": 0, "stopped": "cap", "history": [],
            "scores": [{"lr": 1e-4, "nll_weight": 0.0, "pass@1": 50.0}]}
        for n in ("dpo", "focused_dpo")}}))
    tasks = [f"t{i}" for i in range(40)]
    for k, (dpo_right, focused_right) in enumerate(((40, 40), (30, 35))):
        ws = tmp_path / f"ws{k}"
        _results(ws / "eval" / "start" / "test", {t: int(i < 20) for i, t in enumerate(tasks)})
        for name, right in (("dpo", dpo_right), ("focused_dpo", focused_right)):
            _results(ws / "eval" / s.run_path(s.arms[name], k, setting) / "test",
                     {t: int(i < right) for i, t in enumerate(tasks)})
    s.report()
    primary = json.loads((tmp_path / "report.json").read_text())["comparisons"][0]
    assert primary["per_warm_start"] == pytest.approx([0.0, 100 * 5 / 40])
    report = (tmp_path / "report.md").read_text()
    if max_ties is None:
        assert primary["ceiling_ties"] is None and "ceiling" not in primary["outcome"]
        assert "not tied at the ceiling" not in report
    else:
        assert primary["ceiling_ties"] == [True, False]
        assert ("tied at the ceiling, set aside from the sign rule: warm start 0 (of at most 1)"
                in primary["outcome"])
        assert "CI [" in primary["outcome"] and primary["outcome"].startswith("no claim: CI")
        assert "not tied at the ceiling (both arms at 100% on every test task), at most 1" \
            in report


def test_a_tie_below_the_ceiling_is_not_a_ceiling_tie(tmp_path):
    cfg = config("fast")
    cfg.stats.max_ceiling_ties = 1
    s = study.Study(cfg, tmp_path)
    top = {"ws0": {"a": 100.0, "b": 100.0}, "ws1": {"a": 100.0, "b": 0.0}}
    assert s.ceiling_ties(top, top).at_ceiling == (True, False)
    assert s.ceiling_ties(top, {"ws0": {"a": 100.0, "b": 0.0}, "ws1": top["ws1"]}).at_ceiling \
        == (False, False)
    assert study.Study(config("fast"), tmp_path).ceiling_ties(top, top) is None


def test_the_third_confirmatory_run_replicates_confirm50_on_unused_seeds_with_the_tie_rule():
    """`replicate50`: confirm50's protocol (50 steps, lrs 1e-4, the gate) on warm starts and
    spares no other variant uses, with at most 2 ceiling ties set aside from the sign rule;
    earlier protocols keep their digests."""
    cfg, c50 = config("replicate50"), config("confirm50")
    study.check_config(cfg)
    used = {w for arg in (None, "full", "fast", "warm_starts=5", "confirm", "confirm50")
            for w in config(arg).warm_starts}
    used |= set(c50.premise_gate.spares)
    fresh = set(cfg.warm_starts) | set(cfg.premise_gate.spares)
    assert len(cfg.warm_starts) == 8 and len(fresh) == 8 * 3 and not fresh & used
    assert cfg.stats.max_ceiling_ties == 2 and "max_ceiling_ties" not in c50.stats
    def plain(v):
        return v.to_dict() if hasattr(v, "to_dict") else v

    for field in ("train", "arms", "primary", "secondary", "tuning", "metric", "splits",
                  "pipeline", "family"):
        assert plain(cfg[field]) == plain(c50[field]), field
    assert {**plain(cfg.stats), "max_ceiling_ties": None} == {**plain(c50.stats),
                                                              "max_ceiling_ties": None}
    assert study.protocol_digest(c50) == "b874cf8773f951fc"
    assert study.protocol_digest(cfg) not in ("b874cf8773f951fc", "75915ff2e668d24c",
                                              "bd606eacda04fe21")
    bad = config("replicate50")
    bad.stats.max_ceiling_ties = 8
    with pytest.raises(ValueError, match=r"max_ceiling_ties=8: expected an int from 0 to 7"):
        study.check_config(bad)
    with pytest.raises(ValueError, match="exclude each other"):
        config("confirm50,replicate50")


def test_the_premise_gate_replaces_a_failing_warm_start_with_the_next_spare(tmp_path,
                                                                           monkeypatch):
    """`gate`: warm starts are prepared (here: planted start-model results on the validation
    split, 10 trap and 30 non-trap tasks) and those whose start model fails the premise are
    moved to rejected/ and replaced by the next spare seeds; the accepted seeds are what the
    arms then train with. Seeds 0 and 2 fail (non-trap 60%; trap 50%), 1 and 3 hold."""
    cfg = config("fast,gate")
    study.check_config(cfg)
    assert [tuple(w) for w in cfg.premise_gate.spares] == [(2, 2), (3, 3), (4, 4), (5, 5)]
    assert study.protocol_digest(cfg) != study.protocol_digest(config("fast"))
    trap = {f"t{i}": i < 10 for i in range(40)}
    failing = {0: "non_trap", 2: "trap"}

    prepared = []

    def planted_prepare(ws, until=None):
        seed = ws.cfg.init.seed
        prepared.append((seed, until))
        (ws.w / "data").mkdir(parents=True, exist_ok=True)
        (ws.w / "data" / "eval_validation.jsonl").write_text("".join(
            json.dumps({"task_id": t, "trap": is_trap}) + "\n" for t, is_trap in trap.items()))
        right = {t: int(not is_trap) for t, is_trap in trap.items()}
        if failing.get(seed) == "non_trap":
            right.update({f"t{i}": 0 for i in range(10, 22)})
        elif failing.get(seed) == "trap":
            right.update({f"t{i}": 1 for i in range(5)})
        _results(ws.w / "eval" / "start" / "validation", right)

    monkeypatch.setattr(study.WarmStart, "prepare", planted_prepare)
    s = study.Study(cfg, tmp_path)
    s.prepare_warm_start(0)
    s.prepare_warm_start(1)
    record = json.loads((tmp_path / "warm_starts.json").read_text())
    assert record["seeds"] == {"0": [3, 3], "1": [1, 1]} and record["spares_used"] == 2
    assert [(r["warm_start"], r["seeds"], r["non_trap"], r["trap"]) for r in record["rejected"]] \
        == [(0, [0, 0], 60.0, 0.0), (0, [2, 2], 100.0, 50.0)]
    assert sorted(p.name for p in (tmp_path / "rejected").iterdir()) == [
        "ws0-seeds0_0", "ws0-seeds2_2"]
    assert s.ws(0).cfg.init.seed == 3 and s.ws(0).cfg.toy.seed == 3
    # A warm start is checked after its warm-start stage; only an accepted one goes on to
    # sampling, execution and its reference.
    assert prepared == [(0, "warm_start"), (2, "warm_start"), (3, "warm_start"), (3, None),
                        (1, "warm_start"), (1, None)]
    # The arms train on the accepted warm starts with their data seeds.
    frozen = {name: {"lr": 1e-4, "nll_weight": 0.0} for name in s.arms}
    trained = [a for _, m, a in s.commands(s.run_all, frozen) if m == "launch.train"]
    for k, seed in ((0, 3), (1, 1)):
        mine = [a for a in trained if a[0].startswith(f"--workdir={tmp_path}/ws{k}/")]
        assert len(mine) == 2 and all(f"--config.data.seed={seed}" in a for a in mine)
    lines = study._gate_lines(cfg, record)
    assert "2 replaced: ws0 seeds (0, 0) (non-trap 60.0%, trap 0.0%); ws0 seeds (2, 2)" in lines[0]
    # Spares used up: an error naming them.
    cfg2 = config("fast,gate")
    cfg2.premise_gate.spares = ((2, 2),)
    failing[1] = "trap"
    s2 = study.Study(cfg2, tmp_path / "two")
    with pytest.raises(pipeline.StageFailed, match=r"warm start 0 \(seeds \[2, 2\]\) fails the "
                       r"premise on validation .*premise_gate.spares are used up \(1\)"):
        s2.prepare_warm_start(0)


@pytest.mark.parametrize("change, message", [
    (dict(spares=((1, 1),)), "every seed unused by config.warm_starts"),
    (dict(family="lists"), "the premise needs trap tasks"),
])
def test_bad_premise_gates_are_errors_naming_the_field(change, message):
    cfg = config("fast,gate")
    if "spares" in change:
        cfg.premise_gate.spares = change["spares"]
    else:
        cfg.family = change["family"]
    with pytest.raises(ValueError, match=message):
        study.check_config(cfg)


def test_task_kinds_of_a_family_without_traps_are_empty(tmp_path):
    path = tmp_path / "eval_test.jsonl"
    path.write_text(json.dumps({"task_id": "lists/0"}) + "\n")
    assert study.task_kinds(path) == {} and study.task_kinds(tmp_path / "absent") == {}


# ------------------------------------------------------------------------- end to end
# Before the decision task family lands, the list family's seen / held-out files stand in
# for its validation / test splits: the same orchestration on today's miniature.
HAVE_DECISION = "family" in toy_data.get_config()
STAND_IN = [] if HAVE_DECISION else ["--config.family=lists", "--config.splits.tune=seen",
                                     "--config.splits.test=held_out"]


@pytest.mark.slow
@pytest.mark.sandbox
def test_the_fast_study_end_to_end(tmp_path):
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    args = ["--config=configs/study.py:fast", *STAND_IN, f"--workdir={tmp_path}"]
    r = run_program("launch.study", *args, env=env, timeout=1800)
    assert "report:" in r.stdout
    tuning = json.loads((tmp_path / "tuning.json").read_text())
    assert sorted(tuning["arms"]) == ["dpo", "focused_dpo"]
    data = json.loads((tmp_path / "report.json").read_text())
    primary = data["comparisons"][0]
    assert len(primary["per_warm_start"]) == 2 and primary["outcome"]
    assert primary["outcome"] in (tmp_path / "report.md").read_text()
    for name in ("start", "dpo", "focused_dpo"):
        assert len(data["test_pass_at_1"][name]) == 2
        # The Phi re-run on warm start 0: every model's own samples, each problem counted.
        phi = data["phi"]["ws0"][name]
        assert phi["samples_in"] > 0 and 0 <= phi["samples_correct"] <= phi["samples_in"]
        assert phi["problems_used"] + sum(phi["problems_skipped"].values()) <= phi["problems_in"]
    assert (tmp_path / "ws0" / "phi" / "dpo" / "executed.jsonl").exists()
    assert "## Phi on each model's own samples" in (tmp_path / "report.md").read_text()
    logs = {p: p.stat().st_size for p in tmp_path.glob("ws*/logs/*.log")}
    again = run_program("launch.study", *args, env=env, timeout=600)
    for stage in ("ws0", "ws1", "tuning", "runs", "phi", "report"):
        assert f"[study] {stage}: done earlier, skipped" in again.stdout
    assert {p: p.stat().st_size for p in logs} == logs  # no program ran again

    # Resume and same-machine determinism at the cost of one arm run: without warm start
    # 1's DPO run and its evaluation (and the markers of the stages that made them), the
    # study reruns exactly that run, and what it regenerates is bitwise the first run's.
    run, evaluated = tmp_path / "ws1" / "runs" / "dpo", tmp_path / "ws1" / "eval" / "runs" / "dpo"
    first = {"params": params_digest(run / "final"), "eval": eval_outputs(evaluated / "test"),
             "pass@1": data["test_pass_at_1"], "comparisons": data["comparisons"]}
    kept = {p: p.stat().st_mtime_ns for p in tmp_path.glob("ws*/**/final/fdpo_model.json")
            if run not in p.parents}
    # The warm starts and every other arm run: warm start 0's tuning runs (its test runs
    # too), warm start 1's focused_dpo run.
    assert tmp_path / "ws1" / "runs" / "focused_dpo" / "final" / "fdpo_model.json" in kept
    assert len(kept) == 2 + sum(len(a["scores"]) for a in tuning["arms"].values()) + 1
    for path in (run, evaluated):
        shutil.rmtree(path)
    for stage in ("runs", "report"):
        (tmp_path / "stages" / f"{stage}.json").unlink()
    # Compiled afresh (an empty JAX_COMPILATION_CACHE_DIR turns the session's cache off), so
    # compiling again must give the same bits too.
    rerun = run_program("launch.study", *args, env={**env, "JAX_COMPILATION_CACHE_DIR": ""},
                        timeout=900)
    for stage in ("ws0", "ws1", "tuning"):
        assert f"[study] {stage}: done earlier, skipped" in rerun.stdout
    assert "[study] runs ..." in rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # no other run trained again
    data = json.loads((tmp_path / "report.json").read_text())
    second = {"params": params_digest(run / "final"), "eval": eval_outputs(evaluated / "test"),
              "pass@1": data["test_pass_at_1"], "comparisons": data["comparisons"]}
    for key in first:
        assert second[key] == first[key], key


def params_digest(checkpoint_dir) -> str:
    """sha256 over a checkpoint's parameter arrays (names, dtypes, shapes and bytes), in
    key order: the bits of the model, not the checkpoint files (whose metadata carries
    timestamps)."""
    import jax
    import numpy as np
    from flax import nnx

    from fdpo import sharding
    from fdpo.models import checkpoint

    _, _, state = checkpoint.load_model(
        checkpoint_dir, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0],
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)} {a.dtype} {a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def eval_outputs(out_dir) -> dict:
    """An evaluation's outputs less its clock readings: the generated programs and the
    per-task table as bytes, results.json without wall times (`wall_s`, `*_time_s`)."""
    def untimed(x):
        if isinstance(x, dict):
            return {k: untimed(v) for k, v in x.items()
                    if k != "wall_s" and not k.endswith("_time_s")}
        return [untimed(v) for v in x] if isinstance(x, list) else x

    return {"samples.jsonl": (out_dir / "samples.jsonl").read_bytes(),
            "tasks.csv": (out_dir / "tasks.csv").read_bytes(),
            "results.json": untimed(json.loads((out_dir / "results.json").read_text()))}
