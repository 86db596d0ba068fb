"""Token set format: the only reader and writer of RUN/tokens/.

On disk:
  RUN/tokens/tokens.npz   input_ids, valid, eval_input_ids, eval_valid
                          (int32 / bool, shape (n_windows, window) each)
  RUN/tokens/meta.json    hash, eval_hash, n_tokens, window, tokenizer, bos (whether
                          column 0 is BOS), bos_token_id (null without), pad_token_id,
                          ... ; written last

The folder is written under a temporary name and renamed into place with meta.json
already inside, so a half-written token set never looks complete (save_token_set).
The hash covers the arrays, the window and the tokenizer name, so a store records
exactly which token set it was made from; load_token_set verifies it.

How a token set is built (sources, tokenizers, windows, validity mask) is the tokens
step's business (steps/tokens.py); this module only knows the files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ooc_universal.errors import OocError, StaleInputError
from ooc_universal.rundir import check_free_space, ensure_writable, fsync_dir, write_json_atomic

BYTES = "bytes"          # ids 0..255 = bytes, 256 = BOS and document separator
BYTES256 = "bytes256"    # ids 0..255 = bytes, nothing else: no BOS, no separator
BYTE_TOKENIZERS = (BYTES, BYTES256)
TOKENS_DIR = "tokens"
TOKENS_FILE, META_FILE = "tokens.npz", "meta.json"
ARRAYS = ("input_ids", "valid", "eval_input_ids", "eval_valid")
_HASH_TAG = b"ooc-universal token set v1\n"


@dataclass
class TokenSet:
    input_ids: np.ndarray       # (n_windows, window) int32, column 0 = BOS (meta "bos")
    valid: np.ndarray           # (n_windows, window) bool, exactly n_tokens True
    eval_input_ids: np.ndarray  # (n_eval_windows, window) int32, the windows that follow
    eval_valid: np.ndarray      # (n_eval_windows, window) bool
    meta: dict = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return self.meta["hash"]

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def window(self) -> int:
        return int(self.meta["window"])

    @property
    def tokenizer(self) -> str:
        return self.meta["tokenizer"]

    @property
    def bos_token_id(self) -> int | None:
        """The id at column 0 of every window; None for windows without BOS."""
        bos = self.meta.get("bos_token_id")
        return None if bos is None or not self.has_bos else int(bos)

    @property
    def has_bos(self) -> bool:
        """Whether column 0 is BOS (sets made before BOS-less windows existed: always)."""
        return bool(self.meta.get("bos", True))

    @property
    def pad_token_id(self) -> int | None:
        """The id that fills a short last window (invalid positions); BOS when there is one."""
        pad = self.meta.get("pad_token_id", self.meta.get("bos_token_id"))
        return None if pad is None else int(pad)

    @property
    def n_windows(self) -> int:
        return int(self.input_ids.shape[0])

    def arrays(self) -> dict:
        """The four arrays by their file key, in the dtypes the file holds."""
        return {"input_ids": self.input_ids.astype(np.int32, copy=False),
                "valid": self.valid.astype(bool, copy=False),
                "eval_input_ids": self.eval_input_ids.astype(np.int32, copy=False),
                "eval_valid": self.eval_valid.astype(bool, copy=False)}


def token_hash(input_ids: np.ndarray, valid: np.ndarray, window: int, tokenizer: str) -> str:
    """sha256 hex of the arrays, the window and the tokenizer name."""
    h = hashlib.sha256(_HASH_TAG)
    h.update(json.dumps({"window": int(window), "tokenizer": tokenizer,
                         "shape": list(input_ids.shape)}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(input_ids, dtype="<i4").tobytes())
    h.update(np.ascontiguousarray(valid, dtype=np.uint8).tobytes())
    return h.hexdigest()


def tokens_dir(run_dir) -> Path:
    return Path(run_dir) / TOKENS_DIR


def meta_path(run_dir) -> Path:
    """RUN/tokens/meta.json (for messages; read it with read_token_meta)."""
    return tokens_dir(run_dir) / META_FILE


def read_token_meta(run_dir) -> dict | None:
    """RUN/tokens/meta.json as a dict, or None when there is no complete, readable set.
    Cheap: the arrays are neither read nor verified (load_token_set does that)."""
    try:
        meta = json.loads(meta_path(run_dir).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def existing_hash(run_dir) -> str | None:
    """The hash recorded in RUN/tokens/meta.json, or None when there is no complete set."""
    meta = read_token_meta(run_dir)
    value = None if meta is None else meta.get("hash")
    return value if isinstance(value, str) else None


def save_token_set(ts: TokenSet, run_dir, *, force: bool = False) -> tuple[Path, bool]:
    """Write `ts` to RUN/tokens; (folder, written). written is False when the same token
    set (same hash) is already there. A different complete token set is refused unless
    `force` (its stores would become stale).

    Atomic: everything goes to a temporary folder, meta.json last, which is then renamed
    to RUN/tokens: a half-written token set never looks complete."""
    run_dir = ensure_writable(run_dir)
    final = tokens_dir(run_dir)
    old_hash = existing_hash(run_dir)
    if old_hash == ts.hash:
        return final, False
    if old_hash is not None and not force:
        raise StaleInputError(
            f"run directory {str(run_dir)!r} already holds another token set "
            f"(hash {old_hash[:12]}, this one {ts.hash[:12]}); use a new --run-dir, "
            "or --force to replace it (stores made from the old set become stale)")
    arrays = ts.arrays()
    check_free_space(run_dir, sum(a.nbytes for a in arrays.values()) + (1 << 20),
                     "the token set")
    tmp = Path(run_dir) / f".tokens.tmp-{os.getpid()}"
    aside = Path(run_dir) / f".tokens.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_npz(tmp / TOKENS_FILE, arrays)
        write_json_atomic(tmp / META_FILE, ts.meta)  # last: marks the set complete
        if final.exists():
            os.rename(final, aside)
        os.rename(tmp, final)
        fsync_dir(run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
    return final, True


def _write_npz(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


def load_token_set(run_dir) -> TokenSet:
    """Read RUN/tokens and verify it against its hash; OocError when missing or corrupt."""
    folder = tokens_dir(run_dir)
    redo = f"re-run `ooc-universal tokens --run-dir {run_dir} ... --force`"
    if not (folder / META_FILE).is_file():
        raise OocError(f"no token set in {str(folder)!r} (meta.json missing); "
                       f"run `ooc-universal tokens --run-dir {run_dir} ...` first")
    try:
        ts = _read_files(folder)
        ok = _matches_hashes(ts)
    except Exception as exc:  # unreadable zip, missing key, bad JSON: all mean "corrupt"
        raise OocError(f"token set in {str(folder)!r} is unreadable ({type(exc).__name__}: "
                       f"{exc}); {redo}") from None
    if not ok:
        raise OocError(f"token set in {str(folder)!r} does not match its hash "
                       f"{ts.meta['hash'][:12]} (modified or corrupt); {redo}")
    if int(ts.valid.sum()) != ts.n_tokens:
        raise OocError(f"token set in {str(folder)!r} has {int(ts.valid.sum())} valid "
                       f"positions, meta.json says {ts.n_tokens}; {redo}")
    return ts


def _read_files(folder: Path) -> TokenSet:
    meta = json.loads((folder / META_FILE).read_text())
    with np.load(folder / TOKENS_FILE, allow_pickle=False) as z:
        arrays = [np.asarray(z[k]) for k in ARRAYS]
    return TokenSet(*arrays, meta=meta)


def _matches_hashes(ts: TokenSet) -> bool:
    """Both splits hash to what meta.json recorded (raises KeyError when it lacks one)."""
    return (token_hash(ts.input_ids, ts.valid, ts.window, ts.tokenizer) == ts.hash
            and token_hash(ts.eval_input_ids, ts.eval_valid, ts.window, ts.tokenizer)
            == ts.meta["eval_hash"])


# ---------------------------------------------------------------- fit to a model
# A token set records its tokenizer (name, fingerprint, BOS id); these say whether a
# loaded model (models.LoadedModel) can read it.

def tokenizer_fingerprint(hf_tokenizer) -> str:
    """sha256 of the tokenizer's id -> token mapping (what decides whether ids fit a model)."""
    vocab = sorted((int(i), str(t)) for t, i in hf_tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def check_tokenizer_matches(token_set: TokenSet, loaded_model) -> None:
    """Refuse a token set whose tokenizer or ids do not fit `loaded_model` (models.LoadedModel)."""
    label, tok_name = loaded_model.spec.label, token_set.tokenizer
    set_bytes, model_bytes = tok_name in BYTE_TOKENIZERS, loaded_model.tokenizer is None
    if set_bytes and not model_bytes:
        raise OocError(f"token set uses the byte tokenizer but model {label} has its own "
                       f"tokenizer ({loaded_model.tokenizer_name}); build the token set with "
                       f"--tokenizer {loaded_model.model_id} in a new --run-dir")
    if not set_bytes and model_bytes and loaded_model.tokenizer_name in BYTE_TOKENIZERS:
        raise OocError(f"token set uses tokenizer {tok_name!r} but model {label} is a "
                       f"byte-vocabulary model; build the token set with --tokenizer "
                       f"{loaded_model.tokenizer_name} in a new --run-dir")
    if not set_bytes and not model_bytes:
        fp = tokenizer_fingerprint(loaded_model.tokenizer)
        if fp != token_set.meta.get("tokenizer_fingerprint"):
            raise OocError(f"token set tokenizer {tok_name!r} differs from model {label}'s "
                           f"tokenizer ({loaded_model.tokenizer_name}): their vocabularies "
                           "differ; build the token set with the model's tokenizer")
    _check_ids_fit(token_set, loaded_model)
    bos, model_bos = token_set.bos_token_id, loaded_model.bos_token_id
    if bos is not None and model_bos is not None and bos != model_bos:
        raise OocError(f"token set uses BOS id {bos} but model {label} "
                       f"has bos_token_id {model_bos}; build the token set "
                       "with that model's tokenizer (--tokenizer MODEL) in a new --run-dir")


def _check_ids_fit(token_set: TokenSet, loaded_model) -> None:
    hi = max((int(a.max()) for a in (token_set.input_ids, token_set.eval_input_ids) if a.size),
             default=-1)
    if hi < loaded_model.vocab_size:
        return
    fix = (f"--tokenizer {loaded_model.tokenizer_name}"
           if loaded_model.tokenizer_name in BYTE_TOKENIZERS else "that model's tokenizer")
    raise OocError(f"token set has token id {hi} but model {loaded_model.spec.label} has a "
                   f"vocabulary of {loaded_model.vocab_size}; build the token set with {fix}")
