"""DVC stage promote@<rung>: see mmrec/registry/gate.py.

    python stages/promote.py tiny
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

from mmrec.config import load_rung_params  # noqa: E402
from mmrec.attempts import marked  # noqa: E402
from mmrec.errors import exits_cleanly  # noqa: E402


@exits_cleanly
@marked
def main(argv: list[str]) -> None:
    params, rung = load_rung_params(argv, "promote")
    from mmrec.registry.gate import promote_rung

    d = promote_rung(params, rung)
    verdict = f"promoted as {d.registered_model} v{d.model_version}" if d.promoted else "not promoted (continuing)"
    print(f"{rung}: {verdict}: {d.reason}")
    if d.version_figure:
        print(f"  {d.version_figure}")
    for alias, what in d.aliases.items():
        print(f"  @{alias} {what}")


if __name__ == "__main__":
    main(sys.argv[1:])
