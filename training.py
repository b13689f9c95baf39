"""
train.py's job: each concept's direction learned by saferegion.train with a progress bar, stopped at
the first non-finite loss, and saved with its metadata and loss log as soon as it is learned, so that
a Ctrl-C or a failed save loses only the concept in progress.
"""

import time

from tqdm import tqdm

import saferegion as sr
from directions import direction_metadata, save_trained
from inputs import check_finite_update
from runs import explained_stops


def learn(pipe, direction, concept, rows, *, keep, per_trajectory, written, **training):
    """sr.train with a progress bar, stopped at the first non-finite loss; returns (losses, seconds).
    Ctrl-C says what is saved: the concepts in `written`."""
    losses, began = [], time.time()
    stopped = f"{concept.name} was not finished and nothing of it is written" + (
        f"; {', '.join(written)} saved" if written else "")
    with (explained_stops(lambda: stopped),
          tqdm(sr.train(pipe, direction, concept, rows, keep=keep, **training),
               total=(len(rows) + len(keep)) * per_trajectory, desc=concept.name, unit="step") as bar):
        for loss in bar:
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            check_finite_update(concept.name, losses, direction.parameters(), per_trajectory)
    return losses, round(time.time() - began, 1)


def train_all(pipe, concepts, *, paths, custom_rows, keep, model, resolution, steps, guidance, lr, update_window,
              rank, seed, device, trajectories, metadata):
    """Learn each concept's direction, and save it with its metadata and loss log as soon as it is learned."""
    tokens, width, pooled = sr.text_shape(pipe)
    per_trajectory, written = sr.updates_per_trajectory(steps, update_window), []
    for concept in concepts:
        n = trajectories or concept.trajectories
        rows = custom_rows[:n] if custom_rows else [(concept.prompt, seed + i) for i in range(n)]
        direction = sr.Direction(width, tokens, rank=rank, seed=seed, pooled=pooled).to(device)
        losses, seconds = learn(pipe, direction, concept, rows, keep=keep, per_trajectory=per_trajectory,
                                written=written, steps=steps, resolution=resolution, guidance=guidance, lr=lr,
                                update_window=update_window)
        record = direction_metadata(**metadata, model=model, resolution=resolution, concept=concept, rank=rank,
                                    update_window=update_window, rows=rows, keep=keep, losses=losses,
                                    per_trajectory=per_trajectory, seconds=seconds)
        save_trained(paths[concept.name], direction, record, losses=losses, per_trajectory=per_trajectory)
        written.append(concept.name)
        print(f"wrote {paths[concept.name]} ({len(rows)} trajectories, {len(keep)} anchors, {len(losses)} updates, "
              f"final loss {record['final_loss']}, {record['seconds']} s)")
