"""The notebook API: `open_run(path)` -> a Run whose methods return pandas and xarray.

    import ooc_universal as ou
    run = ou.open_run("runs/demo")
    run.table1()                         # DataFrame: % universal per pair/threshold/checkpoint
    run.neurons()                        # DataFrame: one row per reference neuron and pair
    run.cards()                          # DataFrame: neuron cards of the top neurons
    run.ablation()                       # DataFrame: KL and delta loss per ablated set
    run.convergence()                    # DataFrame: % universal at doubling token counts
    run.reduced("tiny-a@4500", "tiny-b@4500")   # xarray.Dataset with named dims
    run.store("tiny-a@4500")             # xarray.DataArray (token, neuron), dask-backed

Everything is read through ooc_universal.formats (the same readers the steps use), so a
missing or damaged file is one OocError line naming it and the step that makes it.
Nothing here writes to the run directory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ooc_universal.errors import OocError


def open_run(path) -> "Run":
    """The run directory `path` (made by `ooc-universal run` or the steps by hand)."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise OocError(f"run directory {str(run_dir)!r} does not exist; give the --run-dir "
                       "of a run (it holds tokens/, stores/, reduce/ ...)")
    return Run(run_dir)


class Run:
    """One run directory; every method reads on call (nothing is cached)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir)

    def __repr__(self):
        return f"Run({str(self.path)!r})"

    # ------------------------------------------------------------------ config
    def config(self):
        """The RunConfig saved as RUN/config.toml (None when the steps ran by hand)."""
        from ooc_universal.config import RunConfig
        path = self.path / "config.toml"
        return RunConfig.from_toml(path) if path.is_file() else None

    # ------------------------------------------------------------------ tables
    # Tidy tables (formats/tables.py): integer `layer` beside `scope` ("all": layer <NA>),
    # `aggregation` marking the rows over pairs (`other` <NA> there), n_* counts, pct_*
    # percentages, p_* fractions, is_universal_<tau> booleans; draw 0 by default.
    def table1(self, draw=0):
        """Table 1: % universal per (reference, aggregation, other, checkpoint,
        threshold, scope, layer). draw=0: the paper's rotation, with the spread over
        the draws beside it; an int j: draw j; "mean": averaged over the draws;
        "all": one row per draw."""
        from ooc_universal.formats.tables import read_table1
        return read_table1(self.path).frame(draw)

    def neurons(self, columns=None, draw=0):
        """One row per reference neuron and pair: max corr, matched neuron, baseline,
        excess, is_universal_<tau>. draw=0: neurons.parquet (the sets' draw); "all":
        one row per draw (neuron_draws.parquet); an int j: its rows of draw j; "mean":
        averaged over the draws, with p_universal_<tau> = the fraction of draws in
        which the neuron is universal."""
        from ooc_universal.formats.tables import read_neuron_draws, read_neurons
        if draw == 0:
            return read_neurons(self.path, columns=columns).frame
        if draw == "mean":
            return _neuron_mean_view(self.path, columns)
        draws = read_neuron_draws(self.path)
        if draw != "all":
            draws = draws[draws["draw"] == _draw_index(draw)].reset_index(drop=True)
        return draws if columns is None else draws[list(columns)]

    def persistence(self):
        """p_persist = P(universal at t2 | universal at t1), a fraction, per pair and
        aggregated over pairs (mean_over_pairs, pooled_over_pairs), whole model
        (scope "all") and per layer."""
        from ooc_universal.formats.tables import read_persistence
        return read_persistence(self.path).frame()

    def cards(self):
        """Neuron cards (RUN/cards/cards.json, `ooc-universal cards`), one row per
        (card, other model): the neuron, pair_rank (its rank in that pair's top neurons by
        excess),
        excess, matched neuron and correlation, is_universal_<tau>, the vocabulary
        moments of W_out.W_U (vocab_kurtosis, vocab_skew, vocab_role) and the tokens
        it promotes and suppresses most (lists, strongest first)."""
        from ooc_universal.formats.cards import cards_frame, read_cards
        return cards_frame(read_cards(self.path))

    def contexts(self):
        """The contexts where each card's neuron fires most: one row per (card, context),
        context_rank 1 the highest, with the activation, its token and the surrounding
        tokens."""
        from ooc_universal.formats.cards import contexts_frame, read_cards
        return contexts_frame(read_cards(self.path))

    def ablation(self, draws: bool = False):
        """KL and delta loss per ablated set: one row per universal / all-non-universal
        set and per control (the mean over its n_draws draws); `scope` "all" (every
        layer at once, layer <NA>) or "layer" (integer layer); `ablation_mode` zero or
        mean. draws=True: one row per evaluated set, each control draw apart
        (ablation_draws.csv, with `draw`)."""
        from ooc_universal.formats.ablation import read_ablation, read_ablation_draws
        if draws:
            return read_ablation_draws(self.path)
        return read_ablation(self.path).frame()

    def convergence(self):
        """Token-count convergence (RUN/reduce/<ref>__<other>.convergence.csv, written by
        the reduce): one row per (pair, n_tokens, threshold), what the pair's reduce gave
        on its first n_tokens tokens: n_universal and pct_universal (draw 0, percent of
        all reference neurons), the mean and std over the baseline draws, the row max
        mean and quantiles, the baseline mean and the mean excess; the row with
        n_tokens == n_tokens_total is the reduce file's own result. Each table is
        verified against its checksum sidecar first."""
        from ooc_universal.formats.convergence import (COLUMNS, list_convergence,
                                                       read_all_convergence)
        from ooc_universal.rundir import verify_file
        for path in list_convergence(self.path):
            verify_file(path, "convergence table",
                        "run `ooc-universal reduce --force` for that pair")
        frame = read_all_convergence(self.path)
        if frame is None:
            raise OocError(f"no convergence table in {str(self.path / 'reduce')!r}; run "
                           "`ooc-universal reduce` with [reduce] convergence_first > 0 (the "
                           "default, 1024) to record one per pair")
        return frame[COLUMNS].sort_values(["reference", "other", "checkpoint", "threshold",
                                  "n_tokens"], kind="stable").reset_index(drop=True)

    def sets(self):
        """The universal sets (formats.sets.UniversalSet records)."""
        from ooc_universal.formats.sets import read_sets
        return read_sets(self.path).sets

    def status(self, verify: bool = False):
        """What the run directory holds, one row per step output (status.status)."""
        import pandas as pd
        from ooc_universal.status import COLUMNS, status
        return pd.DataFrame(status(self.path, verify=verify), columns=list(COLUMNS))

    def plan(self, echo=None) -> dict:
        """The dry run of the saved config (disk, RAM, FLOPs, time); prints unless
        echo is given (echo=lambda s: None for silence)."""
        from ooc_universal.run import dry_run
        cfg = self.config()
        if cfg is None:
            raise OocError(f"{str(self.path)!r} has no config.toml; plan() needs a run made "
                           "by `ooc-universal run`")
        return dry_run(cfg, echo=echo or print)

    # ------------------------------------------------------------------ arrays
    def reduced_pairs(self) -> list[tuple[str, str]]:
        """(reference label, other label) of every complete reduce output."""
        from ooc_universal.formats.reduced import list_reduced
        return [tuple(p.stem.split("__", 1)) for p in list_reduced(self.path)]

    def reduced(self, ref: str, other: str):
        """The reduced statistics of one pair as an xarray.Dataset: dims ref_neuron,
        other_neuron, draw; coords layer/neuron per side; cross_comoment stays out (it is
        Na x Nb: read it with formats.reduced.open_reduced(...).cross_comoment by slices)."""
        import xarray as xr
        from ooc_universal.formats.reduced import open_reduced, reduced_path
        path = reduced_path(self.path, ref, other)
        if not path.is_file():
            have = ", ".join("__".join(p) for p in self.reduced_pairs()) or "none"
            raise OocError(f"no reduce output for {ref}__{other} in {str(self.path)!r}; "
                           f"complete pairs: {have}")
        with open_reduced(path) as st:
            a, d_a = int(st.attrs["n_layers_ref"]), int(st.attrs["d_mlp_ref"])
            b, d_b = int(st.attrs["n_layers_other"]), int(st.attrs["d_mlp_other"])
            ref_vars = {"ref_mean": st.ref_mean, "ref_var": st.ref_var,
                        "ref_zero_var": st.ref_zero_var, "row_max": st.row_max,
                        "row_argmax": st.row_argmax}
            other_vars = {"other_mean": st.other_mean, "other_var": st.other_var,
                          "other_zero_var": st.other_zero_var, "col_max": st.col_max,
                          "col_argmax": st.col_argmax}
            data = {k: ("ref_neuron", np.asarray(v)) for k, v in ref_vars.items()}
            data.update({k: ("other_neuron", np.asarray(v)) for k, v in other_vars.items()})
            data["baseline_row_max"] = (("draw", "ref_neuron"), np.asarray(st.baseline_row_max))
            attrs = {k: v for k, v in st.attrs.items() if isinstance(v, (str, int, float))}
            seeds = list(st.baseline_seeds)
        coords = {**_layer_coords("ref_neuron", a, d_a), **_layer_coords("other_neuron", b, d_b),
                  "draw": np.arange(len(seeds)), "seed": ("draw", np.asarray(seeds))}
        return xr.Dataset(data, coords=coords, attrs=attrs)

    def store(self, label: str):
        """One activation store as a lazily read xarray.DataArray (token, neuron): dask
        chunks are the store's token blocks; coords layer/neuron and, per row, the
        window and position it came from (the token set's valid positions in order)."""
        import dask.array as da
        import xarray as xr
        from ooc_universal.formats.store import open_store
        from ooc_universal.formats.tokens import load_token_set
        path = self.path / "stores" / f"{label}.h5"
        if not path.is_file():
            have = sorted(p.stem for p in (self.path / "stores").glob("*.h5"))
            raise OocError(f"no activation store {label!r} in {str(self.path)!r}; "
                           f"stores: {', '.join(have) or 'none'}")
        st = open_store(path)
        n_layers, d_mlp = int(st.attrs["n_layers"]), int(st.attrs["d_mlp"])
        window, position = np.nonzero(load_token_set(self.path).valid)
        if window.size != st.shape[0]:
            raise OocError(f"store {label!r} has {st.shape[0]} rows but the run's token set "
                           f"has {window.size} valid positions; re-run extract")
        lazy = da.from_array(st, chunks=st.chunks, asarray=False)
        coords = {**_layer_coords("neuron", n_layers, d_mlp),
                  "window": ("token", window), "position": ("token", position)}
        return xr.DataArray(lazy, dims=("token", "neuron"), coords=coords, name=label,
                            attrs={k: v for k, v in st.attrs.items()
                                   if isinstance(v, (str, int, float))})


def _draw_index(draw) -> int:
    if isinstance(draw, bool) or not isinstance(draw, (int, np.integer)) or draw < 0:
        raise OocError(f"draw {draw!r} is not a draw; give 0, 1, ..., 'mean' or 'all'")
    return int(draw)


def _neuron_mean_view(run_dir: Path, columns):
    from ooc_universal.formats.tables import neuron_view, read_neuron_draws, read_table1
    thresholds = sorted({float(r["threshold"]) for r in read_table1(run_dir).rows})
    view = neuron_view(read_neuron_draws(run_dir), "mean", thresholds)
    return view if columns is None else view[list(columns)]


def _layer_coords(dim: str, n_layers: int, d_mlp: int) -> dict:
    """(layer, neuron-in-layer) of each flat index layer * d_mlp + i, on dimension `dim`."""
    flat = np.arange(n_layers * d_mlp)
    prefix = "" if dim == "neuron" else dim.replace("_neuron", "") + "_"
    return {dim: flat, f"{prefix}layer": (dim, flat // d_mlp),
            f"{prefix}index": (dim, flat % d_mlp)}
