"""Tests for runner.evaluation.slots: the slot error rate (SER) of E2E outputs.

Why these tests: SER exists to catch outputs that contradict their MR, which the word-overlap
metrics barely see, so each error kind gets hand-made cases, including the four a real
150-step splitlora model produced (issue 12): ``familyFriendly[no]`` as "a family-friendly
restaurant", ``eatType[pub]`` as "restaurant", ``priceRange[more than £30]`` as "a price
range of £30" (wrong), ``food[French]`` left out (missing). A matcher that flags correct
paraphrases would bury those errors in noise, so paraphrases that must *not* count are
tested as firmly. The human references of the real E2E dev set bound the false alarms
(and the real errors those references contain; see runner/evaluation/slots.py for the figure).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from runner.dataset import data
from runner.evaluation import slots
from runner.evaluation.slots import check_output, slot_errors

ROOT = Path(__file__).resolve().parents[1]
DEVSET = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"

#: Measured on the dev set's 4,672 human references (runner/evaluation/slots.py docstring).
DEVSET_SER_BOUND = 10.0


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


def test_more_than_30_said_as_30_is_wrong() -> None:
    mr = "name[The Eagle], priceRange[more than £30]"
    assert _errors(mr, "The Eagle has a price range of £30.") == ((), ("priceRange",), ())


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
    ("name[Zizzi], customer rating[3 out of 5]", "Zizzi is rated 4 out of 5.", "customer rating"),
    ("name[Zizzi], customer rating[high]", "Zizzi has a low customer rating.", "customer rating"),
    ("name[Zizzi], customer rating[1 out of 5]", "Zizzi has a five star rating.",
     "customer rating"),
    ("name[Zizzi], priceRange[cheap]", "Zizzi is expensive.", "priceRange"),
    ("name[Zizzi], priceRange[£20-25]", "Zizzi charges less than £20.", "priceRange"),
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
    ("name[Zizzi], food[Italian]", "Zizzi serves Italian food for the whole family.",
     ("familyFriendly",)),
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
    ("name[The Eagle], familyFriendly[no]", "At The Eagle, children are not welcome."),
    ("name[The Eagle], familyFriendly[no]", "The Eagle isn’t family friendly."),
    ("name[The Eagle], familyFriendly[no]", "The Eagle is an adults only venue."),
    ("name[The Eagle], familyFriendly[no]", "The Eagle is not considered child friendly."),
    ("name[The Eagle], familyFriendly[no]", "The Eagle does not allow children."),
    ("name[The Eagle], familyFriendly[no]", "The Eagle is a non-family-friendly place."),
    ("name[The Eagle], familyFriendly[yes]", "The Eagle welcomes the whole family."),
    ("name[The Eagle], familyFriendly[yes]", "The Eagle is kid-friendly."),
    ("name[The Eagle], familyFriendly[yes]", "Bring your kids to The Eagle."),
    ("name[The Eagle], priceRange[high]", "The price range of The Eagle is high."),
    ("name[The Eagle], priceRange[high]", "The Eagle is expensive."),
    ("name[The Eagle], priceRange[more than £30]", "The Eagle is expensive."),
    ("name[The Eagle], priceRange[more than £30]", "The Eagle charges more than £30."),
    ("name[The Eagle], priceRange[cheap]", "The Eagle has low prices."),
    ("name[The Eagle], priceRange[less than £20]", "The Eagle costs under 20 pounds."),
    ("name[The Eagle], priceRange[£20-25]", "The Eagle costs £20-25."),
    ("name[The Eagle], priceRange[moderate]", "The Eagle is moderately priced."),
    ("name[The Eagle], customer rating[5 out of 5]", "The Eagle is rated 5 out of 5."),
    ("name[The Eagle], customer rating[5 out of 5]", "The Eagle is highly rated."),
    ("name[The Eagle], customer rating[high]", "The Eagle has a high customer rating."),
    ("name[The Eagle], customer rating[1 out of 5]", "The Eagle has a one star rating."),
    ("name[The Eagle], customer rating[low]", "The Eagle is not rated well."),
    ("name[The Eagle], customer rating[average]", "The Eagle's customer rating is average."),
    ("name[The Eagle], customer rating[3 out of 5]", "The Eagle is rated 3 out of 5 stars."),
    ("name[The Eagle], near[Burger King]", "The Eagle is near the Burger King."),
    ("name[The Eagle], near[Café Rouge]", "The Eagle is close to Cafe Rouge."),
    ("name[The Eagle], area[riverside]", "The Eagle is by the riverside."),
    ("name[The Eagle], area[riverside]", "The Eagle is on the river."),
    ("name[The Eagle], area[city centre]", "The Eagle is in the centre of the city."),
    ("name[The Eagle], area[city centre]", "The Eagle is in the city center."),
    ("name[The Eagle], eatType[coffee shop]", "The Eagle is a café."),
    ("name[The Eagle], food[English]", "The Eagle serves British food."),
    ("name[The Eagle], food[Fast food]", "The Eagle is a fast-food place."),
    # names as E2E writes them: "The" dropped, possessive, near a venue containing a value
    ("name[The Eagle], food[Japanese]", "Eagle's menu is Japanese."),
    ("name[The Eagle], near[Raja Indian Cuisine]", "The Eagle is near Raja Indian Cuisine."),
    ("name[The Eagle], near[Rainbow Vegetarian Café]",
     "The Eagle is near Rainbow Vegetarian Café."),
    # "restaurant" is the generic noun for any venue (runner/evaluation/slots.py)
    ("name[The Eagle], area[riverside]", "The Eagle is a restaurant by the river."),
    ("name[The Eagle], eatType[pub]", "The Eagle is a pub and restaurant."),
    # a negation does not reach across a conjunction
    ("name[The Eagle], priceRange[high], familyFriendly[yes]",
     "The Eagle is not cheap, but family friendly."),
    # a family restaurant: the eatType survives inside the familyFriendly phrase
    ("name[The Eagle], eatType[restaurant], familyFriendly[yes]",
     "The Eagle is a family restaurant."),
])
def test_correct_paraphrases_are_not_errors(mr: str, text: str) -> None:
    result = check_output(mr, text)
    assert result.errors == 0, (text, result)


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
    assert (report["missing"], report["wrong"], report["added"]) == (0, 3, 0)
    assert report["SER"] == pytest.approx(100 * 3 / 8)
    assert (report["outputs"], report["outputs_with_errors"]) == (3, 2)
    per = report["per_attribute"]
    assert list(per) == list(data.E2E_ATTRIBUTES)
    assert per["eatType"] == {"slots": 1, "missing": 0, "wrong": 1, "added": 0, "SER": 100.0}
    assert per["name"]["SER"] == 0.0
    assert per["customer rating"]["SER"] is None  # no MR has one


def test_slot_errors_takes_pairs_and_nothing() -> None:
    pairs = [("name[Zizzi], area[riverside]", "Zizzi is by the river."),
             ("name[Zizzi], area[riverside]", "Zizzi is a place.")]
    assert slot_errors(pairs)["SER"] == pytest.approx(25.0)
    assert slot_errors({})["SER"] == 0.0


def test_every_synthetic_value_is_known_and_synthetic_references_are_clean() -> None:
    """The generator's vocabulary (runner/dataset/data.py) is the matcher's, and its templated
    references, which state every attribute, score no error: a pattern gap or a false
    alarm in the templates' wording fails here."""
    for attr, values in data._VALUES.items():
        for value in values:
            assert value.lower() in slots.VALUE_CLASSES[attr], (attr, value)
    assert set(data._NAMES) <= set(slots.E2E_NAMES)
    assert set(data._NEAR) <= set(slots.E2E_NEAR)
    df = data.synthetic_e2e(400)
    report = slot_errors(zip(df["mr"], df["ref"], strict=True))
    assert report["SER"] == 0.0, report


@pytest.mark.skipif(not DEVSET.is_file(), reason=f"{DEVSET} not present")
def test_human_references_of_the_devset_have_a_low_slot_error_rate() -> None:
    """Every dev-set reference against its own MR. Human references contain real slot
    errors (mostly an attribute left out), so this is not 0; a matcher that misreads
    common paraphrases would push it far above the measured 8.7 %."""
    with DEVSET.open(newline="", encoding="utf-8") as handle:
        pairs = [(row["mr"], row["ref"]) for row in csv.DictReader(handle)]
    report = slot_errors(pairs)
    print("dev-set human references:", {k: v for k, v in report.items()
                                        if k != "per_attribute"})
    assert report["outputs"] == len(pairs) == 4672
    assert report["SER"] < DEVSET_SER_BOUND
    # wrong values are rare in human references: a high count means a misread paraphrase
    assert report["wrong"] < 0.015 * report["slots"]
