"""Compare the MLflow runs of a sweep: one row per run, the params that differ, the headline metrics; then one row
per config, its figures over its seeds, and how much better it is than a reference config.

    python -m mmrec.tracking.compare                                   # every finished run of params.yaml's experiment
    python -m mmrec.tracking.compare --rung tiny --dvc-exp lr-sweep-1 --dvc-exp lr-sweep-2
    python -m mmrec.tracking.compare --experiment mmrec --csv runs.csv --plot val_loss.png
    python -m mmrec.tracking.compare --rung tiny --against main       # each config's gain over main's

Params equal across the selected runs are hidden, so a sweep shows exactly the knobs it turned. Beside the
windowed test_bpb stands the gate's figure, test_bpb_context, and for a rung that went through the gate its
gain on that figure (bits per byte over `gain_over`, its reference) and the gain's bootstrap interval over
the test documents (docs/registry.md says how to read them).

Runs of one config (tag config: the same params but for the seed and what cannot change the model) make one
row of the second table: n seeds, mean and std of each figure. With --against, each config's gain over the
reference config of its rung comes with an interval that counts the seeds' spread as well as the test documents
(paired.config_gain; a config of one seed is taken to spread by compare.seed_std), and the documents' part alone
beside it (docs/measurements.md says how to read them).
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mmrec.config import Params, workspace_params
from mmrec.errors import UserError, exits_cleanly
from mmrec.files import replacing
from mmrec.paired import ConfigGain, DocScores, config_gain
from mmrec.paths import GATE_METRIC_NAME, RungPaths

STATUSES = ["FINISHED", "RUNNING", "FAILED", "KILLED", "SCHEDULED"]
# column -> where mlflow.search_runs puts it; tokens_per_s is the run's median, logged once at the end
RUN_COLUMNS = {"run_id": "run_id", "run_name": "tags.mlflow.runName", "rung": "tags.rung", "config": "tags.config",
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
# a rung run's config (pipeline_run.config_tags) and its seed
CONFIG, LABEL, SEED = RUN_COLUMNS["config"], "tags.config_label", "params.seed"
# the figures a config's row gives as mean and std over its seeds
FIGURES = {"test_bpb_context": GATE, "test_bpb": HEADLINE["test_bpb"], "best_val_loss": HEADLINE["best_val_loss"]}
MIN_PREFIX = 4  # --against names a config by at least this many leading characters of its digest


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
    p.add_argument("--against", metavar="NAME",
                   help="the reference config of each rung: its config digest (or its first characters), its "
                        "config_label, or a DVC experiment of its runs (a seed sweep's NAME-1, NAME-2, ... too)")
    p.add_argument("--seed-std", type=float, metavar="STD",
                   help="the std over seeds taken for a config of one seed (default: params.yaml compare.seed_std)")
    p.add_argument("--tracking-uri", help="MLflow store (default: params.yaml mlflow.tracking_uri / MLFLOW_TRACKING_URI)")
    args = p.parse_args(argv)
    if args.seed_std is not None and not 0 <= args.seed_std <= 1:
        raise UserError(f"--seed-std {args.seed_std}: must be a std of bits per byte, between 0 and 1")
    if args.last is not None and args.last < 1:
        raise UserError(f"--last {args.last}: must be a positive number of runs")
    if args.plot is not None and args.plot.suffix.lower() not in PLOT_SUFFIXES:
        raise UserError(f"--plot {args.plot}: the file must end in one of {', '.join(sorted(PLOT_SUFFIXES))}")
    return args


def complete(runs: pd.DataFrame) -> pd.DataFrame:
    """Add the columns a store without such tags or metrics (yet) lacks, empty, so every filter and column works."""
    wanted = [*RUN_COLUMNS.values(), *HEADLINE.values(), GATE, *GAIN.values(), KIND, GAIN_OVER, LABEL, SEED]
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
    table["config"] = table["config"].fillna("")  # runs made before configs were tagged
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
    shown = table.assign(run_id=table["run_id"].str[:SHORT_ID], config=table["config"].str[:SHORT_ID].replace("", "-"))
    shown = shown.rename(columns={"run_id": "run"})
    at = shown.columns.get_loc("gain_low")
    shown.insert(at, "interval", [interval_text(lo, hi) for lo, hi in zip(table["gain_low"], table["gain_high"])])
    shown = shown.drop(columns=["gain_low", "gain_high"])
    fmt = {name: "{:.4f}".format for name in ["test_bpb", "best_val_loss", "test_loss", "test_bpb_context", "gain"]}
    fmt["tokens_per_s"] = "{:,.0f}".format
    fmt["n_params"] = lambda v: "-" if pd.isna(v) else f"{v:,}"
    return shown.to_string(index=False, na_rep="-", formatters=fmt)


@dataclass
class Config:
    """The runs of one config (tag config) of a rung, one per seed, latest first."""
    rung: str
    digest: str
    label: str
    runs: pd.DataFrame

    def __str__(self) -> str:
        return f"config {self.digest[:SHORT_ID]} ({self.label})" if self.label else f"config {self.digest[:SHORT_ID]}"


def by_config(runs: pd.DataFrame) -> tuple[list[Config], list[str]]:
    """The runs grouped by config, one run per seed: a seed run twice (a forced rerun, or a code change, which
    does not change the config) counts once, by its latest run. Rungs in the order they first ran, each rung's
    configs best gate figure first. Also returns notes on the runs left out."""
    notes = []
    tagged = runs[runs[CONFIG].notna()]
    if len(tagged) < len(runs):
        notes.append(f"{len(runs) - len(tagged)} runs carry no config tag (made before runs were tagged): not in "
                     "this table")
    configs = []
    for digest, group in tagged.sort_values("start_time", ascending=False).groupby(CONFIG, sort=False):
        seeds = group[SEED].fillna(group["run_id"])  # without a seed param a run is a seed of its own
        kept = group[~seeds.duplicated()]
        config = Config(str(kept["tags.rung"].iloc[0]), str(digest), str(kept[LABEL].fillna("").iloc[0]), kept)
        if repeats := len(group) - len(kept):
            notes.append(f"{config}: {repeats} earlier run{'s' if repeats > 1 else ''} of a seed that ran again "
                         "left out (the latest run of a seed counts)")
        configs.append(config)
    first_ran = tagged.groupby("tags.rung")["start_time"].min()

    def order(c: Config) -> tuple:
        figure = _mean(c, GATE)
        return first_ran[c.rung], figure if figure == figure else float("inf")  # unscored last

    return sorted(configs, key=order), notes if configs else []


def _figures(config: Config, column: str) -> pd.Series:
    return pd.to_numeric(config.runs[column], errors="coerce").dropna()


def _mean(config: Config, column: str) -> float:
    values = _figures(config, column)
    return float(values.mean()) if len(values) else float("nan")


def seeds_text(seeds: pd.Series) -> str:
    """'1337-1339' for consecutive seeds, else '1337,1340'; '-' for runs that logged none."""
    values = sorted(int(v) for v in seeds.dropna() if str(v).isdigit())
    if not values:
        return "-"
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


def config_table(configs: list[Config]) -> pd.DataFrame:
    """One row per config: rung, config, label, n (seeds), seeds, and the mean and std (NaN for one seed) of each
    figure over them."""
    rows = []
    for c in configs:
        row = {"rung": c.rung, "config": c.digest, "label": c.label, "n": len(c.runs), "seeds": seeds_text(c.runs[SEED])}
        for name, column in FIGURES.items():
            values = _figures(c, column)
            row[name] = float(values.mean()) if len(values) else float("nan")
            row[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def references(configs: list[Config], name: str) -> dict[str, Config]:
    """The reference config of each rung that --against NAME names: by the first characters of its digest, its
    label, or a DVC experiment of one of its runs (NAME-<n>: the runs of a sweep queued as -n NAME)."""
    sweep = re.compile(re.escape(name) + r"-\d+")

    def named(c: Config) -> bool:
        exps = c.runs[RUN_COLUMNS["dvc_exp"]].dropna()
        return ((len(name) >= MIN_PREFIX and c.digest.startswith(name)) or c.label == name
                or any(e == name or sweep.fullmatch(e) for e in exps))

    refs: dict[str, Config] = {}
    for c in filter(named, configs):
        if c.rung in refs:
            raise UserError(f"--against {name}: names both {refs[c.rung]} and {c} of rung {c.rung}; name one by its "
                            "config digest")
        refs[c.rung] = c
    if not refs:
        known = ", ".join(f"{c.digest[:SHORT_ID]} ({c.label})" for c in configs) or "none of the runs carries a config tag"
        raise UserError(f"--against {name}: no config of the selected runs has that digest, label or DVC experiment; "
                        f"configs: {known}")
    return refs


def doc_scores(uri: str, config: Config) -> list[DocScores]:
    """The per-document test scores each run of `config` logged (evaluate); a run without them is one line."""
    from mmrec.tracking.reading import json_artifact

    path = RungPaths(Path(), config.rung).doc_scores_artifact
    out = []
    for run_id in config.runs["run_id"]:
        data = json_artifact(f"runs:/{run_id}/{path}", uri)
        if not isinstance(data, dict):
            raise UserError(f"run {run_id[:SHORT_ID]} of {config} has no per-document test scores ({path} among its "
                            "artifacts: evaluate logs them)")
        out.append(DocScores.from_dict(data, f"run {run_id[:SHORT_ID]}'s {path}"))
    return out


def config_gains(configs: list[Config], refs: dict[str, Config], uri: str, settings: Params,
                 seed_std: float) -> dict[str, ConfigGain | str]:
    """Each config's gain over its rung's reference (config_gain: the reference's mean gate figure minus its own,
    the seeds and the test documents counted), or why there is none; at promote's confidence and resamples."""
    p, scores, out = settings.promote, {}, {}
    for c in configs:
        ref = refs.get(c.rung)
        if ref is None or ref is c:
            continue
        try:
            for side in (ref, c):
                if side.digest not in scores:
                    scores[side.digest] = doc_scores(uri, side)
            out[c.digest] = config_gain(scores[ref.digest], scores[c.digest], p.confidence, p.bootstrap_samples,
                                        settings.seed, seed_std)
        except UserError as err:
            out[c.digest] = str(err)
    return out


def render_configs(table: pd.DataFrame, refs: dict[str, Config], gains: dict[str, ConfigGain | str]) -> str:
    """The config table on screen: 'mean ± std' of each figure ('± -' for one seed); with a reference, the gain,
    its interval (seeds and documents) and the documents' interval alone."""
    shown = table[["rung", "config", "label", "n", "seeds"]].assign(config=table["config"].str[:SHORT_ID])
    for name in FIGURES:
        shown[name] = ["-" if m != m else f"{m:.4f} ± " + ("-" if s != s else f"{s:.4f}")
                       for m, s in zip(table[name], table[f"{name}_std"])]
    if refs:
        ref_digests = {r.digest for r in refs.values()}
        got = [gains.get(d) for d in table["config"]]
        shown["gain"] = ["ref" if d in ref_digests else f"{g.mean:+.4f}" if isinstance(g, ConfigGain) else "-"
                         for d, g in zip(table["config"], got)]
        shown["interval"] = [interval_text(g.low, g.high) if isinstance(g, ConfigGain) else "-" for g in got]
        shown["docs_only"] = [interval_text(g.docs_low, g.docs_high) if isinstance(g, ConfigGain) else "-" for g in got]
    return shown.to_string(index=False)


def config_notes(configs: list[Config], gains: dict[str, ConfigGain | str], refs: dict[str, Config],
                 seed_std: float, std_from: str) -> list[str]:
    """What the config table cannot say in its cells: why a gain is missing, and which stds were not measured."""
    notes = [f"{c}: no gain over {refs[c.rung]}: {gains[c.digest]}" for c in configs
             if isinstance(gains.get(c.digest), str)]
    compared = [c for c in configs if isinstance(gains.get(c.digest), ConfigGain)]
    single = [c for c in configs if len(c.runs) == 1 and (c in compared or any(refs.get(d.rung) is c for d in compared))]
    if single:
        notes.append(f"seed noise is unmeasured for {', '.join(map(str, single))}, of one seed: its std over seeds "
                     f"is taken as {std_from} = {seed_std:g}; run more seeds to measure it (docs/measurements.md)")
    if compared:
        g = next(gains[c.digest] for c in compared)
        notes.append(f"gain: the reference's (ref) mean test_bpb_context minus this config's, > 0 when this one is "
                     f"better; interval: its {g.confidence:.0%} interval over seeds and test documents; docs_only: "
                     "over the test documents alone (the gate's kind, blind to another seed)")
    return notes


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
    from mmrec.tracking import reading, store  # mlflow is slow to import: only once the arguments are known to be good

    uri, experiment = store.store_settings(args.tracking_uri, args.experiment)
    runs = reading.runs_frame(uri, experiment)
    if runs is None:
        raise UserError(f"--experiment {experiment!r}: not in {uri}; it has: {', '.join(reading.experiment_names(uri))}")
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

    configs, group_notes = by_config(picked)
    refs = references(configs, args.against) if args.against else {}
    settings = workspace_params()
    seed_std = settings.compare.seed_std if args.seed_std is None else args.seed_std
    std_from = "compare.seed_std (params.yaml)" if args.seed_std is None else "--seed-std"
    gains = config_gains(configs, refs, uri, settings, seed_std) if refs else {}

    table, hidden = comparison_table(picked)
    print(render(table))
    print(f"\n{len(table)} runs of experiment {experiment!r} in {uri}; "
          f"{hidden} params equal across all of them are hidden")
    if configs:
        print(f"\nby config: mean ± std over seeds (n: seeds, the latest run of each)\n"
              f"{render_configs(config_table(configs), refs, gains)}")
    for note in group_notes + config_notes(configs, gains, refs, seed_std, std_from):
        print(note)
    if args.csv is not None:
        write_csv(table, args.csv)
        print(f"wrote {args.csv}")
    if args.plot is not None:
        histories = reading.metric_histories(uri, list(table["run_id"]), VAL_CURVE)
        write_plot({curve_label(row): histories[row["run_id"]] for _, row in table.iterrows()}, args.plot)
        print(f"wrote {args.plot}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
