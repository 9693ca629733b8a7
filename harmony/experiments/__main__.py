"""``python -m harmony.experiments run GRID --out DIR [--jobs N] [--budget-min M] [--set section.key=value ...]``,
``python -m harmony.experiments aggregate DIR``, ``python -m harmony.experiments report ROOT --out DIR``,
``python -m harmony.experiments list [GRID] [--out DIR]``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from harmony.config import ConfigError
from harmony.experiments.aggregate import aggregate
from harmony.experiments.grid import GRIDS, expand, get_grid, parse_sets, select
from harmony.experiments.maps import maps
from harmony.experiments.regimes import regimes
from harmony.experiments.report import report
from harmony.experiments.runner import run_grid, summarize


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harmony.experiments", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a named grid (skips runs whose summary.json exists), then aggregate")
    run.add_argument("grid", choices=sorted(GRIDS))
    run.add_argument("--out", required=True, help="experiment folder; one sub-folder per run")
    run.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    run.add_argument("--budget-min", type=float, default=None, help="start no run after this many minutes")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override added to every run's command (repeatable)")
    run.add_argument("--no-aggregate", action="store_true", help="do not write results.* and plots afterwards")
    run.add_argument("--only", action="append", default=[], metavar="TEXT",
                     help="run only the runs whose name contains TEXT (repeat: all of them); the others are left "
                          "for a later call")
    agg = sub.add_parser("aggregate", help="results.csv, results.md and plots/ of an experiment folder")
    agg.add_argument("dir")
    agg.add_argument("--no-plots", action="store_true")
    rep = sub.add_parser("report", help="aggregate every experiment folder under ROOT into DIR/tables.md")
    rep.add_argument("root")
    rep.add_argument("--out", required=True)
    rep.add_argument("--no-plots", action="store_true")
    mp = sub.add_parser("maps", help="premise map, headroom map and outcome table of long runs (maps.md)")
    mp.add_argument("--premise", nargs="*", default=[], help="folders whose runs map the detectors (any grid)")
    mp.add_argument("--headroom", default=None, help="a long_headroom folder (plain and oracle arms)")
    mp.add_argument("--outcome", default=None, help="a long_outcome folder (compared with --headroom's controls)")
    mp.add_argument("--outcome-size", type=int, default=4096, help="data.size of the outcome runs' controls")
    mp.add_argument("--out", required=True)
    mp.add_argument("--no-plots", action="store_true")
    rg = sub.add_parser("regimes", help="detector maps and outcome per regime of the web grid (regimes.md)")
    rg.add_argument("dir", help="a web grid folder (runs named regime-<R>_arm-<A>_seed-<S>)")
    rg.add_argument("--out", required=True)
    ls = sub.add_parser("list", help="the named grids, or one grid's runs with their train.py commands")
    ls.add_argument("grid", nargs="?", choices=sorted(GRIDS))
    ls.add_argument("--out", default=None, help="experiment folder the commands write to (default runs/GRID)")
    ls.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return p


def _list(grid_name: Optional[str], out: Optional[str], sets: List[str]) -> None:
    if grid_name is None:
        for name, grid in GRIDS.items():
            print(f"{name:18s} {len(expand(grid)):4d} runs  {grid.description}")
        return
    extra = parse_sets(sets)
    base = out or f"runs/{grid_name}"
    for run in expand(get_grid(grid_name)):
        print(f"# {run.name}")
        print(run.command(f"{base}/{run.name}", extra))


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "list":
            _list(args.grid, args.out, args.set)
            return 0
        if args.cmd == "maps":
            path = maps(args.premise, args.headroom, args.outcome, args.out, args.outcome_size,
                        plots=not args.no_plots)
            print(f"-> {path}")
            return 0
        if args.cmd == "regimes":
            print(f"-> {regimes(args.dir, args.out)}")
            return 0
        if args.cmd == "report":
            res = report(args.root, args.out, plots=not args.no_plots)
            print(f"{len(res['folders'])} folders, {res['settings']} settings -> {res['tables']}")
            return 0
        if args.cmd == "aggregate":
            res = aggregate(args.dir, plots=not args.no_plots)
            print(f"{len(res['groups'])} settings -> {res['csv']}, {res['md']}, {len(res['plots'])} plots"
                  + (f"; incomplete runs: {len(res['incomplete'])}" if res["incomplete"] else ""))
            return 0
        runs = select(expand(get_grid(args.grid)), args.only)
        if not runs:
            print(f"error: no run of {args.grid} matches --only {args.only}", file=sys.stderr)
            return 2
        results = run_grid(runs, args.out, jobs=args.jobs, budget_min=args.budget_min, extra=parse_sets(args.set))
        print(summarize(results))
        if not args.no_aggregate:
            res = aggregate(args.out)
            print(f"{len(res['groups'])} settings -> {res['csv']}, {res['md']}, {len(res['plots'])} plots")
        return 1 if any(r.status == "failed" for r in results) else 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
