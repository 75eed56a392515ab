"""Every third-party package the runtime imports is a declared dependency (pyproject.toml), or an extra's,
imported only where that extra is needed. A fresh ``pip install csulora`` must run ``sanitize``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = {"huggingface_hub": "huggingface_hub", "safetensors": "safetensors", "torch": "torch",
                 "typer": "typer", "rich": "rich", "numpy": "numpy", "yaml": "pyyaml"}  # fmt: skip
# imported only by the evaluation (csulora eval / demo / worlds, Parquet prompt sets) and the sweep's picture: the
# eval extra
EXTRAS = {"transformers", "peft", "matplotlib", "tokenizers", "pyarrow"}


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_runtime_imports_are_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    eval_extra = {d.split(">")[0].strip().lower() for d in project["optional-dependencies"]["eval"]}
    stdlib = set(sys.stdlib_module_names)
    for path in sorted((REPO / "csulora").rglob("*.py")):
        third_party = imported(path) - stdlib - {"csulora", "__future__"}
        for name in third_party:
            if name in EXTRAS:
                assert name in eval_extra or name == "tokenizers", (path, name)
                continue
            assert DISTRIBUTIONS.get(name, name).lower() in declared, f"{path.name} imports {name}, not declared"
