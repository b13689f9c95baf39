"""
Learn a direction in Stable Diffusion's text-embedding space by self-discovery.

    python train.py --concept nudity        # -> directions/nudity.safetensors (+ nudity.loss.csv)
    python train.py --concept gender        # -> directions/gender-male/-female.safetensors
    python train.py --erase "violence, blood"
    python train.py --attribute "a photo of a woman" --neutral "a photo of a person"
    python train.py --concept nudity --keep "a photo of a beach"   # with a preservation anchor (ours)
    python train.py --concept nudity --recipe ours --out ours      # a safe region in seconds (ours)
    python train.py --concept nudity --model stabilityai/stable-diffusion-xl-base-1.0 --push-to-hub you/nudity-sdxl

The defaults are the paper's: SD v1.4, LMS, 50 steps, 512 px, guidance 7.5, Adam lr 0.06,
update window 10-50, rank 1, 60 trajectories (50 for the fairness directions), fp32. SD 2.x and
SDXL (ours) keep them, at the model's own resolution (768 px for SD 2.x 768-v, 1024 px for SDXL);
SD 3.x and FLUX.1 (ours) train at 1024 px with their own sampler, steps and guidance (docs/families.md).
"""


import argparse
import shlex
import sys

import torch

import inputs
import saferegion as sr
from directions import direction_paths, made_before
from hub import create_hub_repo, publish
from inputs import DTYPES, UserError, check_resolution, resolve_dtype, training_sets
from limits import check_memory, check_steps
from models import default_resolution, family_defaults, quiet_libraries, vae_factor
from runs import command_identity, stop_interrupted
from training import announce, train_all


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--concept", help=f"a built-in concept: {', '.join(sr.BUILTINS)}")
    what.add_argument("--erase", metavar="TEXT", help="a concept to erase, as free text")
    what.add_argument("--attribute", metavar="TEXT", help="a prompt whose attribute --neutral should take on")
    p.add_argument("--neutral", metavar="TEXT", help="the neutral prompt, with --attribute")
    p.add_argument("--model", default="CompVis/stable-diffusion-v1-4", help="hub id or local folder: SD v1.x, "
                   "SD 2.x, SDXL, SD 3.x or FLUX.1 (default: %(default)s)")
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
    p.add_argument("--steps", type=int, help="denoising steps per trajectory (default: the family's: 50 for SD "
                   "v1.x, 2.x and SDXL, 28 for SD 3.x and FLUX.1-dev, 4 for FLUX.1-schnell)")
    p.add_argument("--resolution", type=int, help="image size in pixels (default: the model's own, 512 for SD v1.x)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale w; FLUX.1-dev's distilled one "
                   "(default: the family's: 7.5 for SD v1.x, 2.x and SDXL, 7 for SD 3.x, 3.5 for FLUX.1)")
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
    p.add_argument("--recipe", choices=("paper", "ours"), default="paper", help="paper: learn the release's "
                   "direction (default); ours: a safe region (each token loses its positive component along "
                   "E(concept) - E(\"\"), the nearest point of the safe half-space), nothing trained")
    p.add_argument("--constraint", choices=sr.SafeRegion.MODES, default="half", help="ours (default: half)")
    p.add_argument("--strength", type=float, default=1.0, help="ours, with subtract (default: %(default)s)")
    p.add_argument("--gate", choices=sr.SafeRegion.GATES, help="ours: act as much as the prompt holds the concept "
                   "(presence or cosine), calibrated on --concept-prompt and --keep, or a built-in concept's templates")
    p.add_argument("--axis", metavar="FILE", help="ours: the axis -d of a trained direction, not the concept's text")
    p.add_argument("--concept-prompt", action="append", default=[], metavar="TEXT", help="a prompt that holds the "
                   "concept: training rows cycle through them (paper), or the gate calibrates on them; repeatable")
    p.add_argument("--target-guidance", type=float, help="the erase target's guidance (default: --guidance)")
    p.add_argument("--cap", type=float, help="a trust region: after each update |d_t| <= CAP |E(p)_t| per token")
    p.add_argument("--off-policy", action="store_true", help="trajectories follow the unsteered prompt")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the directions, their loss logs and a model "
                   "card made from their metadata to this Hugging Face hub repo (user/name; created if need be)")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    quiet_libraries()
    # 1. read and check every input before the model loads: nothing is computed or written for a bad one
    inputs.check_text(erase=args.erase, attribute=args.attribute, neutral=args.neutral, keep=args.keep)
    concepts = sr.concepts_for(concept=args.concept, erase_text=args.erase, attribute_text=args.attribute,
                               neutral=args.neutral)
    update_window, recipe = inputs.check_training(
        trajectories=args.trajectories, steps=args.steps, resolution=args.resolution, guidance=args.guidance,
        lr=args.lr, lora_scale=args.lora_scale, rank=args.rank, seed=args.seed, device=args.device,
        factor=vae_factor(args.model) if args.resolution else None, window=args.window, out=args.out,
        recipe=dict(concepts=concepts, **{option: getattr(args, option) for option in inputs.RECIPE_OPTIONS}))
    check_steps(args.steps, args.model)
    dtype_name, dtype = resolve_dtype(args.dtype, args.device)
    check_memory(args.model, device=args.device, dtype=dtype, training=True,
                 resolution=args.resolution or default_resolution(args.model))
    paths = direction_paths(args.out, concepts)
    custom_rows, keep = training_sets(prompts=args.prompts, keep=args.keep, keep_prompts=args.keep_prompts,
                                      seed=args.seed, most=args.trajectories or max(c.trajectories for c in concepts))
    # 2. keep what this same command wrote before (a Ctrl-C); refuse to overwrite anything else
    args.steps, args.guidance = family_defaults(args.model, args.steps, args.guidance)
    made = command_identity(vars(args), rows=custom_rows, keep=keep)
    done = made_before(paths, made, force=args.force, load=sr.load_direction)
    create_hub_repo(args.push_to_hub)  # before the hours of training, as diffusers' training scripts do
    if concepts := [c for c in concepts if c.name not in done]:
        # 3. load the model; 4. train each concept (ours: make its safe region), save it with its metadata, report
        pipe = sr.load_pipeline(args.model, device=args.device, dtype=dtype, unet=args.unet, lora=args.lora,
                                lora_scale=args.lora_scale)
        model, resolution = announce(pipe, model_id=args.model, dtype_name=dtype_name, steps=args.steps,
                                     resolution=args.resolution, window=args.window)
        check_resolution(resolution, pipe.vae_scale_factor)  # where the config could not be read before
        inputs.check_rank(args.rank, *sr.text_shape(pipe)[:2])
        train_all(pipe, concepts, paths=paths, custom_rows=custom_rows, keep=keep, model=model, resolution=resolution,
                  steps=args.steps, guidance=args.guidance, lr=args.lr, update_window=update_window, rank=args.rank,
                  seed=args.seed, device=args.device, trajectories=args.trajectories, recipe=recipe,
                  metadata=dict(base_model=args.model, unet=args.unet, lora=args.lora, lora_scale=args.lora_scale,
                                training_args=vars(args), identity=made,
                                command=shlex.join(["python", "train.py", *argv])))
    publish(args.push_to_hub, paths, load=sr.load_direction)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        stop_interrupted(e)
