"""Tokenizer: stable FNV-1a word hashing into [1, buckets), lower-casing, word splitting, padding."""
import os
import subprocess
import sys

import pytest
import torch

from harmony.data.text import fnv1a32, tokenize, tokenize_candidates, word_id, words


def test_fnv1a32_published_vectors():
    # Reference values of the 32-bit FNV-1a hash (Fowler/Noll/Vo test suite).
    vectors = {b"": 0x811C9DC5, b"a": 0xE40C292C, b"foobar": 0xBF9CF968}
    for data, want in vectors.items():
        got = fnv1a32(data)
        print(data, hex(got), hex(want))
        assert got == want


def test_words_lowercase_runs_and_apostrophes():
    assert words("Bin BLUE at F2, now!") == ["bin", "blue", "at", "f2", "now"]
    assert words("don't  stop--it's 3'o clock '' ' ") == ["don't", "stop", "it's", "3'o", "clock"]
    assert words("Ça va? Größe_eins") == ["ça", "va", "größe", "eins"]  # underscore separates words
    assert words("   ...  ") == []


def test_tokenize_ids_padding_truncation():
    text = "The red BALL the red ball moves left"
    ids = tokenize(text, 5, buckets=1000)
    print(ids)
    assert ids.dtype == torch.int64 and ids.shape == (5,)
    expect = [1 + fnv1a32(w.encode()) % 999 for w in ["the", "red", "ball", "the", "red"]]
    assert ids.tolist() == expect
    padded = tokenize("one two", 6, buckets=1000)
    assert padded[2:].eq(0).all() and padded[:2].gt(0).all()
    assert tokenize("", 4).eq(0).all()


def test_ids_in_range_for_many_words_and_small_buckets():
    vocab = [f"w{i}x" for i in range(5000)]
    for buckets in (2, 3, 97, 65536):
        ids = torch.tensor([word_id(w, buckets) for w in vocab])
        assert int(ids.min()) >= 1 and int(ids.max()) < buckets
    with pytest.raises(ValueError):
        word_id("a", 1)


def test_candidates_shape_and_missing_rows():
    out = tokenize_candidates(["a b", "c"], candidates=3, max_words=4)
    assert out.shape == (3, 4)
    assert out[0, :2].gt(0).all() and out[1, 0] > 0 and out[2].eq(0).all()


def test_stable_across_processes_with_different_hash_seeds():
    # Python's str hash is salted per process; the tokenizer must not be. Load text.py by path in a child
    # with a fixed PYTHONHASHSEED (skips importing the whole package: faster).
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "harmony", "data", "text.py")
    code = ("import importlib.util as u; s = u.spec_from_file_location('t', %r); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); print(m.tokenize('stable hashing across runs', 4).tolist())" % path)
    env = dict(os.environ, PYTHONHASHSEED="12345")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    here = str(tokenize("stable hashing across runs", 4).tolist())
    print(res.stdout.strip(), here)
    assert res.stdout.strip() == here
