"""``testbed export k8s``: a profile's fleet as files for another orchestrator.

A sub-app of its own (registered in testbed/cli.py) so other targets can join ``k8s``
without touching the run commands. Errors follow the CLI's rule: one ``error:`` line on
stderr, exit code 2, and nothing written (testbed/exportdir.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from testbed.console import fail
from testbed.options import moved, train_default
from testbed.tlsmode import MTLS_HELP, TLSRequest

app = typer.Typer(help="Export a profile's fleet for another orchestrator (Kubernetes).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.command()
def k8s(
    profile: Annotated[str, typer.Option(
        help="Profile name (profiles/NAME.yaml, `testbed profiles list`) or path")],
    out: Annotated[Path | None, typer.Option(
        "--manifests-dir", "-o", help="Directory for the manifests (created; must be empty "
                                      "or an earlier export)", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace an earlier export in --manifests-dir (never a directory it did not "
             "write)")] = False,
    run_id: Annotated[str | None, typer.Option(
        help="Run id: MQTT topics, object names (hsl-RUN-...) and labels (default: the "
             "profile's name)")] = None,
    emulate: Annotated[bool | None, typer.Option(
        "--emulate/--no-emulate",
        help="Run the stand-in with rescaled budgets (docs/emulation.md) or the reference "
             "model itself (default: decided as `testbed up` decides, on this machine)")
    ] = None,
    steps: Annotated[int | None, typer.Option(
        help="Training steps (default: the profile's)")] = None,
    precision: Annotated[str, typer.Option(
        help="fp32 | bf16 | fp16 (forwards under autocast; fp16 with a loss scaler, for GPUs "
             "without bf16). `auto` is not offered: it depends on the cluster's "
             "hardware")] = train_default("precision"),
    model_hostpath: Annotated[str | None, typer.Option(
        help="A directory on every node that holds the testbed cache (models, e2e/), "
             "mounted instead of the claim hsplitlora-cache (single-node clusters)")] = None,
    tls: Annotated[str, typer.Option(
        "--tls", help="auto (on: a cluster's pod network spans nodes) | on | off; the "
                      "broker's certificate and each pod's CA as Secrets (docs/security.md)")
    ] = "auto",
    mtls: Annotated[bool, typer.Option("--mtls", help=MTLS_HELP)] = False,
    # old spellings: --force is --overwrite; --out (now the run directory of train/up) named
    # the manifests directory
    force: Annotated[bool, typer.Option("--force", hidden=True)] = False,
    old_out: Annotated[str | None, typer.Option("--out", hidden=True)] = None,
) -> None:
    """Kubernetes manifests for a profile's fleet: broker Deployment + Service, server Job,
    one Job per client with the compose backend's memory and CPU limits (and
    nvidia.com/gpu or nvidia.com/mig-PROFILE), credentials as Secrets, the run
    configuration as a ConfigMap, and kustomization.yaml. Apply with `kubectl apply -k
    DIR` after filling the model volume (docs/kubernetes.md). Nothing here talks to a
    cluster."""
    from runner.errors import UserError
    from testbed.backends import k8s as K
    from testbed.exportdir import check_target, write_tree
    from testbed.profiles import emulation_map, load_profile

    if old_out is not None:
        fail(moved("--out", "--manifests-dir DIR (-o DIR)", "the manifests directory"))
    if out is None:
        fail("name the directory for the manifests: --manifests-dir DIR (-o DIR)")
        return
    force = force or overwrite
    if steps is not None and steps < 1:
        fail(f"--steps must be >= 1, got {steps}")
    try:
        security = TLSRequest(tls, mtls).decide("k8s")
        check_target(out, force)  # before the (slow) emulation mapping
        prof = load_profile(profile)
        mapping = emulation_map(prof, emulate=emulate)
        manifests = K.build(prof, mapping, K.ExportOptions(
            run_id=run_id, steps=steps, precision=precision,
            model_hostpath=model_hostpath, tls=security.on, mutual=security.mutual))
        written = write_tree(out, K.texts(manifests), manifests.secret_files, force,
                             f"testbed export k8s --profile {prof.name}\n")
    except UserError as exc:
        fail(str(exc))
        return
    console = Console(soft_wrap=True)
    what = (f"emulating {mapping.reference} with {mapping.standin}" if mapping.emulated
            else f"running {mapping.reference}")
    console.print(f"{len(written)} files in {out} for profile {prof.name} ({what}; run id "
                  f"{manifests.run_id}, broker {manifests.broker_url})", highlight=False,
                  markup=False)
    console.print(security.line(), highlight=False, markup=False)
    for note in manifests.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    volume = (f"the node directory {model_hostpath}" if model_hostpath
              else f"the volume {K.MODEL_CLAIM} ({out / 'model-volume'})")
    console.print(f"next: fill {volume} with the testbed cache, then kubectl apply -k {out} "
                  "(docs/kubernetes.md)", highlight=False, markup=False)
