"""
The sizes a job can have, checked before the model loads: the memory it needs, estimated from the
model's config, against what the device has; and the step count its scheduler can take. A size
that cannot fit is refused in one line that names the limit and the largest setting that fits,
instead of dying mid-run with a MemoryError.

needed = the weights (element counts from the safetensors headers, at the chosen dtype)
       + the larger of the largest weight tensor (a CPU convolution copies its weight into a layout of its
         own) and the activations of the largest step:
         sampling: the U-Net on the batch (twice it with classifier-free guidance, three times with SLD)
                   or the VAE decoding the batch at full resolution, whichever is larger;
         training: the U-Net's activations kept for the backward pass (batch 1).
Activations are counted level by level from the U-Net's config (block_out_channels, layers_per_block,
where attention is, transformer_layers_per_block) and the VAE's, with the factors below, measured
with torch's CPU allocator profiling on U-Nets of three shapes (tests/test_limits.py compares the
estimate with the measured peak). Attention is counted as torch's fused kernels run it on CPU and
CUDA: no tokens x tokens matrix. Allocator overhead and other processes are not counted.
"""

import json
import math
import resource
import struct
from pathlib import Path

import torch

from inputs import UserError
from models import model_config, vae_factor

# Tensors alive at once, in units of (channels x pixels) of the block's level, measured:
SKIP = 1  # each down-path output, kept for the up path
RESNET = 4  # inside a resnet block: its input, normalised, activated, convolved
UP = 3  # an up block's first resnet on [upsampled input, skip]: concatenated, normalised, activated
TRANSFORMER = 21  # inside a transformer block: the feed-forward's 8C-wide GEGLU projection dominates
SAVED_RESNET = 7  # kept for the backward pass, per resnet block
SAVED_TRANSFORMER = 26  # kept for the backward pass, per transformer block
VAE_WIDE, VAE_LAST = 2, 4  # the VAE decoder at full resolution: 2 x its second width, 4 x its first
GiB = 2**30


def per_level(value, levels):
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def unet_activations(config, pixels, batch, *, training=False):
    """Elements alive at the U-Net's peak for `batch` latents of `pixels` (h x w) latent pixels each."""
    channels = config["block_out_channels"]
    levels = len(channels)
    layers = per_level(config["layers_per_block"], levels)
    depth = per_level(config.get("transformer_layers_per_block") or 1, levels)
    down = ["CrossAttn" in kind for kind in config["down_block_types"]]
    up = ["CrossAttn" in kind for kind in reversed(config["up_block_types"])]  # by level, as down
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None
    size = [pixels / 4**level for level in range(levels)]  # each level halves height and width
    if training:
        saved = 0
        for level, (c, p) in enumerate(zip(channels, size)):
            middle = mid and level == levels - 1
            resnets = 2 * layers[level] + 1 + 2 * middle  # down, up (one more), the mid block's two
            transformers = depth[level] * (layers[level] * down[level] + (layers[level] + 1) * up[level])
            saved += c * p * (SAVED_RESNET * resnets + SAVED_TRANSFORMER * (transformers + depth[-1] * middle))
        return batch * saved
    skips = sum(SKIP * c * p * (layers[level] + 1) for level, (c, p) in enumerate(zip(channels, size)))
    inside = []
    for level, (c, p) in enumerate(zip(channels, size)):
        inside.append(c * p * (TRANSFORMER if down[level] or up[level] else RESNET))
        if level + 1 < levels:  # the up block arriving here: its input upsampled, then joined with the skip
            below = channels[level + 1]
            inside.append(p * (below + UP * (below + c) + c))
    return batch * (skips + max(inside))


def vae_activations(config, pixels, batch):
    """Elements alive at the VAE decoder's peak for `batch` images of `pixels` (H x W) pixels each."""
    channels = config["block_out_channels"]
    return batch * pixels * (VAE_WIDE * channels[min(1, len(channels) - 1)] + VAE_LAST * channels[0])


def weight_counts(model):
    """(elements, the largest tensor's elements) of a model folder's weights, from the headers of its
    .safetensors files (the full-precision ones where a variant is there too); None where unknown."""
    total = biggest = 0
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        files = sorted((Path(model) / component).glob("*.safetensors"))
        for file in [f for f in files if ".fp16." not in f.name] or files:
            try:
                with open(file, "rb") as f:  # 8 bytes of header length, then the header, a JSON object
                    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
                sizes = [math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__"]
            except (OSError, ValueError, KeyError, TypeError, struct.error):
                return None  # the loader will say what is wrong with it
            total, biggest = total + sum(sizes), max([biggest, *sizes])
    return (total, biggest) if total else None


def needed(*, unet, vae, weights, resolution, factor, batch, dtype, training, copies=2):
    """The bytes a job needs at its peak (see the module's docstring); copies: U-Net inputs per image."""
    latent = (resolution // factor) ** 2
    if training:
        activations = unet_activations(unet, latent, 1, training=True)
    else:
        activations = max(unet_activations(unet, latent, batch * copies), vae_activations(vae, resolution**2, batch))
    total, largest = weights or (0, 0)
    return torch.tensor([], dtype=dtype).element_size() * (total + max(largest, activations))


def available(device):
    """(bytes a job may still allocate on `device`, what limits them); None where unknown (MPS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free memory on {device}"
    if device.type != "cpu":
        return None
    import psutil  # accelerate's dependency
    limits = [(psutil.virtual_memory().available, "this machine's available memory")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:  # ulimit -v: the address space counts, not what is resident
        limits.append((soft - psutil.Process().memory_info().vms,
                       f"this process's address-space limit, ulimit -v {soft // 1024}"))
    try:
        limit, used = (Path("/sys/fs/cgroup", name).read_text().strip() for name in ("memory.max", "memory.current"))
        limits.append((int(limit) - int(used), "this container's memory limit"))
    except (OSError, ValueError):  # no cgroup v2 limit ("max"), or none readable
        pass
    return min(limits)


def largest(fits, most, step):
    """The largest multiple of `step`, at most `most`, for which fits(value) holds (the estimate grows
    with every setting: a binary search); None if none does."""
    low, high = 0, most // step
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle * step) else (low, middle - 1)
    return low * step or None


def check_memory(model, *, device, dtype, resolution, batch=1, training=False, sld=None):
    """Refuse a job whose estimate exceeds what `device` has, naming the largest --resolution (and
    --batch-size) that fits. Skipped where the model's configs cannot be read before loading.
    Classifier-free guidance doubles the U-Net's batch when sampling, Safe Latent Diffusion (sld) triples it."""
    copies = 3 if sld else 2
    unet, vae = model_config(model, "unet/config.json"), model_config(model, "vae/config.json")
    factor = vae_factor(model)
    limit = available(device)
    if not (unet and vae and factor and limit and resolution):
        return
    size = dict(unet=unet, vae=vae, weights=weight_counts(model), factor=factor, dtype=dtype, training=training,
                copies=copies)
    try:
        need = needed(resolution=resolution, batch=batch, **size)
    except (KeyError, TypeError, ValueError):  # a config of another shape: the loader will tell
        return
    free, what = limit
    if need <= free:
        return
    step = math.lcm(8, factor)
    fits = largest(lambda r: needed(resolution=r, batch=batch, **size) <= free, resolution, step)
    options = [f"--resolution {fits}" + (f" at --batch-size {batch}" if batch > 1 else "")] if fits else []
    if batch > 1:
        fewer = largest(lambda b: needed(resolution=resolution, batch=b, **size) <= free, batch, 1)
        options += [f"--batch-size {fewer} at --resolution {resolution}"] if fewer else []
    advice = f"the largest that fits: {' or '.join(options)}" if options else "the model's weights alone do not fit"
    job = f"--resolution {resolution}" + (f" with --batch-size {batch}" if batch > 1 else "")
    raise UserError(f"{job} needs about {need / GiB:.1f} GiB on {device}, and {max(free, 0) / GiB:.1f} GiB is "
                    f"available ({what}); {advice}")


def check_steps(steps, model):
    """--steps at most the scheduler's training timesteps (1000 for SD), which LMS, the U-Net families'
    sampler, spaces out (flow-matching transformers' samplers take any number)."""
    if model_config(model, "unet/config.json") is None:
        return
    config = model_config(model, "scheduler/scheduler_config.json") or {}
    most = config.get("num_train_timesteps", 1000) if isinstance(config, dict) else 1000
    if isinstance(most, int) and steps is not None and steps > most:
        raise UserError(f"--steps {steps} is more than the model's scheduler has: at most {most}, its training "
                        "timesteps")
