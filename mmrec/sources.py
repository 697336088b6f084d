"""The project code a script runs: the mmrec modules it imports, followed through the package, and their digests.

tests/test_house.py checks with it that a stage's dvc.yaml deps list every module the stage runs, and
rung.py ties a resumable checkpoint to the digest of the code that trains (a code change restarts a rung).
"""
from __future__ import annotations

import ast
from pathlib import Path

from mmrec.files import sha256_file

PACKAGE = Path(__file__).resolve().parent


def project_imports(path: Path) -> set[str]:
    """The mmrec modules that `path` imports anywhere in its body (deferred imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "mmrec":
                found |= {a.name for a in node.names}
            elif node.module.startswith("mmrec."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mmrec.")}
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports."""
    return {p.stem: project_imports(p) for p in package.glob("*.py") if p.stem != "__init__"}


def closure(script: Path, package: Path = PACKAGE) -> set[str]:
    """Every mmrec module `script` needs, following imports through the package (reading only those)."""
    todo, seen = set(project_imports(script)), set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            path = package / f"{module}.py"
            todo |= project_imports(path) if path.exists() else set()
    return seen


def source_digests(script: Path, package: Path = PACKAGE) -> dict[str, str]:
    """sha256 of `script` and of each mmrec module it runs, keyed by path from the repository root
    ('stages/train.py', 'mmrec/model.py'): equal exactly when the code that runs is."""
    root = package.parent
    files = [script, *(package / f"{m}.py" for m in sorted(closure(script, package)))]
    return {(f.relative_to(root) if f.is_relative_to(root) else Path(f.name)).as_posix(): sha256_file(f)
            for f in files if f.exists()}
