"""The `testbed` sub-commands registered into :mod:`testbed.cli`, one module per command
group: up/status/down/logs/inject (:mod:`.runtime`), experiment, export, images, join,
profiles, scenario."""
