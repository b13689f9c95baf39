"""What every measure reads and writes: a run's records, settings and images in; reports out.

A run directory holds PNG images, run.json (sample.py's settings) and manifest.jsonl (or parts
manifest*.jsonl), one JSON object per image. Reports are JSON files written beside the images,
atomically, and printed as plain-text tables.
"""

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from PIL import Image

from plumbing import UserError, atomic, read_text


def complete_manifest(run_dir):
    """The run's records, one dict per image, from manifest.jsonl and/or parts manifest*.jsonl.

    Strict, for measuring: every line must be a complete record and every listed image on disk.

    Parts (manifest.rank0.jsonl, manifest.rank1.jsonl, ... from several GPUs) are merged in name
    order; an image listed more than once keeps its last record.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    parts = sorted(run_dir.glob("manifest*.jsonl"))
    if not parts:
        raise UserError(f"{run_dir} has no manifest.jsonl (sample.py writes one beside the images)")
    records = {}
    for part in parts:
        for i, line in enumerate(read_text(part, "manifest").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                raise UserError(f"{part}, line {i}: not a JSON object")
            missing = [repr(key) for key in ("file", "prompt", "seed", "guidance") if key not in record]
            if missing:
                raise UserError(f"{part}, line {i}: no {', '.join(missing)}")
            records[str(record["file"])] = record
    if not records:
        raise UserError(f"the manifest of {run_dir} lists no images")
    absent = [file for file in records if not (run_dir / file).is_file()]
    if absent:
        raise UserError(f"{len(absent)} image(s) of the manifest are not in {run_dir}, e.g. {absent[0]}")
    return list(records.values())


def read_settings(run_dir):
    """sample.py's run.json: the model, directions and prompt source of the run."""
    path = Path(run_dir) / "run.json"
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise UserError(f"{run_dir} has no run.json (sample.py writes one): the table names rows by it") from None
    except json.JSONDecodeError:
        settings = None
    if not isinstance(settings, dict):
        raise UserError(f"{path} is not sample.py's settings (a JSON object)")
    return settings


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
