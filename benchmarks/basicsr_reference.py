"""The Real-ESRGAN degradation as a BasicSR user has it, for ``benchmarks/degradation.py --reference basicsr``.

Not a dependency of sr_lab: install BasicSR into the environment for the benchmark only,

    .venv/bin/pip install basicsr==1.4.2 --no-deps

(its other requirements — opencv, scipy, numpy, torchvision, pyyaml, addict, ... — are already there;
``--no-deps`` keeps pip from touching torch). BasicSR 1.4.2's ``basicsr/data/degradations.py`` imports
``torchvision.transforms.functional_tensor``, which torchvision removed (0.17); :func:`load_basicsr`
aliases it to ``torchvision.transforms.functional`` (which has ``rgb_to_grayscale``) before importing.

What runs, built only from BasicSR's public functions, in the reference's order:

1. per sample on the CPU with numpy / ``random`` (``RealESRGANDataset.__getitem__``, which BasicSR runs in
   its DataLoader workers): kernel 1 and 2 (``random_mixed_kernels`` or, with ``sinc_prob``,
   ``circular_lowpass_kernel``; size drawn from 7..21, padded to 21) and the final sinc kernel (or the
   pulse);
2. on the device (``RealESRGANModel.feed_data``): ``USMSharp`` of the GT, ``filter2D``, random resize,
   ``random_add_gaussian_noise_pt`` / ``random_add_poisson_noise_pt``, ``DiffJPEG``, the second order, the
   final [resize + sinc, JPEG] in random order, 8-bit rounding, ``paired_random_crop``.

One change: the image is made contiguous before ``filter2D``. With current torch, ``DiffJPEG`` returns a
channels-last-strided tensor, ``F.interpolate`` keeps that layout, and BasicSR 1.4.2's ``filter2D`` calls
``.view`` on it, which fails ("view size is not compatible ...") in the JPEG-first final order; the copy
costs one read and write of the LR.

Left out: the training-pair pool and the second USM after it (sr_lab's pool is in the data module,
``data.pair_pool_size``, and not part of the degradation benchmark). The reference draws from the global
``random`` / ``numpy`` / ``torch`` generators, as BasicSR does; this module seeds them once.
"""
from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["load_basicsr", "BasicSRRealESRGAN", "X4PLUS", "INSTALL_HINT"]

INSTALL_HINT = "pip install basicsr==1.4.2 --no-deps"

#: Real-ESRGAN x4plus (BasicSR options/train_realesrgan_x4plus.yml): dataset (kernels) and model (feed_data) keys.
X4PLUS: dict[str, Any] = dict(
    scale=4,
    blur_kernel_size=21, kernel_list=["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                                      "plateau_aniso"],
    kernel_prob=[0.45, 0.25, 0.12, 0.03, 0.12, 0.03], sinc_prob=0.1, blur_sigma=[0.2, 3], betag_range=[0.5, 4],
    betap_range=[1, 2],
    blur_kernel_size2=21, kernel_list2=None, kernel_prob2=None, sinc_prob2=0.1, blur_sigma2=[0.2, 1.5],
    betag_range2=[0.5, 4], betap_range2=[1, 2], final_sinc_prob=0.8,
    resize_prob=[0.2, 0.7, 0.1], resize_range=[0.15, 1.5], gaussian_noise_prob=0.5, noise_range=[1, 30],
    poisson_scale_range=[0.05, 3], gray_noise_prob=0.4, jpeg_range=[30, 95],
    second_blur_prob=0.8, resize_prob2=[0.3, 0.4, 0.3], resize_range2=[0.3, 1.2], gaussian_noise_prob2=0.5,
    noise_range2=[1, 25], poisson_scale_range2=[0.05, 2.5], gray_noise_prob2=0.4, jpeg_range2=[30, 95],
)


def load_basicsr():
    """``(version, namespace of the BasicSR functions used)``; raises ``ImportError`` with the reason."""
    import torchvision.transforms.functional as tvf

    sys.modules.setdefault("torchvision.transforms.functional_tensor", tvf)  # removed in torchvision 0.17
    try:
        import basicsr
        from basicsr.data.degradations import (
            circular_lowpass_kernel,
            random_add_gaussian_noise_pt,
            random_add_poisson_noise_pt,
            random_mixed_kernels,
        )
        from basicsr.data.transforms import paired_random_crop
        from basicsr.utils import DiffJPEG, USMSharp
        from basicsr.utils.img_process_util import filter2D
    except Exception as exc:  # noqa: BLE001 - not installed, or an import of its own failing
        raise ImportError(f"{type(exc).__name__}: {exc}") from exc
    ns = dict(circular_lowpass_kernel=circular_lowpass_kernel, random_mixed_kernels=random_mixed_kernels,
              random_add_gaussian_noise_pt=random_add_gaussian_noise_pt,
              random_add_poisson_noise_pt=random_add_poisson_noise_pt, paired_random_crop=paired_random_crop,
              DiffJPEG=DiffJPEG, USMSharp=USMSharp, filter2D=filter2D)
    return getattr(basicsr, "__version__", "?"), type("BasicSR", (), ns)


@dataclass
class BasicSRRealESRGAN:
    """``ref.kernels(b)`` (CPU, per sample) then ``ref.degrade(gt, kernels)`` (device) -> ``(gt_usm, lq)``.

    ``opt``: BasicSR's option keys (:data:`X4PLUS` by default; a preset's values override them).
    """

    device: torch.device
    opt: dict[str, Any] = field(default_factory=lambda: dict(X4PLUS))
    seed: int = 0

    def __post_init__(self):
        self.version, self.b = load_basicsr()
        opt = {**X4PLUS, **self.opt}
        opt["kernel_list2"] = opt["kernel_list2"] or opt["kernel_list"]
        opt["kernel_prob2"] = opt["kernel_prob2"] or opt["kernel_prob"]
        self.opt = opt
        self.kernel_range = [2 * v + 1 for v in range(3, 11)]  # 7 .. 21, as RealESRGANDataset
        self.pulse_tensor = torch.zeros(21, 21).float()
        self.pulse_tensor[10, 10] = 1
        self.jpeger = self.b.DiffJPEG(differentiable=False).to(self.device)
        self.usm_sharpener = self.b.USMSharp().to(self.device)
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)

    # -- RealESRGANDataset.__getitem__: kernels, per sample, numpy on the CPU -------------------------------
    def _blur_kernel(self, second: bool) -> np.ndarray:
        o, s = self.opt, "2" if second else ""
        kernel_size = random.choice(self.kernel_range)
        if np.random.uniform() < o["sinc_prob" + s]:
            omega_c = np.random.uniform(np.pi / 3, np.pi) if kernel_size < 13 else np.random.uniform(np.pi / 5, np.pi)
            kernel = self.b.circular_lowpass_kernel(omega_c, kernel_size, pad_to=False)
        else:
            kernel = self.b.random_mixed_kernels(
                o["kernel_list" + s], o["kernel_prob" + s], kernel_size, o["blur_sigma" + s], o["blur_sigma" + s],
                [-math.pi, math.pi], o["betag_range" + s], o["betap_range" + s], noise_range=None)
        pad_size = (21 - kernel_size) // 2
        return np.pad(kernel, ((pad_size, pad_size), (pad_size, pad_size)))

    def kernels(self, b: int) -> dict[str, torch.Tensor]:
        """The three kernels of ``b`` samples, stacked as the DataLoader would (CPU tensors)."""
        k1, k2, sinc = [], [], []
        for _ in range(b):
            k1.append(torch.FloatTensor(self._blur_kernel(False)))
            k2.append(torch.FloatTensor(self._blur_kernel(True)))
            if np.random.uniform() < self.opt["final_sinc_prob"]:
                kernel_size = random.choice(self.kernel_range)
                omega_c = np.random.uniform(np.pi / 3, np.pi)
                sinc.append(torch.FloatTensor(self.b.circular_lowpass_kernel(omega_c, kernel_size, pad_to=21)))
            else:
                sinc.append(self.pulse_tensor)
        return {"kernel1": torch.stack(k1), "kernel2": torch.stack(k2), "sinc_kernel": torch.stack(sinc)}

    # -- RealESRGANModel.feed_data: the device part ---------------------------------------------------------
    def _noise(self, out: torch.Tensor, s: str) -> torch.Tensor:
        o = self.opt
        if np.random.uniform() < o["gaussian_noise_prob" + s]:
            return self.b.random_add_gaussian_noise_pt(out, sigma_range=o["noise_range" + s], clip=True, rounds=False,
                                                       gray_prob=o["gray_noise_prob" + s])
        return self.b.random_add_poisson_noise_pt(out, scale_range=o["poisson_scale_range" + s],
                                                  gray_prob=o["gray_noise_prob" + s], clip=True, rounds=False)

    def _resize_scale(self, s: str) -> float:
        o = self.opt
        updown_type = random.choices(["up", "down", "keep"], o["resize_prob" + s])[0]
        if updown_type == "up":
            return np.random.uniform(1, o["resize_range" + s][1])
        if updown_type == "down":
            return np.random.uniform(o["resize_range" + s][0], 1)
        return 1

    def _filter2D(self, img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        return self.b.filter2D(img.contiguous(), kernel)  # see the module docstring

    def _jpeg(self, out: torch.Tensor, s: str) -> torch.Tensor:
        jpeg_p = out.new_zeros(out.size(0)).uniform_(*self.opt["jpeg_range" + s])
        return self.jpeger(torch.clamp(out, 0, 1), quality=jpeg_p)

    @torch.no_grad()
    def degrade(self, gt: torch.Tensor, kernels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """GT (B, 3, H, W) in [0, 1] on the device -> ``(gt_usm, lq)``, as ``feed_data`` (before the pool)."""
        o, b, scale = self.opt, self.b, int(self.opt["scale"])
        gt_usm = self.usm_sharpener(gt)
        kernel1, kernel2, sinc_kernel = (kernels[k].to(self.device) for k in ("kernel1", "kernel2", "sinc_kernel"))
        ori_h, ori_w = gt.size()[2:4]
        # first degradation
        out = self._filter2D(gt_usm, kernel1)
        out = F.interpolate(out, scale_factor=self._resize_scale(""),
                            mode=random.choice(["area", "bilinear", "bicubic"]))
        out = self._jpeg(self._noise(out, ""), "")
        # second degradation
        if np.random.uniform() < o["second_blur_prob"]:
            out = self._filter2D(out, kernel2)
        s2 = self._resize_scale("2")
        out = F.interpolate(out, size=(int(ori_h / scale * s2), int(ori_w / scale * s2)),
                            mode=random.choice(["area", "bilinear", "bicubic"]))
        out = self._noise(out, "2")
        # final: [resize back + sinc] and JPEG in random order
        if np.random.uniform() < 0.5:
            out = F.interpolate(out, size=(ori_h // scale, ori_w // scale),
                                mode=random.choice(["area", "bilinear", "bicubic"]))
            out = self._jpeg(self._filter2D(out, sinc_kernel), "2")
        else:
            out = self._jpeg(out, "2")
            out = F.interpolate(out, size=(ori_h // scale, ori_w // scale),
                                mode=random.choice(["area", "bilinear", "bicubic"]))
            out = self._filter2D(out, sinc_kernel)
        lq = torch.clamp((out * 255.0).round(), 0, 255) / 255.0
        (gt, gt_usm), lq = b.paired_random_crop([gt, gt_usm], lq, ori_h, scale)  # gt_size = the crop: no-op crop
        return gt_usm, lq.contiguous()


def preset_options(deg_cfg: Any) -> dict[str, Any]:
    """BasicSR option values from an sr_lab Real-ESRGAN-family preset's config node (same key names)."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(deg_cfg, resolve=True) if OmegaConf.is_config(deg_cfg) else dict(deg_cfg)
    return {k: node[k] for k in X4PLUS if k in node and node[k] is not None}
