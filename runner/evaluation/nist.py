"""Corpus NIST as the E2E challenge's official scorer computes it (mteval-v13a, multi-reference).

No maintained Python library computes this variant: sacrebleu has no NIST, and nltk's
``corpus_nist`` scores each segment against its single best reference (and sums that
reference's length for the length penalty), whereas mteval pools all references of a
segment. So this module writes the definition down, line for line after the script the E2E
scorer runs (``mteval/mteval-v13a-sig.pl`` of e2e-metrics, called by ``measure_scores.py``'s
``run_mteval``), and tests/test_scoring.py checks it against the official figures of
``../shared/data/e2e/scorer-example/README.md``.

Definition (G. Doddington, "Automatic evaluation of machine translation quality using n-gram
co-occurrence statistics", HLT 2002; mteval-v13a.pl ``compute_ngram_info``,
``score_segment``, ``nist_score``, ``nist_length_penalty``), for n-grams up to N = 5:

* Information weight of an n-gram, from *all* reference segments of the corpus pooled:
  ``info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn))``, with ``count()`` of the empty
  prefix = the total number of reference words (``compute_ngram_info``).
* Per segment, each hypothesis n-gram's count is clipped by its *maximum* count in any one
  of that segment's references; matched n-grams add ``info * clipped count`` to the order's
  information sum, and the hypothesis adds ``max(len - n + 1, 0)`` n-grams of order n
  (``score_segment``).
* System score: ``sum over n of info_sum[n] / max(hyp_ngrams[n], 1)`` (corpus sums), times
  the length penalty ``exp(-beta * log(ratio)**2)`` for ``ratio < 1`` (1 at or above 1,
  0 at or below 0), ``beta = -log(0.5) / log(1.5)**2`` (``nist_length_penalty``).
* ``ratio = hyp_words / (ref_words / n_ref_sets)``: the hypothesis word count over the
  average reference length, where mteval divides the total reference word count by the
  number of reference *sets* (``nist_score``'s ``$nsys``). The E2E scorer writes one
  reference set per reference slot and pads MRs that have fewer references with empty
  segments (``create_mteval_file``), so ``n_ref_sets`` is the largest number of references
  of any MR. Empty padding segments add no words and no n-grams; this module needs no
  padding and uses ``max(len(refs))`` directly.

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

    def info(ngram: tuple[str, ...]) -> float:
        prefix = pooled[ngram[:-1]] if len(ngram) > 1 else ref_words
        return math.log2(prefix / pooled[ngram])

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
                info_sum[len(ngram)] += info(ngram) * clipped
        for n in range(1, max_n + 1):
            hyp_ngrams[n] += max(len(hyp) - n + 1, 0)

    # nist_score: $tst_ngrams->[1] / ($ref_ngrams->[1] / $nsys).
    n_ref_sets = max(len(refs) for refs in references)
    score = sum(info_sum[n] / max(hyp_ngrams[n], 1) for n in range(1, max_n + 1))
    return score * nist_length_penalty(hyp_ngrams[1] / (ref_words / n_ref_sets))
