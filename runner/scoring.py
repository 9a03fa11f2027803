"""Score generated E2E NLG outputs the way the E2E challenge and the SplitLoRA papers report them.

The papers (method.md, "Reference numbers") report BLEU, NIST, METEOR, ROUGE-L and CIDEr on
the E2E test set, with every MR's human references grouped together ("multi-reference"
scoring, as the E2E challenge's ``measure_scores.py`` does). We compute the same five metrics
with maintained libraries rather than hand-written metric code, so a bug in our scoring cannot
silently move the numbers we compare against the papers:

========  =====================================================  ==========================
metric    implementation                                         scale (paper example)
========  =====================================================  ==========================
BLEU      ``sacrebleu`` corpus BLEU, variable #refs per MR        0..100 (68.79)
NIST      ``nltk.translate.nist_score.corpus_nist``, n=5          ~0..10 (8.83)
METEOR    ``pycocoevalcap`` METEOR 1.5 jar (java), ``-norm``      0..1 (0.4664)
ROUGE_L   ``rouge-score`` ``RougeScorer(["rougeL"])``, x100       0..100 (71.73)
CIDEr     ``pycocoevalcap`` ``Cider`` (CIDEr-D: clipping and      ~0..10 (2.53)
          Gaussian length penalty, x10)
========  =====================================================  ==========================

Design choices (where we cannot be byte-identical to the E2E script):

* Tokenisation. The E2E script lowercases and tokenises with the mteval-v13a rules for
  BLEU/NIST, and runs the Stanford PTB tokenizer (lowercase, punctuation tokens removed)
  before METEOR/ROUGE-L/CIDEr. We use sacrebleu's mteval-v13a tokenizer on lowercased text
  for *all* metrics (:func:`tokenize`), keep punctuation for BLEU/NIST, and for METEOR and
  CIDEr drop the same punctuation tokens the coco-caption PTB wrapper drops
  (``pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS``). We do not run the PTB tokenizer
  itself: it starts a second JVM and writes temporary files into the installed package
  directory, which may be read-only.
* NIST comes from nltk, which picks the best single reference per segment; mteval-v13a
  pools n-gram counts over references, so NIST can differ slightly from the E2E script.
* ROUGE_L uses ``rouge-score`` (best reference by F-measure, F1, averaged over MRs, x100).
  The E2E script uses pycocoevalcap's ``Rouge`` (LCS F-measure with beta=1.2); the two are
  close but not identical.
* CIDEr's IDF is computed over the MRs being scored (that is the metric's definition), so it
  needs a corpus: with a single MR every n-gram has IDF 0 and CIDEr is 0. References for MRs
  that are not in ``outputs`` are ignored.

METEOR needs ``java`` on PATH; the METEOR 1.5 jar and its English paraphrase table
(``data/paraphrase-en.gz``) ship inside the ``pycocoevalcap`` wheel, so it runs offline.
Starting the JVM and loading the paraphrase table takes a few seconds: pass one
:class:`MeteorScorer` to several :func:`score_e2e` calls to pay that once. We never import
``pycocoevalcap.spice`` (it downloads Stanford models at import/run time).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from nltk.translate.nist_score import corpus_nist
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _coco_meteor
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

__all__ = ["METRICS", "MeteorScorer", "score_e2e", "tokenize", "write_scores"]

METRICS: tuple[str, ...] = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")

#: Highest n-gram order for NIST, as in mteval and the E2E script.
NIST_ORDER = 5

_TOKENIZER_13A = Tokenizer13a()
_PUNCTUATION = frozenset(PUNCTUATIONS)


def tokenize(text: str) -> list[str]:
    """Lowercase and split ``text`` with the mteval-v13a rules.

    This is exactly what sacrebleu does inside ``BLEU(lowercase=True, tokenize="13a")``
    (lowercase, strip trailing whitespace, 13a), so BLEU and NIST see the same tokens and an
    independent BLEU implementation fed these tokens must agree with ours.
    """
    return _TOKENIZER_13A(text.lower().rstrip()).split()


def _coco_text(text: str) -> str:
    """Tokens for METEOR/CIDEr: :func:`tokenize` minus the coco-caption punctuation tokens.

    Mirrors the E2E script's PTB step (lowercase, punctuation removed). Joining with single
    spaces also removes newlines, which would desynchronise METEOR's line protocol, and the
    ``|||`` field separator cannot survive 13a (it splits ``|``), but we strip it anyway.
    """
    words = [w for w in tokenize(text) if w not in _PUNCTUATION]
    return " ".join(words).replace("|||", " ").strip()


class MeteorScorer:
    """One running METEOR 1.5 JVM (pycocoevalcap's wrapper) that is reliably shut down.

    pycocoevalcap's ``Meteor`` only stops its ``java`` child in ``__del__``, i.e. whenever the
    garbage collector gets to it, and never drains the child's stderr (a chatty JVM could
    fill the pipe and block). This class checks the prerequisites up front with a clear
    message, drains stderr in a daemon thread (keeping the tail for error messages), and
    stops the JVM in :meth:`close` / on leaving a ``with`` block.
    """

    def __init__(self) -> None:
        if shutil.which("java") is None:
            raise RuntimeError(
                "METEOR needs a Java runtime: 'java' is not on PATH (install e.g. openjdk-17-jre)"
            )
        jar_dir = Path(_coco_meteor.__file__).resolve().parent
        for needed in (jar_dir / _coco_meteor.METEOR_JAR, jar_dir / "data" / "paraphrase-en.gz"):
            if not needed.is_file():
                raise RuntimeError(
                    f"METEOR file {needed} is missing: reinstall pycocoevalcap (the wheel ships it)"
                )
        self._meteor = _coco_meteor.Meteor()
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._drain = threading.Thread(target=self._drain_stderr, name="meteor-stderr", daemon=True)
        self._drain.start()

    def _drain_stderr(self) -> None:
        stream = self._meteor.meteor_p.stderr
        if stream is None:
            return
        for raw in stream:
            self._stderr_tail.append(raw.decode(errors="replace").rstrip())

    @property
    def process_alive(self) -> bool:
        """Whether the ``java`` child is still running (tests use this to check :meth:`close`)."""
        return self._meteor.meteor_p.poll() is None

    def score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """Corpus METEOR (0..1) from the jar's aggregated statistics, as the E2E script reports.

        Texts should already be normalised (see :func:`_coco_text`): one line each.
        """
        if not self.process_alive:
            raise RuntimeError("the METEOR JVM is not running (closed, or it crashed)")
        gts = {i: list(refs) for i, refs in enumerate(references)}
        res = {i: [hyp] for i, hyp in enumerate(hypotheses)}
        try:
            value, _ = self._meteor.compute_score(gts, res)
        except ValueError as err:  # the JVM died: readline() gave b"" and float() failed
            tail = "\n".join(self._stderr_tail)
            raise RuntimeError(f"METEOR jar failed; its stderr ends with:\n{tail}") from err
        return float(value)

    def close(self) -> None:
        """Stop the JVM and reap it. Safe to call twice."""
        proc = self._meteor.meteor_p
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        # If compute_score raised midway it left its lock held; the wrapper's __del__ acquires
        # it and would then block the interpreter at garbage collection.
        if self._meteor.lock.locked():
            self._meteor.lock.release()
        self._drain.join(timeout=5)

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _grouped_references(
    outputs: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[list[str], list[list[str]]]:
    """Line up hypotheses and their reference groups, rejecting bad input early.

    Fails loudly rather than scoring against nothing: an MR with no references would make
    every metric meaningless (or crash deep inside a library with an unhelpful message).
    Blank references are dropped because they only add a zero-length option to BLEU's and
    NIST's brevity handling.
    """
    if not outputs:
        raise ValueError("no outputs to score: `outputs` is empty")
    hypotheses: list[str] = []
    grouped: list[list[str]] = []
    for mr, hypothesis in outputs.items():
        if not isinstance(hypothesis, str):
            raise TypeError(f"output for MR {mr!r} must be a str, got {type(hypothesis).__name__}")
        if mr not in references:
            raise ValueError(f"no references for MR {mr!r}")
        refs = references[mr]
        if isinstance(refs, str):
            raise TypeError(f"references for MR {mr!r} must be a sequence of strings, not one str")
        kept = [ref for ref in refs if ref.strip()]
        if not kept:
            raise ValueError(f"no non-empty references for MR {mr!r}")
        hypotheses.append(hypothesis)
        grouped.append(kept)
    return hypotheses, grouped


def _bleu(hypotheses: list[str], grouped: list[list[str]]) -> float:
    """sacrebleu corpus BLEU with one reference stream per reference slot.

    MRs with fewer references are padded with ``None``, which sacrebleu documents as "no
    reference here" (``Metric._cache_references``), so they are neither dropped nor scored
    against an empty string.
    """
    width = max(len(refs) for refs in grouped)
    streams = [[refs[i] if i < len(refs) else None for refs in grouped] for i in range(width)]
    # force=True only silences the "looks already tokenised" warning for outputs ending in " .".
    metric = BLEU(lowercase=True, tokenize="13a", force=True)
    return float(metric.corpus_score(hypotheses, streams).score)


def _nist(hypotheses: list[str], grouped: list[list[str]]) -> float:
    """nltk corpus NIST (n=5) on :func:`tokenize` tokens.

    nltk divides by the number of hypothesis n-grams of each order and so crashes when no
    output has NIST_ORDER tokens; mteval counts such an order as 0. Orders above the longest
    output have no n-grams and contribute 0, and lower orders' information weights do not
    depend on the maximum order, so capping ``n`` at the longest output is exact.
    """
    hyp_tokens = [tokenize(h) for h in hypotheses]
    ref_tokens = [[tokenize(r) for r in refs] for refs in grouped]
    order = min(NIST_ORDER, max(len(t) for t in hyp_tokens))
    if order == 0:
        return 0.0
    return float(corpus_nist(ref_tokens, hyp_tokens, n=order))


def _rouge_l(hypotheses: list[str], grouped: list[list[str]]) -> float:
    """Mean over MRs of rouge-score's best-reference ROUGE-L F1, x100.

    rouge-score tokenises itself (lowercase, non-alphanumerics removed), so raw text goes in.
    """
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    values = [
        scorer.score_multi(refs, hyp)["rougeL"].fmeasure
        for hyp, refs in zip(hypotheses, grouped, strict=True)
    ]
    return float(np.mean(values) * 100.0)


def _cider(hypotheses: list[str], grouped: list[list[str]]) -> float:
    """pycocoevalcap CIDEr (CIDEr-D variant), IDF over the MRs scored here."""
    gts = {i: [_coco_text(r) for r in refs] for i, refs in enumerate(grouped)}
    res = {i: [_coco_text(h)] for i, h in enumerate(hypotheses)}
    value, _ = Cider().compute_score(gts, res)
    return float(value)


def score_e2e(
    outputs: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    meteor: MeteorScorer | None = None,
) -> dict[str, float]:
    """Score one generated text per MR against all of that MR's human references.

    Args:
        outputs: MR -> the generated text for that MR.
        references: MR -> every human reference for that MR (grouped by MR, as the E2E
            challenge scores). May hold MRs that are not in ``outputs``; those are ignored.
        meteor: a running :class:`MeteorScorer` to reuse; if None, one is started for this
            call and shut down before returning.

    Returns:
        ``{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}`` on the scales the E2E challenge and
        SplitLoRA report: BLEU 0..100, NIST ~0..10, METEOR 0..1, ROUGE_L 0..100, CIDEr ~0..10.

    Raises:
        ValueError: ``outputs`` is empty, or an MR in ``outputs`` has no (non-blank) references;
            the message names the MR.
    """
    hypotheses, grouped = _grouped_references(outputs, references)
    coco_hyps = [_coco_text(h) for h in hypotheses]
    coco_refs = [[_coco_text(r) for r in refs] for refs in grouped]
    if meteor is None:
        with MeteorScorer() as own:
            meteor_value = own.score(coco_hyps, coco_refs)
    else:
        meteor_value = meteor.score(coco_hyps, coco_refs)
    scores = {
        "BLEU": _bleu(hypotheses, grouped),
        "NIST": _nist(hypotheses, grouped),
        "METEOR": meteor_value,
        "ROUGE_L": _rouge_l(hypotheses, grouped),
        "CIDEr": _cider(hypotheses, grouped),
    }
    return {name: scores[name] for name in METRICS}


def write_scores(path: Path, scores: dict[str, float], extra: dict[str, Any] | None = None) -> None:
    """Write ``{"scores": ..., "extra": ...}`` as indented JSON, atomically.

    Atomic (temp file + rename) so a crash mid-write never leaves a truncated score file that a
    later analysis step would read as valid. ``allow_nan=False`` because NaN is not JSON and
    would break other readers; a NaN score is a bug to surface, not to store.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "scores": {name: float(value) for name, value in scores.items()},
        "extra": extra or {},
    }
    text = json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
