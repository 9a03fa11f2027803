"""Corpus NIST as the E2E challenge's official scorer computes it (mteval-v13a, multi-reference).

docs/method.md ("Data: E2E NLG") asks for NIST "with multiple references grouped by MR,
as the E2E challenge scores them", i.e. the value of e2e-metrics' ``measure_scores.py``, which
writes SGML files and runs its own copy of mteval, ``mteval/mteval-v13a-sig.pl``. No
maintained Python library computes this variant: sacrebleu has no NIST, and nltk's
``corpus_nist`` scores each segment against its single best reference (and sums that
reference's length for the length penalty), whereas mteval pools all references of a
segment. So this module writes the definition down, line for line after that script, and
tests/test_scoring.py checks it against the official scorer's figures on three cases (a
10-MR example, a 547-MR leave-one-out and a 55-MR model output whose MRs have 5 to 39
references each).

Definition (G. Doddington, "Automatic evaluation of machine translation quality using n-gram
co-occurrence statistics", HLT 2002; mteval-v13a-sig.pl ``compute_ngram_info``,
``score_segment``, ``score_system``, ``nist_score``, ``nist_length_penalty``), for n-grams up
to N = 5:

* Information weight of an n-gram, from *all* reference segments of the corpus pooled:
  ``info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn))``, with ``count()`` of the empty
  prefix = the total number of reference words (``compute_ngram_info``). The script picks the
  denominator with Perl's truth test on the prefix string, and the one-word string ``"0"`` is
  false in Perl: an n-gram whose prefix is the single token ``0`` is weighted as if it had no
  prefix, ``log2(total words / count(0 w))``. We do the same (:func:`_info_weights`).
* Per segment, each hypothesis n-gram's count is clipped by its *maximum* count in any one
  of that segment's references; matched n-grams add ``info * clipped count`` to the order's
  information sum, and the hypothesis adds ``max(len - n + 1, 0)`` n-grams of order n
  (``score_segment``).
* System score: ``sum over n of info_sum[n] / max(hyp_ngrams[n], 1)`` (corpus sums), times
  the length penalty ``exp(-beta * log(ratio)**2)`` for ``ratio < 1`` (1 at or above 1,
  0 at or below 0), ``beta = -log(0.5) / log(1.5)**2`` (``nist_length_penalty``).
* ``ratio = hyp_words / (ref_words / mean_refs)``, ``mean_refs`` = the number of non-empty
  reference segments over the number of segments (``score_segment`` counts a reference only
  ``if $ref_seg ne ''``; ``score_system`` passes ``$cum_ref_count / $cum_seg_count`` to
  ``nist_score``). In other words: the corpus's hypothesis words against ``n_segments`` times
  the mean length of a reference.

How the E2E scorer's padding enters. mteval wants every reference set to cover every segment,
so ``measure_scores.py``'s ``create_mteval_file`` writes one reference set per reference slot
(as many as the MR with the most references has) and fills the slots an MR lacks with empty
strings (``<seg id="k"></seg>``). An empty segment adds no words and no n-grams, so the
information weights and the clipping are those of the real references alone; and it is not
counted in ``mean_refs``. So this module needs no padding: it counts the references it is
given, skipping empty ones. (mteval's plain v13a divides by the number of reference *sets*
instead, i.e. the largest reference count; with 5 to 39 references per MR that makes the
average reference several times too short and drops the length penalty. The official
figures rule that out: 7.9583 with ``mean_refs``, 8.4963 with the set count, on the 55-MR
case.)

Tokenisation is the caller's: the E2E scorer feeds mteval lowercased text, which mteval
tokenises with its default (13a) rules; :func:`runner.evaluation.scoring.tokenize` does exactly
that.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

__all__ = ["NIST_ORDER", "corpus_nist", "nist_length_penalty"]

#: Highest n-gram order of the NIST score mteval reports (``NIST score using 5-grams``).
NIST_ORDER = 5

#: mteval-v13a ``nist_length_penalty``: the penalty is 0.5 when the output is 2/3 as long.
_BETA = -math.log(0.5) / math.log(1.5) ** 2


def _ngram_counts(tokens: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    """Counts of every n-gram of ``tokens`` for n = 1..max_n (mteval ``Words2Ngrams``)."""
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_n + 1):
        # n shifted copies of the tokens, zipped (zip stops at the shortest): the n-grams
        counts.update(zip(*(tokens[i:] for i in range(n)), strict=False))
    return counts


def _info_weights(pooled: Counter[tuple[str, ...]], ref_words: int) -> dict[tuple[str, ...], float]:
    """mteval ``compute_ngram_info``: bits of information of every reference n-gram.

    ``log2(count(prefix) / count(ngram))``, the prefix of a unigram counting as all reference
    words. mteval chooses between the two with ``$mgram ? ... : ...``, a Perl truth test on
    the prefix joined by spaces; since the string ``"0"`` is false in Perl, an n-gram whose
    prefix is the lone token ``0`` also gets the unigram formula. Kept, because the aim is the
    official scorer's number (docs/method.md: "as the E2E challenge scores them").
    """
    weights: dict[tuple[str, ...], float] = {}
    for ngram, count in pooled.items():
        prefix = ngram[:-1]
        total = ref_words if not prefix or prefix == ("0",) else pooled[prefix]
        weights[ngram] = math.log2(total / count)
    return weights


def nist_length_penalty(ratio: float) -> float:
    """mteval-v13a ``nist_length_penalty`` of ``hypothesis length / average reference length``."""
    if ratio >= 1.0:
        return 1.0
    if ratio <= 0.0:
        return 0.0
    return math.exp(-_BETA * math.log(ratio) ** 2)


def corpus_nist(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[Sequence[str]]],
    max_n: int = NIST_ORDER,
) -> float:
    """System-level NIST of tokenised ``hypotheses`` against their groups of ``references``.

    Args:
        hypotheses: one token list per segment.
        references: for each segment, its reference token lists (any number, at least one).
        max_n: highest n-gram order (5 in mteval's reported score).

    Raises:
        ValueError: lengths differ, a segment has no references, or all references are empty.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every segment needs at least one reference")

    # compute_ngram_info: n-gram counts over every reference segment of the corpus.
    ref_counts = [[_ngram_counts(ref, max_n) for ref in refs] for refs in references]
    pooled: Counter[tuple[str, ...]] = Counter()
    for counts in ref_counts:
        for one in counts:
            pooled.update(one)
    ref_words = sum(len(ref) for refs in references for ref in refs)
    if ref_words == 0:
        raise ValueError("all references are empty")

    info = _info_weights(pooled, ref_words)

    # score_segment, accumulated over segments as score_document / score_system do.
    info_sum = [0.0] * (max_n + 1)
    hyp_ngrams = [0] * (max_n + 1)
    for hyp, counts in zip(hypotheses, ref_counts, strict=True):
        ref_max: dict[tuple[str, ...], int] = {}
        for one in counts:
            for ngram, count in one.items():
                if count > ref_max.get(ngram, 0):
                    ref_max[ngram] = count
        for ngram, count in _ngram_counts(hyp, max_n).items():
            clipped = min(count, ref_max.get(ngram, 0))
            if clipped:
                info_sum[len(ngram)] += info[ngram] * clipped
        for n in range(1, max_n + 1):
            hyp_ngrams[n] += max(len(hyp) - n + 1, 0)

    # nist_score: $tst_ngrams->[1] / ($ref_ngrams->[1] / $nsys), where score_system's $nsys is
    # the number of non-empty references per segment, averaged over the corpus.
    mean_refs = sum(1 for refs in references for ref in refs if ref) / len(references)
    score = sum(info_sum[n] / max(hyp_ngrams[n], 1) for n in range(1, max_n + 1))
    return score * nist_length_penalty(hyp_ngrams[1] / (ref_words / mean_refs))
