"""The data protocol (runner/dataset/splits.py) and `testbed eval --test-data` (issue 12, parts
2-3).

Acceptance: given a directory holding the three files of the official E2E release, training
reads trainset only, validation devset only, and `testbed eval` generates for every MR of
testset_w_refs and for nothing else. The release here is small and written by the test (rows of
../shared/data/e2e/devset.csv, a disjoint set of MRs per file, so any leak shows), and the model
is the tiny random one, so the whole module runs in seconds.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from runner.config import TrainConfig
from runner.dataset import data as D
from runner.dataset import splits as S
from runner.errors import DataError
from tests.test_cli import REPO, assert_user_error, run_cli, tree_digest

DEVSET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "e2e" / "devset.csv"
RELEASE_MRS = {"trainset.csv": (0, 30), "devset.csv": (30, 36), "testset_w_refs.csv": (36, 41)}
"""MR index ranges (in devset order) that each file of the small release gets: disjoint."""


def _source() -> pd.DataFrame:
    """Rows to build releases from: the real devset, else synthetic data (said in the skip)."""
    if DEVSET.is_file():
        return D.load_e2e(DEVSET)
    return D.load_e2e(D.SYNTHETIC)


def write_release(root: Path) -> dict[str, pd.DataFrame]:
    """Write trainset.csv, devset.csv and testset_w_refs.csv into ``root`` (disjoint MRs)."""
    df = _source()
    mrs = list(pd.unique(df["mr"]))
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (lo, hi) in RELEASE_MRS.items():
        part = df[df["mr"].isin(mrs[lo:hi])].reset_index(drop=True)
        part.to_csv(root / name, index=False)
        out[name] = part
    return out


def _rows(frame: pd.DataFrame) -> list[tuple[str, str]]:
    return list(zip(frame["mr"], frame["ref"], strict=True))


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh data cache, no $TESTBED_DATA, a download URL that fails on loopback."""
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TESTBED_DATA", raising=False)
    monkeypatch.setenv(D.E2E_URL_ENV, "http://127.0.0.1:9/e2e-dataset.zip")
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # loopback only, never through a proxy
    return tmp_path


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every file ``runner.dataset.data.load_e2e`` reads, in order (the module's own reference is
    patched, which is the one runner/dataset/splits.py calls)."""
    seen: list[str] = []
    real = D.load_e2e

    def load(spec, **kw):
        seen.append(str(spec))
        return real(spec, **kw)

    monkeypatch.setattr(D, "load_e2e", load)
    yield seen


# ------------------------------------------------------------------ choosing the protocol
def test_a_release_directory_is_the_official_split(tmp_path: Path) -> None:
    write_release(tmp_path / "e2e")
    proto = S.DataProtocol.resolve(str(tmp_path / "e2e"), seed=3)
    root = str((tmp_path / "e2e").resolve())
    assert proto.protocol == S.OFFICIAL and proto.official
    assert (proto.source, proto.train, proto.validation, proto.test) == (
        root, f"{root}/trainset.csv", f"{root}/devset.csv", f"{root}/testset_w_refs.csv")
    assert proto.fractions is None
    assert proto.line(42061) == (f"data: official E2E split in {root} (train trainset.csv "
                                 "42,061 rows, validation devset.csv, test testset_w_refs.csv)")
    # recorded and read back unchanged
    assert S.DataProtocol.from_record({"train": {"data_protocol": proto.to_dict()}}) == proto
    # resolve_data keeps its contract: one CSV, trainset preferred
    assert D.resolve_data(str(tmp_path / "e2e")) == tmp_path / "e2e" / "trainset.csv"


def test_a_single_csv_or_an_incomplete_directory_is_split_by_mr(tmp_path: Path) -> None:
    frames = write_release(tmp_path / "e2e")
    (tmp_path / "e2e" / "testset_w_refs.csv").unlink()  # two files of three: no official split
    proto = S.DataProtocol.resolve(str(tmp_path / "e2e"), (0.8, 0.1, 0.1), seed=0)
    train = str((tmp_path / "e2e" / "trainset.csv").resolve())
    assert proto.protocol == S.BY_MR
    assert proto.train == proto.validation == proto.test == proto.source == train
    assert proto.line() == f"data: {train} split by MR 80/10/10 (seed 0)"
    got = proto.training_frames()
    assert sum(len(f) for f in got.values()) == len(frames["trainset.csv"])
    assert _rows(proto.test_frame()) == _rows(got["test"])
    synthetic = S.DataProtocol.resolve("synthetic", (0.5, 0.25, 0.25), seed=1)
    assert synthetic.line(7) == "data: synthetic split by MR 50/25/25 (seed 1; train 7 rows)"


def test_old_runs_without_a_record_keep_the_split_by_mr(tmp_path: Path) -> None:
    csv_path = tmp_path / "d.csv"
    _source().head(80).to_csv(csv_path, index=False)
    old = {"train": {"data": str(csv_path), "seed": 2, "split_fractions": [0.6, 0.2, 0.2]}}
    proto = S.DataProtocol.from_record(old)
    assert (proto.protocol, proto.source, proto.fractions, proto.seed) == (
        S.BY_MR, str(csv_path), (0.6, 0.2, 0.2), 2)


def test_the_cache_holding_the_whole_release_gives_the_official_split(isolated: Path) -> None:
    cache = D.cache_dir() / "data" / "e2e"
    write_release(cache)
    proto = S.DataProtocol.resolve(None)
    assert proto.official and proto.source == str(cache.resolve())
    assert D.resolve_data(None) == cache / "trainset.csv"  # unchanged for one-CSV callers
    (cache / "testset_w_refs.csv").write_text("")  # a broken copy: not a release any more
    assert S.DataProtocol.resolve(None).protocol == S.BY_MR


def test_a_downloaded_release_gives_the_official_split(isolated: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The download (runner/dataset/data.py, a zip served on loopback here) extracts all three files
    into the cache, and the run then uses them as the official split."""
    import functools
    import http.server
    import threading
    import zipfile

    frames = write_release(isolated / "files")
    srv = isolated / "srv"
    srv.mkdir()
    with zipfile.ZipFile(srv / "e2e-dataset.zip", "w") as zf:
        for name in frames:
            zf.write(isolated / "files" / name, f"e2e-dataset/{name}")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(srv))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv(D.E2E_URL_ENV,
                           f"http://127.0.0.1:{server.server_address[1]}/e2e-dataset.zip")
        proto = S.DataProtocol.resolve(None)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert proto.official and proto.source == str((D.cache_dir() / "data" / "e2e").resolve())
    assert _rows(proto.test_frame()) == _rows(frames["testset_w_refs.csv"])


def test_test_data_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        S.eval_set({}, test_data=tmp_path / "gone.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="missing column"):
        S.eval_set({}, test_data=bad)
    with pytest.raises(DataError, match="not both"):
        S.eval_set({}, test_data=bad, data="synthetic")


# ------------------------------------------------------------ acceptance: train and eval
def test_training_reads_only_trainset_and_validates_only_on_devset(
        tmp_path: Path, spy: list[str]) -> None:
    from runner.trainer import prepare

    frames = write_release(tmp_path / "e2e")
    root = (tmp_path / "e2e").resolve()
    spy.clear()  # writing the release read the shared devset
    prep = prepare(TrainConfig(method="splitlora", model="tiny-llama", data=str(root),
                               clients=2, split=2, steps=2))
    assert spy == [str(root / "trainset.csv"), str(root / "devset.csv")]  # never the testset
    assert set(prep.frames) == {"train", "validation"}
    assert _rows(prep.frames["train"]) == _rows(frames["trainset.csv"])
    assert _rows(prep.frames["validation"]) == _rows(frames["devset.csv"])
    dealt = sorted(r for shard in prep.shards for r in _rows(shard))
    assert dealt == sorted(_rows(frames["trainset.csv"]))  # clients train on trainset rows only


@pytest.fixture(scope="module")
def official_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """`testbed train --data RELEASE_DIR` on the tiny model, two steps."""
    base = tmp_path_factory.mktemp("official")
    frames = write_release(base / "e2e")
    run = base / "run"
    proc = run_cli("train", "--method", "splitlora", "--model", "tiny-llama", "--data",
                   str(base / "e2e"), "--clients", "2", "--split", "2", "--steps", "2",
                   "--eval-every", "2", "--eval-max-examples", "8", "--out", str(run),
                   cwd=base)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return run, frames, proc.stdout


def test_train_prints_and_records_the_official_protocol(official_run) -> None:
    run, frames, stdout = official_run
    root = (run.parent / "e2e").resolve()
    n = len(frames["trainset.csv"])
    assert (f"data: official E2E split in {root} (train trainset.csv {n:,} rows, validation "
            "devset.csv, test testset_w_refs.csv)") in stdout
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["data_protocol"] == {
        "protocol": "official", "source": str(root), "train": str(root / "trainset.csv"),
        "validation": str(root / "devset.csv"), "test": str(root / "testset_w_refs.csv"),
        "fractions": None, "seed": 0}
    assert config["data_sizes"] == {"train": n, "validation": len(frames["devset.csv"])}
    assert TrainConfig.from_dict(config["train"]).data == str(run.parent / "e2e")


def test_eval_uses_only_the_testset_and_every_one_of_its_mrs(official_run, spy) -> None:
    from runner.evaluation.evaluate import DecodeConfig, evaluate_run
    from runner.rundir import RunDir

    run, frames, _ = official_run
    test = frames["testset_w_refs.csv"]
    refs = D.references_by_mr(test)
    result = evaluate_run(RunDir.open(run), decode=DecodeConfig(num_beams=1, max_new_tokens=6,
                                                                batch_size=8))
    testset = str((run.parent / "e2e" / "testset_w_refs.csv").resolve())
    assert spy == [testset]
    with open(run / "eval" / "outputs.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    assert [r[0] for r in rows] == list(refs)  # every test MR, in file order
    outputs = (run / "eval" / "outputs.txt").read_text(encoding="utf-8").split("\n")
    assert outputs[-1] == "" and outputs[:-1] == [" ".join(r[1].split()) for r in rows]
    groups = (run / "eval" / "references.txt").read_text(encoding="utf-8").rstrip("\n")
    assert [g.split("\n") for g in groups.split("\n\n")] == [
        [" ".join(r.split()) for r in group] for group in refs.values()]  # one text a line
    scores = json.loads((run / "eval" / "scores.json").read_text())
    extra = scores["extra"]
    assert (extra["test_file"], extra["protocol"], extra["test_mrs"], extra["whole_file"]) == (
        testset, "official", len(refs), True)
    assert result["test_mrs"] == len(refs)


def test_eval_test_data_scores_every_mr_of_the_file(official_run, tmp_path: Path) -> None:
    run, _, _ = official_run
    other = tmp_path / "other.csv"
    sample = _source().iloc[400:460]
    sample.to_csv(other, index=False)
    mrs = list(D.references_by_mr(sample))
    proc = run_cli("eval", str(run), "--test-data", str(other), "--beams", "1",
                   "--max-new-tokens", "4", cwd=tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert f"test: {len(mrs)} MRs of {other.resolve()}, the whole file" in proc.stdout
    assert str(run / "eval" / "outputs.txt") in proc.stdout
    assert str(run / "eval" / "references.txt") in proc.stdout
    extra = json.loads((run / "eval" / "scores.json").read_text())["extra"]
    assert (extra["test_file"], extra["test_mrs"], extra["whole_file"], extra["protocol"]) == (
        str(other.resolve()), len(mrs), True, "test-file")
    lines = (run / "eval" / "outputs.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(mrs)
    # --max-mrs keeps the first N, and says the file was not scored whole
    proc = run_cli("eval", str(run), "--test-data", str(other), "--max-mrs", "2",
                   "--beams", "1", "--max-new-tokens", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"test: 2 of {len(mrs)} MRs of {other.resolve()}" in proc.stdout
    extra = json.loads((run / "eval" / "scores.json").read_text())["extra"]
    assert (extra["test_mrs"], extra["whole_file"]) == (2, False)


@pytest.mark.parametrize("case", ["missing", "columns", "negative"])
def test_eval_bad_test_data_is_one_line_and_writes_nothing(official_run, tmp_path: Path,
                                                           case: str) -> None:
    run, _, _ = official_run
    bad = tmp_path / "bad.csv"
    bad.write_text("meaning,text\nname[X],X.\n")
    args = {"missing": ["--test-data", str(tmp_path / "gone.csv")],
            "columns": ["--test-data", str(bad)],
            "negative": ["--test-data", str(bad), "--max-mrs", "-1"]}[case]
    phrase = {"missing": "not found", "columns": "missing column", "negative": "--max-mrs"}[case]
    before = tree_digest(run)
    proc = run_cli("eval", str(run), *args, "--beams", "1", cwd=tmp_path)
    assert_user_error(proc, phrase)
    assert tree_digest(run) == before  # no new, changed or temporary file in RUN/eval


def test_eval_help_lists_test_data_beside_data() -> None:
    proc = run_cli("eval", "--help", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "--test-data" in proc.stdout and "--data" in proc.stdout


def test_a_release_directory_is_mounted_whole_and_read_back_from_the_host(tmp_path: Path
                                                                          ) -> None:
    """Compose backend, no Docker needed: the release directory is mounted as /data, the
    server records /data/... paths, and read_config maps the protocol's files back to the
    host, so `testbed eval` of that run reads the host's testset_w_refs.csv."""
    from runner.rundir import RunDir
    from testbed.backends.compose_run import ComposeRun
    from testbed.profiles import emulation_map, load_profile

    frames = write_release(tmp_path / "e2e")
    host = (tmp_path / "e2e").resolve()
    profile = load_profile("smoke")
    mapping = emulation_map(profile)
    cfg = TrainConfig(method="splitlora", model="tiny-llama", data=str(tmp_path / "e2e"),
                      clients=len(profile.devices))
    run = ComposeRun(profile, mapping, cfg, tmp_path / "run")
    run.prepare()
    seen, mounts = run._container_train()
    assert seen.data == "/data" and mounts[str(host)] == "/data:ro"
    # what the server in the container records (runner/server.py _snapshot)
    inside = S.DataProtocol("official", "/data", "/data/trainset.csv", "/data/devset.csv",
                            "/data/testset_w_refs.csv", None, 0)
    (run.run_dir / "config.json").write_text(json.dumps(
        {"train": {**seen.to_dict(), "data_protocol": inside.to_dict()}}))
    config = RunDir.open(run.run_dir).config()
    assert config["train"]["data_protocol"]["test"] == str(host / "testset_w_refs.csv")
    assert config["container_paths"]["train"]["data_protocol"] == inside.to_dict()
    chosen = S.eval_set(config)
    assert (chosen.file, chosen.whole_file) == (str(host / "testset_w_refs.csv"), True)
    assert _rows(chosen.frame) == _rows(frames["testset_w_refs.csv"])
