"""HR image data: robust loading, folder datasets addressed by sample counter, and the SR datamodule."""
from .datamodule import CounterSampler, SRDataModule, collate_hr
from .folder import HRFolderDataset, check_hr_folder
from .images import ImageReadError, probe_image, read_rgb_uint8
from .samples import IMAGE_EXTENSIONS, find_images, sample_image_dir

__all__ = [
    "SRDataModule",
    "HRFolderDataset",
    "check_hr_folder",
    "CounterSampler",
    "collate_hr",
    "find_images",
    "sample_image_dir",
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "probe_image",
    "read_rgb_uint8",
]
