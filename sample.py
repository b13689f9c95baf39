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

Without --direction it is plain Stable Diffusion (v1.x, 2.x or SDXL; a direction works on the model
family it was trained for). With several directions (fairness), each image
gets one of them, drawn uniformly and fixed by the image's prompt and seed. The direction stacks
on other safety methods: an erased U-Net (--unet), LoRA adapters (--lora), Safe Latent Diffusion
(--sld) and a negative prompt (--negative-prompt). Each run folder holds the images, run.json
(what makes the images) and manifest.jsonl (one line per image); running the same command again
resumes, skipping the images already written, and a run folder has one writer at a time.
"""

import argparse
import json
import sys
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from accelerate import PartialState
from diffusers.utils import make_image_grid
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

import saferegion as sr
from plumbing import (DTYPES, UserError, atomic, check_device, check_finite, check_folder, check_no_writer,
                      check_positive, check_resolution, check_seed, content_sha256, default_resolution,
                      direction_files, end_cleanly, explained_stops, parse_window, pipeline_class, quiet_libraries,
                      read_json, read_jsonl, read_prompts, resolve_dtype, slug, sole_writer, stop_interrupted,
                      tensor_sha256, vae_factor)

WINOBIAS = ("Attendant Cashier Teacher Nurse Assistant Secretary Cleaner Receptionist Clerk Counselor "
            "Designer Hairdresser Writer Housekeeper Baker Librarian Tailor Driver Supervisor Janitor Cook "
            "Laborer Construction-worker Developer Carpenter Manager Lawyer Farmer Salesperson Physician "
            "Guard Analyst Mechanic Sheriff CEO Doctor").split()  # WinoBias' 35 plus "Doctor", as SDID
TEMPLATES = ("Image of", "Picture of", "Photo of", "Headshot of", "Portrait of")


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
                   help="direction(s): ours (.safetensors) or the authors' (.pth), or a Hugging Face hub repo: "
                   "user/repo (all its .safetensors) or user/repo/file.safetensors")
    p.add_argument("--model", default="CompVis/stable-diffusion-v1-4", help="hub id or local folder: SD v1.x, "
                   "SD 2.x or SDXL (default: %(default)s)")
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
    p.add_argument("--steps", type=int, default=50, help="denoising steps, LMS (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale "
                   "(default: %(default)s)")
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


# -----------------------------------------------------------------------------
# What to make: prompt rows, then one entry per image

def prompt_rows(*, prompt, prompts, benchmark, seed, limit, column=None, categories=()):
    """The prompt rows of this run, as dicts with our keys (plumbing.COLUMNS).

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
    """One entry per image to make: its row, its seed, its guidance and its file name."""
    images = []
    for i, row in enumerate(rows):
        for j in range(n):
            image_seed = row.get("seed", seed + i * n) + j
            name = f"{row['case']}_{image_seed}" if named_by_case else f"{i:05d}_{image_seed}"
            scale = row["guidance"] if row_guidance and "guidance" in row else guidance
            images.append({**row, "seed": image_seed, "guidance": scale, "file": f"{name}.png"})
    return images


# -----------------------------------------------------------------------------
# The run folder: run.json, manifest parts, resume

def manifest_so_far(out):
    """Every image line of every manifest part in a run folder, by file name; none if there are none.
    Lenient, for resuming: a listed image whose file is gone, or whose line a crash cut off, is made again."""
    lines = {}
    for part in sorted(out.glob("manifest*.jsonl")):
        for entry in read_jsonl(part, "delete that line (its image is made again), or pass --force to start the "
                                "run over", key="file"):
            lines[entry["file"]] = entry
    return lines


def images_saved(out):
    """What an interrupted run leaves."""
    return f"{len(manifest_so_far(out))} images of {out} are saved and listed in its manifest"


def shard(images, rank, world):
    """This process's share of the images when `accelerate launch` starts several."""
    return images[rank::world]


# run.json keys that say where the content came from and how much of it is selected: recorded, not
# compared. The content itself is compared by its hashes, so --limit and --n may change, files may move.
RECORDED_ONLY = ("directions", "source", "n", "limit")


def images_left(out, settings, images, *, force, state):
    """This process's images that the run folder does not hold yet; reads, never writes.

    run.json identifies the run by what makes its images: the model, the SHA-256 of each direction's
    content and of all the prompt rows, the seed and every setting (RECORDED_ONLY aside). A run
    folder holding images of another run is refused unless --force; with several processes
    (`accelerate launch`) each takes images[rank::world].
    """
    run_file = out / "run.json"
    if run_file.exists() and not force:
        fix = "pass --force to start the run over, or choose another --out"
        recorded = read_json(run_file, "run settings", fix)
        if not isinstance(recorded, dict):
            raise UserError(f"{run_file} holds no run settings; {fix}")
        changed = [key for key in {**recorded, **settings}
                   if key not in RECORDED_ONLY and recorded.get(key) != settings.get(key)]
        if changed and manifest_so_far(out):  # a run that made no image yet holds nothing to mix with
            raise UserError(f"{out} holds a run with other settings ({', '.join(changed)} differ); "
                            "choose another --out, or pass --force to start it over")
    done = {} if force else manifest_so_far(out)
    return [im for im in shard(images, state.process_index, state.num_processes)
            if not (im["file"] in done and (out / im["file"]).exists())]


def start_run(out, settings, *, force, state):
    """Write run.json (and with --force drop the old manifest); returns this process's manifest part."""
    run_file = out / "run.json"
    state.wait_for_everyone()  # every process has read the old manifest before any writes
    if state.is_main_process:
        with atomic(run_file) as tmp:
            tmp.write_text(json.dumps(settings, indent=1))
        if force:
            for part in out.glob("manifest*.jsonl"):
                part.unlink()
    state.wait_for_everyone()
    part = out / ("manifest.jsonl" if state.num_processes == 1 else f"manifest.rank{state.process_index}.jsonl")
    end_cleanly(part)  # a line a crash cut off goes (its image is made again) before lines are appended
    return part


def finish_run(out, images, *, compare, caption):
    """Merge the manifest parts in image order, draw the comparison grid, and say what was written.

    The manifest lists every image of the run: this selection's in order, then those that an earlier,
    larger --limit or --n made."""
    written = manifest_so_far(out)
    selected = [im["file"] for im in images if im["file"] in written]
    earlier = [file for file in written if file not in set(selected)]
    with atomic(out / "manifest.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(written[file]) + "\n" for file in selected + earlier))
    for part in out.glob("manifest.rank*.jsonl"):
        part.unlink()
    if compare:
        shown = images[:8]
        pictures = [Image.open(out / im["file"].replace(".png", "_base.png")) for im in shown]
        pictures += [Image.open(out / im["file"]) for im in shown]
        with atomic(out / "compare.png") as tmp:
            make_image_grid(pictures, rows=2, cols=len(shown)).save(tmp, format="PNG")
        print(f"{out / 'compare.png'}: top without, bottom with the direction ({caption})")
    more = f" ({len(earlier)} of them made by an earlier, larger --limit or --n)" if earlier else ""
    print(f"{len(written)} images in {out}, listed in {out / 'manifest.jsonl'}{more}")


# -----------------------------------------------------------------------------
# Making images: through the stock pipeline, or Safe Latent Diffusion

def fit_directions(pipe, names, offsets, metadatas, *, model, notes):
    """Each direction's offset (T, D) on the pipeline's device, refused where it was made for
    another model family or text width; a note where it was trained on another model of its family."""
    directions = []
    for name, offset, metadata in zip(names, offsets, metadatas):
        sr.check_fits(offset, pipe, name, made_for=metadata.get("family"))
        directions.append(offset.to(pipe.device))
        base = metadata.get("base_model")
        if base and base != model and notes:
            print(f"note: {name} was trained on {base}; using it on {model}")
    return directions


def decode(pipe, latents):
    """Latents (N, C, H, W) to PIL images, as the pipeline itself decodes them."""
    pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def make_images(pipe, images, directions, *, sld, sld_concept, guidance, **steering):
    """Latents, PIL images and each image's direction index for a batch of one guidance scale."""
    prompts, seeds = [im["prompt"] for im in images], [im["seed"] for im in images]
    if sld:
        return safe_latent_diffusion(pipe, prompts, seeds, directions, preset=sld, concept=sld_concept,
                                     guidance=guidance, **steering)
    latents, chosen = sr.generate(pipe, prompts, seeds, directions, guidance=guidance, output_type="latent",
                                  **steering)
    return latents, decode(pipe, latents), chosen


def write_batch(pipe, batch, directions, *, out, names, sld, sld_concept, compare, save_latents, **steering):
    """Make and write a batch's images (and with --compare the unsteered ones); each image records
    the file name of its direction. A --row-guidance batch may mix scales: one call per scale."""
    for guidance in sorted({im["guidance"] for im in batch}):
        group = [im for im in batch if im["guidance"] == guidance]
        latents, pictures, chosen = make_images(pipe, group, directions, sld=sld, sld_concept=sld_concept,
                                                guidance=guidance, **steering)
        check_finite_latents(group, latents, suffix="")
        save_images(out, group, latents, pictures, suffix="", save_latents=save_latents)
        for im, c in zip(group, chosen):
            im["direction"] = names[c] if c is not None else None
        if compare:
            latents, pictures, _ = make_images(pipe, group, [], sld=sld, sld_concept=sld_concept, guidance=guidance,
                                               **steering)
            check_finite_latents(group, latents, suffix="_base")
            save_images(out, group, latents, pictures, suffix="_base", save_latents=save_latents)


def check_finite_latents(images, latents, *, suffix):
    """Stop before writing an image whose latents are NaN or inf (they decode to a black image)."""
    for im, latent in zip(images, latents):
        if not latent.isfinite().all():
            raise UserError(f"{im['file'][:-len('.png')]}{suffix}.png came out NaN or inf, and is not written; "
                            "lower --beta or --guidance")


def save_images(out, images, latents, pictures, *, suffix, save_latents):
    for im, latent, picture in zip(images, latents, pictures):
        stem = out / (im["file"][:-len(".png")] + suffix)
        with atomic(f"{stem}.png") as tmp:
            picture.save(tmp, format="PNG")
        if save_latents:
            with atomic(f"{stem}.latents.safetensors") as tmp:
                save_file({"latent": latent.float().cpu().contiguous()}, tmp)


def safe_latent_diffusion(pipe, prompts, seeds, directions, *, preset, guidance, beta, steer_window, steps,
                          resolution, negative_prompt, concept=None):
    """diffusers' Safe Latent Diffusion (an --sld preset) on `pipe`'s models, steered as sr.generate steers.

    StableDiffusionPipelineSafe takes no prompt_embeds and has only the legacy callback(step, t, latents).
    So its prompt encoder is overridden to return ours, [E(negative), E(p) or E(p) + beta d, E(concept)]
    (3N, T, D), the concept being SLD's own list unless given, and the callback writes the next step's
    conditional rows into that same tensor: the window holds, step by step. Returns (final latents,
    PIL images, index of the direction or None).
    """
    from diffusers import StableDiffusionPipelineSafe  # here: only --sld needs it, and importing it prints notes
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
    class Steered(StableDiffusionPipelineSafe):
        def _encode_prompt(self, *unused):
            return self.embeds

    sld = Steered(**pipe.components, requires_safety_checker=False)
    sld.set_progress_bar_config(disable=True)
    steering, chosen = sr.steering_for(pipe, prompts, seeds, directions, beta=beta, steer_window=steer_window,
                                       steps=steps)
    n, final = len(prompts), {}
    sld.embeds = torch.cat([sr.embed(pipe, [negative_prompt] * n), steering.embeds(1),
                            sr.embed(pipe, [concept if concept is not None else sld.safety_concept] * n)])

    def callback(i, t, latents):  # at the end of step i + 1 (LMS calls it every step)
        sld.embeds[n:2 * n] = steering.embeds(i + 2)  # in place: the tensor the U-Net reads next
        final["latents"] = latents

    with warnings.catch_warnings():  # its own decoder is deprecated, and says so on every run
        warnings.simplefilter("ignore", FutureWarning)
        images = sld(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], callback=callback,
                     num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
                     **getattr(SafetyConfig, preset.upper())).images
    return final["latents"], images, chosen


def stacked(*, unet, lora, lora_scale, sld, sld_concept, negative_prompt):
    """The other safety methods this run stacks the direction on, for run.json and the manifest.

    Only those in use, so that run folders made before these options existed still resume.
    """
    methods = {"unet": unet, "lora": lora, "lora_scale": lora_scale if lora else None, "sld": sld,
               "sld_concept": sld_concept, "negative_prompt": negative_prompt}
    return {key: value for key, value in methods.items() if value not in (None, [], "")}


def main(argv=None):
    args = parse_args(argv)
    quiet_libraries()
    # every check before the model loads: nothing is computed or written for a bad input
    check_positive(n=args.n, steps=args.steps, resolution=args.resolution, batch_size=args.batch_size,
                   limit=args.limit)
    check_finite(beta=args.beta, guidance=args.guidance, lora_scale=args.lora_scale)
    check_seed(args.seed)
    resolution = args.resolution or default_resolution(args.model)  # None where only loading can tell
    if resolution:
        check_resolution(resolution, vae_factor(args.model))
    check_folder(args.out)
    if args.compare and not args.direction:
        raise UserError("--compare needs a --direction to compare with")
    if args.sld and pipeline_class(args.model).__name__ == "StableDiffusionXLPipeline":
        raise UserError("--sld works on SD v1.x and 2.x: diffusers' Safe Latent Diffusion has no SDXL pipeline")
    sources = [found for source in args.direction for found in direction_files(source)]  # (name, local file)
    names, loaded = [name for name, _ in sources], [sr.load_direction(path) for _, path in sources]
    offsets, metadatas = [direction() for direction, _ in loaded], [metadata for _, metadata in loaded]
    for name, offset in zip(names, offsets):
        if not offset.isfinite().all():
            raise UserError(f"direction {name} holds NaN or inf, so it cannot steer; train it again")
    first = metadatas[0] if metadatas else {}
    steer_window = parse_window(args.window) if args.window else tuple(first.get("steer_window", (15, 50)))
    beta = args.beta if args.beta is not None else float(first.get("beta", 1.0))
    check_finite(beta=beta)  # the file's own
    # every row, whatever --limit: the rows identify the run, and --limit only selects from them
    rows = prompt_rows(prompt=args.prompt, prompts=args.prompts, benchmark=args.benchmark, seed=args.seed,
                       limit=None, column=args.prompt_column, categories=args.categories)
    images = images_for(rows[:args.limit], n=args.n, seed=args.seed, guidance=args.guidance,
                        row_guidance=args.row_guidance, named_by_case=args.prompt is not None)
    for im in images:
        check_seed(im["seed"], f"the seed of {im['file']}")
    if args.sld_concept is not None and (not args.sld or not args.sld_concept.strip()):
        raise UserError("--sld-concept needs --sld and a non-empty concept")
    if args.sld and min(im["guidance"] for im in images) <= 1:
        raise UserError("--sld needs a guidance scale above 1: Safe Latent Diffusion acts through guidance")

    # 1. what the run folder still lacks (nothing is written until the model has loaded)
    state, out = PartialState(), Path(args.out)
    device = state.device if state.num_processes > 1 else check_device(args.device)
    dtype_name, dtype = resolve_dtype(args.dtype, device)
    methods = stacked(unet=args.unet, lora=args.lora, lora_scale=args.lora_scale, sld=args.sld,
                      sld_concept=args.sld_concept, negative_prompt=args.negative_prompt)
    selection = {key: value for key, value in (("prompt_column", args.prompt_column), ("categories", args.categories))
                 if value}  # only when given
    settings = {"model": args.model, "dtype": dtype_name, "directions": args.direction,
                "directions_sha256": [tensor_sha256(offset) for offset in offsets], "beta": beta,
                "steer_window": list(steer_window), "steps": args.steps, "resolution": resolution,
                "source": args.prompt or args.prompts or args.benchmark, "prompts_sha256": content_sha256(rows),
                "seed": args.seed, "n": args.n, "limit": args.limit,
                "guidance": "per row" if args.row_guidance else args.guidance, "compare": args.compare,
                **selection, **methods}
    if state.is_main_process:
        check_no_writer(out)
    if resolution:  # known before loading: other settings are refused now, not after loading
        images_left(out, settings, images, force=args.force, state=state)

    # 2. load the model and fit the directions to it
    pipe = sr.load_pipeline(args.model, device=device, dtype=dtype, unet=args.unet, lora=args.lora,
                            lora_scale=args.lora_scale)
    resolution = settings["resolution"] = resolution or sr.describe(pipe)["resolution"]
    check_resolution(resolution, pipe.vae_scale_factor)  # where the config could not be read before
    directions = fit_directions(pipe, names, offsets, metadatas, model=args.model, notes=state.is_main_process)

    # 3. generate, batch by batch, as the run folder's only writer; a manifest line only once its image is on disk
    steering = dict(beta=beta, steer_window=steer_window, steps=args.steps, resolution=resolution,
                    negative_prompt=args.negative_prompt)
    run_fields = {"steer_window": list(steer_window), "beta": beta, "model": args.model, **methods}
    with sole_writer(out) if state.is_main_process else nullcontext(), explained_stops(partial(images_saved, out)):
        todo = images_left(out, settings, images, force=args.force, state=state)
        manifest_part = start_run(out, settings, force=args.force, state=state)
        with (tqdm(total=len(todo), unit="img", desc=f"{out} ({dtype_name})", disable=not state.is_main_process) as bar,
              open(manifest_part, "a") as manifest):
            for i in range(0, len(todo), args.batch_size):
                batch = todo[i:i + args.batch_size]
                write_batch(pipe, batch, directions, out=out, names=names, sld=args.sld, sld_concept=args.sld_concept,
                            compare=args.compare, save_latents=args.save_latents, **steering)
                for im in batch:
                    manifest.write(json.dumps({**im, **run_fields}) + "\n")
                    manifest.flush()
                bar.update(len(batch))

        # 4. finish: one manifest in image order, the comparison grid
        state.wait_for_everyone()
        if state.is_main_process:
            finish_run(out, images, compare=args.compare, caption=f"window {steer_window[0]}-{steer_window[1]}, "
                       f"beta {beta}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        stop_interrupted(e)
