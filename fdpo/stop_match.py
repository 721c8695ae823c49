"""Stop strings matched token by token, as a table a sampler could read on the device.

Not used by the sampler yet: wired into both decode loops (2026-12-08) it passed the
single-process tests, but a 2-process `launch.evaluate` (tests/launch/
test_pipeline_multihost.py) then hung, its processes in different collectives, with no
stop strings in play (the loops' carry had gained the automaton's state); taken out until
that is understood.

The sampler's host check (`fdpo.sampling.Sampler`) decodes a row's tokens every
`stop_check_steps` steps and looks for the stop strings in the text. Where a tokenizer's
text is the concatenation of its tokens' bytes (byte-level BPE: Qwen2.5-Coder,
DeepSeek-Coder, the tests' tiny tokenizers), the same question has an exact answer one
token at a time: an Aho-Corasick automaton over the stop strings' UTF-8 bytes, whose state
after a row's tokens is the longest tail of their bytes that begins some stop string. Its
transitions, composed over each token's bytes, give two tables of [states, vocabulary]:
the state after a token, and whether a stop string ends inside that token. One gather per
step then tells, for every row, whether the token just drawn completes a stop string; the
first such token is the one the host check would cut after (the fewest leading tokens
whose text holds a stop string).

Bytes, not text: a stop string's bytes occur in a row's bytes exactly when the string
occurs in its text decoded with replacement characters (a stop string is valid UTF-8 and
starts on a character boundary, so an incomplete character before it decodes to U+FFFD and
the decoder resynchronises on its first byte). Special tokens decode to nothing
(`skip_special_tokens=True`, as `fdpo.policy.Policy.decode`) and leave the state as it is.

A stop string holding U+FFFD has no bytes to match (the character stands in the text for
bytes that are no whole character): such a set has to stay with the host check.
`token_bytes(tokenizer)` returns None where that does not hold (another decoder, clean-up
of tokenization spaces, a token whose bytes do not decode to what the tokenizer decodes it
to); the sampler then keeps the host check. Tables for a 151,646-token vocabulary and
the usual code stop strings (30 states) are 30 x 151,646 int32 (18 MB; 0.6 s to build).
"""
from __future__ import annotations

import dataclasses
import json
from collections import deque
from typing import Sequence

import numpy as np


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character map (GPT-2's: printable
    Latin-1 bytes stand for themselves, the other 68 bytes for characters from U+0100)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_types(node) -> list[str]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [t for d in node.get("decoders", []) for t in _decoder_types(d)]
    return [node.get("type")]


def token_bytes(tokenizer) -> list[bytes | None] | None:
    """Each id's bytes (None: a special token, which decodes to nothing), or None when the
    tokenizer's decoding is not the concatenation of such bytes (module docstring).
    `tokenizer`: a transformers fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    if _decoder_types(json.loads(backend.to_str()).get("decoder")) != ["ByteLevel"]:
        return None
    to_byte = _byte_decoder()
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in special:
            out.append(None)
        elif piece is None or any(ch not in to_byte for ch in piece):
            return None
        else:
            out.append(bytes(to_byte[ch] for ch in piece))
    # Checked against the tokenizer itself: every token on its own, where its bytes are
    # whole characters (a token holding part of a character decodes to U+FFFD either way).
    ids = [i for i, b in enumerate(out) if b is not None and _is_utf8(b)]
    decoded = backend.decode_batch([[i] for i in ids], skip_special_tokens=True)
    if any(d != out[i].decode("utf-8") for i, d in zip(ids, decoded)):
        return None
    return out


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class StopTables:
    """`table[state, token]` = 2 * next state + (1 if a stop string ends in the token's
    bytes); state 0 is a row's start (no bytes yet)."""
    table: np.ndarray   # [states, vocab] int32
    stops: tuple[str, ...]

    @property
    def num_states(self) -> int:
        return self.table.shape[0]

    def first_stop(self, tokens: Sequence[int]) -> int | None:
        """The fewest leading tokens that hold a stop string (host-side, for checks)."""
        state = 0
        for n, t in enumerate(tokens, 1):
            v = int(self.table[state, t])
            if v & 1:
                return n
            state = v >> 1
        return None


def _automaton(patterns: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Aho-Corasick over bytes: (goto [states, 256] int32, accept [states] bool), the goto
    completed with the failure links so every (state, byte) has one next state."""
    goto = [dict()]
    accept = [False]
    for p in patterns:
        s = 0
        for byte in p:
            if byte not in goto[s]:
                goto.append({})
                accept.append(False)
                goto[s][byte] = len(goto) - 1
            s = goto[s][byte]
        accept[s] = True
    n = len(goto)
    table = np.zeros((n, 256), np.int32)
    fail = [0] * n
    queue = deque()
    for byte in range(256):
        if byte in goto[0]:
            table[0, byte] = goto[0][byte]
            queue.append(goto[0][byte])
    while queue:  # breadth first: a state's failure target is done before it
        s = queue.popleft()
        accept[s] = accept[s] or accept[fail[s]]
        for byte in range(256):
            if byte in goto[s]:
                nxt = goto[s][byte]
                fail[nxt] = table[fail[s], byte]
                table[s, byte] = nxt
                queue.append(nxt)
            else:
                table[s, byte] = table[fail[s], byte]
    return table, np.asarray(accept)


def build(stops: Sequence[str], tokens: Sequence[bytes | None]) -> StopTables:
    """The tables for `stops` over a vocabulary whose id i has bytes `tokens[i]` (None:
    decodes to nothing)."""
    stops = tuple(stops)
    if not stops or any(not s for s in stops):
        raise ValueError(f"stop strings {stops!r}: expected one or more non-empty strings")
    goto, accept = _automaton([s.encode("utf-8") for s in stops])
    n, vocab = goto.shape[0], len(tokens)
    lengths = np.array([0 if b is None else len(b) for b in tokens])
    order = np.argsort(-lengths, kind="stable")  # longest first: a prefix stays active
    width = int(lengths.max(initial=0))
    mat = np.zeros((vocab, max(width, 1)), np.uint8)
    for i, b in enumerate(tokens):
        if b:
            mat[i, :len(b)] = np.frombuffer(b, np.uint8)
    mat, sorted_len = mat[order], lengths[order]
    state = np.broadcast_to(np.arange(n, dtype=np.int32)[:, None], (n, vocab)).copy()
    hit = np.zeros((n, vocab), bool)
    for pos in range(width):
        k = int(np.searchsorted(-sorted_len, -pos, side="left"))  # tokens longer than pos
        if k == 0:
            break
        nxt = goto[state[:, :k], mat[None, :k, pos]]
        state[:, :k] = nxt
        hit[:, :k] |= accept[nxt]
    table = np.empty((n, vocab), np.int32)
    table[:, order] = 2 * state + hit
    return StopTables(table, stops)
