"""Where a fleet runs: local processes (:mod:`.local`), Docker Compose (:mod:`.compose`: the
override file, :mod:`.compose_run`: the run, :mod:`.watcher`: its host-side watch), Docker
Swarm (:mod:`.swarm_run`), a Kubernetes export (:mod:`.k8s`), the images they run
(:mod:`.images`) and a device joining a running fleet (:mod:`.join`)."""
