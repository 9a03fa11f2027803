"""E2E NLG data: finding it, loading it, splitting it by MR, sharding it over clients, encoding it.

Why this module exists: every method in the testbed (centralised LoRA, SplitLoRA, HSplitLoRA, ...)
must see *exactly* the same examples, splits and client shards for a given seed, or the comparison
between methods is meaningless. So everything that decides "which rows go where" lives here, is
seeded, and never depends on dict/set iteration order or on the network state.

The method (docs/method.md, "Data: E2E NLG"): a record is a meaning representation (MR) and one
reference text; train on ``"<MR> || <text><eos>"`` with the loss on the text only; several refs
share an MR, so train/validation/test are split by MR, never by row; clients get IID shards or a
Dirichlet(alpha) non-IID split over an MR attribute such as ``eatType``.

Where the data comes from (:func:`resolve_data`): an explicit ``--data`` spec, then
``$TESTBED_DATA``, then a cached copy, then a one-off download of the official release; a
directory holding the whole release is kept whole (:func:`resolve_source`), and
runner/dataset/splits.py decides which of its files train, validate and test a run. A
deterministic synthetic E2E-like generator (:func:`synthetic_e2e`) lets everything run with no
data and no network; runs label it so its numbers are never mistaken for real E2E results.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import random
import re
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from runner.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_E2E_URL",
    "E2E_URL_ENV",
    "SYNTHETIC",
    "ClientBatches",
    "cache_dir",
    "collate",
    "encode_example",
    "encode_frame",
    "format_prompt",
    "load_e2e",
    "parse_mr",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "is_release_dir",
    "references_by_mr",
    "resolve_data",
    "resolve_source",
    "split_by_mr",
    "synthetic_e2e",
]

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
"""Data spec meaning "use the synthetic generator" (``--data synthetic``)."""

E2E_URL_ENV = "TESTBED_E2E_URL"
"""Environment variable that overrides the download URL (tests point it at a loopback server)."""

DATA_ENV = "TESTBED_DATA"
"""Environment variable naming an E2E CSV, used when no ``--data`` is given."""

CACHE_ENV = "TESTBED_CACHE"
"""Environment variable overriding the cache root (default ``~/.cache/hsplitlora-testbed``)."""

DEFAULT_E2E_URL = (
    "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
)
"""Official E2E NLG Challenge release: a zip with ``e2e-dataset/{train,dev}set.csv`` and more."""

DOWNLOAD_TIMEOUT_S = 20.0
"""Socket timeout for the download: long enough for a slow link, short enough not to hang a run."""

E2E_FILES = ("trainset.csv", "devset.csv", "testset_w_refs.csv")
"""CSV files taken out of the release zip; anything else in the archive is ignored."""

RELEASE_FILES = {"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"}
"""The official E2E split: which release file feeds which split (runner/dataset/splits.py)."""

PREFERRED_CSV = ("trainset.csv", "devset.csv")
"""Which cached CSV :func:`resolve_data` returns, best first (the biggest one we have)."""

IGNORE_INDEX = -100
"""Label value that ``torch.nn.CrossEntropyLoss`` (and HF models) ignore: prompt and padding."""

E2E_ATTRIBUTES = (
    "name",
    "eatType",
    "food",
    "priceRange",
    "customer rating",
    "area",
    "familyFriendly",
    "near",
)
"""The E2E MR attributes, in the order the E2E data writes them."""

_USE_DATA_HINT = "pass --data PATH to an E2E CSV with columns mr,ref, or --data synthetic"

_MR_ITEM = re.compile(r"\s*([^,\[\]]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


# --------------------------------------------------------------------------------------------
# Finding the data
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of the testbed's cache: ``$TESTBED_CACHE`` or ``~/.cache/hsplitlora-testbed``.

    Why a function and not a constant: tests (and users on a shared machine) redirect the cache
    with the environment variable after import. The directory is not created here; writers do.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "hsplitlora-testbed"


def _e2e_cache() -> Path:
    """Directory holding the extracted E2E CSVs."""
    return cache_dir() / "data" / "e2e"


def _one_line(text: str, limit: int = 200) -> str:
    """Squash an exception message to one short line, because UserError messages are one line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _existing_csv(path: Path, origin: str, hint: str) -> Path:
    """Return ``path`` as the CSV to use, or raise a one-line DataError.

    Design choice: a directory is accepted and means "the E2E CSV inside it" (``trainset.csv``,
    else ``devset.csv``), so ``--data ~/e2e-dataset`` works on the unpacked official release.
    """
    if path.is_dir():
        for name in PREFERRED_CSV:
            if (path / name).is_file():
                return path / name
        raise DataError(f"data directory {path}{origin} has no trainset.csv or devset.csv; {hint}")
    if not path.exists():
        raise DataError(f"data file not found: {path}{origin}; {hint}")
    return path


def is_release_dir(path: Path, *, nonempty: bool = False) -> bool:
    """Whether ``path`` is a directory holding all three official E2E CSVs.

    Why all three: only then can the official protocol (train on trainset, validate on devset,
    test on testset_w_refs) run; a directory lacking one keeps the single-CSV behaviour, so an
    old partial cache or a user's folder with just devset.csv works as before. ``nonempty``
    also rejects zero-byte files (what an interrupted copy into the cache can leave).
    """
    if not path.is_dir():
        return False
    files = [path / name for name in RELEASE_FILES.values()]
    return all(f.is_file() and (not nonempty or f.stat().st_size > 0) for f in files)


def _existing_source(path: Path, origin: str, hint: str) -> Path:
    """A complete release directory as itself, anything else as :func:`_existing_csv`."""
    return path if is_release_dir(path) else _existing_csv(path, origin, hint)


def _cached_source() -> Path | None:
    """The cached release directory when it is complete, else the best cached CSV."""
    root = _e2e_cache()
    return root if is_release_dir(root, nonempty=True) else _cached_csv()


def _cached_csv() -> Path | None:
    """The best E2E CSV already in the cache, if any."""
    root = _e2e_cache()
    for name in PREFERRED_CSV:
        candidate = root / name
        if candidate.is_file() and candidate.stat().st_size > 0:
            return candidate
    return None


def _download_e2e(url: str) -> Path:
    """Download the E2E release zip from ``url`` and extract its CSVs into the cache.

    Raises ``OSError``/``ValueError``/``zipfile.BadZipFile`` on failure; the caller turns that
    into one DataError line. Each CSV is written to a temporary name and renamed, so an
    interrupted download never leaves a truncated CSV that a later run would trust.

    Design choice: only members whose *base name* is one of :data:`E2E_FILES` are extracted, and
    they are written flat under the cache directory, so a hostile archive cannot write elsewhere
    (no zip-slip) and both ``e2e-dataset/devset.csv`` and ``devset.csv`` layouts work. The zip
    itself is not kept.
    """
    log.info("downloading E2E NLG data from %s", url)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        payload = response.read()
    dest = _e2e_cache()
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        members = {}
        for info in archive.infolist():
            base = info.filename.replace("\\", "/").rsplit("/", 1)[-1]
            if not info.is_dir() and base in E2E_FILES and base not in members:
                members[base] = info
        if not any(name in members for name in PREFERRED_CSV):
            raise ValueError("the archive has no trainset.csv or devset.csv")
        for base, info in members.items():
            tmp = dest / f".{base}.part"
            tmp.write_bytes(archive.read(info))
            os.replace(tmp, dest / base)
    found = _cached_csv()
    if found is None:  # pragma: no cover - we just wrote at least one of them
        raise ValueError("extracted CSVs are empty")
    return found


def resolve_data(spec: str | Path | None) -> Path | str:
    """Decide which E2E data a run uses; return a CSV path or :data:`SYNTHETIC`.

    Order: ``spec`` (a path, or the literal ``"synthetic"``), then ``$TESTBED_DATA``, then a
    cached CSV under ``cache_dir()/data/e2e`` (``trainset.csv`` preferred, else ``devset.csv``),
    then a download of the official zip from ``$TESTBED_E2E_URL`` or :data:`DEFAULT_E2E_URL`.

    Why this order: what the user typed wins; an environment variable lets a cluster point every
    run at a shared copy; the cache makes the download a one-off. Nothing here silently falls
    back to synthetic data, because a run on synthetic data must be something the user asked for.

    This always names *one* CSV (a directory means the CSV inside it); :func:`resolve_source`
    is the same search that keeps a complete release directory whole (the official split).
    """
    return _resolve(spec, release=False)


def resolve_source(spec: str | Path | None) -> Path | str:
    """:func:`resolve_data`, except that a directory holding the whole official release
    (:func:`is_release_dir`) is returned as the directory, so that the run can use the
    official train/dev/test split (runner/dataset/splits.py) rather than one CSV split by MR."""
    return _resolve(spec, release=True)


def _resolve(spec: str | Path | None, *, release: bool) -> Path | str:
    """The search behind :func:`resolve_data` / :func:`resolve_source`."""
    existing = _existing_source if release else _existing_csv
    if spec is not None and str(spec).strip():
        if str(spec).strip() == SYNTHETIC:
            return SYNTHETIC
        return existing(Path(spec).expanduser(), "", _USE_DATA_HINT)

    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        if env == SYNTHETIC:
            return SYNTHETIC
        return existing(
            Path(env).expanduser(),
            f" (from ${DATA_ENV})",
            f"set {DATA_ENV} to an E2E CSV with columns mr,ref, or pass --data synthetic",
        )

    cached = _cached_source() if release else _cached_csv()
    if cached is not None:
        return cached

    url = os.environ.get(E2E_URL_ENV, "").strip() or DEFAULT_E2E_URL
    try:
        found = _download_e2e(url)
        return (_cached_source() or found) if release else found
    except (
        OSError,
        ValueError,
        zipfile.BadZipFile,
        urllib.error.URLError,
        http.client.HTTPException,
    ) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DataError(
            f"no E2E data found and the download from {url} failed ({_one_line(str(reason))}); "
            f"pass --data PATH to an E2E CSV (columns mr,ref), set {DATA_ENV}, "
            "or use --data synthetic"
        ) from exc


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_e2e(spec: str | Path, *, seed: int = 0) -> pd.DataFrame:
    """Load an E2E CSV (or the synthetic set) as a DataFrame with columns ``mr`` and ``ref``.

    Why so strict about shape and so lenient about content: a wrong file must fail at once with
    a one-line reason, not as a KeyError twenty minutes into a run; but stray whitespace, extra
    columns and blank rows are normal in hand-edited CSVs and are cleaned up quietly.

    Design choice: a file that has the columns but no usable (non-empty) row is a DataError too,
    since training on nothing is never what the user meant. Column names are matched after
    stripping whitespace, case-sensitively (E2E writes them lower-case).

    ``df.attrs["source"]`` is the path (as a string) or ``"synthetic"``.
    """
    if str(spec) == SYNTHETIC:
        return synthetic_e2e(seed=seed)
    path = Path(spec).expanduser()
    if not path.is_file():
        what = "is a directory, not a CSV file" if path.is_dir() else "not found"
        raise DataError(f"data file {what}: {path}; {_USE_DATA_HINT}")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: the file is empty; an E2E CSV needs columns mr,ref") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise DataError(
            f"{path}: cannot read it as a UTF-8 CSV ({_one_line(str(exc), 120)}); "
            "an E2E CSV needs columns mr,ref"
        ) from exc
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in ("mr", "ref") if c not in raw.columns]
    if missing:
        cols = ", ".join(repr(c) for c in missing)
        raise DataError(f"{path}: missing column(s) {cols}; an E2E CSV needs columns mr,ref")
    df = pd.DataFrame(
        {
            "mr": raw["mr"].astype(str).str.strip(),
            "ref": raw["ref"].astype(str).str.strip(),
        }
    )
    df = df[(df["mr"] != "") & (df["ref"] != "")].reset_index(drop=True)
    if df.empty:
        raise DataError(f"{path}: no row has both a non-empty mr and ref; check the file")
    df.attrs["source"] = str(path)
    df.attrs["synthetic"] = False
    return df


# --------------------------------------------------------------------------------------------
# Synthetic E2E-like data
# --------------------------------------------------------------------------------------------

_NAMES = (
    "The Eagle", "Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Browns Cambridge",
    "Clowns", "Cocum", "Cotto", "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne",
    "Midsummer House", "Strada", "Taste of Cambridge", "The Cambridge Blue", "The Cricketers",
    "The Dumpling Tree", "The Golden Curry", "The Golden Palace", "The Mill", "The Olive Grove",
    "The Phoenix", "The Plough", "The Punter", "The Rice Boat", "The Twenty Two", "The Vaults",
    "The Waterman", "The Wrestlers", "Wildwood", "Zizzi",
)  # fmt: skip
_NEAR = (
    "All Bar One", "Avalon", "Burger King", "Café Adriatic", "Café Brazil", "Café Rouge",
    "Café Sicilia", "Clare Hall", "Crowne Plaza Hotel", "Express by Holiday Inn",
    "Rainbow Vegetarian Café", "Raja Indian Cuisine", "Ranch", "The Bakers", "The Portland Arms",
    "The Sorrento", "Yippee Noodle Bar",
)  # fmt: skip
_VALUES: dict[str, tuple[str, ...]] = {
    "eatType": ("coffee shop", "pub", "restaurant"),
    "food": ("Chinese", "English", "Fast food", "French", "Indian", "Italian", "Japanese"),
    "priceRange": ("cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"),
    "customer rating": ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"),
    "area": ("city centre", "riverside"),
    "familyFriendly": ("yes", "no"),
}
# Probability that an optional attribute appears in an MR (roughly as often as in E2E).
_P_ATTR = {
    "eatType": 0.75,
    "food": 0.7,
    "priceRange": 0.65,
    "customer rating": 0.6,
    "area": 0.75,
    "familyFriendly": 0.65,
    "near": 0.5,
}


def _food_phrase(food: str) -> str:
    """'Italian' -> 'Italian food'; 'Fast food' -> 'fast food' (not 'Fast food food')."""
    return "fast food" if food.lower() == "fast food" else f"{food} food"


def _verb_phrase(attr: str, value: str, rng: random.Random) -> str:
    """A third-person verb phrase ("serves French food") that states one attribute."""
    if attr == "eatType":
        options = [f"is a {value}", f"is a {value} venue"]
    elif attr == "food":
        f = _food_phrase(value)
        options = [f"serves {f}", f"offers {f}", f"provides {f}", f"has {f} on the menu"]
    elif attr == "priceRange":
        options = [f"has a price range of {value}", f"has prices in the {value} range"]
        if value in ("cheap", "moderate", "high"):
            options.append(f"has a {value} price range")
        else:
            options.append(f"charges {value}")
    elif attr == "customer rating":
        options = [f"has a customer rating of {value}", f"is rated {value} by customers"]
        if "out of" not in value:
            options.append(f"has a {value} customer rating")
    elif attr == "area":
        options = [f"is located in the {value}", f"is in the {value} area", f"is in the {value}"]
    elif attr == "familyFriendly":
        if value == "yes":
            options = ["is family-friendly", "is family friendly", "welcomes the whole family"]
        else:
            options = ["is not family-friendly", "isn't family friendly", "is not for families"]
    elif attr == "near":
        options = [f"is near {value}", f"is close to {value}", f"is not far from {value}"]
    else:  # pragma: no cover - only E2E attributes are generated
        raise KeyError(attr)
    return rng.choice(options)


def _join(phrases: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _reference(attrs: dict[str, str], rng: random.Random) -> str:
    """One templated English reference that verbalises every attribute of ``attrs``."""
    name = attrs["name"]
    rest = {k: v for k, v in attrs.items() if k != "name"}
    noun = rest.pop("eatType", None) or rng.choice(["place", "venue", "spot"])
    form = rng.randrange(4)
    opening: str
    if form == 0:
        opening = f"{name} is a {noun}"
    elif form == 1:
        opening = f"There is a {noun} called {name}"
    elif form == 2 and "area" in rest:
        opening = f"Located in the {rest.pop('area')}, {name} is a {noun}"
    elif form == 2:
        opening = f"{name} is a {noun}"
    else:
        opening = f"A {noun} named {name}"
        phrases = [_verb_phrase(k, v, rng) for k, v in rest.items()]
        rng.shuffle(phrases)
        if not phrases:
            return f"{opening} is waiting for you."
        return f"{opening} {_join(phrases)}."
    phrases = [_verb_phrase(k, v, rng) for k, v in rest.items()]
    rng.shuffle(phrases)
    if not phrases:
        return f"{opening}."
    if len(phrases) <= 2 or rng.random() < 0.4:
        return f"{opening}. It {_join(phrases)}."
    cut = rng.randint(1, len(phrases) - 1)
    return f"{opening}. It {_join(phrases[:cut])}. It also {_join(phrases[cut:])}."


def _format_mr(attrs: dict[str, str]) -> str:
    """E2E MR string: ``name[The Eagle], eatType[coffee shop], food[French]`` in E2E order."""
    return ", ".join(f"{k}[{attrs[k]}]" for k in E2E_ATTRIBUTES if k in attrs)


def synthetic_e2e(
    n_mrs: int = 400, refs_per_mr: tuple[int, int] = (3, 9), seed: int = 0
) -> pd.DataFrame:
    """A deterministic E2E-like data set: real E2E attribute schema, MR format and value sets.

    Why: so every code path (splits, Dirichlet shards over ``eatType``, training, multi-reference
    scoring) runs with no data file and no network, e.g. in CI. The texts are templated, so the
    task is far easier than E2E and its scores must never be reported as E2E results; that is why
    ``df.attrs["synthetic"]`` is True and ``df.attrs["source"]`` is ``"synthetic"``.

    Design choices: ``refs_per_mr`` is an inclusive ``(low, high)`` range; every MR has ``name``
    plus at least two other attributes (as in E2E, which has 3 to 8 per MR); the ``n_mrs`` MRs are
    distinct; references of one MR are made distinct where the templates allow. Uses
    ``random.Random(seed)`` only, so the output is identical across platforms and numpy versions.
    """
    low, high = refs_per_mr
    if n_mrs < 1 or low < 1 or high < low:
        raise ValueError(f"bad synthetic_e2e sizes: n_mrs={n_mrs}, refs_per_mr={refs_per_mr}")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[tuple[str, str]] = []
    attempts = 0
    while len(seen) < n_mrs:
        attempts += 1
        if attempts > 100 * n_mrs + 1000:  # pragma: no cover - the MR space is ~10^7
            raise ValueError(f"cannot generate {n_mrs} distinct synthetic MRs")
        attrs = {"name": rng.choice(_NAMES)}
        for key in E2E_ATTRIBUTES[1:]:
            if rng.random() < _P_ATTR[key]:
                pool = _NEAR if key == "near" else _VALUES[key]
                attrs[key] = rng.choice(pool)
        if len(attrs) < 3:
            continue
        mr = _format_mr(attrs)
        if mr in seen:
            continue
        seen.add(mr)
        refs: list[str] = []
        for _ in range(rng.randint(low, high)):
            ref = _reference(attrs, rng)
            for _retry in range(5):
                if ref not in refs:
                    break
                ref = _reference(attrs, rng)
            refs.append(ref)
        rows.extend((mr, ref) for ref in refs)
    df = pd.DataFrame(rows, columns=["mr", "ref"])
    df.attrs["source"] = SYNTHETIC
    df.attrs["synthetic"] = True
    return df


# --------------------------------------------------------------------------------------------
# Splits and client partitions
# --------------------------------------------------------------------------------------------


def parse_mr(mr: str) -> dict[str, str]:
    """``"name[X], area[Y]"`` -> ``{"name": "X", "area": "Y"}``.

    Design choice: lenient. Text that is not ``key[value]`` is skipped (an unparseable MR gives
    ``{}``), keys and values are stripped, and a repeated key keeps its first value. Callers use
    ``.get(attr, "none")``, so a malformed MR lands in the ``"none"`` class rather than crashing
    a run over one odd row.
    """
    out: dict[str, str] = {}
    for match in _MR_ITEM.finditer(mr):
        key, value = match.group(1).strip(), match.group(2).strip()
        if key and key not in out:
            out[key] = value
    return out


def _copy_attrs(src: pd.DataFrame, dst: pd.DataFrame, **extra: Any) -> pd.DataFrame:
    """Carry ``source``/``synthetic`` labels to derived frames (pandas does not always)."""
    dst.attrs.update(dict(src.attrs))
    dst.attrs.update(extra)
    return dst


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of ``n * fractions``, with >= 1 for every positive fraction."""
    raw = [f * n for f in fractions]
    counts = [int(np.floor(x)) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] += 1
    return counts


def split_by_mr(
    df: pd.DataFrame, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, pd.DataFrame]:
    """Split into ``train``/``validation``/``test`` by *distinct MR*, never by row.

    Why: E2E has ~8 references per MR; a row split would put the same MR in train and test and
    measure memorisation, not generalisation (docs/method.md).

    Design choices: the distinct MRs (in order of first appearance) are shuffled with
    ``numpy.random.default_rng(seed)`` and cut by largest-remainder rounding of the fractions;
    every split with a positive fraction gets at least one MR; rows keep their original order
    within a split; the index is reset. Fractions must be >= 0 and sum to 1.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(
            f"split fractions {tuple(fractions)} must be three numbers >= 0 that sum to 1, "
            "e.g. 0.8,0.1,0.1"
        )
    mrs = pd.unique(df["mr"])
    needed = sum(1 for f in fractions if f > 0)
    if len(mrs) < needed:
        raise DataError(
            f"only {len(mrs)} distinct MR(s) in {df.attrs.get('source', 'the data')}; "
            f"need at least {needed} to split train/validation/test by MR; use more data"
        )
    order = np.random.default_rng(seed).permutation(len(mrs))
    counts = _split_counts(len(mrs), fractions)
    out: dict[str, pd.DataFrame] = {}
    start = 0
    for name, count in zip(("train", "validation", "test"), counts, strict=True):
        chosen = {mrs[i] for i in order[start : start + count]}
        start += count
        part = df[df["mr"].isin(chosen)].reset_index(drop=True)
        out[name] = _copy_attrs(df, part, split=name)
    return out


def partition_iid(n: int, n_clients: int, seed: int) -> list[list[int]]:
    """Shuffle ``range(n)`` with ``seed`` and deal it into ``n_clients`` near-equal shards.

    The shards are disjoint, cover every index and differ in size by at most one. Each shard's
    indices are sorted (design choice: a stable, readable listing; batches reshuffle anyway).
    """
    if n_clients < 1:
        raise ConfigError(f"n_clients must be >= 1, got {n_clients}")
    perm = np.random.default_rng(seed).permutation(n)
    return [sorted(int(i) for i in shard) for shard in np.array_split(perm, n_clients)]


def partition_dirichlet(
    labels: Sequence[str], n_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[list[int]]:
    """Label-skewed non-IID shards: per class, client proportions ~ Dirichlet(alpha).

    Why: this is the standard federated non-IID split (Hsu et al. 2019); small ``alpha`` gives
    each client few classes, large ``alpha`` approaches IID. Draws are repeated (with the same
    generator, so still deterministic) until every client has at least ``min_size`` indices.

    Design choices: classes are processed in sorted order so the result does not depend on the
    order labels first appear; within a class, indices are shuffled and cut at the cumulative
    proportions; each shard is returned sorted. Gives up with a DataError after 10,000 draws.
    """
    if n_clients < 1:
        raise ConfigError(f"n_clients must be >= 1, got {n_clients}")
    if not alpha > 0:
        raise ConfigError(f"Dirichlet alpha must be > 0, got {alpha}; try 0.5 (non-IID) or 100")
    n = len(labels)
    if n < n_clients * min_size:
        raise DataError(
            f"{n} examples cannot give {n_clients} clients at least {min_size} each; "
            "use fewer clients or more data"
        )
    label_arr = np.asarray([str(x) for x in labels], dtype=object)
    classes = sorted(set(label_arr.tolist()))
    by_class = [np.flatnonzero(label_arr == c) for c in classes]
    rng = np.random.default_rng(seed)
    for _attempt in range(10_000):
        shards: list[list[int]] = [[] for _ in range(n_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(n_clients, float(alpha)))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, piece in enumerate(np.split(idx, cuts)):
                shards[client].extend(int(i) for i in piece)
        if min(len(s) for s in shards) >= min_size:
            return [sorted(s) for s in shards]
    raise DataError(
        f"could not give all {n_clients} clients >= {min_size} examples with Dirichlet "
        f"alpha={alpha} over {len(classes)} label(s); raise alpha or use fewer clients"
    )


def partition(
    df: pd.DataFrame,
    n_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    attribute: str = "eatType",
    seed: int = 0,
) -> list[pd.DataFrame]:
    """Split a (training) frame's rows over ``n_clients`` clients, IID or Dirichlet non-IID.

    For ``"dirichlet"`` the label of a row is ``parse_mr(mr).get(attribute, "none")``, so MRs
    without the attribute form their own class, as they do in E2E.

    Design choice: rows, not MRs, are dealt out; the train split is already MR-disjoint from
    validation/test, and row-level shards keep client sizes balanced in the IID case. Every
    client must get at least one row (an empty client cannot train), else DataError.
    """
    kind = scheme.strip().lower()
    if kind == "iid":
        if len(df) < n_clients:
            raise DataError(
                f"{len(df)} rows cannot be split over {n_clients} clients; "
                "use fewer clients or more data"
            )
        shards = partition_iid(len(df), n_clients, seed)
    elif kind == "dirichlet":
        labels = [parse_mr(mr).get(attribute, "none") for mr in df["mr"]]
        shards = partition_dirichlet(labels, n_clients, alpha, seed)
    else:
        raise DataError(f"unknown partition scheme {scheme!r}; use 'iid' or 'dirichlet'")
    out = []
    for client, idx in enumerate(shards):
        part = df.iloc[idx].reset_index(drop=True)
        out.append(_copy_attrs(df, part, client=client, partition=kind))
    return out


# --------------------------------------------------------------------------------------------
# Tokenisation and batching
# --------------------------------------------------------------------------------------------


def format_prompt(mr: str) -> str:
    """The conditioning text: ``"<MR> ||"``; the reference follows after one space."""
    return f"{mr} ||"


def encode_example(tokenizer: Any, mr: str, ref: str, max_len: int = 128) -> dict[str, list[int]]:
    """Tokenise one example as ``prompt + " " + ref + eos`` with the loss on the text only.

    Why prompt and text are tokenised separately (``add_special_tokens=False``): tokenising the
    joined string could merge tokens across the boundary, and then no label mask would be exact.
    The text starts with the space, which is how the model sees it at generation time after the
    prompt.

    Truncation (design choice): keep the whole prompt and cut the text from the right to fit
    ``max_len`` (the eos goes first), always keeping at least one target token; only if the
    prompt alone needs ``max_len`` or more tokens is the prompt cut from the right to
    ``max_len - 1`` tokens, leaving one target token.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one before encoding")
    prompt_ids = list(tokenizer(format_prompt(mr), add_special_tokens=False)["input_ids"])
    text_ids = list(tokenizer(" " + ref, add_special_tokens=False)["input_ids"]) + [int(eos)]
    if len(prompt_ids) >= max_len:
        prompt_ids = prompt_ids[: max_len - 1]
    text_ids = text_ids[: max_len - len(prompt_ids)]
    return {
        "input_ids": prompt_ids + text_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + text_ids,
    }


def encode_frame(
    tokenizer: Any, df: pd.DataFrame, max_len: int = 128
) -> list[dict[str, list[int]]]:
    """:func:`encode_example` for every row of ``df``, in row order."""
    return [
        encode_example(tokenizer, mr, ref, max_len=max_len)
        for mr, ref in zip(df["mr"], df["ref"], strict=True)
    ]


#: Under bf16 autocast on a CPU, batches are padded to a multiple of this many tokens.
#: Why: oneDNN keeps state for every matrix shape it meets (its primitive cache and what the
#: bf16 kernels hold with it), so free batch lengths kept growing a client's resident memory
#: step after step, until the kernel OOM-killed 4 of the main job's 5 clients in their
#: containers. With lengths rounded up to 16 a run meets a few shapes and the memory levels
#: off: bench/bf16_memory.py, SmolLM2 client of 3 blocks, 36 steps, peak 863 MiB with free
#: lengths against 694 MiB padded (fp32: 672 MiB), docs/benchmarks.md "bf16 memory on CPU".
#: fp32 keeps the longest-in-batch padding: its results stay bit-identical to earlier runs.
BF16_LENGTH_MULTIPLE = 16


def length_multiple(precision: str) -> int:
    """Token multiple that batches are padded to at this training precision (1: none)."""
    return BF16_LENGTH_MULTIPLE if precision == "bf16" else 1


def collate(examples: list[dict[str, list[int]]], pad_id: int, multiple: int = 1
            ) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one (rounded up to ``multiple`` tokens: padding
    is masked and labelled -100, so it changes shapes, not the loss's terms).

    Returns ``input_ids`` (pad = ``pad_id``), ``attention_mask`` (1 real / 0 pad) and ``labels``
    (-100 on padding), all ``torch.long`` of shape ``(batch, longest)``. Right padding is what a
    causal LM with absolute/rotary positions expects for training.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(ex["input_ids"]) for ex in examples)
    width = -(-width // multiple) * multiple
    batch = len(examples)
    input_ids = torch.full((batch, width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        length = len(ex["input_ids"])
        input_ids[row, :length] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention[row, :length] = 1
        labels[row, :length] = torch.tensor(ex["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class ClientBatches:
    """Infinite, seeded stream of collated mini-batches over one client's examples.

    Why infinite: split-learning rounds count local *steps*, not epochs, and clients with
    different shard sizes must still take the same number of steps.

    Design choices: the stream is the concatenation of per-epoch permutations drawn from
    ``numpy.random.default_rng(seed)``; each batch takes the next ``batch_size`` examples of that
    stream, so a batch may straddle an epoch boundary and *every* batch has exactly
    ``batch_size`` rows (constant per-step cost; with fewer examples than ``batch_size`` a batch
    repeats examples). :attr:`epoch` is the number of completed passes over the examples.
    """

    def __init__(
        self, examples: list[dict[str, list[int]]], batch_size: int, pad_id: int, seed: int,
        multiple: int = 1,
    ) -> None:
        if not examples:
            raise DataError("a client has no training examples; use fewer clients or more data")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self._examples = examples
        self._batch_size = batch_size
        self._pad_id = pad_id
        self._multiple = multiple
        self._rng = np.random.default_rng(seed)
        self._order: list[int] = []
        self._pos = 0
        self._consumed = 0

    @property
    def longest(self) -> int:
        """The longest example's length in tokens: what a memory budget is planned for (a
        budget is a hard limit, and one long batch is enough to exceed it)."""
        return max(len(ex["input_ids"]) for ex in self._examples)

    @property
    def epoch(self) -> int:
        """Completed passes over this client's examples."""
        return self._consumed // len(self._examples)

    def next(self) -> dict[str, torch.Tensor]:
        """The next collated batch (see :func:`collate`)."""
        picked: list[dict[str, list[int]]] = []
        while len(picked) < self._batch_size:
            if self._pos >= len(self._order):
                self._order = [int(i) for i in self._rng.permutation(len(self._examples))]
                self._pos = 0
            picked.append(self._examples[self._order[self._pos]])
            self._pos += 1
            self._consumed += 1
        return collate(picked, self._pad_id, self._multiple)

    def sample(self, seed: Sequence[int]) -> dict[str, torch.Tensor]:
        """One collated batch drawn from a generator of its own (``seed``: the entropy of a
        ``numpy.random.SeedSequence``), the stream's position untouched.

        Why: a side computation that needs data (HSplitLoRA's importance probe) must not
        shift the training batches, or a method that probes and its ablation that does not
        would train on different data at every step after the first probe
        (docs/method.md "IWI"); a stateless draw also needs no position saved, restored or
        repaired on a restarted client."""
        rng = np.random.default_rng(list(seed))
        order: list[int] = []
        while len(order) < self._batch_size:
            order.extend(int(i) for i in rng.permutation(len(self._examples)))
        return collate([self._examples[i] for i in order[: self._batch_size]], self._pad_id,
                       self._multiple)

    def __iter__(self) -> ClientBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next()


def references_by_mr(df: pd.DataFrame) -> dict[str, list[str]]:
    """MR -> all its references, MRs and refs in first-appearance order.

    Why: E2E metrics score one generated text per MR against all of that MR's references.
    """
    out: dict[str, list[str]] = {}
    for mr, ref in zip(df["mr"], df["ref"], strict=True):
        out.setdefault(mr, []).append(ref)
    return out
