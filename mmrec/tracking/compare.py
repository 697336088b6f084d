"""Compare the MLflow runs of a sweep: one row per run, the params that differ, the headline metrics.

    python -m mmrec.tracking.compare                                   # every finished run of params.yaml's experiment
    python -m mmrec.tracking.compare --rung tiny --dvc-exp lr-sweep-1 --dvc-exp lr-sweep-2
    python -m mmrec.tracking.compare --experiment mmrec --csv runs.csv --plot val_loss.png

Params equal across the selected runs are hidden, so a sweep shows exactly the knobs it turned. Beside the
windowed test_bpb stands the gate's figure, test_bpb_context, and for a rung that went through the gate its
gain on that figure (bits per byte over `gain_over`, its reference) and the gain's bootstrap interval over
the test documents (docs/registry.md says how to read them).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from mmrec.errors import UserError, exits_cleanly
from mmrec.files import replacing
from mmrec.paths import GATE_METRIC_NAME

STATUSES = ["FINISHED", "RUNNING", "FAILED", "KILLED", "SCHEDULED"]
# column -> where mlflow.search_runs puts it; tokens_per_s is the run's median, logged once at the end
RUN_COLUMNS = {"run_id": "run_id", "run_name": "tags.mlflow.runName", "rung": "tags.rung",
               "dvc_exp": "tags.dvc_exp_name", "status": "status"}
HEADLINE = {"test_bpb": "metrics.test/bpb", "best_val_loss": "metrics.summary/best_val_loss",
            "tokens_per_s": "metrics.perf/median_tokens_per_s", "n_params": "params.n_params",
            "test_loss": "metrics.test/loss"}
# the gate's figure, its gain over the rung's reference (promote@<rung> tags its run) and the gain's interval
GATE = "metrics." + GATE_METRIC_NAME
GAIN = {"gain": "tags.promote.gain", "gain_low": "tags.promote.gain_low", "gain_high": "tags.promote.gain_high"}
GAIN_OVER = "tags.promote.compared_to"
VAL_CURVE = "loss/val"
KIND = "tags.kind"  # 'pipeline' for the parent run of one pipeline execution: not a model, never compared
PLOT_SUFFIXES = {".png", ".svg", ".pdf"}
SHORT_ID = 8


def interval_text(low: float | None, high: float | None) -> str:
    """A gain's interval as a table shows it, '[low,high]', or '-' when it was decided by a fixed margin."""
    if low is None or high is None or low != low or high != high:
        return "-"
    return f"[{low:.4f},{high:.4f}]"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mmrec.tracking.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", help="MLflow experiment (default: params.yaml mlflow.experiment, else 'mmrec')")
    p.add_argument("--rung", help="only runs of this rung (tag rung)")
    p.add_argument("--dvc-exp", action="append", default=[], metavar="NAME",
                   help="only runs of this DVC experiment (tag dvc_exp_name); repeat for several")
    p.add_argument("--status", type=str.upper, default="FINISHED", choices=STATUSES + ["ALL"],
                   help="only runs with this status, or 'all' (default: FINISHED)")
    p.add_argument("--last", type=int, metavar="N", help="only the N most recently started of the selected runs")
    p.add_argument("--csv", type=Path, metavar="FILE", help="also write the table here (full run ids)")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="overlay the val loss curves of the selected runs")
    p.add_argument("--tracking-uri", help="MLflow store (default: params.yaml mlflow.tracking_uri / MLFLOW_TRACKING_URI)")
    args = p.parse_args(argv)
    if args.last is not None and args.last < 1:
        raise UserError(f"--last {args.last}: must be a positive number of runs")
    if args.plot is not None and args.plot.suffix.lower() not in PLOT_SUFFIXES:
        raise UserError(f"--plot {args.plot}: the file must end in one of {', '.join(sorted(PLOT_SUFFIXES))}")
    return args


def complete(runs: pd.DataFrame) -> pd.DataFrame:
    """Add the columns a store without such tags or metrics (yet) lacks, empty, so every filter and column works."""
    wanted = [*RUN_COLUMNS.values(), *HEADLINE.values(), GATE, *GAIN.values(), KIND, GAIN_OVER]
    return runs.reindex(columns=runs.columns.union(wanted, sort=False))


def select(runs: pd.DataFrame, rung: str | None, dvc_exps: list[str], status: str, last: int | None) -> pd.DataFrame:
    """The runs that pass every filter; --last keeps the most recently started of those."""
    keep = runs[KIND] != "pipeline"
    if rung is not None:
        keep &= runs["tags.rung"] == rung
    if dvc_exps:
        keep &= runs["tags.dvc_exp_name"].isin(dvc_exps)
    if status != "ALL":
        keep &= runs["status"] == status
    picked = runs[keep]
    if last is not None:
        picked = picked.sort_values("start_time", ascending=False).head(last)
    return picked


def differing_params(runs: pd.DataFrame) -> tuple[list[str], int]:
    """Param columns whose value (or presence) varies across `runs`, sorted; and how many are equal everywhere.
    Columns no selected run has (only other runs of the experiment logged them) count as neither."""
    params = [c for c in runs.columns
              if c.startswith("params.") and c != HEADLINE["n_params"] and runs[c].notna().any()]
    differ = sorted(c for c in params if runs[c].nunique(dropna=False) > 1)
    return differ, len(params) - len(differ)


def comparison_table(runs: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One row per run of `runs` (completed): identity, the differing params by dotted key, the headline metrics;
    best gate figure (test_bpb_context) first, then best test_bpb. Also returns how many params were hidden because
    every run has the same value."""
    differ, hidden = differing_params(runs)
    table = pd.DataFrame({name: runs[col] for name, col in RUN_COLUMNS.items()})
    table["dvc_exp"] = table["dvc_exp"].fillna("")  # plain `dvc repro` runs have no experiment name
    for col in differ:
        table[col.removeprefix("params.")] = runs[col]
    for name, col in HEADLINE.items():
        table[name] = pd.to_numeric(runs[col], errors="coerce")
    table["n_params"] = table["n_params"].astype("Int64")
    table["test_bpb_context"] = pd.to_numeric(runs[GATE], errors="coerce")
    for name, col in GAIN.items():
        table[name] = pd.to_numeric(runs[col], errors="coerce")
    table["gain_over"] = runs[GAIN_OVER]
    table = table.sort_values(["test_bpb_context", "test_bpb", "best_val_loss"], na_position="last", kind="stable")
    return table.reset_index(drop=True), hidden


def render(table: pd.DataFrame) -> str:
    """The table on screen: short run ids, the gain's interval as one '[low,high]' column."""
    shown = table.assign(run_id=table["run_id"].str[:SHORT_ID]).rename(columns={"run_id": "run"})
    at = shown.columns.get_loc("gain_low")
    shown.insert(at, "interval", [interval_text(lo, hi) for lo, hi in zip(table["gain_low"], table["gain_high"])])
    shown = shown.drop(columns=["gain_low", "gain_high"])
    fmt = {name: "{:.4f}".format for name in ["test_bpb", "best_val_loss", "test_loss", "test_bpb_context", "gain"]}
    fmt["tokens_per_s"] = "{:,.0f}".format
    fmt["n_params"] = lambda v: "-" if pd.isna(v) else f"{v:,}"
    return shown.to_string(index=False, na_rep="-", formatters=fmt)


def curve_label(row: pd.Series) -> str:
    return " ".join(part for part in [row["run_name"], row["dvc_exp"], row["run_id"][:SHORT_ID]] if part)


def write_csv(table: pd.DataFrame, path: Path) -> None:
    with replacing(path) as tmp:
        table.to_csv(tmp, index=False)


def write_plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    from mmrec.tracking.plots import overlay

    with replacing(path) as image:  # keeps the suffix: matplotlib picks the format from it
        overlay(curves, image, ylabel="val loss (nats / token)")


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mmrec.tracking import run as track, store  # mlflow is slow to import: only once the arguments are known to be good

    uri, experiment = store.store_settings(args.tracking_uri, args.experiment)
    runs = track.runs_frame(uri, experiment)
    if runs is None:
        raise UserError(f"--experiment {experiment!r}: not in {uri}; it has: {', '.join(track.experiment_names(uri))}")
    runs = complete(runs)
    picked = select(runs, args.rung, args.dvc_exp, args.status, args.last)
    if picked.empty:
        filters = [f"status {args.status}"]
        if args.rung is not None:
            filters.append(f"rung {args.rung!r}")
        if args.dvc_exp:
            filters.append(f"dvc exp {' or '.join(map(repr, args.dvc_exp))}")
        print(f"no runs match {', '.join(filters)} among the {len(runs)} runs of experiment {experiment!r} in {uri}",
              file=sys.stderr)
        return 1

    table, hidden = comparison_table(picked)
    print(render(table))
    print(f"\n{len(table)} runs of experiment {experiment!r} in {uri}; "
          f"{hidden} params equal across all of them are hidden")
    if args.csv is not None:
        write_csv(table, args.csv)
        print(f"wrote {args.csv}")
    if args.plot is not None:
        histories = track.metric_histories(uri, list(table["run_id"]), VAL_CURVE)
        write_plot({curve_label(row): histories[row["run_id"]] for _, row in table.iterrows()}, args.plot)
        print(f"wrote {args.plot}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
