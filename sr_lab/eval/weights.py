"""Local weight files of the pyiqa metrics: what each metric needs, where it is looked up, and how
pyiqa is made to load it without touching the network.

File names are the ones pyiqa 0.1.16 / torchvision / openai-clip ask for (read in their sources):

=========  ==========================================  =========================================
metric     file                                        who loads it (and from where by default)
=========  ==========================================  =========================================
lpips      ``LPIPS_v0.1_alex-df73285e.pth``            pyiqa ``load_file_from_url`` ($TORCH_HOME/hub/pyiqa)
           ``alexnet-owt-7be5be79.pth``                torchvision AlexNet IMAGENET1K_V1 ($TORCH_HOME/hub/checkpoints)
dists      ``DISTS_weights-f5e65c96.pth``              pyiqa
           ``vgg16-397923af.pth``                      torchvision VGG16 IMAGENET1K_V1
fid        ``pt_inception-2015-12-05-6726825d.pth``    pyiqa (pytorch-fid Inception)
niqe       ``niqe_modelparameters.mat``                pyiqa
musiq      ``musiq_koniq_ckpt-e95806b9.pth``           pyiqa (KonIQ model)
maniqa     ``MANIQA_PIPAL-ae6d356b.pth`` (maniqa-pipal) pyiqa; or ``ckpt_koniq10k.pt`` (maniqa, KonIQ)
clipiqa    ``RN50.pt``                                 openai-clip via pyiqa ($TORCH_HOME/hub/clip, sha256-checked)
=========  ==========================================  =========================================

MANIQA's timm ViT-B/8 ImageNet weights are *not* needed: pyiqa loads the whole network, ViT
included, strictly from the MANIQA checkpoint, so sr_lab builds the ViT with ``pretrained=False``.
PSNR and SSIM need no file.

Lookup order for every file (the first folder that has it wins): ``metrics.weights_dir``,
``$SR_LAB_WEIGHTS``, ``$TORCH_HOME/hub/checkpoints`` (see :mod:`sr_lab.utils.weights`), then the
loader's own cache folder from the table. A flat folder holding all files is enough.

Loading without network (:func:`offline_loading`): the files found are linked into a private
staging folder laid out as a torch hub cache (``hub/pyiqa``, ``hub/checkpoints``, ``hub/clip``);
while a metric is built, ``torch.hub`` points at it, pyiqa's download cache
(``pyiqa.utils.download_util.DEFAULT_CACHE_DIR``) points at ``hub/pyiqa`` and ``HF_HUB_OFFLINE=1``.
Every loader then finds its file in place and never downloads. Missing files are detected
*before* a metric is built (:func:`missing_files`), so nothing ever tries the network.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sr_lab.utils.weights import search_dirs, torch_hub_checkpoints

__all__ = ["WeightFile", "METRIC_FILES", "required_files", "locate", "missing_files", "missing_message",
           "stage_files", "offline_loading"]

_HF = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"


@dataclass(frozen=True)
class WeightFile:
    """One weight file: its name, the torch-hub sub-folder its loader reads, and where it is published."""

    name: str
    cache: str  # "pyiqa" | "checkpoints" | "clip"
    purpose: str
    url: str


_ALEX = WeightFile("alexnet-owt-7be5be79.pth", "checkpoints", "torchvision AlexNet ImageNet weights",
                   "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth")
_VGG = WeightFile("vgg16-397923af.pth", "checkpoints", "torchvision VGG16 ImageNet weights",
                  "https://download.pytorch.org/models/vgg16-397923af.pth")


def _pyiqa(name: str, purpose: str) -> WeightFile:
    return WeightFile(name, "pyiqa", purpose, _HF + name)


#: files each sr_lab metric needs (keyed by the sr_lab metric name; maniqa by its pyiqa name)
METRIC_FILES: dict[str, tuple[WeightFile, ...]] = {
    "psnr": (),
    "ssim": (),
    "lpips": (_pyiqa("LPIPS_v0.1_alex-df73285e.pth", "LPIPS v0.1 alex linear layers"), _ALEX),
    "dists": (_pyiqa("DISTS_weights-f5e65c96.pth", "DISTS alpha/beta"), _VGG),
    "fid": (_pyiqa("pt_inception-2015-12-05-6726825d.pth", "pytorch-fid InceptionV3"),),
    "niqe": (_pyiqa("niqe_modelparameters.mat", "NIQE pristine model"),),
    "musiq": (_pyiqa("musiq_koniq_ckpt-e95806b9.pth", "MUSIQ KonIQ-10k"),),
    "maniqa-pipal": (_pyiqa("MANIQA_PIPAL-ae6d356b.pth", "MANIQA PIPAL"),),
    "maniqa": (_pyiqa("ckpt_koniq10k.pt", "MANIQA KonIQ-10k"),),
    "clipiqa": (WeightFile("RN50.pt", "clip", "OpenAI CLIP RN50",
                           "https://openaipublic.azureedge.net/clip/models/"
                           "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt"),),
}


def required_files(pyiqa_name: str) -> tuple[WeightFile, ...]:
    """Files needed by the pyiqa metric ``pyiqa_name`` (``KeyError`` if sr_lab does not know it)."""
    key = {"psnry": "psnr"}.get(pyiqa_name, pyiqa_name)
    return METRIC_FILES[key]


def _dirs(wf: WeightFile, weights_dir: str | Path | None) -> list[Path]:
    dirs = search_dirs(weights_dir) + [torch_hub_checkpoints().parent / wf.cache]
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def locate(wf: WeightFile, weights_dir: str | Path | None = None) -> Path | None:
    """Path of ``wf`` in the first search folder that holds it, else None."""
    for d in _dirs(wf, weights_dir):
        if (d / wf.name).is_file():
            return d / wf.name
    return None


def missing_files(pyiqa_name: str, weights_dir: str | Path | None = None) -> list[WeightFile]:
    """The files of ``pyiqa_name`` that are found in no search folder."""
    return [wf for wf in required_files(pyiqa_name) if locate(wf, weights_dir) is None]


def missing_message(metric: str, missing: list[WeightFile], weights_dir: str | Path | None = None) -> str:
    """One line: which file(s) a metric lacks and the folder to put them in."""
    folder = _dirs(missing[0], weights_dir)[0]
    names = ", ".join(f"{wf.name} ({wf.purpose}; {wf.url})" for wf in missing)
    return (f"metric {metric} unavailable: missing weight file(s) {names}; put them in {folder} "
            f"(metrics.weights_dir, or set SR_LAB_WEIGHTS / TORCH_HOME)")


_STAGE: Path | None = None


def _stage_root() -> Path:
    global _STAGE
    if _STAGE is None:
        _STAGE = Path(tempfile.mkdtemp(prefix="sr_lab_iqa_weights_"))
        atexit.register(shutil.rmtree, _STAGE, ignore_errors=True)
    return _STAGE


def _link(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        if dst.resolve() == src.resolve():
            return
        dst.unlink()
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # file systems without symlinks
        shutil.copy2(src, dst)


def stage_files(pyiqa_name: str, weights_dir: str | Path | None = None) -> Path:
    """Link the files of ``pyiqa_name`` into the staging hub folder; returns that ``hub`` folder.

    Raises ``FileNotFoundError`` if a file is missing (call :func:`missing_files` first).
    """
    hub = _stage_root() / "hub"
    for wf in required_files(pyiqa_name):
        src = locate(wf, weights_dir)
        if src is None:
            raise FileNotFoundError(missing_message(pyiqa_name, [wf], weights_dir))
        (hub / wf.cache).mkdir(parents=True, exist_ok=True)
        _link(src, hub / wf.cache / wf.name)
    return hub


@contextlib.contextmanager
def offline_loading(hub: Path, *, vit_pretrained: bool = True):
    """Within the block, torch hub / pyiqa / Hugging Face loaders read ``hub`` and never download.

    ``vit_pretrained=False`` also makes ``timm.create_model`` ignore ``pretrained=True`` (MANIQA,
    whose checkpoint holds the ViT weights).
    """
    import torch.hub
    from pyiqa.utils import download_util

    old_hub = getattr(torch.hub, "_hub_dir", None)
    old_cache = download_util.DEFAULT_CACHE_DIR
    old_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    patched_timm = None
    torch.hub.set_dir(str(hub))
    download_util.DEFAULT_CACHE_DIR = str(hub / "pyiqa")
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if not vit_pretrained:
        import timm

        patched_timm = timm.create_model

        def create_model(*args, **kwargs):
            kwargs["pretrained"] = False
            return patched_timm(*args, **kwargs)

        timm.create_model = create_model
    try:
        yield
    finally:
        torch.hub._hub_dir = old_hub
        download_util.DEFAULT_CACHE_DIR = old_cache
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if patched_timm is not None:
            import timm

            timm.create_model = patched_timm
