"""Slot error rate (SER): does a generated text say what its MR says, and nothing else?

Why: BLEU, NIST, METEOR, ROUGE-L and CIDEr reward n-gram overlap with human references, so
an output that turns ``familyFriendly[no]`` into "a family-friendly restaurant" loses one
word's worth of overlap, while a user reading it is told the opposite of the truth. The E2E
follow-up evaluations therefore report a slot error rate next to the word-overlap metrics:

    SER = (added + missing + wrong + repeated) / number of MR slots

The field's standard for E2E is the rule-based matcher ``slot_error.py`` of the public
repository tuetschek/e2e-cleaning (Dušek, Howcroft and Rieser, "Semantic Noise Matters for
Neural Natural Language Generation", INLG 2019; used again in Dušek, Novikova and Rieser,
"Evaluating the state-of-the-art of End-to-End Natural Language Generation: The E2E NLG
Challenge", Computer Speech & Language 59, 2020). A SER is only comparable with published
figures if it is that script's SER, so this module reimplements its method: the value
patterns in :data:`PATTERNS` are the script's regular expressions (of the revision whose
results the reference table below holds: its rating patterns take "rated low, 1 out of 5"
as one phrase; an earlier revision's do not, and give 11.52 % there), and the matching and
counting below follow its rules, including the ones that look like accidents (listed
below), because changing any of them changes the numbers. The code, the data
layout and the handling of values outside the E2E vocabulary are our own.

How the script decides, and so how this module does:

1. Every pattern of every value of every attribute is searched in the text,
   case-insensitively, as whole words. Venue names (``name`` and ``near``) are literal, each
   attribute with its own list ("The Rice Boat" is on both). Values stay as the MR writes
   them: ``cheap`` and ``less than £20`` are two values whose patterns overlap ("cheap"
   realises both).
2. A match strictly inside a longer match of *any* attribute is dropped ("not cheap" is a
   price, not also "cheap"; "Raja Indian Cuisine" is a venue, not Indian food). Of matches
   with the same span, one that is the MR's value wins; otherwise the first in the script's
   order (:data:`_MATCH_ORDER`, then the value order of :data:`PATTERNS`). So "expensive"
   for ``priceRange[high]`` is ``high`` and for ``priceRange[more than £30]`` is ``more
   than £30``, both correct, while for ``priceRange[cheap]`` it is a wrong value.
3. Per attribute, with ``O`` the values the text realises and ``G`` the MR's: an attribute
   only in ``G`` is *missing*, one only in ``O`` is *added* (once per value); otherwise,
   with ``m`` the MR values not said and ``a`` the said values not in the MR, ``min(m, a)``
   are *wrong*, the rest missing (``m > a``) or added (``a > m``). A value said more often
   than the MR has it is *repeated*.

Consequences worth knowing when reading the numbers (all the script's behaviour):

* "restaurant", "pub" and "coffee"/"café" anywhere in the text state an ``eatType``: "a
  family-friendly restaurant" adds an eatType to an MR without one, and "a pub and
  restaurant" for ``eatType[pub]`` adds one. This is the largest source of *added* errors
  in the human references (371 of 521).
* Accents count: "Cafe Rouge" is not ``near[Café Rouge]`` (near missing), and its "Cafe" is
  a coffee shop (eatType added).
* A phrasing no pattern covers ("a price range of £30" for ``more than £30``) is
  *missing*, not wrong; one that contains another value's pattern reads as that value ("not
  a family place" is ``familyFriendly[yes]``; "moderately priced" is ``less than £20``
  unless the MR says ``moderate`` or ``£20-25``).
* Counting (the script's counting code): a value is counted once however often the text
  says it, except ``customer rating[low]``, which counts once per separate mention, so two
  mentions of a low rating are one *repeated* error when the MR says ``low`` (without that
  MR value the same phrases read as ``1 out of 5``, counted once).

Ours differs from the script in three places, none of which changes a result on the
reference table below: runs of whitespace are collapsed to one space first (the patterns
are written with single spaces, so a line break inside a text would hide a value; the
table was made on text collapsed the same way, while on the raw ``devset.csv`` the script
itself gives 11.42 %), an MR value outside the E2E vocabulary (where the script stops with
an error) is matched literally as written, and an MR key that is not one of the eight E2E
attributes is not a slot.

Measured (tests/test_slots.py): on the human references of the E2E development set, each
scored against its own MR (4,672 references, 27,759 slots), the script's per-reference
table in ``../shared/data/e2e/ser-reference/`` gives SER 11.36 % (added 521, missing 2,349,
wrong 283); this module gives the same totals and the same (added, missing, wrong) on every
reference (per attribute too). On the 55 outputs of a SmolLM2-135M of this project
(``../shared/data/e2e/scorer-example/``, case 3) both give 24.43 % (added 7, missing 74,
wrong 4 of 348 slots; 2 outputs fully correct). Before this reimplementation, our own
patterns gave 8.66 % on the references and agreed with the script on 79.9 % of them.
Human references do contain real slot errors, which is what the paper is about: most of
the missing values are attributes the writer left out.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runner.dataset.data import E2E_ATTRIBUTES, parse_mr

__all__ = [
    "E2E_NAMES",
    "E2E_NEAR",
    "PATTERNS",
    "VALUE_CLASSES",
    "SlotCheck",
    "check_output",
    "describe",
    "slot_errors",
    "value_class",
]

# --------------------------------------------------------------------------------------------
# Vocabulary and patterns: those of slot_error.py (module docstring), keyed by E2E attribute.
# --------------------------------------------------------------------------------------------

#: Venue names of the E2E release as ``name`` values; the synthetic generator of
#: runner/dataset/data.py draws from these.
E2E_NAMES: tuple[str, ...] = (
    "Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Browns Cambridge", "Clowns",
    "Cocum", "Cotto", "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House",
    "Strada", "Taste of Cambridge", "The Cambridge Blue", "The Cricketers", "The Dumpling Tree",
    "The Eagle", "The Golden Curry", "The Golden Palace", "The Mill", "The Olive Grove",
    "The Phoenix", "The Plough", "The Punter", "The Rice Boat", "The Twenty Two", "The Vaults",
    "The Waterman", "The Wrestlers", "Travellers Rest Beefeater", "Wildwood", "Zizzi",
)  # fmt: skip
#: Venue names of the E2E release as ``near`` values ("The Rice Boat" is both).
E2E_NEAR: tuple[str, ...] = (
    "All Bar One", "Avalon", "Burger King", "Café Adriatic", "Café Brazil", "Café Rouge",
    "Café Sicilia", "Clare Hall", "Crowne Plaza Hotel", "Express by Holiday Inn",
    "Rainbow Vegetarian Café", "Raja Indian Cuisine", "Ranch", "The Bakers", "The Portland Arms",
    "The Rice Boat", "The Six Bells", "The Sorrento", "Yippee Noodle Bar",
)  # fmt: skip

# Shared pieces of the script's rating patterns: the thing rated, and an optional star score
# after the judgement ("rated low, 1 out of 5").
_RATED_NOUN = r"(?:rat(?:ings?|e[ds]?)|reviews?|standards?|quality)"
_RATING_WORD = r"(?:rat(?:ings?|ed)|reviews?|standards?|quality)"


def _score(n: str, stars_after_of: bool = True) -> str:
    """'1 out of 5', '1 of five', '1 out of 5 stars', '1-star', 'one stars' (n = '(?:1|one)')."""
    of_stars = r"(?: stars?)?" if stars_after_of else ""
    return rf"{n}(?:(?: out)? of (?:5|five){of_stars}|[- ]+stars?)"


def _rating(n: str, judged_as: str, judgement: str) -> list[str]:
    """A numeric rating value's three patterns: the score; "rating(s) ... as low" with an
    optional score after it; "low(ly) ... rating" with an optional score after it."""
    return [
        _score(n),
        rf"{_RATED_NOUN}(?: \w+){{0,2}} (?:as )?{judged_as}(?:(?: \w+){{0,3}} {_score(n, False)})?",
        rf"{judgement}(?:ly)?(?:[ -]+\w+){{0,2}}[ -]+{_RATING_WORD}"
        rf"(?:(?: \w+){{0,3}} {_score(n)})?",
    ]


def _judged(n: str, judged_as: str, judgement: str) -> list[str]:
    """A verbal rating value's three patterns (as :func:`_rating`, without a trailing score)."""
    return [
        _score(n),
        rf"{_RATED_NOUN}(?: \w+){{0,2}} (?:as )?{judged_as}",
        rf"{judgement}(?:ly)?(?:[ -]+\w+){{0,2}}[ -]+{_RATING_WORD}",
    ]


_ONE, _THREE, _FIVE = "(?:1|one)", "(?:3|three)", "(?:5|five)"
_PRICES = r"prices?(?: range)?(?: \w+){0,3}"
_CHILD = r"(?:child|children|family|kids|kid)"
_KIDS = r"(?:kids?|child(?:ren)?|famil(?:y|ies))"

#: attribute -> value (as the script writes it) -> regular expressions, matched
#: case-insensitively as whole words. Both orders matter (a same-span tie between two values
#: that are not the MR's goes to the first), so they are the script's.
PATTERNS: dict[str, dict[str, list[str]]] = {
    "area": {
        "city centre": [r"(?:city|town) cent(?:re|er)", r"cent(?:re|er) of (?:the )?(?:city|town)",
                        r"in the cent(?:re|er)"],
        "riverside": [r"riverside", r"(?:near|by|at|close to|along|on|off|beside) the river"],
    },
    "eatType": {
        "coffee shop": [r"coffee[- ]+shop", r"caf[eé]", r"coffee"],
        "pub": [r"pub"],
        "restaurant": [r"restaurant"],
    },
    "familyFriendly": {
        "no": [
            rf"(?:isn't|not|non|no)[ -]+(?:\w+ ){{0,2}}{_CHILD}[ -]+(?:friendly|orien(?:ta)?ted)",
            rf"{_CHILD}[ -]+unfriendly", r"adults?[ -]+only", r"only for adults",
            r"(?:no|not) (?:kids|children|famil(?:y|ies))",
            r"(?:not|no)(?: good| suitable| friendly| orien(?:ta)?ted| open(?:ed))? "
            r"(?:at|for|to|with)(?: the)? (?:kids|children|family|families|all age)",
            rf"{_KIDS} (?:are|is)(?:n't| not) (?:welcome|allowed|accepted)",
            r"(?:does not|doesn't) (?:welcome|allow|accept) (?:\w+ ){0,2}"
            r"(?:kids?|child(?:ren)?|famil(?:y|ies)|all age)",
            r"adult (?:establishment|venue|place|establish)",
        ],
        "yes": [
            r"for (?:kids|children|family|families)", r"family place",
            r"place to bring the(?: whole)? family",
            # sic: "(?: the)" is not optional and no space follows it, so this one matches
            # almost nothing; kept, as it is what the script runs
            r"(?:friendly|suitable|good|orien(?:ta)?ted|open(?:ed)) (?:at|with|to|for)(?: the)"
            r"(?:kids?|child(?:ren)?|famil(?:y|ies)?|all age)",
            rf"{_CHILD}[ -]+(?:friendly|orien(?:ta)?ted)",
            rf"{_KIDS} (?:are|is) (?:welcome|allowed|accepted)",
            r"(?:welcomes?|allows?|accepts?) (?:\w+ ){0,2}"
            r"(?:kids?|child(?:ren)?|famil(?:y|ies)|all age)",
        ],
    },
    "food": {
        "Chinese": [r"Chinese", r"Chines"], "English": [r"English", r"British"],
        "Fast food": [r"Fast food"], "French": [r"French"], "Indian": [r"Indian"],
        "Italian": [r"Italian"], "Japanese": [r"Japanese"],
    },
    "name": {v: [re.escape(v)] for v in E2E_NAMES},  # venues: literal, see _VENUE_REGEX
    "near": {v: [re.escape(v)] for v in E2E_NEAR},
    "priceRange": {
        "cheap": [r"(?:inexpensive|cheap)(?:ly)?", r"low[- ]+price[ds]?", r"affordabl[ey]",
                  rf"{_PRICES} low"],
        "less than £20": [r"(?:inexpensive|cheap)(?:ly)?", r"affordabl[ey]",
                          r"(?:less than|under) £? *20", r"moderately priced",
                          r"low[- ]+price[ds]?", rf"{_PRICES} low"],
        "more than £30": [r"(?:more than|over) £? *30", r"high[- ]+price[ds]?", r"expensive",
                          r"not cheap", rf"{_PRICES} high"],
        "high": [r"high[- ]+price[ds]?", r"expensive", rf"{_PRICES} high"],
        "moderate": [r"(?:moderate|reasonable|ok|average)(?:ly)?[- ]+price[ds]?", r"not cheap",
                     r"affordable", r"mid[- ]+(?:range[- ]+)price[ds]?",
                     rf"{_PRICES} (?:ok|average|moderate|reasonable)"],
        "£20-25": [r"£? *20 *(?:[-–]*|to) *25",
                   r"(?:moderate|reasonable|ok|average)(?:ly)?[- ]+price[ds]?",
                   rf"{_PRICES} (?:ok|average|moderate|reasonable)", r"affordable"],
    },
    "customer rating": {
        # sic: "(:?good|well)" (an optional colon) in the first value, as in the script
        "1 out of 5": _rating(_ONE, r"(?:low|bad|poor)",
                              r"(?:low|bad|poor|(?:not|doesn't|isn't)(?: \w+){0,2} (:?good|well))"),
        "3 out of 5": _rating(_THREE, r"average", r"(?:average|(?<!very )(?:good|well))"),
        "5 out of 5": _rating(_FIVE, r"high", r"(?:high|excellent|very good|great)"),
        "high": _judged(_FIVE, r"high", r"(?:high|excellent|very good|great|well)"),
        "average": _judged(_THREE, r"average", r"(?:average|(?<!very )(?:good|well))"),
        "low": _judged(_ONE, r"(?:low|bad|poor)",
                       r"(?:low|bad|poor|(?:not|doesn't|isn't)(?: \w+){0,2} (?:well|good))"),
    },
}

#: The order in which the script collects matches (its slot names, alphabetically): the
#: first of two same-span matches, neither the MR's value, is the one kept.
_MATCH_ORDER: tuple[str, ...] = ("area", "eatType", "familyFriendly", "food", "name", "near",
                                 "priceRange", "customer rating")

#: The one value the script counts per mention rather than once (module docstring).
_COUNTED_PER_MENTION: tuple[str, str] = ("customer rating", "low")

#: attribute -> lowercased MR value -> the value as :data:`PATTERNS` writes it (the script
#: compares MR values case-insensitively).
VALUE_CLASSES: dict[str, dict[str, str]] = {
    attr: {value.lower(): value for value in values} for attr, values in PATTERNS.items()
}


def _compile(patterns: Iterable[str]) -> re.Pattern[str]:
    """One case-insensitive regex of alternatives, each matching whole words only."""
    return re.compile("|".join(rf"\b{p}\b" for p in patterns), re.IGNORECASE)


#: Venue attributes: the script searches each one's names as one regex of alternatives, so
#: of two overlapping names only the leftmost (then first-listed) is found.
_VENUE_ATTRS = ("name", "near")
_VENUE_REGEX: dict[str, re.Pattern[str]] = {
    attr: _compile(p for pats in PATTERNS[attr].values() for p in pats) for attr in _VENUE_ATTRS
}
_COMPILED: dict[str, dict[str, re.Pattern[str]]] = {
    attr: {value: _compile(pats) for value, pats in PATTERNS[attr].items()}
    for attr in _MATCH_ORDER if attr not in _VENUE_ATTRS
}


@functools.lru_cache(maxsize=4096)
def _literal(value: str) -> re.Pattern[str]:
    """An MR value outside the E2E vocabulary (a new venue, food or area), matched as written."""
    return _compile([re.escape(value)])


def value_class(attr: str, value: str) -> str:
    """The value the matcher compares for an MR value: as :data:`PATTERNS` writes it (the
    script compares MR values case-insensitively: ``"Less than £20"`` -> ``"less than
    £20"``), or the value itself when it is outside the vocabulary."""
    value = " ".join(value.split())
    return VALUE_CLASSES.get(attr, {}).get(value.lower(), value)


# --------------------------------------------------------------------------------------------
# Matching and counting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Match:
    attr: str
    value: str
    start: int
    end: int

    def same_span(self, other: _Match) -> bool:
        return (self.start, self.end) == (other.start, other.end)

    def inside(self, other: _Match) -> bool:
        """Strictly inside ``other``: contained in it and shorter."""
        return (other.start <= self.start and self.end <= other.end
                and not self.same_span(other))


def _candidates(text: str, gold: Mapping[str, str]) -> list[_Match]:
    """Every match of every value's patterns in ``text``, in the script's order (attributes
    as :data:`_MATCH_ORDER`, then values as :data:`PATTERNS`, then position); an MR value
    outside the vocabulary comes last in its attribute."""
    found: list[_Match] = []
    for attr in _MATCH_ORDER:
        if attr in _VENUE_ATTRS:
            names = VALUE_CLASSES[attr]
            found += [_Match(attr, names[m.group(0).lower()], m.start(), m.end())
                      for m in _VENUE_REGEX[attr].finditer(text)]
        else:
            for value, regex in _COMPILED[attr].items():
                found += [_Match(attr, value, m.start(), m.end()) for m in regex.finditer(text)]
        own = gold.get(attr)
        if own is not None and own.lower() not in VALUE_CLASSES[attr]:
            found += [_Match(attr, own, m.start(), m.end()) for m in _literal(own).finditer(text)]
    return found


def _matches(text: str, gold: Mapping[str, str]) -> list[_Match]:
    """The matches that survive the script's filtering (module docstring, step 2): none
    strictly inside another match; of one span, the MR's value, else the first."""
    found = _candidates(text, gold)
    kept: list[_Match] = []
    for match in found:
        beaten = any(
            match.inside(other)
            or (match.same_span(other) and (gold.get(other.attr) == other.value or other in kept))
            for other in found if other is not match)
        if not beaten:
            kept.append(match)
    return kept


@dataclass(frozen=True)
class SlotCheck:
    """The slot errors of one output against its MR.

    ``missing`` and ``wrong`` hold one attribute per erroneous MR slot; ``added`` one
    attribute per value the text adds; ``repeated`` one attribute per extra mention of an MR
    value (module docstring: only a low customer rating can have one); ``found`` is what the
    text realises, per attribute in E2E order, values (as :data:`PATTERNS` writes them) in
    order of first mention.
    """

    slots: tuple[str, ...]
    missing: tuple[str, ...] = ()
    wrong: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    repeated: tuple[str, ...] = ()
    found: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        """added + missing + wrong + repeated: the numerator of SER."""
        return len(self.missing) + len(self.wrong) + len(self.added) + len(self.repeated)


def check_output(mr: str | Mapping[str, str], text: str) -> SlotCheck:
    """Compare one generated ``text`` with its MR (an E2E MR string or a parsed dict)."""
    parsed = parse_mr(mr) if isinstance(mr, str) else dict(mr)
    slots = tuple(a for a in E2E_ATTRIBUTES if a in parsed)
    gold = {a: value_class(a, parsed[a]) for a in slots}
    matches = _matches(" ".join(text.split()), gold)
    said: dict[str, dict[str, int]] = {}
    for m in sorted(matches, key=lambda m: m.start):  # dicts keep the order of first mention
        counts = said.setdefault(m.attr, {})
        per_mention = (m.attr, m.value) == _COUNTED_PER_MENTION
        counts[m.value] = counts.get(m.value, 0) + 1 if per_mention else 1
    missing: list[str] = []
    wrong: list[str] = []
    added: list[str] = []
    repeated: list[str] = []
    for attr in E2E_ATTRIBUTES:
        counts = said.get(attr, {})
        own = gold.get(attr)
        if own is not None and counts.get(own, 0) > 1:
            repeated += [attr] * (counts[own] - 1)
        not_said = int(own is not None and own not in counts)
        not_in_mr = sum(n for value, n in counts.items() if value != own)
        wrong += [attr] * min(not_said, not_in_mr)
        missing += [attr] * max(not_said - not_in_mr, 0)
        added += [attr] * max(not_in_mr - not_said, 0)
    return SlotCheck(slots=slots, missing=tuple(missing), wrong=tuple(wrong),
                     added=tuple(added), repeated=tuple(repeated),
                     found={a: tuple(said[a]) for a in E2E_ATTRIBUTES if a in said})


def _percent(errors: int, slots: int) -> float | None:
    return 100.0 * errors / slots if slots else None


_KINDS = ("missing", "wrong", "added", "repeated")


def slot_errors(outputs: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, Any]:
    """SER of many outputs, overall and per attribute (percent, as the E2E papers print it).

    Args:
        outputs: MR -> generated text, or ``(MR, text)`` pairs (several texts per MR, e.g.
            human references).

    Returns:
        ``{"SER", "slots", "missing", "wrong", "added", "repeated", "outputs",
        "outputs_with_errors", "per_attribute": {attr: {"slots", "missing", "wrong", "added",
        "repeated", "SER"}}}`` (docs/run-format.md): SER in percent of the MR slots (of that
        attribute, for ``per_attribute``; None where the MRs have no such slot, as an
        attribute can still collect *added* errors), counts as integers, attributes in E2E
        order. ``SER`` is 0.0 when there is nothing to score. ``100 - 100 *
        outputs_with_errors / outputs`` is the script's "fully correct" share.
    """
    pairs = outputs.items() if isinstance(outputs, Mapping) else outputs
    per = {a: {"slots": 0, **dict.fromkeys(_KINDS, 0)} for a in E2E_ATTRIBUTES}
    n_outputs = with_errors = 0
    for mr, text in pairs:
        result = check_output(mr, text)
        n_outputs += 1
        with_errors += result.errors > 0
        for attr in result.slots:
            per[attr]["slots"] += 1
        for kind in _KINDS:
            for attr in getattr(result, kind):
                per[attr][kind] += 1
    totals = {k: sum(p[k] for p in per.values()) for k in ("slots", *_KINDS)}
    return {
        "SER": _percent(sum(totals[k] for k in _KINDS), totals["slots"]) or 0.0,
        **totals,
        "outputs": n_outputs,
        "outputs_with_errors": with_errors,
        "per_attribute": {
            a: {**p, "SER": _percent(sum(p[k] for k in _KINDS), p["slots"])}
            for a, p in per.items()
        },
    }


def describe(report: Mapping[str, Any]) -> str:
    """One line for a terminal: overall SER with its counts, then SER per attribute (the
    attributes no MR had are left out; "-" where an attribute only collected added errors)."""
    per = report.get("per_attribute", {})
    parts = [f"{attr} {'-' if p['SER'] is None else format(p['SER'], '.1f')}"
             for attr, p in per.items() if p["slots"] or p["added"]]
    repeated = report.get("repeated", 0)
    return (f"slot errors: SER {report['SER']:.2f}% (missing {report['missing']}, wrong "
            f"{report['wrong']}, added {report['added']}"
            + (f", repeated {repeated}" if repeated else "")
            + f" of {report['slots']} MR slots; "
            f"{report['outputs_with_errors']} of {report['outputs']} outputs with an error); "
            f"per attribute (%): " + ", ".join(parts))
