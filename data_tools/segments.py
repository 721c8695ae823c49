"""Error-point localisation and pair selection (METHOD.md section 2, phase 3).

For a (chosen, rejected) pair of token sequences:

* ``prefix_len`` = length of the longest common prefix;
* ``suffix_len`` = length of the longest common suffix, capped so that it never overlaps the
  prefix in either sequence: ``suffix_len <= min(len_chosen, len_rejected) - prefix_len``;
* the mids are what remains: ``chosen[prefix_len : len_chosen - suffix_len]`` and the same for
  rejected. One of the two mids may be empty (an insertion or a deletion).

Granularity [open]: token ids of the tokenised responses (default), so the chosen and the
rejected prefix are the same token ids at the same positions and their log-probs cancel
exactly. Optional line snapping moves the prefix end back, and the suffix start forward, to a
*line boundary*: a token position j that is 0, the end of the sequence, or follows a token whose
text contains a newline. A boundary must hold in both sequences. Snapping only grows mids.

Pair selection [paper + open]: among (correct, incorrect) code pairs of one problem, maximise
``Diff = rank_diff + lam * common_frac`` where

* ``rank_diff = (rank[rejected] - rank[chosen]) / (k - 1)`` with ``rank`` the 0-based position
  in the ranker's ordering (0 = best) and k the number of real codes of the problem, so it lies
  in [-1, 1] (1 when the best code is paired with the worst);
* ``common_frac = (prefix_len + suffix_len) / max(len_chosen, len_rejected)`` in [0, 1];
* ``lam = 1.0`` by default. Ties in Diff go to the lower (chosen, rejected) sample indices.

Instruct responses: ``seqs`` are then the tokens of each response's *code span* (the block
the extractor chose; prose and fences around it differ freely between samples, so a common
suffix over whole responses would shrink to nothing). The tokens before and after the span
get their own segments, LEAD and TRAIL (:func:`segment_ids`), and ``too_long`` is judged on
the whole responses (``response_lens``).

Candidate pairs are filtered, each with a counted reason: ``identical_programs`` (same token
sequence: nothing to prefer), ``empty_chosen_mid`` (the chosen side would have no focused
tokens), ``too_long`` (prompt + the longer response does not fit in the record length). A
problem yields no pair with reason ``no_correct_code`` / ``no_incorrect_code``, or, when every
candidate was filtered, with the reason of its highest-Diff candidate.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fdpo.records import Segment

DEFAULT_LAMBDA = 1.0
# Candidate- and problem-level drop reasons, in one place so counts use consistent names.
NO_CORRECT = "no_correct_code"
NO_INCORRECT = "no_incorrect_code"
IDENTICAL = "identical_programs"
EMPTY_CHOSEN_MID = "empty_chosen_mid"
TOO_LONG = "too_long"


def common_prefix_suffix(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """(prefix_len, suffix_len) of two sequences; the suffix never overlaps the prefix."""
    a, b = np.asarray(a), np.asarray(b)
    n = min(len(a), len(b))
    neq = np.nonzero(a[:n] != b[:n])[0]
    p = int(neq[0]) if len(neq) else n
    room = n - p  # the suffix may use only tokens after the prefix, in both sequences
    if room == 0:
        return p, 0
    ra, rb = a[len(a) - room:][::-1], b[len(b) - room:][::-1]
    neq = np.nonzero(ra != rb)[0]
    s = int(neq[0]) if len(neq) else room
    return p, s


def pairwise_prefix_suffix(rows: Sequence[np.ndarray], cols: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Prefix and suffix lengths for every (row, col) pair at once: two ``[R, K]`` int arrays.

    Same definition as :func:`common_prefix_suffix`, vectorised over the pairs of one problem.
    """
    R, K = len(rows), len(cols)
    if R == 0 or K == 0:
        return np.zeros((R, K), np.int64), np.zeros((R, K), np.int64)
    len_r = np.array([len(x) for x in rows])
    len_c = np.array([len(x) for x in cols])
    W = max(len_r.max(), len_c.max(), 1)

    def pad(seqs, right):
        out = np.full((len(seqs), W), -1, np.int64)
        for i, x in enumerate(seqs):
            if len(x):
                if right:
                    out[i, W - len(x):] = x
                else:
                    out[i, :len(x)] = x
        return out

    n = np.minimum(len_r[:, None], len_c[None, :])
    eq = pad(rows, False)[:, None, :] == pad(cols, False)[None, :, :]
    # Length of the leading run of matches; padding (-1 on both sides) is cut off by n.
    p = np.minimum(np.cumprod(eq, axis=-1).sum(-1), n)
    eq = (pad(rows, True)[:, None, ::-1] == pad(cols, True)[None, :, ::-1])
    s = np.minimum(np.cumprod(eq, axis=-1).sum(-1), n - p)
    return p.astype(np.int64), s.astype(np.int64)


def line_boundaries(newline_flags: Sequence[bool]) -> np.ndarray:
    """bool[len + 1]: position j is a line boundary (0, the end, or after a newline token)."""
    flags = np.asarray(newline_flags, bool)
    out = np.ones(len(flags) + 1, bool)
    out[1:-1] = flags[:-1]
    return out


def newline_flags_from_offsets(text: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per-token newline flags from character offsets (``(start, end)`` per token into ``text``,
    e.g. a fast tokenizer's ``offset_mapping``): a token is flagged when its span holds a newline.
    """
    nl = np.zeros(len(text) + 1, np.int64)
    nl[1:] = np.cumsum([ch == "\n" for ch in text])  # nl[i] = newlines in text[:i]
    off = np.asarray(offsets, np.int64).reshape(-1, 2)
    if off.size and (off.min() < 0 or off.max() > len(text)):
        raise ValueError(f"token offsets outside the text of length {len(text)}")
    return nl[off[:, 1]] > nl[off[:, 0]]


def snap_to_lines(prefix_len: int, suffix_len: int, bound_a: np.ndarray, bound_b: np.ndarray) -> tuple[int, int]:
    """Moves the prefix end back and the suffix start forward to boundaries in both sequences.

    ``bound_a``, ``bound_b`` come from :func:`line_boundaries` (length ``len + 1``).
    """
    len_a, len_b = len(bound_a) - 1, len(bound_b) - 1
    ok = bound_a[:prefix_len + 1] & bound_b[:prefix_len + 1]
    p = int(np.nonzero(ok)[0][-1])  # position 0 is always a boundary
    s = suffix_len
    if s:
        ok = bound_a[len_a - s:] & bound_b[len_b - s:]  # the ends are boundaries: never empty
        s -= int(np.argmax(ok))
    return p, s


@dataclasses.dataclass(frozen=True)
class Pair:
    chosen: int  # sample index of the chosen (correct) code
    rejected: int  # sample index of the rejected (incorrect) code
    prefix_len: int
    suffix_len: int
    chosen_len: int
    rejected_len: int
    rank_diff: float
    common_frac: float
    diff: float

    @property
    def chosen_mid_len(self) -> int:
        return self.chosen_len - self.prefix_len - self.suffix_len

    @property
    def rejected_mid_len(self) -> int:
        return self.rejected_len - self.prefix_len - self.suffix_len


@dataclasses.dataclass
class Selection:
    pairs: list[Pair]
    drop_reason: str | None  # set when `pairs` is empty
    filtered: dict[str, int]  # candidate pairs removed, by reason


def select_pairs(seqs: Sequence[np.ndarray], ranks: Sequence[int], correct: Sequence[bool],
                 incorrect: Sequence[bool], *, lam: float = DEFAULT_LAMBDA, max_pairs: int = 1,
                 max_response_len: int | None = None, newline_flags: Sequence[np.ndarray] | None = None,
                 snap_lines: bool = False, response_lens: Sequence[int] | None = None) -> Selection:
    """Picks up to ``max_pairs`` (correct, incorrect) pairs of one problem by highest Diff.

    ``seqs[i]`` are the token ids of code i's response, ``ranks[i]`` its 0-based rank among the
    problem's k real codes, ``correct``/``incorrect`` its verdict. ``max_response_len`` is the
    room left after the prompt in a record; ``newline_flags[i]`` (one bool per token) is needed
    for ``snap_lines``. ``response_lens[i]``: the whole response's length when ``seqs`` are code
    spans (default ``len(seqs[i])``), for the ``too_long`` filter.
    """
    correct = np.asarray(correct, bool)
    incorrect = np.asarray(incorrect, bool)
    ci, ri = np.nonzero(correct)[0], np.nonzero(incorrect)[0]
    if len(ci) == 0:
        return Selection([], NO_CORRECT, {})
    if len(ri) == 0:
        return Selection([], NO_INCORRECT, {})
    if snap_lines and newline_flags is None:
        raise ValueError("snap_lines needs newline_flags for every sequence")
    k = len(seqs)
    ranks = np.asarray(ranks, np.int64)
    P, S = pairwise_prefix_suffix([seqs[i] for i in ci], [seqs[j] for j in ri])
    lens = np.array([len(x) for x in seqs])
    full = lens if response_lens is None else np.asarray(response_lens, np.int64)
    bounds = [line_boundaries(f) for f in newline_flags] if snap_lines else None
    candidates = []
    for a, i in enumerate(ci):
        for b, j in enumerate(ri):
            p, s = int(P[a, b]), int(S[a, b])
            if snap_lines:
                p, s = snap_to_lines(p, s, bounds[i], bounds[j])
            longest = max(lens[i], lens[j])
            common = (p + s) / longest if longest else 1.0
            rd = (ranks[j] - ranks[i]) / max(k - 1, 1)
            candidates.append(Pair(int(i), int(j), p, s, int(lens[i]), int(lens[j]), float(rd),
                                   float(common), float(rd + lam * common)))
    candidates.sort(key=lambda c: (-c.diff, c.chosen, c.rejected))
    filtered: dict[str, int] = {}
    kept: list[Pair] = []
    first_reason = None
    for c in candidates:
        room = max_response_len
        if room is not None:  # only what the whole responses exceed counts
            room += max(c.chosen_len, c.rejected_len) - max(full[c.chosen], full[c.rejected])
        reason = candidate_reason(c, room)
        if reason is not None:
            filtered[reason] = filtered.get(reason, 0) + 1
            first_reason = first_reason or reason
            continue
        if len(kept) < max_pairs:
            kept.append(c)
    return Selection(kept, None if kept else first_reason, filtered)


def candidate_reason(c: Pair, max_response_len: int | None) -> str | None:
    """The filter that removes candidate pair ``c``, or None when it is kept."""
    if c.chosen_len == c.rejected_len and c.prefix_len == c.chosen_len:
        return IDENTICAL
    if c.chosen_mid_len == 0:
        return EMPTY_CHOSEN_MID
    if max_response_len is not None and max(c.chosen_len, c.rejected_len) > max_response_len:
        return TOO_LONG
    return None


def segment_ids(prompt_len: int, response_len: int, prefix_len: int, suffix_len: int, max_len: int,
                lead_len: int = 0, trail_len: int = 0) -> np.ndarray:
    """int8[max_len]: PROMPT, LEAD, PREFIX, MID, SUFFIX, TRAIL, then PAD, for one side of a pair.

    ``response_len`` counts every response token; ``lead_len`` / ``trail_len`` tokens before /
    after the code span (0 for completions, whose response is all code).
    """
    mid = response_len - lead_len - trail_len - prefix_len - suffix_len
    if min(prompt_len, prefix_len, suffix_len, mid, lead_len, trail_len) < 0:
        raise ValueError(f"inconsistent segment lengths: response {response_len}, lead {lead_len}, "
                         f"prefix {prefix_len}, suffix {suffix_len}, trail {trail_len}")
    total = prompt_len + response_len
    if total > max_len:
        raise ValueError(f"prompt {prompt_len} + response {response_len} tokens exceed max_len {max_len}")
    out = np.zeros(max_len, np.int8)
    out[:prompt_len] = Segment.PROMPT
    o = prompt_len
    out[o:o + lead_len] = Segment.LEAD
    o += lead_len
    out[o:o + prefix_len] = Segment.PREFIX
    o += prefix_len
    out[o:o + mid] = Segment.MID
    o += mid
    out[o:o + suffix_len] = Segment.SUFFIX
    o += suffix_len
    out[o:o + trail_len] = Segment.TRAIL
    return out


# ------------------------------------------------------------------ focus controls
# Controls of the focusing study (docs/data.md): the same pairs, the same tokens, only the
# segment ids moved, so that a weight table puts its weight elsewhere.
NO_RANDOM_SPAN = "no_random_span"  # random focus: no equal-length span outside the mid


def focus_rng(seed: int, pair_id: int, stream: int) -> np.random.Generator:
    """The generator of one pair's draw: streams 0 / 1 for the chosen / rejected side's
    random span, 2 for the label shuffle. Keyed by the pair's own id (its input line), so a
    pair draws the same whatever the sharding or the other pairs."""
    return np.random.default_rng([seed, pair_id, stream])


def random_focus(segments: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """One side's segment ids with its MID moved to a random span elsewhere (a control).

    Rule: let the side's mid (the divergent tokens) be m tokens. The new MID is a span of m
    consecutive tokens lying wholly inside the side's common prefix or wholly inside its
    common suffix (never in the prompt, LEAD, TRAIL or the mid itself), its start drawn
    uniformly among all such spans. The true mid tokens take the class the decoy span had
    (PREFIX or SUFFIX): the labels are a permutation of the original ones, so every class
    keeps its token count and a weight table puts the same weight mass on the side, only on
    other tokens (tables with equal weights, like DPO's, are unchanged). A side with m = 0
    (an insertion on the other side) is returned as it is. None when no span fits (prefix
    and suffix both shorter than m).
    """
    seg = np.asarray(segments)
    mid = np.nonzero(seg == Segment.MID)[0]
    if len(mid) == 0:
        return seg.copy()
    m, m0 = len(mid), int(mid[0])
    starts = []
    for cls in (Segment.PREFIX, Segment.SUFFIX):
        pos = np.nonzero(seg == cls)[0]
        if len(pos) >= m:  # each class is one contiguous run before / after the mid
            starts += [(int(a), cls) for a in pos[:len(pos) - m + 1]]
    if not starts:
        return None
    a, cls = starts[int(rng.integers(len(starts)))]
    out = seg.copy()
    out[m0:m0 + m] = cls
    out[a:a + m] = Segment.MID
    return out
