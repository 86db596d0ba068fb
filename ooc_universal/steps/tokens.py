"""Token sets: one set of fixed-length windows that every model of a run reads.

Conventions (the original authors' code, Gurnee et al.):
- Documents are tokenized and concatenated into one stream, a separator token between
  documents (the tokenizer's EOS, as GPT-2 does; BOS = 256 for bytes; none for a
  tokenizer without EOS, e.g. the 256-id bytes). A .npy source is taken as that stream.
- Window r is [BOS] + the next window-1 tokens of the stream: column 0 is always BOS, and
  windows never overlap. The stream is cut into windows in order, nothing is shuffled.
  Models trained without BOS (Pythia, OLMo, byte models of 256 ids) may take windows of
  `window` stream tokens instead (bos=False, and always when the tokenizer has no BOS
  or EOS); meta.json records which ("bos", "bos_token_id" null without).
- The validity mask is False at BOS/EOS/pad positions and at every newline token (the
  ids whose decoded text is exactly "\\n": 198 for GPT-2, byte 10 for bytes), and after
  the n_tokens-th valid position: exactly n_tokens positions are valid. Without BOS,
  column 0 is a stream token like any other (the position a model trained on cut
  windows starts from).
- The eval split (for ablation) is n_eval_tokens valid positions in the windows that
  follow, disjoint from the main windows.
- A folder source is read as one document per file, all regular files below it whose
  names do not start with ".", in sorted order of their relative paths. Files are read
  as bytes for the byte tokenizer and as UTF-8 for a BPE tokenizer.

On disk: RUN/tokens/, read and written only by ooc_universal.formats.tokens (the
TokenSet record, its hash, save_token_set / load_token_set); this step builds the set
and hands it to that module.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ooc_universal import __version__
from ooc_universal.config import TokensConfig
from ooc_universal.errors import OocError
from ooc_universal.formats.tokens import (BYTE_TOKENIZERS, BYTES, BYTES256, TokenSet,  # noqa: F401
                                          check_tokenizer_matches, save_token_set, token_hash,
                                          tokenizer_fingerprint)
# Transitional re-exports: callers that still import these from the step (run.py,
# status.py, ablate.py, some tests, bench) should import ooc_universal.formats.tokens.
from ooc_universal.formats.tokens import existing_hash, load_token_set  # noqa: F401

BYTE_BOS = 256
BYTE_VOCAB = 257
BYTE_NEWLINE = 10
PILE_DATASET = "monology/pile-uncopyrighted"
PILE_DEFAULT_SPLIT = "test"  # the original authors' choice
_ENCODE_BATCH = 64  # documents per tokenizer call


# ---------------------------------------------------------------------------- tokenizers

@dataclass
class TokenizerInfo:
    """What a token set needs to know about its tokenizer."""
    name: str                  # "bytes", "bytes256", or the HF tokenizer's name / path
    hf: object | None          # the HF tokenizer, None for bytes
    bos_token_id: int | None   # column 0 (BOS; else EOS); None: the tokenizer has neither
    sep_token_id: int | None   # between documents (EOS; = BOS for GPT-2 and bytes)
    vocab_size: int
    newline_token_ids: tuple[int, ...]
    fingerprint: str           # sha256 of the id -> token mapping
    context: int | None = None  # the model's context, when resolved from a model spec

    def encode_batch(self, docs: list) -> list[np.ndarray]:
        """Token ids (int32) of each document: bytes for the byte tokenizer, str for BPE."""
        if self.hf is None:
            return [np.frombuffer(d if isinstance(d, bytes) else d.encode("utf-8"),
                                  dtype=np.uint8).astype(np.int32) for d in docs]
        docs = [d.decode("utf-8") if isinstance(d, bytes) else d for d in docs]
        out = self.hf(docs, add_special_tokens=False, return_attention_mask=False,
                      verbose=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int32) for ids in out]


def byte_tokenizer(name: str = BYTES) -> TokenizerInfo:
    """The toolkit's byte tokenizer: id = byte value, BOS/EOS = 256, vocabulary 257;
    or "bytes256": the bytes alone (256 ids, no BOS, documents simply concatenated)."""
    bos = BYTE_BOS if name == BYTES else None
    vocab = BYTE_VOCAB if name == BYTES else 256
    return TokenizerInfo(name=name, hf=None, bos_token_id=bos, sep_token_id=bos,
                         vocab_size=vocab, newline_token_ids=(BYTE_NEWLINE,),
                         fingerprint=hashlib.sha256(f"bytes-{vocab}".encode()).hexdigest())


def hf_tokenizer_info(hf_tokenizer, name: str) -> TokenizerInfo:
    n = len(hf_tokenizer)
    bos = hf_tokenizer.bos_token_id
    bos = hf_tokenizer.eos_token_id if bos is None else bos  # None: windows without BOS
    sep = hf_tokenizer.eos_token_id if hf_tokenizer.eos_token_id is not None else bos
    decoded = hf_tokenizer.batch_decode([[i] for i in range(n)])
    newlines = tuple(i for i, s in enumerate(decoded) if s == "\n")
    return TokenizerInfo(name=name, hf=hf_tokenizer, bos_token_id=_id_or_none(bos),
                         sep_token_id=_id_or_none(sep), vocab_size=n,
                         newline_token_ids=newlines,
                         fingerprint=tokenizer_fingerprint(hf_tokenizer))


def _id_or_none(token_id) -> int | None:
    return None if token_id is None else int(token_id)


def resolve_tokenizer(name) -> TokenizerInfo:
    """"bytes", "bytes256", a model spec (a@100000, org/name, a local model dir, or
    dir/ckpt_{step}@N: the model's own tokenizer, or the bytes of a byte-vocabulary
    model, with the model's context), or an HF tokenizer name ("gpt2")."""
    from ooc_universal.models import STANFORD_RUNS, STEP_FIELD, load_tokenizer, parse_model_spec
    if isinstance(name, TokenizerInfo):
        return name
    name = str(name).strip()
    if name in BYTE_TOKENIZERS:
        return byte_tokenizer(name)
    base = name.rpartition("@")[0] or name
    if (Path(name).expanduser().is_dir() or Path(base).expanduser().is_dir()
            or STEP_FIELD in base
            or base in STANFORD_RUNS or base.split("/")[-1] in STANFORD_RUNS.values()):
        spec = parse_model_spec(name)
        if spec.local_dir is not None and not (Path(spec.local_dir) / "config.json").is_file():
            return _auto_tokenizer(spec.local_dir, None, spec.local_dir)  # a tokenizer-only dir
        hf, tok_name = load_tokenizer(spec)
        info = byte_tokenizer(tok_name) if hf is None else hf_tokenizer_info(hf, tok_name)
        return replace(info, context=_context(spec))
    repo, _, rev = name.partition("@")
    return _auto_tokenizer(repo, rev or None, repo)


def _context(spec) -> int | None:
    from ooc_universal.models import context_of
    return context_of(spec)


def _auto_tokenizer(source: str, revision: str | None, tok_name: str) -> TokenizerInfo:
    from huggingface_hub import constants
    from transformers import AutoTokenizer
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        hf = AutoTokenizer.from_pretrained(source, revision=revision, local_files_only=offline)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OocError(
            f"cannot load tokenizer {source!r}{f' (revision {revision})' if revision else ''}: "
            f"{first}; use --tokenizer bytes, a model spec (a@100000), a local tokenizer "
            f"directory{', or unset HF_HUB_OFFLINE' if offline else ''}") from None
    if len(hf) <= 1:  # transformers 5 builds an empty tokenizer when no files exist
        raise OocError(f"tokenizer {source!r} has no vocabulary files; "
                       "give a directory with tokenizer.json or vocab.json + merges.txt")
    return hf_tokenizer_info(hf, tok_name)


# ------------------------------------------------------------------------------- sources

def _folder_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.rglob("*") if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise OocError(f"source folder {str(folder)!r} holds no files (hidden files are skipped)")
    return files


def _read_doc(path: Path, tok: TokenizerInfo):
    data = path.read_bytes()
    if tok.hf is None:
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OocError(f"source file {str(path)!r} is not UTF-8 (byte {exc.start}); "
                       "convert it, remove it, or use --tokenizer bytes") from None


def _pile_texts(split: str):
    """Stream the texts of monology/pile-uncopyrighted (needs `datasets` and the network)."""
    try:
        import datasets
    except ImportError:
        raise OocError("--source pile needs the `datasets` package: pip install "
                       "'ooc-universal[data]' (or pip install datasets), or give local text "
                       "files as --source") from None
    hint = ("it streams from the hugging face hub and needs the network (HF_HUB_OFFLINE "
            "unset); or save some text locally and pass it as --source")
    try:
        rows = iter(datasets.load_dataset(PILE_DATASET, split=split, streaming=True))
    except Exception as exc:  # datasets raises many types for "no network" / "no split"
        first = (str(exc).strip().splitlines() or [""])[0]
        raise OocError(f"cannot open {PILE_DATASET} split {split!r} "
                       f"({type(exc).__name__}: {first}); {hint}") from None
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:
            raise OocError(f"streaming {PILE_DATASET} split {split!r} failed "
                           f"({type(exc).__name__}: {exc}); {hint}") from None
        yield row["text"]


def _documents(source, tok: TokenizerInfo):
    """(iterator of documents, description) for a text source."""
    text = str(source)
    if text == "pile" or text.startswith("pile:"):
        split = text.partition(":")[2] or PILE_DEFAULT_SPLIT
        return _pile_texts(split), f"pile:{PILE_DATASET}:{split}"
    path = Path(source).expanduser()
    if path.is_dir():
        files = _folder_files(path)
        return (_read_doc(f, tok) for f in files), f"folder:{path.absolute()} ({len(files)} files)"
    if path.is_file():
        return iter([_read_doc(path, tok)]), f"file:{path.absolute()}"
    raise OocError(f"source {text!r} not found; expected a text file, a folder of text files, "
                   "a .npy of token ids, or 'pile' / 'pile:<split>'")


def _npy_stream(path: Path, tok: TokenizerInfo) -> np.ndarray:
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise OocError(f"cannot read token ids from {str(path)!r}: {exc}") from None
    return _checked_stream(ids, tok, repr(str(path)))


def _checked_stream(ids: np.ndarray, tok: TokenizerInfo, what: str) -> np.ndarray:
    """`ids` when it is one 1-D stream of ids inside the tokenizer's vocabulary."""
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise OocError(f"{what} holds a {ids.dtype} array of shape {ids.shape}; "
                       "expected a 1-D integer array of token ids (one stream)")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= tok.vocab_size):
        raise OocError(f"{what} has token ids in [{int(ids.min())}, {int(ids.max())}], "
                       f"outside tokenizer {tok.name!r}'s vocabulary 0..{tok.vocab_size - 1}")
    return ids


def _token_chunks(source, tok: TokenizerInfo):
    """(iterator of int32 id arrays making up the stream, source description)."""
    if isinstance(source, np.ndarray):
        ids = _checked_stream(source, tok, "token id array")
        return _id_chunks(ids), f"array ({source.size} ids)"
    if str(source).endswith(".npy"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise OocError(f"source {str(source)!r} not found; expected a .npy of token ids")
        ids = _npy_stream(path, tok)
        return _id_chunks(ids), f"npy:{path.absolute()} ({ids.size} ids)"
    docs, desc = _documents(source, tok)
    return _encode_stream(docs, tok), desc


def _id_chunks(ids: np.ndarray, step: int = 1 << 20):
    """A (memory-mapped) id stream as int32 pieces: a big .npy is never read whole."""
    return (np.asarray(ids[i:i + step], dtype=np.int32) for i in range(0, ids.size, step))


def _encode_stream(docs, tok: TokenizerInfo):
    sep = np.array([] if tok.sep_token_id is None else [tok.sep_token_id], dtype=np.int32)
    first = True
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == _ENCODE_BATCH:
            for ids in tok.encode_batch(batch):
                if not first:
                    yield sep
                first = False
                yield ids
            batch = []
    for ids in tok.encode_batch(batch) if batch else []:
        if not first:
            yield sep
        first = False
        yield ids


class _Reader:
    """Reads the concatenated stream n tokens at a time."""

    def __init__(self, chunks):
        self._chunks = iter(chunks)
        self._buf = np.zeros(0, dtype=np.int32)

    def read(self, n: int) -> np.ndarray:
        parts, have = [self._buf], self._buf.size
        while have < n:
            nxt = next(self._chunks, None)
            if nxt is None:
                break
            parts.append(nxt)
            have += nxt.size
        joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
        self._buf = joined[n:]
        return joined[:n]


def _take_windows(reader: _Reader, n_valid: int, window: int, tok: TokenizerInfo, bar,
                  bos: bool = True):
    """Windows holding exactly n_valid valid positions; (ids, valid, n_found). With bos,
    column 0 is BOS and window-1 stream tokens follow; without, window stream tokens."""
    drop = np.array(sorted({t for t in (tok.bos_token_id, tok.sep_token_id) if t is not None}
                           | set(tok.newline_token_ids)), dtype=np.int32)
    first = 1 if bos else 0
    rows, masks, found = [], [], 0
    while found < n_valid:
        text = reader.read(window - first)
        if text.size == 0:
            break
        row = np.full(window, pad_id(tok, bos), dtype=np.int32)  # then pad
        row[first:first + text.size] = text
        mask = np.zeros(window, dtype=bool)
        mask[first:first + text.size] = ~np.isin(text, drop)
        need = n_valid - found
        if mask.sum() > need:  # cut after the need-th valid position
            mask[np.flatnonzero(mask)[need]:] = False
        found += int(mask.sum())
        rows.append(row)
        masks.append(mask)
        bar.update(int(mask.sum()))
    ids = np.stack(rows) if rows else np.zeros((0, window), dtype=np.int32)
    valid = np.stack(masks) if masks else np.zeros((0, window), dtype=bool)
    return ids, valid, found


def pad_id(tok: TokenizerInfo, bos: bool) -> int:
    """What fills a short last window: BOS (the original code's choice), else the
    separator, else id 0 (those positions are never valid)."""
    for token_id in ((tok.bos_token_id,) if bos else ()) + (tok.sep_token_id, 0):
        if token_id is not None:
            return int(token_id)


# ------------------------------------------------------------------------------ token set

def build_token_set(source, n_tokens: int, *, tokenizer="bytes", window: int = 512,
                    n_eval_tokens: int = 0, bos: bool = True, models=(),
                    progress: bool = False) -> TokenSet:
    """Tokenize `source` into windows with exactly n_tokens valid positions (+ eval split).

    source: a text file, a folder of text files, a .npy of token ids (or a 1-D int array),
    "pile" or "pile:<split>". tokenizer: "bytes", "bytes256", an HF tokenizer name or
    path, a model spec, or a TokenizerInfo. bos: column 0 is the tokenizer's BOS (its EOS
    when it has no BOS; no BOS at all when it has neither); False: windows of stream
    tokens only. The window must fit the context of the tokenizer's model and of
    `models` (specs, read offline; unknown contexts are not checked). Nothing is
    shuffled: the result depends only on the inputs.
    """
    n_tokens, n_eval_tokens, window = _checked_sizes(n_tokens, n_eval_tokens, window)
    tok = resolve_tokenizer(tokenizer)
    check_window_fits(window, tok, models)
    bos = bool(bos) and tok.bos_token_id is not None
    chunks, desc = _token_chunks(source, tok)
    main, held_out = _both_splits(_Reader(chunks), n_tokens, n_eval_tokens, window, tok,
                                  progress, bos)
    found, efound = int(main[1].sum()), int(held_out[1].sum())
    if found < n_tokens or efound < n_eval_tokens:
        raise OocError(
            f"source {desc} ran out: it gave {found + efound} valid tokens "
            f"({main[0].shape[0] + held_out[0].shape[0]} windows of {window}), but "
            f"{n_tokens} + {n_eval_tokens} eval were requested; give more text or lower "
            "--n-tokens / --n-eval-tokens")
    return TokenSet(*main, *held_out, meta=_token_meta(main, held_out, window, tok, desc, bos))


def check_window_fits(window: int, tok: TokenizerInfo, models=()) -> None:
    """One line when `window` is longer than the context of the tokenizer's model or of
    one of `models` (specs whose context is read offline; unknown ones pass)."""
    from ooc_universal.models import context_of, parse_model_spec
    limits = [(tok.context, f"the tokenizer's model {tok.name}")] if tok.context else []
    for spec in models:
        spec = parse_model_spec(spec)
        limits.append((context_of(spec), f"model {spec.label}"))
    for context, what in limits:
        if context is not None and window > context:
            raise OocError(f"--window {window} is longer than the {context} positions of "
                           f"{what}; use --window {context} or less")


def _checked_sizes(n_tokens, n_eval_tokens, window) -> tuple[int, int, int]:
    if int(n_tokens) < 1:
        raise OocError(f"n_tokens must be at least 1, got {n_tokens}")
    if int(n_eval_tokens) < 0:
        raise OocError(f"n_eval_tokens must be 0 or more, got {n_eval_tokens}")
    if int(window) < 2:
        raise OocError(f"window must be at least 2 (BOS + one token), got {window}")
    return int(n_tokens), int(n_eval_tokens), int(window)


def _both_splits(reader: _Reader, n_tokens: int, n_eval_tokens: int, window: int,
                 tok: TokenizerInfo, progress: bool, bos: bool = True):
    """((ids, valid), (eval_ids, eval_valid)): the main windows, then the ones after."""
    from tqdm.auto import tqdm
    with tqdm(total=n_tokens + n_eval_tokens, unit="tok", desc="tokens",
              disable=not progress) as bar:
        ids, valid, _ = _take_windows(reader, n_tokens, window, tok, bar, bos)
        eids, evalid, _ = _take_windows(reader, n_eval_tokens, window, tok, bar, bos)
    return (ids, valid), (eids, evalid)


def _token_meta(main, held_out, window: int, tok: TokenizerInfo, desc: str,
                bos: bool = True) -> dict:
    (ids, valid), (eids, evalid) = main, held_out
    return {
        "hash": token_hash(ids, valid, window, tok.name),
        "n_tokens": int(valid.sum()),
        "n_windows": int(ids.shape[0]),
        "window": window,
        "tokenizer": tok.name,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "bos": bos,
        "bos_token_id": tok.bos_token_id if bos else None,
        "pad_token_id": pad_id(tok, bos),
        "sep_token_id": tok.sep_token_id,
        "newline_token_ids": list(tok.newline_token_ids),
        "source": desc,
        "n_eval_tokens": int(evalid.sum()),
        "n_eval_windows": int(eids.shape[0]),
        "eval_hash": token_hash(eids, evalid, window, tok.name),
        "toolkit_version": __version__,
    }


# ------------------------------------------------------------------------------ the step

@dataclass(frozen=True)
class TokensResult:
    token_set: TokenSet
    folder: Path      # RUN/tokens
    written: bool     # False: the same set (same hash) was there already


def tokens(run_dir, settings: TokensConfig = TokensConfig(), *, source=None, models=(),
           bos: bool | None = None, force: bool = False, progress: bool = True) -> TokensResult:
    """The tokens step: build the token set `settings` describe and save it to RUN/tokens.

    `source` replaces settings.source with what it names already resolved (a 1-D id
    array: `run` resolves "zoo-heldout" to the zoo's held-out bytes). `models`: the run's
    model specs, whose context the window must fit (read offline). `bos` (None: the
    section's `bos`) overrides settings.bos. The caller holds the run lock. A different
    set already there is refused unless `force`."""
    bos = settings.bos if bos is None else bos
    ts = build_token_set(settings.source if source is None else source, settings.n_tokens,
                         tokenizer=settings.tokenizer, window=settings.window,
                         n_eval_tokens=settings.n_eval_tokens, bos=bos, models=models,
                         progress=progress)
    folder, written = save_token_set(ts, run_dir, force=force)
    return TokensResult(ts, folder, written)


