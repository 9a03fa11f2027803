"""Tests for runner.evaluation.scoring: the five E2E metrics on known inputs, with numbers checked.

Why these tests: the papers' BLEU/NIST/METEOR/ROUGE-L/CIDEr are the comparison targets, so
the decisive checks are the official E2E scorer's own figures on the three reference cases of
the shared ``data/e2e/scorer-example`` (all five metrics, within the tolerances of issue 12;
the third case, MRs with 5 to 39 references each, is issue 28's NIST gap). Around them: the
scales (BLEU 100 for identical text, METEOR near 1), independent BLEU / single-reference NIST
routes, hand-computed mteval NIST values for what the official variant does differently
(pooled references, the length penalty's mean reference count, a Perl quirk of the
information weights), the coco-caption PTB tokenisation, monotonicity, input validation and
that the METEOR JVM is shut down. METEOR's JVM costs seconds to start, so one is shared
module-wide.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from nltk.translate.bleu_score import corpus_bleu
from nltk.translate.nist_score import corpus_nist

from runner.evaluation import nist, scoring
from runner.evaluation.scoring import (
    METRICS,
    MeteorScorer,
    ptb_tokenize,
    score_e2e,
    tokenize,
    write_scores,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_E2E = ROOT.parent / "shared" / "data" / "e2e"
DEVSET = SHARED_E2E / "devset.csv"
SCORER_EXAMPLE = SHARED_E2E / "scorer-example"

#: The official scorer's figures (README.md of SCORER_EXAMPLE; BLEU, METEOR, ROUGE_L on 0..1).
OFFICIAL = {
    "example": {
        "BLEU": 0.7203,
        "NIST": 7.8212,
        "METEOR": 0.4801,
        "ROUGE_L": 0.7910,
        "CIDEr": 2.3039,
    },
    "devset_loo": {
        "BLEU": 0.5995,
        "NIST": 8.5789,
        "METEOR": 0.4498,
        "ROUGE_L": 0.6528,
        "CIDEr": 1.8543,
    },
    "model_outputs": {
        "BLEU": 0.6958,
        "NIST": 7.9583,
        "METEOR": 0.4038,
        "ROUGE_L": 0.7022,
        "CIDEr": 2.0724,
    },
}
#: Issue 12's tolerances, on our scales (BLEU and ROUGE_L x100).
TOLERANCE = {"BLEU": 0.1, "NIST": 0.05, "METEOR": 0.005, "ROUGE_L": 0.3, "CIDEr": 0.02}

MR_EAGLE = "name[The Eagle], eatType[coffee shop], food[Japanese], area[riverside]"
MR_MILL = "name[The Mill], eatType[pub], food[Italian], priceRange[cheap]"
MR_ALIMENTUM = "name[Alimentum], area[city centre], familyFriendly[no]"
MR_WRESTLERS = "name[The Wrestlers], eatType[restaurant], customer rating[high]"

# Several references per MR (three, two, two, one): variable counts exercise BLEU's padding.
REFS: dict[str, list[str]] = {
    MR_EAGLE: [
        "The Eagle is a Japanese coffee shop in the riverside area.",
        "There is a coffee shop called The Eagle that serves Japanese food by the riverside.",
        "By the riverside you can find The Eagle, a coffee shop with Japanese food.",
    ],
    MR_MILL: [
        "The Mill is a cheap pub that serves Italian food.",
        "Cheap Italian food is served at The Mill, a pub.",
    ],
    MR_ALIMENTUM: [
        "Alimentum is in the city centre and is not family-friendly.",
        "In the city centre there is a venue called Alimentum which is not family-friendly.",
    ],
    MR_WRESTLERS: ["The Wrestlers is a highly rated restaurant."],
}

GOOD = {
    MR_EAGLE: "The Eagle is a Japanese coffee shop by the riverside.",
    MR_MILL: "The Mill is a cheap pub serving Italian food.",
    MR_ALIMENTUM: "Alimentum is a venue in the city centre which is not family-friendly.",
    MR_WRESTLERS: "The Wrestlers is a restaurant with a high rating.",
}

BAD = {
    MR_EAGLE: "Eagle food.",
    MR_MILL: "It is a place with some food.",
    MR_ALIMENTUM: "A venue.",
    MR_WRESTLERS: "Restaurant here.",
}


def words(text: str) -> list[str]:
    """Whitespace tokens of a test string that is already lowercase and tokenised."""
    return text.split()


@pytest.fixture(scope="module")
def meteor() -> Iterator[MeteorScorer]:
    """One METEOR JVM for the whole module (start-up and paraphrase loading take seconds)."""
    with MeteorScorer() as scorer:
        yield scorer


def test_tokenize_lowercases_and_splits_punctuation() -> None:
    assert tokenize("The Eagle, a pub.") == ["the", "eagle", ",", "a", "pub", "."]
    assert tokenize("  Cheap  Food\n") == ["cheap", "food"]


def test_ptb_tokenize_is_coco_captions_tokenisation() -> None:
    """The Stanford PTB tokenizer's normalisations, then coco-caption's punctuation removal.

    ``£`` -> ``#`` and ``-lrb-`` (coco-caption removes ``-LRB-``, but ``-lowerCase`` has already
    lowercased it) are what the official scorer's METEOR/ROUGE-L/CIDEr see; a newline inside
    a text must not shift the lines, and empty or all-punctuation texts give "".
    """
    got = ptb_tokenize(
        ["The Eagle isn't cheap: £20-25.", 'Café  Rouge\nis "family-friendly" (5/5)!', "", "..."]
    )
    assert got == [
        "the eagle is n't cheap # 20-25",
        "café rouge is family-friendly -lrb- 5/5 -rrb-",
        "",
        "",
    ]
    assert ptb_tokenize([]) == []


def test_identical_outputs_score_perfectly(meteor: MeteorScorer) -> None:
    refs = {mr: [texts[0]] for mr, texts in REFS.items()}
    outputs = {mr: texts[0] for mr, texts in refs.items()}
    scores = score_e2e(outputs, refs, meteor=meteor)
    print("identical:", scores)
    assert tuple(scores) == METRICS
    assert scores["BLEU"] == pytest.approx(100.0, abs=1e-9)
    assert scores["ROUGE_L"] == pytest.approx(100.0, abs=1e-9)
    assert scores["METEOR"] > 0.9
    assert scores["METEOR"] <= 1.0
    # NIST and CIDEr have no fixed maximum, but perfect outputs must score well on them.
    assert scores["NIST"] > 2.0
    assert scores["CIDEr"] > 5.0


def test_bleu_and_nist_match_independent_nltk_route(meteor: MeteorScorer) -> None:
    """sacrebleu's corpus BLEU must equal nltk's corpus_bleu on the same (explicit) tokens.

    Texts are already lowercase, space-separated tokens with only a final "." (which 13a
    splits off anyway), so the token lists below are known without calling our tokenizer.
    Every n-gram order 1..4 has matches, so neither implementation smooths and the two
    agree up to floating-point rounding. nltk's NIST scores each output against its best
    single reference, mteval pools them: the two agree only with one reference per MR.
    """
    hyp_tokens = {
        "mr1": words("the eagle is a cheap coffee shop near the river ."),
        "mr2": words("the mill serves italian food in a pub ."),
    }
    ref_tokens = {
        "mr1": [
            words("the eagle is a coffee shop near the river ."),
            words("there is a cheap coffee shop called the eagle ."),
        ],
        "mr2": [words("the mill is a pub that serves italian food .")],
    }
    outputs = {mr: " ".join(tokens) for mr, tokens in hyp_tokens.items()}
    refs = {mr: [" ".join(r) for r in group] for mr, group in ref_tokens.items()}
    for mr in outputs:
        assert tokenize(outputs[mr]) == hyp_tokens[mr]

    scores = score_e2e(outputs, refs, meteor=meteor)
    expected_bleu = 100.0 * corpus_bleu(
        [ref_tokens[mr] for mr in outputs], [hyp_tokens[mr] for mr in outputs]
    )
    single = {mr: group[:1] for mr, group in ref_tokens.items()}
    ours_single = nist.corpus_nist(
        [hyp_tokens[mr] for mr in outputs], [single[mr] for mr in outputs]
    )
    nltk_single = corpus_nist(
        [single[mr] for mr in outputs], [hyp_tokens[mr] for mr in outputs], n=5
    )
    print("hand-made:", scores, "nltk BLEU", expected_bleu, "single-ref NIST", nltk_single)
    assert 20.0 < expected_bleu < 95.0  # a non-trivial value, not 0 or 100
    assert scores["BLEU"] == pytest.approx(expected_bleu, abs=1e-6)
    assert ours_single > 1.0
    assert ours_single == pytest.approx(nltk_single, abs=1e-9)


def test_nist_pools_references_like_mteval() -> None:
    """Hand-computed mteval-v13a values for what nltk's NIST does differently.

    References "a b" and "a c" (4 words): info(a) = log2(4/2) = 1, info(b) = info(c) = 2,
    info(a b) = log2(count(a) / count(a b)) = 1. Output "a b c": its unigrams a, b, c each
    match some reference (clipped by the max count in one reference) -> (1 + 2 + 2) / 3;
    bigram "a b" matches -> 1 / 2; no trigram matches; no 4-/5-grams -> 0. Length: 3 words
    against an average reference of 4 / 2 = 2, so no penalty: NIST = 5/3 + 1/2. nltk picks one
    reference per order and matches only 2 of the 3 unigrams: (1 + 2) / 3 + 1 / 2 (n=2, as
    nltk divides by zero for orders without any output n-gram).
    """
    refs = [[["a", "b"], ["a", "c"]]]
    assert nist.corpus_nist([["a", "b", "c"]], refs) == pytest.approx(5 / 3 + 1 / 2, abs=1e-12)
    assert corpus_nist(refs, [["a", "b", "c"]], n=2) == pytest.approx(1.5, abs=1e-12)


def test_nist_length_penalty_uses_the_mean_number_of_references() -> None:
    """The length penalty divides the reference words by the mean non-empty references per MR.

    The first MR has 4 references (6 words), the second 2 (3 words). The E2E scorer pads the
    second with 2 empty references to fill 4 reference sets, and its mteval counts only the
    non-empty ones: 6 references / 2 MRs = 3 per MR, so the 9 reference words stand for
    9 / 3 = 3 words against the 2 output words, a ratio of 2/3, where mteval's penalty is
    exactly 0.5 (that is how its beta is defined). Dividing by the 4 reference sets instead
    (plain mteval-v13a, and this module before issue 28) gives 9 / 4 = 2.25 and a milder
    penalty. Unigram infos over 9 reference words: a (4x) log2(9/4), d (2x) log2(9/2); nothing
    else of the outputs matches. Explicit empty references, the padding, change nothing.
    """
    refs = [[["a", "b"], ["a", "c"], ["a"], ["a"]], [["d", "e"], ["d"]]]
    hyps = [["a"], ["d"]]
    info = (math.log2(9 / 4) + math.log2(9 / 2)) / 2
    expected = 0.5 * info
    by_reference_sets = nist.nist_length_penalty(2 / 2.25) * info
    assert nist.nist_length_penalty(2 / 3) == pytest.approx(0.5, abs=1e-12)
    assert by_reference_sets - expected > 0.1  # the check below tells the two rules apart
    assert nist.corpus_nist(hyps, refs) == pytest.approx(expected, abs=1e-12)
    padded = [refs[0], [*refs[1], [], []]]
    assert nist.corpus_nist(hyps, padded) == pytest.approx(expected, abs=1e-12)


def test_nist_info_of_an_ngram_after_a_lone_zero_follows_mteval() -> None:
    """mteval weights an n-gram whose prefix is the token "0" as if it had no prefix.

    ``compute_ngram_info`` picks ``count(prefix)`` or the total word count with a Perl truth
    test on the prefix string, and "0" is false. Reference "0 x" (2 words): info(0) =
    info(x) = log2(2/1) = 1, and info(0 x) = log2(2/1) = 1 instead of log2(count(0) /
    count(0 x)) = 0. The output "0 x" thus scores 2/2 + 1/1 = 2, where "1 x" against "1 x"
    (same counts, an ordinary prefix) scores 2/2 + 0/1 = 1.
    """
    assert nist.corpus_nist([["0", "x"]], [[["0", "x"]]]) == pytest.approx(2.0, abs=1e-12)
    assert nist.corpus_nist([["1", "x"]], [[["1", "x"]]]) == pytest.approx(1.0, abs=1e-12)
    # Only the lone token "0" is false in Perl: "00" or "0.0" are ordinary prefixes.
    assert nist.corpus_nist([["00", "x"]], [[["00", "x"]]]) == pytest.approx(1.0, abs=1e-12)


def _read_grouped(path: Path) -> list[list[str]]:
    """References one per line, MRs separated by blank lines (the E2E script's multi-ref
    ``read_lines``): lines stripped, empty groups dropped."""
    groups: list[list[str]] = [[]]
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            groups[-1].append(line.strip())
        elif groups[-1]:
            groups.append([])
    return [g for g in groups if g]


def _scorer_example_case() -> tuple[dict[str, str], dict[str, list[str]]]:
    """Case 1: devel-conc.txt (references, MRs separated by blank lines) + baseline-output.txt.

    Read as the E2E script's ``read_lines`` does: lines stripped, a blank line ends an MR.
    """
    groups = _read_grouped(SCORER_EXAMPLE / "devel-conc.txt")
    lines = (SCORER_EXAMPLE / "baseline-output.txt").read_text(encoding="utf-8").splitlines()
    system = [line.strip() for line in lines if line.strip()]
    assert len(groups) == len(system) == 10
    outputs = {f"mr{i}": text for i, text in enumerate(system)}
    refs = {f"mr{i}": group for i, group in enumerate(groups)}
    return outputs, refs


def _devset_leave_one_out_case() -> tuple[dict[str, str], dict[str, list[str]]]:
    """Case 2: each dev-set MR's first reference as the output, its other references as refs.

    MRs in order of first appearance, those with at least two references; texts with newlines
    replaced by spaces and surrounding whitespace stripped (README.md, section 2).
    """
    grouped: dict[str, list[str]] = {}
    with DEVSET.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            grouped.setdefault(row["mr"], []).append(row["ref"].replace("\n", " ").strip())
    mrs = [mr for mr, refs in grouped.items() if len(refs) >= 2]
    assert len(mrs) == 547
    assert sum(len(grouped[mr]) - 1 for mr in mrs) == 4125
    return {mr: grouped[mr][0] for mr in mrs}, {mr: grouped[mr][1:] for mr in mrs}


def _model_outputs_case() -> tuple[dict[str, str], dict[str, list[str]]]:
    """Case 3: a model's outputs on the dev set's 55-MR test split, 5 to 39 references per MR.

    model-outputs.txt and model-mrs.txt have one line per MR, aligned; model-references.txt
    groups references as devel-conc.txt does (README.md, section 3). The very unequal
    reference counts are what the official scorer's NIST length penalty is sensitive to.
    """
    groups = _read_grouped(SCORER_EXAMPLE / "model-references.txt")
    system = (SCORER_EXAMPLE / "model-outputs.txt").read_text(encoding="utf-8").splitlines()
    mrs = (SCORER_EXAMPLE / "model-mrs.txt").read_text(encoding="utf-8").splitlines()
    assert len(groups) == len(system) == len(mrs) == 55
    assert len(set(mrs)) == 55
    assert min(map(len, groups)) == 5
    assert max(map(len, groups)) == 39
    outputs = {mr: text.strip() for mr, text in zip(mrs, system, strict=True)}
    refs = dict(zip(mrs, groups, strict=True))
    return outputs, refs


@pytest.mark.skipif(
    not (SCORER_EXAMPLE / "README.md").is_file() or not DEVSET.is_file(),
    reason=f"{SCORER_EXAMPLE} or {DEVSET} not present",
)
@pytest.mark.parametrize("case", ["example", "devset_loo", "model_outputs"])
def test_official_scorer_figures(case: str, meteor: MeteorScorer) -> None:
    """All five metrics equal the official E2E scorer's on the three reference cases.

    Issue 12 for the first two; issue 28 for the third, where NIST was 8.496 against the
    official 7.9583 (its length penalty divided by the largest reference count).
    """
    official = OFFICIAL[case]
    readme = (SCORER_EXAMPLE / "README.md").read_text(encoding="utf-8")
    row = "| " + " | ".join(f"{official[name]:.4f}" for name in (METRICS)) + " |"
    assert row in readme, f"the official figures of {case} are not README.md's"
    build = {
        "example": _scorer_example_case,
        "devset_loo": _devset_leave_one_out_case,
        "model_outputs": _model_outputs_case,
    }[case]
    outputs, refs = build()
    scores = score_e2e(outputs, refs, meteor=meteor)
    expected = {
        name: value * 100.0 if name in ("BLEU", "ROUGE_L") else value
        for name, value in official.items()
    }
    print(case, {name: round(scores[name], 4) for name in METRICS}, "official", expected)
    for name in METRICS:
        assert scores[name] == pytest.approx(expected[name], abs=TOLERANCE[name]), name


def test_worse_outputs_score_lower_on_every_metric(meteor: MeteorScorer) -> None:
    good = score_e2e(GOOD, REFS, meteor=meteor)
    bad = score_e2e(BAD, REFS, meteor=meteor)
    print("good:", good)
    print("bad: ", bad)
    for name in METRICS:
        assert good[name] > bad[name], name
    # Scales: paper-like magnitudes for good outputs.
    assert 20.0 < good["BLEU"] <= 100.0
    assert 0.2 < good["METEOR"] <= 1.0
    assert 30.0 < good["ROUGE_L"] <= 100.0


def test_adding_a_matching_reference_raises_every_metric(meteor: MeteorScorer) -> None:
    before = score_e2e(GOOD, REFS, meteor=meteor)
    more_refs = {mr: [*texts, GOOD[mr]] for mr, texts in REFS.items()}
    after = score_e2e(GOOD, more_refs, meteor=meteor)
    print("before:", before)
    print("after: ", after)
    for name in METRICS:
        assert after[name] > before[name], name
    # Every output now has an exact reference: BLEU and ROUGE-L (max over refs) hit 100.
    assert after["BLEU"] == pytest.approx(100.0, abs=1e-9)
    assert after["ROUGE_L"] == pytest.approx(100.0, abs=1e-9)


def test_mrs_with_fewer_references_are_padded_with_none(meteor: MeteorScorer) -> None:
    """An MR with fewer references than others must not get a phantom empty reference.

    Padding the shorter reference list with "" would offer BLEU a length-0 reference: the
    4-token output below (its one reference has 10) would then pick 0 as its closest
    reference length and escape the brevity penalty. sacrebleu's None padding must instead
    match nltk on the real references. (Outputs have at least 4 tokens because nltk counts a
    hypothesis without 4-grams as one unmatched 4-gram, unlike sacrebleu and mteval.)
    """
    hyp_tokens = {
        "mr_long": words("the eagle is a japanese coffee shop in the riverside area ."),
        "mr_short": words("the wrestlers is ."),
    }
    ref_tokens = {
        "mr_long": [
            words("the eagle is a japanese coffee shop in the riverside area ."),
            words("there is a coffee shop called the eagle by the riverside ."),
            words("the eagle serves japanese food by the riverside ."),
        ],
        "mr_short": [words("the wrestlers is a highly rated restaurant in town .")],
    }
    outputs = {mr: " ".join(tokens) for mr, tokens in hyp_tokens.items()}
    refs = {mr: [" ".join(r) for r in group] for mr, group in ref_tokens.items()}
    hyps_list = [hyp_tokens[mr] for mr in outputs]
    expected = 100.0 * corpus_bleu([ref_tokens[mr] for mr in outputs], hyps_list)
    with_phantom = 100.0 * corpus_bleu(
        [ref_tokens["mr_long"], [*ref_tokens["mr_short"], []]], hyps_list
    )
    scores = score_e2e(outputs, refs, meteor=meteor)
    print("padding:", scores["BLEU"], "nltk", expected, "with a phantom '' ref", with_phantom)
    assert with_phantom - expected > 1.0  # the check below can tell the two apart
    assert scores["BLEU"] == pytest.approx(expected, abs=1e-6)


def test_missing_mr_raises_value_error_naming_it() -> None:
    outputs = {**GOOD, "name[Nowhere]": "Nowhere is a pub."}
    with pytest.raises(ValueError, match=re.escape("name[Nowhere]")):
        score_e2e(outputs, REFS)
    with pytest.raises(ValueError, match=re.escape("name[Blank]")):
        score_e2e({"name[Blank]": "x"}, {"name[Blank]": ["", "  "]})
    with pytest.raises(ValueError, match="empty"):
        score_e2e({}, REFS)
    with pytest.raises(TypeError, match="sequence of strings"):
        score_e2e({MR_MILL: "x"}, {MR_MILL: "a single string, not a list"})  # type: ignore[dict-item]


def test_score_e2e_shuts_down_its_own_meteor_jvm(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[MeteorScorer] = []

    class Recording(MeteorScorer):
        def __init__(self) -> None:
            super().__init__()
            started.append(self)

    monkeypatch.setattr(scoring, "MeteorScorer", Recording)
    scores = score_e2e(GOOD, REFS)
    assert len(started) == 1
    assert not started[0].process_alive
    assert 0.0 < scores["METEOR"] <= 1.0
    with pytest.raises(RuntimeError, match="not running"):
        started[0].score(["a"], [["a"]])


def test_write_scores_round_trips(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "scores.json"
    scores = {"BLEU": 68.79, "NIST": 8.8274, "METEOR": 0.4664, "ROUGE_L": 71.73, "CIDEr": 2.5267}
    write_scores(target, scores, extra={"method": "splitlora", "n_mrs": 630})
    data = json.loads(target.read_text(encoding="utf-8"))
    assert data == {"scores": scores, "extra": {"method": "splitlora", "n_mrs": 630}}
    assert target.read_text(encoding="utf-8").startswith("{\n  ")  # indented
    assert [p.name for p in target.parent.iterdir()] == ["scores.json"]  # no temp file left
    with pytest.raises(ValueError):
        write_scores(target, {"BLEU": math.nan})


@pytest.mark.skipif(not DEVSET.is_file(), reason=f"{DEVSET} not present")
def test_human_vs_human_on_real_devset(meteor: MeteorScorer) -> None:
    """First reference as "output", the rest as references, on 30 real dev-set MRs."""
    grouped: dict[str, list[str]] = {}
    with DEVSET.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            grouped.setdefault(row["mr"], []).append(row["ref"])
    mrs = [mr for mr, refs in grouped.items() if len(refs) >= 2][:30]
    assert len(mrs) == 30
    outputs = {mr: grouped[mr][0] for mr in mrs}
    refs = {mr: grouped[mr][1:] for mr in mrs}
    scores = score_e2e(outputs, refs, meteor=meteor)
    print("dev set, human vs human, 30 MRs:", {k: round(v, 4) for k, v in scores.items()})
    assert 30.0 < scores["BLEU"] < 90.0
    assert 3.0 < scores["NIST"] < 10.0
    assert 0.25 < scores["METEOR"] < 0.7
    assert 40.0 < scores["ROUGE_L"] < 90.0
    assert 0.5 < scores["CIDEr"] < 5.0
