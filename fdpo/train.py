"""The train step: one `jax.jit` function over the mesh, with explicit shardings.

Layout of a step's batch (global shapes; `M` micro-batches of `b` pairs, length `L`):

    chosen_ids, rejected_ids             int32 [M, b, L]
    chosen_segments, rejected_segments   int8  [M, b, L]   (`fdpo.records.Segment` ids)
    ref_logps                            float32 [M, b, 2, 5]  (zeros unless precomputed)
    pair_mask                            float32 [M, b]    (0 for padding pairs in eval)

sharded `P(None, <batch axes>)`: every micro-batch is spread over all data-parallel
devices. Chosen and rejected run in one forward, interleaved on the batch axis (row 2i is
pair i's chosen, 2i+1 its rejected, so a pair stays on one device).

Shared rows (`Trainer(shared_length=S)`): each pair becomes one row of S tokens,
`[trunk | chosen rest | rejected rest | pad]`, where the trunk is what both sides share
(`fdpo.records.trunk_lengths`: the prompt and the common prefix, with the lead when it is
identical; `trunk=False`: the prompt only) and the model sees it once. The rejected rest
attends to the trunk and to itself only (`branch_ids`), its rope positions continue from
the trunk's end as the chosen rest's do, and its first token is scored from the trunk's
last hidden state: the same log-probs as two separate sequences. The trunk's response
tokens (the prefix) are scored once and their sums count for both sides
(`fdpo.records.side_labels`); they are equal on both sides by construction. A row holds
chosen + rejected - trunk tokens instead of 2 x L. The batch then holds `ids`,
`positions`, `branch`, `labels` (`Segment` ids), `parents` (the index of the hidden state
that scores each token), int32 [M, b, S], packed on the host by
`fdpo.records.pack_shared_prompt` (in `make_batch`, or before it: the data loader's
`fdpo.data.train_dataset(shared_length=S)`). Gradients are summed
over micro-batches by `lax.scan` with normalisers (pairs, chosen tokens) of the whole
batch, so the accumulated gradient is exactly that of the full batch.

The train state is a plain dict `{"step", "params", "opt_state"}` whose params are the
model's pure-dict parameter tree; `nnx.merge(graphdef, params)` rebuilds the model inside
the traced function. A step whose loss or gradient norm is not finite leaves the state as
it was (`metrics["finite"] == 0`); the caller stops the run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fdpo import logprobs
from fdpo import loss as loss_lib
from fdpo import mechanism as mech
from fdpo import scoring
from fdpo import sharding as shd
from fdpo.models import convert
from fdpo.models.config import ModelConfig
from fdpo.records import SHARED_KEYS, Segment, pack_shared_prompt, side_labels

Array = jax.Array
BATCH_KEYS = ("chosen_ids", "rejected_ids", "chosen_segments", "rejected_segments",
              "ref_logps", "pair_mask")
REFERENCE_MODES = ("frozen", "precomputed")
# Names of the logged per-pair means (TRL's names where TRL has the quantity).
METRIC_NAMES = {
    "dpo_loss": "dpo_loss",
    "rewards_chosen": "rewards/chosen",
    "rewards_rejected": "rewards/rejected",
    "rewards_margin": "rewards/margins",
    "rewards_accuracy": "rewards/accuracies",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
    "dpop_penalty": "dpop/penalty",  # max(0, ref - policy log-prob of chosen), nats
}


# ----------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 5e-6
    warmup_steps: int = 0
    decay: str = "cosine"  # cosine | linear | constant (after warmup)
    end_lr_ratio: float = 0.0  # final lr = lr * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled (AdamW); kernels and embeddings only
    clip_norm: float = 1.0  # global-norm clipping; 0 disables


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.decay == "linear":
        decay = optax.linear_schedule(cfg.lr, cfg.lr * cfg.end_lr_ratio, decay_steps)
    elif cfg.decay == "constant":
        decay = optax.constant_schedule(cfg.lr)
    else:
        raise ValueError(f"decay={cfg.decay!r}; expected cosine, linear or constant")
    if cfg.warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def _decay_mask(params):
    """Weight decay on matrices only: kernels, the embedding and the lm_head (layers are
    stacked, so ndim cannot tell a norm scale from a matrix; names can)."""

    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return name.endswith("kernel") or name in ("embed", "lm_head")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int):
    """(optax transformation, schedule): clip by global norm, then AdamW."""
    schedule = make_schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------------------
# Log-probs of pairs
# ----------------------------------------------------------------------------------------


def pair_segment_logps(graphdef, params, micro: dict[str, Array], chunk: int = 256,
                       capacity: int = 0, recompute: bool = True) -> Array:
    """One forward over chosen and rejected -> [b, 2, 5] (side x segment). `capacity` > 0:
    only that many response positions per row reach the unembedding (`_scored`)."""
    b, length = micro["chosen_ids"].shape
    ids = jnp.stack([micro["chosen_ids"], micro["rejected_ids"]], 1).reshape(2 * b, length)
    seg = jnp.stack([micro["chosen_segments"], micro["rejected_segments"]], 1)
    sums = scoring.sequence_segment_logps(graphdef, params, ids, seg.reshape(2 * b, length),
                                          chunk, capacity=capacity, recompute=recompute)
    return sums.reshape(b, 2, -1)


def _scored(labels: Array, capacity: int, *arrays: Array) -> tuple[Array, ...]:
    """(labels, *arrays) [N, T] at the positions whose log-probs the loss reads: all T when
    `capacity` is 0, else each row's first `capacity` response positions (labels >= PREFIX;
    filler slots labelled PAD), so prompt and padding never reach the LM head. The caller
    guarantees no row has more (`Trainer.make_batch` checks)."""
    if not capacity:
        return (labels,) + arrays
    index, valid = logprobs.scored_positions(labels >= int(Segment.PREFIX), capacity)
    take = lambda x: jnp.take_along_axis(x, index, axis=1)  # noqa: E731
    return (jnp.where(valid, take(labels), int(Segment.PAD)),) + tuple(map(take, arrays))


def pair_segment_logps_kl(graphdef, params, ref_params, micro: dict[str, Array],
                          chunk: int = 256, capacity: int = 0,
                          recompute: bool = True) -> tuple[Array, Array, Array]:
    """Policy and frozen reference on chosen and rejected -> (policy, reference, kl) sums,
    each [b, 2, 5]: the log-prob sums of `pair_segment_logps` for both models and the
    per-position KL(p_ref || p_theta) summed per segment (Token-level DPO, `fdpo.loss`).
    The two log-softmaxes are taken chunk by chunk side by side (no [b, L, V] tensor)."""
    b, length = micro["chosen_ids"].shape
    ids = jnp.stack([micro["chosen_ids"], micro["rejected_ids"]], 1).reshape(2 * b, length)
    seg = jnp.stack([micro["chosen_segments"], micro["rejected_segments"]], 1)
    ids = shd.constrain(ids, ("batch", "length"))
    model, ref = nnx.merge(graphdef, params), nnx.merge(graphdef, ref_params)
    hidden = model(ids, return_hidden=True)
    ref_hidden = ref(ids, return_hidden=True)
    seg = seg.reshape(2 * b, length)
    if not capacity:
        outs = logprobs.target_logprobs_and_kl(hidden[:, :-1], model.unembedding(),
                                               ref_hidden[:, :-1], ref.unembedding(),
                                               ids[:, 1:], chunk, recompute)
        return tuple(loss_lib.response_segment_sums(jnp.pad(x, ((0, 0), (1, 0))), seg)
                     .reshape(b, 2, -1) for x in outs)
    # Token t is scored from hidden state t - 1; token 0 from none.
    parents = jnp.broadcast_to(jnp.maximum(jnp.arange(length) - 1, 0), ids.shape)
    labels, parents, targets = _scored(seg.at[:, 0].set(int(Segment.PAD)), capacity,
                                       parents, ids)
    before = lambda h: jnp.take_along_axis(h, parents[..., None], axis=1)  # noqa: E731
    outs = logprobs.target_logprobs_and_kl(before(hidden), model.unembedding(),
                                           before(ref_hidden), ref.unembedding(), targets,
                                           chunk, recompute)
    return tuple(loss_lib.response_segment_sums(x, labels).reshape(b, 2, -1) for x in outs)


# ----------------------------------------------------------------------------------------
# Shared-prompt rows
# ----------------------------------------------------------------------------------------


def shared_pair_segment_logps(graphdef, params, micro: dict[str, Array],
                              chunk: int = 256, capacity: int = 0,
                              recompute: bool = True, trunk_capacity: int = 0) -> Array:
    """One forward over shared-prompt rows -> [b, 2, 5] (side x segment), as
    `pair_segment_logps` computes it from separate sequences.

    `trunk_capacity` > 0: the trunk's scored positions (branch 0: the common prefix and
    lead, at most that many per row) are scored apart, outside the gradient, and
    `capacity` counts each row's branch positions only. Only for losses in which the
    trunk's log-probs cancel (`LossConfig.trunk_cancels`, checked by `Trainer`): their
    gradient is then exactly zero, and the unembedding's backward (and its recompute)
    skips the common prefix."""
    model = nnx.merge(graphdef, params)
    ids = shd.constrain(micro["ids"], ("batch", "length"))
    real = (micro["labels"] != int(Segment.PAD)).astype(jnp.int32)  # padding: own segment
    hidden = model(ids, micro["positions"], real, micro["branch"], return_hidden=True)
    labels = micro["labels"]
    trunk_sums = 0.0
    if trunk_capacity:
        in_trunk = micro["branch"] == 0
        t_labels, t_parents, t_targets = _scored(jnp.where(in_trunk, labels, int(Segment.PAD)),
                                                 trunk_capacity, micro["parents"], ids)
        frozen = jax.lax.stop_gradient
        t_hidden = jnp.take_along_axis(frozen(hidden), t_parents[..., None], axis=1)
        t_lp = logprobs.target_logprobs(t_hidden, frozen(model.unembedding()), t_targets,
                                        chunk, recompute=False)  # no backward to recompute
        trunk_sums = loss_lib.response_segment_sums(t_lp, t_labels)[:, None]  # both sides
        labels = jnp.where(in_trunk, int(Segment.PAD), labels)
    labels, parents, targets, branch = _scored(labels, capacity, micro["parents"],
                                               ids, micro["branch"])
    parents = jnp.take_along_axis(hidden, parents[..., None], axis=1)
    lp = logprobs.target_logprobs(parents, model.unembedding(), targets, chunk, recompute)
    side = lambda k: loss_lib.response_segment_sums(  # noqa: E731
        lp, side_labels(labels, branch, k))
    return jnp.stack([side(1), side(2)], axis=1) + trunk_sums


def shared_pair_segment_logps_kl(graphdef, params, ref_params, micro: dict[str, Array],
                                 chunk: int = 256, capacity: int = 0,
                                 recompute: bool = True) -> tuple[Array, Array, Array]:
    """`pair_segment_logps_kl` over shared-prompt rows (each model's hidden states gathered
    by `parents` as in `shared_pair_segment_logps`)."""
    ids = shd.constrain(micro["ids"], ("batch", "length"))
    real = (micro["labels"] != int(Segment.PAD)).astype(jnp.int32)
    labels, parents, targets, branch = _scored(micro["labels"], capacity, micro["parents"],
                                               ids, micro["branch"])

    def parent_hidden(m):
        hidden = m(ids, micro["positions"], real, micro["branch"], return_hidden=True)
        return jnp.take_along_axis(hidden, parents[..., None], axis=1)

    model, ref = nnx.merge(graphdef, params), nnx.merge(graphdef, ref_params)
    outs = logprobs.target_logprobs_and_kl(parent_hidden(model), model.unembedding(),
                                           parent_hidden(ref), ref.unembedding(), targets,
                                           chunk, recompute)

    def sides(x):
        side = lambda k: loss_lib.response_segment_sums(  # noqa: E731
            x, side_labels(labels, branch, k))
        return jnp.stack([side(1), side(2)], axis=1)

    return tuple(sides(x) for x in outs)


def lm_head_capacities(most, row_length: int, shared: bool,
                       loss_cfg: loss_lib.LossConfig) -> tuple[int, int]:
    """(response_capacity, trunk_capacity) for data whose rows have at most `most`
    (`fdpo.data.RowExtents`) scored positions (`train.response_capacity=-1`): the trunk
    scored apart when the loss lets its log-probs cancel, else every scored position
    together, or (0, 0), every position, when that would leave out fewer than two."""
    if shared and most.trunk and loss_cfg.trunk_cancels:
        return most.branches, most.trunk
    return (most.scored if most.scored < row_length - 1 else 0), 0


def _response_tokens(segments: Array) -> Array:
    return (segments >= int(Segment.PREFIX)).sum(-1).astype(jnp.float32)


# ----------------------------------------------------------------------------------------
# The trainer: shardings, state initialisation, jitted train / eval functions
# ----------------------------------------------------------------------------------------


class Trainer:
    """Holds the compiled step functions for one model, loss, optimizer and mesh.

    `reference="frozen"`: the step runs the reference params (passed separately, never
    differentiated) on every micro-batch. `"precomputed"`: the step reads the batch's
    `ref_logps` and runs no reference forward.

    `mechanism`: the eval step adds the mechanism metrics (`fdpo.mechanism`), and
    `grad_share_step` exists; with the frozen reference they need its params for every
    loss, `sft` included (`uses_ref_params`).
    """

    def __init__(self, model_cfg: ModelConfig, loss_cfg: loss_lib.LossConfig,
                 tx: optax.GradientTransformation, mesh: Mesh, rules=shd.DEFAULT_RULES, *,
                 reference: str = "frozen", chunk: int = 256,
                 schedule: optax.Schedule | None = None, shared_length: int = 0,
                 response_capacity: int = 0, logprob_recompute: bool = True,
                 mechanism: bool = False, trunk: bool = True, trunk_capacity: int = 0):
        if reference not in REFERENCE_MODES:
            raise ValueError(f"reference={reference!r}; expected one of {REFERENCE_MODES}")
        if loss_cfg.is_tdpo and reference != "frozen":
            raise ValueError(f"loss_type={loss_cfg.loss_type!r} needs the reference's whole "
                             f"distribution at every response token: use reference='frozen' "
                             f"(precomputed ref_logps hold only per-segment sums)")
        self.model_cfg, self.loss_cfg, self.tx, self.mesh = model_cfg, loss_cfg, tx, mesh
        self.rules = tuple(tuple(r) for r in rules)
        self.reference, self.chunk, self.schedule = reference, chunk, schedule
        self.shared_length = shared_length  # 0: chosen and rejected as separate rows
        self.trunk = trunk  # shared rows share prompt + common prefix (False: the prompt)
        # Response positions per row that reach the LM head (0: all positions); whether the
        # backward recomputes each log-prob chunk's logits (`fdpo.logprobs`).
        self.response_capacity, self.logprob_recompute = response_capacity, logprob_recompute
        # > 0: the trunk's scored positions (at most that many per row) are scored outside
        # the gradient and response_capacity counts the branches' (shared_pair_segment_logps).
        self.trunk_capacity = trunk_capacity
        if trunk_capacity and not (shared_length and trunk and response_capacity and
                                   loss_cfg.trunk_cancels and not loss_cfg.is_tdpo):
            raise ValueError(
                f"trunk_capacity={trunk_capacity} needs trunk rows (shared_length > 0, trunk), "
                f"a response_capacity and a loss in which the trunk's log-probs cancel "
                f"(LossConfig.trunk_cancels: no NLL, DPOP, length normalisation or TDPO, "
                f"equal prefix weights); got shared_length={shared_length}, trunk={trunk}, "
                f"response_capacity={response_capacity}, loss {loss_cfg}")
        self.mechanism = mechanism
        sequence_keys = SHARED_KEYS if shared_length else BATCH_KEYS[:4]
        self.graphdef, abstract = nnx.split(convert.abstract_model(model_cfg))
        self.abstract_params = nnx.to_pure_dict(abstract)
        self.param_shardings = nnx.to_pure_dict(shd.state_shardings(abstract, mesh, self.rules))
        self.replicated = NamedSharding(mesh, P())
        abstract_opt = jax.eval_shape(tx.init, self.abstract_params)
        opt_shardings = optax.tree_map_params(
            tx, lambda _, s: s, abstract_opt, self.param_shardings,
            transform_non_params=lambda _: self.replicated,
            is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        self.state_shardings = {"step": self.replicated, "params": self.param_shardings,
                                "opt_state": opt_shardings}
        batch_axes = dict(self.rules).get("batch")
        self.batch_shardings = {
            k: NamedSharding(mesh, P(None, batch_axes, *([None] * extra)))
            for k, extra in ([(k, 1) for k in sequence_keys] +
                             [("ref_logps", 2), ("pair_mask", 0)])}
        self.batch_multiple = shd.data_parallel_size(mesh, self.rules)
        ref_sh = self.param_shardings if self.uses_ref_params else None

        self.init_state = jax.jit(self._init_state, in_shardings=(self.param_shardings,),
                                  out_shardings=self.state_shardings)
        self.train_step = jax.jit(self._train_step,
                                  in_shardings=(self.state_shardings, self.batch_shardings,
                                                ref_sh),
                                  out_shardings=(self.state_shardings, self.replicated),
                                  donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step,
                                 in_shardings=(self.param_shardings, self.batch_shardings,
                                               ref_sh),
                                 out_shardings=self.replicated)
        if mechanism:
            self.grad_share_step = jax.jit(self._grad_share,
                                           in_shardings=(self.param_shardings,
                                                         self.batch_shardings, ref_sh),
                                           out_shardings=self.replicated)

    @property
    def uses_ref_params(self) -> bool:
        """Whether the step functions take the frozen reference's params."""
        return self.reference == "frozen" and (self.loss_cfg.needs_reference or
                                               self.mechanism)

    # -- state -----------------------------------------------------------------------------

    def _init_state(self, params):
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": self.tx.init(params)}

    def abstract_state(self):
        """ShapeDtypeStructs carrying this mesh's shardings (the restore target)."""
        shapes = jax.eval_shape(self._init_state, self.abstract_params)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)

    # -- batches ---------------------------------------------------------------------------

    def make_batch(self, examples: dict[str, np.ndarray], micro_batches: int = 1,
                   pair_mask: np.ndarray | None = None) -> dict[str, jax.Array]:
        """Host examples (this process's `b` pairs, numpy [b, ...]) -> the global batch.

        Each process passes its own pairs; the global batch concatenates them in process
        order. With shared rows, examples that already hold the packed arrays
        (`fdpo.records.SHARED_KEYS`, from `fdpo.data.train_dataset(shared_length=...)`) are
        used as they are; others are packed here. `ref_logps` is required in `precomputed`
        mode and zero-filled otherwise.
        """
        b = examples["chosen_ids"].shape[0]
        if b % micro_batches:
            raise ValueError(f"{b} pairs per process do not split into {micro_batches} "
                             f"micro-batches")
        if self.shared_length and "ids" in examples:  # packed by the data loader
            local = {k: np.asarray(examples[k], np.int32) for k in SHARED_KEYS}
            if local["ids"].shape[1] != self.shared_length:
                raise ValueError(f"packed rows of {local['ids'].shape[1]} tokens; this "
                                 f"trainer's shared_length is {self.shared_length}")
        elif self.shared_length:
            local = pack_shared_prompt({k: np.asarray(examples[k]) for k in BATCH_KEYS[:4]},
                                       self.shared_length, self.trunk)
        else:
            local = {k: np.asarray(examples[k]) for k in BATCH_KEYS[:4]}
        self._check_capacity(local)
        if "ref_logps" in examples:
            ref = np.asarray(examples["ref_logps"], np.float32)
            # [.., 2, 3] from before LEAD/TRAIL: such pairs have none of those tokens, so 0.
            local["ref_logps"] = np.pad(ref, ((0, 0), (0, 0),
                                              (0, loss_lib.NUM_SEGMENTS - ref.shape[-1])))
        elif self.loss_cfg.needs_reference and self.reference == "precomputed":
            raise ValueError("reference='precomputed' but the data has no ref_logps: run "
                             "`python -m launch.precompute_ref` on it, or use reference="
                             "'frozen'")
        else:
            local["ref_logps"] = np.zeros((b, 2, loss_lib.NUM_SEGMENTS), np.float32)
        local["pair_mask"] = (np.ones((b,), np.float32) if pair_mask is None
                              else np.asarray(pair_mask, np.float32))
        out = {}
        for k, v in local.items():
            v = v.reshape((micro_batches, b // micro_batches) + v.shape[1:])
            global_shape = (v.shape[0], v.shape[1] * jax.process_count()) + v.shape[2:]
            if global_shape[1] % self.batch_multiple:
                raise ValueError(f"micro-batch of {global_shape[1]} pairs does not divide "
                                 f"over {self.batch_multiple} data-parallel devices")
            out[k] = jax.make_array_from_process_local_data(self.batch_shardings[k], v,
                                                            global_shape)
        return out

    def _check_capacity(self, local: dict[str, np.ndarray]) -> None:
        """Every row's scored response tokens fit `response_capacity` (else ValueError)."""
        if not self.response_capacity:
            return
        if self.shared_length and self.trunk_capacity:
            scored, in_trunk = local["labels"] >= Segment.PREFIX, local["branch"] == 0
            counts = {"shared row's branches": (scored & ~in_trunk).sum(-1),
                      "shared row's trunk": (scored & in_trunk).sum(-1)}
        elif self.shared_length:
            counts = {"shared-prompt row": (local["labels"] >= Segment.PREFIX).sum(-1)}
        else:  # token 0 has no context and is never scored
            counts = {side: (local[f"{side}_segments"][:, 1:] >= Segment.PREFIX).sum(-1)
                      for side in ("chosen", "rejected")}
        for what, n in counts.items():
            name, most, hint = (
                ("trunk_capacity", self.trunk_capacity, "the train loop sizes it from the "
                 "data: fdpo.train.lm_head_capacities") if what.endswith("trunk")
                else ("train.response_capacity", self.response_capacity,
                      "-1 sizes it from the data, 0 scores every position"))
            if n.max() > most:
                i = int(n.argmax())
                raise ValueError(f"pair {i} of the batch: its {what} has {int(n[i])} response "
                                 f"tokens, more than {name}={most} ({hint})")

    # -- loss ------------------------------------------------------------------------------

    def _pair_logps(self, params, micro):
        if self.shared_length:
            return shared_pair_segment_logps(self.graphdef, params, micro, self.chunk,
                                             self.response_capacity, self.logprob_recompute,
                                             self.trunk_capacity)
        return pair_segment_logps(self.graphdef, params, micro, self.chunk,
                                  self.response_capacity, self.logprob_recompute)

    def _reference(self, micro, ref_params):
        if not self.loss_cfg.needs_reference:
            return None
        if self.reference == "frozen":
            return jax.lax.stop_gradient(self._pair_logps(ref_params, micro))
        return micro["ref_logps"]

    def _micro_loss(self, params, micro, ref_params, num_pairs, num_chosen_tokens):
        """(loss share of this micro-batch, metric sums)."""
        return self._loss_and_sums(*self._forward(params, micro, ref_params), micro,
                                   num_pairs, num_chosen_tokens)

    def _forward(self, params, micro, ref_params):
        """(policy, reference or None, kl or None) sums [b, 2, 5] of the loss."""
        kl = None
        with shd.use_mesh(self.mesh, self.rules):
            if self.loss_cfg.is_tdpo:  # both models in one chunked pass, for the KL
                fn = (shared_pair_segment_logps_kl if self.shared_length
                      else pair_segment_logps_kl)
                policy, reference, kl = fn(self.graphdef, params,
                                           jax.lax.stop_gradient(ref_params), micro,
                                           self.chunk, self.response_capacity,
                                           self.logprob_recompute)
            else:
                policy = self._pair_logps(params, micro)
                reference = self._reference(micro, ref_params)
        return policy, reference, kl

    def _loss_and_sums(self, policy, reference, kl, micro, num_pairs, num_chosen_tokens,
                       extra_terms=None):
        lengths = self._response_lengths(micro) if self.loss_cfg.length_normalize else None
        terms = loss_lib.pair_terms(policy, reference, self.loss_cfg, lengths, kl)
        mask = micro["pair_mask"]
        sums = loss_lib.masked_sums(terms | (extra_terms or {}), mask)
        loss = loss_lib.loss_from_sums(sums, num_pairs, num_chosen_tokens, self.loss_cfg)
        # Tokens the model ran on (shared rows count the trunk once).
        if self.shared_length:
            ran = (micro["labels"] != 0).sum(-1)
        else:
            ran = (micro["chosen_segments"] != 0).sum(-1) + (micro["rejected_segments"] != 0).sum(-1)
        sums["tokens"] = jnp.sum(mask * ran)
        return loss, sums

    def _mechanism_sums(self, params, micro, ref_params):
        """The eval step's micro-batch with the mechanism metrics: one pass of the policy
        (and the frozen reference) gives the loss's sums and the `mech_*` terms."""
        frozen = self.reference == "frozen"
        with shd.use_mesh(self.mesh, self.rules):
            out = mech.pair_pass(self.graphdef, params, ref_params if frozen else None, micro,
                                 self.chunk, bool(self.shared_length))
        # Precomputed `ref_logps` are real sums only when the loss needs them (their
        # provenance is checked then); an sft run's may be zero-filled.
        reference = out.get("reference") if frozen else (
            micro["ref_logps"] if self.loss_cfg.needs_reference else None)
        kl = out.get("kl") if self.loss_cfg.is_tdpo else None
        _, sums = self._loss_and_sums(
            out["policy"], reference if self.loss_cfg.needs_reference else None, kl, micro,
            1.0, 1.0, mech.pair_terms(out, reference))
        return sums

    def _response_lengths(self, micro):
        """[b, 2] response tokens of (chosen, rejected) per pair (length-normalised IPO)."""
        if self.shared_length:
            sides = [side_labels(micro["labels"], micro["branch"], k) for k in (1, 2)]
        else:
            sides = [micro["chosen_segments"], micro["rejected_segments"]]
        return jnp.stack([_response_tokens(s) for s in sides], -1)

    def _normalisers(self, batch):
        mask = batch["pair_mask"]
        if self.shared_length:
            chosen = side_labels(batch["labels"], batch["branch"], 1)
        else:
            chosen = batch["chosen_segments"]
        return mask.sum(), jnp.sum(mask * _response_tokens(chosen))

    @staticmethod
    def _scan_micro(fn, batch):
        """Applies fn to every micro-batch and sums its (pytree) outputs. One scan body, so
        the forward and backward are compiled once whatever the number of micro-batches."""
        if batch["pair_mask"].shape[0] == 1:
            return fn(jax.tree.map(lambda x: x[0], batch))
        shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], batch))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(acc, micro):
            return jax.tree.map(jnp.add, acc, fn(micro)), None

        return jax.lax.scan(body, zeros, batch)[0]

    def _train_step(self, state, batch, ref_params):
        params = state["params"]
        num_pairs, num_chosen = self._normalisers(batch)
        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)

        def one(micro):
            (loss, sums), grads = grad_fn(params, micro, ref_params, num_pairs, num_chosen)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            grads = jax.lax.with_sharding_constraint(grads, self.param_shardings)
            return loss, sums, grads

        loss, sums, grads = self._scan_micro(one, batch)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                                 state)
        metrics = metric_means(sums, num_pairs, num_chosen)
        metrics.update(tokens=sums["tokens"], pairs=num_pairs, loss=loss, grad_norm=grad_norm,
                       finite=finite.astype(jnp.float32))
        if self.schedule is not None:
            metrics["lr"] = jnp.asarray(self.schedule(state["step"]), jnp.float32)
        return new_state, metrics

    def _eval_step(self, params, batch, ref_params):
        """Metric sums over the batch (the caller adds batches up, `eval_metrics` takes the
        means): pairs, chosen tokens, tokens run, and each per-pair term summed."""
        num_pairs, num_chosen = self._normalisers(batch)

        def one(micro):
            if self.mechanism:
                return self._mechanism_sums(params, micro, ref_params)
            _, sums = self._micro_loss(params, micro, ref_params, 1.0, 1.0)
            return sums

        sums = self._scan_micro(one, batch)
        sums["pairs"], sums["chosen_tokens"] = num_pairs, num_chosen
        return sums

    def _grad_share(self, params, batch, ref_params):
        """The gradient of the train step's loss on `batch` split into its part through the
        mid tokens and the rest (`fdpo.mechanism` docstring) -> `mech/grad/...` scalars.
        Two backward passes."""
        num_pairs, num_chosen = self._normalisers(batch)
        is_mid = jnp.arange(loss_lib.NUM_SEGMENTS) == mech.MID

        def part_grad(keep):
            def loss_fn(p, micro):
                policy, reference, kl = self._forward(p, micro, ref_params)
                return self._loss_and_sums(mech.through_segments(policy, keep), reference,
                                           mech.through_segments(kl, keep), micro,
                                           num_pairs, num_chosen)[0]

            def one(micro):
                grads = jax.grad(loss_fn)(params, micro)
                grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
                return jax.lax.with_sharding_constraint(grads, self.param_shardings)

            return self._scan_micro(one, batch)

        return mech.grad_share(part_grad(is_mid), part_grad(~is_mid))


def metric_means(sums: dict[str, Any], num_pairs, num_chosen_tokens) -> dict[str, Any]:
    """The logged means from metric sums (of a step, or added over eval batches): each
    per-pair term per pair and the NLL per chosen response token."""
    n = jnp.maximum(num_pairs, 1.0)
    out = {METRIC_NAMES[k]: sums[k] / n for k in METRIC_NAMES}
    for i, name in enumerate(loss_lib.SEGMENT_NAMES):
        out[f"rewards/margins_{name}"] = sums["segment_margins"][i] / n
    out["nll"] = loss_lib.nll(sums, num_chosen_tokens)
    if "kl_segments" in sums:  # Token-level DPO: the KL to the reference, per side/segment
        for s, side in enumerate(("chosen", "rejected")):
            out[f"kl/{side}"] = sums[f"kl_{side}"] / n
            for i, name in enumerate(loss_lib.SEGMENT_NAMES):
                out[f"kl/{side}_{name}"] = sums["kl_segments"][s, i] / n
    return out


def eval_metrics(sums: dict[str, Any], loss_cfg: loss_lib.LossConfig) -> dict[str, float]:
    """`metric_means` and the loss, as floats, from `Trainer.eval_step` sums added over eval
    batches."""
    out = metric_means(sums, sums["pairs"], sums["chosen_tokens"])
    out["loss"] = loss_lib.loss_from_sums(sums, sums["pairs"], sums["chosen_tokens"], loss_cfg)
    out["pairs"] = sums["pairs"]
    if "mech_first_found" in sums:
        out.update(mech.means(sums, sums["pairs"]))
    return {k: float(v) for k, v in out.items()}


def copy_params(params):
    """A separate copy (same shardings): the frozen reference, kept while the train
    state's buffers are donated."""
    return jax.tree.map(jnp.copy, params)


