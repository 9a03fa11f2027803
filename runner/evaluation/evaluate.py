"""Evaluation of a finished run: beam-search generation on the test split and E2E metrics.

The run's final model is rebuilt the standard way (base model + ``PeftModel.from_pretrained``
on the saved PEFT adapter, or the saved full weights for ``ft``), so evaluation also checks
that what a run saves is usable outside the testbed. Decoding follows docs/method.md
"Defaults": beam 10, length penalty 0.8, no repeated 4-grams.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runner import device as placement
from runner.config import TrainConfig
from runner.dataset import data as data_mod
from runner.dataset import splits
from runner.errors import UserError
from runner.evaluation import scoring, slots
from runner.evaluation.beam import BeamSettings, beam_search_batches, unsupported
from runner.methods import registry
from runner.model import lora
from runner.model.models import load_full_model, load_tokenizer, model_info
from runner.rundir import RunDir

#: The decoders `testbed eval --decoder` can run (DecodeConfig.decoder).
DECODERS = ("beam", "hf")


@dataclass
class DecodeConfig:
    """Beam search as docs/method.md "Defaults" sets it, and how MRs are batched.

    ``batch_size`` and ``sort_by_length`` only change speed: outputs come back in input
    order, and bench/generation.py measured them byte-identical to the batches of 4 in MR
    order used before (16 of 16 dev-set MRs with SmolLM2, for batches of 8, 8 sorted and 16
    sorted; tests/test_generation.py checks the default). Batches of 16 sorted by prompt
    length decode 1.21x as many MRs per CPU-second as batches of 4 on one thread, and ran
    1.45x as fast as batches of 4 on two (docs/benchmarks.md).
    """

    num_beams: int = 10
    length_penalty: float = 0.8
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64
    batch_size: int = 16
    #: Batch MRs of similar prompt length together (less left padding to compute).
    sort_by_length: bool = True
    #: ``"beam"``: our beam search (runner/evaluation/beam.py): outputs byte-identical to
    #: generate()'s, 2.4x as many MRs per CPU-second on a trained run's model and 1.8x on
    #: the pretrained one (docs/benchmarks.md); ``"hf"``: Hugging Face ``generate()``, the
    #: reference it is checked against. What beam.py does not cover (one beam, other model
    #: families, bfloat16, a GPU: beam.unsupported) runs generate() either way.
    decoder: str = "beam"

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise UserError(f"unknown decoder {self.decoder!r}: choose one of "
                            f"{', '.join(DECODERS)}")


def load_run_model(run: RunDir, device: torch.device | None = None
                   ) -> tuple[torch.nn.Module, Any, TrainConfig]:
    """The run's final model (eval mode, on ``device``; None: the CPU) and tokenizer.

    The adapter is merged on the CPU, where the files are read, and the merged model moved
    once: the device holds one copy of the weights, never the unmerged one beside it."""
    cfg = TrainConfig.from_dict(run.config()["train"])
    info = model_info(cfg.model)
    tokenizer = load_tokenizer(info.path)
    if registry.traits(cfg).full:
        if not (run.path / "model" / "config.json").is_file():
            raise UserError(f"{run.path} has no trained model (model/config.json): "
                            f"{unfinished(run, cfg)}")
        model = load_full_model(run.path / "model")
    else:
        adapter = run.adapters("final")
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"{run.path} has no final adapter (adapters/final/"
                            f"adapter_config.json): {unfinished(run, cfg)}")
        # Loaded the standard PEFT way, then merged: generation runs on plain weights (the
        # exported HSplitLoRA adapters have large ranks; merging keeps beam search fast).
        model = lora.load_peft_adapter(load_full_model(info.path), adapter).merge_and_unload()
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer, cfg


def unfinished(run: RunDir, cfg: TrainConfig) -> str:
    """Why a run has nothing to evaluate, in words a user can act on: how far it got."""
    from runner.rundir import METRICS, SUMMARY, read_jsonl

    steps = [r.get("step") for r in read_jsonl(run.path / METRICS) if r.get("kind") == "train"]
    done = max((s for s in steps if isinstance(s, int)), default=-1) + 1
    if (run.path / SUMMARY).is_file():
        return "the run finished but saved no model; train it again"
    return (f"the run did not finish ({done} of {cfg.steps} steps recorded, no summary.json); "
            "it may still be running (`testbed status --run DIR`), or was stopped: resume or "
            "train it again")


@torch.inference_mode()
def generate(model: torch.nn.Module, tokenizer: Any, mrs: list[str], decode: DecodeConfig,
             progress: Callable[[int], None] | None = None) -> list[str]:
    """Beam-search one output per MR, in the order of ``mrs`` (left-padded batches; the text
    after ``" ||"`` only), with ``decode.decoder``: our beam search or generate(), same
    outputs. ``inference_mode`` rather than ``no_grad``: no autograd bookkeeping at all on
    the cache tensors, same arithmetic."""
    prompts = [data_mod.format_prompt(m) for m in mrs]
    order = list(range(len(mrs)))
    if decode.sort_by_length and len(prompts) > 1:  # stable: equal lengths keep MR order
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        order.sort(key=lengths.__getitem__)
    outputs: list[str] = [""] * len(mrs)
    settings = BeamSettings(
        num_beams=decode.num_beams, length_penalty=decode.length_penalty,
        no_repeat_ngram_size=decode.no_repeat_ngram_size,
        max_new_tokens=decode.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    own = decode.decoder == "beam" and unsupported(model, settings) is None
    chunks = [order[i:i + decode.batch_size] for i in range(0, len(order), decode.batch_size)]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encs = [tokenizer([prompts[j] for j in chunk], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device) for chunk in chunks]
    finally:
        tokenizer.padding_side = old_side

    def hf_generate() -> Iterator[tuple[int, torch.Tensor]]:
        for index, enc in enumerate(encs):
            out = model.generate(
                **enc,
                num_beams=decode.num_beams,
                length_penalty=decode.length_penalty,
                no_repeat_ngram_size=decode.no_repeat_ngram_size,
                max_new_tokens=decode.max_new_tokens,
                early_stopping=True,
                do_sample=False,
                use_cache=True,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            yield index, out[:, enc["input_ids"].shape[1]:]

    # our beam search may finish the batches it decodes together out of order
    done = ((index, new) for index, new, _ in beam_search_batches(
        model, [(enc["input_ids"], enc["attention_mask"]) for enc in encs], settings)
    ) if own else hf_generate()
    for index, new in done:
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for j, text in zip(chunks[index], texts, strict=True):
            outputs[j] = text.strip()
        if progress is not None:
            progress(len(chunks[index]))
    return outputs


def write_measure_scores_inputs(out_dir: Path, outputs: list[str],
                                references: list[list[str]]) -> tuple[Path, Path]:
    """Write ``outputs.txt`` and ``references.txt`` in the plain-text layout the official E2E
    scorer (e2e-metrics ``measure_scores.py``) reads, so anyone can score our outputs with it:
    one output per line in MR order; the references of each MR one per line, MRs separated by
    a blank line, in the same order. Newlines inside a text become spaces and surrounding
    whitespace goes (a line is a text there). Each file is written to a temporary name and
    renamed, so a failed evaluation never leaves half a file."""
    def flat(text: str) -> str:
        return " ".join(text.split())

    texts = {
        "outputs.txt": "".join(flat(o) + "\n" for o in outputs),
        "references.txt": "\n".join("".join(flat(r) + "\n" for r in group)
                                    for group in references),
    }
    for name, text in texts.items():
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_dir / name)
    return out_dir / "outputs.txt", out_dir / "references.txt"


def evaluate_run(run: RunDir, data: str | None = None, *, test_data: str | Path | None = None,
                 max_mrs: int | None = None, decode: DecodeConfig | None = None,
                 progress: Callable[[int], None] | None = None,
                 on_total: Callable[[int], None] | None = None,
                 device: str = "auto", split: str = "test") -> dict[str, Any]:
    """Generate for the test MRs, score them against all their references, and write
    ``eval/outputs.csv``, ``eval/outputs.txt`` + ``eval/references.txt`` (the official
    scorer's inputs, :func:`write_measure_scores_inputs`) and ``eval/scores.json``.

    Which MRs (runner/dataset/splits.py :func:`~runner.dataset.splits.eval_set`): ``test_data``:
    every MR of that CSV; ``data``: that data's test split as a run trained on it would have it;
    neither: the run's own test split (the whole official testset, or the test fraction by MR
    recomputed with the run's seed and fractions: the MRs it never trained on). ``max_mrs`` keeps
    the first N (None or 0: all). Bad input fails before the model loads and before anything is
    written. ``device`` (``--device``, runner/device.py): where the model generates; on a GPU
    decoding is generate()'s (runner/evaluation/beam.py ``unsupported``).

    ``split="validation"`` (``testbed eval --split validation``): the run's validation MRs,
    written to ``eval/validation/`` so the test evaluation is never overwritten, and no
    ``evaluated`` event (the report reads the test split's); for choosing decoding settings
    on validation data (docs/results.md, the main job's length penalty).
    """
    if max_mrs is not None and max_mrs < 0:
        raise UserError(f"--max-mrs must be >= 0 (0 = every MR), got {max_mrs}")
    decode = decode or DecodeConfig()
    chosen = splits.eval_set(run.config(), data=data, test_data=test_data, split=split)
    model, tokenizer, cfg = load_run_model(run, placement.resolve(device))
    refs = data_mod.references_by_mr(chosen.frame)
    mrs = list(refs)[:max_mrs] if max_mrs else list(refs)
    if on_total is not None:
        on_total(len(mrs))
    texts = generate(model, tokenizer, mrs, decode, progress)
    outputs = dict(zip(mrs, texts, strict=True))
    scores = scoring.score_e2e(outputs, refs)
    # Beyond the official scorer: does each output say what its MR says
    # (runner/evaluation/slots.py)?
    slot_report = slots.slot_errors(outputs)
    scores["SER"] = slot_report["SER"]
    out_dir = run.eval_dir()
    if split != "test":
        out_dir = out_dir / split
        out_dir.mkdir(exist_ok=True)
    tmp = out_dir / ".outputs.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["mr", "output"])
        w.writerows(outputs.items())
    tmp.replace(out_dir / "outputs.csv")
    write_measure_scores_inputs(out_dir, texts, [refs[m] for m in mrs])
    # "data" is the file the test MRs came from (kept under its old name for old readers)
    extra = {"data": chosen.file, "test_file": chosen.file, "protocol": chosen.protocol,
             "test_mrs": len(mrs), "file_test_mrs": len(refs),
             "whole_file": chosen.whole_file and len(mrs) == len(refs), "split": split,
             "decode": decode.__dict__, "method": cfg.method, "model": cfg.model}
    scoring.write_scores(out_dir / "scores.json", scores, extra, slot_errors=slot_report)
    if split == "test":
        run.event("evaluated", **scores, test_mrs=len(mrs))
    return {"scores": scores, "slot_errors": slot_report, "eval_dir": out_dir, **extra}

