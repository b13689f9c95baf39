"""
Benchmark self-discovery training and steered sampling at the size of SD v1.4, SDXL, SD 3 or FLUX.1.

    python bench.py                                # a GPU: 512 px, 50 steps, bf16 -> bench.json
    python bench.py --device cpu --resolution 64   # a CPU smoke run: a few minutes on 2 cores
    python bench.py --arch sdxl                    # SDXL base 1.0 on a GPU: 1024 px
    python bench.py --arch sdxl --device cpu --resolution 128 --no-release --out bench-sdxl.json
    python bench.py --arch sd3 --device cpu --resolution 64 --no-t5 --steps 1 --repeats 1 --sampling-batches 1
    python bench.py --arch flux --dtype bf16       # FLUX.1-dev: a GPU with 40 GiB or more

The models are SD v1.4's exact architecture (U-Net, CLIP ViT-L/14 text encoder, VAE, LMS) or SDXL
base 1.0's (U-Net, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders, VAE, LMS), SD 3 medium's
(MMDiT, CLIP-L, OpenCLIP bigG, T5 v1.1 XXL, VAE, flow-matching Euler) or FLUX.1-dev's (transformer,
CLIP-L, T5 v1.1 XXL, VAE, flow-matching Euler), built from their configurations with random weights,
so nothing is downloaded: time and memory do not depend on the weights' values. Character-level
tokenizers stand in for CLIP's BPE and T5's SentencePiece; every prompt is padded to the same
length either way. SD 3 and FLUX.1 run in --dtype only and without the release-equivalent mode
(the release is SD v1.4's), after a check that their weights fit the device. Measured, on one device:

1. one training step of saferegion.train (median ms after warm-up), and one whole trajectory;
2. peak device memory while training (CUDA only);
3. sampling through saferegion.generate at batch 1 and 8, without and with a direction;
4. the same training step with the cost structure of the authors' release (`release_train`);
5. U-Net calls, and images through the U-Net, per training step, for both.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

import saferegion as sr
from inputs import DTYPES, UserError, resolve_dtype
from runs import atomic

CONCEPT = sr.builtin("unsafe")[0]  # the release's safety direction: its prompt and c_u
STEP_SCHEDULE = 50  # per-step timings pull from a 50-step trajectory trained in every step


# -----------------------------------------------------------------------------
# SD v1.4 and SDXL, built from their configurations with random weights

def char_tokenizer():
    """A CLIPTokenizer over single printable characters (ids < 49408), padded to 77 like SD's."""
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in map(chr, range(33, 127)):
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def sd14_pipeline(device):
    """StableDiffusionPipeline with SD v1.4's U-Net, text encoder and VAE (fp32, random), and LMS."""
    import diffusers
    import transformers
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
    from diffusers import AutoencoderKL, LMSDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=32, act_fn="silu")
    text_encoder = CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14's text tower
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=768, bos_token_id=0, eos_token_id=1, pad_token_id=1))  # the tokenizer's ids
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
    scheduler = LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                     num_train_timesteps=1000, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=char_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)  # as saferegion.load_pipeline leaves them
    return pipe.to(device)


def sdxl_pipeline(device):
    """StableDiffusionXLPipeline with SDXL base 1.0's U-Net, two text encoders and VAE (fp32, random), and LMS."""
    import diffusers
    import transformers
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
    from diffusers import AutoencoderKL, LMSDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu")  # 2816 = 6 x 256 + 1280
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14's text tower
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        hidden_act="quick_gelu", projection_dim=768, **ids))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(  # OpenCLIP ViT-bigG/14's, with its projection
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        hidden_act="gelu", projection_dim=1280, **ids))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    scheduler = LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                     num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=char_tokenizer(), tokenizer_2=char_tokenizer(), unet=unet,
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    for model in (unet, vae, text_encoder, text_encoder_2):
        model.requires_grad_(False)  # as saferegion.load_pipeline leaves them
    return pipe.to(device)


def t5_xxl():
    """T5 v1.1 XXL's encoder, SD 3's and FLUX.1's third text encoder (4.8B parameters)."""
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1))


def flow_vae(scaling_factor, shift_factor):
    """SD 3's and FLUX.1's VAE: 16 latent channels, no quant convolutions."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=scaling_factor,
                         shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def sd3_models(t5=True):
    """SD 3 medium's MMDiT (2B), CLIP-L and OpenCLIP bigG with projections, T5 XXL (t5=False: none) and VAE."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return dict(
        transformer=SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            hidden_act="quick_gelu", projection_dim=768, **ids)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            hidden_act="gelu", projection_dim=1280, **ids)),
        text_encoder_3=t5_xxl() if t5 else None, vae=flow_vae(1.5305, 0.0609))


def flux_models():
    """FLUX.1-dev's transformer (12B; 19 double and 38 single blocks, distilled guidance), CLIP-L, T5 XXL, VAE."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel
    return dict(
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56)),
        text_encoder=CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=1,
            pad_token_id=1)),
        text_encoder_2=t5_xxl(), vae=flow_vae(0.3611, 0.1159))


def t5_tokenizer():
    """A T5 tokenizer over single printable characters (ids < 32128): T5's </s> ends every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + [p for i in range(33, 127) for p in (chr(i), "\u2581" + chr(i))]
    model = Tokenizer(models.Unigram([(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)], unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def flow_pipeline(name, models, device):
    """StableDiffusion3Pipeline or FluxPipeline around `models`, with the model's own flow-matching scheduler."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler
    if name == "sd3":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        tokenizers = dict(tokenizer=char_tokenizer(), tokenizer_2=char_tokenizer(),
                          tokenizer_3=t5_tokenizer() if models["text_encoder_3"] else None)
        pipe = diffusers.StableDiffusion3Pipeline(scheduler=scheduler, **models, **tokenizers)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = diffusers.FluxPipeline(scheduler=scheduler, tokenizer=char_tokenizer(), tokenizer_2=t5_tokenizer(),
                                      **models)
    pipe.set_progress_bar_config(disable=True)
    for model in models.values():
        if model is not None:
            model.requires_grad_(False)  # as saferegion.load_pipeline leaves them
    return pipe.to(device)


def free_memory(device):
    """Bytes free on the device: the GPU's, or the memory the system has available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def check_memory(title, models, device, dtype):
    """Refuse, in one line, an architecture whose weights alone do not fit the device's free memory
    (counted on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        count = sum(p.numel() for model in models().values() if model is not None for p in model.parameters())
    needed, free = count * DTYPES[dtype].itemsize, free_memory(device)
    if needed > free:
        smaller = f" (in bf16: {count * 2 / 2**30:.1f} GiB)" if DTYPES[dtype].itemsize > 2 else ""
        raise UserError(f"{title}'s {count / 1e9:.1f}B parameters take {needed / 2**30:.1f} GiB in {dtype} and this "
                        f"{device.type} has {free / 2**30:.1f} GiB free: run it where they fit{smaller}")


def build_on(models, device, dtype):
    """The models, built with random weights straight on `device` in `dtype` (no fp32 copy first)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        with torch.device(device):
            return models()
    finally:
        torch.set_default_dtype(default)


ARCHITECTURES = {"sd1.4": ("SD v1.4", sd14_pipeline, 512), "sdxl": ("SDXL base 1.0", sdxl_pipeline, 1024),
                 "sd3": ("SD 3 medium", sd3_models, 1024), "flux": ("FLUX.1-dev", flux_models, 1024)}
FLOW = ("sd3", "flux")  # built from models(), checked against the free memory first; no release mode


# -----------------------------------------------------------------------------
# The release's cost structure (a cost model of the authors' code, not the method)

def release_train(pipe, direction, concept, rows, *, steps=50, resolution=512, guidance=7.5, lr=0.06,
                  update_window=(10, 50)):
    """saferegion.train with the cost structure of the authors' release; yields each step's loss.

    Same trajectories, target and Adam updates, so it learns the same direction (tests/test_bench.py
    checks this), but each step in the window costs what the release's step costs:
    - the U-Net is not frozen, so backward also computes and stores a gradient for every U-Net
      weight (zeroed each step; the optimiser holds only A and B, so they change nothing);
    - the CFG pair (E(""), E(p) + d) goes through the U-Net as a batch of 2 with gradients on,
      although only the steered half needs one;
    - a second pair (E(""), E(c_u)) without gradient gives the target, recomputing eps_null.
    That is 4 images per step; saferegion.train needs 3 (one no-grad pair, the steered prompt alone).
    """
    unet, scheduler, device = sr.denoiser(pipe, resolution), pipe.scheduler, pipe.device
    pipe.unet.requires_grad_(True)  # the release never freezes it
    texts = sorted({p for p, _ in rows} | {concept.target})
    embeds = dict(zip(texts, sr.embed(pipe, texts).split(1)))  # each (1, T, D)
    null, target = sr.unconditional(pipe), embeds[concept.target]
    null_and_target = torch.cat([null, target])
    optimizer = torch.optim.Adam(direction.parameters(), lr=lr)
    start, end = sr.scale_window(update_window, steps)
    shape = (1, unet.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
    try:
        for prompt, seed in rows:
            scheduler.set_timesteps(steps, device=device)
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            latents = latents.to(device) * scheduler.init_noise_sigma
            for k, t in enumerate(scheduler.timesteps, start=1):
                x = scheduler.scale_model_input(latents, t).to(unet.dtype).expand(2, -1, -1, -1)
                if start <= k <= end:
                    steered = sr.steer(embeds[prompt].float(), direction()).to(unet.dtype)
                    pair = torch.cat([null, steered])  # gradients on for both halves
                    eps_null, eps_cond = unet(x, t, encoder_hidden_states=pair).sample.float().chunk(2)
                    with torch.no_grad():  # the target, as in saferegion.self_discovery_loss
                        again, eps_target = unet(x, t, encoder_hidden_states=null_and_target).sample.float().chunk(2)
                        eps_star = sr.self_discovery_target(again, eps_target, concept.kind, guidance)
                    loss = sr.LOSS_WEIGHT * F.mse_loss(eps_cond, eps_star)
                    optimizer.zero_grad(set_to_none=True)
                    pipe.unet.zero_grad(set_to_none=False)  # allocated by the first backward, then reused
                    loss.backward()
                    optimizer.step()
                    yield loss.item()
                    eps_null, eps_cond = eps_null.detach(), eps_cond.detach()
                else:
                    with torch.no_grad():
                        both = torch.cat([null, embeds[prompt]])
                        eps_null, eps_cond = unet(x, t, encoder_hidden_states=both).sample.float().chunk(2)
                eps = eps_null + guidance * (eps_cond - eps_null)
                latents = scheduler.step(eps, t, latents).prev_sample
    finally:  # give the frozen U-Net back and free its gradients
        pipe.unet.requires_grad_(False)
        pipe.unet.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# Measuring

class UNetCalls:
    """Counts U-Net forward calls and the batch size of each (images through the U-Net)."""

    def __init__(self, unet):
        self.unet, self.batches = unet, []

    def __enter__(self):
        self.hook = self.unet.register_forward_hook(lambda module, args, out: self.batches.append(out[0].shape[0]))
        return self

    def __exit__(self, *exc):
        self.hook.remove()


def training_steps(train, pipe, resolution, steps=STEP_SCHEDULE, update_window=(1, 50)):
    """A training generator in which every step is an update, so each pull is one whole step."""
    tokens, width, pooled = sr.text_shape(pipe)
    direction = sr.Direction(width, tokens, pooled=pooled).to(pipe.device)
    return train(pipe, direction, CONCEPT, [(CONCEPT.prompt, 0)], steps=steps, resolution=resolution,
                 update_window=update_window)


def calls_per_step(train, pipe, resolution, denoiser=None):
    """The U-Net's (or `denoiser`'s) batch sizes of one training step, e.g. [2, 1]: two calls, three images."""
    steps = training_steps(train, pipe, resolution)
    with UNetCalls(denoiser or pipe.unet) as calls:
        next(steps)
    steps.close()
    return calls.batches


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(run, device):
    sync(device)
    began = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - began


def step_ms_and_peak(train, pipe, resolution, repeats, warmup):
    """Median ms of one training step, after `warmup` untimed steps, and the peak memory (GiB)."""
    device = pipe.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    steps = training_steps(train, pipe, resolution)
    times = [seconds(lambda: next(steps), device) for _ in range(warmup + repeats)][warmup:]
    steps.close()
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else "n/a"
    return round(1000 * statistics.median(times), 1), peak


def sampling_rates(pipe, batch, offset, steps, resolution, repeats, warmup_steps):
    """Images/s of saferegion.generate (to PIL images) without and with `offset`, medians.

    After a warm-up run of each, the two are timed in turn, so that drift in the machine's
    speed reaches both alike."""
    prompts, seeds = [CONCEPT.prompt] * batch, list(range(batch))
    runs = {"plain": [], "steered": [offset]}
    times = {name: [] for name in runs}
    for name, directions in runs.items():
        sr.generate(pipe, prompts, seeds, directions, steps=warmup_steps, resolution=resolution)
    for _ in range(repeats):
        for name, directions in runs.items():
            times[name].append(seconds(lambda: sr.generate(pipe, prompts, seeds, directions, steps=steps,
                                                           resolution=resolution), pipe.device))
    return [round(batch / statistics.median(times[name]), 4) for name in runs]


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=ARCHITECTURES, default="sd1.4", help="whose architecture (default: %(default)s)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run (default: cuda when there is one)")
    p.add_argument("--dtype", choices=[*DTYPES, "auto"], help="precision of the model weights on the fast path "
                   "and in sampling (default: bf16 on cuda, fp32 on cpu; auto: fp16 on cuda); the "
                   "release-equivalent mode is always fp32")
    p.add_argument("--resolution", type=int, help="image size in pixels, a multiple of 64 (default: the "
                   "architecture's, 512 for SD v1.4 and 1024 for SDXL, SD 3 and FLUX.1)")
    p.add_argument("--steps", type=int, help="steps of the whole trajectory and of sampling (default: 50 on "
                   "cuda, 3 on cpu); per-step timings always pull from a 50-step schedule")
    p.add_argument("--repeats", type=int, help="timed training steps (default: 10 on cuda, 3 on cpu); "
                   "sampling is timed repeats // 3 times, at least once")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (after counting its calls)")
    p.add_argument("--no-release", action="store_true", help="leave out the release-equivalent mode, whose U-Net "
                   "gradients take as much memory again as the U-Net's weights (SDXL's: 9.6 GiB in fp32)")
    p.add_argument("--no-t5", action="store_true", help="sd3: without its T5 encoder, as diffusers allows (its 256 "
                   "token embeddings are then zeros: the transformer's work is the same)")
    p.add_argument("--sampling-batches", type=int, nargs="+", default=[1, 8], metavar="N",
                   help="batch sizes to time sampling at (default: 1 8)")
    p.add_argument("--out", default="bench.json", help="where to write the results as JSON")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    title, build, default_resolution = ARCHITECTURES[args.arch]
    resolution = args.resolution or default_resolution
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA GPU; pass --device cpu")
    dtype = resolve_dtype(args.dtype, args.device)[0] if args.dtype else "bf16" if cuda else "fp32"
    steps = args.steps if args.steps is not None else 50 if cuda else 3
    repeats = args.repeats if args.repeats is not None else 10 if cuda else 3
    warmup = 8 if args.compile else 2 if cuda else 1  # untimed steps: allocation, kernel choice, compiling
    if resolution < 64 or resolution % 64:
        raise UserError("--resolution must be a positive multiple of 64 (the U-Net halves the latent 3 times)")
    if steps < 1 or not 1 <= repeats <= STEP_SCHEDULE - warmup:
        raise UserError(f"--steps must be at least 1 and --repeats between 1 and {STEP_SCHEDULE - warmup}")
    device = torch.device(args.device)
    flow = args.arch in FLOW
    if args.no_t5 and args.arch != "sd3":
        raise UserError("--no-t5 is for --arch sd3 (SD 3.x without its T5 encoder)")
    if args.arch == "sd3":
        build = partial(build, t5=not args.no_t5)
    if flow:  # before minutes of building: the weights alone must fit
        check_memory(title, build, device, dtype)
    import diffusers
    info = dict(arch=title, device=device_name(device), torch=torch.__version__, diffusers=diffusers.__version__,
                resolution=resolution, dtype=dtype, steps=steps, repeats=repeats, compile=args.compile)
    print(" | ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    started = time.perf_counter()
    pipe = flow_pipeline(args.arch, build_on(build, device, dtype), device) if flow else build(device)
    denoiser, part = (pipe.transformer, "transformer") if flow else (pipe.unet, "U-Net")
    info["parameters"] = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                             for p in m.parameters())
    print(f"built {title} with random weights ({info['parameters'] / 1e9:.2f}B parameters) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    rows = []

    def add(measure, mode, value, unit):
        rows.append(dict(measure=measure, mode=mode, value=value, unit=unit))
        print(f"  {measure} | {mode} | {value} {unit}", flush=True)

    modes = {"fast": sr.train} if args.no_release or flow else {"release-equivalent": release_train, "fast": sr.train}
    for mode, train in modes.items():  # counted on the plain U-Net: a property of the algorithm
        batches = calls_per_step(train, pipe, resolution, denoiser)
        add(f"{part} calls per training step", mode, len(batches), f"calls, batch sizes {batches}")
        add(f"images through {part} per step", mode, sum(batches), "images")
    if args.compile:
        denoiser.compile()
    step, times = f"training step, median of {repeats}", {}
    runs = [(mode, "fp32") for mode in modes] + [("fast", dtype)] * (dtype != "fp32")
    if flow:  # its own precision only: FLUX's fp32 weights alone are 63 GiB
        runs = [("fast", dtype)]
    for mode, precision in runs:  # the release trains in fp32; the fast path also in --dtype
        pipe.to(dtype=DTYPES[precision])
        times[mode, precision], peak = step_ms_and_peak(modes[mode], pipe, resolution, repeats, warmup)
        add(step, f"{mode}, {precision}", times[mode, precision], "ms")
        add("peak memory while training", f"{mode}, {precision}", peak, "GiB")
    if "release-equivalent" in modes:
        ratio = times["release-equivalent", "fp32"] / times["fast", "fp32"]
        add("step time, release-equivalent / fast", "fp32", round(ratio, 2), "x")

    pipe.to(dtype=DTYPES[dtype])
    start, end = sr.scale_window((10, 50), steps)  # the paper's training window
    trajectory = seconds(lambda: list(training_steps(sr.train, pipe, resolution, steps, update_window=(10, 50))),
                         device)
    add(f"whole trajectory, {steps} steps, {end - start + 1} updates", f"fast, {dtype}", round(trajectory, 2), "s")

    tokens, width, pooled = sr.text_shape(pipe)
    direction = sr.Direction(width, tokens, pooled=pooled)  # rank 1 like a trained one, moved away from zero
    for name, factor in direction.named_parameters():
        if name.endswith("B"):
            factor.data.normal_(generator=torch.Generator().manual_seed(0))
    offset = direction().detach().to(device)
    for batch in args.sampling_batches:
        plain, steered = sampling_rates(pipe, batch, offset, steps, resolution, max(1, repeats // 3),
                                        warmup_steps=steps if args.compile else 1)  # compiling sees each variant
        add(f"sampling, batch {batch}, {steps} steps", f"{dtype}, no direction", plain, "images/s")
        add(f"sampling, batch {batch}, {steps} steps", f"{dtype}, with direction", steered, "images/s")
        add(f"steering overhead, batch {batch}", "time with / without", round(plain / steered, 3), "x")

    widths = [max(len(str(r[k])) for r in rows) for k in ("measure", "mode", "value")]
    print("\n" + " | ".join(f"{k} {v}" for k, v in info.items()))
    for r in rows:
        print(f"{r['measure']:<{widths[0]}}  {r['mode']:<{widths[1]}}  {str(r['value']):>{widths[2]}}  {r['unit']}")
    report = json.dumps(dict(info, rows=rows), indent=1)
    with atomic(args.out) as tmp:
        tmp.write_text(report + "\n")
    print(f"wrote {args.out}; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
