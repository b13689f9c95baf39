"""
Generate images with Stable Diffusion, steered by learned directions.

    python sample.py --prompt "a photo of a beach" --direction directions/nudity.safetensors --compare
    python sample.py --prompt "a photo of a doctor" --n 8 --direction directions/gender-*.safetensors
    python sample.py --prompts i2p.csv --direction official-safe-direction.pth --out runs/i2p-official
    python sample.py --model stabilityai/stable-diffusion-xl-base-1.0 --prompt "a photo" --direction you/nudity-sdxl
    python sample.py --prompts i2p.csv --categories sexual --out runs/i2p-sexual      # I2P-sexual, 931 rows
    python sample.py --prompts mma-diffusion-nsfw-adv-prompts.csv --out runs/mma      # reads adv_prompt
    accelerate launch sample.py --benchmark i2p ...          # rows split across GPUs

A prompt file is read by its own columns: "prompt" (I2P, COCO, P4D, UnlearnDiffAtk), "adv_prompt"
(MMA-Diffusion) or "sensitive prompt" (Ring-A-Bell); --prompt-column picks another.

Without --direction it is the plain model (SD v1.x, 2.x, SDXL, SD 3.x or FLUX.1; a direction works on the model
family it was trained for); a safe region (train.py --recipe ours) constrains each prompt's embedding
as its file says, in every step. With several directions (fairness), each image gets one of them,
drawn uniformly and fixed by the image's prompt and seed. The direction stacks on other safety
methods: an erased U-Net (--unet), LoRA adapters (--lora), Safe Latent Diffusion (--sld) and a
negative prompt (--negative-prompt). Each run folder holds the images, run.json
(what makes the images) and manifest.jsonl (one line per image); running the same command again
resumes, skipping the images already written, and a run folder has one writer at a time.
"""


import argparse
import sys
from functools import partial

import torch

import saferegion as sr
from directions import fit_directions, read_directions, values
from inputs import (
    DTYPES,
    UserError,
    check_finite,
    check_folder,
    check_positive,
    check_resolution,
    check_seed,
    check_text,
    images_for,
    prompt_rows,
    where_to_run,
)
from limits import check_memory, check_steps
from models import default_resolution, family_defaults, pipeline_class, quiet_libraries, vae_factor
from runs import RunFolder, run_settings, stop_interrupted
from sld import check_sld, refuse_other_families, safe_latent_diffusion


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="what to generate")
    what.add_argument("--prompts", metavar="CSV", help="one row per prompt: I2P, COCO, P4D, UnlearnDiffAtk, "
                      "MMA-Diffusion, Ring-A-Bell, or any CSV with a 'prompt' column")
    what.add_argument("--benchmark", choices=("i2p", "winobias"),
                      help="i2p: the I2P prompts from the Hugging Face hub; winobias: 36 professions x 5 templates")
    p.add_argument("--prompt-column", metavar="NAME", help="the CSV column that holds the prompts (default: the "
                   "first of prompt, adv_prompt, sensitive prompt), e.g. MMA-Diffusion's clean_prompt")
    p.add_argument("--categories", nargs="+", metavar="NAME", help="keep the I2P rows of these categories, "
                   "e.g. sexual (I2P-sexual); --limit counts the rows kept")
    p.add_argument("--direction", nargs="+", default=[], metavar="FILE_OR_ID",
                   help="direction(s): ours (.safetensors: a direction, or a safe region of train.py --recipe ours) "
                   "or the authors' (.pth), or a Hugging Face hub repo: "
                   "user/repo (all its .safetensors) or user/repo/file.safetensors")
    p.add_argument("--model", default="CompVis/stable-diffusion-v1-4", help="hub id or local folder: SD v1.x, "
                   "SD 2.x, SDXL, SD 3.x or FLUX.1 (default: %(default)s)")
    p.add_argument("--unet", metavar="PATH_OR_ID", help="another method's U-Net (ESD, UCE...): a diffusers U-Net "
                   "folder or hub id, or a .safetensors/.pt/.pth/.ckpt of its tensors")
    p.add_argument("--lora", action="append", default=[], metavar="PATH_OR_ID",
                   help="a LoRA adapter for the U-Net and/or text encoder (diffusers or kohya format); repeatable")
    p.add_argument("--lora-scale", type=float, default=1.0, help="weight of every --lora, in both models "
                   "(default: %(default)s)")
    p.add_argument("--sld", choices=("weak", "medium", "strong", "max"),
                   help="generate with Safe Latent Diffusion at this preset, the direction in its prompt embedding")
    p.add_argument("--sld-concept", metavar="TEXT", help="with --sld: the concept it guides away from "
                   "(default: SLD's own list of inappropriate concepts)")
    p.add_argument("--negative-prompt", default="", metavar="TEXT",
                   help="the unconditional prompt of classifier-free guidance (never steered)")
    p.add_argument("--beta", type=float, help="strength of the direction (default: the file's, 1)")
    p.add_argument("--window", help="the steer window: steps (of 50) that are steered, e.g. 15-50 "
                   "(default: the file's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the family's: 50 (LMS) for SD v1.x, 2.x "
                   "and SDXL, 28 for SD 3.x and FLUX.1-dev, 4 for FLUX.1-schnell)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, FLUX.1-dev's distilled one "
                   "(default: the family's: 7.5 for SD v1.x, 2.x and SDXL, 7 for SD 3.x, 3.5 for FLUX.1)")
    p.add_argument("--row-guidance", action="store_true", help="use each CSV row's own guidance instead")
    p.add_argument("--resolution", type=int, help="image size in pixels (default: the model's own, 512 for SD v1.x)")
    p.add_argument("--seed", type=int, default=0, help="seed for rows that have none; image j adds j "
                   "(default: %(default)s)")
    p.add_argument("--n", type=int, default=1, help="images per prompt (default: %(default)s)")
    p.add_argument("--limit", type=int, help="only the first LIMIT rows (images made before with a larger "
                   "--limit or --n stay in the run)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default: %(default)s)")
    p.add_argument("--compare", action="store_true", help="also write each image without the direction, "
                   "and a grid (top row without, bottom row with, same seeds)")
    p.add_argument("--save-latents", action="store_true", help="also save each final latent (.safetensors)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="(default: %(default)s)")
    p.add_argument("--dtype", choices=[*DTYPES, "auto"], default="auto",
                   help="precision of the model weights (default: auto, fp16 on cuda and fp32 otherwise)")
    p.add_argument("--out", default="samples", help="run folder (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="start the run folder over with these settings "
                   "(without it, a run folder of other settings is refused)")
    return p.parse_args(argv)


def check_options(*, model, out, compare, directions, sld, n, steps, resolution, batch_size, limit, beta, guidance,
                  lora_scale, seed, negative_prompt):
    """The checks of the options; returns the resolution, the model's own where none is given (None where
    only loading can tell)."""
    check_positive(n=n, steps=steps, resolution=resolution, batch_size=batch_size, limit=limit)
    check_finite(beta=beta, guidance=guidance, lora_scale=lora_scale)
    check_seed(seed)
    check_steps(steps, model)
    resolution = resolution or default_resolution(model)
    if resolution:
        check_resolution(resolution, vae_factor(model))
    check_folder(out)
    if compare and not directions:
        raise UserError("--compare needs a --direction to compare with")
    refuse_other_families(model, sld)
    if negative_prompt and pipeline_class(model).__name__ == "FluxPipeline":
        raise UserError("--negative-prompt: FLUX.1 makes no unconditional prediction (its guidance is distilled)")
    return resolution


def make_images(pipe, images, guidance, steered, *, directions, sld, sld_concept, **steering):
    """Latents, PIL images and each image's direction index for images of one guidance scale."""
    prompts, seeds = [im["prompt"] for im in images], [im["seed"] for im in images]
    directions = directions if steered else []  # steered=False: the same image without the direction
    if sld:
        return safe_latent_diffusion(pipe, prompts, seeds, directions, preset=sld, concept=sld_concept,
                                     guidance=guidance, **steering)
    latents, chosen = sr.generate(pipe, prompts, seeds, directions, guidance=guidance, output_type="latent",
                                  **steering)
    pixels = sr.decode(pipe, latents, steering["resolution"])  # as the pipeline decodes them
    return latents, pipe.image_processor.postprocess(pixels, output_type="pil"), chosen


def main(argv=None):
    args = parse_args(argv)
    quiet_libraries()
    # 1. read and check every input before the model loads: nothing is computed or written for a bad one
    resolution = check_options(model=args.model, out=args.out, compare=args.compare, directions=args.direction,
                               sld=args.sld, n=args.n, steps=args.steps, resolution=args.resolution,
                               batch_size=args.batch_size, limit=args.limit, beta=args.beta, guidance=args.guidance,
                               lora_scale=args.lora_scale, seed=args.seed, negative_prompt=args.negative_prompt)
    check_text(prompt=args.prompt, negative_prompt=args.negative_prompt, sld_concept=args.sld_concept)
    names, offsets, metadatas, window, beta = read_directions(args.direction, args.window, args.beta, sr.load_direction)
    args.steps, args.guidance = family_defaults(args.model, args.steps, args.guidance)
    rows = prompt_rows(prompt=args.prompt, prompts=args.prompts, benchmark=args.benchmark, seed=args.seed,
                       limit=None, column=args.prompt_column, categories=args.categories)  # all: they identify the run
    images = images_for(rows[:args.limit], n=args.n, seed=args.seed, guidance=args.guidance,
                        row_guidance=args.row_guidance, named_by_case=args.prompt is not None)
    check_sld(images, preset=args.sld, concept=args.sld_concept)
    # 2. open the run folder: refused now if it holds another run (nothing is written until the model loads)
    state, device, dtype_name, dtype = where_to_run(args.device, args.dtype)
    check_memory(args.model, device=device, dtype=dtype, resolution=resolution, batch=args.batch_size, sld=args.sld)
    settings = run_settings(
        model=args.model, dtype=dtype_name, directions=args.direction, offsets=[*map(values, offsets)], beta=beta,
        steer_window=window, steps=args.steps, resolution=resolution, rows=rows, seed=args.seed, n=args.n,
        source=args.prompt or args.prompts or args.benchmark, limit=args.limit, compare=args.compare,
        guidance="per row" if args.row_guidance else args.guidance, prompt_column=args.prompt_column,
        categories=args.categories, unet=args.unet, lora=args.lora, lora_scale=args.lora_scale, sld=args.sld,
        sld_concept=args.sld_concept, negative_prompt=args.negative_prompt)
    run = RunFolder(args.out, state).check(settings, images, force=args.force)
    # 3. load the model and fit the directions to it
    pipe = sr.load_pipeline(args.model, device=device, dtype=dtype, unet=args.unet, lora=args.lora,
                            lora_scale=args.lora_scale)
    resolution = settings["resolution"] = resolution or sr.describe(pipe)["resolution"]
    check_resolution(resolution, pipe.vae_scale_factor)  # where the config could not be read before
    directions = fit_directions(pipe, names, offsets, metadatas, model=args.model, notes=state.is_main_process)
    # 4. generate as the run folder's only writer, and finish: one manifest in image order, the comparison grid
    make = partial(make_images, pipe, directions=directions, sld=args.sld, sld_concept=args.sld_concept, beta=beta,
                   steer_window=window, steps=args.steps, resolution=resolution, negative_prompt=args.negative_prompt)
    with run.open(settings, images, force=args.force) as todo:
        run.write(todo, make, names=names, batch_size=args.batch_size, compare=args.compare,
                  save_latents=args.save_latents, desc=f"{run.path} ({dtype_name})" if state.is_main_process else None)
        run.finish(images, compare=args.compare, caption=f"window {window[0]}-{window[1]}, beta {beta}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        stop_interrupted(e)
