"""The Focused-DPO loss family, as small pure functions (METHOD.md section 3).

Shapes: `B` pairs; side axis `2` = (chosen, rejected); segment axis `5` = (prefix, mid,
suffix, lead, trail), the row/column order of `fdpo.records.PairRecord.ref_logps`. All sums
are float32. `lead` and `trail` are the tokens before and after the code span of an instruct
response (prose, fences, the EOS after fenced code; docs/data.md); completion-format records
have none, so their weights change nothing there.

    S_pi, S_ref            [B, 2, 5]  per-segment sums of per-token log-probs
    h   = sum_seg W[c] (S_pi[c] - S_ref[c]) - sum_seg W[r] (S_pi[r] - S_ref[r])   [B]
    sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    ipo:     (h - 1 / (2 beta))^2
    hinge:   max(0, 1 - beta h)

DPOP (`dpop_lambda` > 0, sigmoid only) subtracts `dpop_lambda * max(0, -dc)` from h inside
the sigmoid, dc = the chosen response's log-ratio (whole response by default; `dpop_weighted`:
the chosen side's weighted sum). `length_normalize` (ipo only) divides each side's weighted
log-ratio by that side's response tokens before taking h, as TRL's IPO does.

plus `nll_weight` x the mean negative log-likelihood per chosen response token (RPO; the
`sft` preset is that term alone): `-sum_B S_pi[chosen].sum() / (chosen response tokens)`, from
the same per-pair `logps_chosen` the metrics report. The rewards reported are
`beta * W (S_pi - S_ref)`.

Token-level DPO (`tdpo1`, `tdpo2`; Zeng et al., "Token-level Direct Preference
Optimization", ICML 2024, arXiv 2404.11999, eqs. for TDPO1/TDPO2, checked against the
authors' `tdpo_loss` in github.com/Vance0124/Token-level-Direct-Preference-Optimization,
trainers.py): with K [B, 2, 5] the per-segment sums of the per-position
KL(p_ref(. | ctx_t) || p_theta(. | ctx_t)) over response tokens (`logprobs.
target_logprobs_and_kl`) and `KL_c, KL_r = sum_seg Wkl (K)` per side,

    tdpo1:  -log sigmoid(beta (h - (KL_r - KL_c)))
    tdpo2:  -log sigmoid(beta (h - alpha (KL_r - stopgrad(KL_c))))      alpha = 0.5

(label smoothing applies as to `sigmoid`). `Wkl` (`kl_weights`, default all 1: the paper's
sequential KL) weights the KL per segment: "focused TDPO" (e.g. only the mid segments).
The KL needs the reference's whole distribution at each position, so TDPO runs only with
the frozen reference in the step, never with precomputed [2, 5] sums.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fdpo import logprobs
from fdpo.records import RESPONSE_SEGMENTS

Array = jax.Array
log = logging.getLogger("fdpo.loss")
TDPO_TYPES = ("tdpo1", "tdpo2")  # Token-level DPO (module docstring)
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "none") + TDPO_TYPES
SEGMENT_NAMES = ("prefix", "mid", "suffix", "lead", "trail")
NUM_SEGMENTS = len(SEGMENT_NAMES)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # sigmoid only: conservative DPO
    # W[side][segment]: rows (chosen, rejected), columns (prefix, mid, suffix, lead, trail).
    # Three columns are accepted and extended by `full_weights` (lead as prefix, trail as
    # suffix).
    weights: tuple[tuple[float, ...], tuple[float, ...]] = (
        (1.0, 2.0, 1.0, 1.0, 1.0), (1.0, 1.0, 0.0, 1.0, 0.0))
    nll_weight: float = 0.0  # RPO: + nll_weight * mean NLL per chosen response token
    # DPOP (Pal et al. 2024): lambda of the chosen-below-reference penalty; 0 = off.
    dpop_lambda: float = 0.0
    # The penalty on W[chosen] . (S_pi - S_ref) instead of the whole chosen response (paper).
    dpop_weighted: bool = False
    # IPO per response token (TRL): each side's log-ratio / its response token count.
    length_normalize: bool = False
    tdpo_alpha: float = 0.5  # tdpo2: weight of the KL term (tdpo1 has none)
    # tdpo1/tdpo2: KL weights per side x segment like `weights` (2 x 3 or 2 x 5); None: all 1.
    kl_weights: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}; expected one of {LOSS_TYPES}")
        if np.shape(self.weights) not in ((2, 3), (2, NUM_SEGMENTS)):
            raise ValueError(f"weights must be 2 x 5 (side x segment) or 2 x 3, got "
                             f"{self.weights}")
        object.__setattr__(self, "weights", full_weights(self.weights))
        if self.loss_type != "none" and not self.beta > 0:
            raise ValueError(f"beta={self.beta} must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.loss_type == "none" and self.nll_weight == 0:
            raise ValueError("loss_type='none' with nll_weight=0 leaves nothing to train")
        if not self.dpop_lambda >= 0:
            raise ValueError(f"dpop_lambda={self.dpop_lambda} must be >= 0")
        if self.dpop_lambda and self.loss_type != "sigmoid":
            raise ValueError(f"dpop_lambda={self.dpop_lambda} needs loss_type='sigmoid' (DPOP "
                             f"is defined on the DPO loss), got {self.loss_type!r}")
        if self.length_normalize and self.loss_type != "ipo":
            raise ValueError(f"length_normalize=True needs loss_type='ipo' (TRL's "
                             f"length-normalised IPO), got {self.loss_type!r}")
        if self.kl_weights is not None:
            if np.shape(self.kl_weights) not in ((2, 3), (2, NUM_SEGMENTS)):
                raise ValueError(f"kl_weights must be 2 x 5 (side x segment) or 2 x 3, got "
                                 f"{self.kl_weights}")
            object.__setattr__(self, "kl_weights", full_weights(self.kl_weights))
        if not np.isfinite(self.tdpo_alpha) or self.tdpo_alpha < 0:
            raise ValueError(f"tdpo_alpha={self.tdpo_alpha} must be >= 0")

    @property
    def is_tdpo(self) -> bool:
        """The loss needs the per-position KL (so the reference's full distribution)."""
        return self.loss_type in TDPO_TYPES

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "none"

    @property
    def trunk_cancels(self) -> bool:
        """The trunk's log-probs (the prompt, lead and common prefix both sides share: equal
        on both sides) cancel in h and nothing else reads them, so they get no gradient:
        a preference loss linear in h's sums, the same prefix and lead weight on both sides,
        no per-side term (NLL, DPOP's penalty, length normalisation, TDPO's KL)."""
        w = self.weights
        return (self.loss_type in ("sigmoid", "ipo", "hinge") and self.nll_weight == 0 and
                self.dpop_lambda == 0 and not self.length_normalize and
                w[0][0] == w[1][0] and w[0][3] == w[1][3])


def full_weights(weights) -> tuple[tuple[float, ...], ...]:
    """A 2 x 3 table (prefix, mid, suffix) extended to 2 x 5: each side's lead (tokens before
    the code span) weighted as its prefix, its trail (after the code span) as its suffix, so
    a table means on instruct responses what it means on completions, where the code starts
    the response and ends it. A 2 x 5 table is returned as it is."""
    rows = tuple(tuple(float(w) for w in row) for row in weights)
    return tuple(r + (r[0], r[2]) if len(r) == 3 else r for r in rows)


def weight_table(preset: str, w_focused: float = 2.0) -> tuple[tuple[float, ...], ...]:
    """The paper's weight tables (METHOD.md section 3) by name, 2 x 5 (`full_weights`)."""
    tables = {
        "focused_dpo": ((1.0, w_focused, 1.0), (1.0, 1.0, 0.0)),
        "dpo": ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
        "mid_only": ((0.0, 1.0, 0.0), (0.0, 1.0, 0.0)),
        "target_dpo_like": ((1.0, 1.0, 1.0), (0.0, 1.0, 0.0)),
        "sft": ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        "dpo_nll": ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
        "dpop": ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
        "ipo_length_norm": ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
    }
    preset = _undeprecated(preset)
    if preset in TDPO_TYPES:  # Token-level DPO: the DPO table plus the KL term
        preset = "dpo"
    if preset not in tables:
        raise KeyError(f"unknown loss preset {preset!r}; known: {sorted(tables)}")
    return full_weights(tables[preset])


PRESETS = ("focused_dpo", "dpo", "mid_only", "target_dpo_like", "sft", "dpo_nll", "dpop",
           "ipo_length_norm")
# Old preset names still accepted, with a warning: {old: new}. `step_dpo_like` was renamed
# because it is not Step-DPO (which localises the first wrong step by rollouts): it is DPO
# on the mid segments of Focused-DPO's pairs.
DEPRECATED_PRESETS = {"step_dpo_like": "mid_only"}
# RPO's NLL weight (Pang et al. 2024, arXiv 2404.19733: alpha = 1) and DPOP's lambda (Pal et
# al. 2024, arXiv 2402.13228: 50 in their experiments) in their presets.
DPO_NLL_WEIGHT = 1.0
DPOP_LAMBDA = 50.0


def _undeprecated(name: str) -> str:
    if name in DEPRECATED_PRESETS:
        new = DEPRECATED_PRESETS[name]
        log.warning("loss preset %r is deprecated: it is %r (mid-segment-only DPO), not "
                    "Step-DPO; use %r", name, new, new)
        return new
    return name


def preset(name: str, *, w_focused: float = 2.0, **overrides: Any) -> LossConfig:
    """A LossConfig by name (docs/training.md has the table):

    `focused_dpo`, `dpo`, `mid_only` (mid segments only; `step_dpo_like` is its deprecated
    name), `target_dpo_like`, `sft` (NLL only), `dpo_nll` (DPO + NLL on the chosen response:
    RPO), `dpop` (DPO-Positive), `ipo_length_norm` (IPO on per-token log-ratios, as TRL).
    """
    name = _undeprecated(name)
    fields: dict[str, Any] = {"weights": weight_table(name, w_focused)}
    if name == "sft":
        fields.update(loss_type="none", nll_weight=1.0)
    elif name == "dpo_nll":
        fields.update(nll_weight=DPO_NLL_WEIGHT)
    elif name == "dpop":
        fields.update(dpop_lambda=DPOP_LAMBDA)
    elif name == "ipo_length_norm":
        fields.update(loss_type="ipo", length_normalize=True)
    elif name in TDPO_TYPES:
        fields.update(loss_type=name)
    fields.update(overrides)
    return LossConfig(**fields)


def from_config(c: Mapping[str, Any]) -> LossConfig:
    """The LossConfig of a run config's `loss` section (configs/focused_dpo.py): the preset's
    table and loss type, with `weights`, `loss_type`, `nll_weight`, `dpop_lambda` and
    `length_normalize` replacing the preset's where they are set (not None), and
    `dpop_weighted`. `weights` is `((cp, cm, cs), (rp, rm, rs))` (lead and
    trail then follow prefix and suffix) or `((cp, cm, cs, cl, ct), (rp, rm, rs, rl, rt))`."""
    overrides: dict[str, Any] = dict(beta=c["beta"], label_smoothing=c["label_smoothing"])
    if c.get("dpop_weighted") is not None:
        overrides["dpop_weighted"] = c["dpop_weighted"]
    for key in ("loss_type", "nll_weight", "dpop_lambda", "length_normalize"):
        if c.get(key) is not None:
            overrides[key] = c[key]
    if c.get("tdpo_alpha") is not None:
        overrides["tdpo_alpha"] = c["tdpo_alpha"]
    if c.get("kl_weights") is not None:
        overrides["kl_weights"] = _weight_rows(c["kl_weights"])
    if c["weights"] is not None:
        overrides["weights"] = _weight_rows(c["weights"])
    return preset(c["preset"], w_focused=c["w_focused"], **overrides)


def _weight_rows(weights) -> tuple[tuple[float, ...], ...]:
    expected = ("expected ((cp, cm, cs), (rp, rm, rs)) or ((cp, cm, cs, cl, ct), (rp, rm, rs, "
                "rl, rt)): rows chosen, rejected; columns prefix, mid, suffix[, lead, trail]")
    try:
        rows = tuple(tuple(float(w) for w in row) for row in weights)
    except (TypeError, ValueError) as e:
        raise ValueError(f"loss weights {weights!r}: {expected}") from e
    if len(rows) != 2 or len({len(r) for r in rows}) != 1 or len(rows[0]) not in (3, 5):
        raise ValueError(f"loss weights {weights!r}: {expected}")
    return full_weights(rows)


# ----------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------


def response_segment_sums(lp: Array, segments: Array) -> Array:
    """lp [N, T] per-token log-probs, segments [N, T] (`Segment` ids) -> [N, 5] sums.

    Only the response segments count (PREFIX, MID, SUFFIX, LEAD, TRAIL); PROMPT and PAD are
    multiplied by exactly 0.
    """
    return logprobs.segment_sums(lp, segments, RESPONSE_SEGMENTS)


def weighted_log_ratios(policy: Array, reference: Array, weights) -> Array:
    """W * (S_pi - S_ref): [B, 2, 5], float32."""
    w = jnp.asarray(weights, jnp.float32)
    return w * (policy.astype(jnp.float32) - reference.astype(jnp.float32))


def dpop_penalty(policy: Array, reference: Array, weights, weighted: bool = False) -> Array:
    """DPOP's penalty per pair [B]: max(0, log pi_ref(y_c) - log pi_theta(y_c)), in nats.

    Pal et al. 2024 ("Smaug: Fixing Failure Modes of Preference Optimisation with
    DPO-Positive", arXiv 2402.13228, eq. 3):

        L_DPOP = -log sigmoid(beta (margin - lambda max(0, log (pi_ref(y_w|x) /
                                                               pi_theta(y_w|x)))))

    with log pi(y_w|x) the whole chosen response's log-prob (the default here). With
    `weighted`, the chosen side's log-ratio is the weighted sum W[chosen] . (S_pi - S_ref)
    instead: the penalty then watches only the segments the table trains (e.g. not the
    common prefix, which focused_dpo's margin already cancels).
    """
    d = policy[:, 0].astype(jnp.float32) - reference[:, 0].astype(jnp.float32)  # [B, 5]
    if weighted:
        d = jnp.asarray(weights, jnp.float32)[0] * d
    return jax.nn.relu(-d.sum(-1))


def preference_loss(h: Array, cfg: LossConfig, penalty: Array | None = None) -> Array:
    """Per-pair loss [B] from the weighted log-ratio margin h [B] (beta not yet applied);
    `penalty` [B] (DPOP's, `dpop_penalty`) is subtracted from h times `cfg.dpop_lambda`."""
    if cfg.loss_type in ("sigmoid",) + TDPO_TYPES:  # tdpo: h already holds the KL term
        eps = cfg.label_smoothing
        if cfg.dpop_lambda and penalty is not None:
            h = h - cfg.dpop_lambda * penalty
        z = cfg.beta * h
        return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    if cfg.loss_type == "ipo":
        return jnp.square(h - 1.0 / (2.0 * cfg.beta))
    if cfg.loss_type == "hinge":
        return jax.nn.relu(1.0 - cfg.beta * h)
    return jnp.zeros_like(h)  # "none"


def pair_terms(policy: Array, reference: Array | None, cfg: LossConfig,
               lengths: Array | None = None, kl: Array | None = None) -> dict[str, Array]:
    """Everything per pair: the loss and the reward metrics, each [B] (segments [B, 5]).

    `reference` may be None when the config needs none (`sft`); rewards are then zero.
    `lengths` [B, 2]: response tokens of (chosen, rejected), needed by `length_normalize`
    only (which changes the loss, not the reward metrics: those stay sums for every loss).
    `kl` [B, 2, 5]: per-segment sums of the per-position KL, required by tdpo1/tdpo2 (and
    reported as `kl_*` terms whenever given).
    """
    if reference is None:
        if cfg.needs_reference:
            raise ValueError(f"loss_type={cfg.loss_type!r} needs reference log-probs")
        reference = policy
    ratios = weighted_log_ratios(policy, reference, cfg.weights)  # [B, 2, 5]
    seg_margins = ratios[:, 0] - ratios[:, 1]  # [B, 5]
    h = seg_margins.sum(-1)
    if cfg.length_normalize:
        if lengths is None:
            raise ValueError("length_normalize=True needs the response lengths [B, 2]")
        per_token = ratios.sum(-1) / jnp.maximum(lengths.astype(jnp.float32), 1.0)  # [B, 2]
        h = per_token[:, 0] - per_token[:, 1]
    if cfg.is_tdpo:
        h = h - tdpo_kl_penalty(kl, cfg)
    penalty = dpop_penalty(policy, reference, cfg.weights, cfg.dpop_weighted)
    beta = cfg.beta if cfg.needs_reference else 0.0
    rewards = beta * ratios.sum(-1)  # [B, 2]
    return kl_terms(kl) | {
        "dpo_loss": preference_loss(h, cfg, penalty),
        "dpop_penalty": penalty,
        "rewards_chosen": rewards[:, 0],
        "rewards_rejected": rewards[:, 1],
        "rewards_margin": rewards[:, 0] - rewards[:, 1],
        "rewards_accuracy": (rewards[:, 0] > rewards[:, 1]).astype(jnp.float32),
        "segment_margins": beta * seg_margins,
        "logps_chosen": policy[:, 0].sum(-1).astype(jnp.float32),
        "logps_rejected": policy[:, 1].sum(-1).astype(jnp.float32),
    }


def tdpo_kl_penalty(kl: Array | None, cfg: LossConfig) -> Array:
    """The KL term subtracted from the margin h [B] (module docstring), from kl [B, 2, 5]:
    tdpo1 `KL_r - KL_c`, tdpo2 `alpha (KL_r - stopgrad(KL_c))`."""
    if kl is None:
        raise ValueError(f"loss_type={cfg.loss_type!r} needs the per-position KL against a "
                         f"frozen reference (kl=None)")
    w = jnp.ones((2, NUM_SEGMENTS), jnp.float32) if cfg.kl_weights is None else \
        jnp.asarray(cfg.kl_weights, jnp.float32)
    per_side = (w * kl.astype(jnp.float32)).sum(-1)  # [B, 2]
    kl_c, kl_r = per_side[:, 0], per_side[:, 1]
    if cfg.loss_type == "tdpo1":
        return kl_r - kl_c
    return cfg.tdpo_alpha * (kl_r - jax.lax.stop_gradient(kl_c))


def kl_terms(kl: Array | None) -> dict[str, Array]:
    """Per-pair KL metrics (unweighted): per side [B] and per side x segment [B, 2, 5]."""
    if kl is None:
        return {}
    kl = kl.astype(jnp.float32)
    return {"kl_chosen": kl[:, 0].sum(-1), "kl_rejected": kl[:, 1].sum(-1),
            "kl_segments": kl}


def masked_sums(terms: dict[str, Array], mask: Array) -> dict[str, Array]:
    """Each per-pair term ([B] or [B, ...]) summed over the pairs where mask [B] is 1."""
    mask = mask.astype(jnp.float32)
    return {k: jnp.einsum("b,b...->...", mask, v) for k, v in terms.items()}


def nll(sums: dict[str, Array], num_chosen_tokens: Array) -> Array:
    """Mean negative log-likelihood per chosen response token, from `masked_sums`."""
    return -sums["logps_chosen"] / jnp.maximum(num_chosen_tokens, 1.0)


def loss_from_sums(sums: dict[str, Array], num_pairs: Array, num_chosen_tokens: Array,
                   cfg: LossConfig) -> Array:
    """Mean loss over pairs (+ RPO/SFT NLL per chosen response token), from `masked_sums`.

    The normalisers are those of the whole (global, all micro-batch) batch, so summing this
    over micro-batches gives exactly the loss of the full batch.
    """
    loss = sums["dpo_loss"] / jnp.maximum(num_pairs, 1.0)
    if cfg.nll_weight:
        loss = loss + cfg.nll_weight * nll(sums, num_chosen_tokens)
    return loss


def total_loss(terms: dict[str, Array], mask: Array, num_pairs: Array,
               num_chosen_tokens: Array, cfg: LossConfig) -> Array:
    """`loss_from_sums` of the per-pair terms of `pair_terms` under mask [B]."""
    return loss_from_sums(masked_sums(terms, mask), num_pairs, num_chosen_tokens, cfg)
