"""export: a merged LoRA (or full) checkpoint loads as a plain model with the PEFT model's
logits; a soft prompt fed as inputs_embeds gives PEFT's training-forward logits; prefix
tuning and bad input are refused in one line, with nothing written."""
import dataclasses
import json
import shutil

import pytest
import torch

from pipelines import evaluate, methods, tune
from pipelines.common import StageError, read_jsonl, sha256_file
from pipelines.shards import tokenizer_fingerprint
from serving import export
from tests.conftest import build_tiny_model, git
from tests.test_tune import E2E, shards, tune_cfg  # noqa: F401  (shards: a fixture)

PROMPTS = ["Attributes: name[Aromi], food[Chinese]\nDescription:", "Attributes: x\nDescription: Aromi"]


def _tuned(method, shards, base, out):  # noqa: F811
    cfg = tune_cfg(method, max_steps=1, checkpoint_dir=str(out.parent / f"ckpt-{method}"))
    tune.run(cfg, shards / "shards", base, out, out.parent / f"live-{method}")
    return cfg


def _randomize(params, scale):
    """Adapter weights far from their initialization (LoRA's B starts at 0), so they matter."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p) * scale)


@pytest.fixture(scope="module")
def lora(tmp_path_factory, shards, tiny_base):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("lora") / "adapter"
    _tuned("lora", shards, tiny_base, out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out, is_trainable=True)
    _randomize([p for n, p in model.named_parameters() if "lora_" in n], 0.3)
    model.save_pretrained(out)
    return out


def _ids(tok, prompt):
    return torch.tensor([tok(prompt, add_special_tokens=False).input_ids])


def _logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits[0]


def test_a_merged_lora_checkpoint_loads_as_a_plain_model_with_the_peft_models_logits(lora, shards, tiny_base,
                                                                                   tmp_path):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = export.export(str(lora), tiny_base, shards / "shards", tmp_path / "out")
    out = tmp_path / "out"
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "prompt_format.json", "ptune_export.json"} <= files
    assert not files & {"adapter_config.json", "adapter_model.safetensors"}  # a plain model, no PEFT left
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), lora).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tokenizer_fingerprint(out) == tokenizer_fingerprint(tiny_base)
    for prompt in PROMPTS:
        ids = _ids(tok, prompt)
        expected = _logits(peft_model, input_ids=ids)
        torch.testing.assert_close(_logits(merged, input_ids=ids), expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(expected, _logits(plain, input_ids=ids), atol=1e-2)  # the adapter matters
    written = json.loads((out / "ptune_export.json").read_text())
    assert written == json.loads(json.dumps(record, default=str))
    assert written["method"] == "lora" and written["kind"] == "merged_checkpoint"
    assert written["source"] == {"adapter": str(lora.resolve())}
    assert written["base_model"]["sha256"] == sha256_file(tiny_base / "model.safetensors")
    assert written["base_model"]["hidden_size"] == 32 and written["base_model"]["dtype"] == "float32"
    assert written["files"] == {name: sha256_file(out / name) for name in files - {"ptune_export.json"}}
    assert written["check"]["max_abs_logit_difference"] < 1e-4
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in out.iterdir())  # readable by another engine's user


def test_the_prompt_format_is_the_one_the_adapter_was_trained_on(lora, shards, tiny_base, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    export.export(str(lora), tiny_base, shards / "shards", tmp_path / "out")
    fmt = json.loads((tmp_path / "out" / "prompt_format.json").read_text())
    records = {r["id"]: r for r in read_jsonl(shards / "clean" / "train.jsonl")}
    example = records[fmt["example"]["id"]]
    tok = AutoTokenizer.from_pretrained(tiny_base)
    tuned = evaluate.TunedPrompts.from_dir(E2E, tok, shards / "shards", tiny_base)
    assert fmt["example"]["source"] == tuned.source(example) == fmt["template"].replace("{mr}", example["mr"])
    assert fmt["example"]["target"] == f" {example['ref']}{tok.eos_token}"
    assert fmt["fields"] == ["mr"] and fmt["chat_template"] is False and fmt["few_shot"] == 0


def test_a_full_fine_tune_exports_as_its_checkpoint(shards, tiny_base, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _tuned("full", shards, tiny_base, tmp_path / "adapter")
    record = export.export(str(tmp_path / "adapter"), tiny_base, shards / "shards", tmp_path / "out")
    assert record["kind"] == "checkpoint"
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids(AutoTokenizer.from_pretrained(tmp_path / "out"), PROMPTS[0])
    torch.testing.assert_close(_logits(exported, input_ids=ids), _logits(tuned, input_ids=ids))
    assert not {"ptune_adapter.json", "train_ids.txt"} & {p.name for p in (tmp_path / "out").iterdir()}


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_a_soft_prompt_fed_as_inputs_embeds_gives_the_training_forward_logits(method, shards, tiny_base,
                                                                            tmp_path):  # noqa: F811
    """P-tuning's prompt is its encoder's output: the export must hold that output, computed
    once, not the encoder's input embeddings."""
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _tuned(method, shards, tiny_base, tmp_path / "adapter")
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), methods.build_peft_config(cfg, tiny_base))
    _randomize(trained.prompt_encoder.parameters(), 3.0)
    trained.eval()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    expected = {p: _logits(trained, input_ids=_ids(tok, p)) for p in PROMPTS}  # virtual tokens come first
    trained.save_pretrained(tmp_path / "adapter")

    record = export.export(str(tmp_path / "adapter"), tiny_base, shards / "shards", tmp_path / "out")
    out = tmp_path / "out"
    assert record["kind"] == "soft_prompt"
    meta = json.loads((out / "soft_prompt.json").read_text())
    prompt = load_file(out / meta["file"])[meta["tensor"]]
    assert list(prompt.shape) == meta["shape"] == [4, 32] and meta["num_virtual_tokens"] == 4
    assert meta["hidden_size"] == 32 and meta["dtype"] == "float32" == str(prompt.dtype).removeprefix("torch.")
    assert "before the prompt" in meta["placement"] and "position 0" in meta["placement"]
    plain = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    for text, logits in expected.items():
        ids = _ids(tok, text)
        embeds = torch.cat([prompt[None], plain.get_input_embeddings()(ids)], 1)
        found = _logits(plain, inputs_embeds=embeds)
        torch.testing.assert_close(found, logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(found[4:], _logits(plain, input_ids=ids), atol=1e-2)  # the prompt matters
    assert {"prompt_format.json", "ptune_export.json"} <= {p.name for p in out.iterdir()}


def test_prefix_tuning_is_refused_in_one_line_and_nothing_is_written(shards, tiny_base, tmp_path, capsys):  # noqa: F811
    from pipelines.cli import main

    _tuned("prefix", shards, tiny_base, tmp_path / "adapter")
    with pytest.raises(StageError, match=r"prefix tuning cannot be exported.*vllm#660.*`ptune serve`"):
        export.export(str(tmp_path / "adapter"), tiny_base, shards / "shards", tmp_path / "out")
    capsys.readouterr()  # tune's progress bar
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--base", str(tiny_base),
                 "--shards", str(shards / "shards"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptune export: error: ") and "prefix tuning" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "ckpt-prefix", "live-prefix"]


def test_an_existing_output_is_replaced_only_with_force(lora, shards, tiny_base, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(StageError, match=rf"{out}: exists; pass --force"):
        export.export(str(lora), tiny_base, shards / "shards", out)
    assert (out / "mine.txt").read_text() == "keep"
    with pytest.raises(StageError, match="holds files of something other than a ptune export .* would delete them"):
        export.export(str(lora), tiny_base, shards / "shards", out, force=True)  # a mistyped --out loses nothing
    assert (out / "mine.txt").read_text() == "keep"
    (out / "mine.txt").unlink()
    export.export(str(lora), tiny_base, shards / "shards", out, force=True)  # an empty directory
    (out / "model.safetensors").write_bytes(b"stale")
    export.export(str(lora), tiny_base, shards / "shards", out, force=True)  # an earlier export: replaced
    assert (out / "model.safetensors").stat().st_size > 5
    (tmp_path / "file").write_text("")
    with pytest.raises(StageError, match="is not a directory"):
        export.export(str(lora), tiny_base, shards / "shards", tmp_path / "file", force=True)


def test_bad_input_is_one_line_naming_the_path(lora, shards, tiny_base, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    with pytest.raises(StageError, match=rf"{tmp_path}/nowhere: no such directory; nor a registered version.*`ptune registry`"):
        export.export(str(tmp_path / "nowhere"), tiny_base, shards / "shards", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="ptune_adapter.json: missing"):
        export.export(str(tmp_path / "empty"), tiny_base, shards / "shards", out)
    other = build_tiny_model(tmp_path / "other_base", seed=1)
    with pytest.raises(StageError, match=rf"{other}: not the base model .* pass --base"):
        export.export(str(lora), other, shards / "shards", out)
    with pytest.raises(StageError, match=rf"{tmp_path}/nowhere/manifest.json: missing; pass --shards"):
        export.export(str(lora), tiny_base, tmp_path / "nowhere", out)
    moved = shutil.copytree(shards / "shards", tmp_path / "shards")
    manifest = json.loads((moved / "manifest.json").read_text())
    (moved / "manifest.json").write_text(json.dumps({**manifest, "note": "other shards"}))
    with pytest.raises(StageError, match=rf"trained on other shards than {moved} .* pass --shards"):
        export.export(str(lora), tiny_base, moved, out)
    git(tmp_path, "init", "-q", "repo")
    with pytest.raises(StageError, match="e2e-adapter: no registered versions"):
        export.export("e2e-adapter@v9.9.9", tiny_base, shards / "shards", out, repo=tmp_path / "repo")
    assert not out.exists()


def test_a_failed_export_leaves_nothing_behind(lora, shards, tiny_base, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(export.TOLERANCE, torch.float32, -1.0)  # any difference is too large
    with pytest.raises(StageError, match="the lora checkpoint: logits differ .* nothing was written"):
        export.export(str(lora), tiny_base, shards / "shards", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a scratch directory


def test_a_registered_version_is_exported_from_its_commit(lora, shards, tiny_base, tmp_path,
                                                         monkeypatch):  # noqa: F811
    """artifact@version is fetched at its commit (stand-in: a directory tree per path), only
    the files export reads: the adapter, the shards' manifest, truncated.jsonl, one train shard."""
    from pipelines import lineage

    tree = tmp_path / "at-commit"
    shutil.copytree(lora, tree / export.ADAPTER)
    shutil.copytree(shards / "shards", tree / export.SHARDS)
    fetched = []

    def materialize(repo, commit, path, dest):
        fetched.append(path)
        (shutil.copytree if (tree / path).is_dir() else shutil.copy)(tree / path, dest)
        return dest

    monkeypatch.setattr(lineage, "resolve", lambda repo, spec: {"artifact": "e2e-adapter", "version": "v0.0.1",
                                                                "commit": "c0ffee" * 6 + "ab", "stages": ["prod"]})
    monkeypatch.setattr(lineage, "materialize", materialize)
    record = export.export("e2e-adapter@v0.0.1", tiny_base, tmp_path / "no-shards-here", tmp_path / "out")
    assert record["source"] == {"version": "e2e-adapter@v0.0.1", "artifact": "e2e-adapter",
                                "commit": "c0ffee" * 6 + "ab", "stages": ["prod"]}
    assert fetched == [export.ADAPTER, f"{export.SHARDS}/manifest.json", f"{export.SHARDS}/truncated.jsonl",
                       f"{export.SHARDS}/train/shard-00000.arrow"]
    assert record["kind"] == "merged_checkpoint" and (tmp_path / "out" / "model.safetensors").is_file()


def test_a_chat_few_shot_prompt_format_keeps_the_markup_and_the_demonstrations(tiny_base, tmp_path):
    from transformers import AutoTokenizer

    from pipelines import tokenize
    from pipelines.config import TokenizeConfig
    from tests.test_tokenize import MANY, write_clean

    chat = dataclasses.replace(E2E, chat_template=True)
    tokenize.run(TokenizeConfig(max_length=512, shard_rows=10, num_proc=1, few_shot=2), chat,
                 write_clean(tmp_path / "clean", MANY), tiny_base, tmp_path / "shards")
    tok = AutoTokenizer.from_pretrained(tiny_base)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    fmt = export.prompt_format(chat, tok, manifest, export._demos(tmp_path / "shards"),
                               {"id": "x", "source": "s", "target": "t"})
    assert fmt["chat_template"] is True and fmt["few_shot"] == 2 and "demonstrations" in fmt["note"]
    assert fmt["template"].count("<|im_start|>user\n") == 3  # two demonstrations, then the prompt
    assert fmt["template"].endswith("<|im_start|>user\nAttributes: {mr}\nDescription:<|im_end|>\n"
                                    "<|im_start|>assistant\n")
