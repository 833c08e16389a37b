"""dvc.yaml is the stage catalog's (pipelines/stages.py): each stage's command, params and
outputs as declared there, and its deps exactly what it reads: the project modules its
module imports (directly or through another project module, at import time, computed
here from the source), its GX suite, and its inputs. A module missing from deps changes
what a stage computes without DVC rerunning it; one listed that it does not import reruns
it for nothing."""
import ast

import pytest
import yaml

from pipelines.stages import CATALOG
from tests.conftest import ROOT

PACKAGES = ("pipelines", "serving")
# What `ptune stage <name>` imports for every stage before its module runs: the params and
# the task. Not deps: pipelines/deps.py's check (it refuses a run, it computes nothing a
# stage writes), pipelines/cli.py and the catalog (they route the paths dvc.yaml gives; a
# change to them that matters changes the `cmd`).
EVERY_STAGE = ("pipelines/tasks.py", "pipelines/config.py", "pipelines/common.py")
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


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


def closure(*paths: str) -> set[str]:
    seen, todo = set(), list(paths)
    while todo:
        if (p := todo.pop()) not in seen:
            seen.add(p)
            todo += imported(p)
    return seen


def declared(entry: dict, key: str) -> set[str]:
    """Paths under ``outs``, ``metrics`` or ``plots`` (plain, or a one-key mapping of options)."""
    return {next(iter(x)) if isinstance(x, dict) else x for x in entry.get(key, [])}


def test_dvc_yaml_runs_the_catalogs_stages_in_its_order():
    assert list(DVC) == list(CATALOG)


@pytest.mark.parametrize("name", list(CATALOG))
def test_each_stage_in_dvc_yaml_is_the_one_declared(name):
    stage, entry = CATALOG[name], DVC[name]
    assert " ".join(entry["cmd"].split()) == stage.cmd
    assert entry.get("params", []) == list(stage.params)
    assert declared(entry, "outs") | declared(entry, "metrics") | declared(entry, "plots") == set(stage.writes)
    suite = {"gx/great_expectations.yml", f"gx/expectations/{stage.suite}.json"} if stage.suite else set()
    reads = set(stage.deps)
    expected = closure(f"pipelines/{stage.module}.py", *EVERY_STAGE) | suite | reads
    deps = set(entry["deps"])
    assert not expected - deps, f"dvc.yaml: stage {name} reads {sorted(expected - deps)}, not in its deps"
    assert not deps - expected, f"dvc.yaml: stage {name} lists {sorted(deps - expected)} in deps, which it never reads"


@pytest.mark.parametrize("name", [n for n, s in CATALOG.items() if s.suite])
def test_each_suite_exists(name):
    assert (ROOT / "gx/expectations" / f"{CATALOG[name].suite}.json").is_file()
