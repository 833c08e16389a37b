"""Shared fixtures: a tiny random Llama and a tokenizer trained on literal text, built
from configs in seconds (no downloads), laid out as the base_model stage lays it out."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]

CORPUS = [
    "name[Alimentum], area[city centre], familyFriendly[no]",
    "There is a place in the city centre, Alimentum, that is not family-friendly.",
    "name[Aromi], eatType[coffee shop], food[Chinese], customer rating[5 out of 5]",
    "Aromi is a Chinese coffee shop in the city centre with a rating of 5 out of 5.",
    "Attributes: Description: Review: Sentiment: positive negative",
    "it 's a charming and often affecting journey . unflinchingly bleak and desperate",
    "Write one fluent sentence that describes a restaurant. Is the sentiment positive?",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_model(out: Path, vocab_slack: int = 0, seed: int = 0, context: int = 256, arch: str = "llama") -> Path:
    """A 2-layer causal LM (~100k parameters) and a byte-level BPE tokenizer, saved to ``out``.

    ``arch``: llama (the default), qwen2, mistral or gpt2, the architectures ``base_model.source``
    is tested with. ``vocab_slack`` < 0 gives the model fewer embedding rows than the tokenizer
    has tokens: a mismatched base model, for tests of the shard validation. ``context``: its
    maximum positions (a few-shot E2E prompt in its 400-token vocabulary is ~350 tokens).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig,
                              PreTrainedTokenizerFast, Qwen2Config)

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    ids = dict(vocab_size=len(tok) + vocab_slack, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=context, **ids)
    else:
        config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
        cfg = config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=context, **ids)
    model = AutoModelForCausalLM.from_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "ptune_base.json").write_text(json.dumps({
        "source": "tests/conftest.py:build_tiny_model", "source_sha256": None,
        "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": cfg.vocab_size,
        "hidden_size": 32, "num_layers": 2, "probe_loss": 6.0}))
    return out


def liven(checkpoint: Path) -> Path:
    """Redraw a tiny model's matrices wide enough (N(0, 0.3)) that greedy decoding varies (the
    default init repeats one token), so that a wrong position or a lost prefix changes the answer."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(checkpoint)
    return checkpoint


@pytest.fixture(scope="session", autouse=True)
def gx_project(tmp_path_factory) -> Path:
    """A copy of the GX project (gx/, as git has it) that this session's in-process
    validations use: their results and Data Docs pages go there, not into the checkout's
    gx/uncommitted/, which holds the pipeline's own (`make docs`)."""
    from pipelines import validation

    root = tmp_path_factory.mktemp("gx-project")
    shutil.copytree(validation.GX_DIR, root / "gx", ignore=shutil.ignore_patterns("uncommitted", "__pycache__"))
    (root / "plots").mkdir()
    shutil.copy2(ROOT / "plots" / "offline.html", root / "plots" / "offline.html")  # the vega builds the pages load
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validation, "PROJECT_ROOT", root)
        mp.setattr(validation, "GX_DIR", root / "gx")
        yield root


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tok(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def git(repo: Path, *args: str) -> str:
    """``git *args`` in ``repo`` as a fixed identity -> its stdout; a failure raises with git's output."""
    proc = subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc.stdout


def write_params(project: Path, params: dict, header: str = "") -> Path:
    """``project``/params.yaml from ``params``, with the shipped task declarations beside it in tasks/."""
    import yaml

    project.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "tasks", project / "tasks", dirs_exist_ok=True)
    path = project / "params.yaml"
    path.write_text(header + yaml.safe_dump(params, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REAL_SLIVER = {  # the embedded default on a sliver of E2E: every stage, in minutes on 2 cores
    "collect.max_records_per_source": 400,
    "tune.max_train_examples": 48,
    "tune.eval_examples": 8,
    "evaluate.max_rows": 8,
    "evaluate.max_new_tokens": 32,
    "register.min_margin_over_zero_shot": 0.0,
}


@pytest.fixture(scope="session")
def real_sliver(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M (from its PyPI wheel) through `dvc repro` on a sliver of
    E2E, then `ptune register`: built once per session for the slow tests that need the real
    model (the pipeline, the engine's mixed batches, the served registered adapter)."""
    from tests.pipeline_project import make_project, run

    project = make_project(tmp_path_factory.mktemp("real"), REAL_SLIVER)
    run(project, "dvc", "repro", timeout=1200)
    run(project, "ptune", "register")
    return project
