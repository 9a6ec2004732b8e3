"""vim/imagenet_labels.py and its data file."""

import pytest

from vim_rpi import imagenet_labels
from vim_rpi.imagenet_labels import imagenet_labels as labels


def test_thousand_distinct_clean_names():
    names = labels()
    assert len(names) == 1000
    assert len(set(names)) == 1000
    assert all(name and name == name.strip() and "\n" not in name for name in names)


@pytest.mark.parametrize(
    "index, name",
    # Well-known indices of the standard order (sorted WordNet ids).
    [(0, "tench"), (1, "goldfish"), (207, "golden retriever"), (281, "tabby"),
     (409, "analog clock"), (999, "toilet tissue")],
)
def test_standard_index_order(index, name):
    assert labels()[index] == name


def test_cached_and_safe_to_mutate():
    first = labels()
    first[0] = "changed"
    assert labels()[0] == "tench"


def write_lines(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def test_reads_crlf_file(tmp_path, monkeypatch):
    path = tmp_path / "labels.txt"
    path.write_bytes("".join(f"class {i}\r\n" for i in range(1000)).encode())
    monkeypatch.setattr(imagenet_labels, "LABELS_PATH", path)
    assert labels()[999] == "class 999"


@pytest.mark.parametrize(
    "lines, match",
    [
        ([f"c{i}" for i in range(999)], "999 lines"),
        ([f"c{i}" for i in range(1001)], "1001 lines"),
        ([f"c{i}" if i != 500 else "  " for i in range(1000)], "empty line 501"),
    ],
)
def test_corrupt_file(tmp_path, monkeypatch, lines, match):
    path = write_lines(tmp_path / "labels.txt", lines)
    monkeypatch.setattr(imagenet_labels, "LABELS_PATH", path)
    with pytest.raises(RuntimeError, match=match) as info:
        labels()
    assert "corrupt" in str(info.value) and str(path) in str(info.value)


def test_missing_file(tmp_path, monkeypatch):
    path = tmp_path / "gone.txt"
    monkeypatch.setattr(imagenet_labels, "LABELS_PATH", path)
    with pytest.raises(RuntimeError, match="cannot read the ImageNet label file"):
        labels()
