"""`python -m mmrec.tracking.compare` against a real MLflow sqlite store holding a small sweep."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from mmrec.config import Params
from mmrec.tracking.compare import main
from tests.conftest import REPO

COMMON = {"seed": "1337", "train.batch_size": "16", "model.width": "32"}  # equal everywhere: hidden
T0 = 1_700_000_000_000  # start times one minute apart, so --last has an order to go by


def make_run(c: MlflowClient, exp_id: str, name: str, minute: int, *, params: dict[str, str], tags: dict[str, str],
             metrics: dict[str, float], val_curve: list[float], status: str = "FINISHED") -> str:
    run_id = c.create_run(exp_id, start_time=T0 + minute * 60_000, run_name=name, tags=tags).info.run_id
    ts = T0 + minute * 60_000
    c.log_batch(run_id, params=[Param(k, v) for k, v in (COMMON | params).items()],
                metrics=[Metric("loss/val", v, ts, 10 * (i + 1)) for i, v in enumerate(val_curve)]
                + [Metric(k, v, ts, 30) for k, v in metrics.items()]
                + [Metric("perf/tokens_per_s", 1.0, ts, 30)])  # the last per-step value: must not be the headline one
    c.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """<dir>/mlflow.db with a tiny-rung sweep (a, b, c), a failed run, a mini run and a run in another experiment."""
    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root}/mlflow.db"
    c = MlflowClient(uri)
    mm = c.create_experiment("mmrec", artifact_location=(root / "mlruns").as_uri())
    other = c.create_experiment("other", artifact_location=(root / "mlruns").as_uri())

    def finished(bpb: float, best: float) -> dict[str, float]:
        return {"test/bpb": bpb, "summary/best_val_loss": best, "test/loss": bpb * 0.9,
                "perf/median_tokens_per_s": 5000 + bpb}

    ids = {
        "a": make_run(c, mm, "tiny", 1, params={"train.lr": "0.003", "model.arch": "mmrec", "n_params": "1000"},
                      tags={"rung": "tiny", "dvc_exp_name": "lr-sweep-1", "promote.gain": "0.2",
                            "promote.compared_to": "unigram"},  # passed the baseline by a fixed margin: no interval
                      metrics=finished(2.0, 1.5),
                      val_curve=[3.0, 2.0, 1.5]),
        "b": make_run(c, mm, "tiny", 2, params={"train.lr": "0.01", "model.arch": "gpt", "n_params": "1200"},
                      tags={"rung": "tiny", "dvc_exp_name": "lr-sweep-2"}, metrics=finished(1.8, 1.4),
                      val_curve=[2.9, 1.9, 1.4]),
        "c": make_run(c, mm, "tiny", 3, params={"train.lr": "0.001", "model.arch": "mmrec", "n_params": "1000"},
                      tags={"rung": "tiny"}, metrics=finished(1.8, 1.3), val_curve=[2.8, 1.8, 1.3]),
        "failed": make_run(c, mm, "tiny", 4, params={"train.lr": "0.1", "model.arch": "mmrec", "n_params": "1000"},
                           tags={"rung": "tiny", "dvc_exp_name": "lr-sweep-3"}, metrics={},
                           val_curve=[9.0], status="FAILED"),
        "mini": make_run(c, mm, "mini", 5, params={"train.lr": "0.003", "model.arch": "mmrec", "n_params": "9000",
                                                   "ladder.mini.width": "64"},  # only this run has it
                         tags={"rung": "mini", "promote.gain": "0.0183", "promote.gain_low": "0.01021",
                               "promote.gain_high": "0.02648", "promote.compared_to": "tiny"},
                         metrics=finished(1.5, 1.1) | {"test/bpb_context": 1.48}, val_curve=[1.6, 1.1]),
        # the parent run of a pipeline execution: never a row, though it carries a (headline) metric
        "pipeline": make_run(c, mm, "pipeline · main", 7, params={"train.lr": "0.003"}, tags={"kind": "pipeline"},
                             metrics={"test/bpb": 0.5}, val_curve=[]),
        "other": make_run(c, other, "tiny", 6, params={"train.lr": "0.003", "model.arch": "mmrec", "n_params": "1000"},
                          tags={"rung": "tiny"}, metrics=finished(1.9, 1.4), val_curve=[2.0]),
    }
    return root, ids


def compare(store, *args: str) -> tuple[int, pd.DataFrame]:
    """Run the command with --csv and read the table back."""
    root, _ = store
    csv = root / "out" / "runs.csv"
    csv.unlink(missing_ok=True)
    rc = main(["--tracking-uri", f"sqlite:///{root}/mlflow.db", "--csv", str(csv), *args])
    return rc, pd.read_csv(csv, keep_default_na=False, na_values=[""], dtype={"dvc_exp": str}) if rc == 0 else None


def test_table_shows_only_differing_params_sorted_by_bpb(store, capsys):
    _, ids = store
    rc, table = compare(store, "--rung", "tiny")
    assert rc == 0
    assert list(table["run_id"]) == [ids["c"], ids["b"], ids["a"]]  # bpb 1.8 (val 1.3), 1.8 (val 1.4), 2.0
    assert list(table.columns) == ["run_id", "run_name", "rung", "config", "dvc_exp", "status", "model.arch", "train.lr",
                                   "test_bpb", "best_val_loss", "tokens_per_s", "n_params", "test_loss",
                                   "test_bpb_context", "gain", "gain_low", "gain_high", "gain_over"]
    assert table["gain"].tolist()[2] == 0.2 and table["gain_over"].fillna("").tolist() == ["", "", "unigram"]
    assert list(table["train.lr"]) == [0.001, 0.01, 0.003]
    assert list(table["dvc_exp"].fillna("")) == ["", "lr-sweep-2", "lr-sweep-1"]
    assert list(table["n_params"]) == [1000, 1200, 1000]
    assert table["tokens_per_s"].tolist() == pytest.approx([5001.8, 5001.8, 5002.0])  # the median, not the last step
    assert table["test_loss"].tolist() == pytest.approx([1.62, 1.62, 1.8])
    out = capsys.readouterr().out
    assert ids["c"][:8] in out and ids["c"] not in out  # short ids on screen, full ones in the CSV
    assert "3 params equal across all of them are hidden" in out  # seed, train.batch_size, model.width; not mini's
    assert "train.batch_size" not in out


@pytest.mark.parametrize("args, expected", [
    ([], ["mini", "c", "b", "a"]),
    (["--rung", "tiny", "--dvc-exp", "lr-sweep-1", "--dvc-exp", "lr-sweep-2"], ["b", "a"]),
    (["--rung", "tiny", "--status", "all"], ["c", "b", "a", "failed"]),  # no test_bpb sorts last
    (["--status", "failed"], ["failed"]),
    (["--last", "2"], ["mini", "c"]),
    (["--experiment", "other"], ["other"]),
])
def test_filters(store, args, expected):
    _, ids = store
    rc, table = compare(store, *args)
    assert rc == 0
    assert list(table["run_id"]) == [ids[k] for k in expected]


def test_the_gain_and_its_interval_stand_beside_each_run(store, capsys):
    _, ids = store
    rc, table = compare(store)
    assert rc == 0
    mini = table[table["run_id"] == ids["mini"]].iloc[0]
    assert (mini["gain"], mini["gain_low"], mini["gain_high"], mini["gain_over"]) == (0.0183, 0.01021, 0.02648, "tiny")
    assert mini["test_bpb_context"] == 1.48  # the figure the gain is on, beside the windowed test_bpb
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[-5:] == ["test_loss", "test_bpb_context", "gain", "interval", "gain_over"]
    rows = {line.split()[0]: line.split() for line in lines[1:5]}
    assert rows[ids["mini"][:8]][-3:] == ["0.0183", "[0.0102,0.0265]", "tiny"]
    assert rows[ids["a"][:8]][-3:] == ["0.2000", "-", "unigram"]
    assert rows[ids["c"][:8]][-3:] == ["-", "-", "-"]  # never promoted: no gate ran


def test_plot_overlays_val_loss(store, tmp_path, capsys):
    root, _ = store
    png = tmp_path / "plots" / "val_loss.png"
    assert main(["--tracking-uri", f"sqlite:///{root}/mlflow.db", "--rung", "tiny", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert [p.name for p in png.parent.iterdir()] == ["val_loss.png"]  # no temp file left behind


def test_no_runs_is_one_line_and_exit_1(store, capsys):
    root, _ = store
    assert main(["--tracking-uri", f"sqlite:///{root}/mlflow.db", "--rung", "huge"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no runs match" in err and "'huge'" in err


def test_user_errors_exit_2_without_creating_a_store(store, tmp_path, capsys):
    root, _ = store
    with pytest.raises(SystemExit) as exit_info:
        main(["--tracking-uri", f"sqlite:///{root}/mlflow.db", "--experiment", "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --experiment 'nope': not in") and "it has: Default, mmrec, other" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--tracking-uri", f"sqlite:///{tmp_path}/missing.db"])
    assert exit_info.value.code == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()


def test_defaults_come_from_params_yaml(store, monkeypatch, capsys):
    """No flags: the store is ./mlflow.db and the experiment params.yaml's, else 'mmrec'."""
    root, ids = store
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert main([]) == 0
    assert ids["mini"][:8] in capsys.readouterr().out
    (root / "params.yaml").write_text("mlflow:\n  experiment: other\n")
    try:
        assert main([]) == 0
        out = capsys.readouterr().out
        assert ids["other"][:8] in out and ids["mini"][:8] not in out
    finally:
        (root / "params.yaml").unlink()


def test_module_entry_point_exit_code(store):
    root, _ = store
    proc = subprocess.run([sys.executable, "-m", "mmrec.tracking.compare", "--tracking-uri", f"sqlite:///{root}/mlflow.db",
                           "--status", "killed"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("no runs match status KILLED") and "Traceback" not in proc.stderr


# A seed sweep: config "main" (lr 5e-3) and "lr=0.003" over seeds 1337-1339, "lr=0.001" with one seed; every run
# with the per-document test scores evaluate logs. Each seed moves a run's whole figure, as training noise does.
SWEEP = {"main": ({}, 1.50, [1337, 1338, 1339]), "lr=0.003": ({"lr": 0.003}, 1.49, [1337, 1338, 1339]),
         "lr=0.001": ({"lr": 0.001}, 1.52, [1337])}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[str, dict[str, str], dict[str, list]]:
    """(store URI, config digest of each label, per-document scores of each label's runs, in seed order)."""
    import numpy as np

    from mmrec.config import parse_params
    from mmrec.paired import DocScores, doc_id, save

    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("mmrec", artifact_location=(root / "mlruns").as_uri())
    rng = np.random.default_rng(0)
    n_bytes = rng.integers(200, 2000, 40)
    ids = tuple(doc_id(f"chapter {i}") for i in range(40))
    digests, docs, minute = {}, {}, 0
    for label, (train, rate, seeds) in SWEEP.items():
        # the tag the train stage sets: one digest for every seed of a config (pipeline_run.config_tags)
        per_seed = {parse_params({"seed": s, "train": train}).config_digest("tiny") for s in seeds}
        assert len(per_seed) == 1
        digests[label] = per_seed.pop()
        docs[label] = []
        for i, seed in enumerate(seeds):
            bits = n_bytes * (rate + rng.normal(0, 0.01)) + rng.normal(0, 30, 40)
            scores = DocScores("test_bpb_context", ids, n_bytes, bits, True, 40)
            docs[label].append(scores)
            minute += 1
            tags = {"rung": "tiny", "config": digests[label], "config_label": label,
                    "dvc_exp_name": f"{'main' if label == 'main' else 'lr-' + str(train['lr'])}-{i + 1}"}
            run_id = make_run(c, exp, f"tiny · seed={seed}", minute,
                              params={"seed": str(seed), "train.lr": str(train.get("lr", 0.005)), "n_params": "1000"},
                              tags=tags, metrics={"test/bpb_context": scores.bpb, "test/bpb": scores.bpb + 0.01,
                                                  "summary/best_val_loss": 3.4 + i / 100}, val_curve=[4.0])
            save(scores, root / "tiny.docs.json")
            c.log_artifact(run_id, str(root / "tiny.docs.json"), "eval")
    # an earlier run of main's seed 1337 (a forced rerun followed it): the later run counts
    make_run(c, exp, "tiny · main", 0, params={"seed": "1337", "train.lr": "0.005", "n_params": "1000"},
             tags={"rung": "tiny", "config": digests["main"], "config_label": "main"},
             metrics={"test/bpb_context": 9.0}, val_curve=[4.0])
    return uri, digests, docs


def config_rows(out: str) -> dict[str, list[str]]:
    """The config table's rows by label: rung, config, label, n, seeds, 'mean ± std' of each figure, [gain,
    interval, docs_only] (these labels hold no space)."""
    rows = {}
    for line in out.split("by config:")[1].splitlines()[2:]:
        if not line.lstrip().startswith("tiny"):
            break
        words = line.split()
        figures = [" ".join(words[i:i + 3]) for i in (5, 8, 11)]
        rows[words[2]] = words[:5] + figures + words[14:]
    return rows


def test_runs_of_two_configs_over_three_seeds_are_two_rows_of_three_seeds(sweep, capsys):
    import numpy as np

    uri, digests, docs = sweep
    assert main(["--tracking-uri", uri, "--rung", "tiny"]) == 0
    out = capsys.readouterr().out
    rows = config_rows(out)
    assert list(rows) == ["lr=0.003", "main", "lr=0.001"]  # best mean gate figure first
    for label in ("main", "lr=0.003"):
        rung, config, _, n, seeds, gate, *_ = rows[label]
        figures = [d.bpb for d in docs[label]]
        assert (rung, config, n, seeds) == ("tiny", digests[label][:8], "3", "1337-1339")
        assert gate == f"{np.mean(figures):.4f} ± {np.std(figures, ddof=1):.4f}"
    assert rows["lr=0.001"][3:6] == ["1", "1337", f"{docs['lr=0.001'][0].bpb:.4f} ± -"]  # one seed: no std
    assert f"config {digests['main'][:8]} (main): 1 earlier run of a seed that ran again left out" in out
    assert "gain" not in out.split("by config:")[1].splitlines()[1]  # no reference named: no gains


def test_between_configs_the_interval_counts_the_seeds_and_is_wider_than_the_documents_alone(sweep, capsys):
    from mmrec.paired import config_gain, paired_gain

    uri, digests, docs = sweep
    assert main(["--tracking-uri", uri, "--against", "main"]) == 0  # by label; a DVC experiment name does too
    out = capsys.readouterr().out
    rows = config_rows(out)
    assert rows["main"][-3:] == ["ref", "-", "-"]
    gain, interval, docs_only = rows["lr=0.003"][-3:]
    expected = config_gain(docs["main"], docs["lr=0.003"], 0.95, 10_000, 1337, 0.0112)
    assert gain == f"{expected.mean:+.4f}"
    assert interval == f"[{expected.low:.4f},{expected.high:.4f}]"
    assert docs_only == f"[{expected.docs_low:.4f},{expected.docs_high:.4f}]"
    low, high = map(float, interval.strip("[]").split(","))
    d_low, d_high = map(float, docs_only.strip("[]").split(","))
    assert high - low > 2 * (d_high - d_low)
    # and wider than the gate's paired interval between any one seed of each
    pair = paired_gain(docs["main"][0], docs["lr=0.003"][0], 0.95, 10_000, 1337)
    assert high - low > pair.high - pair.low
    assert "interval: its 95% interval over seeds and test documents" in out
    assert main(["--tracking-uri", uri, "--against", "lr-0.003", "--rung", "tiny"]) == 0  # a sweep's -n NAME
    assert config_rows(capsys.readouterr().out)["lr=0.003"][-3] == "ref"


def test_with_one_seed_the_comparison_names_the_std_it_took(sweep, capsys):
    uri, digests, docs = sweep
    assert main(["--tracking-uri", uri, "--against", digests["main"][:6]]) == 0
    out = capsys.readouterr().out
    assert (f"seed noise is unmeasured for config {digests['lr=0.001'][:8]} (lr=0.001), of one seed: its std over "
            f"seeds is taken as compare.seed_std (params.yaml) = {Params().compare.seed_std:g}") in out
    narrow = config_rows(out)["lr=0.001"][-2]
    assert main(["--tracking-uri", uri, "--against", "main", "--seed-std", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "is taken as --seed-std = 0.05" in out
    low, high = map(float, config_rows(out)["lr=0.001"][-2].strip("[]").split(","))
    n_low, n_high = map(float, narrow.strip("[]").split(","))
    assert high - low > 2 * 1.96 * 0.05 > n_high - n_low


def test_against_a_name_no_config_has_is_one_line_naming_the_configs(sweep, capsys):
    uri, digests, _ = sweep
    with pytest.raises(SystemExit) as exit_info:
        main(["--tracking-uri", uri, "--against", "lr-9"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --against lr-9: no config of the selected runs")
    assert f"{digests['main'][:8]} (main)" in err
    with pytest.raises(SystemExit):
        main(["--tracking-uri", uri, "--seed-std", "-1"])
    assert "--seed-std -1.0: must be" in capsys.readouterr().err
