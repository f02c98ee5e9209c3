"""The Flax Transformer and TransformerLM: paper sizes, masking, order, dropout, dtypes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_jax as aj

V = 50
SRC = np.array([[5, 6, 7, 8, 9, 0], [11, 12, 13, 0, 0, 0]], np.int32)  # [B=2, S=6]
TGT = np.array([[3, 4, 14, 15, 2, 0, 0], [7, 8, 2, 0, 0, 0, 0]], np.int32)  # [B=2, T=7]


def _tiny(**overrides):
    return aj.TransformerConfig.tiny(vocab_size=V, **overrides)


def _init(model, *args):
    return model.init(jax.random.key(0), *args)


def _count(variables):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(variables["params"])))


# ---- Sizes: the paper's Table 3. ------------------------------------------------------


@pytest.mark.parametrize(
    "preset, paper, exact",
    [("base", 65e6, 63_082_496), ("big", 213e6, 214_245_376)],
)
def test_parameter_count_matches_table_3(preset, paper, exact):
    cfg = getattr(aj.TransformerConfig, preset)(vocab_size=37000)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(aj.Transformer(cfg).init, jax.random.key(0), tokens, tokens)
    n = _count(shapes)
    assert abs(n - paper) / paper <= 0.04
    # Hand count: shared embedding V·D; per encoder layer 4(D²+D) + (2DF+F+D) + 2·2D;
    # per decoder layer 8(D²+D) + (2DF+F+D) + 3·2D.
    D, F, L = cfg.d_model, cfg.d_ff, cfg.num_layers
    ffn = 2 * D * F + F + D
    hand = 37000 * D + L * (4 * (D * D + D) + ffn + 4 * D) + L * (8 * (D * D + D) + ffn + 6 * D)
    assert n == hand == exact


def test_eval_shape_of_big_allocates_nothing():
    cfg = aj.TransformerConfig.big()
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    shapes = jax.eval_shape(aj.Transformer(cfg).init, jax.random.key(0), tokens, tokens)
    leaves = jax.tree.leaves(nn.unbox(shapes))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_every_parameter_has_logical_axis_names():
    variables = _init(aj.Transformer(_tiny(share_embeddings=False, target_vocab_size=40)), SRC, TGT)
    boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    allowed = {"vocab", "embed", "heads", "kv", "mlp", "position"}
    assert boxed and all(isinstance(b, nn.Partitioned) for b in boxed)
    for b in boxed:
        assert len(b.names) == b.value.ndim and set(b.names) <= allowed
    lm = _init(aj.TransformerLM(_tiny(positional="learned")), TGT)
    assert all(
        isinstance(b, nn.Partitioned)
        for b in jax.tree.leaves(lm["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    )


# ---- Shapes and dtypes. ---------------------------------------------------------------


def test_bf16_compute_with_f32_params():
    model = aj.Transformer(_tiny(dtype=jnp.bfloat16))
    variables = _init(model, SRC, TGT)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables)))
    logits = model.apply(variables, SRC, TGT)
    assert logits.shape == (2, 7, V) and logits.dtype == jnp.bfloat16
    encoded = model.apply(variables, SRC, method="encode")
    assert encoded.dtype == jnp.bfloat16
    f32 = aj.Transformer(_tiny()).apply(variables, SRC, TGT)
    np.testing.assert_allclose(np.asarray(logits, np.float32), f32, atol=0.1)


def test_encode_then_decode_equals_call():
    model = aj.Transformer(_tiny())
    variables = _init(model, SRC, TGT)
    encoded = model.apply(variables, SRC, method="encode")
    assert encoded.shape == (2, 6, 32)
    dec_in = aj.shift_right(TGT)
    logits = model.apply(variables, encoded, SRC, dec_in, method="decode")
    np.testing.assert_allclose(logits, model.apply(variables, SRC, TGT), rtol=1e-6, atol=1e-6)


def test_shift_right():
    np.testing.assert_array_equal(aj.shift_right(jnp.array([[3, 4, 5]])), [[0, 3, 4]])
    np.testing.assert_array_equal(aj.shift_right(jnp.array([3, 4, 5]), bos_id=1), [1, 3, 4])


# ---- Causality and padding. -----------------------------------------------------------


@pytest.mark.parametrize("cfg_kw", [{}, {"pre_ln": True}, {"positional": "rotary"}])
def test_transformer_is_causal(cfg_kw):
    model = aj.Transformer(_tiny(**cfg_kw))
    variables = _init(model, SRC, TGT)
    base = model.apply(variables, SRC, TGT)
    t = 2
    changed = TGT.copy()
    changed[:, t + 1 :] = 9  # targets after position t (the decoder sees targets[:t+1])
    # Logits at positions <= t + 1 only read shifted targets <= t.
    out = model.apply(variables, SRC, changed)
    np.testing.assert_allclose(out[:, : t + 2], base[:, : t + 2], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[:, t + 2 :], base[:, t + 2 :], atol=1e-3)


@pytest.mark.parametrize("cfg_kw", [{}, {"positional": "learned"}, {"positional": "rotary"}])
def test_lm_is_causal(cfg_kw):
    model = aj.TransformerLM(_tiny(**cfg_kw))
    tokens = np.array([[4, 5, 6, 7, 8, 9]], np.int32)
    variables = _init(model, tokens)
    base = model.apply(variables, tokens)
    changed = tokens.copy()
    changed[:, 3:] = [20, 21, 22]
    out = model.apply(variables, changed)
    np.testing.assert_allclose(out[:, :3], base[:, :3], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[:, 3:], base[:, 3:], atol=1e-3)


def test_appending_padding_leaves_real_logits_unchanged():
    model = aj.Transformer(_tiny())
    variables = _init(model, SRC, TGT)
    base = model.apply(variables, SRC, TGT)
    src_pad = np.pad(SRC, ((0, 0), (0, 5)))
    tgt_pad = np.pad(TGT, ((0, 0), (0, 4)))
    out = model.apply(variables, src_pad, tgt_pad)
    for b, length in enumerate((TGT != 0).sum(1)):
        np.testing.assert_allclose(out[b, :length], base[b, :length], rtol=1e-5, atol=1e-6)
    lm = aj.TransformerLM(_tiny())
    lv = _init(lm, TGT)
    lbase, lout = lm.apply(lv, TGT), lm.apply(lv, tgt_pad)
    for b, length in enumerate((TGT != 0).sum(1)):
        np.testing.assert_allclose(lout[b, :length], lbase[b, :length], rtol=1e-5, atol=1e-6)


def test_sown_attention_weights_sum_to_one_over_real_keys_and_leave_outputs_unchanged():
    model = aj.Transformer(_tiny())
    variables = _init(model, SRC, TGT)
    plain = model.apply(variables, SRC, TGT)
    logits, state = model.apply(variables, SRC, TGT, mutable=["intermediates"])
    np.testing.assert_allclose(logits, plain, rtol=1e-6, atol=1e-6)
    inter = state["intermediates"]
    src_real = SRC != 0  # [B, S]
    dec_real = np.asarray(aj.shift_right(TGT) != 0) | (np.arange(7) == 0)  # start slot
    for i in range(2):
        (enc,) = inter["encoder"][f"layer_{i}"]["self_attention"]["attention_weights"]
        (dself,) = inter["decoder"][f"layer_{i}"]["self_attention"]["attention_weights"]
        (cross,) = inter["decoder"][f"layer_{i}"]["cross_attention"]["attention_weights"]
        assert enc.shape == (2, 4, 6, 6) and cross.shape == (2, 4, 7, 6)
        cases = (
            (enc, src_real, src_real),
            (cross, dec_real, src_real),
            (dself, dec_real, dec_real),
        )
        for w, q_real, k_real in cases:
            w = np.asarray(w)
            sums = w.sum(-1)  # [B, N, T]
            real_rows = np.broadcast_to(q_real[:, None, :], sums.shape)
            np.testing.assert_allclose(sums[real_rows], 1.0, rtol=1e-5)
            masked_keys = np.broadcast_to(~k_real[:, None, None, :], w.shape)
            assert np.all(w[masked_keys] == 0.0)
        # Causal: no weight on future positions.
        rows, cols = np.triu_indices(7, 1)
        assert np.all(np.asarray(dself)[..., rows, cols] == 0)


# ---- Word order. ----------------------------------------------------------------------


def test_permuting_source_changes_encoder_output_only_with_positions():
    src = np.array([[5, 6, 7, 8, 9, 10]], np.int32)
    perm = np.array([3, 0, 5, 1, 4, 2])
    model = aj.Transformer(_tiny())
    variables = _init(model, src, TGT[:1])
    enc = model.apply(variables, src, method="encode")
    enc_perm = model.apply(variables, src[:, perm], method="encode")
    assert not np.allclose(enc_perm, enc[:, perm], atol=1e-3)
    no_pos = aj.Transformer(_tiny(positional="none"))
    enc = no_pos.apply(variables, src, method="encode")
    enc_perm = no_pos.apply(variables, src[:, perm], method="encode")
    np.testing.assert_allclose(enc_perm, enc[:, perm], rtol=1e-5, atol=1e-5)


# ---- Dropout. -------------------------------------------------------------------------


def test_deterministic_mode_has_no_dropout_and_training_mode_does():
    model = aj.Transformer(_tiny(dropout_rate=0.3, attention_dropout_rate=0.2))
    variables = _init(model, SRC, TGT)
    a = model.apply(variables, SRC, TGT)
    np.testing.assert_array_equal(a, model.apply(variables, SRC, TGT))

    def train(seed):
        rngs = {"dropout": jax.random.key(seed)}
        return model.apply(variables, SRC, TGT, train=True, rngs=rngs)

    np.testing.assert_array_equal(train(1), train(1))
    assert not np.allclose(train(1), train(2), atol=1e-3)
    assert not np.allclose(train(1), a, atol=1e-3)


# ---- Config validation and bad input. -------------------------------------------------


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(d_model=30, num_heads=4), ValueError, "must divide d_model=30"),
        (dict(dropout_rate=1.0), ValueError, "dropout_rate must be in"),
        (dict(positional="alibi"), ValueError, "positional must be one of"),
        (dict(activation="tanh"), ValueError, "activation must be one of"),
        (dict(num_layers=0), ValueError, "num_layers must be a positive int"),
        (dict(target_vocab_size=70), ValueError, "share_embeddings=True needs one vocabulary"),
        (dict(pad_id=V), ValueError, "pad_id=50 is outside"),
        (dict(attention_implementation="flash"), ValueError, "attention_implementation"),
        (dict(dtype=jnp.int32), ValueError, "dtype must be a float dtype"),
        (dict(d_model=36, num_heads=12, positional="rotary"), ValueError, "even head dim"),
    ],
)
def test_config_validation(kw, err, match):
    with pytest.raises(err, match=match):
        _tiny(**kw)


def test_presets_follow_the_paper():
    base, big = aj.TransformerConfig.base(), aj.TransformerConfig.big()
    assert (base.num_layers, base.d_model, base.d_ff, base.num_heads, base.dropout_rate) == (
        6, 512, 2048, 8, 0.1,
    )  # fmt: skip
    assert (big.num_layers, big.d_model, big.d_ff, big.num_heads, big.dropout_rate) == (
        6, 1024, 4096, 16, 0.3,
    )  # fmt: skip
    assert base.head_dim == 64 and big.head_dim == 64
    assert base.pre_ln is False and base.share_embeddings and base.positional == "sinusoidal"
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.d_model = 3


@pytest.mark.parametrize(
    "src, tgt, err, match",
    [
        (SRC.astype(np.float32), TGT, TypeError, "inputs must be integer token ids"),
        (SRC[0], TGT, ValueError, r"inputs must be \[B, T\] token ids"),
        (SRC, TGT + V, ValueError, r"targets holds ids outside \[0, 50\)"),
        (SRC - 1, TGT, ValueError, r"inputs holds ids outside \[0, 50\)"),
        (np.ones((2, 200), np.int32), TGT, ValueError, "length 200 > config.max_len=128"),
    ],
)
def test_bad_token_inputs(src, tgt, err, match):
    model = aj.Transformer(_tiny())
    variables = _init(model, SRC, TGT)
    with pytest.raises(err, match=match):
        model.apply(variables, src, tgt)


def test_bad_decode_inputs():
    model = aj.Transformer(_tiny())
    variables = _init(model, SRC, TGT)
    encoded = model.apply(variables, SRC, method="encode")
    with pytest.raises(ValueError, match="encoded must be"):
        model.apply(variables, encoded[:, :3], SRC, TGT, method="decode")
    with pytest.raises(ValueError, match="same batch size"):
        model.apply(variables, encoded, SRC, TGT[:1], method="decode")


def test_out_of_range_ids_under_jit_give_nan_not_silent_numbers():
    model = aj.TransformerLM(_tiny())
    variables = _init(model, TGT)
    logits = jax.jit(model.apply)(variables, jnp.asarray(TGT).at[0, 0].set(V + 3))
    assert np.all(np.isnan(logits[0]))  # position 0 poisons every later position of row 0
    assert np.all(np.isfinite(logits[1]))


def test_unshared_embeddings_with_a_separate_target_vocabulary():
    cfg = _tiny(share_embeddings=False, target_vocab_size=40)
    model = aj.Transformer(cfg)
    variables = _init(model, SRC, TGT)
    params = nn.unbox(variables["params"])
    assert params["embedding"]["embedding"].shape == (V, 32)
    assert params["target_embedding"]["embedding"].shape == (40, 32)
    assert params["decoder"]["logits"]["kernel"].shape == (32, 40)
    assert model.apply(variables, SRC, TGT).shape == (2, 7, 40)
    with pytest.raises(ValueError, match=r"targets holds ids outside \[0, 40\)"):
        model.apply(variables, SRC, np.full_like(TGT, 45))


def test_blockwise_attention_gives_the_same_model_as_xla():
    """attention_implementation='blockwise' (decoder self-attention via is_causal, padding via
    the mask) reproduces the dense model's loss and gradients."""
    cfgs = {
        impl: _tiny(attention_implementation=impl, dropout_rate=0.0)
        for impl in ("xla", "blockwise")
    }
    params = _init(aj.Transformer(cfgs["xla"]), SRC, TGT)["params"]
    weights = jnp.sin(jnp.arange(2 * 7 * V, dtype=jnp.float32)).reshape(2, 7, V)

    def loss(params, impl):
        return jnp.sum(weights * aj.Transformer(cfgs[impl]).apply({"params": params}, SRC, TGT))

    (a, ga), (b, gb) = (jax.value_and_grad(loss)(params, impl) for impl in ("xla", "blockwise"))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
