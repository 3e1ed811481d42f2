"""Window cross-attention from token features to the latent LR embedding (ClearSR's DPM layer).

ClearSR (paper 003, Sec. 3.2, Eq. 2) adds to the ControlNet's transformer blocks, after the text
cross-attention, a window-based cross-attention ("Detail Preserving Module"): the block's token features
x_d (L = H·W tokens, C channels) pass through a linear layer and are partitioned into S×S windows
(queries), the latent LR embedding x_lr (l tokens, c channels) passes through linear layers and is
partitioned into matching s×s windows (keys / values), and

    CA(Q, K, V) = Softmax(Q Kᵀ / √d_k + B) V                                        (Eq. 2)

with B an "aligned relative position embedding". The paper uses S = 16 (Appendix F, Table 6) and
reports a "DPM w/o window partition" ablation (Table 2). Choices made here (the paper leaves them open):

* ``kv_mode="window"`` (default): keys / values come from x_lr at its own resolution h = H·r
  (r = ``ratio`` = 2^level of the ControlNet level the block sits at), and the key window is the
  query window scaled by r (s = S·r), so a query window and its key window cover the same image region
  and no LR detail is thrown away. ``kv_mode="resize"``: x_lr is first resized to the query map
  (``F.interpolate`` mode ``"area"`` when it is larger, bilinear with ``align_corners=False`` and no
  antialiasing otherwise) and s = S; the bias table then uses r = 1 whatever ``ratio`` says.
* Aligned relative position bias: for query (qy, qx) in a wh×ww window and key (ky, kx) in the
  (wh·r)×(ww·r) key window the offset is (dy, dx) = (ky − qy·r, kx − qx·r), i.e. the key position
  relative to the key pixel aligned with the query's top-left corner. The learned table has side
  (2S − 1)·r per axis and index (dy + (S−1)·r)·side + (dx + (S−1)·r). For r = 1 this is Swin's
  relative position index up to the sign of the offset (Swin uses query − key; here key − query, i.e.
  index = side² − 1 − Swin's index, which for a learned table is the same parameterisation mirrored).
  B is added after the 1/√d_k scaling, as in Eq. 2 (``scaled_dot_product_attention`` with a float mask).
* ``window_size=None``: global cross-attention (each query attends to every key of its image), no
  position bias — the paper's "DPM w/o window partition" ablation.
* Maps smaller than the window: the effective window per axis is min(S, H) × min(S, W) (at levels
  smaller than the window the window is the whole map), logged once per module.
* Maps not divisible by the effective window: the query map is padded on the bottom / right by edge
  replication (``F.pad`` mode ``"replicate"``) to multiples of the window, and the output is cropped
  back; in window mode x_lr is cropped / edge-padded to exactly (Hp·r, Wp·r) (Hp × Wp the padded query
  size). Because padding replicates real tokens rather than inserting zeros, no attention mask is needed
  (edge keys merely appear more than once in the border windows). In window mode x_lr must correspond
  to the query map at ratio r: |h − H·r| < r and |w − W·r| < r (covers ceil-rounded odd latent sizes),
  otherwise ``ValueError``.
* LayerNorm on the query tokens only (x_lr is a raw 4-channel latent), linear q/k/v projections with
  bias, multi-head (d_k = dim / heads), output projection with weight and bias zero-initialised so the
  layer outputs exactly zero at init (ControlNet-style zero init); bias table trunc-normal(std 0.02).
* Computation runs in the tokens' dtype (x_lr and the bias are cast to it), batched over all windows.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "window_partition",
    "window_merge",
    "relative_position_index",
    "table_side",
    "WindowCrossAttention",
]

logger = logging.getLogger(__name__)
_SMALL_MAPS_LOGGED: set[tuple[int, int, int]] = set()  # (map h, map w, window): logged once per process

KV_MODES = ("window", "resize")


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B·nH·nW, wh·ww, C); windows batch-major then row-major, tokens row-major."""
    b, h, w, c = x.shape
    wh, ww = int(window[0]), int(window[1])
    if h % wh or w % ww:
        raise ValueError(f"window_partition: map {h}x{w} is not divisible by window {wh}x{ww}")
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (h // wh) * (w // ww), wh * ww, c)


def window_merge(windows: torch.Tensor, window: tuple[int, int], batch: int, height: int,
                 width: int) -> torch.Tensor:
    """Exact inverse of :func:`window_partition`: (B·nH·nW, wh·ww, C) -> (B, H, W, C)."""
    wh, ww = int(window[0]), int(window[1])
    if height % wh or width % ww:
        raise ValueError(f"window_merge: map {height}x{width} is not divisible by window {wh}x{ww}")
    nh, nw = height // wh, width // ww
    c = windows.shape[-1]
    x = windows.reshape(batch, nh, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height, width, c)


def table_side(window_size: int, ratio: int) -> int:
    """Side of the aligned relative-position table per axis: (2S − 1)·r."""
    return (2 * int(window_size) - 1) * int(ratio)


def relative_position_index(window: tuple[int, int], ratio: int = 1,
                            table_window: int | None = None) -> torch.Tensor:
    """Aligned relative position index, LongTensor (wh·ww, (wh·r)·(ww·r)).

    For query (qy, qx) and key (ky, kx): dy = ky − qy·r, dx = kx − qx·r and, with S = table_window
    (default max(wh, ww)) and side = (2S − 1)·r, index = (dy + (S−1)·r)·side + (dx + (S−1)·r).
    """
    wh, ww = int(window[0]), int(window[1])
    r = int(ratio)
    s = max(wh, ww) if table_window is None else int(table_window)
    if wh < 1 or ww < 1 or r < 1:
        raise ValueError(f"relative_position_index: window {window} and ratio {ratio} must be positive")
    if s < max(wh, ww):
        raise ValueError(f"relative_position_index: table_window {s} is smaller than window {wh}x{ww}")
    side = table_side(s, r)
    qy, qx = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ky, kx = torch.meshgrid(torch.arange(wh * r), torch.arange(ww * r), indexing="ij")
    dy = ky.reshape(1, -1) - qy.reshape(-1, 1) * r + (s - 1) * r
    dx = kx.reshape(1, -1) - qx.reshape(-1, 1) * r + (s - 1) * r
    return (dy * side + dx).long()


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"WindowCrossAttention: {name} must be a positive int{extra}, got {value!r}")


class WindowCrossAttention(nn.Module):
    """Multi-head (window) cross-attention from tokens (B, H·W, dim) to x_lr (B, kv_dim, h, w).

    See the module docstring for the exact semantics (ClearSR paper 003, Sec. 3.2, Eq. 2).
    """

    def __init__(self, dim: int, kv_dim: int, heads: int, window_size: int | None = 16,
                 ratio: int = 1, kv_mode: str = "window"):
        super().__init__()
        if kv_mode not in KV_MODES:
            raise ValueError(f"WindowCrossAttention: kv_mode must be one of {KV_MODES}, got {kv_mode!r}")
        _check_positive_int("dim", dim)
        _check_positive_int("kv_dim", kv_dim)
        _check_positive_int("heads", heads)
        if dim % heads:
            raise ValueError(f"WindowCrossAttention: dim {dim} is not divisible by heads {heads}")
        _check_positive_int("window_size", window_size, allow_none=True)
        _check_positive_int("ratio", ratio)
        self.dim, self.kv_dim, self.heads = dim, kv_dim, heads
        self.head_dim = dim // heads
        self.window_size = window_size
        self.ratio = ratio
        self.kv_mode = kv_mode
        # key window = query window × r_eff (r_eff = 1 when x_lr is resized to the query map)
        self.kv_ratio = ratio if kv_mode == "window" else 1

        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim, dim)
        self.to_v = nn.Linear(kv_dim, dim)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)
        if window_size is not None:
            side = table_side(window_size, self.kv_ratio)
            self.relative_position_bias = nn.Parameter(torch.zeros(side * side, heads))
            nn.init.trunc_normal_(self.relative_position_bias, std=0.02)
        else:
            self.register_parameter("relative_position_bias", None)
        self._index_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, kv_dim={self.kv_dim}, heads={self.heads}, window_size={self.window_size}, "
                f"ratio={self.ratio}, kv_mode={self.kv_mode!r}")

    # ------------------------------------------------------------------ helpers
    def _index(self, wh: int, ww: int, device: torch.device) -> torch.Tensor:
        key = (wh, ww, device)
        idx = self._index_cache.get(key)
        if idx is None:
            idx = relative_position_index((wh, ww), self.kv_ratio, self.window_size).to(device)
            self._index_cache[key] = idx
        return idx

    def _bias(self, wh: int, ww: int, dtype: torch.dtype) -> torch.Tensor:
        """(heads, wh·ww, wh·r·ww·r) additive bias, broadcast over windows by SDPA."""
        table = self.relative_position_bias
        idx = self._index(wh, ww, table.device)
        sq, sk = idx.shape
        return table[idx.reshape(-1)].reshape(sq, sk, self.heads).permute(2, 0, 1).to(dtype)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        return x.reshape(n, t, self.heads, self.head_dim).transpose(1, 2)

    def _resize_kv(self, x_lr: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if tuple(x_lr.shape[-2:]) == (h, w):
            return x_lr
        if x_lr.shape[-2] >= h and x_lr.shape[-1] >= w:
            return F.interpolate(x_lr, size=(h, w), mode="area")
        return F.interpolate(x_lr, size=(h, w), mode="bilinear", align_corners=False, antialias=False)

    @staticmethod
    def _fit(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Crop / edge-pad (bottom, right) a (B, C, h', w') map to exactly (h, w)."""
        x = x[..., :h, :w]
        ph, pw = h - x.shape[-2], w - x.shape[-1]
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return x

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, hw: tuple[int, int], x_lr: torch.Tensor) -> torch.Tensor:
        b, l, c = tokens.shape
        hq, wq = int(hw[0]), int(hw[1])
        if l != hq * wq:
            raise ValueError(f"WindowCrossAttention: {l} tokens do not match hw={hq}x{wq}")
        if c != self.dim:
            raise ValueError(f"WindowCrossAttention: tokens have {c} channels, expected {self.dim}")
        if x_lr.ndim != 4 or x_lr.shape[0] != b or x_lr.shape[1] != self.kv_dim:
            raise ValueError(f"WindowCrossAttention: x_lr must be (B={b}, {self.kv_dim}, h, w), "
                             f"got {tuple(x_lr.shape)}")
        dtype = tokens.dtype
        x_lr = x_lr.to(dtype)
        r = self.kv_ratio
        h_lr, w_lr = x_lr.shape[-2:]
        if self.kv_mode == "window" and self.window_size is not None:
            if abs(h_lr - hq * r) >= r or abs(w_lr - wq * r) >= r:
                raise ValueError(f"WindowCrossAttention: x_lr {h_lr}x{w_lr} does not match the query map "
                                 f"{hq}x{wq} at ratio {r} (expected about {hq * r}x{wq * r})")

        q = self.to_q(self.norm(tokens))  # (B, L, dim)

        if self.window_size is None:  # global cross-attention, no position bias
            if self.kv_mode == "resize":
                x_lr = self._resize_kv(x_lr, hq, wq)
            kv = x_lr.flatten(2).transpose(1, 2)  # (B, l, kv_dim)
            k, v = self.to_k(kv), self.to_v(kv)
            out = F.scaled_dot_product_attention(self._split_heads(q), self._split_heads(k),
                                                 self._split_heads(v))
            return self.to_out(out.transpose(1, 2).reshape(b, l, self.dim))

        s = self.window_size
        wh, ww = min(s, hq), min(s, wq)
        if (wh < s or ww < s) and (hq, wq, s) not in _SMALL_MAPS_LOGGED:
            logger.info("WindowCrossAttention: map %dx%d smaller than window %d; using window %dx%d "
                        "(the whole map along the short axes)", hq, wq, s, wh, ww)
            _SMALL_MAPS_LOGGED.add((hq, wq, s))
        hp, wp = math.ceil(hq / wh) * wh, math.ceil(wq / ww) * ww

        # queries: (B, H, W, dim), edge-padded to (Hp, Wp) (per-token ops commute with replication)
        q_map = q.reshape(b, hq, wq, self.dim)
        if (hp, wp) != (hq, wq):
            q_map = F.pad(q_map.permute(0, 3, 1, 2), (0, wp - wq, 0, hp - hq), mode="replicate")
            q_map = q_map.permute(0, 2, 3, 1)

        # keys / values source at (Hp·r, Wp·r)
        if self.kv_mode == "resize":
            x_lr = self._resize_kv(x_lr, hq, wq)
        x_lr = self._fit(x_lr, hp * r, wp * r)
        kv_map = x_lr.permute(0, 2, 3, 1)  # (B, Hp·r, Wp·r, kv_dim)
        k_map, v_map = self.to_k(kv_map), self.to_v(kv_map)

        qw = self._split_heads(window_partition(q_map, (wh, ww)))
        kw = self._split_heads(window_partition(k_map, (wh * r, ww * r)))
        vw = self._split_heads(window_partition(v_map, (wh * r, ww * r)))
        bias = self._bias(wh, ww, qw.dtype)
        out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=bias)  # (Bn, heads, wh·ww, dh)
        out = out.transpose(1, 2).reshape(-1, wh * ww, self.dim)
        out = window_merge(out, (wh, ww), b, hp, wp)[:, :hq, :wq]
        return self.to_out(out.reshape(b, l, self.dim))
