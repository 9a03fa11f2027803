"""The CLI is consistent and scriptable (issue 28 part 4): each rule checked so it can fail.

* ``--json`` prints one JSON object on stdout and nothing else there (``json.loads`` of the
  whole stdout), its notices on stderr: train, eval, plot, report, experiment run / report.
* An option the method does not use is refused in one ``error:`` line with exit code 2, for
  every method x option the registry's traits rule out (runner/methods/registry.py
  ``unused_fields``), in ``train`` and ``up``; what the engines read is pinned here too.
* ``--help`` lists exactly the registry's methods, a plug-in's included.
* A run is addressed positionally by status / logs / inject / down (``--run`` still works).
* ``--out`` is the run directory only: report / plot / export name their output otherwise,
  and the old ``--out`` there is refused with the new name.
* ``--precision`` has one default: TrainConfig's, in train, up, export k8s and the Makefile.

Subprocesses (as tests/test_cli.py runs them) where stdout must be clean at the file
descriptor; typer's CliRunner (separate stdout / stderr) for the cheap checks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from runner.config import TrainConfig
from runner.methods import registry
from testbed.cli import app
from testbed.options import flag

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
TRAIN = ["train", "--model", "tiny-llama", "--data", "synthetic", "--clients", "2", "--split",
         "2", "--steps", "2", "--eval-every", "2", "--eval-max-examples", "8", "--max-len",
         "256", "--precision", "fp32"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", **extra)
    env.pop("TESTBED_DATA", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_cli(*args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], cwd=cwd,
                          env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT_S,
                          check=False)


def one_json_object(proc: subprocess.CompletedProcess[str]) -> dict:
    """stdout is one JSON object and nothing else."""
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict), doc
    return doc


def one_error_line(code: int, stderr: str, *phrases: str) -> str:
    """Exit code 2, exactly one ``error:`` line on stderr naming ``phrases``, no traceback."""
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- --json
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """`testbed train --json` of a 2-step tiny run: (run, parsed stdout, stderr)."""
    run = tmp_path_factory.mktemp("json") / "run"
    proc = run_cli(*TRAIN, "--out", str(run), "--json")
    return run, one_json_object(proc), proc.stderr


def test_train_json_is_the_summary_alone_on_stdout(trained: tuple[Path, dict, str]) -> None:
    run, doc, stderr = trained
    assert doc["run"] == str(run) and doc["method"] == "splitlora" and doc["steps"] == 2
    assert doc["precision"] == "fp32"
    assert doc == {**json.loads((run / "summary.json").read_text()), "run": str(run),
                   "precision": "fp32"}
    # what train says for people went to stderr: the precision, the data protocol, the bar
    assert "precision: fp32" in stderr and "data: synthetic split by MR" in stderr


def test_eval_report_and_plot_json(trained: tuple[Path, dict, str], tmp_path: Path) -> None:
    run, _, _ = trained
    ev = one_json_object(run_cli("eval", str(run), "--max-mrs", "2", "--beams", "1",
                                 "--max-new-tokens", "4", "--json"))
    assert set(ev["scores"]) >= {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "SER"}
    assert ev["test_mrs"] == 2 and ev["run"] == str(run)
    assert Path(ev["outputs"]).is_file() and Path(ev["references"]).is_file()
    assert json.loads((run / "eval" / "scores.json").read_text())["scores"] == ev["scores"]

    report = tmp_path / "r" / "report.md"
    rep = one_json_object(run_cli("report", str(run), "--report-file", str(report), "--json"))
    assert rep["report"] == str(report) and report.is_file()
    assert [r["method"] for r in rep["runs"]] == ["splitlora"]
    assert rep["runs"][0]["BLEU"] == ev["scores"]["BLEU"]
    assert rep["figures"] and all(Path(f).is_file() for f in rep["figures"])

    figures = tmp_path / "figs"
    plot = one_json_object(run_cli("plot", str(run), "-o", str(figures), "--json"))
    assert plot["figures"] and all(Path(f).parent == figures for f in plot["figures"])


def test_experiment_run_and_report_json(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "tiny", "methods": ["splitlora"], "seeds": [0],
        "settings": {"model": "tiny-llama", "data": "synthetic", "clients": 2, "steps": 2,
                     "batch_size": 2, "agg_interval": 2, "eval_every": 2,
                     "eval_max_examples": 8}}))
    out = tmp_path / "exp"
    plan = one_json_object(run_cli("experiment", "run", str(spec), "--out", str(out),
                                   "--dry-run", "--json"))
    assert plan["dry_run"] is True
    assert [(c["id"], c["state"]) for c in plan["cells"]] == [("splitlora.seed0", "to run")]
    done = one_json_object(run_cli("experiment", "run", str(spec), "--out", str(out),
                                   "--json"))
    assert done["dir"] == str(out) and done["counts"]["finished"] == 1
    assert [(c["id"], c["status"]) for c in done["cells"]] == [("splitlora.seed0", "finished")]
    report = one_json_object(run_cli("experiment", "report", str(out), "--json"))
    assert Path(report["report"]) == out / "report.md" and (out / "report.md").is_file()


# ------------------------------------------------------------ options a method ignores
# What the engines read, per method (runner/trainer.py, runner/methods/*.py): the traits must
# keep deriving exactly this. A change here is a change of what a method does.
UNUSED = {
    "splitlora": {"rank_set"},
    "fedlora": {"rank_set", "server_chunk", "split"},
    "cenlora": {"agg_interval", "clients", "devices", "dirichlet_alpha", "dropouts",
                "partition", "rank_set", "server_chunk", "split", "stop_virtual_time"},
    "ft": {"agg_interval", "clients", "devices", "dirichlet_alpha", "dropouts", "lora_dropout",
           "partition", "rank", "rank_set", "server_chunk", "split", "stop_virtual_time",
           "targets"},
    "hetlora": {"rank", "server_chunk", "split"},
    "hsplitlora": {"rank", "split"},
    "hsplitlora-no-iwi": {"rank", "split"},
    "hsplitlora-no-armsc": {"rank_set"},
    "hsplitlora-no-naa": {"rank", "split"},
}
# A value each field's option accepts on the command line.
VALUES = {"clients": "2", "split": "2", "rank": "4", "targets": "q", "agg_interval": "2",
          "partition": "dirichlet", "dirichlet_alpha": "0.3", "lora_dropout": "0.0",
          "dropouts": "0:0:1", "devices": "devices.yaml", "rank_set": "0,4",
          "server_chunk": "1", "stop_virtual_time": "10"}


def test_the_traits_derive_what_the_engines_read() -> None:
    builtin = {n: set(registry.unused_fields(registry.get(n))) for n in registry.having()
               if n in UNUSED}
    assert builtin == UNUSED


@pytest.mark.parametrize(("method", "name"), sorted(
    (m, f) for m, fields in UNUSED.items() for f in fields))
def test_train_refuses_an_option_its_method_ignores(method: str, name: str) -> None:
    res = CliRunner().invoke(app, ["train", "--method", method, "--model", "tiny-llama",
                                   "--data", "synthetic", flag(name), VALUES[name]])
    one_error_line(res.exit_code, res.stderr, f"{flag(name)} does not apply to {method}")
    assert res.stdout == ""


def test_an_option_the_method_uses_passes_the_check() -> None:
    from testbed.options import check_applies

    for method, unused in UNUSED.items():
        used = [f for f in VALUES if f not in unused and f != "stop_virtual_time"]
        check_applies(method, used)  # raises UserError on a wrong refusal


def test_refusals_in_a_real_process_and_in_up(tmp_path: Path) -> None:
    proc = run_cli("train", "--method", "hsplitlora", "--rank", "4", "--out",
                   str(tmp_path / "r"), cwd=tmp_path)
    line = one_error_line(proc.returncode, proc.stderr, "--rank does not apply to hsplitlora",
                          "rank set")
    assert "hsplitlora-no-armsc" in line  # who takes it instead
    assert not (tmp_path / "r").exists()
    for args, words in ((["--method", "hsplitlora", "--split", "2"], "--split"),
                        (["--method", "cenlora", "--clients", "2"], "--clients"),
                        (["--dirichlet-alpha", "0.3"], "--partition dirichlet")):
        res = CliRunner().invoke(app, ["up", "--backend", "local", *args, "--out",
                                       str(tmp_path / "u")])
        one_error_line(res.exit_code, res.stderr, words)
    assert not (tmp_path / "u").exists()
    # cross-option rules of train
    for args, words in ((["--stop-virtual-time", "5"], "--devices"),
                        (["--early-stop-min-delta", "0.1"], "--early-stop-patience")):
        res = CliRunner().invoke(app, ["train", *args])
        one_error_line(res.exit_code, res.stderr, words)


# -------------------------------------------------------------- help from the registry
def test_help_lists_the_registry_methods_with_a_plugin() -> None:
    env = {"TESTBED_METHODS": "examples.splitlora_median", "COLUMNS": "1000"}
    names = subprocess.run(
        [sys.executable, "-c", "from runner.methods import registry; "
                               "print(','.join(registry.names()))"],
        cwd=REPO, env=_env(**env), capture_output=True, text=True, check=True,
    ).stdout.strip().split(",")
    assert "splitlora-median" in names and names[:len(registry.having())] == list(
        registry.having())
    for command in ("train", "up"):
        proc = run_cli(command, "--help", **env)
        assert proc.returncode == 0, proc.stderr
        row = next(line for line in proc.stdout.splitlines() if "--method " in line)
        listed = re.search(r"([\w-]+(?: \| [\w-]+)+)", row)
        assert listed is not None, row
        assert listed.group(1).split(" | ") == names, row
    # options a plug-in uses name it too (splitlora-median is a split method)
    split_row = next(line for line in run_cli("train", "--help", **env).stdout.splitlines()
                     if "--split " in line)
    assert "splitlora-median" in split_row and "hsplitlora," not in split_row


# ------------------------------------------------------------ the run, positionally
@pytest.fixture
def fake_run(tmp_path: Path) -> Path:
    """A run directory as `testbed up --backend local` leaves it, its processes gone."""
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "testbed-state.json").write_text(json.dumps(
        {"backend": "local", "run_id": "run", "clients": ["client0", "client1"],
         "processes": {}, "broker": {"url": "mqtt://127.0.0.1:1", "pid": None}}))
    (run / "logs" / "server.log").write_text("server line\n")
    (run / "logs" / "client0.log").write_text("client0 line\n")
    return run


def test_status_logs_inject_down_take_the_run_positionally(fake_run: Path) -> None:
    cli = CliRunner()
    st = cli.invoke(app, ["status", str(fake_run), "--json"])
    assert st.exit_code == 0, st.stderr
    assert json.loads(st.stdout)["run_dir"] == str(fake_run)
    logs = cli.invoke(app, ["logs", str(fake_run), "server"])
    assert logs.exit_code == 0 and "server line" in logs.stdout and "client0" not in logs.stdout
    both = cli.invoke(app, ["logs", str(fake_run)])
    assert "server line" in both.stdout and "client0 line" in both.stdout
    budget = cli.invoke(app, ["inject", "budget", str(fake_run), "--client", "client1",
                              "--memory", "1GB"])
    assert budget.exit_code == 0, budget.stderr
    assert (fake_run / "inject" / "client1.budget").read_text().strip() == str(10**9)
    unknown = cli.invoke(app, ["inject", "dropout", str(fake_run), "--client", "client9"])
    one_error_line(unknown.exit_code, unknown.stderr, "client9")
    down = cli.invoke(app, ["down", str(fake_run)])
    assert down.exit_code == 0 and "nothing was running" in down.stdout


def test_the_old_run_spellings_still_work(fake_run: Path, tmp_path: Path) -> None:
    cli = CliRunner()
    assert json.loads(cli.invoke(app, ["status", "--json", "--run", str(fake_run)]).stdout)[
        "run_dir"] == str(fake_run)
    assert "server line" in cli.invoke(app, ["logs", "server", "--run", str(fake_run)]).stdout
    twice = cli.invoke(app, ["status", str(fake_run), "--run", str(tmp_path)])
    one_error_line(twice.exit_code, twice.stderr, "name the run once")
    help_text = cli.invoke(app, ["status", "--help"]).stdout
    assert "--run" not in help_text  # hidden


# ----------------------------------------------------------- --out: the run directory
def test_out_means_the_run_directory_only(trained: tuple[Path, dict, str],
                                          tmp_path: Path) -> None:
    run, _, _ = trained
    cli = CliRunner()
    for args, new in ((["report", str(run), "--out", str(tmp_path / "r.md")], "--report-file"),
                      (["plot", str(run), "--out", str(tmp_path / "f")], "--figures-dir"),
                      (["experiment", "report", str(tmp_path), "--out", "x.md"],
                       "--report-file")):
        res = cli.invoke(app, args)
        one_error_line(res.exit_code, res.stderr, "--out is the run directory", new)
    assert not (tmp_path / "r.md").exists() and not (tmp_path / "f").exists()
    for command in ("report", "plot", "export k8s", "experiment report"):
        text = cli.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"}).stdout
        assert "--out " not in text, command  # hidden: the old spelling only


# ----------------------------------------------------------------- one precision default
def test_one_precision_default_everywhere() -> None:
    import typer.main

    default = TrainConfig().precision
    command = typer.main.get_command(app)
    ctx = command.make_context("testbed", ["--help"], resilient_parsing=True)

    def option_default(*path: str) -> str:
        cmd = command
        for name in path:
            cmd = cmd.get_command(ctx, name)  # type: ignore[attr-defined]
        return next(p.default for p in cmd.params if p.name == "precision")

    assert option_default("train") == default
    assert option_default("up") == default
    assert option_default("export", "k8s") == default
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^PRECISION \?= (\w+)$", makefile, re.M).group(1) == default

    # make run's short CPU recipe picks bf16 autocast where the CPU has it, as one of its
    # printed reductions; a PRECISION given by the user, or the whole profile, uses PRECISION
    def run_precision(*args: str, **env: str) -> str:
        return subprocess.run(
            ["make", "-s", "--no-print-directory", "--eval", "p: ; @echo $(RUN_PRECISION)",
             "p", *args], cwd=REPO, capture_output=True, text=True, check=True,
            env={**os.environ, **env}).stdout.strip()

    assert run_precision() == "auto"
    assert run_precision("STEPS=200") == default
    assert run_precision("PRECISION=bf16") == "bf16"
    assert run_precision(PRECISION="fp32") == "fp32"


def test_eval_on_the_validation_split_leaves_the_test_scores(
        trained: tuple[Path, dict, str]) -> None:
    """`eval --split validation` scores the run's validation MRs into eval/validation/ (how the
    main job's length penalty was chosen, docs/results.md) and touches nothing of the test
    evaluation: not eval/scores.json, not the "evaluated" events the report reads."""
    run, _, _ = trained
    test_scores = run / "eval" / "scores.json"
    before = test_scores.read_bytes() if test_scores.exists() else None
    events = (run / "events.jsonl").read_text()
    ev = one_json_object(run_cli("eval", str(run), "--split", "validation", "--max-mrs", "2",
                                 "--beams", "2", "--max-new-tokens", "4",
                                 "--length-penalty", "1.5", "--json"))
    assert ev["split"] == "validation" and ev["test_mrs"] == 2
    assert ev["eval_dir"] == str(run / "eval" / "validation")
    doc = json.loads((run / "eval" / "validation" / "scores.json").read_text())
    assert doc["scores"] == ev["scores"] and doc["extra"]["decode"]["length_penalty"] == 1.5
    assert Path(ev["outputs"]).parent == run / "eval" / "validation"
    assert (test_scores.read_bytes() if test_scores.exists() else None) == before
    assert (run / "events.jsonl").read_text() == events

    bad = run_cli("eval", str(run), "--split", "train", "--max-mrs", "1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: --split must be one of test, validation, got 'train'"]
    both = run_cli("eval", str(run), "--split", "validation", "--data", "synthetic")
    assert both.returncode == 2 and "drop --data / --test-data" in both.stderr
