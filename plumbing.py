"""
The plumbing shared by saferegion.py and the scripts: one-line errors, loading with an
explanation when it fails, another method's U-Net, prompt files, window strings, atomic writes.

Nothing here is the method; saferegion.py is. This module is what a fork would rewrite first.
"""

import csv
import json
import os
import re
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RELEASE_STEPS = 50  # windows are written in steps of the paper's 50-step sampler


class UserError(Exception):
    """Bad input: the scripts print the message as one line and exit non-zero."""


# -----------------------------------------------------------------------------
# Loading, and saying in one line why it failed

def load_or_explain(what, source, load):
    """load(source) for a local path or a hub id, any failure told to the user in one line."""
    if not Path(source).exists() and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        raise UserError(f"{what} {source} does not exist")
    try:
        with warnings.catch_warnings():  # the loaders' own deprecation notes would bury ours
            warnings.simplefilter("ignore")
            return load(source)
    except Exception as e:  # a path without what we need in it, or an id the hub cannot give
        reason = ((str(e).strip().splitlines() or [type(e).__name__])[0] if Path(source).exists() else
                  "not a local path, and not found on the Hugging Face hub or in its cache (offline?)")
        raise UserError(f"cannot load {what} {source!r}: {reason}") from None


def quiet_libraries():
    """diffusers' and transformers' warnings and loading bars would bury our own output."""
    import diffusers
    import transformers
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def load_unet(pipe, source):
    """Swap in the U-Net weights of another method (ESD, UCE...): a diffusers U-Net folder or hub id, or one
    .safetensors/.pt/.pth/.ckpt of diffusers U-Net tensors, all of them or only those the method changed
    (ESD's esd-x files hold the cross-attention layers alone). Names and shapes must be this U-Net's."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    suffix = Path(source).suffix
    if suffix in (".safetensors", ".pt", ".pth", ".ckpt"):
        state = load_or_explain("U-Net", source, load_file if suffix == ".safetensors" else  # weights only: runs no code
                                partial(torch.load, map_location="cpu", weights_only=True))
    else:
        state = load_or_explain("U-Net", source, UNet2DConditionModel.from_pretrained).state_dict()
    own = pipe.unet.state_dict()
    if not isinstance(state, dict) or not state:
        raise UserError(f"{source} holds no U-Net tensors")
    for key, tensor in state.items():  # strict on what is there: each name and shape must be this U-Net's
        if key not in own or getattr(tensor, "shape", None) != own[key].shape:
            raise UserError(f"{source} is not a U-Net of this model: unexpected tensor {key}")
    pipe.unet.load_state_dict(state, strict=False)  # every key was checked; those not in the file stay
    if len(state) < len(own):
        print(f"note: {source} sets {len(state)} of the U-Net's {len(own)} tensors; the others are the model's")


# -----------------------------------------------------------------------------
# Prompt files and window strings

# The column names of the prompt files people use, in one place: the authors' I2P and COCO
# files, the Hugging Face copy of I2P, the authors' training rows, and the adversarial sets:
# P4D's and UnlearnDiffAtk's files have I2P's columns, MMA-Diffusion's prompt is "adv_prompt"
# and Ring-A-Bell's "sensitive prompt". The first prompt column a file has is read.
COLUMNS = {"prompt": ("prompt", "adv_prompt", "sensitive prompt"), "seed": ("evaluation_seed", "sd_seed"),
           "guidance": ("evaluation_guidance", "sd_guidance_scale"), "categories": ("categories",),
           "case": ("case_number", "image_id"), "profession": ("profession",)}


def read_seed(text):
    return int(float(text))  # seeds may read "17.0"


def read_prompts(path, limit=None, *, column=None, categories=()):
    """Rows of a prompt CSV as dicts with our keys (COLUMNS); only a prompt column is required.

    column: the prompt column to read instead of the first of COLUMNS["prompt"] the file has.
    categories: keep only the rows whose I2P categories include one of these ("sexual" gives
    I2P-sexual), before `limit` applies. Empty prompts are kept: I2P has one, and a benchmark must
    generate every row.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            table = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(f"cannot read prompts {path}: {e.strerror}") from None
    found = list(table[0]) if table else []
    names = {key: next((c for c in columns if c in found), None) for key, columns in COLUMNS.items()}
    if column is not None and column not in found:
        raise UserError(f"{path} has no column {column!r}; it has: {', '.join(found) or 'nothing'}")
    names["prompt"] = column or names["prompt"]
    if names["prompt"] is None:
        raise UserError(f"{path} has no 'prompt' column; it has: {', '.join(found) or 'nothing'} "
                        f"(the prompt columns read are: {', '.join(COLUMNS['prompt'])})")
    if categories and names["categories"] is None:
        raise UserError(f"{path} has no 'categories' column to keep {', '.join(categories)} rows by")
    wanted = {c.strip().lower() for c in categories}
    rows = []
    for line, row in enumerate(table, start=2):
        if limit is not None and len(rows) >= limit:
            break
        row = {key: row[column] for key, column in names.items() if column is not None}
        if wanted and not wanted & {c.strip().lower() for c in (row["categories"] or "").split(",")}:
            continue
        try:
            for key, convert in (("seed", read_seed), ("guidance", float)):
                if key in row:
                    row[key] = convert(row[key])
        except ValueError:
            raise UserError(f"{path}, line {line}: {key} {row[key]!r} is not a number") from None
        rows.append(row)
    return rows


def parse_window(text):
    """'15-50' -> (15, 50), checked against the paper's 50 steps."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not match:
        raise UserError(f"window {text!r} should look like 15-50")
    start, end = int(match[1]), int(match[2])
    if not 1 <= start <= end <= RELEASE_STEPS:
        raise UserError(f"window {text!r} needs 1 <= start <= end <= {RELEASE_STEPS} (steps of a 50-step run)")
    return start, end


def slug(text, limit=60):
    """A file-name-safe form of free text: "Violence, blood" -> "violence-blood"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def check_positive(**values):
    """Each keyword a whole number of at least 1, else one line naming its flag."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")


# -----------------------------------------------------------------------------
# Writing files

@contextmanager
def atomic(path):
    """Write to the yielded temporary path, renamed onto `path` only if the block succeeds,
    so no half-written file is ever left:  with atomic(path) as tmp: tmp.write_text(...)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


RENAMED = {"window": "steer_window", "training_window": "update_window"}  # metadata keys of older files


def decode_metadata(strings):
    """A direction file's metadata, stored as JSON strings, as Python values under today's keys."""
    def value(text):
        try:
            return json.loads(text)
        except json.JSONDecodeError:  # older files stored strings as they are
            return text
    return {RENAMED.get(key, key): value(text) for key, text in strings.items()}


def resolve_dtype(name, device):
    """--dtype: the model weights' precision; auto is fp16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        name = "fp16" if torch.device(device).type == "cuda" else "fp32"
    return name, DTYPES[name]
