"""
The direction file format: ours is safetensors, the factors A (r, D) and B (T, r) (and SDXL's pooled_A
(r, P), pooled_B (1, r)) or a free offset, with the training's metadata as JSON strings; the authors'
release is a .pth state dict, read with weights_only=True so that no code in it can run. Also the
checks that a direction fits the model it is used on.
"""

import csv
import json
import math
import warnings
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from families import FAMILIES, family, text_shape
from hub import direction_files
from inputs import RELEASE_STEPS, UserError, check_finite, parse_window
from runs import atomic, write_or_rescue

RENAMED = {"window": "steer_window", "training_window": "update_window"}  # metadata keys of older files


def decode_metadata(strings):
    """A direction file's metadata, stored as JSON strings, as Python values under today's keys."""
    def value(text):
        try:
            return json.loads(text)
        except json.JSONDecodeError:  # older files stored strings as they are
            return text
    return {RENAMED.get(key, key): value(text) for key, text in strings.items()}


def save_direction(path, direction, metadata):
    """Our artifact: safetensors with A (r, D) and B (T, r) (and SDXL's pooled_A (r, P), pooled_B (1, r)),
    or a free offset; metadata as JSON strings."""
    tensors = {name: p.detach().cpu().contiguous() for name, p in direction.named_parameters()}
    with atomic(path) as tmp:
        save_file(tensors, tmp, metadata={key: json.dumps(value) for key, value in metadata.items()})


def direction_metadata(*, base_model, model, resolution, unet, lora, lora_scale, concept, rank, update_window, rows,
                       keep, losses, per_trajectory, training_args, identity, command, seconds):
    """What train.py records in a direction file: the model (model: saferegion.describe's), the concept, the
    training's settings and its outcome, the command line and its identity (for a resume)."""
    return {
        "base_model": base_model, "family": model["family"], "text": model["text"], "resolution": resolution,
        "unet": unet, "lora": lora, "lora_scale": lora_scale, "concept": concept.name, "kind": concept.kind,
        "prompt": concept.prompt, "target": concept.target, "rank": rank,
        "steer_window": list(concept.steer_window), "beta": 1.0, "update_window": list(update_window),
        "trajectories": len(rows), "keep": keep, "final_loss": losses[-1] if losses else None,
        "last_trajectory_loss": sum(losses[-per_trajectory:]) / per_trajectory if losses else None,
        "training_args": training_args, "identity": identity, "command": command, "seconds": seconds,
    }


def write_loss_log(path, losses, per_trajectory):
    """The loss of every update, with its trajectory, beside the direction (name.loss.csv)."""
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["update", "trajectory", "loss"])
        writer.writerows((i, i // per_trajectory, f"{loss:.6f}") for i, loss in enumerate(losses))


def save_trained(path, direction, metadata, *, losses, per_trajectory):
    """A trained direction and its loss log; where they cannot be written, both are rescued elsewhere."""
    write_or_rescue({path: partial(save_direction, direction=direction, metadata=metadata),
                     path.with_suffix(".loss.csv"): partial(write_loss_log, losses=losses,
                                                            per_trajectory=per_trajectory)},
                    what=f"the trained {metadata['concept']}")


def direction_paths(out, concepts):
    """{concept name: out/name.safetensors}; refused where a path or its loss log is a folder."""
    paths = {c.name: Path(out) / f"{c.name}.safetensors" for c in concepts}
    folders = [p for path in paths.values() for p in (path, path.with_suffix(".loss.csv")) if p.is_dir()]
    if folders:
        raise UserError(f"{folders[0]} is a folder; choose another --out")
    return paths


def made_before(paths, identity, *, force, load):
    """The names whose file this same command wrote (its metadata holds `identity`; load: a direction
    file's (direction, metadata)): kept, not trained again. Any other existing file is refused without force."""
    def made_by(path):
        try:
            return load(path)[1].get("identity")
        except UserError:
            return None
    done = {name for name, path in paths.items() if path.exists() and not force and made_by(path) == identity}
    taken = [str(path) for name, path in paths.items() if path.exists() and name not in done]
    if taken and not force:
        raise UserError(f"{taken[0]} exists; pass --force to overwrite it, or choose another --out")
    for name in done:  # what this same command wrote before a Ctrl-C: kept, not trained again
        print(f"kept {paths[name]}: this same command wrote it")
    return done


def not_a_direction(path, error):
    return UserError(f"cannot read direction {Path(path)}: not a direction file ({type(error).__name__})")


# The tensors of a direction file, by layout: ours (rank r, or the free offset; SDXL's with a pooled part)
LAYOUTS = ({"A", "B"}, {"A", "B", "pooled_A", "pooled_B"}, {"offset"}, {"offset", "pooled_offset"})
MAX_BYTES = 64 * 2**20  # a direction is at most 77 x 2048 floats (SDXL's free offset): a larger file is not one


def check_tensors(path, state):
    """Names, dtypes and shapes of a direction's tensors, each failure one line naming the tensor."""
    if isinstance(state, dict) and set(state) == {"origin", "axis"}:  # a safe region (train.py --recipe ours)
        origin, axis = state["origin"], state["axis"]
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2 for t in (origin, axis)) \
                or origin.shape != axis.shape:
            raise UserError(f"direction {path}: a safe region's origin and axis are 2-D floating-point tensors "
                            "of one shape")
        return 0
    if not isinstance(state, dict) or set(state) not in LAYOUTS:
        names = ", ".join(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise UserError(f"direction {path}: tensors {names or 'none'}; a direction file holds A and B (and SDXL's "
                        "pooled_A and pooled_B), or offset (and pooled_offset)")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() != 2 or not all(
                tensor.shape):
            what = f"{tensor.dtype} of shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else \
                type(tensor).__name__
            raise UserError(f"direction {path}: tensor {name} is {what}, not a 2-D floating-point tensor")
    shape = {name: tuple(tensor.shape) for name, tensor in state.items()}
    rank, width = shape["A"] if "A" in shape else (0, shape["offset"][1])
    tokens = shape["B" if "B" in shape else "offset"][0]
    pooled = next((shape[name][1] for name in ("pooled_A", "pooled_offset") if name in shape), 0)
    expected = {"A": (rank, width), "B": (tokens, rank), "offset": (tokens, width), "pooled_A": (rank, pooled),
                "pooled_B": (1, rank), "pooled_offset": (1, pooled)}
    for name in state:
        if shape[name] != expected[name] or pooled > width:  # SDXL packs the pooled part into a row of width D
            sizes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in shape.items())
            raise UserError(f"direction {path}: tensor {name} does not fit the others ({sizes})")
    return rank


def window(value):
    return (isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)
            and 1 <= value[0] <= value[1] <= RELEASE_STEPS)


def number(value):
    return type(value) in (int, float) and math.isfinite(value)


TEXT = ("base_model", "concept", "prompt", "target", "text", "identity", "command", "source")
FIELDS = {  # what each metadata field must be, and how it is said
    "steer_window": (window, f"[start, end] with 1 <= start <= end <= {RELEASE_STEPS}"),
    "update_window": (window, f"[start, end] with 1 <= start <= end <= {RELEASE_STEPS}"),
    "beta": (number, "a finite number"), "lora_scale": (number, "a finite number"),
    "family": (lambda v: isinstance(v, str) and v in FAMILIES, f"one of {', '.join(FAMILIES)}"),
    "kind": (lambda v: isinstance(v, str) and v in ("erase", "attribute"), "erase or attribute"),
    "unet": (lambda v: v is None or isinstance(v, str), "a path or hub id, or null"),
    "lora": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of paths or hub ids"),
    "rank": (lambda v: type(v) is int and v >= 0, "a whole number of at least 0"),
    "resolution": (lambda v: type(v) is int and v >= 1, "a whole number of at least 1"),
    "trajectories": (lambda v: type(v) is int and v >= 0, "a whole number of at least 0"),
    "keep": (lambda v: isinstance(v, list) and all(isinstance(x, list) and len(x) == 2 and isinstance(x[0], str)
                                                   and type(x[1]) is int for x in v), "a list of [prompt, seed]"),
    "final_loss": (lambda v: v is None or number(v), "a finite number or null"),
    "last_trajectory_loss": (lambda v: v is None or number(v), "a finite number or null"),
    "seconds": (lambda v: number(v) and v >= 0, "a number of seconds"),
    "training_args": (lambda v: isinstance(v, dict), "a JSON object"),
}


def check_metadata(path, strings, rank):
    """A direction file's metadata (JSON strings) as Python values under today's keys, every field this
    project writes checked, each failure one line naming the field; others are kept as they are."""
    if not isinstance(strings, dict) or not all(isinstance(v, str) for v in strings.values()):
        raise UserError(f"direction {path}: its metadata is not a table of strings")
    metadata = decode_metadata(strings)
    for key in TEXT:  # older files stored strings as they are: "2024" is the text, not a number
        if key in metadata and not isinstance(metadata[key], str):
            metadata[key] = strings[key]
    for key, (valid, expected) in FIELDS.items():
        if key in metadata and not valid(metadata[key]):
            raise UserError(f"direction {path}: metadata {key} is {json.dumps(metadata[key])[:60]}, not {expected}")
    if metadata.get("rank", rank) != rank:
        raise UserError(f"direction {path}: metadata rank is {metadata['rank']}, but its tensors are of rank {rank}")
    return metadata


def read_direction(path):
    """The tensors (a state dict of saferegion.Direction) and metadata of ours (.safetensors) or of the
    authors' released .pth, a state dict with a (1, r, D) and b (1, T, r): their direction is b @ a.

    Everything is checked before it is used: the tensors' names, dtypes and shapes and every metadata
    field; a file that is none of these stops in one line naming the file and what is wrong. The
    libraries' warnings about a foreign file are not printed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"direction file {path} does not exist")
    if path.stat().st_size > MAX_BYTES:
        raise UserError(f"direction {path}: {path.stat().st_size / 2**20:.0f} MiB is not a direction file "
                        f"(at most {MAX_BYTES // 2**20} MiB; is it a model?)")
    release = path.suffix in (".pth", ".pt")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes about pickle protocols and TorchScript archives
            if release:
                state, strings = torch.load(path, map_location="cpu", weights_only=True), {}
            else:
                with safe_open(path, framework="pt") as f:
                    state, strings = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        raise not_a_direction(path, e) from None
    if release:
        if not isinstance(state, dict) or set(state) != {"a", "b"}:
            names = ", ".join(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise UserError(f"direction {path}: holds {names or 'nothing'}; the authors' release holds a and b")
        for name in ("a", "b"):
            tensor = state[name]
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or len(tensor) != 1:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise UserError(f"direction {path}: {name} is {shape}, not a tensor of shape (1, r, D) or (1, T, r)")
        state = {"A": state["a"][0], "B": state["b"][0]}
        strings = {"concept": "unsafe", "source": "authors' release", "steer_window": "[15, 50]", "beta": "1.0",
                   "base_model": "CompVis/stable-diffusion-v1-4", "family": "sd1"}
    rank = check_tensors(path, state)
    return {name: tensor.float() if release else tensor for name, tensor in state.items()}, \
        check_metadata(path, strings, rank)


def check_fits(offset, pipe, name, *, made_for=None):
    """Refuse a direction made for another model family (made_for: the "family" of its metadata), or
    for a text embedding of another shape."""
    if made_for and made_for != family(pipe):
        raise UserError(f"direction {name} was made for {FAMILIES.get(made_for, made_for)} and this model is "
                        f"{FAMILIES[family(pipe)]}: a direction does not move between model families")
    tokens, width, pooled = text_shape(pipe)
    expected = (tokens + (pooled > 0), width)
    if tuple(offset.shape) != expected:
        raise UserError(f"direction {name} is {offset.shape[0]}x{offset.shape[1]} but this model's text "
                        f"embedding is {expected[0]}x{expected[1]}: it was made for another text encoder")


def values(direction):
    """The numbers that decide a direction, as one tensor: its offset (T, D), or a safe region's origin,
    axis, mode, strength and gate (run folders hash them; none may be NaN)."""
    if not hasattr(direction, "axis"):
        return direction
    kind, tau, temperature = direction.gate or (None, 0.0, 0.0)
    settings = [("half", "project", "subtract").index(direction.mode), direction.strength,
                ("presence", "cosine").index(kind) + 1 if kind else 0, tau, temperature]
    return torch.cat([direction.origin.flatten(), direction.axis.flatten(), torch.tensor(settings).to(direction.axis)])


def fit_directions(pipe, names, offsets, metadatas, *, model, notes):
    """Each direction's offset (T, D) (or safe region) on the pipeline's device, refused where it was made for
    another model family or text width; a note where it was trained on another model of its family."""
    directions = []
    for name, offset, metadata in zip(names, offsets, metadatas):
        check_fits(getattr(offset, "axis", offset), pipe, name, made_for=metadata.get("family"))
        directions.append(offset.to(pipe.device))
        base = metadata.get("base_model")
        if base and base != model and notes:
            print(f"note: {name} was trained on {base}; using it on {model}")
    return directions


def read_directions(sources, window, beta, load):
    """Each --direction's name, offset (T, D) (a safe region as it is: its offset is per prompt) and
    metadata (load: a file's (direction, metadata)); the steer window and beta: the flags', else the first file's."""
    sources = [found for source in sources for found in direction_files(source)]  # (name, local file)
    names, loaded = [name for name, _ in sources], [load(path) for _, path in sources]
    offsets, metadatas = [d if hasattr(d, "axis") else d() for d, _ in loaded], [m for _, m in loaded]
    for name, offset in zip(names, offsets):
        if not values(offset).isfinite().all():
            raise UserError(f"direction {name} holds NaN or inf, so it cannot steer; train it again")
    first = metadatas[0] if metadatas else {}
    steer_window = parse_window(window) if window else tuple(first.get("steer_window", (15, 50)))
    beta = beta if beta is not None else float(first.get("beta", 1.0))
    check_finite(beta=beta)  # the file's own
    return names, offsets, metadatas, steer_window, beta
