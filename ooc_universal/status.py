"""What a run directory holds: each step output's state, provenance and checksums.

`status(run_dir)` returns one dict per step output (a table: pandas.DataFrame(rows)):

  step         tokens | extract | reduce | universal | persistence | ablate | report
  item         what it is (the path under RUN/, or the step's folder)
  state        missing   not there (expected from RUN/config.toml, or a step's folder)
               partial   work in progress or interrupted; `progress` says how far
               complete  finished, and made from the inputs now in the run directory
               stale     finished, but from other inputs than those now present
                         (token set, activation stores, reduce files, universal sets,
                         or settings in RUN/config.toml); `detail` says which
               corrupt   a final name that cannot be read
               leftover  not needed by any output (a superseded reduce work directory,
                         a killed writer's temporary); `ooc-universal clean` removes it
               released  an activation store `run` deleted once its reduce was complete
                         (the disk budget; RUN/stores/released.json records it)
               streamed  an activation store never written because the reduce ran the
                         model itself (--source stream; the pair files' sidecars say so)
  progress     e.g. "5/8 blocks", "12/40 block folds", "3/5 files"
  detail       why stale / corrupt / partial, in words
  token_hash, config_hash, toolkit_version   what produced it (as recorded)
  checksum     with verify=True: "ok" or "MISMATCH: ..."; always "UNTRUSTED: ..." for an
               output without a readable checksum sidecar (a missing sidecar is never
               "not recorded": the file cannot be told from a damaged one), and for one
               whose recorded inputs are not the inputs here although those are older
               than it (so it was not made from them: a file from another run, or one
               rewritten under a running pipeline; an input re-made after the output
               only makes it stale). The report is checked against its checksums.json.

It only reads: nothing in the run directory is created, repaired or locked. Checksums are
the `<file>.sha256` sidecars the steps write when they commit (rundir.commit_file; for an
activation store one sha256 per block, store.verify_store_blocks); the token set is
checked against its own content hash.
"""
from __future__ import annotations

from pathlib import Path

from ooc_universal.errors import OocError
from ooc_universal.formats.ablation import ABLATE_FILES, read_ablation
from ooc_universal.clean import leftovers
from ooc_universal.formats.cards import read_cards
from ooc_universal.formats.reduced import WorkDir, list_reduced, open_reduced, read_attrs
from ooc_universal.formats.sets import read_sets, sets_path
from ooc_universal.formats.store import ledger_progress
from ooc_universal.formats.tables import PERSISTENCE_FILES, UNIVERSAL_FILES, read_persistence
from ooc_universal.formats.tokens import read_token_meta
from ooc_universal.rundir import (config_hash, file_sha256, human_bytes, read_sidecar,
                                  recorded_sha256)

STATES = ("missing", "partial", "complete", "stale", "corrupt", "leftover", "released",
          "streamed")
COLUMNS = ("step", "item", "state", "progress", "detail", "token_hash", "config_hash",
           "toolkit_version", "checksum")


def status(run_dir, verify: bool = False) -> list[dict]:
    """One row per step output of `run_dir` (see the module doc); verify=True re-hashes
    every file that has a recorded checksum."""
    run = Path(run_dir)
    if not run.is_dir():
        raise OocError(f"run directory {str(run)!r} does not exist; give the --run-dir of a "
                       "run (it holds tokens/, stores/, reduce/ ...)")
    ctx = _Context(run, verify)
    rows = []
    rows += _tokens(ctx)
    rows += _stores(ctx)
    rows += _reduce(ctx)
    rows += _universal(ctx)
    rows += _cards(ctx)
    rows += _persistence(ctx)
    rows += _ablate(ctx)
    rows += _report(ctx)
    rows += _leftovers(ctx)
    return [{c: r.get(c, "") for c in COLUMNS} for r in rows]


def format_status(rows: list[dict]) -> str:
    """The status rows as an aligned text table."""
    cols = ["step", "item", "state", "progress", "checksum", "detail"]
    if not any(r["checksum"] for r in rows):
        cols.remove("checksum")
    cells = [[str(r[c]) for c in cols] for r in rows]
    width = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    width[-1] = len(cols[-1])  # the last column is not padded
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, width)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, width)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"


def problems(rows: list[dict]) -> list[dict]:
    """Rows whose file is corrupt, whose checksum failed, or that cannot be trusted (no
    readable checksum sidecar)."""
    return [r for r in rows if r["state"] == "corrupt"
            or r["checksum"].startswith(("MISMATCH", "UNTRUSTED"))]


# ---------------------------------------------------------------------------- context

class _Context:
    def __init__(self, run: Path, verify: bool):
        self.run, self.verify = run, verify
        self.token_hash = None
        self.token_meta = None
        self.token_meta = read_token_meta(run)
        if self.token_meta is not None:
            self.token_hash = self.token_meta.get("hash")
        self.config = None
        cfg_path = run / "config.toml"
        if cfg_path.is_file():
            try:
                from ooc_universal.config import RunConfig
                self.config = RunConfig.from_toml(cfg_path)
            except Exception:  # noqa: BLE001 - status reports on what it can read
                self.config = None

    def rel(self, path: Path) -> str:
        try:
            return str(Path(path).relative_to(self.run))
        except ValueError:
            return str(path)

    def expected_stores(self) -> list[str]:
        """Store labels RUN/config.toml asks for (empty without a readable config)."""
        cfg = self.config
        if cfg is None:
            return []
        from ooc_universal.models import parse_model_spec
        out = []
        for c in cfg.checkpoint_list():
            for m in cfg.models:
                try:
                    out.append(parse_model_spec(cfg.spec(m, c)).label)
                except Exception:  # noqa: BLE001 - a model dir may be gone: skip it
                    pass
        return out

    def expected_pairs(self) -> list[str]:
        """Reduce file names RUN/config.toml asks for."""
        cfg = self.config
        if cfg is None:
            return []
        from ooc_universal.models import parse_model_spec
        refs = list(cfg.models) if cfg.all_references else [cfg.reference_model]
        out = []
        for c in cfg.checkpoint_list():
            for r in refs:
                for o in cfg.models:
                    if o == r:
                        continue
                    try:
                        a = parse_model_spec(cfg.spec(r, c)).label
                        b = parse_model_spec(cfg.spec(o, c)).label
                    except Exception:  # noqa: BLE001
                        continue
                    out.append(f"{a}__{b}.h5")
        return out


def _row(step, item, state, progress="", detail="", token_hash="", config_hash_="",
         toolkit_version="", checksum="") -> dict:
    return {"step": step, "item": item, "state": state, "progress": progress,
            "detail": detail, "token_hash": token_hash or "", "config_hash": config_hash_ or "",
            "toolkit_version": toolkit_version or "", "checksum": checksum}


def _verify_file(ctx: _Context, path: Path) -> str:
    """"ok" / "MISMATCH: ..." / "UNTRUSTED: ..." for a file that should have a sidecar;
    without verify only a missing or unreadable sidecar is flagged (cheap)."""
    rec = read_sidecar(path)
    if rec is None:
        return (f"UNTRUSTED: no readable checksum sidecar {path.name}.sha256; re-run its "
                "step with --force to recompute it")
    if not ctx.verify:
        return ""
    if rec.get("kind") == "blocks":
        from ooc_universal.formats.store import verify_store_blocks
        try:
            bad = verify_store_blocks(path, rec)
        except OocError as exc:
            return f"MISMATCH: {exc}"
        return "ok" if not bad else "MISMATCH: " + "; ".join(bad)
    size = path.stat().st_size
    if rec.get("size") is not None and size != rec["size"]:
        return f"MISMATCH: {size} bytes, recorded {rec['size']}"
    digest = file_sha256(path)
    return "ok" if digest == rec["sha256"] else \
        f"MISMATCH: sha256 {digest[:12]}, recorded {rec['sha256'][:12]}"


def _verify_files(ctx: _Context, paths) -> str:
    """One verdict for several files: the first mismatch, else untrusted, else ok."""
    verdicts = [(p, _verify_file(ctx, p)) for p in paths if p.exists()]
    bad = [f"{p.name}: {v[len('MISMATCH: '):]}" for p, v in verdicts if v.startswith("MISMATCH")]
    if bad:
        return "MISMATCH: " + "; ".join(bad)
    missing = [p.name for p, v in verdicts if v.startswith("UNTRUSTED")]
    if missing:
        return (f"UNTRUSTED: no readable checksum sidecar for {', '.join(missing)}; re-run "
                "the step with --force to recompute")
    return "ok" if ctx.verify else ""


def _inputs_changed(rec: dict | None, current: dict) -> list[str]:
    """Inputs recorded in a sidecar whose checksum now differs (None = unknown, skipped)."""
    if not rec:
        return []
    out = []
    for name, was in (rec.get("inputs") or {}).items():
        if name not in current:
            continue
        now = current[name]
        if was and now and was != now:
            out.append(f"{name} changed")
        elif was and now is False:
            out.append(f"{name} is gone")
    return out


def _written_at(path: Path) -> float | None:
    """When the sidecar of `path` was written (None: unknown, an older toolkit)."""
    rec = read_sidecar(path)
    value = (rec or {}).get("written_at")
    return float(value) if isinstance(value, (int, float)) else None


def _made(rec: dict | None) -> tuple:
    """(written_at, run_id) of an output's checksum record."""
    rec = rec or {}
    when = rec.get("written_at")
    return (float(when) if isinstance(when, (int, float)) else None), rec.get("run_id")


def _foreign_inputs(ctx: _Context, made: tuple, recorded: dict) -> str:
    """"UNTRUSTED: ..." when an output records, for an input now here, another checksum
    and either the output was made in another run directory (its run_id) or that input
    was written before the output: the output was not made from it (another run's file,
    or one rewritten under a running pipeline); "" otherwise (an input re-made after the
    output makes it stale, not untrusted)."""
    from ooc_universal.rundir import run_id
    made_at, made_in = made
    here_id = run_id(ctx.run, create=False)
    elsewhere = bool(made_in and here_id and made_in != here_id)
    bad = []
    for name, was in sorted(recorded.items()):
        path = ctx.run / name
        if not was or not path.exists():
            continue
        now, when = recorded_sha256(path), _written_at(path)
        if now and now != was and (elsewhere or (when is not None and made_at is not None
                                                 and when < made_at)):
            bad.append(name)
    if not bad:
        return ""
    where = (f"in another run directory (run id {made_in}, this run's is {here_id})"
             if elsewhere else "from other inputs than those here, which are older than it")
    return (f"UNTRUSTED: made {where}: {', '.join(bad)} differ from what it recorded (a file "
            "from another run, or rewritten under a running pipeline?); re-run the step")


def _with_foreign(checksum: str, foreign: str) -> str:
    return checksum if checksum.startswith("MISMATCH") or not foreign else foreign


# ---------------------------------------------------------------------------- steps

def _tokens(ctx: _Context) -> list[dict]:
    meta = ctx.token_meta
    if meta is None:
        tmp = list(ctx.run.glob(".tokens.tmp-*"))
        if tmp:
            return [_row("tokens", "tokens/", "partial", detail="a token set was being "
                         "written (killed?); run `ooc-universal tokens` again")]
        return [_row("tokens", "tokens/", "missing")]
    settings = {k: meta.get(k) for k in ("n_tokens", "window", "tokenizer", "n_eval_tokens")}
    state, detail = "complete", ""
    cfg = ctx.config
    if cfg is not None:
        diff = [f"{k} {meta.get(k)} (config.toml: {getattr(cfg.tokens, k)})"
                for k in ("n_tokens", "window", "n_eval_tokens")
                if meta.get(k) is not None and meta.get(k) != getattr(cfg.tokens, k)]
        if diff:
            state, detail = "stale", "made with other settings: " + ", ".join(diff)
    checksum = ""
    if ctx.verify:
        from ooc_universal.formats.tokens import load_token_set
        try:
            load_token_set(ctx.run)
            checksum = "ok"
        except OocError as exc:
            checksum, state = f"MISMATCH: {exc}", "corrupt"
    return [_row("tokens", "tokens/", state, f"{meta.get('n_tokens')} tokens", detail,
                 meta.get("hash"), config_hash(settings), meta.get("toolkit_version"),
                 checksum)]


def _stores(ctx: _Context) -> list[dict]:
    from ooc_universal.disk import released
    d = ctx.run / "stores"
    labels = list(ctx.expected_stores())
    gone = released(ctx.run)
    if d.is_dir():
        for p in sorted(d.iterdir()):
            for suffix in (".h5.partial", ".h5"):
                if p.name.endswith(suffix) and not p.name.startswith("."):
                    label = p.name[: -len(suffix)]
                    if label not in labels:
                        labels.append(label)
    streamed = _streamed_labels(ctx.run)
    stream_config = ctx.config is not None and ctx.config.reduce.source == "stream"
    rows = []
    for label in labels:
        final, partial, ledger = d / f"{label}.h5", d / f"{label}.h5.partial", \
            d / f"{label}.ledger"
        item = f"stores/{label}.h5"
        if final.exists():
            rows.append(_store_row(ctx, final, item))
        elif partial.exists() or ledger.exists():
            done, total, header = ledger_progress(ledger)
            attrs = header.get("attrs", {})
            progress = f"{done}/{total} blocks" if total else "0 blocks (restarts)"
            detail = "interrupted or running; run the same `ooc-universal extract` again"
            th = attrs.get("token_hash")
            if th and ctx.token_hash and th != ctx.token_hash:
                detail = ("started from another token set; extract refuses to append: "
                          "delete it")
            rows.append(_row("extract", item, "partial", progress, detail, th,
                             config_hash({k: v for k, v in attrs.items()
                                          if k != "toolkit_version"}) if attrs else "",
                             attrs.get("toolkit_version")))
        elif label in gone:
            rec = gone[label]
            rows.append(_row("extract", item, "released", "",
                             f"deleted after its reduce ({', '.join(rec.get('read_by', []))}) "
                             f"at {rec.get('released_at', '?')}; sha256 "
                             f"{str(rec.get('sha256'))[:12]} in stores/released.json"))
        elif label in streamed:
            rows.append(_row("extract", item, "streamed", "",
                             f"not written: {', '.join(streamed[label])} streamed this "
                             "model (--source stream); `ooc-universal extract` writes it "
                             "if you want the activations"))
        elif not stream_config:  # a streaming study expects no stores
            rows.append(_row("extract", item, "missing"))
    return rows


def _streamed_labels(run: Path) -> dict:
    """label -> the reduce files made by streaming that model (their sidecars' record)."""
    out: dict = {}
    for path in list_reduced(run):
        rec = read_sidecar(path) or {}
        if rec.get("source") == "stream" and isinstance(rec.get("models"), dict):
            for label in rec["models"]:
                out.setdefault(label, []).append(f"reduce/{path.name}")
    return out


def _store_row(ctx: _Context, path: Path, item: str) -> dict:
    from ooc_universal.formats.store import open_store
    try:
        with open_store(path, verify=False) as st:  # its checksums: _verify_file below
            attrs = dict(st.attrs)
            n_blocks = st.n_blocks
    except OocError as exc:
        return _row("extract", item, "corrupt", detail=str(exc),
                    checksum="MISMATCH: unreadable" if ctx.verify else "")
    label = str(attrs.get("label", ""))
    if path.name.endswith(".h5") and label != path.name[:-3]:
        return _row("extract", item, "corrupt", detail=(
            f"holds the activation store of {label!r}, not of {path.name[:-3]!r} (a store "
            "copied over another?); delete it and run `ooc-universal extract` again"),
            checksum=f"MISMATCH: label {label!r}")
    th = attrs.get("token_hash")
    state, detail = "complete", ""
    if ctx.token_hash and th != ctx.token_hash:
        state, detail = "stale", (f"made from token set {str(th)[:12]}, the run's is "
                                  f"{ctx.token_hash[:12]}")
    checksum = _verify_file(ctx, path)
    if checksum.startswith("MISMATCH"):
        state = "corrupt"
    return _row("extract", item, state, f"{n_blocks}/{n_blocks} blocks", detail, th,
                config_hash({k: v for k, v in attrs.items() if k != "toolkit_version"}),
                attrs.get("toolkit_version"), checksum)


def _store_sha(ctx: _Context, name: str):
    """Current recorded checksum of an input store: str, None (unknown), False (gone)."""
    p = ctx.run / name if not Path(name).is_absolute() else Path(name)
    if not p.exists():
        return False
    return recorded_sha256(p)


def _reduce(ctx: _Context) -> list[dict]:
    d = ctx.run / "reduce"
    names = list(ctx.expected_pairs())
    finals = [p.name for p in list_reduced(ctx.run)]
    names += [n for n in finals if n not in names]
    work = {}
    for item in leftovers(ctx.run):
        if not item.in_progress:
            continue
        m = WorkDir(item.path).manifest() or {}
        for out in m.get("outputs", []):
            work[out] = (item, m)
            if out not in names:
                names.append(out)
    rows = []
    for name in names:
        path = d / name
        item = f"reduce/{name}"
        if path.exists():
            rows.append(_reduce_row(ctx, path, item))
        elif name in work:
            left, m = work[name]
            rows.append(_row("reduce", item, "partial", left.why.rsplit(": ", 1)[-1],
                             _partial_reduce_hint(ctx, left, m), m.get("token_hash"),
                             m.get("config_hash"), m.get("toolkit_version")))
        else:
            rows.append(_row("reduce", item, "missing"))
    return rows


def _partial_reduce_hint(ctx: _Context, left, m: dict) -> str:
    others = " ".join(m.get("others", [])) or "OTHER..."
    command = m.get("command")  # the exact command (a changed --memory would start over)
    if isinstance(command, list):
        command = " ".join(map(str, command))
    command = command or (f"ooc-universal reduce --run-dir {ctx.run} "
                          f"-r {m.get('reference', 'REF')} {others}")
    return (f"interrupted or running ({human_bytes(left.size)} of checkpoints in "
            f"{ctx.rel(left.path)}); finish it: run the same `{command}` again; discard "
            f"it: `ooc-universal clean --run-dir {ctx.run} --partial`")


def _leftovers(ctx: _Context) -> list[dict]:
    return [_row("leftover", ctx.rel(item.path), "leftover", human_bytes(item.size),
                 f"{item.why}; remove with `ooc-universal clean --run-dir {ctx.run}`")
            for item in leftovers(ctx.run) if not item.in_progress]


def _reduce_row(ctx: _Context, path: Path, item: str) -> dict:
    try:
        with open_reduced(path, verify=False) as stats:  # checksum: _verify_file below
            attrs, config = dict(stats.attrs), stats.config
    except OocError as exc:
        return _row("reduce", item, "corrupt", detail=str(exc),
                    checksum="MISMATCH: unreadable" if ctx.verify else "")
    settings = config.get("settings") or {}
    th = str(attrs.get("token_hash", ""))
    why = []
    if ctx.token_hash and th != ctx.token_hash:
        why.append(f"made from token set {th[:12]}, the run's is {ctx.token_hash[:12]}")
    stores = {}
    for role in ("reference_store", "other_store"):
        meta = config.get(role) or {}
        was = meta.get("sha256")
        label = meta.get("label")
        if was and label:
            stores[f"stores/{label}.h5"] = was
            now = _store_sha(ctx, f"stores/{label}.h5")
            if now and now != was:
                why.append(f"store {label} changed since")
    cfg = ctx.config
    if cfg is not None and settings:
        for key in ("precision", "baseline_draws", "seed", "keep_covariance"):
            if key in settings and settings[key] != getattr(cfg.reduce, key):
                why.append(f"{key} {settings[key]} (config.toml: {getattr(cfg.reduce, key)})")
    checksum = _with_foreign(_verify_file(ctx, path),
                             _foreign_inputs(ctx, _made(read_sidecar(path)), stores))
    state = "corrupt" if checksum.startswith("MISMATCH") else ("stale" if why else "complete")
    return _row("reduce", item, state, "", "; ".join(why), th,
                config_hash(settings) if settings else "",
                str(attrs.get("toolkit_version", "")), checksum)


def _sets_document(run: Path) -> dict | None:
    try:
        return read_sets(run, verify=False).to_json()
    except OocError:
        return None


def _step_document(ctx: _Context, step: str, files, main: str, reader):
    """(document, files present, None) for a readable output of `step` (RUN/<step>/),
    else (None, files present, [its missing / partial / corrupt row])."""
    folder = ctx.run / step
    have = [folder / f for f in files if (folder / f).exists()]
    item = f"{step}/"
    if not (folder / main).exists():
        if have:
            return None, have, [_row(step, item, "partial", f"{len(have)}/{len(files)} files",
                                     f"interrupted; run `ooc-universal {step}` again")]
        return None, have, [_row(step, item, "missing")]
    try:
        return reader(ctx.run).to_json(), have, None
    except OocError as exc:
        return None, have, [_row(step, item, "corrupt", detail=str(exc),
                                 checksum="MISMATCH: unreadable" if ctx.verify else "")]


def _cards(ctx: _Context) -> list[dict]:
    """Neuron cards: beyond the paper, so not listed as missing when never made."""
    doc, have, early = _step_document(ctx, "cards", ("cards.json",), "cards.json", read_cards)
    if early:
        return [] if early[0]["state"] == "missing" else early
    th = doc.get("token_hash")
    why = []
    if ctx.token_hash and th and th != ctx.token_hash:
        why.append(f"made from token set {str(th)[:12]}, the run's is {ctx.token_hash[:12]}")
    rec = read_sidecar(have[0])
    why += _inputs_changed(rec, {"universal/sets.json": recorded_sha256(sets_path(ctx.run))})
    checksum = _with_foreign(_verify_files(ctx, have), _foreign_inputs(
        ctx, _made(rec), (rec or {}).get("inputs") or {}))
    state = "corrupt" if checksum.startswith("MISMATCH") else ("stale" if why else "complete")
    return [_row("cards", "cards/", state, f"{len(doc.get('cards') or [])} cards",
                 "; ".join(why), th, (rec or {}).get("config_hash", ""),
                 doc.get("toolkit_version"), checksum)]


def _universal(ctx: _Context) -> list[dict]:
    doc, have, early = _step_document(ctx, "universal", UNIVERSAL_FILES, "sets.json",
                                      lambda run: read_sets(run, verify=False))
    if early:
        return early
    paths, sets = UNIVERSAL_FILES, sets_path(ctx.run)
    rec = read_sidecar(sets)
    why = []
    th = doc.get("token_hash")
    if ctx.token_hash and th and th != ctx.token_hash:
        why.append(f"made from token set {str(th)[:12]}, the run's is {ctx.token_hash[:12]}")
    if rec is not None:
        current = {f"reduce/{p.name}": recorded_sha256(p) for p in list_reduced(ctx.run)}
        for name in (rec.get("inputs") or {}):
            current.setdefault(name, False)
        why += _inputs_changed(rec, current)
        refs = set((doc.get("config") or {}).get("references") or [])
        new = [n for n in current if n not in (rec.get("inputs") or {})
               and current[n] is not False and _ref_name_of(ctx.run / n) in refs]
        if new:
            why.append(f"new reduce output(s) since: {', '.join(new)}")
    cfg = ctx.config
    conf = doc.get("config") or {}
    if cfg is not None and conf:
        uni = cfg.universal
        if sorted(float(t) for t in uni.thresholds) != sorted(conf.get("thresholds", [])):
            why.append(f"thresholds {conf.get('thresholds')} (config.toml: {uni.thresholds})")
        if conf.get("definition") and conf["definition"] != uni.definition:
            why.append(f"definition {conf['definition']} (config.toml: {uni.definition})")
    checksum = _with_foreign(_verify_files(ctx, have), _foreign_inputs(
        ctx, _made(rec), (rec or {}).get("inputs") or {}))
    state = "corrupt" if checksum.startswith("MISMATCH") else ("stale" if why else "complete")
    return [_row("universal", "universal/", state, f"{len(have)}/{len(paths)} files",
                 "; ".join(why), th, (rec or {}).get("config_hash") or config_hash(conf),
                 doc.get("toolkit_version"), checksum)]


def _ref_name_of(path: Path) -> str | None:
    try:
        v = read_attrs(path, verify=False).get("ref_name")
    except OocError:
        return None
    return None if v is None else str(v)


def _persistence(ctx: _Context) -> list[dict]:
    doc, have, early = _step_document(ctx, "persistence", PERSISTENCE_FILES,
                                      "persistence.json", read_persistence)
    if early:
        return early
    paths, main = PERSISTENCE_FILES, ctx.run / "persistence" / "persistence.json"
    why = []
    sets = sets_path(ctx.run)
    sets_doc = _sets_document(ctx.run)
    was = (doc.get("source") or {}).get("universal_id")
    if sets_doc is None:
        why.append("universal/sets.json is gone")
    elif was and sets_doc.get("universal_id") and was != sets_doc.get("universal_id"):
        why.append("universal/sets.json changed since")
    else:
        why += _inputs_changed(read_sidecar(main), {"universal/sets.json": recorded_sha256(sets)})
    rec = read_sidecar(main)
    checksum = _with_foreign(_verify_files(ctx, have), _foreign_inputs(
        ctx, _made(rec), (rec or {}).get("inputs") or {}))
    state = "corrupt" if checksum.startswith("MISMATCH") else ("stale" if why else "complete")
    return [_row("persistence", "persistence/", state, f"{len(have)}/{len(paths)} files",
                 "; ".join(why), doc.get("token_hash"),
                 (rec or {}).get("config_hash") or config_hash(doc.get("config")),
                 doc.get("toolkit_version"), checksum)]


def _ablate(ctx: _Context) -> list[dict]:
    d = ctx.run / "ablate"
    paths = [d / f for f in ABLATE_FILES]
    have = [p for p in paths if p.exists()]
    main = d / "ablation.json"
    parts = list((d / "parts").glob("*.json")) if (d / "parts").is_dir() else []
    if not main.exists():
        if have or parts:
            return [_row("ablate", "ablate/", "partial", f"{len(parts)} model(s) done",
                         "interrupted or running; run `ooc-universal ablate` again")]
        return [_row("ablate", "ablate/", "missing")]
    try:
        doc = read_ablation(ctx.run).to_json()
    except OocError as exc:
        return [_row("ablate", "ablate/", "corrupt", detail=str(exc),
                     checksum="MISMATCH: unreadable" if ctx.verify else "")]
    inputs = doc.get("inputs") or {}
    why = []
    sets = ctx.run / "universal" / "sets.json"
    if not sets.exists():
        why.append("universal/sets.json is gone")
    elif inputs.get("sets_json_sha256") and inputs["sets_json_sha256"] != file_sha256(sets):
        why.append("universal/sets.json changed since")
    th = inputs.get("token_hash")
    if ctx.token_hash and th and th != ctx.token_hash:
        why.append(f"made from token set {str(th)[:12]}, the run's is {ctx.token_hash[:12]}")
    rec = read_sidecar(main)
    recorded = dict((rec or {}).get("inputs") or {})
    if inputs.get("sets_json_sha256"):
        recorded["universal/sets.json"] = inputs["sets_json_sha256"]
    checksum = _with_foreign(_verify_files(ctx, have), _foreign_inputs(
        ctx, _made(rec), {k: v for k, v in recorded.items() if isinstance(v, str)}))
    state = "corrupt" if checksum.startswith("MISMATCH") else ("stale" if why else "complete")
    return [_row("ablate", "ablate/", state, f"{len(doc.get('models') or {})} model(s)",
                 "; ".join(why), th, (rec or {}).get("config_hash")
                 or config_hash(doc.get("config")), doc.get("toolkit_version"), checksum)]


def _report(ctx: _Context) -> list[dict]:
    d = ctx.run / "report"
    data = d / "report_data.json"
    if not data.exists():
        if list(ctx.run.glob("report.tmp-*")):
            return [_row("report", "report/", "partial", detail="being written or "
                         "interrupted; run `ooc-universal report` again")]
        return [_row("report", "report/", "missing")]
    from ooc_universal.report import read_manifest, read_report_data
    try:
        doc = read_report_data(ctx.run)
    except OocError as exc:
        return [_row("report", "report/", "corrupt", detail=str(exc),
                     checksum="MISMATCH: unreadable" if ctx.verify else "")]
    why = []
    th = doc.get("token_hash")
    if ctx.token_hash and th and th != ctx.token_hash:
        why.append(f"made from token set {str(th)[:12]}, the run's is {ctx.token_hash[:12]}")
    manifest = read_manifest(ctx.run)
    if manifest is None:
        return [_row("report", "report/", "complete", f"{len(list(d.glob('*')))} files",
                     "; ".join(why), th, "", doc.get("toolkit_version"),
                     "UNTRUSTED: no readable report/checksums.json; run `ooc-universal "
                     "report` again")]
    inputs = {k: v for k, v in (manifest.get("inputs") or {}).items() if isinstance(v, str)}
    for name, was in sorted(inputs.items()):
        path = ctx.run / name
        if not path.exists():
            why.append(f"{name} is gone")
        elif recorded_sha256(path) != was:
            why.append(f"{name} changed after the report was made")
    checksum = _with_foreign(_verify_report_files(ctx, d, manifest), _foreign_inputs(
        ctx, _made(manifest), inputs))
    state = "corrupt" if checksum.startswith("MISMATCH") else ("stale" if why else "complete")
    return [_row("report", "report/", state, f"{len(list(d.glob('*')))} files",
                 "; ".join(why), th, "", doc.get("toolkit_version"), checksum)]


def _verify_report_files(ctx: _Context, folder: Path, manifest: dict) -> str:
    """The report's files against checksums.json: sizes always (cheap), sha256 with verify."""
    files = manifest["files"]
    here = {f.name for f in folder.iterdir() if f.is_file()} - {"checksums.json"}
    bad = sorted(set(files) - here)
    bad = [f"{n}: missing" for n in bad] + [f"{n}: not in checksums.json"
                                            for n in sorted(here - set(files))]
    for name in sorted(set(files) & here):
        want, path = files[name], folder / name
        if path.stat().st_size != want.get("size"):
            bad.append(f"{name}: {path.stat().st_size} bytes, recorded {want.get('size')}")
        elif ctx.verify and file_sha256(path) != want.get("sha256"):
            bad.append(f"{name}: sha256 differs")
    if bad:
        return "MISMATCH: " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
    return "ok" if ctx.verify else ""
