"""The 1000 ImageNet-1k class names, in the standard index order (0 = tench).

The names ship in ``data/imagenet1k_labels.txt`` (one per line, extracted from torchvision's
wheel by ``scripts/extract_imagenet_labels.py``), so nothing is fetched or imported at run time.
"""

import functools
import pathlib

__all__ = ["LABELS_PATH", "NUM_CLASSES", "imagenet_labels"]

LABELS_PATH = pathlib.Path(__file__).resolve().parent / "data" / "imagenet1k_labels.txt"
NUM_CLASSES = 1000


def imagenet_labels() -> list[str]:
    """Return the 1000 class names; index i is the name of logit i.

    Raises:
        RuntimeError: the data file is missing or is not exactly 1000 non-empty lines.
    """
    return list(_read_labels(LABELS_PATH))


@functools.lru_cache(maxsize=None)
def _read_labels(path: pathlib.Path) -> tuple[str, ...]:
    hint = "restore it from the repository (git checkout -- vim/data/imagenet1k_labels.txt)"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuntimeError(f"cannot read the ImageNet label file {path}: {exc}; {hint}") from None
    labels = tuple(line.strip() for line in text.splitlines())
    empty = [i + 1 for i, name in enumerate(labels) if not name]
    if len(labels) != NUM_CLASSES or empty:
        detail = f"{len(labels)} lines" if len(labels) != NUM_CLASSES else f"empty line {empty[0]}"
        raise RuntimeError(
            f"the ImageNet label file {path} is corrupt ({detail}; expected {NUM_CLASSES} "
            f"non-empty lines); {hint}"
        )
    return labels
