"""Extract the ImageNet-1k class names from a torchvision wheel into vim/data/.

Run once, offline from the model code: torchvision is never imported (it may not import on the
target machine); its ``torchvision/models/_meta.py`` is parsed with ``ast`` instead.

    pip download --no-deps torchvision -d /tmp/tv
    python scripts/extract_imagenet_labels.py /tmp/tv/torchvision-*.whl
"""

import argparse
import ast
import pathlib
import sys
import zipfile

META_PATH = "torchvision/models/_meta.py"
OUT_PATH = pathlib.Path(__file__).resolve().parent.parent / "vim" / "data" / "imagenet1k_labels.txt"


def read_categories(wheel: pathlib.Path) -> list[str]:
    """Return the ``_IMAGENET_CATEGORIES`` list literal from the wheel's _meta.py."""
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read(META_PATH).decode("utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_IMAGENET_CATEGORIES" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{wheel}: no _IMAGENET_CATEGORIES in {META_PATH}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=pathlib.Path, help="a torchvision wheel (.whl)")
    parser.add_argument("-o", "--output", type=pathlib.Path, default=OUT_PATH)
    args = parser.parse_args()
    labels = read_categories(args.wheel)
    if len(labels) != 1000 or len(set(labels)) != 1000 or any(not s or "\n" in s for s in labels):
        raise SystemExit(f"{args.wheel}: expected 1000 distinct one-line names, got {len(labels)}")
    args.output.write_text("\n".join(labels) + "\n", encoding="utf-8")
    print(f"wrote {len(labels)} labels to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
