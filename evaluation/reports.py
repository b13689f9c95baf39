"""What every measure reads and writes: images in; reports out.

A run's records and settings are read by runs.RunFolder (records(), settings()). Reports are JSON
files written beside the images, atomically, and printed as plain-text tables.
"""

import json
from importlib.metadata import PackageNotFoundError, version

from PIL import Image

from inputs import UserError
from runs import atomic


def open_image(path):
    try:
        return Image.open(path).convert("RGB")
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def package_version(name):
    """The installed version of a library a report names."""
    try:
        return version(name)
    except PackageNotFoundError:  # imported from a source tree, not installed
        return "version unknown"


def save_text(path, text):
    """Write atomically (no half-written file is ever left) and say so."""
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"wrote {path}")


def save_image(path, image):
    with atomic(path) as tmp:
        image.save(tmp, format="PNG")
    print(f"wrote {path}")


def write_report(path, report):
    save_text(path, json.dumps(report, indent=1) + "\n")


def print_table(header, rows):
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
