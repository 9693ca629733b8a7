"""Experiment sweeps: named grids expand into valid train.py commands, the subprocess runner runs the smoke
grid end to end and resumes, the aggregation's mean ± std matches an independent float64 computation, and
the command printed for a row reproduces that row's saved config."""
import csv
import json
import math
import shlex
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from harmony.cli import parse_args
from harmony.config import config_to_dict
from harmony.experiments import GRIDS, aggregate, expand, get_grid, run_grid
from harmony.experiments.__main__ import main as experiments_main
from harmony.experiments.aggregate import METRICS, mean_std


def _config_of_command(command: str) -> dict:
    """The resolved config that train.py builds from a printed command ('python train.py --a=b ...')."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "train.py"], argv[:2]
    cfg, _ = parse_args(argv[2:])
    return config_to_dict(cfg)


@pytest.mark.slow
def test_every_grid_expands_into_valid_distinct_runs():
    for name, grid in GRIDS.items():
        runs = expand(grid)
        expected = len(grid.seeds) * math.prod(len(a.choices()) for a in grid.axes)
        assert len(runs) == expected, (name, len(runs), expected)
        assert len({r.name for r in runs}) == len(runs), f"{name}: run names collide"
        settings = {tuple(sorted((k, str(v)) for k, v in r.overrides.items())) for r in runs}
        assert len(settings) == len(runs), f"{name}: two runs have the same overrides"
        for r in runs:
            cfg = _config_of_command(r.command(f"runs/{name}/{r.name}"))  # validates every field
            assert cfg["train"]["seed"] == r.seed and cfg["data"]["seed"] == r.seed
            assert cfg["log"]["run_dir"] == f"runs/{name}/{r.name}"
            # every grid states how the coefficients enter the update: the rows update it measured before the
            # default moved to the objective one, unless an arm names the objective update
            want = "objective" if r.labels.get("arm", "").endswith("-obj") else "rows"
            assert cfg["harmony"]["update"] == want, (name, r.name)
    noise = expand(get_grid("noise_text"))
    assert {r.labels["method"] for r in noise} == {"baseline", "realign", "curriculum", "both"}
    assert {r.overrides["data.noise"] for r in noise} == {0.0, 0.2, 0.4, 0.6}
    assert {r.overrides["data.noise_kind"] for r in noise} == {"swap", "bias", "unrelated"}


def test_command_overrides_reach_the_config():
    """Each override of a run, and a --set extra, is what the parsed command holds (lists and booleans too)."""
    run = expand(get_grid("smoke"))[5]
    cfg = _config_of_command(run.command("out/x", {"train.lr": "0.002"}))
    for dotted, value in run.overrides.items():
        section, key = dotted.split(".")
        assert cfg[section][key] == (list(value) if isinstance(value, tuple) else value), dotted
    assert cfg["train"]["lr"] == 0.002


@pytest.mark.slow
def test_smoke_grid_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    """The real trainer through subprocesses (jobs=1), aggregation, a second launch that skips every run,
    and the printed command of a row that reproduces the row's saved config."""
    # the runs inherit it: one thread runs the tiny model about twice as fast as two on a busy 2-core machine
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "smoke"
    t0 = time.perf_counter()
    assert experiments_main(["run", "smoke", "--out", str(out), "--jobs", "1"]) == 0
    print(f"smoke grid: {time.perf_counter() - t0:.1f} s")
    runs = expand(get_grid("smoke"))
    for r in runs:
        summary = json.loads((out / r.name / "summary.json").read_text())
        ret = summary["retrieval"]["v2t"]
        assert summary["steps"] == 2 and ret["r1"] <= ret["r5"] <= ret["r10"] and ret["medr"] >= 1, r.name
        assert json.loads((out / r.name / "run.json").read_text())["labels"] == r.labels

    again = run_grid(runs, out, jobs=1)
    assert [x.status for x in again] == ["skipped"] * len(runs)

    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and all(row["seeds"] == "0 1" for row in rows)
    assert {"harmony.enabled", "data.noise"} <= set(rows[0])
    for row in rows:  # each row's mean/std against the two summaries it came from
        names = [r.name for r in runs if r.labels["method"] in row["label"] and
                 f"noise={r.labels['noise']}" in row["label"]]
        values = np.array([json.loads((out / n / "summary.json").read_text())["retrieval"]["v2t"]["r1"]
                           for n in names], dtype=np.float64)
        assert len(values) == 2
        err = max(abs(float(row["v2t_r1_mean"]) - values.mean()), abs(float(row["v2t_r1_std"]) - values.std(ddof=1)))
        print(row["label"], "max error", err)
        assert err < 1e-12
        # the printed command reproduces the config the run saved
        saved = yaml.safe_load((out / f"{names[0]}" / "config.yaml").read_text())
        assert _config_of_command(row["command"]) == saved
    md = (out / "results.md").read_text()
    assert md.count("python train.py") == 4
    assert (out / "plots" / "v2t_r1_vs_noise.png").is_file()
    assert (out / "plots" / "curve_loss.png").is_file()


# ------------------------------------------------------------------------------------ runner (stand-in)

FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    run_dir = Path(args["log.run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "started").write_text(repr(time.time()))
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    if args.get("data.noise") == os.environ.get("FAKE_FAIL_NOISE"):
        sys.exit(3)
    (run_dir / "summary.json").write_text(json.dumps({"steps": 1}))
    (run_dir / "ended").write_text(repr(time.time()))
""")


@pytest.fixture
def fake_train(tmp_path):
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    return path


def test_resume_runs_only_the_missing_and_failed_ones(tmp_path, fake_train, monkeypatch):
    runs = expand(get_grid("smoke"))
    out = tmp_path / "exp"
    monkeypatch.setenv("FAKE_FAIL_NOISE", "0.4")
    first = run_grid(runs, out, script=fake_train, say=lambda s: None, poll_s=0.01)
    expect = ["failed" if r.overrides["data.noise"] == 0.4 else "done" for r in runs]
    assert [x.status for x in first] == expect
    assert all(x.returncode == 3 for x in first if x.status == "failed")
    (out / runs[0].name / "summary.json").unlink()  # an interrupted run: relaunched
    monkeypatch.delenv("FAKE_FAIL_NOISE")
    second = run_grid(runs, out, script=fake_train, say=lambda s: None, poll_s=0.01)
    expect = ["done" if (i == 0 or r.overrides["data.noise"] == 0.4) else "skipped" for i, r in enumerate(runs)]
    assert [x.status for x in second] == expect
    assert all((out / r.name / "summary.json").is_file() for r in runs)


@pytest.mark.slow
def test_parallel_jobs_overlap_and_budget_stops_launching(tmp_path, fake_train, monkeypatch):
    runs = expand(get_grid("smoke"))[:4]
    monkeypatch.setenv("FAKE_SLEEP", "1.0")
    out = tmp_path / "par"
    res = run_grid(runs, out, jobs=2, script=fake_train, say=lambda s: None, poll_s=0.01)
    assert [x.status for x in res] == ["done"] * 4
    spans = [(float((out / r.name / "started").read_text()), float((out / r.name / "ended").read_text()))
             for r in runs]
    overlapping = sum(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])
    print("overlapping pairs", overlapping)
    assert overlapping >= 2
    # a budget spent before the first launch starts nothing; one spent during the first run stops the rest
    assert [x.status for x in run_grid(runs, tmp_path / "none", budget_min=0, script=fake_train,
                                       say=lambda s: None)] == ["not_started"] * 4
    res = run_grid(runs, tmp_path / "some", budget_min=0.5 / 60, script=fake_train, say=lambda s: None,
                   poll_s=0.01)
    assert [x.status for x in res] == ["done", "not_started", "not_started", "not_started"]


# ------------------------------------------------------------------------------- aggregation (hand-made)

def _write_run(root: Path, name: str, overrides: list, summary) -> None:
    cfg, _ = parse_args(overrides)
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    rows = [{"step": s, "loss": 8.0 - s, "frac_conflict": 0.1 * s} for s in (1, 2, 3)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _random_summary(rng) -> dict:
    return {"retrieval": {d: {"r1": rng.random(), "r5": rng.random(), "r10": rng.random(), "medr": 3.0,
                              "concept_acc": rng.random()} for d in ("v2t", "t2v", "v2a", "a2v")},
            "probe_acc": rng.random(), "noise_auc": rng.random(), "noise_auc_memory": rng.random(),
            "wall_s": 100 * rng.random(), "samples_per_s": 50 * rng.random(), "steps": 3}


def test_aggregate_mean_std_matches_float64_reference(tmp_path):
    rng = np.random.default_rng(1234)
    settings = [("false", 0.0, 3), ("false", 0.4, 3), ("true", 0.0, 2), ("true", 0.4, 1)]
    expected = {}
    for enabled, noise, seeds in settings:
        summaries = []
        for seed in range(seeds):
            s = _random_summary(rng)
            if enabled == "false":
                del s["noise_auc"]  # the plain baseline measures no cosines
            if seed == 1:
                s["probe_acc"] = None  # null in the JSON: left out, not zero
            summaries.append(s)
            _write_run(tmp_path, f"en{enabled}_n{noise}_s{seed}",
                       [f"--harmony.enabled={enabled}", f"--data.noise={noise}", f"--train.seed={seed}",
                        f"--data.seed={seed}", f"--log.run_dir=x{seed}"], s)
        expected[(enabled == "true", noise)] = summaries
    _write_run(tmp_path, "unfinished", ["--harmony.enabled=true", "--data.noise=0.6"], None)

    res = aggregate(tmp_path)
    assert res["fields"] == ["data.noise", "harmony.enabled"]
    assert res["incomplete"] == ["unfinished"]
    with open(res["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    worst = 0.0
    for row in rows:
        summaries = expected[(row["harmony.enabled"] == "True", float(row["data.noise"]))]
        for metric, path in METRICS.items():
            vals = []
            for s in summaries:
                node = s
                for p in path:
                    node = node.get(p) if isinstance(node, dict) else None
                if node is not None:
                    vals.append(node)
            vals = np.array(vals, dtype=np.float64)
            assert int(row[f"{metric}_n"]) == len(vals), (metric, row["label"])
            if len(vals) == 0:
                assert row[f"{metric}_mean"] == "" and row[f"{metric}_std"] == ""
                continue
            worst = max(worst, abs(float(row[f"{metric}_mean"]) - vals.mean()))
            if len(vals) >= 2:
                worst = max(worst, abs(float(row[f"{metric}_std"]) - vals.std(ddof=1)))
            else:
                assert row[f"{metric}_std"] == ""
    print("max error of mean/std", worst)
    assert worst < 1e-12
    md = res["md"].read_text()
    assert md.count("\n| ") == 5 and "unfinished" in md  # header + 4 rows
    names = {p.name for p in res["plots"]}
    assert {"v2t_r1_vs_noise.png", "noise_auc_vs_noise.png", "curve_loss.png", "curve_frac_conflict.png"} <= names


def test_mean_std_edge_cases():
    assert mean_std([]) == (None, None, 0)
    assert mean_std([0.25]) == (0.25, None, 1)
    m, s, n = mean_std([1.0, 2.0, 4.0])
    assert n == 3 and abs(m - 7 / 3) < 1e-15 and abs(s - np.std([1.0, 2.0, 4.0], ddof=1)) < 1e-15


@pytest.mark.slow
def test_noise_plots_have_one_panel_per_kind(tmp_path):
    """Runs varying noise kind, rate and method: one figure per metric with a panel per kind."""
    import matplotlib.image

    rng = np.random.default_rng(7)
    for kind in ("swap", "bias", "unrelated"):
        for noise in (0.0, 0.4):
            for enabled in ("true", "false"):
                for seed in (0, 1):
                    _write_run(tmp_path, f"{kind}_{noise}_{enabled}_{seed}",
                               [f"--data.noise_kind={kind}", f"--data.noise={noise}",
                                f"--harmony.enabled={enabled}", f"--train.seed={seed}"], _random_summary(rng))
    res = aggregate(tmp_path)
    assert res["fields"] == ["data.noise", "data.noise_kind", "harmony.enabled"]
    assert len(res["groups"]) == 12 and all(len(g.runs) == 2 for g in res["groups"])
    image = matplotlib.image.imread(tmp_path / "plots" / "v2t_r1_vs_noise.png")
    print("figure shape", image.shape)
    assert image.shape[1] > 2.5 * image.shape[0]  # three panels side by side


def test_phase_values_average_the_first_and_last_quarter_of_the_windows():
    from harmony.experiments.aggregate import phase_value

    rows = [{"step": s, "noise_auc": s / 1000, "frac_conflict_clean": None} for s in range(10, 401, 10)]
    rows.append({"step": 400, "loss": 1.0})  # a row without the key is skipped
    early = np.mean([s / 1000 for s in range(10, 101, 10)])   # steps in (0, 100]
    late = np.mean([s / 1000 for s in range(310, 401, 10)])   # steps in (300, 400]
    assert abs(phase_value(rows, "noise_auc", "early") - early) < 1e-15
    assert abs(phase_value(rows, "noise_auc", "late") - late) < 1e-15
    assert phase_value(rows, "frac_conflict_clean", "late") is None and phase_value([], "noise_auc", "late") is None


def test_study_grid_runs_on_the_grid_config():
    run = expand(get_grid("study_grid"))[0]
    argv = shlex.split(run.command("runs/g/x"))
    assert argv[2:4] == ["--config", "configs/grid.yaml"]
    cfg = _config_of_command(run.command("runs/g/x"))
    assert cfg["data"]["kind"] == "manifest" and cfg["data"]["noise"] == 0.3
    assert cfg["harmony"]["realign"] == "none" and cfg["harmony"]["curriculum"] == "none"


def test_report_gathers_every_folder_into_one_table_set(tmp_path):
    """Two experiment folders -> one tables.md whose rows carry each folder's means, plus per-folder copies."""
    from harmony.experiments.report import report

    rng = np.random.default_rng(5)
    root = tmp_path / "study"
    auc = {}
    for folder, noise in (("alpha", 0.2), ("beta", 0.4)):
        vals = []
        for seed in (0, 1):
            s = _random_summary(rng)
            _write_run(root / folder, f"s{seed}", [f"--data.noise={noise}", f"--train.seed={seed}",
                                                   f"--data.seed={seed}", f"--log.run_dir=x{seed}"], s)
            rows = [{"step": st, "noise_auc": float(rng.random())} for st in range(10, 101, 10)]
            (root / folder / f"s{seed}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            vals.append(np.mean([r["noise_auc"] for r in rows if r["step"] > 75]))
        auc[folder] = np.mean(vals)
    run_dir = root.resolve() / "alpha" / "s0"
    (run_dir / "run.json").write_text(json.dumps({"labels": {}, "command": f"python train.py --log.run_dir={run_dir}"}))
    res = report(root, tmp_path / "out", plots=False)
    assert res["folders"] == ["alpha", "beta"] and res["settings"] == 2
    md = (tmp_path / "out" / "alpha.md").read_text()  # an absolute run folder is shown under runs/<root name>
    assert "--log.run_dir=runs/study/alpha/s0" in md and str(tmp_path) not in md
    text = res["tables"].read_text()
    for folder in ("alpha", "beta"):
        assert (tmp_path / "out" / f"{folder}.md").is_file() and (tmp_path / "out" / f"{folder}.csv").is_file()
        row = next(line for line in text.splitlines() if line.startswith(f"| [{folder}]") and "AUC" not in line)
        assert f"{auc[folder]:.3f} ± " in text.split("## Retrieval")[0], folder
        assert row.count("|") > 5


def test_runs_saved_before_a_field_existed_group_with_newer_runs(tmp_path):
    """A config.yaml without a field (older code) reads as that field's default, not as a new setting."""
    rng = np.random.default_rng(3)
    for seed in (0, 1):
        _write_run(tmp_path, f"s{seed}", ["--data.noise=0.4", f"--train.seed={seed}", f"--data.seed={seed}"],
                   _random_summary(rng))
    old = tmp_path / "s0" / "config.yaml"
    cfg = yaml.safe_load(old.read_text())
    del cfg["data"]["oracle_drop"]
    old.write_text(yaml.safe_dump(cfg, sort_keys=False))
    res = aggregate(tmp_path, plots=False)
    assert res["fields"] == [] and len(res["groups"]) == 1 and len(res["groups"][0].runs) == 2


def test_runs_saved_before_the_update_field_read_as_the_rows_update(tmp_path):
    """harmony.update came with the objective update as the new default; a run saved without it ran the rows
    update, so it groups with an explicit update=rows run and apart from an objective one."""
    rng = np.random.default_rng(4)
    for name, update in (("old", "rows"), ("rows", "rows"), ("objective", "objective")):
        _write_run(tmp_path, name, [f"--harmony.update={update}", "--train.seed=0"], _random_summary(rng))
    old = tmp_path / "old" / "config.yaml"
    cfg = yaml.safe_load(old.read_text())
    del cfg["harmony"]["update"]
    old.write_text(yaml.safe_dump(cfg, sort_keys=False))
    res = aggregate(tmp_path, plots=False)
    assert res["fields"] == ["harmony.update"]
    by_update = {g.fields["harmony.update"]: sorted(r.name for r in g.runs) for g in res["groups"]}
    assert by_update == {"rows": ["old", "rows"], "objective": ["objective"]}


def test_only_selects_runs_by_name(capsys):
    from harmony.experiments.grid import select

    runs = expand(get_grid("long_headroom"))
    picked = select(runs, ["size-4096", "oracle"])
    assert [r.name for r in picked] == [f"size-4096_arm-oracle_seed-{s}" for s in (0, 1, 2)]
    assert picked[0].overrides["data.oracle_drop"] is True and picked[0].overrides["data.size"] == 4096
    assert select(runs, []) == runs
    assert experiments_main(["run", "long_headroom", "--out", "unused", "--only", "size-123"]) == 2
    assert "no run of long_headroom matches" in capsys.readouterr().err


def test_maps_tables_from_run_files(tmp_path):
    """maps: window means of a detector, its first informative window, the oracle's gain and the outcome fraction
    come out of hand-made run folders as computed by hand."""
    from harmony.experiments.maps import maps

    def make(root, name, labels, cfg, auc, concept, wall):
        d = root / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        (d / "run.json").write_text(json.dumps({"labels": labels}))
        rows = [{"step": s, "noise_auc_feat_own_pair_text": auc(s), "noise_auc_loss_text": 0.9}
                for s in range(10, 2001, 10)]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        ev = [{"step": s, "retrieval": {"v2t": {"concept_acc": concept(s)}, "t2v": {"concept_acc": concept(s) / 2}}}
              for s in range(250, 2001, 250)]
        (d / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in ev) + "\n")
        (d / "summary.json").write_text(json.dumps({"retrieval": {"v2t": {"concept_acc": concept(2000)},
                                                                   "t2v": {"concept_acc": concept(2000) / 2}},
                                                    "probe_acc": 0.5, "wall_s": wall}))

    head, outc = tmp_path / "head", tmp_path / "out"
    for seed, off in ((0, 0.0), (1, 0.02)):
        plain = {"data": {"size": 4096, "oracle_drop": False, "noise": 0.4}, "train": {"seed": seed}}
        oracle = {"data": {"size": 4096, "oracle_drop": True, "noise": 0.4}, "train": {"seed": seed}}
        make(head, f"plain{seed}", {"size": "4096", "arm": "plain", "seed": str(seed)}, plain,
             lambda s: 0.5 if s <= 500 else 0.8, lambda s: 0.4 + off, 100.0)
        make(head, f"oracle{seed}", {"size": "4096", "arm": "oracle", "seed": str(seed)}, oracle,
             lambda s: 0.5, lambda s: 0.6 + off, 100.0)
        arm = {"data": {"size": 4096, "noise": 0.4}, "train": {"seed": seed}, "harmony": {"curriculum": "ratio"}}
        make(outc, f"arm{seed}", {"arm": "x", "seed": str(seed)}, arm, lambda s: 0.6, lambda s: 0.45 + off, 150.0)
    text = maps([head], head, outc, tmp_path / "maps", plots=False).read_text()
    print(text)
    assert "| cos own_pair (feature) | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.800 ± 0.000 | 0.800 ± 0.000 | " \
           "0.800 ± 0.000 | 1000 (concept 0.41 / 0.21) |" in text
    assert "| own loss ℓvt | 0.900 ± 0.000 |" in text and "oracle=" not in text.split("## Headroom")[0]
    assert "| 2000 | 0.410 ± 0.014 | 0.610 ± 0.014 | +0.200 | yes | 0.205 ± 0.007 | 0.305 ± 0.007 | +0.100 | " \
           "yes |" in text
    assert "| arm=x | 2 | 0.460 ± 0.014 | 0.230 ± 0.007 | 0.500 ± 0.000 | +0.25 | +0.25 | 1.50× |" in text


def test_regimes_tables_from_run_files(tmp_path):
    """regimes: per regime, the detector windows and splits of the plain arm, each arm's share of the oracle's gain,
    and the lead table's best detector and best arm, from hand-made web-grid run folders, as computed by hand."""
    from harmony.experiments.regimes import regimes

    def make(arm, seed, concept, rows_of, summary_extra=None, split=None):
        d = tmp_path / "web" / f"regime-bias-0.4_arm-{arm}_seed-{seed}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": seed}, "data": {"seed": seed}}))
        rows = [{"step": s, **rows_of(s)} for s in range(10, 2001, 10)]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        (d / "summary.json").write_text(json.dumps({
            "retrieval": {"v2t": {"concept_acc": concept, **(split or {})}, "t2v": {"concept_acc": concept + 0.1}},
            "probe_acc": 0.5, "samples_per_s": 100.0, **(summary_extra or {})}))

    for seed, off in ((0, 0.0), (1, 0.02)):
        make("plain", seed, 0.5 + off, lambda s: {"noise_auc_loss_text": 0.6, "noise_auc_loss_text_bias": 0.6,
                                                   "noise_auc_agree_text": 0.7 if s <= 500 else 0.9,
                                                   "noise_auc_agree_text_bias": 0.9 + off,
                                                   "fpr_comb_text_hard": 0.2, "fpr_comb_text_easy": 0.1,
                                                   "noise_auc_comb_text_bias": 0.8})
        make("oracle", seed, 0.9 + off, lambda s: {}, split={"concept_acc_head": 0.95, "concept_acc_tail": 0.8 + off})
        make("agree-pair", seed, 0.7 + off, lambda s: {}, {"noise_auc_text": 0.85, "noise_auc_audio": 0.5})
        make("comb-pair", seed, 0.6 + off, lambda s: {})
    text = regimes(tmp_path / "web", tmp_path / "out").read_text()
    print(text)
    # lead: agreement is best on biased captions (0.9, 0.92 over steps 501-2000), then combined; agree-pair's share
    assert "| bias-0.4 | biased captions | neighbourhood agreement (0.910 ± 0.014) | combined (mixture + agreement) " \
           "(0.800 ± 0.000) | 0.600 ± 0.000 | agree-pair | +0.50 / +0.50 |" in text
    assert "| neighbourhood agreement | text | 0.700 ± 0.000 | 0.700 ± 0.000 | 0.900 ± 0.000 | 0.900 ± 0.000 | " \
           "0.900 ± 0.000 |" in text
    assert "| agree-pair | 2 | 0.710 ± 0.014 | 0.810 ± 0.014 | 0.500 ± 0.000 | +0.50 | +0.50 | yes / yes | " \
           "0.850 ± 0.000 / 0.500 ± 0.000 | 100.0 ± 0.0 |" in text
    assert "| comb-pair | 2 | 0.610 ± 0.014 | 0.710 ± 0.014 | 0.500 ± 0.000 | +0.25 | +0.25 | yes / yes |" in text
    assert "| combined (mixture + agreement) |" in text and "0.200 ± 0.000 / 0.100 ± 0.000" in text
    # the head / tail split: only the oracle's runs carry it (v2t), the other cells are empty
    assert "| oracle | 2 | 0.950 ± 0.000 | 0.810 ± 0.014 | – | – |" in text
    assert "| plain | 2 | – | – | – | – |" in text


def test_regimes_without_a_split_writes_no_empty_table(tmp_path):
    """Runs that record no noise kind, hardness or concept frequency (real clips) get their detector windows and a
    line saying there is no split, not a split table without columns."""
    from harmony.experiments.regimes import regimes

    for seed in (0, 1):
        d = tmp_path / "web" / f"regime-grid-mix_arm-plain_seed-{seed}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": seed}, "data": {"seed": seed}}))
        rows = [{"step": s, "noise_auc_loss_text": 0.5 + 0.01 * seed, "noise_auc_loss_audio": 0.55}
                for s in range(10, 2001, 10)]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        (d / "summary.json").write_text(json.dumps({"retrieval": {"v2t": {"r1": 0.02}}, "samples_per_s": 10.0}))
    text = regimes(tmp_path / "web", tmp_path / "out").read_text()
    print(text)
    assert "| own loss | text | 0.505 ± 0.007 |" in text and "| own loss | audio | 0.550 ± 0.000 |" in text
    assert "No split: these runs record no noise kind" in text
    assert "|  |" not in text and "Split, steps" not in text
