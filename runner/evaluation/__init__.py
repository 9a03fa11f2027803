"""Scoring a finished run: generation on the test set (:mod:`.evaluate`), the E2E
challenge's metrics (:mod:`.scoring`, :mod:`.nist`) and the slot error rate (:mod:`.slots`)."""
