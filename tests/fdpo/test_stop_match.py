"""fdpo.stop_match against the host check it stands in for: the fewest leading tokens whose
text, as the tokenizer decodes it (skip_special_tokens, as fdpo.policy.Policy.decode),
holds a stop string."""
from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fdpo import stop_match, tokenization
from fdpo.testing import SPECIAL_TOKENS, build_tiny_tokenizer

# Code with multi-byte characters, so some tokens hold part of a character.
CORPUS = ["def café(x):\n    return x  # naïve\n", "print('数据', 'données')\n",
          "s = 'héllo wörld'\nfor c in s:\n    print(c)\n", "x = '→ ✓ ✗'\n",
          "class Naïve:\n    pass\n"] * 4


def host_cut(tok, ids, stops):
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n], skip_special_tokens=True)
        if any(s in text for s in stops):
            return n
    return None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tokenization.load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def unicode_tok(tmp_path_factory):
    """A byte-level BPE trained on text with accents, CJK and symbols: its merges make tokens
    that end or start inside a character."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=330, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("unicode")
    fast.save_pretrained(str(path))
    return tokenization.load_tokenizer(path)


def random_cases(tok, rng, n, stops_from_text):
    """n (ids, stops): random ids (specials among them), stops cut from their own text
    (across token boundaries, inside one token) or from text they may not hold."""
    vocab = len(tok)
    for _ in range(n):
        ids = rng.integers(0, vocab, int(rng.integers(1, 30))).tolist()
        text = tok.decode(ids, skip_special_tokens=True)
        stops = []
        for _ in range(int(rng.integers(1, 4))):
            if text and rng.random() < 0.7:
                a = int(rng.integers(0, len(text)))
                piece = text[a:a + int(rng.integers(1, 6))]
                if piece and "\ufffd" not in piece:
                    stops.append(piece)
            else:
                stops.append(stops_from_text[int(rng.integers(len(stops_from_text)))])
        if stops:
            yield ids, tuple(dict.fromkeys(stops))


@pytest.mark.parametrize("which", ["tiny", "unicode_tok"])
def test_the_tables_cut_where_the_host_check_cuts(which, request):
    tok = request.getfixturevalue(which)
    tb = stop_match.token_bytes(tok)
    assert tb is not None and len(tb) == len(tok)
    assert all(tb[i] is None for i in tok.all_special_ids)
    rng = np.random.default_rng(0)
    seen = {"cut": 0, "none": 0, "multi_token": 0}
    for ids, stops in random_cases(tok, rng, 300, ["\ndef ", "return", "é", "数", "✓", "zz"]):
        want = host_cut(tok, ids, stops)
        assert stop_match.build(stops, tb).first_stop(ids) == want, (ids, stops)
        seen["cut" if want else "none"] += 1
        if want and not any(s in tok.decode(ids[want - 1:want], skip_special_tokens=True)
                            for s in stops):
            seen["multi_token"] += 1  # the stop string spans tokens
    assert min(seen.values()) >= 20, seen


def test_a_token_with_part_of_a_character_is_matched_by_bytes(unicode_tok):
    tb = stop_match.token_bytes(unicode_tok)
    partial = [i for i, b in enumerate(tb) if b is not None and not stop_match._is_utf8(b)]
    assert partial, "the corpus should give tokens that split a character"
    # A stop string ending in the middle of a token, and one made of two halves of tokens.
    ids = unicode_tok.encode("print('数据', 'données')\n", add_special_tokens=False)
    for stop in ("数据", "'données'", "据'", "ée"):
        assert stop_match.build((stop,), tb).first_stop(ids) == host_cut(unicode_tok, ids,
                                                                         (stop,)) is not None


def test_special_tokens_leave_the_state_where_it_was(tiny):
    tb = stop_match.token_bytes(tiny)
    tables = stop_match.build(("return x",), tb)
    ids = tiny.encode("return x", add_special_tokens=False)
    eos = tiny.convert_tokens_to_ids("<|im_end|>")
    spliced = ids[:1] + [eos] + ids[1:]
    assert host_cut(tiny, spliced, ("return x",)) == tables.first_stop(spliced) == len(spliced)


def test_overlapping_and_nested_stop_strings(tiny):
    """Aho-Corasick's failure links: a stop string that is a suffix of a partial match of
    another ("abab" / "bac"), and one inside another."""
    tb = [bytes([b]) for b in range(256)]
    tables = stop_match.build(("abac", "bab", "c"), tb)
    for text, want in (("ababac", 4), ("abac", 4), ("xxc", 3), ("aba", None), ("ac", 2)):
        assert tables.first_stop(list(text.encode())) == want, text
    alone = stop_match.build(("abac",), tb)  # "aba" + "b" falls back to "ab", then "ac"
    assert alone.first_stop(list(b"ababac")) == 6 and alone.first_stop(list(b"abab")) is None


def test_tokenizers_whose_text_is_not_their_bytes_get_no_tables(tiny, tmp_path):
    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    assert stop_match.token_bytes(fast) is None
    tiny.clean_up_tokenization_spaces = True
    try:
        assert stop_match.token_bytes(tiny) is None
    finally:
        tiny.clean_up_tokenization_spaces = False


def test_bad_stop_strings_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        stop_match.build(("x", ""), [b"x"])
    with pytest.raises(ValueError, match="non-empty"):
        stop_match.build((), [b"x"])


def test_tables_for_a_qwen_sized_vocabulary():
    """151,646 tokens (the size of Qwen2.5's vocabulary): pieces of the stop strings and
    random printable ones of 1-16 bytes. On rows drawn mostly from the pieces, the tables
    agree with a byte-by-byte search."""
    rng = np.random.default_rng(1)
    pieces = [b"\n", b"def", b" ", b"\nde", b"f ", b"class", b"\nif", b" __name__", b"print",
              b"(", b"#", b"\n#", b"x", b"\n\n", b"cl", b"ass "]
    vocab = pieces + [bytes(rng.integers(32, 127, int(rng.integers(1, 17))).astype(np.uint8))
                      for _ in range(151_646 - len(pieces))]
    stops = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
    tables = stop_match.build(stops, vocab)
    assert tables.table.shape == (sum(map(len, stops)) + 1 - 4, 151_646)  # one shared "\n"
    hits = 0
    for _ in range(300):
        ids = [int(rng.integers(len(pieces))) if rng.random() < 0.8 else
               int(rng.integers(len(vocab))) for _ in range(12)]
        want = next((n for n in range(1, len(ids) + 1)
                     if any(s.encode() in b"".join(vocab[i] for i in ids[:n]) for s in stops)),
                    None)
        assert tables.first_stop(ids) == want, ids
        hits += want is not None
    assert 30 <= hits <= 270, hits

