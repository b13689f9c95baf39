"""
Generate images with Stable Diffusion, steered by learned directions.

    python sample.py --prompt "a photo of a beach" --direction directions/nudity.safetensors --compare
    python sample.py --prompt "a photo of a doctor" --n 8 --direction directions/gender-*.safetensors
    python sample.py --prompt "..." --direction official-safe-direction.pth   # the authors' file

Without --direction it is plain Stable Diffusion. With several directions (fairness), each image
gets one of them, drawn uniformly and fixed by the image's seed.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

import saferegion as sr


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True, help="what to generate")
    p.add_argument("--direction", nargs="+", default=[], metavar="FILE",
                   help="direction(s): ours (.safetensors) or the authors' (.pth)")
    p.add_argument("--model", default="CompVis/stable-diffusion-v1-4", help="hub id or local folder (SD v1.x)")
    p.add_argument("--beta", type=float, help="strength of the direction (default: the file's, 1)")
    p.add_argument("--window", help="steps (of 50) that are steered, e.g. 15-50 (default: the file's)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (LMS)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--resolution", type=int, default=512, help="image size in pixels")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--n", type=int, default=1, help="number of images")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    p.add_argument("--compare", action="store_true", help="also write the unsteered images and a grid "
                   "(top row without, bottom row with the direction, same seeds)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite existing images")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.prompt.strip():
        raise sr.UserError("the prompt is empty")
    for flag in ("n", "steps", "resolution", "batch_size"):
        if getattr(args, flag) < 1:
            raise sr.UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.compare and not args.direction:
        raise sr.UserError("--compare needs a --direction to compare with")
    directions = [sr.load_direction(path) for path in args.direction]
    first = directions[0][1] if directions else {}
    window = sr.parse_window(args.window) if args.window else tuple(json.loads(first.get("window", "[15, 50]")))
    beta = args.beta if args.beta is not None else float(first.get("beta", 1.0))

    out, stem = Path(args.out), sr.slug(args.prompt)
    seeds = list(range(args.seed, args.seed + args.n))
    files = {"steered": [out / f"{stem}_s{s}.png" for s in seeds]}
    if args.compare:
        files["base"] = [out / f"{stem}_s{s}_base.png" for s in seeds]
    grid = out / f"{stem}_s{args.seed}-{seeds[-1]}_compare.png"
    taken = [p for paths in files.values() for p in paths] + ([grid] if args.compare else [])
    taken = [p for p in taken if p.exists()]
    if taken and not args.force:
        raise sr.UserError(f"{taken[0]} exists; pass --force to overwrite, or choose another --out")

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = sr.load_pipeline(args.model, args.device, dtype)
    offsets = []
    for path, (direction, _) in zip(args.direction, directions):
        offset = direction()
        sr.check_fits(offset, pipe, path)
        offsets.append(offset.to(args.device))
    settings = dict(beta=beta, window=window, steps=args.steps, guidance=args.guidance, resolution=args.resolution)
    images = {name: [] for name in files}
    for i in range(0, len(seeds), args.batch_size):
        batch = seeds[i:i + args.batch_size]
        steered, chosen = sr.generate(pipe, [args.prompt] * len(batch), batch, offsets, **settings)
        images["steered"] += steered
        if args.compare:
            images["base"] += sr.generate(pipe, [args.prompt] * len(batch), batch, **settings)[0]
        for j, (seed, c) in enumerate(zip(batch, chosen)):
            for name in files:
                image, path = images[name][i + j], files[name][i + j]
                sr.atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
            used = f"direction {args.direction[c]}" if c is not None else "no direction"
            print(f"{files['steered'][i + j]}  seed {seed}, {used}")
    if args.compare:
        from diffusers.utils import make_image_grid
        picture = make_image_grid(images["base"] + images["steered"], rows=2, cols=len(seeds))
        sr.atomic_write(grid, lambda tmp: picture.save(tmp, format="PNG"))
        print(f"{grid}  top: without, bottom: with the direction (window {window[0]}-{window[1]}, beta {beta})")


if __name__ == "__main__":
    try:
        main()
    except sr.UserError as e:
        sys.exit(f"error: {e}")
