"""Options that several ``testbed`` commands share, declared once so they mean one thing.

Why a module of its own: the commands live in testbed/cli.py and testbed/commands/*.py, and an
option spelled or defaulted in each of them drifted apart (``--out`` was a run directory, a
markdown file or a figures directory; the run was positional for some commands and ``--run``
for others; method lists were copied by hand into help strings). The scheme, which the
README's table repeats:

* ``RUN`` (positional): an existing run directory a command reads or acts on (``eval``,
  ``plot``, ``report``, ``status``, ``logs``, ``down``, ``inject``); ``--run`` is its old,
  hidden spelling.
* ``--out DIR``: the directory a training command creates (``train``, ``up``, ``scenario
  run``: a run directory; ``experiment run``: the experiment directory, one run directory
  per cell). Nothing else is called ``--out``.
* ``--report-file``, ``--figures-dir``, ``--manifests-dir`` (``-o`` each): a document a
  command writes that is not a run.
* ``--json``: one JSON object on stdout and nothing else there; what is printed for people
  goes to stderr (:func:`testbed.console.json_output`).
* Training options take their defaults from :class:`runner.config.TrainConfig`
  (:func:`train_default`), and method names in help come from the registry when help is
  shown (:class:`RegistryHelp`), plug-ins included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from runner.config import TrainConfig
from runner.errors import ConfigError, UserError
from runner.methods import registry

DEFAULT_RUN = Path("runs/latest")

# TrainConfig fields whose CLI option is not ``--`` + the field's name with dashes.
_FLAGS = {"dropouts": "--dropout"}


def flag(name: str) -> str:
    """The CLI option that sets TrainConfig field ``name``."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def train_default(name: str) -> Any:
    """TrainConfig's default of field ``name``: the one default a CLI option must show, so
    that ``testbed train``, ``testbed up``, experiment cells and the library agree (the
    start of issue 30: each training field declared once)."""
    for f in dataclasses.fields(TrainConfig):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    raise KeyError(name)


def comma(values: Iterable[Any]) -> str:
    """A tuple default as the comma list its option takes (``("q", "v")`` -> ``q,v``)."""
    return ",".join(str(v) for v in values)


# ------------------------------------------------------------------------ help from data
_PLACEHOLDER = re.compile(r"\{(methods|hetero|uses:[a-z_]+)\}")


def _fill(text: str, known: tuple[str, ...]) -> str:
    """``{methods}``: every method of ``known``; ``{hetero}``: the heterogeneous ones;
    ``{uses:FIELD}``: which use TrainConfig field FIELD (registry.unused_fields), as "for A,
    B" or, when shorter, "not for C"."""
    def one(match: re.Match[str]) -> str:
        key = match.group(1)
        if key == "methods":
            return " | ".join(known)
        if key == "hetero":
            return ", ".join(n for n in known if registry.get(n).hetero)
        field = key.split(":", 1)[1]
        used = [n for n in known if field not in registry.unused_fields(registry.get(n))]
        if len(used) == len(known):
            return "every method"
        if len(known) - len(used) < len(used):
            return "not for " + ", ".join(n for n in known if n not in used)
        return "for " + ", ".join(used)

    return _PLACEHOLDER.sub(one, text)


class RegistryHelp(TyperCommand):
    """A command whose option help may name methods through placeholders (:func:`_fill`),
    filled from the registry each time help is shown.

    Why at help time and not at import: a plug-in (``$TESTBED_METHODS``, or a ``register``
    call in the same process) is loaded after the CLI module is imported, and ``--help``
    must list what ``--method`` accepts then.
    """

    def format_help(self, ctx: Any, formatter: Any) -> None:
        with contextlib.suppress(ConfigError):  # a broken plug-in must not break --help
            registry.load_plugins()
        known = registry.having()  # everything registered now, without importing again
        for param in self.params:
            template = getattr(param, "_help_template", None)
            if template is None and isinstance(getattr(param, "help", None), str) \
                    and _PLACEHOLDER.search(param.help):
                template = param.help
                param._help_template = template  # type: ignore[attr-defined]
            if template is not None:
                param.help = _fill(template, known)  # type: ignore[attr-defined]
        super().format_help(ctx, formatter)


METHOD_HELP = "{methods}"
OUT_HELP = "Run directory to create (--overwrite replaces a run there)"
# One default everywhere: TrainConfig's (fp32), what experiment cells, scenario runs and
# `export k8s` use too; `auto` is a choice because what it picks depends on the machine.
PRECISION_HELP = ("fp32 (exact; the default everywhere) | bf16 (forwards under autocast; "
                  "weights, optimizer and wire stay fp32) | fp16 (autocast with a loss "
                  "scaler, for GPUs without bf16) | auto (on a CUDA device: bf16 where the GPU "
                  "has it, else fp16; on the CPU: bf16 where the CPU has bf16 arithmetic, else "
                  "fp32; printed)")
DEVICE_HELP = ("Where to train: auto (the first CUDA GPU when one is usable, else the CPU) | "
               "cpu | cuda | cuda:N. Every process resolves it on its own host "
               "(TESTBED_DEVICE overrides it per process). It decides what depends on where "
               "training runs: --precision auto, the CPU reductions (--cpu-steps, "
               "--cpu-max-mrs) and whether a profile's reference model is emulated; a GPU "
               "that is visible does not count with --device cpu. cuda without a usable GPU "
               "is an error, never a silent CPU run")


# ------------------------------------------------------------------------- the run
RunArg = Annotated[Path | None, typer.Argument(
    metavar="RUN", help="Run directory (default runs/latest; without a run there, the run "
                        "last started under runs/)", show_default=False)]
# The spellings before RUN was positional; hidden, and still accepted.
RunAlias = Annotated[Path | None, typer.Option("--run", "--out", hidden=True)]


def run_dir(positional: Path | None, alias: Path | None) -> Path:
    """The run a command addresses: RUN, else its old spelling ``--run DIR``, else
    runs/latest."""
    if positional is not None and alias is not None and positional != alias:
        raise UserError(f"two runs given ({positional} and --run {alias}); name the run once, "
                        "as RUN")
    return positional or alias or DEFAULT_RUN


def moved(old: str, new: str, what: str) -> str:
    """The one-line error for an old option spelling that now means something else."""
    return (f"{old} is the run directory a training command writes (train, up); {what} "
            f"is now {new}")


# --------------------------------------------------------------- options a method ignores
def check_applies(method: str, given: Iterable[str], *, devices: bool = False) -> None:
    """Refuse TrainConfig fields given explicitly that ``method`` would not use.

    Why: an option a method silently drops (``--rank`` for hsplitlora, whose ARMSC picks the
    ranks; ``--clients`` for cenlora) makes a run look configured as asked when it was not.
    Which fields a method uses comes from its traits (registry.unused_fields), so a plug-in
    is covered too. ``devices``: ``--devices`` was given (a virtual clock for any
    non-central method). An unknown method is left to TrainConfig.validate's message.
    """
    try:
        traits = registry.get(method)
    except KeyError:
        return
    given = list(given)
    unused = registry.unused_fields(traits)
    for name in given:
        if name in unused:
            takers = registry.using(name)
            instead = (f"; methods that take it: {', '.join(takers)}" if takers else "")
            raise UserError(f"{flag(name)} does not apply to {method}: {unused[name]}; drop "
                            f"{flag(name)}{instead}")
    if "stop_virtual_time" in given and not traits.hetero and not devices:
        raise UserError(f"--stop-virtual-time needs a virtual clock, which {method} has only "
                        "with --devices FILE (the heterogeneous methods always have one); "
                        "add --devices, or drop --stop-virtual-time")


def check_combinations(given: Collection[str], partition: str) -> None:
    """Refuse an option given explicitly that only works with another one.

    ``given``: the TrainConfig fields given explicitly; ``partition``: the run's partition
    (given, a profile's, or the default)."""
    if "dirichlet_alpha" in given and partition != "dirichlet":
        raise UserError("--dirichlet-alpha applies to --partition dirichlet; add it, or drop "
                        "--dirichlet-alpha")
    if "early_stop_min_delta" in given and "early_stop_patience" not in given:
        raise UserError("--early-stop-min-delta applies with --early-stop-patience N; add it, "
                        "or drop --early-stop-min-delta")


def explicit(ctx: typer.Context, names: Iterable[str]) -> list[str]:
    """The parameters among ``names`` given on the command line (or by environment), not
    left at their defaults."""
    sources = ("COMMANDLINE", "ENVIRONMENT")
    return [n for n in names if getattr(ctx.get_parameter_source(n), "name", None) in sources]
