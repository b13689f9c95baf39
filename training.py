"""
train.py's job: each concept's direction learned by saferegion.train with a progress bar, stopped at
the first non-finite loss, and saved with its metadata and loss log as soon as it is learned, so that
a Ctrl-C or a failed save loses only the concept in progress; or, with --recipe ours, each concept's
safe region, made in seconds from its text and saved the same way.
"""

import time

from tqdm import tqdm

import saferegion as sr
from directions import direction_metadata, save_trained
from inputs import CALIBRATION, UserError, check_finite_update
from runs import explained_stops


def relative_size(offset, embeds):
    """|d_t| / |E(p)_t|, the mean over tokens; offset, embeds (T, D). Past 1, d outweighs the prompt."""
    rows = min(len(offset), len(embeds))  # the token rows both have (SD 3.x and FLUX.1 pack them differently)
    return (offset[:rows].norm(dim=-1) / embeds[:rows].norm(dim=-1).clamp(min=1e-12)).mean().item()


def learn(pipe, direction, concept, rows, *, keep, per_trajectory, written, sizes, **training):
    """sr.train with a progress bar, stopped at the first non-finite loss; returns (losses, seconds).
    Ctrl-C says what is saved: the concepts in `written`. After each trajectory, `sizes` gets d's
    relative_size to the embedding of the trajectory's prompt, with a warning past 1."""
    losses, began = [], time.time()
    plan = sr.trajectories(concept, rows, keep)
    prompts = sorted({prompt for prompt, *_ in plan})
    embeds = dict(zip(prompts, sr.embed(pipe, prompts).float()))  # each (T, D)
    stopped = f"{concept.name} was not finished and nothing of it is written" + (
        f"; {', '.join(written)} saved" if written else "")
    with (explained_stops(lambda: stopped),
          tqdm(sr.train(pipe, direction, concept, rows, keep=keep, **training),
               total=(len(rows) + len(keep)) * per_trajectory, desc=concept.name, unit="step") as bar):
        for loss in bar:
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            check_finite_update(concept.name, losses, direction.parameters(), per_trajectory)
            if len(losses) % per_trajectory == 0:
                sizes.append(relative_size(direction().detach().float(), embeds[plan[len(sizes)][0]]))
                if sizes[-1] > 1:
                    bar.write(f"warning: after trajectory {len(sizes)}, |d| is {sizes[-1]:.2f} times the prompt's "
                              "embedding (per token, mean): it outweighs the prompt; see --cap and --lr")
    return losses, round(time.time() - began, 1)


def announce(pipe, *, model_id, dtype_name, steps, resolution, window):
    """Say what training runs on: the family and its defaults (returned) and the resolution (the model's own
    where none is given)."""
    model = sr.describe(pipe)
    resolution = resolution or model["resolution"]
    print(f"training on {model_id}: {sr.FAMILIES[model['family']]}, text {model['text']}, "
          f"{model['scheduler']}; {dtype_name}, {steps} steps at {resolution} px, update window {window}")
    return model, resolution


def train_all(pipe, concepts, *, paths, custom_rows, keep, model, resolution, steps, guidance, lr, update_window,
              rank, seed, device, trajectories, recipe, metadata):
    """Learn each concept's direction, and save it with its metadata and loss log as soon as it is learned;
    recipe: inputs.check_recipe's (ours: write_regions instead)."""
    if recipe.pop("recipe") == "ours":
        return write_regions(pipe, concepts, paths=paths, model=model, keep=[text for text, _ in keep],
                             metadata=metadata, **recipe)
    holding, knobs = recipe.pop("holding"), recipe
    tokens, width, pooled = sr.text_shape(pipe)
    per_trajectory, written = sr.updates_per_trajectory(steps, update_window), []
    for concept in concepts:
        n = trajectories or concept.trajectories
        prompts = holding or [concept.prompt]  # several training prompts (ours) take turns
        rows = custom_rows[:n] if custom_rows else [(prompts[i % len(prompts)], seed + i) for i in range(n)]
        direction = sr.Direction(width, tokens, rank=rank, seed=seed, pooled=pooled).to(device)
        sizes = []
        losses, seconds = learn(pipe, direction, concept, rows, keep=keep, per_trajectory=per_trajectory,
                                written=written, sizes=sizes, steps=steps, resolution=resolution, guidance=guidance,
                                lr=lr, update_window=update_window, **knobs)
        record = direction_metadata(**metadata, model=model, resolution=resolution, concept=concept, rank=rank,
                                    update_window=update_window, rows=rows, keep=keep, losses=losses,
                                    per_trajectory=per_trajectory, seconds=seconds)
        record.update(offset_size=[round(size, 4) for size in sizes], **knobs)
        save_trained(paths[concept.name], direction, record, losses=losses, per_trajectory=per_trajectory)
        written.append(concept.name)
        print(f"wrote {paths[concept.name]} ({len(rows)} trajectories, {len(keep)} anchors, {len(losses)} updates, "
              f"final loss {record['final_loss']}, {record['seconds']} s)")


# -----------------------------------------------------------------------------
# Safe regions (train.py --recipe ours): made from the concept's text in seconds, nothing trained

def make_region(pipe, concept, *, axis, mode, strength, gate, holding, keep):
    """The concept's SafeRegion and what its file records: the axis from the concept's text (or -d of
    a trained direction's file); a gate calibrated on prompts that hold the concept (`holding`) and
    prompts that do not (`keep`), else on a built-in concept's templates (inputs.CALIBRATION)."""
    region = sr.SafeRegion.of_text(pipe, concept.target, mode=mode, strength=strength)
    if axis:
        direction, made_for = sr.load_direction(axis)
        if isinstance(direction, sr.SafeRegion):
            raise UserError(f"--axis {axis} is a safe region; give a trained direction")
        sr.check_fits(direction(), pipe, axis, made_for=made_for.get("family"))
        region.axis.data = -direction().float().to(region.axis)
    if gate:
        built_in = CALIBRATION.get(concept.name, ((), ()))
        holding, keep = holding or built_in[0], keep or built_in[1]
        region.gate = sr.calibrate(region, gate, sr.embed(pipe, list(holding)).float(),
                                   sr.embed(pipe, list(keep)).float())
    return region, {"constraint": "safe region", "mode": mode, "strength": strength, "gate": region.gate,
                    "axis": f"-d of {axis}" if axis else f'E("{concept.target}") - E("")',
                    "calibration": {"holding": list(holding), "without": list(keep)} if gate else None}


def write_regions(pipe, concepts, *, paths, model, axis, mode, strength, gate, holding, keep, metadata):
    """Each concept's safe region, saved as a direction file whose metadata says what it is; sample.py
    applies it in every step (steer window 1-50)."""
    for concept in concepts:
        region, record = make_region(pipe, concept, axis=axis, mode=mode, strength=strength, gate=gate,
                                     holding=holding, keep=keep)
        record = {"base_model": metadata["base_model"], "family": model["family"], "text": model["text"],
                  "concept": concept.name, "kind": concept.kind, "target": concept.target, **record,
                  "steer_window": [1, 50], "beta": 1.0, **metadata}
        sr.save_direction(paths[concept.name], region, record)  # atomic: whole or not at all
        gated = f", gated by {gate} (tau {region.gate[1]:.3f}, temperature {region.gate[2]:.3f})" if gate else ""
        print(f"wrote {paths[concept.name]} (safe region: {mode} along {record['axis']}{gated})")
