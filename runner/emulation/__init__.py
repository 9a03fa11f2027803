"""The devices a run emulates and the one a process runs on: device descriptions
(:mod:`.devices`), the virtual clock (:mod:`.clock`, :mod:`.vtime`), and what a process
finds out about its container: memory budget (:mod:`.budget`), CPU quota (:mod:`.cpu`),
measured memory (:mod:`.resources`)."""
