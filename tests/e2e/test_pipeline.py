"""The real `dvc` command line over a throwaway copy of the repository, with tiny params."""
import json
import os

import mlflow
import pytest
from mlflow import MlflowClient

from mmrec.tracking.store import fluent_store
from tests.conftest import dvc, kill_tree, ran, run, wait_for_file

# Loaded by every python process of a `dvc repro` (PYTHONPATH): once tiny has trained, the wall clock steps by a
# second (an NTP step, a VM resumed from a snapshot). Linux derives boot time (/proc/stat btime) from the wall
# clock, so psutil's create_time() of every process, boot time + start ticks, moves with it.
CLOCK_STEP = """
import pathlib
if pathlib.Path("models/tiny/run.json").exists():
    import psutil._pslinux as linux
    boot_time = linux.boot_time
    linux.boot_time = lambda: boot_time() + 1.0
"""


def test_data_stages_run_once_and_a_vocab_change_reruns_only_the_tokenizer(project):
    root, set_params = project
    first = dvc(root, "repro", "tokenizer")
    assert ran(first.stdout) == ["validate", "download", "tokenizer"]
    header = json.loads((root / "data/tokens/header.json").read_text())
    assert header["vocab_size"] == 400
    assert all((root / f"data/tokens/{s}.bin").stat().st_size == 2 * header["splits"][s]["tokens"]
               for s in ["train", "val", "test"])
    assert (root / "models/tokenizer/spm.model").exists()
    assert "tokens" in json.loads((root / "metrics/tokenizer.json").read_text())["train"]
    assert ran(dvc(root, "repro", "tokenizer").stdout) == []  # validate too: no params changed, no stage killed
    assert "up to date" in dvc(root, "status", "tokenizer").stdout

    set_params(tokenizer={"vocab_size": 420})
    assert ran(dvc(root, "repro", "tokenizer").stdout) == ["validate", "tokenizer"]  # validate: params.yaml changed
    assert json.loads((root / "data/tokens/header.json").read_text())["vocab_size"] == 420


def test_whole_ladder_trains_grows_promotes_under_one_pipeline_run_and_a_rerun_does_nothing(project, tmp_path):
    root, _ = project
    (tmp_path / "clock").mkdir()
    (tmp_path / "clock/sitecustomize.py").write_text(CLOCK_STEP)
    out = run(["dvc", "repro"], root, env={**os.environ, "PYTHONPATH": str(tmp_path / "clock")})
    assert ran(out.stdout) == ["validate", "download", "tokenizer", "train@tiny", "evaluate@tiny", "promote@tiny",
                               "train@mini", "evaluate@mini", "promote@mini", "report"]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    tiny_run = json.loads((root / "models/tiny/run.json").read_text())["run_id"]
    mini_run = client.get_run(json.loads((root / "models/mini/run.json").read_text())["run_id"])
    pipeline = client.get_run(mini_run.data.tags["mlflow.parentRunId"])  # one per `dvc repro`, the clock step or not
    assert client.get_run(tiny_run).data.tags["mlflow.parentRunId"] == pipeline.info.run_id
    assert pipeline.data.tags["rungs"] == "mini, tiny" and pipeline.info.status == "FINISHED"
    # the report: the run's figures on one page, also under the pipeline's run (tests/pipeline/test_report.py)
    page = (root / "reports/report.md").read_text()
    mini_bpb = json.loads((root / "metrics/eval/mini.json").read_text())["test_bpb_context"]
    assert f"**mini** reaches **{mini_bpb:.4f}** bits per test byte" in page and "| mini | tiny |" in page
    assert {a.path for a in client.list_artifacts(pipeline.info.run_id, "report")} == {
        "report/report.md", "report/loss_curves.png", "report/test_bpb.png"}

    assert ran(dvc(root, "repro").stdout) == []  # nothing changed and nothing was killed: validate does not run
    assert dvc(root, "status").stdout.strip() == "Data and pipelines are up to date."

    shown = json.loads(dvc(root, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    assert set(files) == {"metrics/summary/tiny.json", "metrics/summary/mini.json"}  # the headline, nothing else
    tiny_bpb = files["metrics/summary/tiny.json"]["data"]["tiny"]["bpb"]
    tiny_eval = json.loads((root / "metrics/eval/tiny.json").read_text())
    assert 0 < tiny_bpb < tiny_eval["unigram_bpb"]
    eval_speed = json.loads((root / "metrics/speed/eval/tiny.json").read_text())  # beside training's, to compare
    assert eval_speed["tokens"] == tiny_eval["test_tokens_scored"] and eval_speed["tokens_per_s"] > 0
    assert eval_speed["threads"] == 1 and eval_speed["peak_rss_mb"] > 0  # train.threads: 1 in the tests

    assert mini_run.data.tags["parent_run_id"] == tiny_run
    assert mini_run.data.metrics["growth/grown_val_loss"] == pytest.approx(
        mini_run.data.metrics["growth/parent_val_loss"], abs=1e-4)
    assert "test/bpb" in mini_run.data.metrics

    promo = json.loads((root / "models/mini/promotion.json").read_text())
    assert promo["promoted"] and promo["model_version"] == "2"
    assert str(client.get_model_version_by_alias("mmrec", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("mmrec", "tiny").version) == "1"
    with fluent_store(f"sqlite:///{root}/mlflow.db"):
        champion = mlflow.pyfunc.load_model("models:/mmrec@champion")
    [short] = champion.predict(["The king"], params={"max_new_tokens": 2})
    [long] = champion.predict(["The king"], params={"max_new_tokens": 30})
    assert short.startswith("The king") and long.startswith(short) and len(long) > len(short)


def test_a_rejected_rung_stops_repro_with_one_line_and_moves_no_alias(project):
    root, set_params = project
    set_params(promote={"baseline_margin": 50.0})
    proc = dvc(root, "repro", "promote@tiny", check=False)
    assert proc.returncode != 0
    [line] = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert "tiny not promoted: test_bpb" in line and "missed unigram baseline" in line
    decision = json.loads((root / "models/tiny/promotion.json").read_text())
    assert decision["promoted"] is False
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert client.search_registered_models() == []


def test_a_killed_train_stage_resumes_under_dvc_and_ends_with_the_same_metrics(project, tmp_path):
    import shutil
    import subprocess

    root, set_params = project
    set_params(train={"max_steps": 150, "eval_every": 10})
    dvc(root, "repro", "tokenizer")
    twin = tmp_path / "twin"
    shutil.copytree(root, twin)  # the same project, never killed
    dvc(twin, "repro", "train@tiny")

    proc = subprocess.Popen(["dvc", "repro", "train@tiny"], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = root / "checkpoints/tiny/last.pt"
    wait_for_file(last, proc)
    kill_tree(proc.pid)
    proc.wait()
    assert last.exists() and not (root / "models/tiny/best.pt").exists(), "the stage ended before the kill"

    out = dvc(root, "repro", "train@tiny")
    assert "resuming from step" in out.stdout + out.stderr
    assert (root / "metrics/train/tiny.json").read_text() == (twin / "metrics/train/tiny.json").read_text()
    assert "up to date" in dvc(root, "status", "train@tiny").stdout
