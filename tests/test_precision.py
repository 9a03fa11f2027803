"""Mixed precision (``--precision bf16``): what runs in bf16, what stays fp32, and the choice.

runner/model/split.py ``autocast``: forwards of a bf16 segment run their matmuls in bf16, while the
boundary activations (what crosses the wire), the LoRA weights and their gradients stay
fp32; split bf16 equals unsplit bf16 exactly as split fp32 equals unsplit fp32 (the same ops
in the same order). testbed/precision.py: ``auto`` picks bf16 only where the hardware has
bf16 arithmetic (CPU flags read from a cpuinfo file the test writes).
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from runner.config import TrainConfig
from runner.errors import ConfigError, UserError
from runner.model import lora, models, split
from testbed import precision as P
from tests.test_split import _batch


def _adapted(seg, ranks):
    lora.attach_lora(seg, ranks, alpha=32, dropout=0.0, seed=3)
    with torch.no_grad():
        for key, p in lora.adapter_state(seg.model).items():
            if key.endswith("lora_B"):
                p.copy_(torch.full(p.shape, 0.05))
    return seg


def test_bf16_segment_runs_matmuls_in_bf16_and_keeps_the_wire_fp32():
    info = models.model_info("tiny-llama")
    ids, mask, labels = _batch(models.load_tokenizer(info.path))
    k, L = 1, info.num_layers
    client = _adapted(split.load_client(info.path, k, "bf16"), {})
    seen: list[torch.dtype] = []
    proj = split.parts(client.model).layers[0].self_attn.q_proj
    proj.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    acts = split.client_forward(client, ids, mask)
    assert seen == [torch.bfloat16]
    assert acts.dtype == torch.float32  # the residual stream (and the wire) stays fp32

    ranks = {n: 4 for n in lora.all_candidates(client.config)}
    losses = {}
    for precision in ("fp32", "bf16"):
        full = _adapted(split.load_unsplit(info.path, precision), ranks)
        s, n = split.token_loss(split.full_forward(full, ids, mask), labels)
        (s / n).backward()
        grads = {key: p.grad for key, p in lora.adapter_state(full.model).items()}
        assert all(g.dtype == torch.float32 for g in grads.values())
        losses[precision] = float(s / n)
        if precision == "bf16":
            # split bf16 == unsplit bf16: client and server run the same ops in the same order
            c = _adapted(split.load_client(info.path, k, "bf16"), ranks)
            srv = _adapted(split.load_server(info.path, k, L, "bf16"), ranks)
            wire = split.client_forward(c, ids, mask).detach().requires_grad_(True)
            ss, sn = split.token_loss(split.server_forward(srv, wire, mask, k), labels)
            assert float(ss / sn) == pytest.approx(losses["bf16"], abs=1e-5)
    # bf16 moves the loss a little, not a lot (it is not fp32 either)
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_precision_choice(tmp_path, monkeypatch):
    amx = tmp_path / "amx"
    amx.write_text("processor : 0\nflags\t\t: fpu sse2 avx512f amx_bf16 avx512_bf16 amx_tile\n")
    plain = tmp_path / "plain"
    plain.write_text("processor : 0\nflags\t\t: fpu sse2 avx2\n")
    monkeypatch.setattr(P, "cuda_bf16", lambda d: False)  # no GPU here; stated, not faked away
    assert P.cpu_bf16_flags(amx) == ["amx_bf16", "avx512_bf16"]
    assert P.resolve("auto", amx)[0] == "bf16"
    assert "amx_bf16" in P.resolve("auto", amx)[1]
    assert P.resolve("auto", plain)[0] == "fp32"
    assert P.resolve("bf16", plain) == ("bf16", P.resolve("bf16", plain)[1])
    assert "slower" in P.resolve("bf16", plain)[1]
    assert P.resolve("fp32", amx)[0] == "fp32"
    assert P.cpu_bf16_flags(tmp_path / "missing") == []
    # fp16 (autocast with a loss scaler, for GPUs without bf16: tests/test_device.py) is a
    # choice of its own; anything else is refused
    with pytest.raises(UserError, match="--precision must be one of fp32, bf16, fp16, auto"):
        P.resolve("fp8", amx)
    with pytest.raises(ConfigError, match="--precision"):
        TrainConfig(precision="fp8").validate()


def test_train_records_bf16_and_learns(tmp_path):
    from testbed.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--model", "tiny-llama", "--data", "synthetic", "--clients", "2",
        "--steps", "4", "--batch-size", "2", "--eval-every", "2", "--eval-max-examples", "8",
        "--precision", "bf16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "precision: bf16" in result.output
    cfg = json.loads((out / "config.json").read_text())["train"]
    assert cfg["precision"] == "bf16"
    bad = CliRunner().invoke(app, ["train", "--precision", "half", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2
    assert "--precision must be one of" in bad.output


def test_bf16_batches_padded_to_a_multiple_keep_the_loss():
    """bf16 batches are padded to a multiple of 16 tokens (runner/dataset/data.py
    ``BF16_LENGTH_MULTIPLE``: a few matrix shapes, so oneDNN's per-shape state stops growing
    a client's memory); the padding is masked and labelled -100, so the loss is the same
    sum over the same target tokens."""
    info = models.model_info("tiny-llama")
    tok = models.load_tokenizer(info.path)
    from runner.dataset import data as D

    assert D.length_multiple("bf16") == 16 and D.length_multiple("fp32") == 1
    examples = [D.encode_example(tok, "name[The Eagle], eatType[coffee shop]",
                                 "The Eagle is a coffee shop.", 512),
                D.encode_example(tok, "name[Zizzi]", "Zizzi.", 512)]
    plain = D.collate(examples, tok.pad_token_id)
    padded = D.collate(examples, tok.pad_token_id, D.length_multiple("bf16"))
    assert plain["input_ids"].shape[1] % 16 != 0  # the test pads something
    assert padded["input_ids"].shape[1] % 16 == 0
    assert padded["input_ids"].shape[1] - plain["input_ids"].shape[1] < 16
    width = plain["input_ids"].shape[1]
    for key in plain:
        assert torch.equal(padded[key][:, :width], plain[key])
    assert int(padded["attention_mask"][:, width:].sum()) == 0
    assert bool((padded["labels"][:, width:] == -100).all())
    stream = D.ClientBatches(examples, batch_size=2, pad_id=tok.pad_token_id, seed=0,
                             multiple=16)
    assert stream.next()["input_ids"].shape[1] % 16 == 0

    full = _adapted(split.load_unsplit(info.path, "bf16"), {})
    losses = []
    for batch in (plain, padded):
        s, n = split.token_loss(split.full_forward(full, batch["input_ids"],
                                                   batch["attention_mask"]), batch["labels"])
        losses.append((float(s / n), int(n)))
    assert losses[0][1] == losses[1][1]  # the same target tokens
    assert losses[1][0] == pytest.approx(losses[0][0], abs=2e-2)  # bf16 rounding only
