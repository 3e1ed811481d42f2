"""Tests for sr_lab.models.window_attention (ClearSR DPM window cross-attention, paper 003 Eq. 2)."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from sr_lab.models.window_attention import (
    WindowCrossAttention,
    relative_position_index,
    table_side,
    window_merge,
    window_partition,
)

# --------------------------------------------------------------------------- partition / merge


@pytest.mark.parametrize("window", [(4, 4), (2, 3), (8, 12)])
def test_partition_merge_roundtrip(window):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, 3, generator=g)
    wins = window_partition(x, window)
    wh, ww = window
    assert wins.shape == (2 * (8 // wh) * (12 // ww), wh * ww, 3)
    assert torch.equal(wins[0], x[0, :wh, :ww].reshape(-1, 3))
    # second window is the next one along the row (or the next row / batch if there is only one column)
    if 12 // ww > 1:
        assert torch.equal(wins[1], x[0, :wh, ww:2 * ww].reshape(-1, 3))
    # first window of batch 1
    assert torch.equal(wins[(8 // wh) * (12 // ww)], x[1, :wh, :ww].reshape(-1, 3))
    assert torch.equal(window_merge(wins, window, 2, 8, 12), x)


# --------------------------------------------------------------------------- relative position index

# Derived by hand: index = (ky - qy + S - 1) * (2S - 1) + (kx - qx + S - 1), rows = queries, cols = keys,
# both row-major inside the window.
EXPECTED_2x2 = [
    [4, 5, 7, 8],
    [3, 4, 6, 7],
    [1, 2, 4, 5],
    [0, 1, 3, 4],
]
EXPECTED_3x3 = [
    [12, 13, 14, 17, 18, 19, 22, 23, 24],
    [11, 12, 13, 16, 17, 18, 21, 22, 23],
    [10, 11, 12, 15, 16, 17, 20, 21, 22],
    [7, 8, 9, 12, 13, 14, 17, 18, 19],
    [6, 7, 8, 11, 12, 13, 16, 17, 18],
    [5, 6, 7, 10, 11, 12, 15, 16, 17],
    [2, 3, 4, 7, 8, 9, 12, 13, 14],
    [1, 2, 3, 6, 7, 8, 11, 12, 13],
    [0, 1, 2, 5, 6, 7, 10, 11, 12],
]
# S = 2, r = 2: key window 4x4, side = 3 * 2 = 6, index = (ky - 2 qy + 2) * 6 + (kx - 2 qx + 2).
EXPECTED_2x2_R2 = [
    [14, 15, 16, 17, 20, 21, 22, 23, 26, 27, 28, 29, 32, 33, 34, 35],
    [12, 13, 14, 15, 18, 19, 20, 21, 24, 25, 26, 27, 30, 31, 32, 33],
    [2, 3, 4, 5, 8, 9, 10, 11, 14, 15, 16, 17, 20, 21, 22, 23],
    [0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15, 18, 19, 20, 21],
]


def test_relative_position_index_tables():
    assert torch.equal(relative_position_index((2, 2)), torch.tensor(EXPECTED_2x2))
    assert torch.equal(relative_position_index((3, 3)), torch.tensor(EXPECTED_3x3))
    assert torch.equal(relative_position_index((2, 2), ratio=2), torch.tensor(EXPECTED_2x2_R2))
    assert torch.equal(relative_position_index((1, 1), ratio=2), torch.tensor([[0, 1, 2, 3]]))
    assert relative_position_index((3, 3)).dtype == torch.long
    assert table_side(2, 1) == 3 and table_side(3, 1) == 5 and table_side(2, 2) == 6 and table_side(16, 4) == 124


def test_relative_position_index_mirrors_swin_for_r1():
    # Swin's index uses (query - key); ours (key - query): ours = side^2 - 1 - swin.
    s = 3
    coords = torch.stack(torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (s - 1)
    swin = rel[..., 0] * (2 * s - 1) + rel[..., 1]
    assert torch.equal(relative_position_index((s, s)), (2 * s - 1) ** 2 - 1 - swin)


def test_relative_position_index_sub_window_in_larger_table():
    # Effective window (2, 3) with the table of a 4-window at ratio 2: all indices in range, and the
    # aligned zero offset (key = r·query) always maps to the table centre offset (S-1)·r on both axes.
    idx = relative_position_index((2, 3), ratio=2, table_window=4)
    side = table_side(4, 2)
    assert idx.shape == (6, 4 * 6)
    assert int(idx.min()) >= 0 and int(idx.max()) < side * side
    centre = 6 * side + 6
    for qy in range(2):
        for qx in range(3):
            assert int(idx[qy * 3 + qx, (2 * qy) * 6 + 2 * qx]) == centre


# --------------------------------------------------------------------------- naive reference


def _randomise(layer: WindowCrossAttention, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5)


def _edge(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, C, h', w') -> (B, C, h, w) by cropping / clamping indices (edge replication), explicitly."""
    ys = torch.clamp(torch.arange(h), max=t.shape[-2] - 1)
    xs = torch.clamp(torch.arange(w), max=t.shape[-1] - 1)
    return t[:, :, ys][:, :, :, xs]


def naive_reference(layer: WindowCrossAttention, tokens, hw, x_lr, kv_source=None):
    """Loops over batch, windows and heads; bias built from (dy, dx) looked up in the table.

    ``kv_source``: the (B, kv_dim, h, w) map keys come from (default x_lr, window mode).
    """
    b, l, dim = tokens.shape
    hq, wq = hw
    heads = layer.heads
    dh = dim // heads
    q_all = layer.to_q(layer.norm(tokens)).reshape(b, hq, wq, dim)
    src = x_lr if kv_source is None else kv_source
    out = torch.zeros(b, hq, wq, dim, dtype=tokens.dtype)
    if layer.window_size is None:
        kv = src.flatten(2).transpose(1, 2)
        k_all, v_all = layer.to_k(kv), layer.to_v(kv)
        for bi in range(b):
            qf = q_all[bi].reshape(l, dim)
            for h in range(heads):
                sl = slice(h * dh, (h + 1) * dh)
                scores = qf[:, sl] @ k_all[bi][:, sl].T / math.sqrt(dh)
                out[bi].reshape(l, dim)[:, sl] = torch.softmax(scores, -1) @ v_all[bi][:, sl]
        return layer.to_out(out.reshape(b, l, dim))

    s = layer.window_size
    r = layer.ratio if layer.kv_mode == "window" else 1
    wh, ww = min(s, hq), min(s, wq)
    hp, wp = -(-hq // wh) * wh, -(-wq // ww) * ww
    q_pad = _edge(q_all.permute(0, 3, 1, 2), hp, wp).permute(0, 2, 3, 1)
    src = _edge(src, hp * r, wp * r).permute(0, 2, 3, 1)
    k_all, v_all = layer.to_k(src), layer.to_v(src)
    side = (2 * s - 1) * r
    table = layer.relative_position_bias
    out_pad = torch.zeros(b, hp, wp, dim, dtype=tokens.dtype)
    qpos = [(qy, qx) for qy in range(wh) for qx in range(ww)]
    kpos = [(ky, kx) for ky in range(wh * r) for kx in range(ww * r)]
    for bi in range(b):
        for iy in range(hp // wh):
            for ix in range(wp // ww):
                qwin = q_pad[bi, iy * wh:(iy + 1) * wh, ix * ww:(ix + 1) * ww].reshape(-1, dim)
                ky0, kx0 = iy * wh * r, ix * ww * r
                kwin = k_all[bi, ky0:ky0 + wh * r, kx0:kx0 + ww * r].reshape(-1, dim)
                vwin = v_all[bi, ky0:ky0 + wh * r, kx0:kx0 + ww * r].reshape(-1, dim)
                res = torch.zeros(wh * ww, dim, dtype=tokens.dtype)
                for h in range(heads):
                    sl = slice(h * dh, (h + 1) * dh)
                    bias = torch.zeros(len(qpos), len(kpos), dtype=tokens.dtype)
                    for i, (qy, qx) in enumerate(qpos):
                        for j, (ky, kx) in enumerate(kpos):
                            dy, dx = ky - qy * r, kx - qx * r
                            bias[i, j] = table[(dy + (s - 1) * r) * side + (dx + (s - 1) * r), h]
                    scores = qwin[:, sl] @ kwin[:, sl].T / math.sqrt(dh) + bias
                    res[:, sl] = torch.softmax(scores, -1) @ vwin[:, sl]
                out_pad[bi, iy * wh:(iy + 1) * wh, ix * ww:(ix + 1) * ww] = res.reshape(wh, ww, dim)
    return layer.to_out(out_pad[:, :hq, :wq].reshape(b, l, dim))


def _area(x: torch.Tensor, f: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // f, f, w // f, f).mean(dim=(3, 5))


CASES = {
    # name: (window_size, ratio, kv_mode, (H, W), (h, w))
    "window_r2": (2, 2, "window", (4, 4), (8, 8)),
    "window_r1": (2, 1, "window", (4, 6), (4, 6)),
    "resize_area": (2, 2, "resize", (4, 4), (8, 8)),
    "resize_area_x3": (2, 3, "resize", (4, 4), (12, 12)),  # 3x: area differs from bilinear
    "resize_bilinear": (2, 1, "resize", (4, 4), (2, 2)),
    "global_window": (None, 2, "window", (3, 3), (6, 6)),
    "global_resize": (None, 2, "resize", (2, 2), (4, 4)),
    "smaller_than_window": (4, 2, "window", (2, 3), (4, 6)),
    "pad_window_r2": (2, 2, "window", (3, 5), (6, 10)),
    "pad_window_r2_short_lr": (2, 2, "window", (3, 5), (5, 9)),
    "pad_and_small": (4, 2, "window", (5, 3), (10, 6)),
    "pad_resize": (2, 2, "resize", (3, 3), (6, 6)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_naive_reference(name):
    window_size, ratio, kv_mode, (hq, wq), (h, w) = CASES[name]
    torch.manual_seed(0)
    dim, kv_dim, heads, b = 8, 4, 2, 2
    layer = WindowCrossAttention(dim, kv_dim, heads, window_size=window_size, ratio=ratio,
                                 kv_mode=kv_mode).double()
    _randomise(layer, seed=1)
    tokens = torch.randn(b, hq * wq, dim, dtype=torch.float64)
    x_lr = torch.randn(b, kv_dim, h, w, dtype=torch.float64)
    kv_source = None
    if kv_mode == "resize":
        if h >= hq:
            kv_source = _area(x_lr, h // hq)
        else:
            kv_source = torch.nn.functional.interpolate(x_lr, size=(hq, wq), mode="bilinear",
                                                        align_corners=False)
    with torch.no_grad():
        got = layer(tokens, (hq, wq), x_lr)
        ref = naive_reference(layer, tokens, (hq, wq), x_lr, kv_source)
    assert got.shape == (b, hq * wq, dim)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bias_and_window_matter():
    # guard against a reference that agrees for trivial reasons: changing the table changes the output,
    # and a window layer differs from the global one on the same weights.
    torch.manual_seed(0)
    layer = WindowCrossAttention(8, 4, 2, window_size=2, ratio=2).double()
    _randomise(layer, seed=2)
    tokens = torch.randn(1, 16, 8, dtype=torch.float64)
    x_lr = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        a = layer(tokens, (4, 4), x_lr)
        layer.relative_position_bias.add_(torch.randn_like(layer.relative_position_bias))
        b = layer(tokens, (4, 4), x_lr)
        glob = WindowCrossAttention(8, 4, 2, window_size=None, ratio=2).double()
        glob.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "relative_position_bias"})
        c = glob(tokens, (4, 4), x_lr)
    assert (a - b).abs().max() > 1e-3
    assert (b - c).abs().max() > 1e-3


def test_float32_and_dtype_cast():
    torch.manual_seed(0)
    layer = WindowCrossAttention(8, 4, 2, window_size=2, ratio=2)
    _randomise(layer, seed=3)
    tokens = torch.randn(2, 9, 8)
    x_lr = torch.randn(2, 4, 6, 6, dtype=torch.float64)  # cast to the tokens' dtype
    with torch.no_grad():
        got = layer(tokens, (3, 3), x_lr)
        ref = naive_reference(layer.double(), tokens.double(), (3, 3), x_lr)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_small_map_logged_once(caplog, monkeypatch):
    """Once per process and (map, window), however many layers (one per transformer block) see it."""
    import sr_lab.models.window_attention as wa

    monkeypatch.setattr(wa, "_SMALL_MAPS_LOGGED", set())
    layers = [WindowCrossAttention(8, 4, 2, window_size=4, ratio=1) for _ in range(2)]
    tokens, x_lr = torch.randn(1, 4, 8), torch.randn(1, 4, 2, 2)
    with caplog.at_level(logging.INFO, logger="sr_lab.models.window_attention"):
        for layer in layers:
            layer(tokens, (2, 2), x_lr)
            layer(tokens, (2, 2), x_lr)
    msgs = [r for r in caplog.records if r.name == "sr_lab.models.window_attention"]
    assert len(msgs) == 1


# --------------------------------------------------------------------------- init / gradients


def test_zero_output_at_init_and_gradients():
    torch.manual_seed(0)
    layer = WindowCrossAttention(8, 4, 2, window_size=2, ratio=2)
    tokens = torch.randn(2, 16, 8, requires_grad=True)
    x_lr = torch.randn(2, 4, 8, 8)
    out = layer(tokens, (4, 4), x_lr)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert layer.to_out.weight.grad.abs().sum() > 0  # to_out itself learns from step one

    layer.zero_grad()
    with torch.no_grad():
        layer.to_out.weight.normal_()
    (layer(tokens, (4, 4), x_lr) * torch.randn(2, 16, 8)).sum().backward()
    for p in (layer.to_q.weight, layer.to_k.weight, layer.to_v.weight, layer.relative_position_bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_bias_table_shape_and_init():
    layer = WindowCrossAttention(8, 4, 2, window_size=16, ratio=4)
    assert layer.relative_position_bias.shape == (table_side(16, 4) ** 2, 2)
    assert 0 < layer.relative_position_bias.std() < 0.05
    resized = WindowCrossAttention(8, 4, 2, window_size=16, ratio=4, kv_mode="resize")
    assert resized.relative_position_bias.shape == (31 * 31, 2)
    assert WindowCrossAttention(8, 4, 2, window_size=None).relative_position_bias is None


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs", [
    dict(kv_mode="nearest"),
    dict(heads=3),
    dict(window_size=0),
    dict(window_size=-2),
    dict(window_size=2.0),
    dict(ratio=0),
    dict(ratio=1.5),
])
def test_bad_arguments(kwargs):
    args = dict(dim=8, kv_dim=4, heads=2)
    args.update(kwargs)
    with pytest.raises(ValueError):
        WindowCrossAttention(**args)


def test_bad_forward_inputs():
    layer = WindowCrossAttention(8, 4, 2, window_size=2, ratio=2)
    with pytest.raises(ValueError):
        layer(torch.randn(1, 15, 8), (4, 4), torch.randn(1, 4, 8, 8))  # L != H·W
    with pytest.raises(ValueError):
        layer(torch.randn(1, 16, 8), (4, 4), torch.randn(1, 4, 4, 4))  # x_lr not at ratio 2
    with pytest.raises(ValueError):
        layer(torch.randn(1, 16, 8), (4, 4), torch.randn(1, 3, 8, 8))  # wrong kv channels
