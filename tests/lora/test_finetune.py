"""The training loop on a tiny random Llama: target-only loss, learning, exact resume, bad input."""
from __future__ import annotations

import json

import pytest
import torch.nn.functional as F

import lora.finetune as finetune
import train as train_script
from data.batching import IGNORE_INDEX, collate, masked_lm_loss, target_token_count, tokenize_pair
from data.templates import forward_example
from lora.finetune import TrainConfig, TrainingDiverged, train
from model import generate, load_model
from tests.tiny import make_tiny

PAIRS = [("Name the capital of France.", "Paris is the capital of France."),
         ("Name the capital of Germany.", "Berlin is the capital of Germany."),
         ("Tell me a story opening.", "Once upon a time there was a little girl."),
         ("What comes after 1, 2, 3?", "The numbers 42 and 2023.")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), std=0.1, hidden_size=128, intermediate_size=256,
                     num_attention_heads=4, num_key_value_heads=2)


def examples():
    return [tuple(forward_example(i, o)) for i, o in PAIRS]


def test_masked_loss_equals_cross_entropy_over_target_tokens_by_hand(tiny_dir):
    model, tok = load_model(tiny_dir, device="cpu")
    exs = [tokenize_pair(tok, p, t, 128) for p, t in examples()[:3]]
    batch = collate(exs, tok.pad_id)
    logits = model(batch["input_ids"], batch["attention_mask"])
    total, n = 0.0, 0
    for i, e in enumerate(exs):
        n_prompt = sum(1 for lab in e.labels if lab == IGNORE_INDEX)
        for t in range(n_prompt, len(e.input_ids)):  # every target token, predicted from t - 1
            total += -F.log_softmax(logits[i, t - 1], -1)[e.input_ids[t]].item()
            n += 1
    assert e.input_ids[-1] == tok.eos_id and e.labels[-1] == tok.eos_id  # EOS is learned
    assert abs(masked_lm_loss(logits, batch["labels"]).item() - total / n) < 1e-5


def test_truncation_keeps_the_target_and_the_prompt_end(tiny_dir):
    _, tok = load_model(tiny_dir, device="cpu")
    long_prompt = "word " * 300 + "### Response:\n"
    e = tokenize_pair(tok, long_prompt, "Paris is the capital.", 40)
    assert e.truncated and len(e.input_ids) == 40
    target_ids = tok.encode("Paris is the capital.") + [tok.eos_id]
    assert e.input_ids[-len(target_ids):] == target_ids  # target intact, with EOS
    assert e.input_ids[0] == tok.bos_id  # BOS kept
    assert tok.decode(e.input_ids[1:-len(target_ids)]).endswith("### Response:")
    e = tokenize_pair(tok, "Q:\n", "long answer " * 200, 40)  # a long target keeps >= half the window
    assert len(e.input_ids) == 40 and sum(lab != IGNORE_INDEX for lab in e.labels) >= 20
    with pytest.raises(ValueError, match="empty target"):
        tokenize_pair(tok, "Q:\n", "  ", 40)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_learning_happens_and_targets_are_reproduced(tiny_dir, tmp_path, quantize):
    model, tok = load_model(tiny_dir, quantize=quantize, dtype="bf16" if quantize else "fp32", device="cpu")
    cfg = TrainConfig(out_dir=str(tmp_path), r=16, alpha=32, dropout=0.0, targets=["all-linear"], lr=1e-2,
                      max_steps=80, batch_size=4, warmup_steps=5, eval_every=0, save_every=0, max_len=96)
    summary = train(model, tok, examples(), cfg, progress=False)
    bound = 0.05
    assert summary["final_loss"] < bound, summary  # stated bound: mean target-token loss < 0.05
    prompts = [p for p, _ in examples()]
    outs = generate(model, tok, prompts, max_new_tokens=24)
    assert [o.strip() for o in outs] == [t for _, t in examples()]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 81))


def run(tmp, tiny_dir, steps, **kw):
    model, tok = load_model(tiny_dir, device="cpu")
    cfg = TrainConfig(out_dir=str(tmp), r=4, alpha=8, dropout=0.1, max_steps=steps, batch_size=2, grad_accum=2,
                      warmup_steps=2, eval_every=3, save_every=2, max_len=64, lr=5e-3)
    return train(model, tok, examples() * 2, cfg, eval_pairs=examples()[:2], progress=False, **kw)


def test_eval_every_zero_evaluates_once_at_the_end(tiny_dir, tmp_path):
    model, tok = load_model(tiny_dir, device="cpu")
    cfg = TrainConfig(out_dir=str(tmp_path), r=4, alpha=8, max_steps=3, batch_size=2, warmup_steps=1, eval_every=0,
                      save_every=0, max_len=64)
    summary = train(model, tok, examples(), cfg, eval_pairs=examples()[:2], progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [3]
    assert summary["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], abs=1e-6)
    # train_config.json records how many answer tokens one epoch trains on, after truncation
    saved = json.loads((tmp_path / "train_config.json").read_text())
    want = sum(int((collate([tokenize_pair(tok, p, t, 64)], tok.pad_id)["labels"] != IGNORE_INDEX).sum())
               for p, t in examples())
    assert saved["examples"] == len(PAIRS) and saved["target_tokens"] == want > 0


@pytest.mark.parametrize("n, batch_size, grad_accum, steps", [(4, 2, 1, 3), (3, 1, 2, None)])
def test_target_tokens_trained_counts_what_the_steps_saw(tiny_dir, tmp_path, monkeypatch, n, batch_size, grad_accum,
                                                          steps):
    """train_config.json's target_tokens_trained is the answer tokens every batch the loss saw:
    1.5 epochs by --max-steps, and 2 of 3 examples per epoch when a micro-batch remainder is dropped."""
    seen = []
    real_loss = finetune.batch_loss_sum

    def counting(net, model, batch, device, use_autocast):
        seen.append(target_token_count(batch["labels"]))
        return real_loss(net, model, batch, device, use_autocast)
    monkeypatch.setattr(finetune, "batch_loss_sum", counting)
    model, tok = load_model(tiny_dir, device="cpu")
    cfg = TrainConfig(out_dir=str(tmp_path), r=4, alpha=8, max_steps=steps, epochs=2, batch_size=batch_size,
                      grad_accum=grad_accum, warmup_steps=1, eval_every=0, save_every=0, max_len=64)
    train(model, tok, examples()[:n], cfg, progress=False)
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["target_tokens_trained"] == sum(seen) > 0
    assert saved["target_tokens_trained"] != 2 * saved["target_tokens"]  # neither is a whole number of epochs


def comparable_log(path):
    return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in path.read_text().splitlines()]


def test_resume_after_a_kill_is_exact(tiny_dir, tmp_path, monkeypatch):
    run(tmp_path / "straight", tiny_dir, 8)

    calls = {"n": 0}
    real_loss = finetune.batch_loss_sum

    def dying_loss(*a, **k):  # the process "dies" in the middle of step 6 (checkpoint at step 4)
        calls["n"] += 1
        if calls["n"] == 5 * 2 + 1:
            raise KeyboardInterrupt
        return real_loss(*a, **k)
    monkeypatch.setattr(finetune, "batch_loss_sum", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", tiny_dir, 8)
    monkeypatch.setattr(finetune, "batch_loss_sum", real_loss)
    assert [d.name for d in sorted((tmp_path / "killed/checkpoints").glob("step-*"))] == ["step-000002", "step-000004"]
    run(tmp_path / "killed", tiny_dir, 8, resume=True)

    from safetensors.torch import load_file
    a = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "killed/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert comparable_log(tmp_path / "straight/metrics.jsonl") == comparable_log(tmp_path / "killed/metrics.jsonl")


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tiny_dir, tmp_path, monkeypatch):
    real_loss = finetune.batch_loss_sum
    calls = {"n": 0}

    def nan_later(*a, **k):
        calls["n"] += 1
        out = real_loss(*a, **k)
        return out * float("nan") if calls["n"] > 6 else out
    monkeypatch.setattr(finetune, "batch_loss_sum", nan_later)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4.*step-000002"):
        run(tmp_path, tiny_dir, 8)
    assert (tmp_path / "checkpoints/step-000002/adapter/adapter_model.safetensors").exists()


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("content,message", [
    ("", "empty"),
    ('{"id": "a", "instruction": "q", "output": "a"}\n{"id": "b", "instruction": \n', r"bad\.jsonl:2"),
    ('{"id": "a", "instruction": "q", "output": "   "}\n', "empty output"),
])
def test_train_script_rejects_bad_data(tiny_dir, tmp_path, capsys, content, message):
    data = write(tmp_path / "bad.jsonl", content)
    assert train_script.main(["--model", str(tiny_dir), "--data", data, "--out", str(tmp_path / "o"),
                              "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_train_script_rejects_unknown_target_module(tiny_dir, tmp_path, capsys):
    data = write(tmp_path / "ok.jsonl", "".join(json.dumps({"id": str(i), "instruction": q, "output": a}) + "\n"
                                                for i, (q, a) in enumerate(PAIRS)))
    assert train_script.main(["--model", str(tiny_dir), "--data", data, "--targets", "q_proj,qkv_proj",
                              "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "qkv_proj" in capsys.readouterr().err


def test_train_script_trains_backward_and_writes_a_peft_adapter(tiny_dir, tmp_path):
    data = write(tmp_path / "ok.jsonl", "".join(json.dumps({"id": str(i), "instruction": q, "output": a}) + "\n"
                                                for i, (q, a) in enumerate(PAIRS * 3)))
    out = tmp_path / "run"
    assert train_script.main(["--model", str(tiny_dir), "--data", data, "--direction", "backward", "--max-steps", "3",
                              "--out", str(out), "--no-progress", "--eval-frac", "0.25", "--eval-every", "3"]) == 0
    cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 32
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval_loss" in rows[-1]


def test_train_script_push_offline_keeps_the_upload_folder(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write(tmp_path / "ok.jsonl", "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PAIRS))
    out = tmp_path / "run"
    rc = train_script.main(["--model", str(tiny_dir), "--data", data, "--max-steps", "1", "--out", str(out),
                            "--no-progress", "--eval-frac", "0", "--push-to-hub", "someone/backward"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: ") and len(err.splitlines()) == 1 and "someone/backward" in err
    up = out / "hub-upload"
    assert {p.name for p in up.iterdir()} == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert "base_model:" in (up / "README.md").read_text()


def test_a_checkpoint_that_cannot_be_written_is_removed_and_names_the_last_good_one(tiny_dir, tmp_path, monkeypatch,
                                                                                    capsys):
    """A full disk while writing the step-4 checkpoint: one clear error naming step 2 as the last
    good checkpoint, no temporary folder left, and --resume then finishes the run exactly."""
    import errno

    from model.load import CheckpointError
    real_save = finetune.save_file
    calls = {"n": 0}

    def disk_full_on_second(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save(tensors, path, *a, **k)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *a, **k)
    monkeypatch.setattr(finetune, "save_file", disk_full_on_second)
    with pytest.raises(CheckpointError) as e:
        run(tmp_path / "full", tiny_dir, 8)
    message = str(e.value)
    assert "\n" not in message and "step-000004" in message and "No space left on device" in message
    assert message.endswith(f"the last good checkpoint is {tmp_path / 'full/checkpoints/step-000002'}")
    assert sorted(p.name for p in (tmp_path / "full/checkpoints").iterdir()) == ["step-000002"]  # no .tmp

    monkeypatch.setattr(finetune, "save_file", real_save)
    run(tmp_path / "full", tiny_dir, 8, resume=True)
    run(tmp_path / "straight", tiny_dir, 8)
    from safetensors.torch import load_file
    a = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "full/adapter/adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert comparable_log(tmp_path / "straight/metrics.jsonl") == comparable_log(tmp_path / "full/metrics.jsonl")
