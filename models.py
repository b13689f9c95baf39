"""
Loading models, and saying in one line why it failed: the pipeline (SD v1.x, SD 2.x or SDXL with the
paper's sampler; SD 3.x or FLUX.1 with their own), another method's U-Net, LoRA adapters, and the
configs read before loading (the image size, and the family's steps and guidance).
"""

import json
import re
import sys
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from huggingface_hub import try_to_load_from_cache

from families import DEFAULTS
from inputs import UserError


def load_or_explain(what, source, load):
    """load(source) for a local path or a hub id, any failure told to the user in one line."""
    if not Path(source).exists() and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        raise UserError(f"{what} {source} does not exist")
    try:
        with warnings.catch_warnings():  # the loaders' own deprecation notes would bury ours
            warnings.simplefilter("ignore")
            return load(source)
    except Exception as e:  # a path without what we need in it, or an id the hub cannot give
        reason = ((str(e).strip().splitlines() or [type(e).__name__])[0] if Path(source).exists() else
                  "not a local path, and not found on the Hugging Face hub or in its cache (offline?)")
        raise UserError(f"cannot load {what} {source!r}: {reason}") from None


PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline",  # SD v1.x and 2.x; SDXL
             "StableDiffusion3Pipeline", "FluxPipeline")  # SD 3.x; FLUX.1


def pipeline_class(model):
    """The diffusers pipeline class that a model folder or hub id names in its model_index.json."""
    diffusers = import_diffusers()
    name = load_or_explain("model", model, diffusers.DiffusionPipeline.load_config).get("_class_name")
    if name not in PIPELINES:
        raise UserError(f"{model} is a {name}; directions work on SD v1.x and SD 2.x ({PIPELINES[0]}), "
                        f"on SDXL ({PIPELINES[1]}), SD 3.x ({PIPELINES[2]}) and FLUX.1 ({PIPELINES[3]})")
    return getattr(diffusers, name)


QUIET = False  # set by the scripts: the libraries' notes and loading bars stay out of their output


def quiet_libraries():
    """diffusers', transformers' and the hub's warnings and loading bars (retries when offline
    included) would bury our own output. The hub is quieted now; diffusers and transformers when
    `import_diffusers` first imports them, which takes seconds: a bad input is refused before."""
    global QUIET
    QUIET = True
    import huggingface_hub
    huggingface_hub.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
    if "diffusers" in sys.modules:
        import_diffusers()


def import_diffusers():
    """diffusers, imported where a model is needed (with transformers, quieted if the script asked)."""
    import diffusers
    if QUIET:
        import transformers
        for library in (diffusers, transformers):
            library.utils.logging.set_verbosity_error()
            library.utils.logging.disable_progress_bar()
    return diffusers


def load_unet(pipe, source):
    """Swap in the U-Net weights of another method (ESD, UCE...): a diffusers U-Net folder or hub id, or one
    .safetensors/.pt/.pth/.ckpt of diffusers U-Net tensors, all of them or only those the method changed
    (ESD's esd-x files hold the cross-attention layers alone). Names and shapes must be this U-Net's."""
    UNet2DConditionModel = import_diffusers().UNet2DConditionModel
    from safetensors.torch import load_file
    if not hasattr(pipe, "unet"):
        raise UserError(f"--unet swaps a U-Net, and {type(pipe).__name__}'s denoiser is a transformer")
    suffix = Path(source).suffix
    if suffix in (".safetensors", ".pt", ".pth", ".ckpt"):
        # weights only: runs no code
        load = load_file if suffix == ".safetensors" else partial(torch.load, map_location="cpu", weights_only=True)
        state = load_or_explain("U-Net", source, load)
    else:
        state = load_or_explain("U-Net", source, UNet2DConditionModel.from_pretrained).state_dict()
    own = pipe.unet.state_dict()
    if not isinstance(state, dict) or not state:
        raise UserError(f"{source} holds no U-Net tensors")
    for key, tensor in state.items():  # strict on what is there: each name and shape must be this U-Net's
        if key not in own or getattr(tensor, "shape", None) != own[key].shape:
            raise UserError(f"{source} is not a U-Net of this model: unexpected tensor {key}")
    pipe.unet.load_state_dict(state, strict=False)  # every key was checked; those not in the file stay
    if len(state) < len(own):
        print(f"note: {source} sets {len(state)} of the U-Net's {len(own)} tensors; the others are the model's")


def load_pipeline(model, *, device="cpu", dtype=torch.float32, unet=None, lora=(), lora_scale=1.0):
    """SD v1.x, SD 2.x, SDXL, SD 3.x or FLUX.1 from a hub id or a local folder (its model_index.json says
    which), with the paper's sampler (LMS, the model's own prediction type; SD 3.x and FLUX.1 keep their
    flow-matching Euler scheduler), no safety checker; optionally with another method's U-Net and LoRA
    adapters, stacked under the direction."""
    pipeline = pipeline_class(model)
    sd = pipeline.__name__ == "StableDiffusionPipeline"  # SDXL's has no safety checker to leave out
    no_checker = dict(safety_checker=None, requires_safety_checker=False) if sd else {}
    pipe = load_or_explain("model", model, partial(pipeline.from_pretrained, dtype=dtype, **no_checker))
    if not hasattr(pipe, "transformer"):  # LMS needs a noise schedule; flow matching has none
        pipe.scheduler = import_diffusers().LMSDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if unet:
        load_unet(pipe, unet)
    for i, source in enumerate(lora):  # diffusers' loader, peft underneath: one named adapter each
        load_or_explain("LoRA", source, partial(pipe.load_lora_weights, adapter_name=f"lora{i}"))
    if lora:  # the layers' own weights, U-Net and text encoder: embed() passes no lora_scale, so this is it
        pipe.set_adapters([f"lora{i}" for i in range(len(lora))], [lora_scale] * len(lora))
    for part in pipe.components.values():
        if isinstance(part, nn.Module):
            part.requires_grad_(False)  # no model weight ever changes: only the direction learns
    return pipe.to(device)


def model_config(model, name):
    """A config file of a model (e.g. "vae/config.json") read without loading the model: a local
    folder's, or the hub cache's; None where it cannot be read before loading."""
    config = Path(model) / name
    if not config.is_file():
        try:
            cached = try_to_load_from_cache(model, name)
        except Exception:  # not a hub id
            return None
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError):
        return None  # the loader will say what is wrong with it


def vae_factor(model):
    """How much the model's VAE shrinks an image (8 for SD), from its config; None where unknown."""
    try:
        return 2 ** (len(model_config(model, "vae/config.json")["block_out_channels"]) - 1)
    except (KeyError, TypeError):
        return None


def default_resolution(model):
    """The model's own image size, what its pipeline draws by default (the U-Net's or SD 3's transformer's
    sample size x VAE factor: 512 for SD v1.x, 768 for SD 2.1, 1024 for SDXL and SD 3.x; FLUX's pipeline
    fixes 128 x 8), from its config; None where unknown before loading."""
    try:
        if (model_config(model, "model_index.json") or {}).get("_class_name") == "FluxPipeline":
            return 128 * vae_factor(model)
        config = model_config(model, "unet/config.json") or model_config(model, "transformer/config.json")
        return config["sample_size"] * vae_factor(model)
    except (KeyError, TypeError):
        return None


def family_defaults(model, steps=None, guidance=None):
    """--steps and --guidance, the family's defaults (families.DEFAULTS) where they are not given. The
    family is read from model_index.json (FLUX.1-dev's or -schnell's from its transformer's config);
    where it cannot be read before loading, loading it would fail as well, and says why."""
    if steps is not None and guidance is not None:
        return steps, guidance
    index = model_config(model, "model_index.json") or {"_class_name": pipeline_class(model).__name__}
    kind = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}.get(index.get("_class_name"), "sd1")
    if kind == "flux" and not (model_config(model, "transformer/config.json") or {}).get("guidance_embeds", True):
        kind = "flux-schnell"
    default_steps, default_guidance = DEFAULTS[kind]
    return default_steps if steps is None else steps, default_guidance if guidance is None else guidance
