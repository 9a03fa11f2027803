"""Score generated E2E NLG outputs the way the E2E challenge and the SplitLoRA papers report them.

The papers (docs/method.md "Reference numbers") report BLEU, NIST, METEOR, ROUGE-L and CIDEr on
the E2E test set, with every MR's human references grouped together ("multi-reference"
scoring), as the E2E challenge's official scorer (``measure_scores.py`` of e2e-metrics)
computes them. We reproduce that scorer's values: tests/test_scoring.py checks all five
metrics against its figures on three reference cases (within BLEU 0.1, NIST 0.05, METEOR
0.005, ROUGE-L 0.3, CIDEr 0.02; we agree to 0.001 or better), the third with 5 to 39
references per MR, where the official NIST's length penalty depends on how many references
each MR has (see :mod:`runner.evaluation.nist`). Maintained libraries compute every
metric the official scorer's way except NIST, which no library does:

========  ======================================================  =========================
metric    implementation (official scorer)                        scale (paper example)
========  ======================================================  =========================
BLEU      ``sacrebleu`` corpus BLEU, 13a on lowercased text,       0..100 (68.79)
          variable #refs per MR (mteval-v13a BLEU)
NIST      :mod:`runner.evaluation.nist`: mteval-v13a NIST, n=5, references    ~0..10 (8.83)
          pooled (definition cited there; mteval-v13a NIST)
METEOR    ``pycocoevalcap`` METEOR 1.5 jar (java), ``-norm``,      0..1 (0.4664)
          on PTB tokens (coco-caption METEOR)
ROUGE_L   ``pycocoevalcap`` ``Rouge`` (LCS, best precision and     0..100 (71.73)
          best recall over refs, beta 1.2), PTB tokens, x100
CIDEr     ``pycocoevalcap`` ``Cider`` (CIDEr-D: clipping and       ~0..10 (2.53)
          Gaussian length penalty, x10), PTB tokens
========  ======================================================  =========================

Tokenisation, as the official scorer does it:

* BLEU and NIST: mteval-v13a's own tokenisation of lowercased text, i.e. sacrebleu's ``13a``
  tokenizer after ``str.lower()`` (:func:`tokenize`); punctuation stays.
* METEOR, ROUGE_L and CIDEr: coco-caption's ``PTBTokenizer`` step (:func:`ptb_tokenize`):
  Stanford CoreNLP 3.4.1's PTB tokenizer with ``-preserveLines -lowerCase``, then
  coco-caption's punctuation tokens removed. We run the jar that ships in the pycocoevalcap
  wheel, on stdin (pycocoevalcap's wrapper writes a temporary file into its package
  directory, which may be read-only): one extra JVM start per :func:`score_e2e` call.

Where we differ from the E2E script on purpose: blank references are dropped (and an MR with
none is an error) instead of being scored as empty strings (for NIST this changes nothing:
an empty reference adds no n-grams and the official mteval leaves it out of the reference
count), and whitespace inside a text is collapsed before the PTB tokenizer (the script only
replaces newlines; the tokenizer splits on whitespace either way, so the tokens are the
same). CIDEr's IDF is computed over the MRs being scored (that is the metric's definition),
so it needs a corpus: with a single MR every n-gram has IDF 0 and CIDEr is 0. References for
MRs that are not in ``outputs`` are ignored.

METEOR and the PTB tokenizer need ``java`` on PATH; the METEOR 1.5 jar, its English
paraphrase table (``data/paraphrase-en.gz``) and the CoreNLP jar ship inside the
``pycocoevalcap`` wheel, so everything runs offline. Starting the METEOR JVM and loading the
paraphrase table takes seconds: pass one :class:`MeteorScorer` to several :func:`score_e2e`
calls to pay that once. We never import ``pycocoevalcap.spice`` (it downloads Stanford models
at import/run time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _coco_meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer as _coco_ptb
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from runner.evaluation.nist import NIST_ORDER, corpus_nist

__all__ = [
    "METRICS",
    "NIST_ORDER",
    "MeteorScorer",
    "ptb_tokenize",
    "score_e2e",
    "tokenize",
    "write_scores",
]

METRICS: tuple[str, ...] = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")

_TOKENIZER_13A = Tokenizer13a()
_PUNCTUATION = frozenset(_coco_ptb.PUNCTUATIONS)
_PTB_JAR = Path(_coco_ptb.__file__).resolve().parent / _coco_ptb.STANFORD_CORENLP_3_4_1_JAR
#: Seconds one PTB tokenizer run may take (a JVM start plus a test set: seconds in practice).
PTB_TIMEOUT_S = 600.0


def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "METEOR and the PTB tokenizer need a Java runtime: 'java' is not on PATH "
            "(install e.g. openjdk-17-jre)"
        )


def tokenize(text: str) -> list[str]:
    """Lowercase and split ``text`` with the mteval-v13a rules (BLEU and NIST tokens).

    The E2E script hands mteval-v13a lowercased text, and mteval tokenises it with its
    default rules (``tokenization``: SGML entities, punctuation and symbols split off, "."
    and "," kept inside numbers). sacrebleu's ``13a`` tokenizer is a port of exactly those
    rules, and this is what sacrebleu does inside ``BLEU(lowercase=True, tokenize="13a")``,
    so BLEU and NIST see the same tokens.
    """
    return _TOKENIZER_13A(text.lower().rstrip()).split()


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """coco-caption's tokenisation before METEOR, ROUGE-L and CIDEr, with its own jar.

    Mirrors ``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer.tokenize``, which the E2E
    script runs on references and outputs: Stanford CoreNLP 3.4.1's ``PTBTokenizer``
    (``-preserveLines -lowerCase``: one output line per input line, lowercased, PTB
    normalisations such as ``can't`` -> ``ca n't`` and ``£`` -> ``#``), then the tokens in
    ``PUNCTUATIONS`` dropped and the rest joined by single spaces. The same jar (shipped in
    the pycocoevalcap wheel) runs on stdin instead of a temporary file in the package
    directory, which may be read-only. The wrapper replaces newlines by spaces; we collapse
    every whitespace run (the tokenizer splits on whitespace anyway), so no character that
    the JVM might read as a line break can shift the lines.

    Returns one space-joined token string per input text (empty when nothing is left).
    """
    if not texts:
        return []
    _require_java()
    if not _PTB_JAR.is_file():
        raise RuntimeError(f"PTB tokenizer jar {_PTB_JAR} is missing: reinstall pycocoevalcap")
    lines = [" ".join(text.split()) for text in texts]
    cmd = [
        "java",
        "-cp",
        str(_PTB_JAR),
        "edu.stanford.nlp.process.PTBTokenizer",
        "-preserveLines",
        "-lowerCase",
        "-encoding",
        "utf-8",
    ]
    proc = subprocess.run(
        cmd,
        input=("\n".join(lines) + "\n").encode("utf-8"),
        capture_output=True,
        timeout=PTB_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-20:]
        raise RuntimeError(
            f"PTB tokenizer exited with {proc.returncode}; its stderr ends with:\n"
            + "\n".join(tail)
        )
    out = proc.stdout.decode("utf-8").split("\n")
    if out and out[-1] == "":
        out.pop()
    if len(out) != len(lines):
        raise RuntimeError(f"PTB tokenizer returned {len(out)} lines for {len(lines)} texts")
    return [
        " ".join(w for w in line.rstrip().split(" ") if w and w not in _PUNCTUATION) for line in out
    ]


def _meteor_text(tokens: str) -> str:
    """PTB tokens for the METEOR jar's line protocol: no ``|||`` (its field separator).

    pycocoevalcap's wrapper does this to the hypothesis (``replace('|||', '')``); doing it to
    references as well only matters where the jar would otherwise misread the line.
    """
    return " ".join(tokens.replace("|||", " ").split())


class MeteorScorer:
    """One running METEOR 1.5 JVM (pycocoevalcap's wrapper) that is reliably shut down.

    pycocoevalcap's ``Meteor`` only stops its ``java`` child in ``__del__``, i.e. whenever the
    garbage collector gets to it, and never drains the child's stderr (a chatty JVM could
    fill the pipe and block). This class checks the prerequisites up front with a clear
    message, drains stderr in a daemon thread (keeping the tail for error messages), and
    stops the JVM in :meth:`close` / on leaving a ``with`` block.
    """

    def __init__(self) -> None:
        _require_java()
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

        Texts should already be tokenised as the E2E script does (:func:`ptb_tokenize`), one
        line each, without ``|||``.
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
    """mteval-v13a NIST (n=5) over all references (:mod:`runner.evaluation.nist`),
    :func:`tokenize` tokens.

    ``grouped`` holds each MR's own references, unpadded: the official scorer's empty padding
    changes neither the information weights nor the mean reference count the length penalty
    uses, so none is added here.
    """
    hyp_tokens = [tokenize(h) for h in hypotheses]
    ref_tokens = [[tokenize(r) for r in refs] for refs in grouped]
    return float(corpus_nist(hyp_tokens, ref_tokens, max_n=NIST_ORDER))


def _rouge_l(coco_hyps: list[str], coco_refs: list[list[str]]) -> float:
    """pycocoevalcap's ``Rouge`` (the E2E script's ROUGE_L) on PTB tokens, x100.

    Per MR: LCS of the output with each reference, the best precision and the best recall
    over references (each maximised separately), F-measure with beta = 1.2; mean over MRs.
    """
    gts = {i: refs for i, refs in enumerate(coco_refs)}
    res = {i: [hyp] for i, hyp in enumerate(coco_hyps)}
    value, _ = Rouge().compute_score(gts, res)
    return float(value) * 100.0


def _cider(coco_hyps: list[str], coco_refs: list[list[str]]) -> float:
    """pycocoevalcap CIDEr (CIDEr-D variant) on PTB tokens, IDF over the MRs scored here."""
    gts = {i: refs for i, refs in enumerate(coco_refs)}
    res = {i: [hyp] for i, hyp in enumerate(coco_hyps)}
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
    # One PTB tokenizer run for outputs and references (the E2E script runs it twice, on
    # each set; -preserveLines tokenises every line on its own, so the tokens are the same).
    tokens = iter(ptb_tokenize([*hypotheses, *(r for refs in grouped for r in refs)]))
    coco_hyps = [next(tokens) for _ in hypotheses]
    coco_refs = [[next(tokens) for _ in refs] for refs in grouped]
    meteor_hyps = [_meteor_text(h) for h in coco_hyps]
    meteor_refs = [[_meteor_text(r) for r in refs] for refs in coco_refs]
    if meteor is None:
        with MeteorScorer() as own:
            meteor_value = own.score(meteor_hyps, meteor_refs)
    else:
        meteor_value = meteor.score(meteor_hyps, meteor_refs)
    scores = {
        "BLEU": _bleu(hypotheses, grouped),
        "NIST": _nist(hypotheses, grouped),
        "METEOR": meteor_value,
        "ROUGE_L": _rouge_l(coco_hyps, coco_refs),
        "CIDEr": _cider(coco_hyps, coco_refs),
    }
    return {name: scores[name] for name in METRICS}


def write_scores(path: Path, scores: dict[str, float], extra: dict[str, Any] | None = None,
                 *, slot_errors: dict[str, Any] | None = None) -> None:
    """Write ``{"scores": ..., "extra": ...}`` as indented JSON, atomically.

    ``slot_errors`` (:func:`runner.evaluation.slots.slot_errors`: counts and SER per attribute) is
    written under its own key when given; ``scores`` holds only numbers, SER among them.

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
    if slot_errors is not None:
        payload["slot_errors"] = slot_errors
    text = json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
