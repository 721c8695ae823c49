r"""Focused-DPO (and its baselines) on pair records built by `launch.build`.

    python -m launch.train --workdir=WORKDIR \
        --config=configs/focused_dpo.py:model=CKPT,data=DATA_DIR[,preset=dpo][,runlocal]

`model` is an fdpo checkpoint written by `launch.import_hf` (or set `init_hf_dir` to read a
Hugging Face directory directly); `data` a directory with `manifest.json`. `preset` picks
the loss (docs/training.md): focused_dpo, dpo, mid_only, target_dpo_like, sft, dpo_nll (RPO),
dpop, ipo_length_norm; tdpo1 and tdpo2 (Token-level DPO: the DPO table plus a KL term;
frozen reference only); step_dpo_like is a deprecated name of mid_only. Any field can be
overridden, e.g. `--config.optimizer.lr=5e-6 --config.loss.w_focused=5`; the config is
locked, so a misspelt field is an error. `runlocal` shrinks the run for a laptop.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs.common import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, model="", data="", preset="focused_dpo", runlocal=False)
    c = ml_collections.ConfigDict()

    # Initialisation: exactly one of these.
    c.init_checkpoint = arg.model  # fdpo checkpoint (launch.import_hf output)
    c.init_hf_dir = config_dict.placeholder(str)
    # How the model runs (ModelConfig fields); parameters train in float32. attention:
    # einsum | dot_product (jax.nn.dot_product_attention, XLA) | cudnn (GPU, bf16 only).
    # remat_policy: full recomputes each decoder layer in the backward instead of keeping
    # its activations (the attention scores and MLP products): 0.32x the step's XLA
    # temporaries on the shared bench spec at no measured CPU cost (docs/training.md,
    # "Memory"); none keeps them (faster where memory is plentiful, e.g. some GPU runs);
    # dots keeps the matmul outputs.
    c.model = ml_collections.ConfigDict(dict(
        param_dtype="float32", compute_dtype="bfloat16", remat_policy="full",
        scan_layers=True, attention="einsum"))

    # Mesh (data, fsdp, tensor); one -1 takes the remaining devices. Rules map logical axis
    # names to mesh axes (fdpo.sharding; these are its defaults): parameters over fsdp on
    # the model dimension and over tensor on heads/mlp/vocab, the batch over data and fsdp.
    c.mesh_shape = (1, -1, 1)
    c.sharding_rules = (
        ("batch", ("data", "fsdp")), ("length", None), ("act_embed", None),
        ("act_heads", "tensor"), ("act_vocab", "tensor"), ("act_mlp", "tensor"),
        ("layers", None), ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"),
        ("kv_heads", "tensor"), ("head_dim", None), ("mlp", "tensor"), ("norm", None),
    )

    # Loss: preset weight table (METHOD.md section 3); unset fields come from the preset.
    c.loss = ml_collections.ConfigDict()
    c.loss.preset = arg.preset
    c.loss.w_focused = 2.0  # chosen-mid weight of focused_dpo
    # ((cp, cm, cs), (rp, rm, rs)) replaces the table: rows chosen, rejected; columns prefix,
    # mid, suffix. From the command line: --config.loss.weights='((1,2,1),(1,1,0))'. Five
    # columns add lead and trail (tokens before / after an instruct response's code span);
    # with three they follow prefix and suffix.
    c.loss.weights = config_dict.placeholder(tuple)
    c.loss.loss_type = config_dict.placeholder(str)  # sigmoid | ipo | hinge | none
    c.loss.beta = 0.1
    c.loss.label_smoothing = 0.0
    c.loss.nll_weight = config_dict.placeholder(float)  # RPO term; sft, dpo_nll: 1
    # DPOP's lambda (sigmoid only; preset dpop: 50), and whether its penalty is on the
    # chosen side's weighted segment sum instead of the whole chosen response (the paper).
    c.loss.dpop_lambda = config_dict.placeholder(float)
    c.loss.dpop_weighted = False
    # ipo only: each side's log-ratio per response token (TRL; preset ipo_length_norm).
    c.loss.length_normalize = config_dict.placeholder(bool)
    c.loss.reference = "frozen"  # or "precomputed" (ref_logps in the data); tdpo: frozen
    # Token-level DPO (presets tdpo1, tdpo2; docs/training.md): the KL term's weight in tdpo2,
    # and its weights per side x segment like `weights` (unset: all 1, the paper's; e.g.
    # '((0,1,0),(0,1,0))' keeps only the mids' KL, a focused TDPO).
    c.loss.tdpo_alpha = 0.5
    c.loss.kl_weights = config_dict.placeholder(tuple)

    # The reference model: at most one of these; neither = the initial policy. Frozen and
    # precomputed modes use the same one (launch.precompute_ref reads this config).
    c.reference = ml_collections.ConfigDict()
    c.reference.checkpoint = config_dict.placeholder(str)  # fdpo checkpoint
    c.reference.hf_dir = config_dict.placeholder(str)  # or a Hugging Face directory
    # Precomputed mode: refuse ref_logps whose provenance (reference identity, compute
    # dtype, chunk; written by launch.precompute_ref) differs from this run's.
    c.reference.check_provenance = True

    c.optimizer = ml_collections.ConfigDict(dict(
        lr=5e-6, warmup_steps=10, decay="cosine", end_lr_ratio=0.0, b1=0.9, b2=0.999,
        eps=1e-8, weight_decay=0.0, clip_norm=1.0))

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32  # pairs per step, all processes together
    c.train.micro_batches = 1  # gradient accumulation
    c.train.num_epochs = 3
    c.train.num_steps = -1  # > 0 overrides num_epochs
    # Most positions per chunk of the float32 log-softmax (balanced chunks). 128: on the shared
    # bench spec (vocab 32k) as fast as 256 or faster and 262 MiB less XLA temp with the
    # trunk split (docs/results/benchmarks.md); at vocab 152k a chunk holds 4 x 128 x 152k
    # float32 = 0.29 GiB per logits-sized buffer.
    c.train.logprob_chunk = 128
    # Response positions per row that reach the LM head, so the prompt and the padding skip
    # the unembedding and log-softmax: -1 the data's most (found with the row length), 0
    # every position, N > 0 a fixed count (a batch row with more response tokens is an
    # error naming the pair: fdpo.train.Trainer).
    c.train.response_capacity = -1
    c.train.logprob_recompute = True  # the backward recomputes each chunk's logits
    # One row per pair, the trunk (prompt + common prefix) computed once (fdpo.train module
    # docstring, docs/training.md): the same step as separate chosen/rejected rows (tested
    # to 1e-5) on fewer tokens.
    c.train.shared_prompt = True
    c.train.shared_length = 0  # tokens per shared row; 0: the longest pair of the data

    c.data = ml_collections.ConfigDict()
    c.data.dir = arg.data
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.shuffle = True
    c.data.seed = 0
    c.data.num_threads = 2
    c.data.prefetch = 4

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100, keep=3, use_async=True))
    c.log = ml_collections.ConfigDict(dict(
        every_steps=10, eval_every_steps=100, eval_max_batches=-1, tensorboard=True))
    # Mechanism metrics in every validation line (docs/training.md; with the frozen
    # reference even sft keeps a reference copy for them), and the mid-token gradient share
    # on one validation batch: -1 at every validation step, N > 0 every N steps (and the
    # last), 0 never; two extra backward passes each time.
    c.log.mechanism = True
    c.log.grad_share_every = -1
    c.export_hf = False  # also write WORKDIR/hf (safetensors) at the end

    if arg.runlocal:
        c.model.compute_dtype = "float32"
        c.train.batch_size = 8
        c.train.num_steps = 20
        c.optimizer.warmup_steps = 2
        c.log.every_steps = 1
        c.log.eval_every_steps = 10
        c.log.eval_max_batches = 2
        c.checkpoint.every_steps = 10
    return c
