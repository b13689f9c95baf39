"""
The direction file format: ours is safetensors, the factors A (r, D) and B (T, r) (and SDXL's pooled_A
(r, P), pooled_B (1, r)) or a free offset, with the training's metadata as JSON strings; the authors'
release is a .pth state dict, read with weights_only=True so that no code in it can run. Also the
checks that a direction fits the model it is used on.
"""

import csv
import json
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from families import FAMILIES, family, text_shape
from hub import direction_files
from inputs import UserError, check_finite, parse_window
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


def read_direction(path):
    """The tensors (a state dict of saferegion.Direction) and metadata of ours (.safetensors) or of the
    authors' released .pth, a state dict with a (1, r, D) and b (1, T, r): their direction is b @ a."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"direction file {path} does not exist")
    try:
        if path.suffix in (".pth", ".pt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {"A": state["a"].float().squeeze(0), "B": state["b"].float().squeeze(0)}
            metadata = {"concept": "unsafe", "source": "authors' release", "steer_window": [15, 50],
                        "beta": 1.0, "base_model": "CompVis/stable-diffusion-v1-4", "family": "sd1"}
        else:
            with safe_open(path, framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                metadata = decode_metadata(f.metadata() or {})
    except Exception as e:
        raise not_a_direction(path, e) from None
    return state, metadata


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


def fit_directions(pipe, names, offsets, metadatas, *, model, notes):
    """Each direction's offset (T, D) on the pipeline's device, refused where it was made for
    another model family or text width; a note where it was trained on another model of its family."""
    directions = []
    for name, offset, metadata in zip(names, offsets, metadatas):
        check_fits(offset, pipe, name, made_for=metadata.get("family"))
        directions.append(offset.to(pipe.device))
        base = metadata.get("base_model")
        if base and base != model and notes:
            print(f"note: {name} was trained on {base}; using it on {model}")
    return directions


def read_directions(sources, *, window, beta, load):
    """Each of sample.py's --direction (a file or a hub repo): its name, offset (T, D) and metadata, read
    by `load` (saferegion.load_direction); the steer window and beta: the flags', else the first file's."""
    sources = [found for source in sources for found in direction_files(source)]  # (name, local file)
    names, loaded = [name for name, _ in sources], [load(path) for _, path in sources]
    offsets, metadatas = [direction() for direction, _ in loaded], [metadata for _, metadata in loaded]
    for name, offset in zip(names, offsets):
        if not offset.isfinite().all():
            raise UserError(f"direction {name} holds NaN or inf, so it cannot steer; train it again")
    first = metadatas[0] if metadatas else {}
    steer_window = parse_window(window) if window else tuple(first.get("steer_window", (15, 50)))
    beta = beta if beta is not None else float(first.get("beta", 1.0))
    check_finite(beta=beta)  # the file's own
    return names, offsets, metadatas, steer_window, beta
