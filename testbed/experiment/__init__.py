"""Experiment grids (`testbed experiment run`): the experiment file's schema and cells
(:mod:`.spec`), the grid runner (:mod:`.run`), one cell in its own process (:mod:`.cell`),
a cell's memory estimate (:mod:`.memory`) and the fixed-configuration fairness rule
(:mod:`.fairness`)."""
