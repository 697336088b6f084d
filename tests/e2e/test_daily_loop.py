"""README's daily loop, pasted in order into bash on a real project: experiments, a seed sweep on the queue,
the grouped comparison and the champion's text. A file of its own so that the suite's workers (--dist
loadfile) run it beside the other views of test_what_users_see.py, not after them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from tests.conftest import REPO, commit, dvc


def readme_block(name: str) -> str:
    """The bash block between <!-- name:start --> and <!-- name:end --> in README.md."""
    text = (REPO / "README.md").read_text()
    block = text.split(f"<!-- {name}:start -->")[1].split(f"<!-- {name}:end -->")[0]
    return block.strip().removeprefix("```bash").removesuffix("```").strip()


def stop_stray_workers(root: Path) -> None:
    """DVC's queue workers can outlive `dvc exp run --run-all`: when two finish at once, one may miss the
    shutdown and sleep on with the queue empty (seen once in CI, dvc 3.67.1). Stop whatever still runs in root."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(root):
                os.kill(int(proc.name), signal.SIGTERM)
        except OSError:  # gone meanwhile, or not ours to read
            continue


def test_the_readme_daily_loop_does_what_it_says_when_pasted_in_order(project, tmp_path):
    root, set_params = project
    set_params(ladder={"tiny": {"width": 32, "layers": 1, "memories": 2, "after": "data/tokens"}},
               train={"max_steps": 30, "eval_every": 10},  # one rung, small budgets: the block is under test,
               promote={"on_reject": "continue"})          # not whether lr 1e-3 learns enough in 30 steps
    dvc(root, "repro")
    commit(root, "baseline")  # a fresh clone after the quick start
    params_before = (root / "params.yaml").read_text()

    script = tmp_path / "daily.sh"
    script.write_text("set -euo pipefail\n" + readme_block("daily-loop") + "\n")
    # Output to files, not pipes: a queue worker left behind (below) would hold a pipe open and hang the test.
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        code = subprocess.run(["bash", str(script)], cwd=root, stdout=out, stderr=err, timeout=1200).returncode
    stop_stray_workers(root)
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert code == 0, stdout[-3000:] + stderr[-3000:]

    assert (root / "params.yaml").read_text() == params_before  # --temp left the workspace's params alone
    assert "train.lr" not in dvc(root, "params", "diff").stdout
    shown = json.loads(dvc(root, "exp", "show", "--json").stdout)
    exps = {e["name"]: e for rev in shown for e in (rev.get("experiments") or [])}
    assert set(exps) == {"lr-1e-3", "gpt", "lr-3e-3-1", "lr-3e-3-2", "lr-3e-3-3", "base-1", "base-2"}
    for name, lr, arch, seed in [("lr-1e-3", 0.001, "mmrec", 1337), ("gpt", 0.01, "gpt", 1337),
                                 ("lr-3e-3-1", 0.003, "mmrec", 1337), ("lr-3e-3-3", 0.003, "mmrec", 1339),
                                 ("base-2", 0.01, "mmrec", 1339)]:
        [rev] = exps[name]["revs"]
        data = rev["data"]
        assert float(data["params"]["params.yaml"]["data"]["train"]["lr"]) == lr  # each from the committed params
        assert data["params"]["params.yaml"]["data"]["model"]["arch"] == arch
        assert data["params"]["params.yaml"]["data"]["seed"] == seed  # a seed sweep: one experiment a seed
        assert data["metrics"]["metrics/summary/tiny.json"]["data"]["tiny"]["bpb"] > 0
    assert "lr-3e-3-2" in stdout and "gpt" in stdout  # the compare table lists the runs
    # then one row per config: lr 3e-3 and the committed params over three seeds each, the gain of the first
    # over the second with an interval (seeds and documents) and the documents' alone
    configs = stdout.split("by config:")[1].splitlines()
    lr_row = next(line for line in configs if " lr=0.003 " in line).split()
    assert lr_row[3:5] == ["3", "1337-1339"] and lr_row[-2].startswith("[") and lr_row[-1].startswith("[")
    assert any(line.split()[3:5] == ["3", "1337-1339"] and " ref " in f"{line} " for line in configs)
    assert (root / "val_loss.png").stat().st_size > 1000
    assert "['In the beginning" in stdout  # the champion wrote text
