"""Experiment sweeps: named grids of train.py runs, a resumable subprocess runner, and aggregation into
tables (mean ± std over seeds) and plots. CLI: ``python -m harmony.experiments run|aggregate|list``."""
from harmony.experiments.aggregate import aggregate
from harmony.experiments.grid import GRIDS, Axis, Grid, Run, expand, get_grid
from harmony.experiments.runner import RunResult, run_grid

__all__ = ["GRIDS", "Axis", "Grid", "Run", "RunResult", "aggregate", "expand", "get_grid", "run_grid"]
