"""
Learn a direction in Stable Diffusion's text-embedding space by self-discovery.

    python train.py --concept nudity        # -> directions/nudity.safetensors (+ nudity.loss.csv)
    python train.py --concept gender        # -> directions/gender-male/-female.safetensors
    python train.py --erase "violence, blood"
    python train.py --attribute "a photo of a woman" --neutral "a photo of a person"
    python train.py --concept nudity --keep "a photo of a beach"   # with a preservation anchor (ours)
    python train.py --concept nudity --model stabilityai/stable-diffusion-xl-base-1.0 --push-to-hub you/nudity-sdxl

The defaults are the paper's: SD v1.4, LMS, 50 steps, 512 px, guidance 7.5, Adam lr 0.06,
update window 10-50, rank 1, 60 trajectories (50 for the fairness directions), fp32. SD 2.x and
SDXL (ours) keep them, at the model's own resolution (768 px for SD 2.x 768-v, 1024 px for SDXL).
"""

import argparse
import csv
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

import saferegion as sr
from plumbing import (DTYPES, UserError, atomic, check_device, check_finite, check_finite_update, check_folder,
                      check_positive, check_resolution, check_seed, command_identity, create_hub_repo,
                      explained_stops, model_card, parse_window, push_to_hub, quiet_libraries, read_prompts,
                      resolve_dtype, stop_interrupted, vae_factor, write_or_rescue)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--concept", help=f"a built-in concept: {', '.join(sr.BUILTINS)}")
    what.add_argument("--erase", metavar="TEXT", help="a concept to erase, as free text")
    what.add_argument("--attribute", metavar="TEXT", help="a prompt whose attribute --neutral should take on")
    p.add_argument("--neutral", metavar="TEXT", help="the neutral prompt, with --attribute")
    p.add_argument("--model", default="CompVis/stable-diffusion-v1-4", help="hub id or local folder: SD v1.x, "
                   "SD 2.x or SDXL (default: %(default)s)")
    p.add_argument("--unet", metavar="PATH_OR_ID", help="learn on another method's U-Net (ESD, UCE...): a diffusers "
                   "U-Net folder or hub id, or a .safetensors/.pt/.pth/.ckpt of its tensors")
    p.add_argument("--lora", action="append", default=[], metavar="PATH_OR_ID",
                   help="learn with a LoRA adapter loaded (diffusers or kohya format); repeatable")
    p.add_argument("--lora-scale", type=float, default=1.0, help="weight of every --lora, in U-Net and text "
                   "encoder (default: %(default)s)")
    p.add_argument("--prompts", metavar="CSV", help="training rows (columns prompt and evaluation_seed), "
                   "e.g. the authors' official-train-i2p.csv; replaces the built-in rows")
    p.add_argument("--keep", action="append", default=[], metavar="TEXT",
                   help="a prompt to preserve (ours, not the paper's): its trajectories, interleaved with the "
                   "concept's, pull its steered prediction back to its unsteered one; repeatable")
    p.add_argument("--keep-prompts", metavar="CSV", help="more prompts to preserve, one per row (column prompt)")
    p.add_argument("--trajectories", type=int, help="rows to train on (default: 60, or 50 for attributes)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps per trajectory (default: %(default)s)")
    p.add_argument("--resolution", type=int, help="image size in pixels (default: the model's own, 512 for SD v1.x)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale w "
                   "(default: %(default)s)")
    p.add_argument("--window", default="10-50", help="the update window: steps (of 50) that are steered and "
                   "updated in training (default: %(default)s)")
    p.add_argument("--rank", type=int, default=1,
                   help="rank r of the direction d = B @ A; 0: a free 77 x D offset, an ablation (default: 1)")
    p.add_argument("--lr", type=float, default=0.06, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds A; built-in rows use seeds seed, seed+1, ... "
                   "(default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="(default: %(default)s)")
    p.add_argument("--dtype", choices=[*DTYPES, "auto"], default="fp32", help="precision of the model weights; "
                   "the direction and Adam stay fp32 (default: %(default)s, as the release; auto: fp16 on cuda)")
    p.add_argument("--out", default="directions", help="folder for the directions and their loss logs "
                   "(default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite existing directions (those this same "
                   "command wrote are kept without it)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the directions, their loss logs and a model "
                   "card made from their metadata to this Hugging Face hub repo (user/name; created if need be)")
    return p.parse_args(argv)


def concepts_for(args):
    """The concepts named on the command line: a built-in (one or more), --erase or --attribute."""
    if args.neutral is not None and args.attribute is None:
        raise UserError("--neutral goes with --attribute")
    if args.concept:
        return sr.builtin(args.concept)
    if args.erase is not None:
        return [sr.erase(args.erase)]
    if args.neutral is None:
        raise UserError("--attribute needs --neutral, the prompt to turn into the attribute one")
    return [sr.attribute(args.attribute, args.neutral)]


def training_rows(path, first_seed):
    """(prompt, seed) rows of a CSV; a row without a seed takes first_seed + its index."""
    rows = [(row["prompt"], row.get("seed", first_seed + i)) for i, row in enumerate(read_prompts(path))]
    for line, (prompt, _) in enumerate(rows, start=2):
        if not prompt.strip():
            raise UserError(f"{path}, line {line}: empty prompt")
    return rows


def made_by(path):
    """The identity recorded in an existing direction file, if it has one."""
    try:
        return sr.load_direction(path)[1].get("identity")
    except UserError:
        return None


def not_saved(name, written):
    """What Ctrl-C during the training of `name` leaves."""
    saved = f"; {', '.join(written)} saved" if written else ""
    return f"{name} was not finished and nothing of it is written{saved}"


def publish(repo, paths):
    """--push-to-hub: the directions, their loss logs and a model card made from their metadata."""
    cards = [sr.load_direction(path)[1] for path in paths.values()]
    files = [file for path in paths.values() for file in (path, path.with_suffix(".loss.csv"))]
    push_to_hub(repo, files, model_card(cards, repo=repo, family=sr.FAMILIES[cards[0]["family"]]))
    print(f"pushed {len(files)} files and a model card to https://huggingface.co/{repo}")


def write_loss_log(path, losses, per_trajectory):
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["update", "trajectory", "loss"])
        writer.writerows((i, i // per_trajectory, f"{loss:.6f}") for i, loss in enumerate(losses))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    quiet_libraries()
    concepts = concepts_for(args)
    # every check before the model loads: nothing is computed or written for a bad input
    check_positive(trajectories=args.trajectories, steps=args.steps, resolution=args.resolution)
    check_finite(guidance=args.guidance, lr=args.lr, lora_scale=args.lora_scale)
    if not 0 < args.lr <= 1:  # Adam moves each entry by about lr per update; above 1 it only diverges (or overflows)
        raise UserError(f"--lr must be above 0 and at most 1 (the paper's is 0.06), not {args.lr}")
    if args.rank < 0:
        raise UserError("--rank must be at least 0")
    check_seed(args.seed)
    check_device(args.device)
    if args.resolution:  # the model's own default needs no check
        check_resolution(args.resolution, vae_factor(args.model))
    update_window = parse_window(args.window)
    check_folder(args.out)
    paths = {c.name: Path(args.out) / f"{c.name}.safetensors" for c in concepts}
    folders = [p for path in paths.values() for p in (path, path.with_suffix(".loss.csv")) if p.is_dir()]
    if folders:
        raise UserError(f"{folders[0]} is a folder; choose another --out")
    custom_rows = training_rows(args.prompts, args.seed) if args.prompts else None
    keep = [(text, args.seed + i) for i, text in enumerate(args.keep)]
    if args.keep_prompts:
        keep += training_rows(args.keep_prompts, args.seed + len(keep))
    if any(not text.strip() for text, _ in keep):
        raise UserError("--keep needs a non-empty prompt")
    most = max(len(custom_rows or []), args.trajectories or max(c.trajectories for c in concepts), len(keep))
    check_seed(args.seed + most, "the last row's seed (--seed plus the rows)")
    made = command_identity(args, rows=custom_rows, keep=keep)
    done = {name for name, path in paths.items() if path.exists() and not args.force and made_by(path) == made}
    taken = [str(path) for name, path in paths.items() if path.exists() and name not in done]
    if taken and not args.force:
        raise UserError(f"{taken[0]} exists; pass --force to overwrite it, or choose another --out")
    for name in done:  # what this same command wrote before a Ctrl-C: kept, not trained again
        print(f"kept {paths[name]}: this same command wrote it")
    if args.push_to_hub:  # before the hours of training, as diffusers' training scripts do
        create_hub_repo(args.push_to_hub)
    concepts = [c for c in concepts if c.name not in done]
    if not concepts:
        if args.push_to_hub:
            publish(args.push_to_hub, paths)
        return

    dtype_name, dtype = resolve_dtype(args.dtype, args.device)
    pipe = sr.load_pipeline(args.model, device=args.device, dtype=dtype, unet=args.unet, lora=args.lora,
                            lora_scale=args.lora_scale)
    model = sr.describe(pipe)  # the family and its defaults
    resolution = args.resolution or model["resolution"]
    print(f"training on {args.model}: {sr.FAMILIES[model['family']]}, text {model['text']}, {model['scheduler']}; "
          f"{dtype_name}, {args.steps} steps at {resolution} px, update window {args.window}")
    tokens, width, pooled = sr.text_shape(pipe)
    check_resolution(resolution, pipe.vae_scale_factor)  # where the config could not be read before
    if args.rank > min(tokens, width):
        raise UserError(f"--rank must be at most {min(tokens, width)}: the direction is {tokens} x {width}")
    per_trajectory = sr.updates_per_trajectory(args.steps, update_window)
    written = []
    for concept in concepts:
        n = args.trajectories or concept.trajectories
        rows = custom_rows[:n] if custom_rows else [(concept.prompt, args.seed + i) for i in range(n)]
        direction = sr.Direction(width, tokens, rank=args.rank, seed=args.seed, pooled=pooled).to(args.device)
        updates = sr.train(pipe, direction, concept, rows, steps=args.steps, resolution=resolution,
                           guidance=args.guidance, lr=args.lr, update_window=update_window, keep=keep)
        losses, began = [], time.time()
        total = (len(rows) + len(keep)) * per_trajectory
        with (explained_stops(partial(not_saved, concept.name, written)),
              tqdm(updates, total=total, desc=concept.name, unit="step") as bar):
            for loss in bar:
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}")
                check_finite_update(concept.name, losses, direction.parameters(), per_trajectory)
        metadata = {
            "base_model": args.model, "family": model["family"], "text": model["text"], "resolution": resolution,
            "unet": args.unet, "lora": args.lora, "lora_scale": args.lora_scale,
            "concept": concept.name, "kind": concept.kind,
            "prompt": concept.prompt, "target": concept.target, "rank": args.rank,
            "steer_window": list(concept.steer_window), "beta": 1.0, "update_window": list(update_window),
            "trajectories": len(rows), "keep": keep, "final_loss": losses[-1] if losses else None,
            "last_trajectory_loss": sum(losses[-per_trajectory:]) / per_trajectory if losses else None,
            "training_args": vars(args), "identity": made, "command": shlex.join(["python", "train.py", *argv]),
            "seconds": round(time.time() - began, 1),
        }
        path = paths[concept.name]
        write_or_rescue({path: partial(sr.save_direction, direction=direction, metadata=metadata),
                         path.with_suffix(".loss.csv"): partial(write_loss_log, losses=losses,
                                                                per_trajectory=per_trajectory)},
                        what=f"the trained {concept.name}")
        written.append(concept.name)
        print(f"wrote {paths[concept.name]} ({len(rows)} trajectories, {len(keep)} anchors, {len(losses)} updates, "
              f"final loss {metadata['final_loss']}, {metadata['seconds']} s)")
    if args.push_to_hub:
        publish(args.push_to_hub, paths)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        stop_interrupted(e)
