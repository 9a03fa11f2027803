"""Tests for runner.dataset.data: finding, loading, splitting, partitioning and encoding E2E data.

The real E2E development set in shared/data/e2e is used when it is present; otherwise the tests
fall back to the synthetic generator and say so with a warning. No test contacts a non-loopback
address: an autouse fixture points the download URL at a closed loopback port, and the download
test serves a zip from a local ``http.server``.
"""

from __future__ import annotations

import functools
import http.server
import re
import socket
import threading
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from runner.dataset import data as D
from runner.errors import DataError, UserError

DEVSET = Path(__file__).resolve().parents[1].parent / "shared/data/e2e/devset.csv"
DEVSET_ROWS = 4672
DEVSET_MRS = 547

MR_FORMAT = re.compile(r"^[A-Za-z ]+\[[^\[\]]+\](, [A-Za-z ]+\[[^\[\]]+\])*$")


def _single_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"error message must be one line: {msg!r}"
    return msg


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fresh cache, no TESTBED_DATA, no proxies, and a download URL that can only fail locally."""
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TESTBED_DATA", raising=False)
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv(D.E2E_URL_ENV, f"http://127.0.0.1:{_closed_port()}/e2e-dataset.zip")


@pytest.fixture(scope="module")
def e2e() -> pd.DataFrame:
    """The real devset when present, else synthetic data (with a warning saying so)."""
    if DEVSET.is_file():
        return D.load_e2e(DEVSET)
    warnings.warn(
        f"{DEVSET} not found: data tests run on synthetic E2E-like data instead", stacklevel=1
    )
    return D.load_e2e(D.SYNTHETIC)


@pytest.fixture(scope="module")
def tokenizer():
    """A small real HF fast tokenizer (byte-level BPE) trained offline on synthetic texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    synth = D.synthetic_e2e(n_mrs=150, seed=7)
    texts = [D.format_prompt(m) for m in synth["mr"].unique()] + [" " + r for r in synth["ref"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def zip_server(tmp_path: Path, e2e: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """Serve ``e2e-dataset.zip`` (with ``e2e-dataset/devset.csv``) on 127.0.0.1, random port."""
    sample = e2e.head(60).reset_index(drop=True)
    root = tmp_path / "srv"
    root.mkdir()
    with zipfile.ZipFile(root / "e2e-dataset.zip", "w") as zf:
        zf.writestr("e2e-dataset/devset.csv", sample.to_csv(index=False))
        zf.writestr("e2e-dataset/README.md", "not a csv")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/e2e-dataset.zip", sample
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ---------------------------------------------------------------------------- loading


def test_devset_is_used_and_has_expected_size(e2e: pd.DataFrame) -> None:
    assert list(e2e.columns) == ["mr", "ref"]
    assert (e2e["mr"].str.len() > 0).all() and (e2e["ref"].str.len() > 0).all()
    if DEVSET.is_file():
        assert e2e.attrs["source"] == str(DEVSET)
        assert e2e.attrs["synthetic"] is False
        assert len(e2e) == DEVSET_ROWS
        assert e2e["mr"].nunique() == DEVSET_MRS
    else:
        assert e2e.attrs["source"] == D.SYNTHETIC


def test_load_strips_whitespace_ignores_extra_columns_drops_empty(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text(
        ' mr ,ref,extra\n"  name[A], area[riverside] ","  A is by the river.  ",1\n'
        '"name[B]",,2\n,"orphan",3\n"name[C]",C.,4\n',
        encoding="utf-8",
    )
    df = D.load_e2e(path)
    assert list(df.columns) == ["mr", "ref"]
    assert df.to_dict("records") == [
        {"mr": "name[A], area[riverside]", "ref": "A is by the river."},
        {"mr": "name[C]", "ref": "C."},
    ]
    assert df.attrs["source"] == str(path)


def test_resolve_data_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = tmp_path / "a.csv"
    b = tmp_path / "b.csv"
    for p in (a, b):
        p.write_text("mr,ref\nname[X],X.\n", encoding="utf-8")
    assert D.resolve_data("synthetic") == D.SYNTHETIC
    assert D.resolve_data(str(a)) == a
    monkeypatch.setenv("TESTBED_DATA", str(b))
    assert D.resolve_data(str(a)) == a  # explicit spec beats the environment
    assert D.resolve_data(None) == b
    monkeypatch.delenv("TESTBED_DATA")
    cache = D.cache_dir() / "data" / "e2e"
    assert cache == tmp_path / "cache" / "data" / "e2e"
    cache.mkdir(parents=True)
    (cache / "devset.csv").write_text("mr,ref\nname[D],D.\n", encoding="utf-8")
    assert D.resolve_data(None) == cache / "devset.csv"
    (cache / "trainset.csv").write_text("mr,ref\nname[T],T.\n", encoding="utf-8")
    assert D.resolve_data(None) == cache / "trainset.csv"  # trainset preferred


def test_synthetic_spec_loads_labelled_frame() -> None:
    df = D.load_e2e(D.resolve_data("synthetic"), seed=3)
    assert df.attrs == {"source": "synthetic", "synthetic": True}
    pd.testing.assert_frame_equal(df, D.synthetic_e2e(seed=3))


# ---------------------------------------------------------------------------- errors


def test_missing_file_is_one_line_data_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError) as exc:
        D.resolve_data(str(missing))
    msg = _single_line(exc)
    assert msg.startswith(f"data file not found: {missing};")
    assert "--data" in msg and "synthetic" in msg
    with pytest.raises(DataError) as exc:
        D.load_e2e(missing)
    assert str(missing) in _single_line(exc)
    assert issubclass(DataError, UserError)


def test_csv_without_ref_column_is_data_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("mr,text\nname[A],A.\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        D.load_e2e(path)
    msg = _single_line(exc)
    assert msg == f"{path}: missing column(s) 'ref'; an E2E CSV needs columns mr,ref"


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage\n\x00\xff", b"mr,ref\n , \n"])
def test_unreadable_or_empty_csv_is_data_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as exc:
        D.load_e2e(path)
    assert str(path) in _single_line(exc)


def test_bad_scheme_is_data_error(e2e: pd.DataFrame) -> None:
    with pytest.raises(DataError) as exc:
        D.partition(e2e, 3, scheme="round-robin")
    msg = _single_line(exc)
    assert "round-robin" in msg and "iid" in msg and "dirichlet" in msg


def test_missing_env_data_is_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESTBED_DATA", str(tmp_path / "gone.csv"))
    with pytest.raises(DataError) as exc:
        D.resolve_data(None)
    msg = _single_line(exc)
    assert "TESTBED_DATA" in msg and "gone.csv" in msg


# ---------------------------------------------------------------------------- download


def test_download_caches_and_loads(
    zip_server: tuple[str, pd.DataFrame], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url, sample = zip_server
    monkeypatch.setenv(D.E2E_URL_ENV, url)
    path = D.resolve_data(None)
    assert isinstance(path, Path)
    assert path == tmp_path / "cache" / "data" / "e2e" / "devset.csv"
    assert sorted(p.name for p in path.parent.iterdir()) == ["devset.csv"]  # no README, no .part
    loaded = D.load_e2e(path)
    pd.testing.assert_frame_equal(loaded, sample, check_dtype=False)
    # Second call: served from the cache even though the server URL now points nowhere.
    monkeypatch.setenv(D.E2E_URL_ENV, f"http://127.0.0.1:{_closed_port()}/x.zip")
    assert D.resolve_data(None) == path


def test_download_failure_is_one_line_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(D.E2E_URL_ENV, f"http://127.0.0.1:{_closed_port()}/e2e-dataset.zip")
    with pytest.raises(DataError) as exc:
        D.resolve_data(None)
    msg = _single_line(exc)
    assert "--data" in msg and "TESTBED_DATA" in msg and "synthetic" in msg
    assert "127.0.0.1" in msg
    assert not (D.cache_dir() / "data" / "e2e" / "devset.csv").exists()


def test_download_of_non_zip_is_one_line_data_error(
    zip_server: tuple[str, pd.DataFrame], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = zip_server
    monkeypatch.setenv(D.E2E_URL_ENV, url.replace("e2e-dataset.zip", "missing.zip"))  # HTTP 404
    with pytest.raises(DataError) as exc:
        D.resolve_data(None)
    assert "--data" in _single_line(exc)


# ---------------------------------------------------------------------------- synthetic data


def test_synthetic_is_deterministic_and_seed_dependent() -> None:
    a = D.synthetic_e2e(n_mrs=60, seed=11)
    b = D.synthetic_e2e(n_mrs=60, seed=11)
    c = D.synthetic_e2e(n_mrs=60, seed=12)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    assert a["mr"].nunique() == 60
    counts = a.groupby("mr", sort=False).size()
    assert counts.between(3, 9).all()
    assert a.attrs["synthetic"] is True and a.attrs["source"] == "synthetic"


def test_synthetic_mr_format_and_verbalisation() -> None:
    df = D.synthetic_e2e(n_mrs=200, seed=0)
    schema = list(D.E2E_ATTRIBUTES)
    seen_keys: set[str] = set()
    refs_differ = 0
    for mr, refs in D.references_by_mr(df).items():
        assert MR_FORMAT.match(mr), mr
        attrs = D.parse_mr(mr)
        keys = list(attrs)
        assert keys[0] == "name" and len(keys) >= 3
        assert keys == sorted(keys, key=schema.index)  # E2E attribute order
        seen_keys.update(keys)
        refs_differ += len(set(refs)) > 1
        for ref in refs:
            low = ref.lower()
            for key, value in attrs.items():
                if key == "familyFriendly":
                    assert "famil" in low, (mr, ref)
                    negated = re.search(r"(not|n't) (family|for famil)", low) is not None
                    assert negated == (value == "no"), (mr, ref)
                else:
                    assert value.lower() in low, (key, value, ref)
    assert seen_keys == set(schema)
    assert refs_differ >= 190  # several templates: an MR's refs are not all the same


def test_parse_mr() -> None:
    mr = "name[The Eagle], eatType[coffee shop], customer rating[5 out of 5], near[Café Brazil]"
    assert D.parse_mr(mr) == {
        "name": "The Eagle",
        "eatType": "coffee shop",
        "customer rating": "5 out of 5",
        "near": "Café Brazil",
    }
    assert D.parse_mr("name[Zizzi],priceRange[£20-25]") == {"name": "Zizzi", "priceRange": "£20-25"}
    assert D.parse_mr("not an mr") == {}


# ---------------------------------------------------------------------------- splits


def test_split_by_mr_is_mr_disjoint_and_complete(e2e: pd.DataFrame) -> None:
    splits = D.split_by_mr(e2e, seed=0)
    assert list(splits) == ["train", "validation", "test"]
    mrs = {k: set(v["mr"]) for k, v in splits.items()}
    assert not mrs["train"] & mrs["validation"]
    assert not mrs["train"] & mrs["test"]
    assert not mrs["validation"] & mrs["test"]
    assert sum(len(v) for v in splits.values()) == len(e2e)
    rows = lambda f: Counter(zip(f["mr"], f["ref"], strict=True))  # noqa: E731
    assert rows(pd.concat(list(splits.values()))) == rows(e2e)
    n = e2e["mr"].nunique()
    assert abs(len(mrs["train"]) - 0.8 * n) <= 1 and abs(len(mrs["test"]) - 0.1 * n) <= 1
    assert splits["test"].attrs["source"] == e2e.attrs["source"]
    again = D.split_by_mr(e2e, seed=0)
    other = D.split_by_mr(e2e, seed=1)
    pd.testing.assert_frame_equal(splits["test"], again["test"])
    assert set(other["test"]["mr"]) != mrs["test"]


def test_split_by_mr_rejects_bad_fractions(e2e: pd.DataFrame) -> None:
    with pytest.raises(UserError) as exc:
        D.split_by_mr(e2e, fractions=(0.8, 0.3, 0.1))
    _single_line(exc)


# ---------------------------------------------------------------------------- partitions


def _assert_disjoint_complete(shards: list[list[int]], n: int) -> None:
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == n
    assert set(flat) == set(range(n))


def test_partition_iid(e2e: pd.DataFrame) -> None:
    shards = D.partition_iid(1003, 7, seed=5)
    _assert_disjoint_complete(shards, 1003)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert shards == D.partition_iid(1003, 7, seed=5)
    assert shards != D.partition_iid(1003, 7, seed=6)
    assert shards[0] != list(range(len(shards[0])))  # shuffled, not contiguous
    parts = D.partition(e2e, 4, scheme="iid", seed=0)
    assert sum(len(p) for p in parts) == len(e2e)
    assert parts[0].attrs["source"] == e2e.attrs["source"]


def test_partition_dirichlet_disjoint_complete_min_size(e2e: pd.DataFrame) -> None:
    labels = [D.parse_mr(m).get("customer rating", "none") for m in e2e["mr"]]
    # alpha=0.05 over 6 clients often leaves a client under 20 rows on the first draw, so this
    # only passes if partition_dirichlet really resamples.
    for alpha, seed in [(0.05, s) for s in range(10)] + [(1.0, 0)]:
        shards = D.partition_dirichlet(labels, 6, alpha=alpha, seed=seed, min_size=20)
        _assert_disjoint_complete(shards, len(labels))
        assert min(len(s) for s in shards) >= 20
        assert shards == D.partition_dirichlet(labels, 6, alpha=alpha, seed=seed, min_size=20)
    parts = D.partition(e2e, 3, scheme="dirichlet", alpha=0.5, attribute="food", seed=0)
    rows = Counter(r for p in parts for r in zip(p["mr"], p["ref"], strict=True))
    assert rows == Counter(zip(e2e["mr"], e2e["ref"], strict=True))


def _mean_tv(labels: list[str], shards: list[list[int]]) -> float:
    """Mean total-variation distance of client label histograms from the global histogram."""
    classes = sorted(set(labels))
    arr = np.asarray(labels, dtype=object)
    glob = np.array([np.mean(arr == c) for c in classes])
    tvs = []
    for shard in shards:
        local = arr[shard]
        hist = np.array([np.mean(local == c) for c in classes])
        tvs.append(0.5 * np.abs(hist - glob).sum())
    return float(np.mean(tvs))


def test_dirichlet_small_alpha_is_more_skewed(e2e: pd.DataFrame) -> None:
    labels = [D.parse_mr(m).get("customer rating", "none") for m in e2e["mr"]]
    skew = {
        alpha: np.mean(
            [_mean_tv(labels, D.partition_dirichlet(labels, 5, alpha, seed=s)) for s in range(5)]
        )
        for alpha in (0.1, 100.0)
    }
    iid = np.mean([_mean_tv(labels, D.partition_iid(len(labels), 5, seed=s)) for s in range(5)])
    assert skew[0.1] > 0.4, skew
    assert skew[100.0] < 0.1, skew
    assert skew[0.1] > 4 * skew[100.0]
    assert iid < 0.1


def test_dirichlet_impossible_min_size_is_data_error() -> None:
    with pytest.raises(DataError) as exc:
        D.partition_dirichlet(["a", "b", "c"], 4, alpha=1.0, seed=0)
    _single_line(exc)


# ---------------------------------------------------------------------------- encoding


def test_encode_example_masks_exactly_the_prompt(tokenizer, e2e: pd.DataFrame) -> None:
    eos = tokenizer.eos_token_id
    for mr, ref in zip(e2e["mr"][:40:7], e2e["ref"][:40:7], strict=True):
        ex = D.encode_example(tokenizer, mr, ref, max_len=512)
        prompt = tokenizer(D.format_prompt(mr), add_special_tokens=False)["input_ids"]
        n = len(prompt)
        assert len(ex["input_ids"]) == len(ex["labels"])
        assert ex["input_ids"][:n] == prompt
        assert ex["labels"][:n] == [-100] * n
        assert all(t != -100 for t in ex["labels"][n:])
        assert ex["labels"][n:] == ex["input_ids"][n:]
        assert ex["input_ids"][-1] == eos
        assert tokenizer.decode(ex["input_ids"][:n]) == f"{mr} ||"
        assert tokenizer.decode(ex["labels"][n:]) == " " + ref + tokenizer.eos_token


def test_encode_example_truncation(tokenizer) -> None:
    mr = "name[The Eagle], eatType[coffee shop], food[French], area[riverside]"
    ref = "The Eagle is a French coffee shop by the riverside, and it is great for lunch."
    n_prompt = len(tokenizer(D.format_prompt(mr), add_special_tokens=False)["input_ids"])
    full = D.encode_example(tokenizer, mr, ref, max_len=512)
    cut = D.encode_example(tokenizer, mr, ref, max_len=n_prompt + 3)
    assert len(cut["input_ids"]) == n_prompt + 3
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3]  # cut from the right
    assert cut["labels"][:n_prompt] == [-100] * n_prompt
    tiny = D.encode_example(tokenizer, mr, ref, max_len=4)  # prompt alone is longer
    assert len(tiny["input_ids"]) == 4
    assert tiny["labels"] == [-100, -100, -100, full["input_ids"][n_prompt]]
    assert tiny["input_ids"][:3] == full["input_ids"][:3]


def test_collate_shapes_and_padding() -> None:
    a = {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}
    b = {"input_ids": [9, 10], "labels": [-100, 10]}
    batch = D.collate([a, b], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for t in batch.values():
        assert t.shape == (2, 4) and t.dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]


def test_encode_frame_and_references(tokenizer, e2e: pd.DataFrame) -> None:
    head = e2e.head(25)
    encoded = D.encode_frame(tokenizer, head, max_len=64)
    assert len(encoded) == 25
    assert encoded[3] == D.encode_example(tokenizer, head["mr"][3], head["ref"][3], max_len=64)
    refs = D.references_by_mr(e2e)
    assert len(refs) == e2e["mr"].nunique()
    assert sum(len(v) for v in refs.values()) == len(e2e)
    first = e2e["mr"][0]
    assert list(refs)[0] == first
    assert refs[first] == e2e.loc[e2e["mr"] == first, "ref"].tolist()
    assert D.format_prompt("name[X]") == "name[X] ||"


def test_client_batches_deterministic_and_seeded() -> None:
    examples = [
        {"input_ids": [i + 1] * (1 + i % 4), "labels": [i + 1] * (1 + i % 4)} for i in range(10)
    ]

    def stream(seed: int, steps: int) -> list[list[list[int]]]:
        cb = D.ClientBatches(examples, batch_size=4, pad_id=0, seed=seed)
        return [cb.next()["input_ids"].tolist() for _ in range(steps)]

    assert stream(3, 6) == stream(3, 6)
    assert stream(3, 6) != stream(4, 6)

    cb = D.ClientBatches(examples, batch_size=5, pad_id=0, seed=0)
    first_epoch = []
    for _ in range(2):
        batch = cb.next()
        assert batch["input_ids"].shape[0] == 5
        first_epoch += batch["input_ids"][:, 0].tolist()
    assert sorted(first_epoch) == list(range(1, 11))  # one epoch sees every example once
    assert cb.epoch == 1
    second_epoch = cb.next()["input_ids"][:, 0].tolist() + cb.next()["input_ids"][:, 0].tolist()
    assert sorted(second_epoch) == list(range(1, 11))
    assert second_epoch != first_epoch  # reshuffled
    assert cb.epoch == 2
    odd = D.ClientBatches(examples, batch_size=3, pad_id=0, seed=0)
    assert all(odd.next()["input_ids"].shape[0] == 3 for _ in range(7))  # straddles epochs
