"""Slot error rate (SER): does a generated text say what its MR says, and nothing else?

Why: BLEU, NIST, METEOR, ROUGE-L and CIDEr reward n-gram overlap with human references, so
an output that turns ``familyFriendly[no]`` into "a family-friendly restaurant" loses one
word's worth of overlap, while a user reading it is told the opposite of the truth. The E2E
follow-up evaluations therefore report a slot error rate next to the word-overlap metrics:

    SER = (missing + wrong + added) / number of MR slots

(Dušek, Novikova and Rieser, "Evaluating the state-of-the-art of End-to-End Natural Language
Generation: The E2E NLG Challenge", Computer Speech & Language 59, 2020, Sec. 6; Dušek,
Howcroft and Rieser, "Semantic Noise Matters for Neural Natural Language Generation", INLG
2019, whose ``slot_error.py`` in github.com/tuetschek/e2e-cleaning is the rule-based matcher
those figures come from). For each MR slot the text either realises its value (correct),
realises another value of the same attribute (*wrong*, e.g. ``eatType[pub]`` as
"restaurant", ``priceRange[more than £30]`` as "a price range of £30"), or does not mention
the attribute (*missing*, e.g. ``food[French]`` left out). A value of an attribute the MR
does not have, or a second value of one it has, is *added* (e.g. "Chinese food" without a
food slot, or a venue name that is neither the MR's name nor its near).

How it works (our own patterns, written after the published method, not a copy of the
script): the text is normalised (accents stripped, so "Café" matches "cafe"; lowercased;
typographic apostrophes and dashes made plain) and every attribute's value patterns are
searched in it. A match strictly inside a longer match of its own attribute or of a venue
name is dropped, so "not family-friendly" is one ``familyFriendly[no]`` match rather than
also a ``[yes]`` one, and "Raja Indian Cuisine" is a venue, not Indian food. Where two
values of one attribute match the same span ("expensive" is both ``high`` and ``more than
£30``), the MR's value is kept if it is one of them. Catch-all patterns ("£30", "4 out
of 5") record a price or rating that is none of the known values, so it counts as wrong
rather than missing; they never suppress a real match.
Per attribute, with ``O`` the set of values realised and ``g`` the MR's value:

* ``g`` in ``O``: correct, plus one *added* error per other value in ``O``;
* ``O`` non-empty without ``g``: one *wrong* error, plus one *added* per further value;
* ``O`` empty: one *missing* error; an attribute not in the MR: one *added* per value.

Venue names (``name`` and ``near``) share one vocabulary (E2E uses "The Rice Boat" as both),
extended by the MR's own values: a venue that is neither the MR's name nor its near turns
an unmentioned near (first) or name into a *wrong* error, else it is *added*.

Design choices (figures: the human references of the E2E development set):

* Paired values are one value for the matcher, as in the Dušek et al. script, whose patterns
  for them are shared: ``cheap`` = ``less than £20``, ``moderate`` = ``£20-25``, ``high`` =
  ``more than £30`` (priceRange); ``low`` = ``1 out of 5``, ``average`` = ``3 out of 5``,
  ``high`` = ``5 out of 5`` (customer rating). Rendering ``customer rating[5 out of 5]`` as
  "highly rated" is correct; "£30" for ``more than £30`` or "3 out of 5" for ``high`` is not.
* "restaurant" is the generic noun for any E2E venue, so it counts as an ``eatType`` value
  only when it is the only eatType word of the text and the MR has an eatType: then
  ``eatType[pub]`` said as "restaurant" is wrong, while "a pub and restaurant" or a
  "restaurant" in an MR without eatType is not an error. Counting every "restaurant" (as the
  script does) raises the dev-set SER of the human references from 8.7 % to 10.0 %.
* Only the eight E2E attributes are checked; an MR key outside them is not a slot here.

Measured on ``../shared/data/e2e/devset.csv`` (4,672 human references of 547 MRs, every
reference scored against its own MR; tests/test_slots.py checks SER < 10 % and wrong <
1.5 %): SER 8.66 % of 27,759 slots (missing 7.17 %, wrong 1.03 %, added 0.46 %), 32.9 % of
the references with at least one error; per attribute name 0.2, eatType 3.9, food 13.6,
priceRange 13.7, customer rating 16.0, area 9.0, familyFriendly 14.1, near 1.1 %. Human
E2E references do contain real slot errors: Dušek et al. 2019 re-annotated the original
MRs with their script precisely because so many references leave out or change values.
Reading about 200 flagged dev-set references, nearly all flags were real (a food,
customer rating or familyFriendly slot simply not mentioned; "family-friendly" for
``familyFriendly[no]``; "moderately priced" for ``less than £20``); the misses were
paraphrases no pattern covers ("a poor choice of a place to take a family", "no room for a
whole family", misspellings such as "kids friends", "Chines"). On the 2,312 templated
references of ``synthetic_e2e(400)`` the SER is 0.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runner.dataset.data import E2E_ATTRIBUTES, parse_mr

__all__ = [
    "OTHER",
    "SlotCheck",
    "check_output",
    "describe",
    "slot_errors",
    "value_class",
]

#: The value class of a catch-all match: a price or a rating that none of the MR values is.
OTHER = "other"

# --------------------------------------------------------------------------------------------
# Vocabulary: the E2E release's values (trainset, devset, testset) and their paraphrases.
# --------------------------------------------------------------------------------------------

#: Venue names of the E2E release (``name`` values, then ``near`` values); "The Rice Boat" is
#: both. The synthetic generator of runner/dataset/data.py draws from a subset of these.
E2E_NAMES: tuple[str, ...] = (
    "Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Browns Cambridge", "Clowns",
    "Cocum", "Cotto", "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House",
    "Strada", "Taste of Cambridge", "The Cambridge Blue", "The Cricketers", "The Dumpling Tree",
    "The Eagle", "The Golden Curry", "The Golden Palace", "The Mill", "The Olive Grove",
    "The Phoenix", "The Plough", "The Punter", "The Rice Boat", "The Twenty Two", "The Vaults",
    "The Waterman", "The Wrestlers", "Travellers Rest Beefeater", "Wildwood", "Zizzi",
)  # fmt: skip
E2E_NEAR: tuple[str, ...] = (
    "All Bar One", "Avalon", "Burger King", "Café Adriatic", "Café Brazil", "Café Rouge",
    "Café Sicilia", "Clare Hall", "Crowne Plaza Hotel", "Express by Holiday Inn",
    "Rainbow Vegetarian Café", "Raja Indian Cuisine", "Ranch", "The Bakers", "The Portland Arms",
    "The Rice Boat", "The Six Bells", "The Sorrento", "Yippee Noodle Bar",
)  # fmt: skip

#: MR value (lowercased) -> the value class the matcher compares; paired values share one.
VALUE_CLASSES: dict[str, dict[str, str]] = {
    "eatType": {"coffee shop": "coffee shop", "pub": "pub", "restaurant": "restaurant"},
    "food": {v.lower(): v.lower() for v in (
        "Chinese", "English", "Fast food", "French", "Indian", "Italian", "Japanese")},
    "priceRange": {"cheap": "cheap", "less than £20": "cheap", "moderate": "moderate",
                   "£20-25": "moderate", "high": "high", "more than £30": "high"},
    "customer rating": {"low": "low", "1 out of 5": "low", "average": "average",
                        "3 out of 5": "average", "high": "high", "5 out of 5": "high"},
    "area": {"city centre": "city centre", "riverside": "riverside"},
    "familyFriendly": {"yes": "yes", "no": "no"},
}

# Building blocks (on normalised, lowercased text).
_FAM = r"(?:famil(?:y|ies)|child(?:ren)?|kids?|toddlers?|little ones)"
_FRIENDLY = r"(?:friendly|orien(?:ta)?ted|focused|appropriate|suitable|safe)"
_NEG = r"(?:not|non|never|isn't|aren't|wasn't|no)"
# Up to three words between a negation and what it negates ("is not considered family
# friendly"), but never across a conjunction ("not cheap, but family friendly").
_NEG_FILL = r"(?:(?!(?:but|and|yet|though|although|while|whereas|or|far)\b)[\w']+\s+){0,3}"
_WHO = r"(?:(?:the|your|their|young|small|little|all|whole|entire|a|of)\s+){0,3}"
_PRICE = r"(?:prices?|price[ -]?range|price[ -]?point|pricing|costs?|menu)"
_RATED = (r"(?:(?:customers?'?s?'?|users?|guests?|overall|customer service|quality)\s+)?"
          r"(?:ratings?|reviews?|review scores?|scores?|rank(?:ed|ing)?|rated|reviewed|rates?)")
# Words that may stand between a price/rating noun and its value ("price range is on the
# high side", "is rated by customers as low"); a closed list, so "rating and a low price"
# never reads as a low rating.
_FILL = (r"(?:\s+(?:is|are|was|were|be|been|being|in|of|the|a|an|on|at|as|by|has|have|had|"
         r"its|their|it|with|which|that|range|ranges|customers?|users?|diners?|quite|very|"
         r"fairly|pretty|rather|relatively|generally|typically|usually|considered|somewhat|"
         r"really|extremely|too|bit|little|more|side|received|receives|gets|got|given|"
         r"level)){0,5}\s+")

# "the price range of The Eagle is high": the noun's owner may stand in between.
_OF = r"(?: (?:of|at|for) the (?!(?:and|but|or)\b)[\w']+(?: (?!(?:and|but|or)\b)[\w']+)?)?"


def _money(amount: int, word: str) -> str:
    """£20 / £ 20 / 20 pounds / twenty pounds / 20£ (humans write all of them)."""
    return (rf"(?:£ ?{amount}(?:\.00)?|{amount}(?:\.00)? ?(?:pounds?|gbp|quid|£)|"
            rf"{word} pounds?)")


_P20, _P25, _P30 = _money(20, "twenty"), _money(25, "twenty[ -]?five"), _money(30, "thirty")
_N25 = rf"(?:{_P25}|25|twenty[ -]?five)"


def _stars(n: str) -> list[str]:
    """'5 out of 5', 'five of five', '5/5', '5 stars', 'five-star', 'rated 5'."""
    out_of = r" ?(?:out of|of|/|out) ?(?:5|five)"
    return [rf"{n}{out_of}(?:[ -]?stars?)?", rf"{n}[ -]?stars?",
            rf"rated (?:a )?{n}(?:{out_of})?(?:[ -]?stars?)?"]


_ONE, _THREE, _FIVE = r"(?:1|one)", r"(?:3|three)", r"(?:5|five)"

#: attribute -> value class -> regular expressions (normalised text; whole words only).
PATTERNS: dict[str, dict[str, list[str]]] = {
    "eatType": {
        "coffee shop": [r"coffee[ -]?(?:shops?|houses?|bars?|spots?|places?)", r"cafes?",
                        r"coffeeshops?"],
        "pub": [r"pubs?", r"public houses?", r"gastro[ -]?pubs?", r"taverns?"],
        "restaurant": [r"restaurants?"],
    },
    "food": {
        "chinese": [r"chinese"],
        "english": [r"english", r"british"],
        "fast food": [r"fast[ -]?foods?"],
        "french": [r"french"],
        "indian": [r"indian"],
        "italian": [r"italian"],
        "japanese": [r"japanese"],
    },
    "priceRange": {
        "cheap": [
            r"cheap(?:ly|er|est)?", r"inexpensive(?:ly)?", r"low[ -]?(?:priced?|prices|costs?)",
            r"low[ -]cost", r"budget", r"affordabl[ey]", r"bargains?",
            rf"{_PRICE}{_OF}{_FILL}(?:low|cheap|lower|budget|affordable|inexpensive)",
            rf"(?:less|lower|below|cheaper) than (?:the )?average(?: {_PRICE})?",
            rf"(?:low|lower|cheap|cheaper)(?:[ -]end)? {_PRICE}",
            rf"(?:less than|under|below|lower than|no more than|not more than|up to|within|"
            rf"max(?:imum)?(?: of)?|less then|fewer than|cheaper than) {_P20}",
            rf"{_P20} (?:or less|or under|and under|and below|max(?:imum)?)", rf"sub[ -]{_P20}",
            r"not (?:very |too |that |so |overly |particularly )?(?:expensive|pricey|costly)",
        ],
        "moderate": [
            r"moderate(?:ly)?(?:[ -]priced)?", r"mid[ -]?(?:range|priced|level|price)",
            r"reasonabl[ey](?:[ -]priced)?", r"fair(?:ly)?[ -]priced", r"fair prices?",
            rf"(?:average|medium|moderate|mid|middle|fair|reasonable|decent|standard)[ -]?"
            rf"(?:[ -]?range )?{_PRICE}",
            r"(?:average|medium)[ -]priced", r"moderately (?:expensive|cheap|pricey)",
            rf"{_PRICE}{_OF}{_FILL}(?:of )?20 ?(?:-|to) ?25",
            rf"{_PRICE}{_OF}{_FILL}(?:moderate|average|reasonable|medium|mid|fair|ok|okay|"
            r"middle|affordable|mid[ -]range|standard)",
            rf"{_P20} ?(?:-|to|and|through) ?{_N25}", rf"between {_P20} and {_N25}",
            r"20 ?(?:-|to) ?25 ?(?:pounds?|gbp|£)", r"affordabl[ey]",
            r"not (?:very |too |that |so |overly |particularly )?(?:cheap|expensive)",
        ],
        "high": [
            r"(?:very |quite |rather |a bit |little )?expensive", r"pricey", r"pricy", r"costly",
            r"high(?:ly|er)?[ -]?(?:priced?|prices|costs?|end)", r"upscale", r"up[ -]?market",
            rf"(?:higher|more) than (?:the )?average(?: {_PRICE})?",
            r"luxur(?:y|ious)", r"premium", r"pricier", r"dear",
            rf"{_PRICE}{_OF}{_FILL}(?:high|higher|expensive|steep|above average|pricey)",
            rf"(?:high|higher|top|upper|expensive)(?:[ -]end)? {_PRICE}",
            rf"(?:more than|over|above|upwards of|at least|starting at|in excess of|"
            rf"greater than|higher than|exceeding|excess of|more then|beyond) "
            rf"(?:{_P30}|30(?: euros?| dollars?)?)",
            rf"{_P30} ?(?:or more|plus|and (?:up|above|over|upwards)|\+)",
            r"not (?:very |too |that |so |particularly )?cheap",
        ],
        OTHER: [r"£ ?\d+(?:\.\d\d)?(?: ?(?:-|to) ?£? ?\d+)?", r"\d+ ?(?:pounds?|gbp|quid)"],
    },
    "customer rating": {
        "low": [
            *_stars(_ONE),
            rf"(?:low|poor|bad|terrible|awful|negative|lowly|poorly|badly|low[ -]?)"
            rf"(?:[ -]+(?:customer|user|guest|overall))?[ -]+{_RATED}",
            rf"{_RATED}{_OF}{_FILL}(?:low|lowly|poor|poorly|bad|badly|terribly|negatively|"
            r"one star)",
            r"not (?:very |so |that |too |particularly )?(?:well|highly|good|positively)"
            r"[ -]?(?:rated|reviewed|liked|regarded)",
            r"low[ -]rated", r"badly[ -]rated", r"poorly[ -]rated",
            rf"(?:not|n't|never|no) (?:(?:have|has|got|get|gets|received|receive|a|the|very|so|"
            rf"too|that|particularly|really|any|been|had|very)\s+){{0,3}}(?:good|great|high|best|"
            rf"positive|excellent|top)(?:ly)?[ -]+{_RATED}",
            r"not rated (?:very |so |that |too |particularly )?(?:well|highly|high|good)",
        ],
        "average": [
            *_stars(_THREE),
            rf"(?:average|averagely|mediocre|moderate|moderately|medium|middling|decent|fair|"
            rf"ok|okay|mid|middle|good|mixed|satisfactory)(?:[ -]+(?:customer|user|guest|"
            rf"overall))?[ -]+{_RATED}",
            rf"{_RATED}{_OF}{_FILL}(?:average|averagely|mediocre|moderate|moderately|medium|"
            r"middling|decent|fair|ok|okay|good|satisfactory|three stars)",
            r"mediocre",
        ],
        "high": [
            *_stars(_FIVE),
            rf"(?:high|highly|excellent|excellently|great|very good|top|well|best|outstanding|"
            rf"superb|fantastic|amazing|positive|good|five[ -]star|5[ -]star)(?:[ -]+(?:customer"
            rf"|user|guest|overall))?[ -]+{_RATED}",
            rf"{_RATED}{_OF}{_FILL}(?:high|highly|excellent|excellently|great|very good|good|top|"
            r"well|outstanding|superb|positively|five stars)",
            r"top[ -]rated", r"highly[ -]rated", r"well[ -]rated",
        ],
        OTHER: [r"(?:[0-9]|zero|two|four)(?:\.[0-9])? ?(?:out of|/) ?(?:[0-9]+|five|ten)",
                r"(?:[0-9]|two|four)[ -]?stars?"],
    },
    "area": {
        "city centre": [
            r"(?:city|town)[ -]?cent(?:re|er|ral)", r"cent(?:re|er) of (?:the )?(?:city|town)",
            r"(?:the )?cent(?:re|er) of (?:town|cambridge)", r"downtown", r"in the cent(?:re|er)",
            r"centrally", r"central (?:area|location|cambridge|part|district|city)",
            r"city's cent(?:re|er)", r"cent(?:re|er) of the city", r"inner city",
        ],
        "riverside": [r"river(?:side|front|bank|'s edge)?s?", r"river side", r"waterfront",
                      r"water front", r"waterside"],
    },
    "familyFriendly": {
        "no": [
            rf"{_NEG}[ -]+{_NEG_FILL}{_FAM}[ -]*{_FRIENDLY}",
            rf"{_FAM}[ -]*un-?{_FRIENDLY}", rf"un-?{_FRIENDLY} (?:to|for|towards?) {_WHO}{_FAM}",
            r"adults?[ -]+only", r"only (?:for|to|open to|allows?|admits?) adults",
            r"for adults(?: only)?", r"adults?[ -](?:establishment|establish|venue|place|"
            r"restaurant|pub|shop|atmosphere|only|oriented|orientated|spot|environment|setting|"
            r"crowd|clientele|audience|customers|dining)",
            rf"{_FAM} (?:are|is)(?: not|n't)(?: really| very| so)? (?:welcome|welcomed|allowed|"
            r"permitted|accepted|encouraged|admitted|catered)",
            rf"(?:not|no) (?:(?:a|an|the|very|really|so|too|that|particularly|good|great|ideal|"
            rf"suitable|recommended|appropriate|place|spot|venue|restaurant|pub|shop|coffee|"
            rf"option|choice|destination|somewhere|where|one|best|nice|fun|meant|designed|"
            rf"intended|geared|catered|aimed|open|welcoming|friendly|kind|accommodating|"
            rf"conducive|considered|known|oriented|orientated|suited|targeted|made|built|"
            rf"exactly|really)\s+)"
            rf"{{0,4}}(?:for|to bring|to take|with|to|towards?|of) {_WHO}{_FAM}",
            rf"(?:does not|doesn't|do not|don't|won't|will not|cannot|can't|isn't|is not|no) "
            rf"(?:\w+ ){{0,1}}(?:welcome|allow|accept|cater (?:to|for)|admit|permit|serve|"
            rf"welcoming|allowing|accepting|catering (?:to|for)|admitting|permitting|serving) "
            rf"(?:\w+ ){{0,2}}{_FAM}",
            rf"(?:no|without) {_WHO}{_FAM}", rf"{_FAM}[ -]?free", rf"unsuitable (?:for|to) "
            rf"{_WHO}{_FAM}",
            r"not (?:a |an )?famil(?:y|ies)(?:[ -](?:place|restaurant|pub|venue|spot|"
            r"establishment|type|style|affair|environment|setting|atmosphere|dining|shop))?",
            r"adult establishments?", r"grown[ -]ups? only", r"over[ -]?(?:18|21)s?",
            r"adults?[ -](?:themed|friendly)", r"non[ -]famil(?:y|ies)",
            rf"(?:should not|shouldn't|cannot|can't|could not|couldn't|don't|do not|not) "
            rf"(?:bring|take) {_WHO}{_FAM}",
            rf"no (?:\w+ ){{0,2}}{_FAM} (?:allowed|welcome|permitted|admitted)",
            rf"(?:does not|doesn't|do not|don't|not) (?:allowed?|welcomed?|permitted?) "
            rf"(?:\w+ ){{0,2}}{_FAM}",
        ],
        "yes": [
            rf"{_FAM}[ -]*{_FRIENDLY}",
            rf"(?:suitable|good|great|ideal|perfect|fine|appropriate|recommended|fun|nice|open|"
            rf"welcoming|friendly|geared|catered|caters|cater|catering|great place|good place|"
            rf"place|somewhere|spot|venue|option|choice|safe) (?:for|to|with|towards?) "
            rf"{_WHO}{_FAM}",
            rf"{_FAM} (?:are|is) (?:also |always |very |more than |most |all )?(?:welcome|"
            r"welcomed|allowed|permitted|accepted|encouraged|catered)",
            rf"(?:welcomes?|welcoming|allows?|allowing|accepts?|accepting|accommodates?|"
            rf"accommodating|invites?|caters? (?:to|for)|catering (?:to|for)|admits?) "
            rf"(?:\w+ ){{0,2}}{_FAM}",
            rf"bring(?:ing)? (?:the |your |their |along |whole |entire |all |a )*{_FAM}",
            rf"take (?:the |your |their |whole |entire |all )*{_FAM}",
            rf"for {_WHO}famil(?:y|ies)", rf"for {_WHO}(?:kids|children)",
            r"famil(?:y|ies)[ -](?:place|restaurant|pub|venue|spot|establishment|dining|style|"
            r"environment|atmosphere|setting|outing|outings|meal|meals|affair|shop|fun|"
            r"gatherings?|business)", r"(?:all|any) ages?",
            r"with (?:the |your |their )?(?:kids|children|famil(?:y|ies))",
            r"(?:to|feed) (?:all )?(?:the |your )?(?:whole |entire )?family",
        ],
    },
}

# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    """Lowercase, strip accents ("Café" -> "cafe"), plain apostrophes/dashes, single spaces."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub(r"[\u2018\u2019\u02bc`´]", "'", text)
    text = re.sub(r"[\u2010-\u2015\u2212]", "-", text)
    return " ".join(text.split()).lower()


def _whole_words(patterns: Iterable[str]) -> re.Pattern[str]:
    """One regex of alternatives that match whole words only (``£`` counts as a boundary)."""
    return re.compile("|".join(rf"(?<![\w£])(?:{p})(?![\w])" for p in patterns))


def _venue_pattern(name: str) -> str:
    """"The Golden Curry" -> "(?:the )?golden[ -]*curry"; a final "s" may be "'s" or "s'"."""
    words = _normalise(name).split()
    lead = ""
    if len(words) > 1 and words[0] == "the":
        lead, words = r"(?:the )?", words[1:]
    parts = [re.escape(w[:-1]) + r"'?s'?" if w.endswith("s") and len(w) > 3 else re.escape(w)
             for w in words]
    return lead + r"[ -]*".join(parts)


_COMPILED: dict[str, dict[str, re.Pattern[str]]] = {
    attr: {cls: _whole_words(pats) for cls, pats in classes.items()}
    for attr, classes in PATTERNS.items()
}
_VENUES: dict[str, str] = {_normalise(v): v for v in (*E2E_NAMES, *E2E_NEAR)}
#: Venues E2E uses only as ``near``: one the MR does not have is an added near, not a name.
_NEAR_ONLY = frozenset(_normalise(v) for v in E2E_NEAR) - {_normalise(v) for v in E2E_NAMES}
# All known venues as one regex, one named group each (longest first, so "The Rice Boat"
# is not cut short by a shorter name at the same position); the group name says which.
_VENUE_KEYS = sorted(_VENUES, key=len, reverse=True)
_VENUE_REGEX = re.compile("|".join(rf"(?P<v{i}>(?<![\w£]){_venue_pattern(v)}(?!\w))"
                                   for i, v in enumerate(_VENUE_KEYS)))


@functools.lru_cache(maxsize=4096)
def _literal(value: str) -> re.Pattern[str]:
    """A value outside the vocabulary (a new venue, food or area): matched as written."""
    return _whole_words([_venue_pattern(value)])


def value_class(attr: str, value: str) -> str:
    """The class the matcher compares for an MR value: paired values share one
    (``less than £20`` -> ``cheap``); a value outside the vocabulary is its own class."""
    norm = _normalise(value)
    if attr in ("name", "near"):
        return norm
    return VALUE_CLASSES.get(attr, {}).get(norm, norm)


@dataclass(frozen=True)
class _Match:
    attr: str
    value: str
    start: int
    end: int

    @property
    def catch_all(self) -> bool:
        return self.value == OTHER

    def inside(self, other: _Match) -> bool:
        """Strictly inside ``other`` (contained and shorter)."""
        return (other.start <= self.start and self.end <= other.end
                and (other.end - other.start) > (self.end - self.start))

    def overlaps(self, other: _Match) -> bool:
        return self.start < other.end and other.start < self.end


def _matches(text: str, gold: Mapping[str, str]) -> list[_Match]:
    """Every value match in normalised ``text``, overlaps resolved (module docstring)."""
    found: list[_Match] = []
    for attr, classes in _COMPILED.items():
        for cls, regex in classes.items():
            found += [_Match(attr, cls, m.start(), m.end()) for m in regex.finditer(text)]
        own = gold.get(attr)
        if own is not None and own not in classes:  # a value outside the vocabulary
            found += [_Match(attr, own, m.start(), m.end())
                      for m in _literal(own).finditer(text)]
    found += [_Match("venue", _VENUE_KEYS[int(str(m.lastgroup)[1:])], m.start(), m.end())
              for m in _VENUE_REGEX.finditer(text)]
    for venue in {gold[a] for a in ("name", "near") if a in gold} - _VENUES.keys():
        found += [_Match("venue", venue, m.start(), m.end())
                  for m in _literal(venue).finditer(text)]
    real = [m for m in found if not m.catch_all]
    kept: list[_Match] = []
    for m in found:
        # Inside a longer match of its own attribute ("not family-friendly") or inside a
        # venue name ("Raja Indian Cuisine"); not inside another attribute's phrase, so the
        # "restaurant" of "a family restaurant" still states the eatType.
        if any(m.inside(o) for o in real if o.attr in (m.attr, "venue")):
            continue
        if m.catch_all and any(m.overlaps(o) for o in real):
            continue
        twins = [o for o in found if o is not m and o.attr == m.attr
                 and (o.start, o.end) == (m.start, m.end)]
        if twins:  # one span, several values of one attribute: the MR's, else the first
            own = gold.get(m.attr)
            candidates = [m, *twins]
            best = next((o for o in candidates if o.value == own), None) or next(
                (o for o in found if o in candidates and not o.catch_all), m)
            if best is not m:
                continue
        kept.append(m)
    return kept


@dataclass(frozen=True)
class SlotCheck:
    """The slot errors of one output against its MR.

    ``missing`` and ``wrong`` hold one attribute per erroneous MR slot; ``added`` one
    attribute per value the text adds; ``found`` is what the text realises, per attribute
    (value classes; venue names under ``name``/``near`` as assigned).
    """

    slots: tuple[str, ...]
    missing: tuple[str, ...] = ()
    wrong: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    found: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        """missing + wrong + added: the numerator of SER."""
        return len(self.missing) + len(self.wrong) + len(self.added)


def check_output(mr: str | Mapping[str, str], text: str) -> SlotCheck:
    """Compare one generated ``text`` with its MR (an E2E MR string or a parsed dict)."""
    parsed = parse_mr(mr) if isinstance(mr, str) else dict(mr)
    slots = tuple(a for a in parsed if a in E2E_ATTRIBUTES)
    gold = {a: value_class(a, parsed[a]) for a in slots}
    matches = _matches(_normalise(text), gold)
    realised: dict[str, list[str]] = {}
    for m in sorted(matches, key=lambda m: m.start):
        values = realised.setdefault(m.attr, [])
        if m.value not in values:
            values.append(m.value)
    missing: list[str] = []
    wrong: list[str] = []
    added: list[str] = []
    found: dict[str, tuple[str, ...]] = {}
    for attr in PATTERNS:
        values = list(realised.get(attr, []))
        own = gold.get(attr)
        if attr == "eatType" and own != "restaurant" and "restaurant" in values and (
                own is None or len(values) > 1):
            values.remove("restaurant")  # the generic noun, not a claim (module docstring)
        if values:
            found[attr] = tuple(values)
        if own is None:
            added += [attr] * len(values)
        elif own in values:
            added += [attr] * (len(values) - 1)
        elif values:
            wrong.append(attr)
            added += [attr] * (len(values) - 1)
        else:
            missing.append(attr)
    # Venues: the MR's name and near, then others as wrong (near first) or added.
    venues = realised.get("venue", [])
    pending = [a for a in ("near", "name") if a in gold and gold[a] not in venues]
    for attr in ("name", "near"):
        if attr in gold and gold[attr] in venues:
            found[attr] = (gold[attr],)
    for venue in venues:
        if venue in (gold.get("name"), gold.get("near")):
            continue
        if pending:
            attr = pending.pop(0)
            wrong.append(attr)
        else:
            attr = "near" if venue in _NEAR_ONLY else "name"
            added.append(attr)
        found[attr] = (*found.get(attr, ()), venue)
    missing += pending
    order = {a: i for i, a in enumerate(E2E_ATTRIBUTES)}

    def ordered(attrs: list[str]) -> tuple[str, ...]:
        return tuple(sorted(attrs, key=order.__getitem__))

    return SlotCheck(slots=slots, missing=ordered(missing), wrong=ordered(wrong),
                     added=ordered(added),
                     found={a: found[a] for a in E2E_ATTRIBUTES if a in found})


def _percent(errors: int, slots: int) -> float | None:
    return 100.0 * errors / slots if slots else None


def slot_errors(outputs: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, Any]:
    """SER of many outputs, overall and per attribute (percent, as the E2E papers print it).

    Args:
        outputs: MR -> generated text, or ``(MR, text)`` pairs (several texts per MR, e.g.
            human references).

    Returns:
        ``{"SER", "slots", "missing", "wrong", "added", "outputs", "outputs_with_errors",
        "per_attribute": {attr: {"slots", "missing", "wrong", "added", "SER"}}}``: SER in
        percent of the MR slots (of that attribute, for ``per_attribute``; None where the
        MRs have no such slot, as an attribute can still collect *added* errors), counts as
        integers, attributes in E2E order. ``SER`` is 0.0 when there is nothing to score.
    """
    pairs = outputs.items() if isinstance(outputs, Mapping) else outputs
    per = {a: {"slots": 0, "missing": 0, "wrong": 0, "added": 0} for a in E2E_ATTRIBUTES}
    n_outputs = with_errors = 0
    for mr, text in pairs:
        result = check_output(mr, text)
        n_outputs += 1
        with_errors += result.errors > 0
        for attr in result.slots:
            per[attr]["slots"] += 1
        for kind in ("missing", "wrong", "added"):
            for attr in getattr(result, kind):
                per[attr][kind] += 1
    totals = {k: sum(p[k] for p in per.values()) for k in ("slots", "missing", "wrong", "added")}
    errors = totals["missing"] + totals["wrong"] + totals["added"]
    return {
        "SER": _percent(errors, totals["slots"]) or 0.0,
        **totals,
        "outputs": n_outputs,
        "outputs_with_errors": with_errors,
        "per_attribute": {
            a: {**p, "SER": _percent(p["missing"] + p["wrong"] + p["added"], p["slots"])}
            for a, p in per.items()
        },
    }


def describe(report: Mapping[str, Any]) -> str:
    """One line for a terminal: overall SER with its counts, then SER per attribute (the
    attributes no MR had are left out; "-" where an attribute only collected added errors)."""
    per = report.get("per_attribute", {})
    parts = [f"{attr} {'-' if p['SER'] is None else format(p['SER'], '.1f')}"
             for attr, p in per.items() if p["slots"] or p["added"]]
    return (f"slot errors: SER {report['SER']:.2f}% (missing {report['missing']}, wrong "
            f"{report['wrong']}, added {report['added']} of {report['slots']} MR slots; "
            f"{report['outputs_with_errors']} of {report['outputs']} outputs with an error); "
            f"per attribute (%): " + ", ".join(parts))
