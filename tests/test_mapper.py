"""Tests for nanocap.mapper: shapes, ClipCap layer sizes, build_mapper, gradients."""

import pytest
import torch

from nanocap.mapper import MLPMapper, TransformerMapper, build_mapper

torch.manual_seed(0)
TINY = dict(clip_dim=16, prefix_len=4, n_embd=32)


def test_mlp_shape():
    m = MLPMapper(**TINY)
    out = m(torch.randn(3, 16))
    assert out.shape == (3, 4, 32)


def test_mlp_forward_is_linear_tanh_linear():
    m = MLPMapper(**TINY)
    x = torch.randn(3, 16)
    expected = m.fc2(torch.tanh(m.fc1(x))).view(3, 4, 32)
    torch.testing.assert_close(m(x), expected)


def test_mlp_clipcap_layer_sizes():
    m = MLPMapper(clip_dim=512, prefix_len=10, n_embd=768)
    assert (m.fc1.in_features, m.fc1.out_features) == (512, 3840)
    assert (m.fc2.in_features, m.fc2.out_features) == (3840, 7680)
    assert isinstance(m.act, torch.nn.Tanh)


def test_transformer_shape_default_clip_len():
    m = TransformerMapper(**TINY, n_layer=2, n_head=4)
    assert m.clip_len == 4
    out = m(torch.randn(3, 16))
    assert out.shape == (3, 4, 32)


def test_transformer_prefix_len_differs_from_clip_len():
    m = TransformerMapper(clip_dim=16, prefix_len=5, n_embd=32, clip_len=3, n_layer=2, n_head=4)
    assert m.linear.out_features == 3 * 32
    assert m.prefix_const.shape == (5, 32)
    assert len(m.blocks) == 2
    out = m(torch.randn(2, 16))
    assert out.shape == (2, 5, 32)


def test_transformer_output_depends_on_image():
    # the prefix is read at the constant positions, so it must still see the image
    m = TransformerMapper(**TINY, n_layer=2, n_head=4).eval()
    x = torch.randn(2, 16)
    out = m(x)
    assert not torch.allclose(out[0], out[1])


def test_transformer_prefix_is_read_at_constant_positions():
    # with no blocks, the prefix is exactly the learned constants
    m0 = TransformerMapper(clip_dim=16, prefix_len=5, n_embd=32, clip_len=3, n_layer=0, n_head=4)
    torch.testing.assert_close(m0(torch.randn(2, 16)), m0.prefix_const.expand(2, -1, -1))
    # with blocks: [clip tokens ; constants] -> blocks -> last prefix_len positions
    m = TransformerMapper(clip_dim=16, prefix_len=5, n_embd=32, clip_len=3, n_layer=2, n_head=4).eval()
    x = torch.randn(2, 16)
    h = torch.cat([m.linear(x).view(2, 3, 32), m.prefix_const.expand(2, -1, -1)], dim=1)
    for block in m.blocks:
        h = block(h)
    torch.testing.assert_close(m(x), h[:, 3:])


def test_transformer_bad_heads():
    with pytest.raises(ValueError, match="divisible"):
        TransformerMapper(clip_dim=16, prefix_len=4, n_embd=30, n_head=4)


def test_build_mapper_and_config_roundtrip():
    mlp = build_mapper("mlp", **TINY)
    tr = build_mapper("transformer", **TINY, clip_len=2, n_layer=1, n_head=4)
    assert isinstance(mlp, MLPMapper) and isinstance(tr, TransformerMapper)
    x = torch.randn(2, 16)
    assert mlp(x).shape == (2, 4, 32)
    assert tr(x).shape == (2, 4, 32)
    # the stored config rebuilds an identical module that loads the same weights
    for m in (mlp, tr):
        m2 = build_mapper(**m.config)
        assert type(m2) is type(m) and m2.config == m.config
        m2.load_state_dict(m.state_dict())
        torch.testing.assert_close(m2.eval()(x), m.eval()(x))
    assert tr.config == dict(kind="transformer", clip_dim=16, prefix_len=4, n_embd=32,
                             clip_len=2, n_layer=1, n_head=4)
    assert mlp.config == dict(kind="mlp", clip_dim=16, prefix_len=4, n_embd=32)


def test_build_mapper_unknown_kind():
    with pytest.raises(ValueError, match="mlp.*transformer"):
        build_mapper("lstm", **TINY)


@pytest.mark.parametrize("kind,kwargs", [("mlp", {}), ("transformer", dict(n_layer=2, n_head=4))])
def test_gradients_reach_all_params(kind, kwargs):
    m = build_mapper(kind, **TINY, **kwargs)
    out = m(torch.randn(3, 16))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
