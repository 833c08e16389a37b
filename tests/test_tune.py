"""tune: every method trains and saves; the label-only loss equals the full one; a
SIGKILLed run resumes to the same adapter; two processes under torchrun train as one."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from pipelines import methods, tokenize, training, tune
from pipelines.common import StageError
from pipelines.config import PromptMethodConfig, TokenizeConfig, TuneConfig
from pipelines.shards import load_split
from pipelines.tasks import get_task
from tests.conftest import ROOT
from tests.test_tokenize import MANY, ROWS, write_clean

E2E = get_task("e2e", ROOT / "tasks")


def tune_cfg(method, **kw):
    base = dict(method=method, epochs=2, batch_size=2, learning_rate=1e-2, eval_examples=1, warmup_ratio=0.0,
                prompt=dict(num_virtual_tokens=4, init="random"),
                prefix=dict(num_virtual_tokens=4, encoder_hidden_size=16),
                ptuning=dict(num_virtual_tokens=4, encoder_hidden_size=16), lora=dict(r=2, alpha=4))
    return TuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_base):
    d = tmp_path_factory.mktemp("data")
    clean = write_clean(d / "clean", {**ROWS, "test": ROWS["train"]})
    tokenize.run(TokenizeConfig(max_length=64, shard_rows=100), E2E, clean, tiny_base, d / "shards")
    return d


@pytest.fixture(scope="module")
def six_shards(tmp_path_factory, tiny_base):
    """Six train rows of different lengths: batches to group, steps to checkpoint."""
    d = tmp_path_factory.mktemp("six")
    tokenize.run(TokenizeConfig(max_length=64, shard_rows=100), E2E, write_clean(d / "clean", MANY),
                 tiny_base, d / "shards")
    return d / "shards"


@pytest.mark.parametrize("method", ["prompt", "prefix", "ptuning", "lora", "full"])
def test_every_method_trains_saves_and_records_provenance(method, shards, tiny_base, tmp_path):
    before = sorted(p.relative_to(shards) for p in (shards / "shards").rglob("*"))
    stats = tune.run(tune_cfg(method, checkpoint_dir=str(tmp_path / "ckpt")), shards / "shards", tiny_base,
                     tmp_path / "adapter", tmp_path / "live")
    assert stats.steps == 4 and stats.train_loss == stats.train_loss  # finite, not NaN
    info = json.loads((tmp_path / "adapter" / "ptune_adapter.json").read_text())
    assert info["stats"]["trainable_parameters"] == stats.trainable_parameters > 0
    assert info["config"]["method"] == method
    assert info["data"]["manifest_sha256"] and info["data"]["train_shards"]
    ids = (tmp_path / "adapter" / "train_ids.txt").read_text().split()
    shard_ids = list(load_split(shards / "shards", "train")["id"])
    assert ids == sorted(shard_ids) and info["data"]["train_ids"]["count"] == len(ids)
    assert info["data"]["train_ids"]["epochs_drawn"] > 0
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert ("model.safetensors" if method == "full" else "adapter_model.safetensors") in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    if method == "full":
        assert stats.trainable_share == 1.0
    else:
        assert stats.trainable_share < 0.5
    assert stats.train_tokens_per_s > 0
    live = tmp_path / "live" / "plots" / "metrics"
    assert {"loss.tsv", "learning_rate.tsv", "tokens_per_s.tsv"} <= {p.name for p in live.iterdir()}
    assert (live / "eval" / "loss.tsv").is_file()
    assert sorted(p.relative_to(shards) for p in (shards / "shards").rglob("*")) == before  # read-only


def test_lora_learns_the_training_targets(shards, tiny_base, tmp_path):
    """The adapter alone (base weights frozen) must lower the loss on what it saw."""
    cfg = tune_cfg("lora", epochs=30, learning_rate=3e-2, eval_examples=0, lora=dict(r=8, alpha=16))
    tune.run(cfg, shards / "shards", tiny_base, tmp_path / "adapter", tmp_path / "live")
    rows = (tmp_path / "live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    losses = [float(r.split("\t")[-1]) for r in rows[1:]]
    assert len(losses) >= 4
    assert losses[-1] < losses[0] - 0.15, losses  # DVCLive's curve, as `dvc plots` shows it


def test_prompt_init_text_requires_text(tiny_base):
    cfg = tune_cfg("prompt", prompt=PromptMethodConfig(num_virtual_tokens=4, init="text"))
    with pytest.raises(StageError, match="init_text"):
        methods.build_peft_config(cfg, tiny_base)


def test_method_recipes_come_from_params_and_top_level_values_override_them():
    from pipelines.config import load_params

    tune_params = load_params(ROOT / "params.yaml").tune
    prefix = tune_params.model_copy(update={"method": "prefix"})
    assert prefix.recipe.learning_rate == tune_params.prefix.learning_rate and prefix.recipe.batch_size == 10
    assert prefix.model_copy(update={"learning_rate": 0.5}).recipe.learning_rate == 0.5
    lester = TuneConfig(**{**tune_params.model_dump(), "method": "prompt",
                           "prompt": {**tune_params.prompt.model_dump(), "optimizer": "adafactor",
                                      "learning_rate": 0.3}})
    args = training.training_arguments(lester, "unused", 10, False, "cpu", torch.float32)
    assert args.optim.value == "adafactor" and args.learning_rate == 0.3
    with pytest.raises(ValueError, match="tune.full.learning_rate"):
        TuneConfig(method="full", epochs=1, batch_size=2, full={"learning_rate": None})


def test_prefix_mlp_is_dropped_and_the_saved_prefix_reloads_and_generates(shards, tiny_base, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    stats = tune.run(tune_cfg("prefix", checkpoint_dir=str(tmp_path / "ckpt")), shards / "shards", tiny_base,
                     tmp_path / "adapter", tmp_path / "live")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"]  # the MLP's output, not the MLP
    # 4 virtual tokens x 2 layers x (key, value) x 2 KV heads x head dim 8
    assert saved["prompt_embeddings"].shape == (4, 2 * 2 * 2 * 8)
    assert stats.adapter_parameters == saved["prompt_embeddings"].numel() < stats.trainable_parameters
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "adapter")
    assert not any("transform" in n for n, _ in model.named_parameters())  # no MLP at inference
    out = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_prompt_label_init_puts_the_label_words_first(tiny_base):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           methods.build_peft_config(
                               tune_cfg("prompt", prompt=dict(num_virtual_tokens=4, init="labels")), tiny_base))
    methods.init_from_labels(model, tok, ["negative", "positive"])
    table = model.prompt_encoder["default"].embedding.weight
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(table[1], emb[tok(" positive", add_special_tokens=False).input_ids].mean(0))
    with pytest.raises(StageError, match="num_virtual_tokens"):
        methods.init_from_labels(model, tok, ["a", "b", "c", "d", "e"])


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_text_init_acts_as_if_the_text_were_written_before_the_input(projection, tiny_base):
    """Li & Liang's real-word init: before training, the prefix model's logits on x are the
    base model's on (text, x); the text's tokens are repeated to fill the virtual tokens."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    text = "name food"
    k = len(tok(text, add_special_tokens=False).input_ids)
    n = 2 * k + 1  # the text twice, then its first token
    cfg = tune_cfg("prefix", prefix=dict(num_virtual_tokens=n, projection=projection, encoder_hidden_size=16,
                                         init="text", init_text=text))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), methods.build_peft_config(cfg, tiny_base))
    prefix = lambda: model.prompt_encoder["default"](torch.arange(n)).detach().clone()  # noqa: E731
    before = prefix()
    info = methods.init_prefix_from_text(model, tok, text)
    assert len(info["token_ids"]) == n and info["token_ids"][:k] == info["token_ids"][k:2 * k]
    assert info["relative_error"] < 1e-6
    assert not torch.allclose(prefix(), before)
    model.eval()
    x = tok(" name[The Eagle] food[French]", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        prefixed = model(input_ids=x).logits[0]
        written = model.get_base_model()(input_ids=torch.cat([torch.tensor([info["token_ids"]]), x], 1)).logits[0, n:]
    torch.testing.assert_close(prefixed, written, atol=1e-4, rtol=1e-4)
    # a random prefix is not that: the test would notice an init that did nothing
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), methods.build_peft_config(cfg, tiny_base))
    with torch.no_grad():
        assert (fresh(input_ids=x).logits[0] - written).abs().max() > 1e-2


def test_prefix_text_init_is_recorded_with_the_adapter(shards, tiny_base, tmp_path):
    from safetensors.torch import load_file

    cfg = tune_cfg("prefix", checkpoint_dir=str(tmp_path / "ckpt"),
                   prefix=dict(num_virtual_tokens=4, encoder_hidden_size=16, init="text", init_text="name food"))
    tune.run(cfg, shards / "shards", tiny_base, tmp_path / "adapter", tmp_path / "live")
    info = json.loads((tmp_path / "adapter" / "ptune_adapter.json").read_text())["prefix_init"]
    assert info["text"] == "name food" and len(info["tokens"]) == 4 and info["relative_error"] < 1e-6
    assert load_file(tmp_path / "adapter" / "adapter_model.safetensors")["prompt_embeddings"].shape == (4, 64)
    with pytest.raises(ValueError, match="init_text"):
        tune_cfg("prefix", prefix=dict(init="text"))


@pytest.mark.parametrize("method", ["prompt", "prefix", "ptuning", "lora", "full"])
def test_label_only_loss_and_gradients_equal_the_full_logits_ones(method, tiny_base, tmp_path):
    """The LM head at label positions only is an optimization, not a change of the math."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_config = methods.build_peft_config(tune_cfg(method), tiny_base)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    model.eval()  # no dropout: both forward passes see the same network
    batch = training.PadCollator(0)([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
                                 {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]}])
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = training.make_trainer(model, args, None, None, training.PadCollator(0), None)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    # prompt and P-tuning take the shared-prompt path (virtual tokens computed once per batch)
    assert (training._shared_prompt_base(model) is not None) == (method in ("prompt", "ptuning"))
    reference = model(**{k: v for k, v in batch.items() if k != "n_tokens"}).loss
    ours = trainer.compute_loss(model, batch)
    assert ours.item() == pytest.approx(reference.item(), abs=1e-5)
    for a, b in zip(grads(ours), grads(model(**{k: v for k, v in batch.items() if k != "n_tokens"}).loss)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert "labels" in batch  # the caller's batch is not consumed


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix", "ptuning", "full"])  # prompt: its shared-prompt
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "auto"])  # forward bypasses the Trainer's wrapper
def test_precision_is_the_dtype_each_training_step_computes_in(precision, method, shards, tiny_base, tmp_path,
                                                                monkeypatch):
    """Autocast on CPU too: bf16 matmuls where asked, or under auto where the CPU has them in
    hardware (decided here both ways). Then a frozen base holds bf16 weights (no cast per
    forward, half the memory); what trains, the optimizer's master weights and the saved
    adapter stay fp32, and full fine-tuning keeps every weight fp32."""
    from pipelines import device

    hardware = precision == "auto" and device.cpu_computes_bf16()
    want = torch.bfloat16 if precision == "bfloat16" or hardware else torch.float32
    frozen = torch.bfloat16 if want == torch.bfloat16 and method != "full" else torch.float32
    seen: set[torch.dtype] = set()
    weights: dict[bool, set[torch.dtype]] = {True: set(), False: set()}
    make = tune.make_trainer

    def watching(model, *args, **kw):
        q = next(m for n, m in model.named_modules() if n.endswith("self_attn.q_proj"))
        q.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype) if torch.is_grad_enabled() else None)
        for p in model.parameters():
            weights[p.requires_grad].add(p.dtype)
        return make(model, *args, **kw)

    monkeypatch.setattr(tune, "make_trainer", watching)
    stats = tune.run(tune_cfg(method, precision=precision, checkpoint_dir=str(tmp_path / "ckpt")),
                     shards / "shards", tiny_base, tmp_path / "adapter", tmp_path / "live")
    assert seen == {want} and stats.dtype == str(want).removeprefix("torch.")
    assert weights[True] == {torch.float32} and stats.base_dtype == str(frozen).removeprefix("torch.")
    assert weights[False] == ({frozen} if method != "full" else set())
    from safetensors.torch import load_file
    saved = "adapter_model.safetensors" if method != "full" else "model.safetensors"
    assert {t.dtype for t in load_file(tmp_path / "adapter" / saved).values()} == {torch.float32}
    monkeypatch.setattr(device, "cpu_computes_bf16", lambda: not hardware)  # the other kind of CPU
    assert device.training_dtype("auto", "cpu") == (torch.float32 if hardware else torch.bfloat16)


def test_length_grouped_batches_cover_every_example_once_per_epoch_in_a_seeded_order():
    lengths = [3, 40, 7, 41, 5, 39, 8, 6, 42, 4, 38, 9]
    sampler = training.LengthGroupedSampler(lengths, batch_size=3, seed=0)
    first = list(sampler)
    assert sorted(first) == list(range(len(lengths)))
    assert list(training.LengthGroupedSampler(lengths, batch_size=3, seed=0)) == first  # a resumed run's order
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(len(lengths))) and list(sampler) != first


def _padding(lengths, order, batch):
    return sum(max(lengths[i] for i in order[k:k + batch]) * len(order[k:k + batch]) - sum(
        lengths[i] for i in order[k:k + batch]) for k in range(0, len(order), batch))


def test_length_grouping_cuts_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 60, (400,), generator=g).tolist()
    grouped = _padding(lengths, list(training.LengthGroupedSampler(lengths, 8, seed=0)), 8)
    shuffled = _padding(lengths, torch.randperm(400, generator=g).tolist(), 8)
    assert grouped < shuffled / 3


CHILD = textwrap.dedent("""
    import json, logging, sys, time
    from pathlib import Path
    from pipelines import training, tune
    from pipelines.config import TuneConfig
    logging.basicConfig(level=logging.INFO)
    shards, base, out, cfg_json, sleep = sys.argv[1:6]
    if float(sleep):
        inner = training.PadCollator.__call__
        def slow(self, features):
            time.sleep(float(sleep))  # a slow step, so a checkpoint exists before the run ends
            return inner(self, features)
        training.PadCollator.__call__ = slow
    stats = tune.run(TuneConfig.model_validate_json(cfg_json), Path(shards), Path(base), Path(out),
                     Path(out).with_name(Path(out).name + "-live"))
    print("STATS" + json.dumps(stats.__dict__))
""")


def _child(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _adapter(path):
    from safetensors.torch import load_file
    return load_file(path / "adapter_model.safetensors")


@pytest.mark.parametrize("method", ["prefix", "lora"])
def test_load_best_ends_on_the_lowest_eval_loss_and_early_stopping_stops(method, six_shards, tiny_base, tmp_path):
    """A learning rate too high makes the eval loss wander: the adapter kept must be
    the one of the lowest eval loss (its own eval loss equal to that minimum), and
    patience 1 stops training after the first evaluation without a new best."""
    cfg = tune_cfg(method, epochs=8, batch_size=2, learning_rate={"prefix": 0.1, "lora": 0.3}[method],
                   eval_examples=2, load_best=True,
                   checkpoint_dir=str(tmp_path / "ckpt"))
    stats = tune.run(cfg, six_shards, tiny_base, tmp_path / "adapter", tmp_path / "live")
    rows = (tmp_path / "live" / "plots" / "metrics" / "eval" / "loss.tsv").read_text().splitlines()[1:]
    curve = [float(r.split("\t")[1]) for r in rows][:-1]  # one per epoch (3 steps); the last row: evaluate() after
    assert len(curve) == 8 and min(curve) < curve[-1] - 1e-3, curve  # the best is not the last
    best = curve.index(min(curve))
    assert stats.best_step == 3 * (best + 1) and stats.steps == 24
    assert stats.eval_loss == pytest.approx(curve[best], abs=1e-3)  # the weights kept are the best ones
    assert float(rows[-1].split("\t")[1]) == pytest.approx(curve[best], abs=1e-4)
    assert json.loads((tmp_path / "adapter" / "ptune_adapter.json").read_text())["stats"]["best_step"] == stats.best_step

    stopped = tune.run(cfg.model_copy(update={"early_stopping_patience": 1, "checkpoint_dir": str(tmp_path / "c2")}),
                       six_shards, tiny_base, tmp_path / "adapter2", tmp_path / "live2")
    first_worse = next(i for i in range(1, 8) if curve[i] >= min(curve[:i]))
    assert stopped.steps == 3 * (first_worse + 1)  # the same run up to there, stopped at its first miss
    with pytest.raises(ValueError, match="load_best"):
        tune_cfg(method, early_stopping_patience=2)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "prefix", "ptuning"])
def test_a_sigkilled_run_resumes_from_its_checkpoint_to_the_same_adapter(method, six_shards, tiny_base, tmp_path):
    # lora: with dropout, so the RNG state must resume too; prefix and P-tuning: the saved
    # adapter is their encoder's output, so the checkpoint must carry the encoder (EncoderCheckpoints)
    cfg = tune_cfg(method, epochs=4, batch_size=2, save_steps=3, lora=dict(r=2, alpha=4, dropout=0.1), eval_examples=0,
                   checkpoint_dir=str(tmp_path / "ckpt"))
    args = [six_shards, tiny_base, tmp_path / "killed", cfg.model_dump_json(), 0.4]
    proc = _child(args)
    deadline = time.time() + 120
    while not list((tmp_path / "ckpt").glob("*/checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.1)
    time.sleep(0.6)  # into the next steps
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed").exists()
    done = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "ckpt").glob("*/checkpoint-*"))
    assert done and done[-1] < 12

    resumed = _child(args[:-1] + [0])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming from" in err
    assert not list((tmp_path / "ckpt").glob("*/checkpoint-*"))  # removed once the adapter is written

    whole = _child([six_shards, tiny_base, tmp_path / "whole",
                    cfg.model_copy(update={"checkpoint_dir": str(tmp_path / "ckpt2")}).model_dump_json(), 0])
    out2, err2 = whole.communicate(timeout=300)
    assert whole.returncode == 0, err2
    a, b = _adapter(tmp_path / "killed"), _adapter(tmp_path / "whole")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert json.loads(out.split("STATS")[1])["steps"] == json.loads(out2.split("STATS")[1])["steps"] == 12


def test_changed_params_never_resume_a_stale_checkpoint():
    cfg = tune_cfg("lora")
    key = training.run_key(cfg, "m" * 64, "b" * 64)
    assert key == training.run_key(cfg.model_copy(update={"checkpoint_dir": "elsewhere"}), "m" * 64, "b" * 64)
    assert key != training.run_key(cfg.model_copy(update={"learning_rate": 0.5}), "m" * 64, "b" * 64)
    assert key != training.run_key(cfg, "n" * 64, "b" * 64)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_one_adapter(six_shards, tiny_base, tmp_path):
    cfg = tune_cfg("lora", epochs=2, batch_size=1, eval_examples=1, checkpoint_dir=str(tmp_path / "ckpt"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    done = subprocess.run([*torchrun, str(script), six_shards, tiny_base, tmp_path / "adapter",
                           cfg.model_dump_json(), "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = [json.loads(line[5:]) for line in done.stdout.splitlines() if line.startswith("STATS")]
    assert len(stats) == 2 and {s["world_size"] for s in stats} == {2}
    assert {s["steps"] for s in stats} == {6}  # 6 rows / (1 per process x 2 processes) x 2 epochs
    info = json.loads((tmp_path / "adapter" / "ptune_adapter.json").read_text())
    assert info["stats"]["world_size"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter")] == []  # one adapter, no leftovers
