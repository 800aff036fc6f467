"""`fastbn reproduce`: Santurkar et al. (2018) on networks that train offline on a CPU.

Modules: `config` (default and --quick settings), `data` (offline datasets, batch order),
`models` (VGG-style CNN, deep linear network), `training` (SGD loop with probes),
`runner` (the experiments, resumable parts), `claims` (the paper's claims as measured
ratios with verdicts), `report` (CSV, PNG, report.md), `seeding` (named random
streams), `cli` (`reproduce_main`), `probe` (`fastbn probe`: the curvature of the
reproduction's networks). The results.json schema is in SCHEMA.md.
"""
