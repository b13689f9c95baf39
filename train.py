"""
Learn a direction in Stable Diffusion's text-embedding space by self-discovery.

    python train.py --concept nudity        # -> directions/nudity.safetensors (+ nudity.loss.csv)
    python train.py --concept gender        # -> directions/gender-male/-female.safetensors
    python train.py --erase "violence, blood"
    python train.py --attribute "a photo of a woman" --neutral "a photo of a person"

The defaults are the paper's: SD v1.4, LMS, 50 steps, 512 px, guidance 7.5, Adam lr 0.06,
updates in steps 10-50, rank 1, 60 trajectories (50 for the fairness directions).
"""

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import saferegion as sr


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--concept", help=f"a built-in concept: {', '.join(sr.BUILTINS)}")
    what.add_argument("--erase", metavar="TEXT", help="a concept to erase, as free text")
    what.add_argument("--attribute", metavar="TEXT", help="a prompt whose attribute --neutral should take on")
    p.add_argument("--neutral", metavar="TEXT", help="the neutral prompt, with --attribute")
    p.add_argument("--model", default="CompVis/stable-diffusion-v1-4", help="hub id or local folder (SD v1.x)")
    p.add_argument("--unet", metavar="PATH_OR_ID", help="learn on another method's U-Net (ESD, UCE...): a diffusers "
                   "U-Net folder or hub id, or a .safetensors/.pt/.pth/.ckpt of its tensors")
    p.add_argument("--lora", action="append", default=[], metavar="PATH_OR_ID",
                   help="learn with a LoRA adapter loaded (diffusers or kohya format); repeatable")
    p.add_argument("--lora-scale", type=float, default=1.0, help="weight of every --lora, in U-Net and text encoder")
    p.add_argument("--prompts", metavar="CSV", help="training rows (columns prompt and evaluation_seed), "
                   "e.g. the authors' official-train-i2p.csv; replaces the built-in rows")
    p.add_argument("--trajectories", type=int, help="rows to train on (default: 60, or 50 for attributes)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps per trajectory")
    p.add_argument("--resolution", type=int, default=512, help="image size in pixels")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale w")
    p.add_argument("--window", default="10-50", help="steps (of 50) that are steered and updated")
    p.add_argument("--rank", type=int, default=1,
                   help="rank r of the direction d = B @ A; 0: a free 77 x D offset (an ablation)")
    p.add_argument("--lr", type=float, default=0.06, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seeds A; built-in rows use seeds seed, seed+1, ...")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sr.DTYPES, default="fp32",
                   help="model weights' precision; the direction and Adam stay fp32 (the release: fp32)")
    p.add_argument("--out", default="directions", help="folder for the directions and their loss logs")
    p.add_argument("--force", action="store_true", help="overwrite existing directions")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.neutral is not None and args.attribute is None:
        raise sr.UserError("--neutral goes with --attribute")
    if args.concept:
        concepts = sr.builtin(args.concept)
    elif args.erase is not None:
        concepts = [sr.erase(args.erase)]
    elif args.neutral is None:
        raise sr.UserError("--attribute needs --neutral, the prompt to turn into the attribute one")
    else:
        concepts = [sr.attribute(args.attribute, args.neutral)]
    for flag in ("trajectories", "steps", "resolution"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise sr.UserError(f"--{flag} must be at least 1")
    if args.rank < 0:
        raise sr.UserError("--rank must be at least 0")
    window = sr.parse_window(args.window)
    paths = {c.name: Path(args.out) / f"{c.name}.safetensors" for c in concepts}
    taken = [str(p) for p in paths.values() if p.exists()]
    if taken and not args.force:
        raise sr.UserError(f"{taken[0]} exists; pass --force to overwrite it, or choose another --out")
    custom_rows = None
    if args.prompts:
        table = sr.read_prompts(args.prompts)
        custom_rows = [(row["prompt"], row.get("seed", args.seed + i)) for i, row in enumerate(table)]
        for line, (prompt, _) in enumerate(custom_rows, start=2):
            if not prompt.strip():
                raise sr.UserError(f"{args.prompts}, line {line}: empty prompt")

    pipe = sr.load_pipeline(args.model, args.device, sr.DTYPES[args.dtype], args.unet, args.lora, args.lora_scale)
    width, tokens = pipe.text_encoder.config.hidden_size, pipe.tokenizer.model_max_length
    start, end = sr.scale_window(window, args.steps)
    for concept in concepts:
        n = args.trajectories or concept.trajectories
        rows = custom_rows[:n] if custom_rows else [(concept.prompt, args.seed + i) for i in range(n)]
        direction = sr.Direction(width, tokens, args.rank, args.seed).to(args.device)
        per_trajectory = max(0, min(end, args.steps) - start + 1)
        losses, began = [], time.time()
        bar = tqdm(sr.train(pipe, direction, concept, rows, args.steps, args.resolution, args.guidance,
                            args.lr, window), total=len(rows) * per_trajectory, desc=concept.name, unit="step")
        for loss in bar:
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
        metadata = {
            "base_model": args.model, "unet": args.unet, "lora": args.lora, "lora_scale": args.lora_scale,
            "concept": concept.name, "kind": concept.kind,
            "prompt": concept.prompt, "target": concept.target, "rank": args.rank,
            "window": list(concept.window), "beta": 1.0, "training_window": list(window),
            "trajectories": len(rows), "final_loss": losses[-1] if losses else None,
            "last_trajectory_loss": sum(losses[-per_trajectory:]) / per_trajectory if losses else None,
            "training_args": vars(args), "seconds": round(time.time() - began, 1),
        }
        sr.save_direction(paths[concept.name], direction, metadata)
        log = io.StringIO()
        writer = csv.writer(log)
        writer.writerow(["update", "trajectory", "loss"])
        writer.writerows((i, i // per_trajectory, f"{loss:.6f}") for i, loss in enumerate(losses))
        sr.atomic_write(paths[concept.name].with_suffix(".loss.csv"), lambda tmp: tmp.write_text(log.getvalue()))
        print(f"wrote {paths[concept.name]} ({len(rows)} trajectories, {len(losses)} updates, "
              f"final loss {metadata['final_loss']}, {metadata['seconds']} s)")


if __name__ == "__main__":
    try:
        main()
    except sr.UserError as e:
        sys.exit(f"error: {e}")
