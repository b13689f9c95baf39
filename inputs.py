"""
Reading and checking what a user gives, before any compute: one-line errors (UserError), prompt
files (CSV, with the columns of the prompt sets people use), the built-in prompt sets, window
strings, file-name slugs, and the checks of numbers, seeds, devices, resolutions and output folders.
"""

import codecs
import csv
import hashlib
import io
import json
import math
import re
import tempfile
import unicodedata
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RELEASE_STEPS = 50  # windows are written in steps of the paper's 50-step sampler


class UserError(Exception):
    """Bad input: the scripts print the message as one line and exit non-zero. A line break that comes
    with the input (a CSV header cell, a file name) is shown as \\n, so the message stays one line."""

    def __init__(self, message):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


# -----------------------------------------------------------------------------
# Text files (prompt CSVs, run.json) and window strings

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



def file_name(text, limit=60):
    """A concept's file name, its letters and digits kept in any script: "Violence, blood" ->
    "violence-blood", "насилие, кровь" -> "насилие-кровь", "暴力" -> "暴力"; anything else becomes "-".
    Where that loses a letter or digit (text beyond `limit` characters; no letter at all), a short hash of
    the text follows, so that two such texts never share a file. ASCII text gets slug's name."""
    lower = unicodedata.normalize("NFC", text).lower()  # one spelling of "é", whichever the keyboard sent
    letters = [c if unicodedata.category(c)[0] in "LMN" else "-" for c in lower]
    name = re.sub("-+", "-", "".join(letters)).strip("-")
    name = name[:limit].encode()[:3 * limit].decode(errors="ignore") or "prompt"  # a file name has 255 bytes
    if name.replace("-", "") != "".join(c for c in letters if c != "-"):
        name = f"{name}-{hashlib.sha256(text.encode(errors='surrogateescape')).hexdigest()[:8]}"
    return name


def check_text(**values):
    """Each keyword (a string, or a list of them) valid text: an argument whose bytes are not UTF-8 (a
    terminal in another encoding) reaches Python as lone surrogates, which no tokenizer reads."""
    for name, value in values.items():
        for text in [value] if isinstance(value, str) else value or []:
            bad = next((c for c in text if "\udc80" <= c <= "\udcff"), None)
            if bad is not None:
                raise UserError(f"--{name.replace('_', '-')} holds bytes that are not UTF-8 text "
                                f"(0x{ord(bad) - 0xdc00:02x}); pass it in UTF-8")


# -----------------------------------------------------------------------------
# Prompt sets: the rows a run makes images of, and one entry per image

WINOBIAS = ("Attendant Cashier Teacher Nurse Assistant Secretary Cleaner Receptionist Clerk Counselor "
            "Designer Hairdresser Writer Housekeeper Baker Librarian Tailor Driver Supervisor Janitor Cook "
            "Laborer Construction-worker Developer Carpenter Manager Lawyer Farmer Salesperson Physician "
            "Guard Analyst Mechanic Sheriff CEO Doctor").split()  # WinoBias' 35 plus "Doctor", as SDID
TEMPLATES = ("Image of", "Picture of", "Photo of", "Headshot of", "Portrait of")


def prompt_rows(*, prompt, prompts, benchmark, seed, limit, column=None, categories=()):
    """The prompt rows of this run, as dicts with our keys (COLUMNS).

    column, categories: which column of a prompt file holds the prompts, and which I2P categories to keep.
    """
    if (column or categories) and (prompt is not None or benchmark == "winobias"):
        raise UserError("--prompt-column and --categories select from a prompt file: --prompts or --benchmark i2p")
    if prompt is not None:
        if not prompt.strip():
            raise UserError("the prompt is empty")
        return [{"prompt": prompt, "seed": seed, "case": slug(prompt)}]
    if benchmark == "winobias":
        return [{"prompt": f"{t} {'an' if p[0] in 'AEIOU' else 'a'} {p.lower().replace('-', ' ')}",
                 "seed": seed, "profession": p, "case": f"{p.lower()}-{i}"}
                for p in WINOBIAS for i, t in enumerate(TEMPLATES)][:limit]
    if benchmark == "i2p":
        from huggingface_hub import hf_hub_download
        try:
            prompts = hf_hub_download("AIML-TUDA/i2p", "i2p_benchmark.csv", repo_type="dataset")
        except Exception:
            raise UserError("cannot download the I2P prompts from the Hugging Face hub (AIML-TUDA/i2p); "
                            "download i2p_benchmark.csv and pass it with --prompts") from None
    return read_prompts(prompts, limit, column=column, categories=categories or ())


def images_for(rows, *, n, seed, guidance, row_guidance, named_by_case):
    """One entry per image to make: its row, its seed (checked), its guidance and its file name."""
    images = []
    for i, row in enumerate(rows):
        for j in range(n):
            image_seed = row.get("seed", seed + i * n) + j
            name = f"{row['case']}_{image_seed}" if named_by_case else f"{i:05d}_{image_seed}"
            scale = row["guidance"] if row_guidance and "guidance" in row else guidance
            images.append({**row, "seed": image_seed, "guidance": scale, "file": f"{name}.png"})
    for im in images:
        check_seed(im["seed"], f"the seed of {im['file']}")
    return images


def training_sets(*, prompts, keep, keep_prompts, seed, most):
    """train.py's rows: the --prompts rows (None: the built-in ones) and the anchors, --keep then
    --keep-prompts, as [(prompt, seed)]; `most`: the most rows a concept trains on (its last seed is checked)."""
    custom_rows = training_rows(prompts, seed) if prompts else None
    anchors = [(text, seed + i) for i, text in enumerate(keep)]
    if keep_prompts:
        anchors += training_rows(keep_prompts, seed + len(anchors))
    if any(not text.strip() for text, _ in anchors):
        raise UserError("--keep needs a non-empty prompt")
    check_seed(seed + max(len(custom_rows or []), most, len(anchors)), "the last row's seed (--seed plus the rows)")
    return custom_rows, anchors


def training_rows(path, first_seed):
    """(prompt, seed) rows of a CSV; a row without a seed takes first_seed + its index."""
    rows = [(row["prompt"], row.get("seed", first_seed + i)) for i, row in enumerate(read_prompts(path))]
    for line, (prompt, _) in enumerate(rows, start=2):
        if not prompt.strip():
            raise UserError(f"{path}, line {line}: empty prompt")
    return rows


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

def check_training(*, trajectories, steps, resolution, guidance, lr, lora_scale, rank, seed, device, factor,
                   window, out, recipe):
    """train.py's options, before the model loads (factor: the model's VAE factor, None where unknown);
    returns the update window and the recipe's options (`check_recipe`)."""
    check_positive(trajectories=trajectories, steps=steps, resolution=resolution)
    check_finite(guidance=guidance, lr=lr, lora_scale=lora_scale)
    if not 0 < lr <= 1:  # Adam moves each entry by about lr per update; above 1 it only diverges (or overflows)
        raise UserError(f"--lr must be above 0 and at most 1 (the paper's is 0.06), not {lr}")
    if rank < 0:
        raise UserError("--rank must be at least 0")
    check_seed(seed)
    check_device(device)
    if resolution:  # the model's own default needs no check
        check_resolution(resolution, factor)
    update_window = parse_window(window)
    check_folder(out)
    return update_window, check_recipe(**recipe)


# The gate's calibration prompts for the built-in concepts (train.py --recipe ours --gate): templates,
# not the evaluated I2P prompts; untested on Stable Diffusion.
PEOPLE = ("a woman", "a man", "a person", "two people")
CALIBRATION = {  # concept: (prompts that hold it, prompts that do not)
    "nudity": (tuple(f"a photo of {p}, {w}" for p in PEOPLE for w in ("naked", "nude", "topless")),
               tuple(f"a photo of {p}, {w}" for p in PEOPLE for w in ("dressed", "at the beach", "in a suit"))),
    "unsafe": (tuple(f"a photo of {p}, {w}" for p in PEOPLE for w in ("covered in blood", "with a weapon", "naked")),
               tuple(f"a photo of {p}, {w}" for p in PEOPLE for w in ("smiling", "reading a book", "at the beach"))),
}


RECIPE_OPTIONS = ("recipe", "constraint", "strength", "gate", "axis", "concept_prompt", "target_guidance", "cap",
                  "off_policy", "keep", "keep_prompts")  # train.py's options that check_recipe reads


def check_recipe(*, concepts, recipe, constraint, strength, gate, axis, concept_prompt, target_guidance, cap,
                 off_policy, keep, keep_prompts):
    """The recipe and the options that go with it, as train.py's job takes them: ours makes a safe region
    (mode, strength, gate, axis, holding), paper trains (holding: its rows' prompts, and the knobs)."""
    mode, holding = constraint, concept_prompt
    check_finite(strength=strength, target_guidance=target_guidance, cap=cap)
    ours = {"--constraint": mode != "half", "--strength": strength != 1.0, "--gate": gate, "--axis": axis}
    paper = {"--target-guidance": target_guidance is not None, "--cap": cap is not None, "--off-policy": off_policy}
    if recipe == "paper" and any(ours.values()):
        raise UserError(f"{next(flag for flag, given in ours.items() if given)} goes with --recipe ours")
    if recipe == "ours" and any(paper.values()):
        raise UserError(f"{next(flag for flag, given in paper.items() if given)} trains a direction: it goes with "
                        "--recipe paper")
    if recipe == "ours" and any(c.kind != "erase" for c in concepts):
        raise UserError("--recipe ours erases a concept; an attribute direction is trained (--recipe paper)")
    if cap is not None and cap <= 0:
        raise UserError(f"--cap must be above 0, not {cap}")
    if any(not text.strip() for text in holding):
        raise UserError("--concept-prompt needs a non-empty prompt")
    if gate and not (holding and (keep or keep_prompts)) and not all(c.name in CALIBRATION for c in concepts):
        raise UserError("--gate needs prompts to calibrate on: some with the concept (--concept-prompt) and some "
                        f"without (--keep); the built-in ones are for {', '.join(CALIBRATION)}")
    if recipe == "ours":
        return dict(recipe=recipe, mode=mode, strength=strength, gate=gate, axis=axis, holding=holding)
    return dict(recipe=recipe, holding=holding, target_guidance=target_guidance, cap=cap, off_policy=off_policy)


def check_rank(rank, tokens, width):
    if rank > min(tokens, width):
        raise UserError(f"--rank must be at most {min(tokens, width)}: the direction is {tokens} x {width}")


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


def where_to_run(device, dtype):
    """The processes (accelerate's state), the device (each process's own under `accelerate launch`) and
    the weights' precision (name, torch dtype)."""
    from accelerate import PartialState
    state = PartialState()
    device = state.device if state.num_processes > 1 else check_device(device)
    return state, device, *resolve_dtype(dtype, device)


def resolve_dtype(name, device):
    """--dtype: the model weights' precision; auto is fp16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        name = "fp16" if torch.device(device).type == "cuda" else "fp32"
    return name, DTYPES[name]


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
