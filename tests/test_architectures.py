"""Any causal LM: a Llama, Qwen2, Mistral or GPT-2 checkpoint directory works as
``base_model.source``. On a tiny random model of each architecture, every method trains
with the shipped recipe's settings, saves, reloads and decodes as it was trained, through
the engine that ``evaluate`` and the server share (GPT-2 keeps its own cache and absolute
positions; prefix tuning on it is the Prefix-Tuning paper's setting)."""
from __future__ import annotations

import pytest
import torch

from pipelines import base_model, scoring, tokenize, tune
from pipelines.config import BaseModelConfig, EvaluateConfig, TokenizeConfig
from serving.engine import Engine
from tests.conftest import build_tiny_model, liven
from tests.test_engine import PROMPTS, STEPS, alone, greedy, trained
from tests.test_tokenize import ROWS, write_clean
from tests.test_tune import E2E, tune_cfg

# Llama, the embedded default's, is the tiny model of every other test (test_tune, test_engine)
ARCHITECTURES = ["qwen2", "mistral", "gpt2"]
METHODS = ["prompt", "ptuning", "prefix", "lora", "full"]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request, tmp_path_factory):
    """(architecture, base model directory, shards directory): weights drawn wide enough that
    greedy decoding varies, so a lost prefix or a wrong position changes the answer."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp(request.param)
    checkpoint = liven(build_tiny_model(root / "checkpoint", arch=request.param))
    assert AutoConfig.from_pretrained(checkpoint).model_type == request.param
    base = root / "base"  # the checkpoint directory as base_model.source, through the stage
    stats = base_model.run(BaseModelConfig(source=str(checkpoint)), base)
    assert (stats.num_layers, stats.hidden_size) == (2, 32) and stats.probe_loss > 0
    tokenize.run(TokenizeConfig(max_length=64, shard_rows=100), E2E, write_clean(root / "clean", ROWS), base,
                 root / "shards")
    return request.param, base, root / "shards"


# the shipped inits that read the base model: prompt tuning from a text's embeddings,
# prefix tuning from a text's keys and values (its cache layout differs on GPT-2)
INITS = {"prompt": dict(prompt=dict(num_virtual_tokens=4, init="text", init_text="Describe the restaurant")),
         "prefix": dict(prefix=dict(num_virtual_tokens=4, encoder_hidden_size=16, init="text",
                                    init_text="table-to-text"))}


@pytest.mark.parametrize("method, init", [(m, None) for m in METHODS] + [(m, "text") for m in INITS])
def test_every_method_trains_saves_reloads_and_decodes_as_trained(arch, method, init, tmp_path):
    name, base, shards = arch
    cfg = tune_cfg(method, epochs=1, checkpoint_dir=str(tmp_path / "ckpt"), **(INITS[method] if init else {}))
    stats = tune.run(cfg, shards, base, tmp_path / "adapter", tmp_path / "live")
    assert stats.steps > 0 and stats.train_loss == stats.train_loss  # finite, not NaN
    engine = Engine(base, max_batch=8, device="cpu", dtype=torch.float32)
    engine.add(method, tmp_path / "adapter")
    ids = [engine.encode(p) for p in PROMPTS]
    answers = [alone(engine, greedy(method, p))[0] for p in ids]
    for p, answer in zip(ids, answers):  # the reference: PEFT's training forward, no cache, token by token
        assert list(answer.token_ids) == trained(base, {method: tmp_path / "adapter"}, method, p), name
    texts, _ = scoring.generate(engine, method, PROMPTS, EvaluateConfig(batch_size=8, max_new_tokens=STEPS))
    assert texts == [scoring.first_line(a.text) for a in answers]  # batched as evaluate batches: the same


def test_lora_targets_a_model_lacks_are_named_with_the_ones_it_has(arch, tmp_path):
    from pipelines.common import StageError

    name, base, shards = arch
    with pytest.raises(StageError, match=rf"tune.lora.targets: \('wq',\) on a {name} base model: .*its linear "
                                         r"layers are \[.*\] \(name some, or `auto`"):
        tune.run(tune_cfg("lora", lora=dict(r=2, alpha=4, targets=["wq"])), shards, base, tmp_path / "a",
                 tmp_path / "live")
    assert not (tmp_path / "a").exists()
