"""DVC stage `validate`: check the whole params.yaml before any other stage may touch its outputs, and clean
up what killed attempts left behind.

    python stages/validate.py

Every stage depends on data/params.ok. A bad value stops `dvc repro` here, with one line, before DVC
deletes any output of a dirty stage. The stage also depends on attempts/, where every stage keeps a marker
while it runs (mmrec/attempts.py): after a kill it runs on the next `dvc repro` or `dvc exp run` and cleans up
after the dead attempt (mmrec/pipeline/cleanup.py), even when every other stage is restored from the
run-cache; after a clean run `dvc status` is clean. The file's content never depends on the values, so this
stage reruns nothing else: a valid change reruns only the stages that read it.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mmrec is not pip-installed

from mmrec.config import load_params  # noqa: E402
from mmrec.attempts import marked  # noqa: E402
from mmrec.errors import exits_cleanly  # noqa: E402
from mmrec.files import write_text  # noqa: E402
from mmrec.paths import PARAMS_OK  # noqa: E402
from mmrec.pipeline.cleanup import clean_up  # noqa: E402


@exits_cleanly
@marked
def main() -> None:
    params = load_params()
    write_text(PARAMS_OK, "params.yaml is valid\n")
    print(f"params.yaml: valid ({len(params.ladder)} rungs: {' -> '.join(params.ladder)})")
    for line in clean_up(params):
        print(f"cleaned up: {line}")


if __name__ == "__main__":
    main()
