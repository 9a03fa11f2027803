"""End-to-end tests of the ``testbed`` command line, run as a real subprocess.

What they pin down (DEVELOPERS.md "Bad input gets a clear error"): every user error ends with
exit code 2 and exactly one line on stderr that starts with ``error:`` and says what is wrong,
never a traceback, and a failed run leaves no half-written run directory behind. One happy path
trains a tiny model for a few steps and evaluates it, checking the run-directory layout.

Only the tiny random models are used (``tiny-llama``, ``tiny-gpt2``), with ``--data synthetic``
or small CSVs written here, so the subprocesses stay light. The tiny models live in the default
cache (``$TESTBED_CACHE`` or ``~/.cache/hsplitlora-testbed``) and are shared with other runs; they
are created once, seeded, so sharing them is safe. ``HF_HUB_OFFLINE=1`` makes sure an unknown model
id never turns into a network request.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # generous: the machine may be busy with a training job

# A happy-path run: tiny, two clients, split after block 2 of 4.
TRAIN_STEPS = 6
HAPPY_ARGS = [
    "train", "--method", "splitlora", "--model", "tiny-llama", "--data", "synthetic",
    "--clients", "2", "--split", "2", "--steps", str(TRAIN_STEPS), "--eval-every", "3",
    "--eval-max-examples", "16", "--max-len", "256",
]  # fmt: skip
METRIC_NAMES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")


def _env() -> dict[str, str]:
    """The subprocess environment: offline hub, one thread, the default (shared) model cache."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    # Tiny models gain nothing from threads; on a busy machine oversubscription costs 4x.
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env.pop("TESTBED_DATA", None)  # every test passes --data explicitly
    # Make sure the subprocess imports this checkout's packages.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m testbed.cli ARGS`` and capture its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "testbed.cli", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def assert_user_error(proc: subprocess.CompletedProcess[str], *phrases: str) -> str:
    """Exit code 2, one ``error:`` line on stderr containing ``phrases``, no traceback."""
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, detail
    assert "Traceback" not in proc.stderr, detail
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr\n{detail}"
    line = lines[0]
    assert line.strip(), detail
    assert line.startswith("error:"), detail
    for phrase in phrases:
        assert phrase.lower() in line.lower(), f"{phrase!r} not in the error line\n{detail}"
    return line


def assert_no_run_written(out: Path) -> None:
    """A failed ``train`` must not leave something that looks like a run."""
    if out.exists():
        assert not (out / "config.json").exists(), sorted(p.name for p in out.iterdir())
        assert not (out / "metrics.jsonl").exists()
        assert not (out / "summary.json").exists()


def read_jsonl_strict(path: Path) -> list[dict]:
    """Every non-empty line must be valid JSON (a finished run has no truncated line)."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:  # pragma: no cover - failure path
            pytest.fail(f"{path.name} line {n} is not valid JSON ({exc}): {line[:200]!r}")
    return rows


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------ help


def test_help_lists_commands() -> None:
    proc = run_cli("--help", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "eval" in proc.stdout


def test_train_help_lists_options() -> None:
    proc = run_cli("train", "--help", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    for option in ("--method", "--model", "--data", "--clients", "--split", "--rank",
                   "--steps", "--out", "--overwrite"):
        assert option in proc.stdout, f"{option} missing from `testbed train --help`"


def test_eval_help_lists_options() -> None:
    proc = run_cli("eval", "--help", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    for option in ("--data", "--max-mrs", "--beams", "--max-new-tokens"):
        assert option in proc.stdout, f"{option} missing from `testbed eval --help`"


# ------------------------------------------------------------------------ user errors


def test_missing_data_file(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli("train", "--model", "tiny-llama", "--data", "/nonexistent/x.csv",
                   "--steps", "1", "--out", str(out), cwd=tmp_path)
    assert_user_error(proc, "not found", "/nonexistent/x.csv")
    assert_no_run_written(out)


def test_csv_without_mr_ref_columns(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("meaning,text\nname[Aromi],Aromi is a pub.\n", encoding="utf-8")
    out = tmp_path / "run"
    proc = run_cli("train", "--model", "tiny-llama", "--data", str(bad), "--steps", "1",
                   "--out", str(out), cwd=tmp_path)
    assert_user_error(proc, "missing column", "mr,ref", str(bad))
    assert_no_run_written(out)


@pytest.mark.parametrize("k", [0, 4])
def test_split_point_out_of_range(tmp_path: Path, k: int) -> None:
    out = tmp_path / "run"
    proc = run_cli("train", "--method", "splitlora", "--model", "tiny-llama", "--data",
                   "synthetic", "--split", str(k), "--steps", "1", "--out", str(out),
                   cwd=tmp_path)
    # tiny-llama has 4 blocks, so the valid range is 1..3 and the message says so.
    assert_user_error(proc, f"split point {k}", "1..3")
    assert_no_run_written(out)


def test_unknown_model_offline(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli("train", "--model", "no-such-org/no-such-model", "--data", "synthetic",
                   "--steps", "1", "--out", str(out), cwd=tmp_path)
    assert_user_error(proc, "unknown model", "no-such-org/no-such-model")
    # The failure happens before the run directory is created: nothing half-written.
    assert_no_run_written(out)


def test_unknown_method(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli("train", "--method", "bogus", "--model", "tiny-llama", "--data", "synthetic",
                   "--steps", "1", "--out", str(out), cwd=tmp_path)
    assert_user_error(proc, "unknown method", "bogus", "splitlora")
    assert_no_run_written(out)


def test_unknown_lora_target(tmp_path: Path) -> None:
    # Raised while building the adapters: must still come before anything is written to --out.
    out = tmp_path / "run"
    proc = run_cli("train", "--model", "tiny-llama", "--data", "synthetic", "--targets", "bogus",
                   "--steps", "1", "--out", str(out), cwd=tmp_path)
    assert_user_error(proc, "unknown projection", "bogus")
    assert_no_run_written(out)


def test_eval_on_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("hello\n")
    proc = run_cli("eval", str(not_a_run), "--max-mrs", "1", "--beams", "1", cwd=tmp_path)
    assert_user_error(proc, "not a run directory", str(not_a_run))
    assert not (not_a_run / "eval").exists()


# -------------------------------------------------------------------------- happy path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny splitlora run, shared by the tests below (training is the slow part)."""
    base = tmp_path_factory.mktemp("cli-run")
    out = base / "run"
    proc = run_cli(*HAPPY_ARGS, "--out", str(out), cwd=base)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert "run written to" in proc.stdout
    return out


@pytest.fixture(scope="module")
def evaluated_run(trained_run: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    proc = run_cli("eval", str(trained_run), "--max-mrs", "3", "--beams", "2",
                   "--max-new-tokens", "8", cwd=trained_run.parent)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return trained_run, proc


def test_train_writes_run_directory(trained_run: Path) -> None:
    for name in ("config.json", "metrics.jsonl", "events.jsonl", "summary.json"):
        assert (trained_run / name).is_file(), name
    adapter = trained_run / "adapters" / "final"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    json.loads((adapter / "adapter_config.json").read_text())
    # No temporary files left behind by the atomic writers.
    assert not list(trained_run.rglob("*.tmp"))

    config = json.loads((trained_run / "config.json").read_text())
    assert config["train"]["method"] == "splitlora"
    assert config["train"]["model"] == "tiny-llama"
    assert config["train"]["clients"] == 2
    assert config["train"]["split"] == 2
    assert config["train"]["steps"] == TRAIN_STEPS
    assert config["num_layers"] == 4
    assert config["model_family"] == "llama"
    assert config["data_source"] == "synthetic"

    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["method"] == "splitlora"
    assert summary["steps"] == TRAIN_STEPS
    for key in ("pretrained_val_ppl", "final_val_ppl"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key


def test_train_metrics_records(trained_run: Path) -> None:
    rows = read_jsonl_strict(trained_run / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train"]
    for client in ("client0", "client1"):
        steps = sorted(r["step"] for r in train if r["client"] == client)
        assert steps == list(range(TRAIN_STEPS)), (client, steps)
    assert {r["client"] for r in train} == {"client0", "client1"}
    for r in train:
        assert math.isfinite(r["loss"]), r
        assert r["tokens"] > 0, r
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0, r  # split: activations cross

    evals = [r for r in rows if r.get("kind") == "eval"]
    eval_steps = [r["step"] for r in evals]
    # Before training and after the last step; in between only at step <= TRAIN_STEPS.
    # (The trainer rounds --eval-every up to a multiple of --agg-interval so that evaluation
    # sees the aggregated adapter: with the default interval 5 that adds an eval at step 5.)
    assert eval_steps[0] == 0 and eval_steps[-1] == TRAIN_STEPS, eval_steps
    assert eval_steps == sorted(set(eval_steps)), eval_steps
    assert all(0 <= s <= TRAIN_STEPS for s in eval_steps), eval_steps
    for r in evals:
        assert r["val_ppl"] is not None and math.isfinite(r["val_ppl"]), r

    events = read_jsonl_strict(trained_run / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_started", kinds
    assert "run_finished" in kinds, kinds


def test_eval_writes_outputs_and_scores(evaluated_run) -> None:
    run, proc = evaluated_run
    for name in METRIC_NAMES:
        assert name in proc.stdout, proc.stdout

    with open(run / "eval" / "outputs.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["mr", "output"]
    assert len(rows) == 1 + 3, rows
    assert all(len(r) == 2 and r[0].strip() for r in rows[1:]), rows

    scores_doc = json.loads((run / "eval" / "scores.json").read_text())
    scores = scores_doc.get("scores", scores_doc)
    for name in METRIC_NAMES:
        value = scores[name]
        assert isinstance(value, int | float) and math.isfinite(value), (name, value)
    assert not list((run / "eval").glob("*.tmp"))


def test_train_twice_into_same_out_refuses(trained_run: Path) -> None:
    before = tree_digest(trained_run)
    proc = run_cli(*HAPPY_ARGS, "--out", str(trained_run), cwd=trained_run.parent)
    assert_user_error(proc, "already holds a run", "--overwrite")
    assert tree_digest(trained_run) == before, "a refused run must not touch the first one"


def test_eval_with_missing_data_file(evaluated_run) -> None:
    # The error comes while the progress bar is up: the bar must not add a line to stderr.
    run, _ = evaluated_run
    before = tree_digest(run)
    proc = run_cli("eval", str(run), "--data", "/nonexistent/x.csv", "--max-mrs", "1",
                   "--beams", "1", cwd=run.parent)
    assert_user_error(proc, "not found", "/nonexistent/x.csv")
    assert tree_digest(run) == before, "a failed eval must not touch the run"


# --------------------------------------------------------------- testbed up --profile
def test_up_profile_runs_hsplitlora_distributed_on_the_profile_budgets(tmp_path: Path) -> None:
    """`testbed up --profile smoke --method hsplitlora --backend local`: the mapping is
    printed, broker + server + 3 client processes run HSplitLoRA, and the profile's mapped
    budgets are the ones ARMSC planned for (the reconfigure event's budgets)."""
    out = tmp_path / "hs"
    # --cpu-steps (what `make run` passes): no GPU here, so the profile's 6 steps become 2,
    # said in one line and recorded in config.json
    # --precision auto (`make run PRECISION=auto`; the default everywhere is fp32): bf16
    # autocast where this machine has bf16 arithmetic (the CI machine's CPU has AMX),
    # recorded and run by every process
    # --batch-size, --eval-max-examples, --seed: a given option overrides the profile's
    # experiment (they were once dropped silently), one not given keeps the profile's
    proc = run_cli("up", "--profile", "smoke", "--method", "hsplitlora", "--backend", "local",
                   "--cpu-steps", "2", "--precision", "auto", "--batch-size", "3",
                   "--eval-max-examples", "7", "--seed", "5", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from testbed.precision import resolve

    precision, line = resolve("auto")
    assert line in proc.stdout
    assert "emulating meta-llama/Llama-2-7b-hf" in proc.stdout
    assert "no GPU here: a CPU run of 2 of the profile's 6 steps" in proc.stdout
    assert "--steps 6" in proc.stdout
    assert "data: synthetic split by MR 80/10/10 (seed 5)" in proc.stdout  # the protocol
    devices = json.loads((out / "devices.json").read_text())
    assert [c["name"] for c in devices["clients"]] == ["client0", "client1", "client2"]
    budgets = [c["memory_bytes"] for c in devices["clients"]]
    assert budgets == sorted(budgets) and budgets[0] < budgets[-1]  # 5 < 12.5 < 20 GB, mapped
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["method"] == "hsplitlora"
    assert config["train"]["steps"] == 2
    assert config["train"]["extra"]["cpu_reduction"]["profile_steps"] == 6
    assert config["train"]["precision"] == precision
    assert "overriding the profile's experiment: method=hsplitlora, batch_size=3, " \
        "eval_max_examples=7, seed=5" in proc.stdout
    from testbed.profiles import load_profile

    profile = load_profile("smoke").experiment
    assert (config["train"]["batch_size"], config["train"]["eval_max_examples"],
            config["train"]["seed"], config["train"]["agg_interval"]) == (3, 7, 5,
                                                                          profile.agg_interval)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["runtime"] == "mqtt"
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    plan = next(e for e in events if e["event"] == "reconfigure")
    assert [plan["clients"][c]["budget_bytes"] for c in ("client0", "client1", "client2")] \
        == budgets
    assert any(e["event"] == "probe" for e in events)


def test_sigterm_stops_a_foreground_up_and_its_processes(tmp_path: Path) -> None:
    """A `kill` (or a CI timeout, or a stopped `make run`) of `testbed up` takes the run's
    broker, server and clients down with it, as Ctrl-C does, instead of leaving them running."""
    import signal
    import time

    from testbed.backends.local import pid_alive, read_state

    out = tmp_path / "term"
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed.cli", "up", "--profile", "smoke", "--backend", "local",
         "--steps", "200", "--min-step-time", "1", "--out", str(out)],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (out / "metrics.jsonl").is_file() or '"train"' not in (
                out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.5)
        pids = {who: info["pid"] for who, info in read_state(out)["processes"].items()}
        assert {"server", "client0"} <= set(pids) and all(pid_alive(p) for p in pids.values())
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "interrupted; stopping the run" in output, output[-3000:]
    assert "Traceback" not in output
    time.sleep(1)
    assert [who for who, pid in pids.items() if pid_alive(pid)] == []


def test_up_unknown_profile_and_bad_mem_limit(tmp_path: Path) -> None:
    assert_user_error(run_cli("up", "--profile", "no-such-profile", cwd=tmp_path),
                      "no-such-profile")
    assert_user_error(run_cli("up", "--profile", "smoke", "--backend", "compose",
                              "--mem-limit", "client9=1GB", "--out", str(tmp_path / "y"),
                              cwd=tmp_path), "client9")
    assert_user_error(run_cli("up", "--backend", "compose", cwd=tmp_path), "--profile")
    for flag, value in (("--model", "smollm2-135m"), ("--clients", "4")):
        assert_user_error(run_cli("up", "--profile", "smoke", flag, value, "--out",
                                  str(tmp_path / "v"), cwd=tmp_path), flag, "--profile")
    assert_user_error(run_cli("up", "--cpu-steps", "5", "--out", str(tmp_path / "z"),
                              cwd=tmp_path), "--cpu-steps", "--profile")
    for args, words in ((["--cpu-steps", "0"], ("--cpu-steps", ">= 1")),
                        (["--cpu-eval-examples", "8"], ("--cpu-eval-examples", "--cpu-steps"))):
        assert_user_error(run_cli("up", "--profile", "smoke", "--backend", "local", *args,
                                  "--out", str(tmp_path / "w"), cwd=tmp_path), *words)
        assert not (tmp_path / "w" / "config.json").exists()


def test_eval_of_an_unfinished_run_says_how_far_it_got(trained_run: Path, tmp_path: Path
                                                       ) -> None:
    """A run killed after 2 of 6 steps has no adapter: eval says so in one line (what is
    missing, how far the run got), not a traceback."""
    run = tmp_path / "killed"
    run.mkdir()
    (run / "config.json").write_text((trained_run / "config.json").read_text())
    train = [line for line in (trained_run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("kind") == "train" and json.loads(line)["step"] < 2]
    (run / "metrics.jsonl").write_text("\n".join(train) + "\n")
    proc = run_cli("eval", str(run), "--max-mrs", "1", "--beams", "1", cwd=tmp_path)
    assert_user_error(proc, "no final adapter", "did not finish", f"2 of {TRAIN_STEPS} steps")
    assert not (run / "eval" / "scores.json").exists()


def test_inject_budget_writes_what_the_client_reads_and_refuses_bad_input(tmp_path: Path) -> None:
    """`testbed inject budget`: the budget file a client reads (runner/client.py) holds the
    parsed size; an unknown client, a size that is not one, or a directory without a run
    give one error line each and change nothing. (The end-to-end effect, a re-plan by
    ARMSC, is tests/test_hetero_distributed.py.)"""
    run = tmp_path / "run"
    run.mkdir()
    (run / "testbed-state.json").write_text(json.dumps(
        {"backend": "local", "clients": ["client0", "client1"], "processes": {}}))
    ok = run_cli("inject", "budget", str(run), "--client", "client1", "--memory", "600MiB",
                 cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (run / "inject" / "client1.budget").read_text().strip() == str(600 * 2**20)
    for args, words in ((["--client", "client7", "--memory", "1GB"], "unknown client"),
                        (["--client", "client0", "--memory", "lots"], "lots"),
                        (["--client", "client0", "--memory", "0"], "> 0")):
        bad = run_cli("inject", "budget", *args, str(run), cwd=tmp_path)
        assert bad.returncode != 0
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], bad.stderr
        assert "Traceback" not in bad.stderr
    assert not (run / "inject" / "client0.budget").exists()
    # (the old spelling --run DIR still names the run)
    nothing = run_cli("inject", "budget", "--client", "client0", "--memory", "1GB", "--run",
                      str(tmp_path / "none"), cwd=tmp_path)
    assert nothing.returncode != 0 and "testbed up" in nothing.stderr
