"""dvc.yaml lists, in each stage's deps, every project module the stage's module imports
(directly or through another project module, at import time): a module missing there
changes what a stage computes without DVC rerunning it."""
import ast

import pytest
import yaml

from tests.conftest import ROOT

PACKAGES = ("pipelines", "serving")
MODULE = {"register": "registry"}  # a stage's module is pipelines/<stage>.py, but for these


def imported(path) -> set[str]:
    """Project modules (as repository paths) that ``path`` imports at module level."""
    found = set()
    for node in ast.parse((ROOT / path).read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module in PACKAGES:
                found |= {f"{node.module}/{a.name}.py" for a in node.names}
            elif node.module.split(".")[0] in PACKAGES:
                found.add(node.module.replace(".", "/") + ".py")
        elif isinstance(node, ast.Import):
            found |= {a.name.replace(".", "/") + ".py" for a in node.names if a.name.split(".")[0] in PACKAGES}
    return {p for p in found if (ROOT / p).is_file()}


def closure(path: str) -> set[str]:
    seen, todo = set(), [path]
    while todo:
        if (p := todo.pop()) not in seen:
            seen.add(p)
            todo += imported(p)
    return seen


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_module_a_stage_imports_is_a_dep(stage):
    module = f"pipelines/{MODULE.get(stage, stage)}.py"
    assert STAGES[stage]["cmd"].startswith(f"ptune stage {stage} ")
    missing = closure(module) - set(STAGES[stage]["deps"])
    assert not missing, f"dvc.yaml: stage {stage} imports {sorted(missing)}, not in its deps"
