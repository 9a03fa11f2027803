"""Tests for runner.evaluation.slots: the slot error rate (SER) of E2E outputs.

Why these tests: SER exists to catch outputs that contradict their MR, which the word-overlap
metrics barely see, so each error kind gets hand-made cases, including the four a real
150-step splitlora model produced (issue 12): ``familyFriendly[no]`` as "a family-friendly
restaurant", ``eatType[pub]`` as "restaurant", ``priceRange[more than £30]`` as "a price
range of £30", ``food[French]`` left out. Our SER must also be the field's standard one, the
``slot_error.py`` of tuetschek/e2e-cleaning (Dušek, Howcroft and Rieser, INLG 2019), or it
cannot be compared with published figures (issue 28): its per-reference results on the E2E
dev set (``../shared/data/e2e/ser-reference/``) and its totals on a model's outputs
(``../shared/data/e2e/scorer-example/``, case 3) are checked here, and so are the script's
readings that a reader might not expect (runner/evaluation/slots.py lists them).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from runner.dataset import data
from runner.evaluation import slots
from runner.evaluation.slots import check_output, slot_errors

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT.parent / "shared" / "data" / "e2e"
#: slot_error.py's result for every dev-set reference (its README describes the columns).
SCRIPT_TSV = E2E / "ser-reference" / "devset-references.tsv"
CASE3 = E2E / "scorer-example"

#: Acceptance (issue 28): our total SER within this many points of the script's, and the same
#: (added, missing, wrong) on at least this share of the references.
SER_TOLERANCE = 0.3
MIN_AGREEMENT = 0.97

#: What slot_error.py prints for case 3 (scorer-example/README.md): added, missing, wrong
#: value, MR slots, SER in %, and the share of outputs with no error in %.
CASE3_SCRIPT = {"added": 7, "missing": 74, "wrong": 4, "slots": 348}
CASE3_SCRIPT_SER, CASE3_SCRIPT_OK = 24.43, 3.64

#: The script's slot names -> E2E attributes (its ``diff`` column uses its names).
SCRIPT_SLOTS = {"name": "name", "eat_type": "eatType", "food": "food",
                "price_range": "priceRange", "rating": "customer rating", "area": "area",
                "family_friendly": "familyFriendly", "near": "near"}


def _errors(mr: str, text: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    result = check_output(mr, text)
    return result.missing, result.wrong, result.added


# --- the four errors of the issue ----------------------------------------------------------


def test_family_friendly_no_said_as_family_friendly_is_wrong() -> None:
    mr = "name[The Eagle], eatType[restaurant], familyFriendly[no]"
    assert _errors(mr, "The Eagle is a family-friendly restaurant.") == (
        (), ("familyFriendly",), ())


def test_pub_said_as_restaurant_is_wrong() -> None:
    mr = "name[The Eagle], eatType[pub], area[riverside]"
    assert _errors(mr, "The Eagle is a restaurant by the riverside.") == ((), ("eatType",), ())


def test_more_than_30_said_as_30_is_an_error() -> None:
    """The script has no pattern for a bare "£30", so the value counts as not said."""
    mr = "name[The Eagle], priceRange[more than £30]"
    assert _errors(mr, "The Eagle has a price range of £30.") == (("priceRange",), (), ())


def test_food_left_out_is_missing() -> None:
    mr = "name[The Eagle], eatType[restaurant], food[French]"
    assert _errors(mr, "The Eagle is a restaurant.") == (("food",), (), ())


# --- each error kind -------------------------------------------------------------------------


@pytest.mark.parametrize(("mr", "text", "missing"), [
    ("name[Zizzi], area[city centre]", "Zizzi is a nice place.", ("area",)),
    ("name[Zizzi], near[Burger King]", "Zizzi is a nice place.", ("near",)),
    ("name[Zizzi], customer rating[low]", "It is a nice place.", ("name", "customer rating")),
    ("name[Zizzi], familyFriendly[yes], priceRange[cheap]", "Zizzi is a place to eat.",
     ("priceRange", "familyFriendly")),
])
def test_missing(mr: str, text: str, missing: tuple[str, ...]) -> None:
    assert _errors(mr, text) == (missing, (), ())


@pytest.mark.parametrize(("mr", "text", "wrong"), [
    ("name[Zizzi], food[Italian]", "Zizzi serves Chinese food.", "food"),
    ("name[Zizzi], area[riverside]", "Zizzi is in the city centre.", "area"),
    ("name[Zizzi], customer rating[3 out of 5]", "Zizzi is rated 5 out of 5.", "customer rating"),
    ("name[Zizzi], customer rating[high]", "Zizzi has a low customer rating.", "customer rating"),
    ("name[Zizzi], customer rating[1 out of 5]", "Zizzi has a five star rating.",
     "customer rating"),
    ("name[Zizzi], priceRange[cheap]", "Zizzi is expensive.", "priceRange"),
    ("name[Zizzi], priceRange[£20-25]", "Zizzi charges less than £20.", "priceRange"),
    ("name[Zizzi], priceRange[high]", "Zizzi is moderately priced.", "priceRange"),
    ("name[Zizzi], priceRange[cheap]", "Zizzi is not cheap.", "priceRange"),
    ("name[Zizzi], eatType[coffee shop]", "Zizzi is a pub.", "eatType"),
    ("name[Zizzi], familyFriendly[yes]", "Zizzi is not child friendly.", "familyFriendly"),
    ("name[Zizzi], near[Burger King]", "Zizzi is near Café Rouge.", "near"),
    ("name[Zizzi], near[Burger King]", "The Eagle is near Burger King.", "name"),
])
def test_wrong(mr: str, text: str, wrong: str) -> None:
    assert _errors(mr, text) == ((), (wrong,), ())


@pytest.mark.parametrize(("mr", "text", "added"), [
    ("name[Zizzi], area[riverside]", "Zizzi serves Chinese food by the river.", ("food",)),
    ("name[Zizzi], area[riverside]", "Zizzi, near Café Rouge, is by the river.", ("near",)),
    ("name[Zizzi], area[riverside]", "Zizzi and The Eagle are by the river.", ("name",)),
    ("name[Zizzi], food[Italian]", "Zizzi is a cheap Italian pub.", ("eatType", "priceRange")),
    ("name[Zizzi], food[Italian]", "Zizzi serves Italian food for families.",
     ("familyFriendly",)),
    ("name[Zizzi], food[French]", "Zizzi serves French and Japanese food.", ("food",)),
    ("name[Zizzi], food[Italian]", "Zizzi serves Italian food and has a 5 star rating.",
     ("customer rating",)),
    ("name[Zizzi], familyFriendly[yes]",
     "Zizzi is family friendly, but children are not welcome.", ("familyFriendly",)),
])
def test_added(mr: str, text: str, added: tuple[str, ...]) -> None:
    assert _errors(mr, text) == ((), (), added)


# --- correct paraphrases: no error ---------------------------------------------------------


@pytest.mark.parametrize(("mr", "text"), [
    ("name[The Eagle], familyFriendly[no]", "The Eagle is not family-friendly."),
    ("name[The Eagle], familyFriendly[no]", "The Eagle is not kid friendly."),
    ("name[The Eagle], familyFriendly[no]", "The Eagle isn't family friendly."),
    ("name[The Eagle], familyFriendly[no]", "At The Eagle, children are not welcome."),
    ("name[The Eagle], familyFriendly[no]", "The Eagle is an adults only venue."),
    ("name[The Eagle], familyFriendly[no]", "The Eagle is not considered child friendly."),
    ("name[The Eagle], familyFriendly[no]", "The Eagle does not allow children."),
    ("name[The Eagle], familyFriendly[no]", "The Eagle is a non-family-friendly place."),
    ("name[The Eagle], familyFriendly[yes]", "The Eagle welcomes the whole family."),
    ("name[The Eagle], familyFriendly[yes]", "The Eagle is kid-friendly."),
    ("name[The Eagle], priceRange[high]", "The Eagle's prices are high."),
    # one span, several values: the MR's wins ("expensive" is high and more than £30)
    ("name[The Eagle], priceRange[high]", "The Eagle is expensive."),
    ("name[The Eagle], priceRange[more than £30]", "The Eagle is expensive."),
    ("name[The Eagle], priceRange[more than £30]", "The Eagle charges more than £30."),
    ("name[The Eagle], priceRange[cheap]", "The Eagle has low prices."),
    ("name[The Eagle], priceRange[less than £20]", "The Eagle costs under 20 pounds."),
    ("name[The Eagle], priceRange[£20-25]", "The Eagle costs £20-25."),
    ("name[The Eagle], priceRange[moderate]", "The Eagle is moderately priced."),
    ("name[The Eagle], priceRange[less than £20]", "The Eagle is moderately priced."),
    ("name[The Eagle], customer rating[5 out of 5]", "The Eagle is rated 5 out of 5."),
    ("name[The Eagle], customer rating[5 out of 5]", "The Eagle is rated five out of five stars."),
    ("name[The Eagle], customer rating[5 out of 5]", "The Eagle is highly rated."),
    ("name[The Eagle], customer rating[high]", "The Eagle has a high customer rating."),
    ("name[The Eagle], customer rating[1 out of 5]", "The Eagle has a one star rating."),
    ("name[The Eagle], customer rating[1 out of 5]", "The Eagle is rated low, 1 out of 5."),
    ("name[The Eagle], customer rating[low]", "The Eagle is not well rated."),
    ("name[The Eagle], customer rating[average]", "The Eagle's customer rating is average."),
    ("name[The Eagle], customer rating[3 out of 5]", "The Eagle is rated 3 out of 5 stars."),
    ("name[The Eagle], near[Burger King]", "The Eagle is near the Burger King."),
    ("name[The Eagle], near[Café Rouge]", "The Eagle is close to Café Rouge."),
    ("name[The Eagle], area[riverside]", "The Eagle is by the riverside."),
    ("name[The Eagle], area[riverside]", "The Eagle is on the river."),
    ("name[The Eagle], area[city centre]", "The Eagle is in the centre of the city."),
    ("name[The Eagle], area[city centre]", "The Eagle is in the city center."),
    ("name[The Eagle], eatType[coffee shop]", "The Eagle is a café."),
    ("name[The Eagle], food[English]", "The Eagle serves British food."),
    ("name[The Eagle], food[Fast food]", "The Eagle is a fast food place."),
    # a value inside a longer match (a venue name) is not that value
    ("name[The Eagle], near[Raja Indian Cuisine]", "The Eagle is near Raja Indian Cuisine."),
    ("name[The Eagle], near[Rainbow Vegetarian Café]",
     "The Eagle is near Rainbow Vegetarian Café."),
    # "The Rice Boat" is both a name and a near: the MR says which
    ("name[The Rice Boat], area[riverside]", "The Rice Boat is by the riverside."),
    ("name[Zizzi], near[The Rice Boat]", "Zizzi is near The Rice Boat."),
    # matched case-insensitively, on text whose whitespace runs count as one space
    ("name[The Eagle], area[city centre]", "THE EAGLE is in the City\n  Centre."),
    ("name[The Eagle], priceRange[Less than £20]", "The Eagle costs less than £20."),
])
def test_correct_paraphrases_are_not_errors(mr: str, text: str) -> None:
    result = check_output(mr, text)
    assert result.errors == 0, (text, result)


# --- the script's readings that a reader might not expect (runner/evaluation/slots.py) -----


@pytest.mark.parametrize(("mr", "text", "errors"), [
    # "restaurant", "pub", "café"/"coffee" anywhere state an eatType
    ("name[The Eagle], area[riverside]", "The Eagle is a restaurant by the river.",
     ((), (), ("eatType",))),
    ("name[The Eagle], eatType[pub]", "The Eagle is a pub and restaurant.", ((), (), ("eatType",))),
    # accents and typographic apostrophes count
    ("name[The Eagle], near[Café Rouge]", "The Eagle is close to Cafe Rouge.",
     (("near",), (), ("eatType",))),
    ("name[The Eagle], familyFriendly[no]", "The Eagle isn’t family friendly.",
     ((), ("familyFriendly",), ())),
    # phrasings no pattern covers are not said
    ("name[The Eagle], familyFriendly[yes]", "Bring your kids to The Eagle.",
     (("familyFriendly",), (), ())),
    ("name[The Eagle], priceRange[high]", "The price range of The Eagle is high.",
     (("priceRange",), (), ())),
    ("name[The Eagle], customer rating[low]", "The Eagle is not rated well.",
     (("customer rating",), (), ())),
    ("name[The Eagle], food[Fast food]", "The Eagle is a fast-food place.", (("food",), (), ())),
    ("name[The Eagle], food[Japanese]", "Eagle's menu is Japanese.", (("name",), (), ())),
    ("name[The Eagle], eatType[restaurant], familyFriendly[yes]",
     "The Eagle is a family restaurant.", (("familyFriendly",), (), ())),
    # "not cheap" is more than £30 (first of its values) when the MR says high
    ("name[The Eagle], priceRange[high], familyFriendly[yes]",
     "The Eagle is not cheap, but family friendly.", ((), ("priceRange",), ())),
    # a venue that is not the MR's: a name before a near, in the script's order
    ("name[Zizzi]", "Zizzi is near The Rice Boat.", ((), (), ("name",))),
])
def test_the_scripts_readings(mr: str, text: str,
                              errors: tuple[tuple[str, ...], ...]) -> None:
    assert _errors(mr, text) == errors


def test_a_low_rating_counts_per_mention() -> None:
    """The script counts every value once, except a low customer rating (its counting
    code): said twice for ``customer rating[low]`` it is one repeated error, which SER
    counts; for ``1 out of 5`` the same phrases are that value, counted once."""
    text = "Zizzi has a low rating. Reviews are poor."
    low = check_output("name[Zizzi], customer rating[low]", text)
    assert (low.repeated, low.errors) == (("customer rating",), 1)
    assert low.found["customer rating"] == ("low",)
    assert check_output("name[Zizzi], customer rating[1 out of 5]", text).errors == 0
    report = slot_errors([("name[Zizzi], customer rating[low]", text)])
    assert (report["repeated"], report["SER"]) == (1, pytest.approx(50.0))
    assert report["per_attribute"]["customer rating"]["repeated"] == 1


def test_every_attribute_is_matched_in_the_scripts_order() -> None:
    """Same-span ties between values that are not the MR's go to the first in the script's
    order, so that order must cover every attribute and value exactly once."""
    assert sorted(slots._MATCH_ORDER) == sorted(data.E2E_ATTRIBUTES) == sorted(slots.PATTERNS)
    for attr, values in slots.PATTERNS.items():
        assert slots.VALUE_CLASSES[attr] == {v.lower(): v for v in values}


def test_unknown_values_match_as_written() -> None:
    """A venue, food or area outside the E2E vocabulary (another data set, a test set with
    new names) is matched literally rather than always counted missing."""
    mr = "name[Nandos], food[Thai], near[Kings College]"
    assert check_output(mr, "Nandos serves Thai food near Kings College.").errors == 0
    assert _errors(mr, "Nandos serves food near Kings College.") == (("food",), (), ())


# --- aggregation ---------------------------------------------------------------------------


def test_slot_errors_counts_and_rates() -> None:
    outputs = {
        "name[The Eagle], eatType[pub], familyFriendly[no]":
            "The Eagle is a family-friendly restaurant.",  # eatType wrong, familyFriendly wrong
        "name[Zizzi], food[French], area[riverside]":
            "Zizzi is by the river and serves Chinese food.",  # food wrong
        "name[Cotto], near[Burger King]": "Cotto is near Burger King.",  # correct
    }
    report = slot_errors(outputs)
    assert report["slots"] == 3 + 3 + 2
    assert (report["missing"], report["wrong"], report["added"], report["repeated"]) == (
        0, 3, 0, 0)
    assert report["SER"] == pytest.approx(100 * 3 / 8)
    assert (report["outputs"], report["outputs_with_errors"]) == (3, 2)
    per = report["per_attribute"]
    assert list(per) == list(data.E2E_ATTRIBUTES)
    assert per["eatType"] == {"slots": 1, "missing": 0, "wrong": 1, "added": 0, "repeated": 0,
                              "SER": 100.0}
    assert per["name"]["SER"] == 0.0
    assert per["customer rating"]["SER"] is None  # no MR has one
    assert "eatType 100.0" in slots.describe(report)


def test_slot_errors_takes_pairs_and_nothing() -> None:
    pairs = [("name[Zizzi], area[riverside]", "Zizzi is by the river."),
             ("name[Zizzi], area[riverside]", "Zizzi is a place.")]
    assert slot_errors(pairs)["SER"] == pytest.approx(25.0)
    assert slot_errors({})["SER"] == 0.0


def test_every_synthetic_value_is_known_and_synthetic_references_are_nearly_clean() -> None:
    """The generator's vocabulary (runner/dataset/data.py) is the matcher's, and its templated
    references, which state every attribute, are read as saying so: a pattern gap fails
    here. Not exactly 0: the script's windowed price and rating patterns read across
    neighbouring phrases ("a cheap price range and has a high customer rating" also says
    "price range ... high"), 10 errors in 13,011 slots at the time of writing."""
    for attr, values in data._VALUES.items():
        for value in values:
            assert value.lower() in slots.VALUE_CLASSES[attr], (attr, value)
    assert set(data._NAMES) <= set(slots.E2E_NAMES)
    assert set(data._NEAR) <= set(slots.E2E_NEAR)
    df = data.synthetic_e2e(400)
    report = slot_errors(zip(df["mr"], df["ref"], strict=True))
    assert report["SER"] < 0.25, slots.describe(report)
    assert report["wrong"] == 0, slots.describe(report)


# --- agreement with the script (issue 28) ----------------------------------------------------


def _script_counts(diff: str) -> dict[str, tuple[int, int, int]]:
    """The script's ``diff`` cell -> attribute -> (added, missing, wrong), by its own rule:
    per slot, values said but not in the MR (+) against MR values not said (-)."""
    cell = next(csv.reader([diff])) if diff.startswith('"') else [diff]  # quoted twice
    out: dict[str, tuple[int, int, int]] = {}
    for slot, values in json.loads(cell[0]).items():
        said = sum(n for n in values.values() if n > 0)
        unsaid = -sum(n for n in values.values() if n < 0)
        out[SCRIPT_SLOTS[slot]] = (max(said - unsaid, 0), max(unsaid - said, 0),
                                   min(said, unsaid))
    return out


@pytest.mark.skipif(not SCRIPT_TSV.is_file(), reason=f"{SCRIPT_TSV} not present")
def test_dev_references_agree_with_the_standard_script() -> None:
    """Every dev-set reference against its own MR, as the script scored it: the total SER
    and the per-reference (added, missing, wrong), overall and per attribute."""
    with SCRIPT_TSV.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    n_slots = sum(row["mr"].count("[") for row in rows)
    script_errors = sum(int(row[k]) for row in rows for k in ("added", "missing", "wrong_value"))
    script_ser = 100 * script_errors / n_slots
    report = slot_errors((row["mr"], row["ref"]) for row in rows)
    print("ours:", slots.describe(report), f"| script: SER {script_ser:.2f}%")
    assert report["outputs"] == len(rows) == 4672
    assert report["slots"] == n_slots
    assert abs(report["SER"] - script_ser) <= SER_TOLERANCE
    same = same_per_attribute = 0
    kinds: Counter[str] = Counter()
    for row in rows:
        result = check_output(row["mr"], row["ref"])
        ours = (len(result.added), len(result.missing), len(result.wrong) + len(result.repeated))
        same += ours == (int(row["added"]), int(row["missing"]), int(row["wrong_value"]))
        per_attr = {a: c for a in data.E2E_ATTRIBUTES
                    if any(c := (result.added.count(a), result.missing.count(a),
                                 result.wrong.count(a)))}
        script = _script_counts(row["diff"])
        same_per_attribute += per_attr == script
        kinds.update(a for a in set(per_attr) | set(script) if per_attr.get(a) != script.get(a))
    assert same / len(rows) >= MIN_AGREEMENT, kinds.most_common()
    assert same_per_attribute / len(rows) >= MIN_AGREEMENT, kinds.most_common()


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.skipif(not (CASE3 / "model-outputs.txt").is_file(), reason=f"{CASE3} not present")
def test_model_outputs_agree_with_the_standard_script() -> None:
    """Case 3 of scorer-example/README.md: a small model's outputs, where wrong values and
    additions are frequent enough to matter."""
    mrs, outputs = _lines(CASE3 / "model-mrs.txt"), _lines(CASE3 / "model-outputs.txt")
    assert len(mrs) == len(outputs) == 55
    report = slot_errors(list(zip(mrs, outputs, strict=True)))
    print(slots.describe(report))
    assert {k: report[k] for k in CASE3_SCRIPT} == CASE3_SCRIPT
    assert report["repeated"] == 0
    assert round(report["SER"], 2) == CASE3_SCRIPT_SER
    fully_correct = 100 * (1 - report["outputs_with_errors"] / report["outputs"])
    assert round(fully_correct, 2) == CASE3_SCRIPT_OK
