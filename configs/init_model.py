"""A randomly initialised model (`python -m launch.init_model`); also the `init` section's
`fields` in configs/toy.py.

    python -m launch.init_model --out=CKPT [--tokenizer=DIR] [--config=configs/init_model.py \
        --config.preset=qwen2.5-coder-0.5b --config.fields.num_layers=2 --config.seed=0]
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.preset = config_dict.placeholder(str)  # fdpo.models.config.PRESETS; None: a tiny Qwen2
    c.seed = 0  # the initialisation's
    # ModelConfig fields that override the preset's (None: the preset's; with a tokenizer,
    # vocab_size and the special token ids default to the tokenizer's). head_dim defaults to
    # hidden_size / num_heads when either is set.
    c.fields = ml_collections.ConfigDict(dict(
        architecture=config_dict.placeholder(str),  # qwen2 | llama
        vocab_size=config_dict.placeholder(int),
        hidden_size=config_dict.placeholder(int),
        intermediate_size=config_dict.placeholder(int),
        num_layers=config_dict.placeholder(int),
        num_heads=config_dict.placeholder(int),
        num_kv_heads=config_dict.placeholder(int),
        head_dim=config_dict.placeholder(int),
        rms_norm_eps=config_dict.placeholder(float),
        rope_theta=config_dict.placeholder(float),
        rope_type=config_dict.placeholder(str),  # default | linear
        rope_factor=config_dict.placeholder(float),
        qkv_bias=config_dict.placeholder(bool),
        o_bias=config_dict.placeholder(bool),
        tie_embeddings=config_dict.placeholder(bool),
        max_position_embeddings=config_dict.placeholder(int),
        bos_token_id=config_dict.placeholder(int),
        eos_token_id=config_dict.placeholder(int),
        pad_token_id=config_dict.placeholder(int),
        checkpoint_dtype=config_dict.placeholder(str),  # float32 | bfloat16 | float16
        param_dtype=config_dict.placeholder(str),
        compute_dtype=config_dict.placeholder(str),
        remat_policy=config_dict.placeholder(str),  # none | full | dots
        scan_layers=config_dict.placeholder(bool),
        attention=config_dict.placeholder(str),  # einsum | dot_product | cudnn
        attention_block=config_dict.placeholder(int),  # dot_product: query block (0: whole)
    ))
    return c
