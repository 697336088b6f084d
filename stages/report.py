"""DVC stage `report`: reports/report.md, what this pipeline produced on one page (see mmrec/pipeline/report.py).

    python stages/report.py     (from the repository root)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mmrec is not pip-installed

from mmrec.config import load_params  # noqa: E402
from mmrec.errors import exits_cleanly  # noqa: E402


@exits_cleanly
def main() -> None:
    params = load_params()
    from mmrec.pipeline.report import write_report

    print(f"wrote {write_report(params)} (and logged it to the pipeline's MLflow run)")


if __name__ == "__main__":
    main()
