"""ImageFolder-layout datasets and the built-in training augmentation, without torchvision.

`FolderDataset` indexes ``root/<class>/**/<image>`` exactly like torchvision's
``ImageFolder``: classes are the sorted sub-directory names (index = position), samples are
listed class by class, walking each class directory in sorted order, and only files with one
of torchvision's ``IMG_EXTENSIONS`` (case-insensitive; `image_preprocess.IMG_EXTENSIONS`) are
kept. So ``class_to_idx`` and the sample order match ImageFolder's, and an ImageNet val
directory gets the standard class indices.

Evaluation reads images with the model's `image_preprocess.preprocessor` (the Classifier's
own preprocessing), training with `image_preprocess.load_image` (EXIF orientation, any mode to
RGB, the memory budget) before its augmentation.
"""
import functools
import math
import os
import stat
from pathlib import Path

import numpy as np
import torch

from vim_rpi import image_preprocess, paths
from vim_rpi.errors import DatasetError, SampleError, option, quoted

__all__ = [
    "DatasetError", "SampleError", "FolderDataset", "augmented",
    "find_classes", "make_samples", "split_dir", "RandomResizedCropFlip", "to_normalized_tensor",
    "build_train_transform",
]


def split_dir(data_path, split):
    """Return ``data_path/split`` when that directory exists, else ``data_path`` itself.

    Upstream expects ``DIR/train`` and ``DIR/val``; a plain ``DIR/<class>/...`` tree works too.
    """
    root = Path(data_path)
    problem, mode = paths.stat_path(root)
    if problem or not stat.S_ISDIR(mode):
        raise DatasetError(f"{problem or f'{root}: not a directory'}; {option('data_path')} takes a folder with one "
                           f"sub-folder per class, or with train/ and val/ inside")
    return root / split if os.path.isdir(root / split) else root


def find_classes(root):
    """Sorted class folder names of `root` and their indices, as ImageFolder.find_classes."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise DatasetError(f"no class folders in {root}: expected {root}/<class name>/<images>")
    return classes, {name: i for i, name in enumerate(classes)}


def make_samples(root, class_to_idx):
    """List of (path, class index) in ImageFolder order; every class must have an image."""
    samples, empty = [], []
    for name in sorted(class_to_idx):
        found = 0
        for dirpath, _, filenames in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for filename in sorted(filenames):
                if filename.lower().endswith(image_preprocess.IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, filename), class_to_idx[name]))
                    found += 1
        if not found:
            empty.append(name)
    if empty:
        shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise DatasetError(f"no images in {len(empty)} class folder(s) of {root}: {shown} "
                           f"(accepted extensions: {' '.join(image_preprocess.IMG_EXTENSIONS)})")
    return samples


class FolderDataset(torch.utils.data.Dataset):
    """``root/<class>/.../<image>`` -> (load(path), class index).

    Args:
        root: the directory holding one folder per class.
        load: picklable callable, image path -> tensor (3, H, W): for evaluation the model's
            `image_preprocess.preprocessor`, for training `augmented(transform)`.
    """

    def __init__(self, root, load):
        self.root = str(root)
        self.load = load
        try:
            self.classes, self.class_to_idx = find_classes(self.root)
            self.samples = make_samples(self.root, self.class_to_idx)
        except OSError as exc:  # e.g. a folder without read permission
            raise DatasetError(f"cannot list the images of {self.root}: {exc}") from None
        self.targets = [target for _, target in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            return self.load(path), target
        except (image_preprocess.ImageError, OSError, ValueError) as exc:
            raise SampleError(f"cannot read {path}: {quoted(exc)}") from None


def augmented(transform, max_image_mb=image_preprocess.DEFAULT_MAX_IMAGE_MB):
    """A FolderDataset loader for training: decode (`image_preprocess.load_image`, within the
    per-image memory budget `max_image_mb`), then `transform` (PIL RGB image -> tensor (3, H, W),
    e.g. `build_train_transform`'s)."""
    return functools.partial(_load_and_transform, transform, max_image_mb)


def _load_and_transform(transform, max_image_mb, path):
    return transform(image_preprocess.load_image(path, max_image_mb=max_image_mb))


class RandomResizedCropFlip:
    """Built-in training augmentation: random resized crop, random horizontal flip, normalize.

    The crop follows the usual Inception-style recipe (torchvision's RandomResizedCrop): up
    to 10 tries at an area fraction drawn from `scale` and a log-uniform aspect ratio from
    `ratio`; otherwise a center crop with the aspect ratio clamped to `ratio`. The crop is
    resized to (size, size) with bicubic interpolation. Randomness comes from torch's RNG,
    so ``--seed`` (and DataLoader worker seeding) make it reproducible.
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_prob=0.5):
        self.size = size
        self.scale = scale
        self.ratio = ratio
        self.flip_prob = flip_prob

    def crop_box(self, width, height):
        """(left, top, w, h) of the crop for an image of (width, height)."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(log_lo, log_hi))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, ()).item())
                left = int(torch.randint(0, width - w + 1, ()).item())
                return left, top, w, h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, image):
        """PIL RGB image -> normalized tensor (3, size, size), like the eval transform's output."""
        from PIL import Image

        left, top, w, h = self.crop_box(*image.size)
        image = image.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if torch.rand(()).item() < self.flip_prob:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(image)


def to_normalized_tensor(image):
    """PIL RGB image -> float32 tensor (3, H, W): [0, 1] then ImageNet mean/std, exactly as the
    last step of `image_preprocess.eval_transform`."""
    return image_preprocess.normalize(np.asarray(image, dtype=np.uint8))


def _uniform(low, high):
    return low + (high - low) * torch.rand(()).item()


def build_train_transform(input_size):
    """Training transform PIL -> tensor (3, input_size, input_size), and its description.

    Upstream's recipe (timm's create_transform: RandAugment, color jitter, random erasing) when
    timm imports; else the built-in random resized crop + flip. Both end with the same
    to-tensor and ImageNet normalization as evaluation.
    """
    try:
        from timm.data import create_transform
    except Exception:  # timm absent, or broken (on some boxes it raises RuntimeError at import)
        return RandomResizedCropFlip(input_size), "built-in random resized crop + horizontal flip"
    transform = create_transform(
        input_size=input_size, is_training=True, color_jitter=0.3,
        auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
        re_prob=0.25, re_mode="pixel", re_count=1)
    return transform, "timm RandAugment + random erasing (upstream recipe)"
