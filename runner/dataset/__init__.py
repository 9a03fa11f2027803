"""The E2E NLG data: discovery, partitions over clients and encoding (:mod:`.data`), and
the train / validation / test protocol of a run (:mod:`.splits`)."""
