"""The docs stay honest: every file path, `python -m` command, dotted module and `from mmrec... import` that
README.md and docs/*.md name exists in the code."""
import importlib
import importlib.util
import re

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w/.-])((?:mmrec|stages|bench|tests|docs)/[\w/.-]*\w)")
COMMAND = re.compile(r"python -m ([\w.]+)")
DOTTED = re.compile(r"(?<![\w/.-])(mmrec(?:\.[a-z_]+)+)")
IMPORT = re.compile(r"^\s*from (mmrec[\w.]*) import ([\w, ]+)", re.M)
MLFLOW_NAMES = {"mmrec.owner", "mmrec.pipeline", "mmrec.name_base",  # tag keys, not modules
                "mmrec.lease"}  # the registered model that holds the registry lease


def text(doc) -> str:
    return doc.read_text()


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_path_the_docs_name_exists(doc):
    missing = []
    for path in PATH.findall(text(doc)):
        if "<" in path or "*" in path or path.endswith("/"):
            continue  # a pattern such as tests/<room>/ or stages/*.py
        if not (REPO / path).exists() and not any((REPO / path).parent.glob(path.rsplit("/", 1)[-1] + "*")):
            missing.append(path)
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_module_and_command_the_docs_name_exists(doc):
    body = text(doc)
    names = set(COMMAND.findall(body)) | {m for m in DOTTED.findall(body) if m not in MLFLOW_NAMES}
    missing = []
    for name in sorted(names):
        # a dotted name may end in an attribute (mmrec.model.inference.generate): its module must have it
        module, _, attr = name.rpartition(".")
        if not (is_module(name) or (is_module(module) and hasattr(importlib.import_module(module), attr))):
            missing.append(name)
    assert not missing, f"{doc.name} names modules or commands that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_import_the_docs_show_works(doc):
    wrong = []
    for module, names in IMPORT.findall(text(doc)):
        if not is_module(module):
            wrong.append(f"from {module} import {names}")
            continue
        loaded = importlib.import_module(module)
        wrong += [f"from {module} import {n}" for n in (x.strip() for x in names.split(",")) if not hasattr(loaded, n)]
    assert not wrong, f"{doc.name} shows imports that fail: {wrong}"
