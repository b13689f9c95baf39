"""
The plumbing shared by saferegion.py and the scripts: one-line errors, loading with an
explanation when it fails, another method's U-Net, text and prompt files, window strings, checks
made before any compute, run folders (identity, lock, crash-safe manifest), safe writes, and
directions on the Hugging Face hub (downloaded by repo id, uploaded with a model card).

Nothing here is the method; saferegion.py is. This module is what a fork would rewrite first.
"""

import codecs
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked there
    fcntl = None

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


PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")  # SD v1.x and 2.x; SDXL


def pipeline_class(model):
    """The diffusers pipeline class that a model folder or hub id names in its model_index.json."""
    import diffusers
    name = load_or_explain("model", model, diffusers.DiffusionPipeline.load_config).get("_class_name")
    if name not in PIPELINES:
        raise UserError(f"{model} is a {name}; directions work on SD v1.x and SD 2.x ({PIPELINES[0]}) "
                        f"and on SDXL ({PIPELINES[1]})")
    return getattr(diffusers, name)


def quiet_libraries():
    """diffusers', transformers' and the hub's warnings and loading bars (retries when offline
    included) would bury our own output."""
    import diffusers
    import huggingface_hub
    import transformers
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()


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
# Text files (prompt CSVs, run.json, manifests) and window strings

def read_text(path, what):
    """A text file's contents: UTF-8, with or without the byte-order mark Excel writes. Anything
    else (Latin-1, a binary file) is refused in one line naming the file and the line."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                        "save the file as UTF-8") from None
    if "\0" in text:
        line = text[:text.index("\0")].count("\n") + 1
        raise UserError(f"{path}, line {line}: a NUL byte; this is not a text file")
    return text


def read_csv(path, what):
    """(header, [(line, {column: cell})]) of a CSV file; blank lines are skipped, and a row must
    have as many fields as the header (a missing field, or a comma in an unquoted prompt, is refused)."""
    reader = csv.reader(io.StringIO(read_text(path, what), newline=""))
    rows = []
    try:
        header, line = next(reader, []), reader.line_num
        for cells in reader:
            line, start = reader.line_num, line + 1  # a quoted cell may span lines: name the row's first
            if not cells:
                continue
            if len(cells) != len(header):
                hint = " (a comma inside a prompt needs quotes around the prompt)" if len(cells) > len(header) else ""
                raise UserError(f"{path}, line {start}: {len(cells)} field(s) where the header has {len(header)}{hint}")
            rows.append((start, dict(zip(header, cells))))
    except csv.Error as e:
        raise UserError(f"{path}, line {reader.line_num}: {e}") from None
    return header, rows


def read_json(path, what, fix):
    """A JSON file's value; invalid JSON is refused in one line naming the line, with `fix` (what to do)."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); {fix}") from None


def read_jsonl(path, fix, *, key):
    """The records (dicts with `key`) of a JSON-lines file, one per line.

    A last line cut off mid-write (no newline after it, and not a whole record: its writer was
    killed) is left out, so that what it recorded is made again; any other bad line is refused in
    one line naming it, with `fix` (what to do).
    """
    lines = read_text(path, "manifest").split("\n")  # after a final newline, the last item is ""
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and key in record:
            records.append(record)
        elif i < len(lines):
            raise UserError(f"{path}, line {i}: not a record with a {key!r}; {fix}")
    return records


def end_cleanly(path):
    """Before appending to a JSON-lines file: drop a last line cut off mid-write (read_jsonl leaves
    it out), or end a whole last line that lacks its newline."""
    data = path.read_bytes() if path.exists() else b""
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
    except ValueError:  # a cut line
        os.truncate(path, cut)
        return
    with open(path, "ab") as f:
        f.write(b"\n")


# The column names of the prompt files people use, in one place: the authors' I2P and COCO
# files, the Hugging Face copy of I2P, the authors' training rows, and the adversarial sets:
# P4D's and UnlearnDiffAtk's files have I2P's columns, MMA-Diffusion's prompt is "adv_prompt"
# and Ring-A-Bell's "sensitive prompt". The first prompt column a file has is read.
COLUMNS = {"prompt": ("prompt", "adv_prompt", "sensitive prompt"), "seed": ("evaluation_seed", "sd_seed"),
           "guidance": ("evaluation_guidance", "sd_guidance_scale"), "categories": ("categories",),
           "case": ("case_number", "image_id"), "profession": ("profession",)}
MAX_SEED = 2**64 - 1  # a torch.Generator takes seeds 0 ... 2**64 - 1


def read_seed(text):
    """A seed cell: a whole number a torch generator takes; "17.0" reads as 17."""
    try:
        seed = int(text)
    except ValueError:
        number = float(text)  # ValueError when it is not a number at all
        if not number.is_integer():  # 17.5, inf, nan
            raise ValueError(text) from None
        seed = int(number)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(text)
    return seed


def read_guidance(text):
    guidance = float(text)
    if not math.isfinite(guidance):
        raise ValueError(text)
    return guidance


def read_prompts(path, limit=None, *, column=None, categories=()):
    """Rows of a prompt CSV as dicts with our keys (COLUMNS); only a prompt column is required.

    column: the prompt column to read instead of the first of COLUMNS["prompt"] the file has.
    categories: keep only the rows whose I2P categories include one of these ("sexual" gives
    I2P-sexual), before `limit` applies. Empty prompts are kept: I2P has one, and a benchmark must
    generate every row.
    """
    header, table = read_csv(path, "prompts")
    names = {key: next((c for c in columns if c in header), None) for key, columns in COLUMNS.items()}
    if column is not None and column not in header:
        raise UserError(f"{path} has no column {column!r}; it has: {', '.join(header) or 'nothing'}")
    names["prompt"] = column or names["prompt"]
    if names["prompt"] is None:
        raise UserError(f"{path} has no 'prompt' column; it has: {', '.join(header) or 'nothing'} "
                        f"(the prompt columns read are: {', '.join(COLUMNS['prompt'])})")
    if categories and names["categories"] is None:
        raise UserError(f"{path} has no 'categories' column to keep {', '.join(categories)} rows by")
    if not table:
        raise UserError(f"{path} has a header but no rows")
    wanted = {c.strip().lower() for c in categories}
    rows = []
    for line, row in table:
        if limit is not None and len(rows) >= limit:
            break
        row = {key: row[column] for key, column in names.items() if column is not None}
        if wanted and not wanted & {c.strip().lower() for c in row["categories"].split(",")}:
            continue
        for key, convert, expected in (("seed", read_seed, f"whole number from 0 to {MAX_SEED}"),
                                       ("guidance", read_guidance, "finite number")):
            try:
                if key in row:
                    row[key] = convert(row[key])
            except ValueError:
                raise UserError(f"{path}, line {line}: {key} {row[key]!r} is not a {expected}") from None
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
    """A file-name-safe form of free text: "Violence, blood" -> "violence-blood". Where that drops
    letters or digits (non-ASCII text, text beyond `limit`), a short hash of the text follows, so that
    two such texts never share a file: "暴力" -> "prompt-67aa918d", "血" -> "prompt-077077d7"."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"
    if name.replace("-", "") != "".join(c for c in text.lower() if c.isalnum()):
        name = f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return name


# -----------------------------------------------------------------------------
# Checks: numbers, the device, the resolution and output folders before any compute; training's numbers during it

def check_positive(**values):
    """Each keyword a whole number of at least 1, else one line naming its flag."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")


def check_finite(**values):
    """Each keyword a finite number (argparse's float() takes "nan" and "inf"), else one line naming its flag."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, not {value}")


def check_seed(seed, what="--seed"):
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{what} {seed} is not a seed a torch generator takes (0 to {MAX_SEED})")


def check_device(name):
    """--device as a torch.device this machine has; a CUDA device on a torch without CUDA is refused."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UserError(f"--device {name}: {why}; install torch's CUDA build (see the README's set-up), "
                        "or pass --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; pass --device cpu")
    return device


def model_config(model, name):
    """A config file of a model (e.g. "vae/config.json") read without loading the model: a local
    folder's, or the hub cache's; None where it cannot be read before loading."""
    config = Path(model) / name
    if not config.is_file():
        try:
            cached = try_to_load_from_cache(model, name)
        except Exception:  # not a hub id
            return None
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError):
        return None  # the loader will say what is wrong with it


def vae_factor(model):
    """How much the model's VAE shrinks an image (8 for SD), from its config; None where unknown."""
    try:
        return 2 ** (len(model_config(model, "vae/config.json")["block_out_channels"]) - 1)
    except (KeyError, TypeError):
        return None


def default_resolution(model):
    """The model's own image size, what its pipeline draws by default (U-Net sample size x VAE factor:
    512 for SD v1.x, 768 for SD 2.1, 1024 for SDXL), from its config; None where unknown before loading."""
    try:
        return model_config(model, "unet/config.json")["sample_size"] * vae_factor(model)
    except (KeyError, TypeError):
        return None


def check_resolution(resolution, factor):
    """--resolution a multiple of the VAE's factor and of 8, which diffusers' pipelines require."""
    multiple = math.lcm(8, factor or 1)
    if resolution % multiple:
        vae = f"the model's VAE shrinks images {factor}x, and " if factor else ""
        raise UserError(f"--resolution must be a multiple of {multiple} ({vae}diffusers' pipelines take "
                        f"multiples of 8), not {resolution}")


def check_finite_update(name, losses, parameters, per_trajectory):
    """In a training loop: stop at the first non-finite loss or parameter, in one line naming the update."""
    if math.isfinite(losses[-1]) and all(p.isfinite().all() for p in parameters):
        return
    what = f"the loss is {losses[-1]}" if not math.isfinite(losses[-1]) else "the direction holds NaN or inf"
    raise UserError(f"{name}: training diverged at update {len(losses)} (trajectory "
                    f"{(len(losses) - 1) // per_trajectory + 1}): {what}; nothing of it is saved; "
                    "try a smaller --lr or --guidance")


def check_folder(folder, flag="--out"):
    """Refuse, before any work, an output folder that is a file or cannot be written in.

    Probes with a temporary file in the folder (or its nearest existing parent), removed at once:
    os.access would say yes to root even where nothing can be written."""
    folder = Path(folder)
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot write in {existing} ({e.strerror})") from None


# -----------------------------------------------------------------------------
# Run folders: identity by content, one writer

def tensor_sha256(tensor):
    """A hash of a tensor's values and shape (a direction's offset, whatever file format holds it:
    safetensors orders its metadata differently from one save to the next)."""
    values = tensor.detach().float().cpu().contiguous()
    return hashlib.sha256(str(tuple(values.shape)).encode() + values.numpy().tobytes()).hexdigest()


def content_sha256(value):
    """A hash of JSON-able content (prompt rows, settings), the same whatever the keys' order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def command_identity(args, **content):
    """A hash of what a command makes: its options (but --out, --force and --push-to-hub) and its input
    files' content."""
    options = {key: value for key, value in vars(args).items() if key not in ("out", "force", "push_to_hub")}
    return content_sha256({**options, **content})


@contextmanager
def sole_writer(folder):
    """Make `folder` if needed and hold its lock for the block; while another process holds it,
    refuse in one line.

    The lock is flock on the folder itself (no lock file to leave behind); the system drops it when
    its process ends, so a crash or kill -9 never leaves a folder locked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another process is writing to {folder}; wait for it to finish, "
                            "or choose another --out") from None
        yield
    finally:
        os.close(fd)  # and with it the lock


def check_no_writer(folder):
    """Refuse now, before a model loads, a folder that another process is writing to."""
    if Path(folder).is_dir():
        with sole_writer(folder):
            pass


# -----------------------------------------------------------------------------
# Writing files, and stopping in one line

@contextmanager
def atomic(path):
    """Write to the yielded temporary path, renamed onto `path` only if the block succeeds,
    so no half-written file is ever left:  with atomic(path) as tmp: tmp.write_text(...)
    The temporary name carries the process id: two processes never write the same one."""
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


def write_or_rescue(files, what):
    """Write `files` ({path: write(path)}); when that fails (disk full, permissions), write them all
    into a new folder in the system temp dir, else the current one, and raise one line saying where:
    a finished computation is never lost to a failed save."""
    try:
        for path, write in files.items():
            write(path)
        return
    except (OSError, SafetensorError) as e:
        failed, reason = path, getattr(e, "strerror", None) or str(e)
    for parent in (tempfile.gettempdir(), os.getcwd()):
        try:
            rescue = Path(tempfile.mkdtemp(prefix="rescued-", dir=parent))
            for path, write in files.items():
                write(rescue / Path(path).name)
        except (OSError, SafetensorError):
            continue
        raise UserError(f"cannot write {failed} ({reason}); {what} is saved in {rescue} instead")
    raise UserError(f"cannot write {failed} ({reason}), nor in {tempfile.gettempdir()} or here: {what} is lost")


@contextmanager
def explained_stops(saved):
    """Ctrl-C or a failed write (disk full) inside the block ends in one line saying what is saved
    (`saved()` tells) and that the same command resumes; see stop_interrupted."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{saved()}; the same command resumes") from None
    except (OSError, SafetensorError) as e:
        where = getattr(e, "filename", None) or "a file"
        raise UserError(f"cannot write {where} ({getattr(e, 'strerror', None) or e}); {saved()}; "
                        "the same command resumes once it can write") from None


def stop_interrupted(interrupt):
    """A script's Ctrl-C: one line, what is saved (the KeyboardInterrupt's message), exit status 130."""
    print(f"interrupted: {interrupt.args[0] if interrupt.args else 'nothing was written'}", file=sys.stderr)
    sys.exit(130)


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def resolve_dtype(name, device):
    """--dtype: the model weights' precision; auto is fp16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        name = "fp16" if torch.device(device).type == "cuda" else "fp32"
    return name, DTYPES[name]


# -----------------------------------------------------------------------------
# Directions on the Hugging Face hub

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(/[\w./-]+\.safetensors)?")  # user/repo or user/repo/path/file.safetensors


def direction_files(source):
    """[(name, local file)] for a --direction: a local file as it is, or a hub repo id, `user/repo`
    (every .safetensors direction in it, e.g. both of a fairness pair) or `user/repo/file.safetensors`,
    downloaded by huggingface_hub or found in its cache."""
    parts = source.split("/")
    local = Path(source).exists() or Path(source).suffix in (".safetensors", ".pth", ".pt") and len(parts) < 3
    if local or not HUB_ID.fullmatch(source):
        return [(source, source)]
    from huggingface_hub import hf_hub_download, snapshot_download
    repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        if file:
            return [(source, hf_hub_download(repo, file))]
        folder = Path(snapshot_download(repo, allow_patterns=["*.safetensors"]))
    except Exception:
        raise UserError(f"direction {source} is not a local file, and cannot be fetched from the Hugging Face hub "
                        "(offline, or no such repo or file?)") from None
    found = sorted(folder.rglob("*.safetensors"))
    if not found:
        raise UserError(f"the hub repo {repo} holds no .safetensors direction")
    return [(f"{repo}/{path.relative_to(folder).as_posix()}", str(path)) for path in found]


def create_hub_repo(repo):
    """Create the hub model repo if it does not exist yet; needs a token (huggingface-cli login)."""
    from huggingface_hub import HfApi
    try:
        HfApi().create_repo(repo, exist_ok=True)
    except Exception as e:
        raise UserError(f"cannot create the Hugging Face hub repo {repo}: {first_line(e)}") from None


def push_to_hub(repo, files, card):
    """Upload `files` and the model card (README.md) to the hub repo in one commit."""
    from huggingface_hub import HfApi
    with tempfile.TemporaryDirectory() as folder:
        for path in files:
            shutil.copy(path, folder)
        (Path(folder) / "README.md").write_text(card, encoding="utf-8")
        try:
            HfApi().upload_folder(repo_id=repo, folder_path=folder, commit_message="Directions and their model card")
        except Exception as e:
            raise UserError(f"the directions are written, but the upload to {repo} failed: {first_line(e)}") from None


PAPER_CONCEPTS = {"unsafe", "gender-male", "gender-female", "race-white", "race-black", "race-asian"}
PAPER_SETTINGS = {"steps": 50, "guidance": 7.5, "lr": 0.06, "window": "10-50", "rank": 1, "dtype": "fp32"}
CARD = """---
base_model: {base_model}
tags:
- text-to-image
- {tag}
- safety
---

# {names}: directions in {family}'s text-embedding space

Learned by self-discovery as in "Responsible Diffusion Models via Constraining Text Embeddings within
Safe Regions" (Li et al., WWW 2025, [arXiv:2505.15427](https://arxiv.org/abs/2505.15427)). Added to every
prompt's text embedding ({text}) inside the steer window, a direction steers the model away from its
target (kind erase) or towards it (kind attribute).

| file | kind | target | final loss |
|---|---|---|---|
{rows}

Base model `{base_model}` ({family}); steer window {steer} and update window {update} (steps of 50),
beta {beta}; rank {rank}; {trajectories} trajectories of {steps} steps at {resolution} px.

## Use

    python sample.py --model {base_model} --prompt "a photo" --direction {repo} --compare

## How it was made

    {command}

## The paper's and ours

The method is the paper's: a rank-r, LoRA-initialised offset in the text-embedding space, learned from
the frozen model's own guidance along on-policy trajectories, and added inside the steer window.
Ours: {ours}.
"""


def model_card(cards, *, repo, family):
    """The hub repo's README.md, made from the directions' metadata (one dict each, as train.py stores
    it) the way diffusers' training scripts make theirs."""
    first, args = cards[0], cards[0]["training_args"]
    ours = [f"the concept {c['concept']}" for c in cards if c["concept"] not in PAPER_CONCEPTS]
    if first["family"] != "sd1":
        ours.append(f"running the method on {family}")
    if first["family"] == "sdxl":
        ours.append("the offset on the pooled embedding")
    ours += [f"{key} {args[key]} (the paper's: {value})" for key, value in PAPER_SETTINGS.items()
             if args.get(key) != value]
    ours += [f"{len(first['keep'])} preservation anchors"] if first["keep"] else []
    ours += [f"stacked on the {what} {first[what]}" for what in ("unet", "lora") if first.get(what)]
    rows = [f"| {c['concept']}.safetensors | {c['kind']} | {c['target']} | {c['final_loss']:.6g} |" for c in cards]
    return CARD.format(
        base_model=first["base_model"], tag="stable-diffusion-xl" if first["family"] == "sdxl" else "stable-diffusion",
        names=", ".join(c["concept"] for c in cards), family=family, text=first["text"], rows="\n".join(rows),
        steer="{}-{}".format(*first["steer_window"]), update="{}-{}".format(*first["update_window"]),
        beta=first["beta"], rank=first["rank"], trajectories=first["trajectories"], steps=args["steps"],
        resolution=first["resolution"], repo=repo, command=first["command"],
        ours="; ".join(ours) or "nothing: this is the paper's setting")
