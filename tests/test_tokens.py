"""Token sets: windows, validity mask, sources, hash, storage, tokenizer checks, CLI."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ooc_universal.formats import tokens as token_format
from ooc_universal.cli.main import main
from ooc_universal.errors import OocError, StaleInputError
from ooc_universal.models import load_model
from ooc_universal.formats.tokens import load_token_set, save_token_set
from ooc_universal.steps.tokens import build_token_set, check_tokenizer_matches, resolve_tokenizer
from tests.tiny import save_tiny

TEXT = "ab\ncd\n\nefg hij\n"


def _text_tokens(ids):
    """The stream tokens of a set of windows: every column but the BOS, row-major."""
    return ids[:, 1:].reshape(-1)


# --------------------------------------------------------------------- byte windows, mask

def test_hand_computed_windows(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT * 3)
    ts = build_token_set(tmp_path / "t.txt", 10, window=8, n_eval_tokens=5)
    # stream: a b \n c d \n \n e f g ' ' h i j \n a b \n c d \n \n e f g ' ' h i j ...
    np.testing.assert_array_equal(ts.input_ids, [
        [256, 97, 98, 10, 99, 100, 10, 10],
        [256, 101, 102, 103, 32, 104, 105, 106]])
    np.testing.assert_array_equal(ts.valid.astype(int), [
        [0, 1, 1, 0, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 1, 1, 0]])  # 4 + 6 = 10: cut after 'i', 'j' dropped
    np.testing.assert_array_equal(ts.eval_input_ids, [
        [256, 10, 97, 98, 10, 99, 100, 10],
        [256, 10, 101, 102, 103, 32, 104, 105]])
    np.testing.assert_array_equal(ts.eval_valid.astype(int), [
        [0, 0, 1, 1, 0, 1, 1, 0],
        [0, 0, 1, 0, 0, 0, 0, 0]])
    m = ts.meta
    assert (m["n_tokens"], m["n_windows"], m["window"], m["tokenizer"]) == (10, 2, 8, "bytes")
    assert (m["n_eval_tokens"], m["n_eval_windows"], m["bos_token_id"]) == (5, 2, 256)
    assert m["newline_token_ids"] == [10] and m["source"].startswith("file:")
    assert ts.input_ids.dtype == np.int32 and ts.valid.dtype == bool


@pytest.mark.parametrize("n", [1, 4, 5, 10, 11, 37, 100])
@pytest.mark.parametrize("window", [2, 8, 33])
def test_exactly_n_valid_and_conventions(tmp_path, n, window):
    rng = np.random.default_rng(n * 100 + window)
    text = bytes(rng.choice([10, 97, 98, 99, 32], size=2000).tolist())
    (tmp_path / "t.bin").write_bytes(text)
    ts = build_token_set(tmp_path / "t.bin", n, window=window, n_eval_tokens=7)
    assert ts.valid.sum() == n == ts.n_tokens and ts.eval_valid.sum() == 7
    for ids, valid in ((ts.input_ids, ts.valid), (ts.eval_input_ids, ts.eval_valid)):
        assert ids.shape[1] == window and (ids[:, 0] == 256).all() and not valid[:, 0].any()
        assert not valid[ids == 10].any() and not valid[ids == 256].any()
        assert valid[-1].any()  # no window without a valid position at the end
    # the windows are the stream, in order: main then eval, disjoint, nothing skipped
    stream = np.frombuffer(text, np.uint8).astype(np.int32)
    both = np.concatenate([_text_tokens(ts.input_ids), _text_tokens(ts.eval_input_ids)])
    np.testing.assert_array_equal(both, stream[:both.size])
    # every non-newline stream position before the cut is valid
    flat_valid = ts.valid[:, 1:].reshape(-1)
    last = np.flatnonzero(flat_valid)[-1]
    np.testing.assert_array_equal(flat_valid[:last + 1], stream[:last + 1] != 10)


def test_folder_source_sorted_with_separators(tmp_path):
    src = tmp_path / "docs"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_bytes(b"BB")
    (src / "a.txt").write_bytes(b"A\nA")
    (src / "sub" / "c.txt").write_bytes(b"C")
    (src / ".hidden").write_bytes(b"XXXX")
    ts = build_token_set(src, 5, window=16)
    # a.txt, b.txt, sub/c.txt, separated by 256 (= BOS, not valid); then pad = 256
    np.testing.assert_array_equal(ts.input_ids[0], [256, 65, 10, 65, 256, 66, 66, 256, 67]
                                  + [256] * 7)
    assert ts.valid[0].tolist() == [False, True, False, True, False, True, True, False, True]\
        + [False] * 7
    assert "3 files" in ts.meta["source"]


def test_npy_source(tmp_path):
    ids = np.array([5, 6, 10, 7, 256, 8, 9, 10, 11], dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    ts = build_token_set(tmp_path / "ids.npy", 6, window=5)
    # taken as the stream as is; the last window is padded with BOS (= pad, not valid)
    np.testing.assert_array_equal(ts.input_ids, [[256, 5, 6, 10, 7], [256, 256, 8, 9, 10],
                                                 [256, 11, 256, 256, 256]])
    np.testing.assert_array_equal(ts.valid, [[0, 1, 1, 0, 1], [0, 0, 1, 1, 0], [0, 1, 0, 0, 0]])
    assert ts.meta["source"].startswith("npy:")
    from_array = build_token_set(ids, 6, window=5)  # an in-memory array is the same stream
    np.testing.assert_array_equal(from_array.input_ids, ts.input_ids)
    assert from_array.hash == ts.hash
    with pytest.raises(OocError, match=r"gave 6 valid tokens .* but 7 \+ 0 eval"):
        build_token_set(tmp_path / "ids.npy", 7, window=5)
    np.save(tmp_path / "big.npy", np.array([1, 300]))
    with pytest.raises(OocError, match=r"token ids in \[1, 300\].*0\.\.256"):
        build_token_set(tmp_path / "big.npy", 1, window=5)
    np.save(tmp_path / "two.npy", np.zeros((2, 2), np.int32))
    with pytest.raises(OocError, match="expected a 1-D integer array"):
        build_token_set(tmp_path / "two.npy", 1, window=5)


def test_source_runs_out(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)  # 11 non-newline bytes
    with pytest.raises(OocError, match=r"ran out: it gave 11 valid tokens .*12 \+ 0 eval"):
        build_token_set(tmp_path / "t.txt", 12, window=8)
    with pytest.raises(OocError, match=r"ran out: it gave 10 valid tokens .*10 \+ 5 eval"):
        build_token_set(tmp_path / "t.txt", 10, window=8, n_eval_tokens=5)
    with pytest.raises(OocError, match="not found"):
        build_token_set(tmp_path / "nope.txt", 1)
    with pytest.raises(OocError, match="window must be at least 2"):
        build_token_set(tmp_path / "t.txt", 1, window=1)


def test_hash_stable_and_content_sensitive(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT * 5)
    h = build_token_set(tmp_path / "t.txt", 20, window=8).hash
    assert h == build_token_set(tmp_path / "t.txt", 20, window=8).hash
    assert len(h) == 64 and int(h, 16) >= 0
    assert h != build_token_set(tmp_path / "t.txt", 21, window=8).hash
    assert h != build_token_set(tmp_path / "t.txt", 20, window=9).hash
    (tmp_path / "u.txt").write_text(TEXT.replace("h", "H") * 5)
    assert h != build_token_set(tmp_path / "u.txt", 20, window=8).hash
    # the eval split has its own hash and leaves the main one alone
    ev = build_token_set(tmp_path / "t.txt", 20, window=8, n_eval_tokens=3)
    assert ev.hash == h and ev.meta["eval_hash"] != build_token_set(
        tmp_path / "t.txt", 20, window=8).meta["eval_hash"]


# ------------------------------------------------------------------------------ BPE

def save_tiny_bpe(path: Path) -> Path:
    """A GPT-2 style byte-level BPE: the 256 byte symbols in GPT-2's order (so "\\n" = 198,
    as in GPT-2), three merges, <|endoftext|> = 259; and a tiny model with that vocabulary."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.gpt2.tokenization_gpt2 import GPT2Tokenizer
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for tok in ("he", "ll", "Ġw"):
        vocab[tok] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = GPT2Tokenizer(vocab=vocab, merges=[("h", "e"), ("l", "l"), ("Ġ", "w")])
    tok.save_pretrained(path)
    save_tiny(path, vocab_size=260, bos_token_id=259)
    return path


def test_bpe_windows(tmp_path):
    model_dir = save_tiny_bpe(tmp_path / "bpe")
    src = tmp_path / "docs"
    src.mkdir()
    (src / "1.txt").write_text("hello\n world\n")
    (src / "2.txt").write_text("well\n\nhe")
    ts = build_token_set(src, 9, window=6, tokenizer=str(model_dir))
    info = resolve_tokenizer(str(model_dir))
    assert info.newline_token_ids == (198,) and info.bos_token_id == 259 == info.sep_token_id
    # expected stream from the HF tokenizer itself, documents joined by <|endoftext|>
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(model_dir)
    stream = (hf.encode("hello\n world\n", add_special_tokens=False) + [259]
              + hf.encode("well\n\nhe", add_special_tokens=False))
    assert 198 in stream and 256 in stream  # newline and the "he" merge are exercised
    text = _text_tokens(ts.input_ids)
    n_text = min(text.size, len(stream))
    np.testing.assert_array_equal(text[:n_text], stream[:n_text])
    assert (ts.input_ids[:, 0] == 259).all() and ts.valid.sum() == 9
    assert not ts.valid[ts.input_ids == 198].any() and not ts.valid[ts.input_ids == 259].any()
    assert ts.meta["tokenizer"] == str(model_dir) and ts.meta["newline_token_ids"] == [198]


def test_check_tokenizer_matches(tmp_path):
    bpe_dir = save_tiny_bpe(tmp_path / "bpe")
    byte_dir = save_tiny(tmp_path / "bytes")
    (tmp_path / "t.txt").write_text("hello world\n" * 4)
    byte_ts = build_token_set(tmp_path / "t.txt", 10, window=8)
    bpe_ts = build_token_set(tmp_path / "t.txt", 10, window=8, tokenizer=str(bpe_dir))
    byte_model, bpe_model = load_model(str(byte_dir)), load_model(str(bpe_dir))
    assert bpe_model.tokenizer is not None and bpe_model.tokenizer_name == str(bpe_dir)
    check_tokenizer_matches(byte_ts, byte_model)
    check_tokenizer_matches(bpe_ts, bpe_model)
    with pytest.raises(OocError, match="byte tokenizer but model bpe has its own"):
        check_tokenizer_matches(byte_ts, bpe_model)
    with pytest.raises(OocError, match="byte-vocabulary model"):
        check_tokenizer_matches(bpe_ts, byte_model)
    small = load_model(str(save_tiny(tmp_path / "small", vocab_size=100, bos_token_id=99)),
                       with_tokenizer=False)
    with pytest.raises(OocError, match="token id 256 but model small has a vocabulary of 100"):
        check_tokenizer_matches(byte_ts, small)
    other_bos = load_model(str(save_tiny(tmp_path / "bos", bos_token_id=0)))
    with pytest.raises(OocError, match="BOS id 256 but model bos has bos_token_id 0"):
        check_tokenizer_matches(byte_ts, other_bos)


# ------------------------------------------------------------------------------ pile

class _FakeDatasets(types.ModuleType):
    def __init__(self, texts=None, error=None):
        super().__init__("datasets")
        self.calls, self._texts, self._error = [], texts, error

    def load_dataset(self, name, split=None, streaming=False):
        self.calls.append((name, split, streaming))
        if self._error:
            raise self._error
        return ({"text": t, "meta": {}} for t in self._texts)


def test_pile_source_streams_test_split(monkeypatch):
    fake = _FakeDatasets(texts=["ab\n", "cd", "efg"])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ts = build_token_set("pile", 6, window=6)
    assert fake.calls == [("monology/pile-uncopyrighted", "test", True)]
    np.testing.assert_array_equal(ts.input_ids, [[256, 97, 98, 10, 256, 99],
                                                 [256, 100, 256, 101, 102, 103]])
    assert ts.valid.sum() == 6 and ts.meta["source"] == "pile:monology/pile-uncopyrighted:test"
    build_token_set("pile:validation", 2, window=6)
    assert fake.calls[-1][1] == "validation"


def test_pile_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(OocError, match=r"needs the `datasets` package: pip install"):
        build_token_set("pile", 5)
    monkeypatch.setitem(sys.modules, "datasets",
                        _FakeDatasets(error=ConnectionError("Couldn't reach the hub")))
    with pytest.raises(OocError, match=r"cannot open monology/pile-uncopyrighted split 'test' "
                                       r"\(ConnectionError: Couldn't reach.*needs the network"):
        build_token_set("pile", 5)


# -------------------------------------------------------------------- save / load

def _small_set(tmp_path, n=10, name="t.txt"):
    (tmp_path / name).write_text(TEXT * 5)
    return build_token_set(tmp_path / name, n, window=8, n_eval_tokens=4)


def test_save_load_round_trip(tmp_path):
    ts = _small_set(tmp_path)
    folder, written = save_token_set(ts, tmp_path / "run")
    assert written and folder == tmp_path / "run" / "tokens"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["tokens"]  # no temp dirs
    back = load_token_set(tmp_path / "run")
    for a, b in ((ts.input_ids, back.input_ids), (ts.valid, back.valid),
                 (ts.eval_input_ids, back.eval_input_ids), (ts.eval_valid, back.eval_valid)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert back.meta == json.loads(json.dumps(ts.meta)) and back.hash == ts.hash
    assert (back.n_tokens, back.window) == (10, 8)
    # same set again: nothing written; another set: refused, unless forced
    assert save_token_set(ts, tmp_path / "run") == (folder, False)
    other = _small_set(tmp_path, n=11)
    with pytest.raises(StaleInputError, match=r"already holds another token set.*--force"):
        save_token_set(other, tmp_path / "run")
    assert load_token_set(tmp_path / "run").hash == ts.hash
    save_token_set(other, tmp_path / "run", force=True)
    assert load_token_set(tmp_path / "run").hash == other.hash


def test_load_missing_and_corrupt(tmp_path):
    with pytest.raises(OocError, match=r"no token set in .*run `ooc-universal tokens"):
        load_token_set(tmp_path / "run")
    ts = _small_set(tmp_path)
    folder, _ = save_token_set(ts, tmp_path / "run")
    npz = folder / "tokens.npz"
    good = npz.read_bytes()
    npz.write_bytes(good[: len(good) // 2])
    with pytest.raises(OocError, match=r"unreadable .*--force"):
        load_token_set(tmp_path / "run")
    ids = ts.input_ids.copy()
    ids[0, 1] += 1
    np.savez(npz, input_ids=ids, valid=ts.valid, eval_input_ids=ts.eval_input_ids,
             eval_valid=ts.eval_valid)
    with pytest.raises(OocError, match="does not match its hash"):
        load_token_set(tmp_path / "run")


def test_interrupted_save_leaves_nothing_complete(tmp_path, monkeypatch):
    ts = _small_set(tmp_path)

    def boom(path, obj):
        raise OSError("disk died")
    monkeypatch.setattr(token_format, "write_json_atomic", boom)
    with pytest.raises(OSError, match="disk died"):
        save_token_set(ts, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []
    monkeypatch.undo()
    save_token_set(ts, tmp_path / "run")
    other = _small_set(tmp_path, n=11)
    monkeypatch.setattr(token_format, "write_json_atomic", boom)
    with pytest.raises(OSError):
        save_token_set(other, tmp_path / "run", force=True)
    assert load_token_set(tmp_path / "run").hash == ts.hash  # the old set is intact


# ------------------------------------------------------------------------------ CLI

def _run(args, capsys):
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT * 5)
    base = ["tokens", "--run-dir", str(tmp_path / "run"), "--source", str(tmp_path / "t.txt"),
            "--window", "8", "--tokenizer", "bytes", "--no-progress"]
    code, out, err = _run(base + ["--n-tokens", "20", "--n-eval-tokens", "3"], capsys)
    ts = load_token_set(tmp_path / "run")
    assert code == 0 and str(tmp_path / "run" / "tokens") in out and ts.hash in out
    assert ts.n_tokens == 20 and ts.meta["n_eval_tokens"] == 3
    code, out, err = _run(base + ["--n-tokens", "20", "--n-eval-tokens", "3"], capsys)
    assert code == 0 and "nothing to do" in out
    code, out, err = _run(base + ["--n-tokens", "21"], capsys)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert "--force" in err and "new --run-dir" in err
    assert load_token_set(tmp_path / "run").hash == ts.hash
    code, out, err = _run(base + ["--n-tokens", "21", "--force"], capsys)
    assert code == 0 and load_token_set(tmp_path / "run").n_tokens == 21
    code, out, err = _run(base + ["--n-tokens", "100000"], capsys)
    assert code == 1 and "ran out" in err and err.count("\n") == 1
    code, out, err = _run(["tokens", "--run-dir", str(tmp_path / "r2"), "--source",
                           str(tmp_path / "x.txt"), "--n-tokens", "5", "--tokenizer", "bytes",
                           "--no-progress"], capsys)
    assert code == 1 and err.startswith("error: source ") and "not found" in err
    assert not (tmp_path / "r2" / "tokens").exists()
    code, out, err = _run(["tokens", "--help"], capsys)
    assert code == 0 and "BOS at column 0" in out and "newline" in out and "exactly" in out


# ------------------------------------------------------------------------ the step

def test_step_takes_its_section(tmp_path):
    from ooc_universal.config import TokensConfig
    from ooc_universal.formats.tokens import existing_hash, read_token_meta
    from ooc_universal.steps.tokens import tokens as make_tokens
    (tmp_path / "t.txt").write_text(TEXT * 5)
    settings = TokensConfig(source=str(tmp_path / "t.txt"), tokenizer="bytes", n_tokens=20,
                            n_eval_tokens=3, window=8)
    assert read_token_meta(tmp_path / "run") is None and existing_hash(tmp_path / "run") is None
    first = make_tokens(tmp_path / "run", settings, progress=False)
    assert first.written and first.folder == tmp_path / "run" / "tokens"
    assert first.token_set.hash == build_token_set(tmp_path / "t.txt", 20, window=8,
                                                   n_eval_tokens=3).hash
    assert read_token_meta(tmp_path / "run")["hash"] == existing_hash(tmp_path / "run") \
        == first.token_set.hash
    assert not make_tokens(tmp_path / "run", settings, progress=False).written
    ids = np.frombuffer((TEXT * 5).encode(), np.uint8).astype(np.int64)
    from_array = make_tokens(tmp_path / "run2", settings, source=ids, progress=False)
    assert from_array.token_set.meta["source"].startswith("array")
    with pytest.raises(StaleInputError, match="--force"):
        make_tokens(tmp_path / "run", settings.model_copy(update={"n_tokens": 21}),
                    progress=False)


# ------------------------------------------------- windows without BOS, 256-id bytes

def test_windows_without_bos(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT * 3)
    ts = build_token_set(tmp_path / "t.txt", 10, window=8, bos=False)
    # stream: a b \n c d \n \n e | f g ' ' h i j \n a ... (separator 256 between documents)
    np.testing.assert_array_equal(ts.input_ids, [
        [97, 98, 10, 99, 100, 10, 10, 101],
        [102, 103, 32, 104, 105, 106, 10, 97]])
    np.testing.assert_array_equal(ts.valid.astype(int), [
        [1, 1, 0, 1, 1, 0, 0, 1],
        [1, 1, 1, 1, 1, 0, 0, 0]])  # 5 + 5 = 10: column 0 is a valid text position
    m = ts.meta
    assert (m["bos"], m["bos_token_id"], m["pad_token_id"]) == (False, None, 256)
    assert ts.bos_token_id is None and not ts.has_bos and ts.pad_token_id == 256
    save_token_set(ts, tmp_path / "run")
    back = load_token_set(tmp_path / "run")
    assert back.hash == ts.hash and back.bos_token_id is None
    with_bos = build_token_set(tmp_path / "t.txt", 10, window=8)
    assert with_bos.hash != ts.hash and with_bos.has_bos and with_bos.bos_token_id == 256


def test_bytes256_has_no_bos_and_no_separator(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "docs" / name).write_text("xy\nz")
    ts = build_token_set(tmp_path / "docs", 6, tokenizer="bytes256", window=4)
    # documents simply concatenated: x y \n z x y \n z
    np.testing.assert_array_equal(ts.input_ids, [[120, 121, 10, 122], [120, 121, 10, 122]])
    assert int(ts.input_ids.max()) < 256 and ts.valid.sum() == 6
    m = ts.meta
    assert (m["tokenizer"], m["vocab_size"], m["bos"], m["bos_token_id"],
            m["sep_token_id"]) == ("bytes256", 256, False, None, None)
    # bos=True cannot give a BOS the tokenizer does not have
    assert build_token_set(tmp_path / "docs", 6, tokenizer="bytes256", window=4,
                           bos=True).hash == ts.hash


def test_byte_model_of_256_ids(tmp_path):
    """A zoo of byte models with 256 ids and no BOS, saved as mK/ckpt-N: the model spec
    as --tokenizer gives windows of plain bytes, which the model takes."""
    path = save_tiny(tmp_path / "m1" / "ckpt-40", vocab_size=256, bos_token_id=None)
    info = resolve_tokenizer(f"{tmp_path / 'm1'}@40")
    assert (info.name, info.vocab_size, info.bos_token_id, info.context) == (
        "bytes256", 256, None, 64)
    (tmp_path / "t.txt").write_text(TEXT * 5)
    ts = build_token_set(tmp_path / "t.txt", 20, tokenizer=info, window=8)
    assert ts.bos_token_id is None and int(ts.input_ids.max()) < 256
    lm = load_model(str(path))
    assert (lm.tokenizer_name, lm.vocab_size, lm.bos_token_id) == ("bytes256", 256, None)
    check_tokenizer_matches(ts, lm)
    old_style = build_token_set(tmp_path / "t.txt", 20, tokenizer="bytes", window=8)
    with pytest.raises(OocError, match="token id 256 but model m1@40 has a vocabulary of "
                                       "256; build the token set with --tokenizer bytes256"):
        check_tokenizer_matches(old_style, lm)


def test_window_is_checked_against_the_models_context(tmp_path):
    save_tiny(tmp_path / "m1", n_positions=16)
    save_tiny(tmp_path / "m2", n_positions=64)
    (tmp_path / "t.txt").write_text(TEXT * 20)
    with pytest.raises(OocError, match=r"--window 32 is longer than the 16 positions of the "
                                       r"tokenizer's model bytes; use --window 16 or less"):
        build_token_set(tmp_path / "t.txt", 20, tokenizer=str(tmp_path / "m1"), window=32)
    build_token_set(tmp_path / "t.txt", 20, tokenizer=str(tmp_path / "m2"), window=32)
    with pytest.raises(OocError, match="longer than the 16 positions of model m1"):
        build_token_set(tmp_path / "t.txt", 20, window=32,
                        models=[str(tmp_path / "m2"), str(tmp_path / "m1")])
    with pytest.raises(OocError, match="longer than the 1024 positions of model "
                                       "alias-gpt2-small-x21@100000"):
        build_token_set(tmp_path / "t.txt", 20, window=2048, models=["a@100000"])


def test_cli_no_bos_and_model_context(tmp_path, capsys):
    save_tiny(tmp_path / "m1", n_positions=16)
    capsys.readouterr()  # save_pretrained's own progress bar is not the command's output
    (tmp_path / "t.txt").write_text(TEXT * 20)
    base = ["tokens", "--run-dir", str(tmp_path / "run"), "--source", str(tmp_path / "t.txt"),
            "--n-tokens", "20", "--tokenizer", "bytes", "--no-progress"]
    code, out, err = _run(base + ["--window", "32", "--model", str(tmp_path / "m1")], capsys)
    assert code == 1 and "16 positions of model m1" in err and err.count("\n") == 1
    code, out, err = _run(base + ["--window", "8", "--no-bos"], capsys)
    assert code == 0 and "no BOS" in out
    assert load_token_set(tmp_path / "run").meta["bos"] is False
