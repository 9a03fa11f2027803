"""Which rows train, validate and test a run: the data protocol, decided once and recorded.

Two protocols (issue 12):

* ``official``: a directory holding the E2E NLG Challenge release (``trainset.csv``,
  ``devset.csv``, ``testset_w_refs.csv``). Training reads trainset only, validation devset only,
  and the test set is the whole of testset_w_refs. This is how the E2E papers measure (Novikova
  et al., SIGDIAL 2017; the challenge scores all 630 test MRs), so only these numbers can be
  put beside theirs.
* ``split-by-mr``: one CSV (or ``synthetic``, or a directory lacking one of the three files)
  cut into train/validation/test by distinct MR with the run's seed and fractions
  (:func:`runner.dataset.data.split_by_mr`): the testbed's protocol when there is only one file.

Why a module of its own: the in-process trainer, the distributed server and clients,
``testbed up`` on the host and ``testbed eval`` months later must all agree on the same rows,
so the decision is one small value (:class:`DataProtocol`), written into ``config.json``
(``train.data_protocol``) and rebuilt from it, never re-derived from whatever the environment
or the cache holds at evaluation time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from runner.dataset import data as data_mod
from runner.errors import ConfigError, DataError

OFFICIAL = "official"
BY_MR = "split-by-mr"
TEST_FILE = "test-file"
"""Protocol names recorded in config.json and scores.json."""

RECORD_KEY = "data_protocol"
"""Key of the record in config.json's ``train`` section (TrainConfig.from_dict ignores it)."""


def _fractions(values: Any) -> tuple[float, float, float]:
    """Three split fractions from a config value (a list in JSON); the default when absent."""
    found = tuple(float(f) for f in (values or (0.8, 0.1, 0.1)))
    if len(found) != 3:
        raise ConfigError(f"split fractions {found} must be three numbers (train, validation, "
                          "test), e.g. 0.8,0.1,0.1")
    return found[0], found[1], found[2]


def _absolute(path: str | Path) -> str:
    """An absolute path, so that a run evaluated from another directory finds its files."""
    return str(Path(path).expanduser().resolve())


@dataclass(frozen=True)
class DataProtocol:
    """Where a run's train, validation and test rows come from.

    ``source`` is the release directory, the CSV or ``"synthetic"``; ``train``,
    ``validation`` and ``test`` name the file each split is read from (the same CSV three times
    for ``split-by-mr``); ``fractions`` and ``seed`` cut that CSV (``None`` fractions for the
    official split, which cuts nothing).
    """

    protocol: str
    source: str
    train: str
    validation: str
    test: str
    fractions: tuple[float, float, float] | None
    seed: int

    # ----------------------------------------------------------------------- building
    @classmethod
    def resolve(cls, spec: str | Path | None,
                fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                seed: int = 0) -> DataProtocol:
        """The protocol for a ``--data`` value (None: ``$TESTBED_DATA``, the cache, a download;
        :func:`runner.dataset.data.resolve_source`)."""
        source = data_mod.resolve_source(spec)
        if isinstance(source, Path) and source.is_dir():
            files = {split: _absolute(source / name)
                     for split, name in data_mod.RELEASE_FILES.items()}
            return cls(OFFICIAL, _absolute(source), files["train"], files["validation"],
                       files["test"], None, seed)
        name = source if source == data_mod.SYNTHETIC else _absolute(source)
        return cls(BY_MR, name, name, name, name, _fractions(fractions), seed)

    @classmethod
    def for_config(cls, cfg: Any) -> DataProtocol:
        """The protocol of a TrainConfig (its ``data``, ``split_fractions`` and ``seed``)."""
        return cls.resolve(cfg.data, tuple(cfg.split_fractions), cfg.seed)

    @classmethod
    def from_record(cls, config: dict[str, Any]) -> DataProtocol:
        """The protocol a run recorded (``config.json`` as :func:`runner.rundir.read_config`
        returns it, container paths already mapped to the host).

        Runs made before the protocol was recorded split their data by MR, and their data was
        found by :func:`runner.dataset.data.resolve_data` (always one CSV), so that is what they
        get.
        """
        train = config.get("train") or {}
        doc = train.get(RECORD_KEY)
        fractions = _fractions(train.get("split_fractions"))
        seed = int(train.get("seed") or 0)
        if not isinstance(doc, dict):
            source = data_mod.resolve_data(train.get("data"))
            name = str(source)
            return cls(BY_MR, name, name, name, name, fractions, seed)
        recorded = doc.get("fractions")
        return cls(
            protocol=str(doc["protocol"]), source=str(doc["source"]), train=str(doc["train"]),
            validation=str(doc["validation"]), test=str(doc["test"]),
            fractions=_fractions(recorded) if recorded else None,
            seed=int(doc.get("seed", seed)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The record written under ``config.json`` ``train.data_protocol``."""
        return {"protocol": self.protocol, "source": self.source, "train": self.train,
                "validation": self.validation, "test": self.test,
                "fractions": list(self.fractions) if self.fractions else None,
                "seed": self.seed}

    # ----------------------------------------------------------------------- reading
    @property
    def official(self) -> bool:
        """The official E2E split (three files), as opposed to one file split by MR."""
        return self.protocol == OFFICIAL

    def _split_source(self) -> dict[str, pd.DataFrame]:
        """The single source cut by MR (split-by-mr only)."""
        df = data_mod.load_e2e(self.source, seed=self.seed)
        return data_mod.split_by_mr(df, self.fractions or (0.8, 0.1, 0.1), seed=self.seed)

    def training_frames(self) -> dict[str, pd.DataFrame]:
        """The frames a training run needs: ``train`` and ``validation`` (and, split by MR,
        ``test``, which comes from the same file anyway).

        The official test file is not read here: training must not touch it.
        """
        if not self.official:
            return self._split_source()
        out = {}
        for split in ("train", "validation"):
            frame = data_mod.load_e2e(getattr(self, split))
            frame.attrs["split"] = split
            out[split] = frame
        return out

    def test_frame(self) -> pd.DataFrame:
        """The run's test rows: the whole official test file, or the test fraction by MR."""
        if self.official:
            frame = data_mod.load_e2e(self.test)
            frame.attrs["split"] = "test"
            return frame
        return self._split_source()["test"]

    def line(self, train_rows: int | None = None) -> str:
        """What ``testbed train`` / ``testbed up`` print, e.g.
        ``data: official E2E split in DIR (train trainset.csv 42,061 rows, validation
        devset.csv, test testset_w_refs.csv)``."""
        rows = f" {train_rows:,} rows" if train_rows is not None else ""
        if self.official:
            return (f"data: official E2E split in {self.source} (train {Path(self.train).name}"
                    f"{rows}, validation {Path(self.validation).name}, test "
                    f"{Path(self.test).name})")
        cut = "/".join(f"{f * 100:g}" for f in self.fractions or ())
        extra = f"; train{rows}" if rows else ""
        return f"data: {self.source} split by MR {cut} (seed {self.seed}{extra})"


#: What ``testbed eval --split`` scores: the run's test split (default) or its validation split.
EVAL_SPLITS = ("test", "validation")


@dataclass(frozen=True)
class EvalSet:
    """The rows ``testbed eval`` generates for and scores against, and where they came from.

    ``whole_file``: every MR of ``file`` is in ``frame`` (the official test file or
    ``--test-data``), as opposed to a fraction of it split by MR.
    """

    frame: pd.DataFrame
    file: str
    protocol: str
    whole_file: bool


def eval_set(config: dict[str, Any], *, data: str | None = None,
             test_data: str | Path | None = None, split: str = "test") -> EvalSet:
    """The test set of ``testbed eval`` for a run whose (host-mapped) config is ``config``.

    * ``test_data``: every MR of that CSV (a release directory means its testset_w_refs.csv);
    * ``data``: that data's own test split as a run trained on it would have it (a release
      directory: its test file; one CSV: its test fraction by MR with the run's seed);
    * neither: the run's recorded protocol (:meth:`DataProtocol.from_record`).

    ``split="validation"``: the run's own validation rows instead (the MRs it selected its
    checkpoints on), so decoding settings can be chosen without looking at the test split;
    not with ``data`` or ``test_data``.
    """
    if split not in EVAL_SPLITS:
        raise DataError(f"--split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    if split == "validation":
        if test_data is not None or data is not None:
            raise DataError("--split validation scores the run's own validation split; drop "
                            "--data / --test-data")
        proto = DataProtocol.from_record(config)
        frame = proto.training_frames()["validation"]
        return EvalSet(frame, proto.validation, proto.protocol, proto.official)
    if test_data is not None and data is not None:
        raise DataError("give --test-data FILE (score every MR of FILE) or --data (the test "
                        "split of other data), not both")
    if test_data is not None:
        path = Path(test_data).expanduser()
        if path.is_dir() and (path / data_mod.RELEASE_FILES["test"]).is_file():
            path = path / data_mod.RELEASE_FILES["test"]
        frame = data_mod.load_e2e(path)
        return EvalSet(frame, _absolute(path), TEST_FILE, True)
    if data is not None:
        train = config.get("train") or {}
        proto = DataProtocol.resolve(data, _fractions(train.get("split_fractions")),
                                     int(train.get("seed") or 0))
    else:
        proto = DataProtocol.from_record(config)
    return EvalSet(proto.test_frame(), proto.test, proto.protocol, proto.official)
