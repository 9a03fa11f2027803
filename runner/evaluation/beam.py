"""Our own beam search: generate()'s beam search step for step, with less work per step.

Why: beam search is most of `testbed eval`'s time (docs/method.md "Defaults": beam 10,
length penalty 0.8, no repeated 4-grams, at most 64 new tokens, early stopping), and
Hugging Face generate() spends much of it around the model rather than in it (profile in
docs/benchmarks.md): it runs the prompt once per beam, copies the key/value cache twice a
step (grown by concatenation, then reordered), allocates several logits-sized tensors a
step, and keeps computing the MRs of a batch whose search has ended. Here:

* the prompt runs once per MR, its keys and values shared by the MR's beams, in a
  preallocated cache where a reorder copies only the positions at which a beam's history
  differs from the one it takes over (runner/evaluation/beam_cache.py);
* the logits and log-probabilities of a step go into buffers allocated once;
* an MR whose hypotheses are all finished leaves its batch, and on CPU two batches decode
  together (runner/evaluation/llama_step.py), so the matrix products stay large.

It is a drop-in replacement because the outputs are byte-identical to generate()'s. The
search is a transcription of transformers' ``GenerationMixin._beam_search`` (5.x): the same
top-2k candidates per MR in ``torch.topk`` order, the same -1e9 masks for beams that hit EOS
or the length cap, the same length-penalised scores ``sum logprob / length**penalty`` of
finished hypotheses, the same early-stopping test, the same no-repeat-n-gram ban over the
whole row (left padding and prompt included), the same left-padded attention mask and
position ids, the same output padding. The model's arithmetic is its own forward's on the
same inputs; what differs is only how many rows a matrix product runs on, and a row's
result does not depend on that from :data:`MIN_ROWS` rows up. tests/test_generation.py
compares tokens and scores with generate()'s bit for bit (tiny models, EOS ending some
hypotheses), the model step with the model's forward, and the outputs on SmolLM2;
bench/generation.py compares the outputs on dev-set MRs, pretrained and trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from runner.evaluation import llama_step
from runner.evaluation.beam_cache import beam_cache, reorder

#: Matrix products with fewer rows than this take another kernel on CPU (MKL's small-matrix
#: path), whose sums round differently: a row's result is bit-identical for any row count
#: from 16 up, and differs below (measured on this project's CPU machines for every shape of
#: SmolLM2; tests/test_generation.py re-checks it). generate() runs the prompt on
#: ``MRs x beams x prompt tokens`` rows and each step on ``MRs x beams`` rows; we run fewer
#: only while at least this many remain.
MIN_ROWS = 16

#: Batches decoded together on CPU (runner/evaluation/llama_step.py): two keep the matrix
#: products large while MRs leave the batches. Each holds its own key/value cache: 750 MB for
#: 16 SmolLM2 MRs x 10 beams x (38 + 64) positions in fp32, what generate()'s one batch
#: holds at the end (and it briefly holds two or three copies while it grows and reorders).
CONCURRENT = 2

#: Model families whose causal-LM forward is ``lm_head(base_model(...))`` (no logit scaling
#: or soft-capping), so that the head can run on its own, on as many rows as generate()'s.
FAMILIES = ("llama", "gpt2")

#: Generation settings that add logits processors or change the search; a model whose own
#: generation config sets one of them is decoded by generate() instead.
_PLAIN = GenerationConfig()
_SETTINGS = ("repetition_penalty", "encoder_repetition_penalty", "bad_words_ids",
             "min_length", "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id",
             "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
             "exponential_decay_length_penalty", "renormalize_logits",
             "remove_invalid_values", "diversity_penalty", "num_beam_groups",
             "constraints", "force_words_ids", "low_memory", "encoder_no_repeat_ngram_size",
             "watermarking_config", "prefill_chunk_size")


@dataclass(frozen=True)
class BeamSettings:
    """The search as generate() is called by runner/evaluation/evaluate.py (docs/method.md
    "Defaults"), with ``early_stopping=True`` and ``do_sample=False`` always."""

    num_beams: int
    length_penalty: float
    no_repeat_ngram_size: int
    max_new_tokens: int
    eos_token_id: int
    pad_token_id: int | None


def unsupported(model: torch.nn.Module, settings: BeamSettings) -> str | None:
    """Why this model or setting must be decoded by generate() instead (None: it needn't).

    Only what was transcribed and measured is run here: a float32 model on CPU (what
    `testbed eval` loads), decoder-only, of :data:`FAMILIES`, with the ``sdpa`` or ``eager``
    attention, more than one beam (one beam is greedy search in generate()), an EOS token,
    and no generation setting that adds a logits processor.
    """
    config = model.config
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        # MIN_ROWS (row results independent of the row count) holds for CPU float32 products;
        # bfloat16 (oneDNN) and GPU kernels may round differently per row count
        return f"{weight.dtype} on {weight.device.type} (measured identical: float32 on cpu)"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    if getattr(config, "model_type", None) not in FAMILIES:
        return f"model type {getattr(config, 'model_type', None)!r} not in {FAMILIES}"
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return f"attention {config._attn_implementation!r}"
    if settings.num_beams < 2:
        return "one beam (generate() runs greedy search)"
    if settings.eos_token_id is None:
        return "no EOS token"
    own = getattr(model, "generation_config", None)
    if own is not None:
        for name in _SETTINGS:
            if getattr(own, name, None) != getattr(_PLAIN, name, None):
                return f"the model's generation config sets {name}"
    return None


def ban_repeated_ngrams(sequences: torch.Tensor, scores: torch.Tensor, n: int) -> None:
    """Set ``scores[i, t] = -inf`` for every token t that would repeat an n-gram of row i,
    in place: transformers' ``NoRepeatNGramLogitsProcessor`` (same windows, over the whole
    row with padding and prompt, same result), without its per-step mask allocations."""
    length = sequences.shape[1]
    if n <= 0 or length < n:
        return
    prefix = sequences[:, length + 1 - n:]
    windows = sequences.unfold(1, n, 1)
    rows, starts = (windows[..., :-1] == prefix.unsqueeze(1)).all(-1).nonzero(as_tuple=True)
    if rows.numel():
        tokens = windows[rows, starts, -1]
        keep = tokens < scores.shape[-1]  # ids past the head's vocabulary cannot come out
        scores[rows[keep], tokens[keep]] = -float("inf")


class _Model:
    """The model split as generate() runs it: the base model on the new tokens, and the
    head on the last position only (generate()'s ``logits_to_keep=1``)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        self.vocab = self.head.weight.shape[0]
        linear = isinstance(self.head, torch.nn.Linear) and self.head.bias is None
        self.weight_t = self.head.weight.t() if linear else None
        self.logits_buf: torch.Tensor | None = None
        self.scores_buf: torch.Tensor | None = None

    def forward(self, **inputs: object) -> tuple[torch.Tensor, object]:
        """The base model's last hidden state ``[rows, 1, hidden]`` and its cache."""
        out = self.base(**inputs, use_cache=True, return_dict=True)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = out.past_key_values
        return out.last_hidden_state[:, -1:, :], cache

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """``log_softmax(float32(head(hidden)))`` ``[rows, vocab]``, as generate() computes
        it, into buffers reused from step to step (the same matrix product as
        ``nn.Linear``, without fresh logits-sized tensors every step)."""
        rows = hidden.shape[0]
        if self.scores_buf is None or self.scores_buf.shape[0] < rows:
            self.scores_buf = torch.empty((rows, self.vocab), device=hidden.device,
                                          dtype=torch.float32)
            self.logits_buf = None
        if self.weight_t is not None:
            if self.logits_buf is None or self.logits_buf.dtype != hidden.dtype:
                self.logits_buf = torch.empty((self.scores_buf.shape[0], self.vocab),
                                              device=hidden.device, dtype=hidden.dtype)
            logits = torch.mm(hidden.reshape(rows, -1), self.weight_t,
                              out=self.logits_buf[:rows])
        else:
            logits = self.head(hidden)[:, -1, :]
        if logits.dtype != torch.float32:
            logits = logits.to(torch.float32)
        return torch.log_softmax(logits, dim=-1, out=self.scores_buf[:rows])


class _Search:
    """One batch of MRs (left-padded prompts) under beam search: generate()'s state tensors
    and its step, transcribed (transformers 5.x ``GenerationMixin._beam_search`` with
    ``early_stopping=True``), plus leaving the batch for MRs whose search has ended."""

    def __init__(self, net: _Model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 settings: BeamSettings):
        device = input_ids.device
        self.settings = settings
        self.input_ids = input_ids
        self.batch, self.prompt = input_ids.shape
        beams = self.beams = settings.num_beams
        self.keep_k = 2 * beams  # generate(): max(2, 1 + number of EOS tokens) * num_beams
        self.max_length = self.prompt + settings.max_new_tokens
        pad = settings.pad_token_id if settings.pad_token_id is not None else settings.eos_token_id
        self.fill = pad if pad else settings.eos_token_id  # `pad_token_id or eos_token_id[0]`

        # generate(): position ids from the mask; the mask dropped when nothing is padded
        padded = bool((attention_mask == 0).any())
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        # Run the prompt once per MR rather than once per beam, where that keeps its matrix
        # products on generate()'s kernels (>= MIN_ROWS rows, as generate()'s always are then).
        once = self.batch * self.prompt >= MIN_ROWS
        reps = 1 if once else beams
        hidden, cache = net.forward(
            input_ids=input_ids if once else input_ids.repeat_interleave(beams, 0),
            attention_mask=attention_mask.repeat_interleave(reps, 0) if padded else None,
            position_ids=position_ids.repeat_interleave(reps, 0))
        # the head runs on generate()'s rows, one per beam
        self.hidden: torch.Tensor | None = hidden.repeat_interleave(beams, 0) if once else hidden
        own = beam_cache(cache, beams if once else 1, self.max_length)
        self.own_cache = own is not None
        self.cache = own if own is not None else cache
        if own is None and once:  # Hugging Face's cache (another kind): its own reordering
            cache.batch_repeat_interleave(beams)
        self.mask: torch.Tensor | None = None
        if padded:  # the prompt's mask, then ones for the generated tokens, viewed [:, :length]
            self.mask = attention_mask.new_ones((self.batch * beams, self.max_length))
            self.mask[:, :self.prompt] = attention_mask.repeat_interleave(beams, 0)
        self.positions = position_ids[:, -1:].repeat_interleave(beams, 0)

        self.running = torch.full((self.batch, beams, self.max_length), self.fill,
                                  dtype=torch.long, device=device)
        self.running[:, :, :self.prompt] = input_ids.unsqueeze(1)
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros((self.batch, beams), dtype=torch.float32,
                                          device=device)
        self.running_scores[:, 1:] = -1e9
        self.beam_scores = torch.full((self.batch, beams), -1e9, dtype=torch.float32,
                                      device=device)
        self.finished = torch.zeros((self.batch, beams), dtype=torch.bool, device=device)
        self.improvable = torch.ones((self.batch, 1), dtype=torch.bool, device=device)
        # generated length of each finished hypothesis (generate() counts its beam indices)
        self.lengths = torch.zeros((self.batch, beams), dtype=torch.long, device=device)
        self.top_mask = torch.zeros(self.keep_k, dtype=torch.bool, device=device)
        self.top_mask[:beams] = True
        self.alive = torch.arange(self.batch, device=device)  # original MR of each entry
        self.best: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        self.cur_len = self.prompt
        self.ended = False

    @property
    def rows(self) -> int:
        return self.alive.numel() * self.beams

    def group(self) -> llama_step.Group:
        """This search's inputs to the next decoding step."""
        return llama_step.Group(
            tokens=self.running[:, :, self.cur_len - 1].reshape(self.rows, 1),
            positions=self.positions,
            mask=None if self.mask is None else self.mask[:, :self.cur_len],
            cache=self.cache)

    def advance(self, log_probs: torch.Tensor) -> None:
        """One step of generate()'s beam search from this step's log-probabilities
        ``[rows, vocab]`` (modified in place)."""
        beams, keep_k, cur_len, prompt = self.beams, self.keep_k, self.cur_len, self.prompt
        n_alive, vocab = self.alive.numel(), log_probs.shape[-1]
        device = log_probs.device
        history = self.running[:, :, prompt:cur_len]  # generated so far (not changed below)
        if self.settings.no_repeat_ngram_size > 0:
            ban_repeated_ngrams(self.running[:, :, :cur_len].reshape(self.rows, cur_len),
                                log_probs, self.settings.no_repeat_ngram_size)
        log_probs = log_probs.view(n_alive, beams, vocab)
        log_probs.add_(self.running_scores[:, :, None])
        log_probs = log_probs.view(n_alive, beams * vocab)

        # the top-2k continuations of each MR, then the k best that did not stop
        # (generate()'s _get_top_k_continuations, _get_running_beams_for_next_iteration)
        topk_log_probs, topk_indices = torch.topk(log_probs, k=keep_k)
        topk_beams = topk_indices // vocab
        topk_sequences = torch.take_along_dim(self.running, topk_beams.unsqueeze(-1), dim=1)
        topk_ids = topk_indices % vocab
        topk_sequences[:, :, cur_len] = topk_ids
        if cur_len + 1 >= self.max_length:
            hits = torch.ones_like(topk_ids, dtype=torch.bool)
        else:
            hits = topk_ids == self.settings.eos_token_id
        topk_running_log_probs = topk_log_probs + hits.to(torch.float32) * -1.0e9
        next_indices = torch.topk(topk_running_log_probs, k=beams)[1]
        self.running = torch.take_along_dim(topk_sequences, next_indices.unsqueeze(-1), dim=1)
        self.running_scores = torch.take_along_dim(topk_running_log_probs, next_indices, dim=1)
        source = torch.take_along_dim(topk_beams, next_indices, dim=1)

        # finished hypotheses (generate()'s _update_finished_beams)
        just_finished = hits & self.top_mask[None, :]
        scored = topk_log_probs / ((cur_len + 1 - prompt) ** self.settings.length_penalty)
        full = torch.all(self.finished, dim=-1, keepdim=True)  # & (early_stopping is True)
        scored += full.to(torch.float32) * -1.0e9
        scored += (~self.improvable).to(torch.float32) * -1.0e9
        scored += (~just_finished) * -1.0e9
        merged_scores = torch.cat((self.beam_scores, scored), dim=1)
        best = torch.topk(merged_scores, k=beams)[1]
        self.sequences = torch.take_along_dim(
            torch.cat((self.sequences, topk_sequences), dim=1), best.unsqueeze(-1), dim=1)
        self.beam_scores = torch.take_along_dim(merged_scores, best, dim=1)
        self.lengths = torch.take_along_dim(
            torch.cat((self.lengths, self.lengths.new_full((n_alive, keep_k),
                                                           cur_len + 1 - prompt)), dim=1),
            best, dim=1)
        self.finished = torch.take_along_dim(torch.cat((self.finished, just_finished), dim=1),
                                             best, dim=1)

        # the cache follows the surviving beams, each from its own MR
        rows = ((torch.arange(n_alive, device=device) * beams).unsqueeze(1) + source).reshape(-1)
        if self.own_cache:
            reorder(self.cache, rows, history.reshape(self.rows, cur_len - prompt))
        else:
            self.cache.reorder_cache(rows)

        self.cur_len = cur_len = cur_len + 1
        # generate()'s _check_early_stop_heuristic with early_stopping=True
        best_possible = self.running_scores[:, :1] / (
            (cur_len - prompt) ** self.settings.length_penalty)
        worst_finished = torch.where(
            self.finished, torch.min(self.beam_scores, dim=1, keepdim=True)[0], -1.0e9)
        self.improvable = self.improvable & torch.any(best_possible > worst_finished, dim=-1,
                                                      keepdim=True)
        # generate() stops when no MR can improve, every hypothesis of every MR is finished
        # (early_stopping=True), or every candidate hit a stop (the length cap)
        ended = ~self.improvable[:, 0] | torch.all(self.finished, dim=-1)
        self.ended = bool(hits.all()) or bool(ended.all())
        self.positions = self.positions + 1

    def shrink(self) -> None:
        """Let MRs whose k hypotheses are all finished (with real scores) leave the batch:
        generate() would go on computing them, but every later candidate of theirs gets
        -1e9, so their result is fixed. Only while at least MIN_ROWS rows stay (the matrix
        products keep their kernel) and a padded batch's mask keeps a padded row (an all-ones
        mask would switch the attention to another kernel)."""
        gone = torch.all(self.finished, dim=-1) & (self.beam_scores.min(dim=-1)[0] > -1.0e8)
        stay = (~gone).nonzero()[:, 0]
        if not 0 < stay.numel() < self.alive.numel() or stay.numel() * self.beams < MIN_ROWS:
            return
        stay_rows = (stay.unsqueeze(1) * self.beams
                     + torch.arange(self.beams, device=stay.device)).reshape(-1)
        if self.mask is not None and not bool((self.mask[stay_rows, :self.prompt] == 0).any()):
            return
        for i in gone.nonzero()[:, 0].tolist():
            self._keep_best(i)
        self.alive, self.running = self.alive[stay], self.running[stay]
        self.sequences, self.running_scores = self.sequences[stay], self.running_scores[stay]
        self.beam_scores, self.finished = self.beam_scores[stay], self.finished[stay]
        self.improvable, self.lengths = self.improvable[stay], self.lengths[stay]
        self.positions = self.positions[stay_rows]
        if self.mask is not None:
            self.mask = self.mask[stay_rows]
        if self.own_cache:
            for layer in self.cache.layers:
                layer.select_rows(stay_rows)
        else:
            self.cache.batch_select_indices(stay_rows)

    def _keep_best(self, i: int) -> None:
        self.best[int(self.alive[i])] = (self.sequences[i, 0], int(self.lengths[i, 0]),
                                         self.beam_scores[i, 0])

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The best hypothesis of each MR, ``[MRs, longest]``, as generate() returns them
        after the prompt (cropped to the longest, the fill value after each one's end), and
        its score (generate()'s ``sequences_scores``)."""
        for i in range(self.alive.numel()):
            self._keep_best(i)
        longest = max(length for _, length, _ in self.best.values())
        best = [self.best[mr] for mr in range(self.batch)]
        return (torch.stack([seq[self.prompt:self.prompt + longest] for seq, _, _ in best]),
                torch.stack([score for _, _, score in best]))


def _small(input_ids: torch.Tensor, settings: BeamSettings) -> bool:
    return input_ids.shape[0] * settings.num_beams < MIN_ROWS


@torch.inference_mode()
def beam_search_batches(model: torch.nn.Module,
                        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                        settings: BeamSettings, *, shrink: bool = True,
                        concurrent: int = CONCURRENT
                        ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Beam-search each batch of left-padded prompts ``(input_ids, attention_mask)`` (one row
    per MR) and yield ``(batch index, generated tokens [MRs, longest], scores [MRs])`` as
    each finishes: the tokens padded as ``model.generate(...)[:, prompt_length:]`` pads
    them, the scores generate()'s ``sequences_scores`` (length-penalised log-probability).

    With a plain Llama, up to ``concurrent`` batches decode together
    (runner/evaluation/llama_step.py); other families run one batch at a time on the model's
    own forward. ``shrink``: MRs whose search has ended leave their batch.
    """
    why = unsupported(model, settings)
    if why is not None:
        raise ValueError(f"our beam search does not cover this case ({why}): use generate()")
    net = _Model(model)
    stacked = llama_step.covers(model)
    if not stacked:
        concurrent = 1
    pending = list(enumerate(batches))[::-1]
    active: list[tuple[int, _Search]] = []
    while pending or active:
        # a batch that generate() runs on fewer than MIN_ROWS rows gets the small-matrix
        # kernels: it runs alone, on those rows
        while (pending and len(active) < concurrent
               and not (active and (_small(pending[-1][1][0], settings)
                                    or any(_small(s.input_ids, settings) for _, s in active)))):
            index, (input_ids, attention_mask) = pending.pop()
            active.append((index, _Search(net, input_ids, attention_mask, settings)))
        stepping = [s for _, s in active if s.hidden is None]
        if stepping:
            if stacked:
                hidden = llama_step.step(model, [s.group() for s in stepping])
            else:
                (search,) = stepping
                group = search.group()
                hidden, _ = net.forward(input_ids=group.tokens, attention_mask=group.mask,
                                        position_ids=group.positions, cache=group.cache)
            start = 0
            for search in stepping:
                search.hidden = hidden[start:start + search.rows]
                start += search.rows
        searches = [s for _, s in active]
        hidden = (searches[0].hidden if len(searches) == 1
                  else torch.cat([s.hidden for s in searches]))
        log_probs = net.log_probs(hidden)
        start = 0
        for search in searches:
            search.hidden = None
            search.advance(log_probs[start:start + search.rows])
            start += search.rows
        for index, search in list(active):
            if search.ended:
                active.remove((index, search))
                yield index, *search.result()
            elif shrink:
                search.shrink()


def beam_search(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                settings: BeamSettings, *, shrink: bool = True) -> torch.Tensor:
    """One batch: the generated tokens ``[MRs, longest]`` (see :func:`beam_search_batches`)."""
    ((_, tokens, _),) = beam_search_batches(model, [(input_ids, attention_mask)], settings,
                                            shrink=shrink)
    return tokens
