"""The model registry: what a version holds, the pyfunc it serves, the registry command, and champion through dvc."""
import json
import os
import shutil
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mmrec.registry.gate import promote_rung
from mmrec.registry.models import main as registry_cli
from mmrec.tracking.store import fluent_store, tracking_uri
from tests.conftest import commit, dvc, kill_tree, start_server, tiny_params
from tests.registry.test_gate import plant_pickle, rung_with_checkpoint

ONE_RUNG = {"ladder": {"tiny": {"width": 32, "layers": 1, "memories": 2, "after": "data/tokens"}}}


def store(params) -> tuple[str, MlflowClient]:
    uri = tracking_uri(params.mlflow)
    return uri, MlflowClient(uri, uri)


def local_generate(paths, prompt, n):
    """Greedy text from the checkpoint itself; asserts that all n tokens came (no early end of document)."""
    from mmrec.model.inference import generate, load_model
    from mmrec.data.tokenizer import load_tokenizer

    model, _ = load_model(paths.best)
    sp = load_tokenizer(paths.tokenizer)
    ids = sp.encode(prompt)
    new = generate(model, ids, n, greedy=True, eos_id=sp.eos_id())
    assert len(new) == n
    return sp.decode(ids + new)


def test_a_version_holds_the_weights_once_its_tags_and_a_link_to_its_logged_model(workdir, monkeypatch):
    params = tiny_params(workdir)
    paths = rung_with_checkpoint(workdir, params, "tiny", 1.5)
    monkeypatch.setenv("DVC_EXP_NAME", "lr-low")
    d = promote_rung(params, "tiny", workdir)
    assert d.aliases == {"champion": "moved: champion pointed at no version", "tiny": "moved: tiny pointed at no version",
                         "exp-lr-low": "moved: the experiment's own alias"}
    uri, c = store(params)
    v = c.get_model_version("mmrec", "1")
    assert sorted(v.aliases) == ["champion", "exp-lr-low", "tiny"]
    header = json.loads((workdir / "data/tokens/header.json").read_text())
    assert v.tags["test_bpb"] == "1.5" and v.tags["rung"] == "tiny" and v.tags["dvc_exp_name"] == "lr-low"
    assert v.tags["data_sha256"] == header["data_sha256"] and v.tags["tokenizer_sha256"] == header["tokenizer_sha256"]
    assert v.tags["checkpoint_sha256"] == d.checkpoint_sha256 and v.tags["params_hash"] == params.digest()
    assert v.tags["champion.decision"] == "moved: champion pointed at no version" and v.tags["champion.set_by"]
    assert {"git_commit", "model_id", "promote.reason"} <= set(v.tags)
    assert v.description.startswith("tiny (mmrec): test 1.5000 bits/byte") and "\n" not in v.description

    logged = c.get_logged_model(v.tags["model_id"])  # the logged model's page lists its version
    assert v.source == f"models:/{logged.model_id}"
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "mmrec", "version": 1}]
    test_metrics = {m.key: m.value for m in logged.metrics if m.key.startswith("test/")}  # system/* aside
    assert test_metrics == {"test/bpb": 1.51, "test/bpb_context": 1.5, "test/unigram_bpb": 2.2, "test/loss": 3.0}

    files = {p.relative_to(logged.artifact_location.removeprefix("file://")).as_posix(): p.stat().st_size
             for p in Path(logged.artifact_location.removeprefix("file://")).rglob("*") if p.is_file()}
    weights = paths.best.stat().st_size + paths.tokenizer.stat().st_size
    assert files["artifacts/best.pt"] == paths.best.stat().st_size and files["python_model.pkl"] < 200
    code = sum(size for name, size in files.items() if name.startswith("code/"))
    assert sum(files.values()) - code < weights + 20_000, files  # the weights once, and a few metadata files
    assert code < 150_000, files  # the served model's own modules, not the whole package
    assert "code/mmrec/model/lm.py" in files and "code/mmrec/training/loop.py" not in files

    with fluent_store(uri):
        model = mlflow.pyfunc.load_model("models:/mmrec@champion")
    [text] = model.predict(["The king"])
    assert text == local_generate(paths, "The king", 40) != local_generate(paths, "The king", 4)
    sampled = model.predict(["The king", "The king"], params={"temperature": 0.9, "top_k": 20, "seed": 3})
    assert sampled == model.predict(["The king", "The king"], params={"temperature": 0.9, "top_k": 20, "seed": 3})
    for bad in [{"max_new_tokens": -5}, {"max_new_tokens": 0}, {"max_new_tokens": 2049}, {"temperature": 11.0},
                {"top_k": -1}]:
        [(key, value)] = bad.items()
        with pytest.raises(MlflowException, match=f"param {key} = {value}: must be"):
            model.predict(["The king"], params=bad)


def first_version(workdir, params) -> tuple[MlflowClient, str, Path]:
    """tiny promoted as v1 into a new store: the client, v1's logged model and the folder that holds its files."""
    rung_with_checkpoint(workdir, params, "tiny", 1.5)
    promote_rung(params, "tiny", workdir)
    _, c = store(params)
    logged = c.get_logged_model(c.get_model_version("mmrec", "1").tags["model_id"])
    return c, logged.model_id, Path(logged.artifact_location.removeprefix("file://"))


def test_a_pickle_planted_in_a_version_never_runs_when_the_model_loads(workdir):
    params = tiny_params(workdir)
    _, _, folder = first_version(workdir, params)
    marker = workdir / "payload-ran"
    plant_pickle(folder / "artifacts/best.pt", marker)
    with fluent_store(tracking_uri(params.mlflow)), pytest.raises(Exception, match="cannot be read \\(UnpicklingError"):
        mlflow.pyfunc.load_model("models:/mmrec@champion")
    assert not marker.exists()


def cli(capsys, *args):
    """`python -m mmrec.registry ...` in process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = registry_cli(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_set_champion_and_rollback_by_hand(workdir, capsys):
    params = tiny_params(workdir)
    rung_with_checkpoint(workdir, params, "tiny", 1.5)
    rung_with_checkpoint(workdir, params, "mini", 1.3, seed=1)
    promote_rung(params, "tiny", workdir)
    assert promote_rung(params, "mini", workdir).champion
    uri, c = store(params)
    flags = ["--tracking-uri", uri]

    code, out, _ = cli(capsys, *flags, "list")
    header, v1, v2 = out.splitlines()
    assert code == 0 and header.split() == ["version", "rung", "test_bpb", "docs", "gain", "interval", "over",
                                            "experiment", "commit", "aliases", "created"]
    # v1 passed the unigram baseline by a fixed margin; v2 took champion from v1 by the paired test
    assert v1.split()[:8] == ["1", "tiny", "1.5000", "11", "0.7000", "-", "unigram", "-"] and v1.split()[9] == "tiny"
    assert v2.split()[:8] == ["2", "mini", "1.3000", "11", "0.2000", "[0.2000,0.2000]", "v1", "-"]
    assert v2.split()[9] == "champion,mini"

    code, out, _ = cli(capsys, *flags, "set-champion", "1", "--reason", "mini repeats itself")
    assert code == 0 and out == "mmrec@champion -> v1 (was v2): mini repeats itself\n"
    assert cli(capsys, *flags, "list")[1].splitlines()[1].split()[9] == "champion,tiny"
    tags = c.get_model_version("mmrec", "1").tags
    assert tags["champion.reason"] == "mini repeats itself" and tags["champion.previous"] == "2"
    assert tags["champion.set_by"].endswith("via set-champion") and tags["champion.set_at"].endswith("Z")

    code, out, _ = cli(capsys, *flags, "rollback", "--reason", "false alarm")
    assert code == 0 and out == "mmrec@champion -> v2 (was v1): false alarm\n"
    assert str(c.get_model_version_by_alias("mmrec", "champion").version) == "2"
    assert cli(capsys, *flags, "set-champion", "2", "--reason", "again")[0] == 0  # keeps what v2 replaced
    assert cli(capsys, *flags, "rollback", "--reason", "undo")[1] == "mmrec@champion -> v1 (was v2): undo\n"

    for args, message in [(["set-champion", "7", "--reason", "x"], "mmrec has no version '7'; it has: 1, 2"),
                          (["set-champion", "1"], "the following arguments are required: --reason"),
                          (["--model", "nope", "list"], "no versions of registered model 'nope'"),
                          (["promote"], "invalid choice: 'promote'")]:
        code, out, err = cli(capsys, *flags, *args)
        assert code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert message in err
    code, _, err = cli(capsys, "--tracking-uri", f"sqlite:///{workdir}/none.db", "list")
    assert code == 2 and err.startswith("error: no MLflow store at") and not (workdir / "none.db").exists()


def test_mlflow_models_serve_answers_with_40_tokens_by_default_and_400_for_a_bad_param(workdir, tmp_path):
    params = tiny_params(workdir)
    paths = rung_with_checkpoint(workdir, params, "tiny", 1.5)
    promote_rung(params, "tiny", workdir)
    cwd = tmp_path / "elsewhere"  # away from the repository: only the version's code imports
    cwd.mkdir()
    # `-p 0` leaves mlflow's uvicorn command without --port, so uvicorn reads UVICORN_PORT: 0, any free port
    server, url = start_server([shutil.which("mlflow"), "models", "serve", "-m", "models:/mmrec@champion",
                                "--env-manager", "local", "-h", "127.0.0.1", "-p", "0"], tmp_path / "serve.log",
                               cwd=cwd, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(params.mlflow),
                                             "UVICORN_PORT": "0"})
    try:
        assert requests.get(f"{url}/ping", timeout=10).status_code == 200
        ok = requests.post(f"{url}/invocations", json={"inputs": ["The king"]}, timeout=30)
        assert ok.status_code == 200, ok.text
        assert ok.json()["predictions"] == [local_generate(paths, "The king", 40)]
        for bad in [{"max_new_tokens": -5}, {"max_new_tokens": 5000}, {"temperature": -1.0}]:
            r = requests.post(f"{url}/invocations", json={"inputs": ["The king"], "params": bad}, timeout=30)
            [key] = bad
            assert r.status_code == 400 and f"param {key} = " in r.json()["message"], r.text
    finally:
        kill_tree(server.pid)
        server.wait()


@pytest.mark.e2e  # two dvc experiments: ~110 s
def test_champion_ends_on_the_better_experiment_through_dvc(project):
    root, set_params = project
    set_params(**ONE_RUNG)
    dvc(root, "repro")
    commit(root, "baseline")
    dvc(root, "exp", "run", "-n", "better", "-S", "train.max_steps=80")
    dvc(root, "exp", "run", "-n", "worse", "-S", "train.max_steps=20")

    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    by_exp = {v.tags["dvc_exp_name"]: c.get_model_version("mmrec", v.version)  # search leaves out aliases
              for v in c.search_model_versions("name='mmrec'")}
    assert set(by_exp) == {"", "better", "worse"}
    base, better, worse = (float(by_exp[e].tags["test_bpb"]) for e in ["", "better", "worse"])
    assert better < base < worse
    assert sorted(by_exp["better"].aliases) == ["champion", "exp-better", "tiny"]
    assert sorted(by_exp["worse"].aliases) == ["exp-worse"] and by_exp[""].aliases == []
    promotion = json.loads((root / "models/tiny/promotion.json").read_text())
    assert promotion["dvc_exp_name"] == "worse" and not promotion["champion"]
    assert promotion["champion_reason"].startswith(f"stayed: test_bpb_context {worse:.4f} gains -")
    assert promotion["champion_reason"].endswith("the lower end does not clear min_improvement 0.0")
    assert promotion["champion_gain_high"] < 0  # the worse experiment is worse on the whole interval
    assert by_exp["worse"].tags["champion.decision"] == promotion["champion_reason"]
    for v in by_exp.values():
        assert {"test_bpb", "rung", "git_commit", "data_sha256", "tokenizer_sha256", "params_hash"} <= set(v.tags)

    # the worse experiment's weights (train comes back from the run-cache) scored on the first 600 test tokens only
    dvc(root, "exp", "run", "-n", "subset", "-S", "train.max_steps=20", "-S", "evaluate.max_tokens=600")
    promotion = json.loads((root / "models/tiny/promotion.json").read_text())
    v = str(by_exp["worse"].version)
    assert promotion["model_version"] == v and not promotion["whole_split"] and not promotion["champion"]
    assert promotion["version_figure"].startswith(f"v{v} keeps its reference figure (test_bpb_context {worse:.4f}, "
                                                  "the whole test split); this one on a subset of the test split")
    assert promotion["champion_reason"].startswith("stayed: this figure is on a subset of the test split")
    assert c.get_model_version("mmrec", v).tags["test_bpb"] == by_exp["worse"].tags["test_bpb"]
    assert str(c.get_model_version_by_alias("mmrec", "champion").version) == str(by_exp["better"].version)


def test_a_promote_stopped_as_it_stores_the_scores_leaves_no_version_claiming_them(workdir, monkeypatch):
    from tests.registry.test_gate import registry_state

    params = tiny_params(workdir)
    rung_with_checkpoint(workdir, params, "tiny", 1.5)

    def killed(*args, **kwargs):  # the kill, just as test_docs.json begins to upload
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "log_model_artifact", killed)
        with pytest.raises(KeyboardInterrupt):
            promote_rung(params, "tiny", workdir)
    assert registry_state(params) == []  # nothing claims what was not stored

    assert promote_rung(params, "tiny", workdir).model_version == "1"  # the rerun, as `dvc repro` makes it
    rung_with_checkpoint(workdir, params, "mini", 1.3, seed=1)
    d = promote_rung(params, "mini", workdir)
    assert d.champion and d.champion_reason.startswith("moved: test_bpb_context 1.3000 gains 0.2000 (95% interval")


def test_a_version_that_lost_its_scores_is_one_line_until_a_rerun_on_its_weights_stores_them_again(workdir):
    from tests.registry.test_gate import run_stage

    params = tiny_params(workdir)
    c, model_id, folder = first_version(workdir, params)
    (folder / "test_docs.json").unlink()  # as a promote killed between registering and storing them left it
    rung_with_checkpoint(workdir, params, "mini", 1.3, seed=1)

    proc = run_stage(workdir, params, "mini")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: mmrec v1's logged model {model_id} holds no test_docs.json, though the "
                           "version claims per-document scores: rerun `dvc repro -f promote@tiny` where its weights "
                           "are (it stores them again)"), line
    assert [str(v.version) for v in c.search_model_versions("name='mmrec'")] == ["1"]

    d = promote_rung(params, "tiny", workdir)  # the rerun on v1's weights
    assert d.model_version == "1" and d.version_figure.startswith(
        "v1 takes this figure on the whole test split (11 documents) as its reference, in place of the one it lost")
    d = promote_rung(params, "mini", workdir)
    assert d.champion and d.champion_reason.startswith("moved: test_bpb_context 1.3000 gains 0.2000 (95% interval")
