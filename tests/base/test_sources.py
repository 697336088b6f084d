"""The code a stage runs, as the resume fingerprint sees it: the train stage's import closure, nothing else."""
import shutil

import yaml

from mmrec.sources import source_digests
from tests.conftest import REPO


def test_the_train_code_digest_covers_what_the_stage_runs_and_nothing_else(tmp_path):
    for name in ("mmrec", "stages"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    script, package = tmp_path / "stages/train.py", tmp_path / "mmrec"
    before = source_digests(script, package)
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["do"]["deps"]
    assert set(before) == {d for d in deps if d.endswith(".py")}  # what DVC reruns the stage for

    with open(package / "pipeline/evaluate.py", "a") as f:  # a module the train stage never imports
        f.write("# edited\n")
    assert source_digests(script, package) == before
    for edited in ("mmrec/model/lm.py", "mmrec/training/schedule.py", "stages/train.py"):
        with open(tmp_path / edited, "a") as f:
            f.write("# edited\n")
        after = source_digests(script, package)
        assert [k for k in before if before[k] != after[k]] == [edited]
        before = after
