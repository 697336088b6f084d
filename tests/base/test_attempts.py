"""A stage's marker in attempts/ lives exactly as long as the stage, unless a kill ends it: then the next sweep
finds it (mmrec/attempts.py)."""
import pytest

from mmrec import attempts, procs
from mmrec.errors import UserError, exits_cleanly
from tests.base.test_procs import a_dead_stamp, another_machine


def test_a_stage_is_marked_while_it_runs_and_unmarked_however_it_exits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_STAGE", "train@tiny")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    seen = []

    @exits_cleanly
    @attempts.marked
    def main(fail: bool) -> None:
        seen.append(sorted(p.name for p in (tmp_path / "attempts").iterdir()))
        if fail:
            raise UserError("a bad value")

    main(False)
    with pytest.raises(SystemExit):
        main(True)
    assert seen == [[f"train@tiny.{procs.tag()}"]] * 2 and not any((tmp_path / "attempts").iterdir())

    queued = tmp_path / "temporary-copy"  # a queued experiment marks the main repository's folder
    queued.mkdir()
    monkeypatch.chdir(queued)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    main(False)
    assert seen[-1] == [f"train@tiny.{procs.tag()}"] and not (queued / "attempts").exists()


def test_the_sweep_removes_the_markers_of_dead_stages_only(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    folder = tmp_path / "attempts"
    folder.mkdir()
    names = {"dead": f"train@tiny.{a_dead_stamp()}.{procs.machine()}", "live": f"promote@tiny.{procs.tag()}",
             "theirs": f"train@mini.{a_dead_stamp()}.{another_machine()}", "ignore": ".gitignore"}
    for name in names.values():
        (folder / name).touch()
    assert attempts.sweep(tmp_path) == ([folder / names["dead"]], [folder / names["theirs"]])
    assert sorted(p.name for p in folder.iterdir()) == sorted(n for k, n in names.items() if k != "dead")
