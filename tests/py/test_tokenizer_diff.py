"""7b: differential tests of kiln's tokenizer against the `tokenizers` package (HF) on seeded
generated strings, for Llama 3.1, Qwen3 and Mistral-7B tokenizer.json, plus two Metaspace variants
of Mistral's (pre-tokenizer Metaspace with prepend_scheme "first" / "always" + split, as newer HF
conversions write them). Checks: identical ids (with and without special tokens), identical decode
(with and without skip_special_tokens, including id sequences that decode to invalid UTF-8),
incremental decoding concatenating to the full decode, and invalid UTF-8 input (kiln replaces each
maximal invalid subpart with U+FFFD, which is what Python's bytes.decode("utf-8", "replace") does
before HF sees the text).

The C++ side is driven through `kiln tokenize/detokenize --jsonl` (one process per batch).
"""
import json
import pathlib
import random
import subprocess
import sys

import pytest

tokenizers = pytest.importorskip("tokenizers")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))
import tokenizer_corpus  # noqa: E402

N_STRINGS = 1200  # per tokenizer (x5 tokenizers, x2 for add_special_tokens on/off)
N_RANDOM_IDS = 400
NAMES = ["llama-3.1", "qwen3", "mistral-7b", "mistral-metaspace-first", "mistral-metaspace-always-split"]


@pytest.fixture(scope="module")
def tok_paths(assets, tmp_path_factory):
    base = assets / "tokenizers"
    paths = {n: base / n / "tokenizer.json" for n in ["llama-3.1", "qwen3", "mistral-7b"]}
    src = json.loads(paths["mistral-7b"].read_text(encoding="utf-8"))
    tmp = tmp_path_factory.mktemp("tok")
    for name, scheme, split in [("mistral-metaspace-first", "first", False),
                                ("mistral-metaspace-always-split", "always", True)]:
        j = dict(src)
        j["normalizer"] = None
        j["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme, "split": split}
        j["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "ByteFallback"},
            {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme, "split": split}]}
        p = tmp / f"{name}.json"
        p.write_text(json.dumps(j, ensure_ascii=False), encoding="utf-8")
        paths[name] = p
    return paths


_HF = {}


def hf_tokenizer(tok_paths, name):
    if name not in _HF:
        _HF[name] = tokenizers.Tokenizer.from_file(str(tok_paths[name]))
    return _HF[name]


def kiln_jsonl(kiln_bin, tmp_path, verb, path, lines, *flags):
    inp = tmp_path / f"in-{verb}.jsonl"
    inp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    r = subprocess.run([kiln_bin, verb, str(path), "--jsonl", str(inp), *flags], capture_output=True)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    out = [json.loads(l) for l in r.stdout.decode("utf-8").split("\n") if l]  # not splitlines: U+2028 etc.
    assert len(out) == len(lines)
    return out


def report(kind, bad, total):
    msg = "\n".join(f"  {x!r}" for x in bad[:6])
    return f"{kind}: {len(bad)} of {total} differ, e.g.\n{msg}"


def seed_of(name):
    return sum(map(ord, name)) * 7919


@pytest.mark.parametrize("name", NAMES)
def test_encode_matches_hf(name, tok_paths, kiln_bin, tmp_path):
    hf = hf_tokenizer(tok_paths, name)
    strings = tokenizer_corpus.gen_strings(seed_of(name), N_STRINGS)
    for special in (False, True):
        want = [e.ids for e in hf.encode_batch(strings, add_special_tokens=special)]
        flags = ["--add_special_tokens"] if special else []
        got = kiln_jsonl(kiln_bin, tmp_path, "tokenize", tok_paths[name], strings, *flags)
        bad = [(s, w, g) for s, w, g in zip(strings, want, got) if w != g]
        assert not bad, report(f"{name} encode(add_special_tokens={special})", bad, len(strings))


def id_sequences(hf, name, strings):
    """Encodings of the strings plus random id sequences, biased to byte tokens that make invalid UTF-8."""
    rng = random.Random(seed_of(name) + 1)
    seqs = [e.ids for e in hf.encode_batch(strings, add_special_tokens=True)]
    vocab = hf.get_vocab_size(with_added_tokens=True)
    if "mistral" in name:
        byte_ids = [hf.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    else:
        # single byte-level characters: the bytes 0x80..0xFF alone are partial UTF-8
        bl = {}
        n = 0
        for b in range(256):
            direct = 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF
            bl[b] = chr(b) if direct else chr(256 + n)
            n += 0 if direct else 1
        byte_ids = [hf.token_to_id(bl[b]) for b in range(256)]
    byte_ids = [i for i in byte_ids if i is not None]
    for _ in range(N_RANDOM_IDS):
        seq = []
        for _ in range(rng.randrange(1, 14)):
            r = rng.random()
            seq.append(rng.choice(byte_ids) if r < 0.5 else rng.randrange(vocab))
        seqs.append(seq)
    return seqs


@pytest.mark.parametrize("name", NAMES)
def test_decode_matches_hf(name, tok_paths, kiln_bin, tmp_path):
    hf = hf_tokenizer(tok_paths, name)
    strings = tokenizer_corpus.gen_strings(seed_of(name) + 2, N_STRINGS // 2)
    seqs = id_sequences(hf, name, strings)
    for skip in (False, True):
        want = hf.decode_batch(seqs, skip_special_tokens=skip)
        flags = ["--skip_special_tokens"] if skip else []
        got = kiln_jsonl(kiln_bin, tmp_path, "detokenize", tok_paths[name], seqs, *flags)
        bad = [(s, w, g) for s, w, g in zip(seqs, want, got) if w != g]
        assert not bad, report(f"{name} decode(skip_special_tokens={skip})", bad, len(seqs))
    # decode(encode(s)) gives s back for text without special-token look-alikes (all but Mistral,
    # whose encoder prepends a space that the decoder strips only at the very start).
    if name in ("llama-3.1", "qwen3"):
        got = kiln_jsonl(kiln_bin, tmp_path, "detokenize", tok_paths[name], seqs[:len(strings)], "--skip_special_tokens")
        want = [hf.decode(s, skip_special_tokens=True) for s in seqs[:len(strings)]]
        assert got == want


@pytest.mark.parametrize("name", NAMES)
def test_incremental_decode_concatenates_to_full_decode(name, tok_paths, kiln_bin, tmp_path):
    hf = hf_tokenizer(tok_paths, name)
    strings = tokenizer_corpus.gen_strings(seed_of(name) + 3, N_STRINGS // 4)
    seqs = id_sequences(hf, name, strings)
    want = hf.decode_batch(seqs, skip_special_tokens=True)
    got = kiln_jsonl(kiln_bin, tmp_path, "detokenize", tok_paths[name], seqs, "--stream", "--skip_special_tokens")
    bad = [(s, w, p) for s, w, p in zip(seqs, want, got) if "".join(p) != w or len(p) != len(s) + 1]
    assert not bad, report(f"{name} incremental decode", bad, len(seqs))


@pytest.mark.parametrize("name", ["llama-3.1", "qwen3", "mistral-7b"])
def test_invalid_utf8_input_is_replaced(name, tok_paths, kiln_bin, tmp_path):
    hf = hf_tokenizer(tok_paths, name)
    raw = tokenizer_corpus.gen_invalid_bytes(seed_of(name) + 4, 200)
    want = [hf.encode(b.decode("utf-8", errors="replace"), add_special_tokens=False).ids for b in raw]
    got = kiln_jsonl(kiln_bin, tmp_path, "tokenize", tok_paths[name], [list(b) for b in raw])
    bad = [(b, w, g) for b, w, g in zip(raw, want, got) if w != g]
    assert not bad, report(f"{name} invalid UTF-8 input", bad, len(raw))
