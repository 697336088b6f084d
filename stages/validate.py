"""DVC stage `validate`: check the whole params.yaml before any other stage may touch its outputs, and clean
up what killed attempts left behind.

    python stages/validate.py

Every stage depends on data/params.ok. A bad value stops `dvc repro` here, with one line, before DVC
deletes any output of a dirty stage. The stage runs on every `dvc repro` and `dvc exp run`
(`always_changed`), so it also cleans up after the dead attempts of earlier ones (mmrec/pipeline/cleanup.py),
even when every other stage is restored from the run-cache. The file's content never depends on the
values, so this stage reruns nothing else: a valid change reruns only the stages that read it.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mmrec is not pip-installed

from mmrec.config import load_params  # noqa: E402
from mmrec.errors import exits_cleanly  # noqa: E402
from mmrec.files import write_text  # noqa: E402
from mmrec.paths import PARAMS_OK  # noqa: E402
from mmrec.pipeline.cleanup import clean_up  # noqa: E402


@exits_cleanly
def main() -> None:
    params = load_params()
    write_text(PARAMS_OK, "params.yaml is valid\n")
    print(f"params.yaml: valid ({len(params.ladder)} rungs: {' -> '.join(params.ladder)})")
    for line in clean_up(params):
        print(f"cleaned up: {line}")


if __name__ == "__main__":
    main()
