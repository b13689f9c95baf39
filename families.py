"""
Model families: all that differs between SD v1.x, SD 2.x, SDXL, SD 3.x and FLUX.1 is in this module,
so that saferegion.py reads the same for every family. docs/families.md says what was decided for
each of them and why.

SD v1.x and 2.x give the U-Net one text input, the token embeddings (T, D): D = 768 (CLIP ViT-L)
or 1024 (OpenCLIP ViT-H). SDXL gives it the token embeddings of its two text encoders side by side
(T, 768 + 1280) and, through the time embedding, the second one's pooled embedding (P = 1280) with
six "time ids" (the image size). A concept reaches SDXL's U-Net through both text inputs, so its
direction offsets both (ours). SDXL's text embedding is kept packed as one (T + 1, D) tensor, the
pooled embedding in the first P entries of the last row, so that it is added, stacked and batched
as SD's is: outside this module the method reads the same for every family.

SD 3.x and FLUX.1 (ours) are flow-matching transformers: they predict a velocity v = eps - x0, and
the method's targets carry over to velocities unchanged (derived in docs/families.md). SD 3.x gives
its MMDiT tokens (77 + 256, 4096), CLIP-L's and CLIP-G's side by side (768 + 1280, zero-padded to
T5's 4096) followed by T5's 256, and the two CLIPs' pooled embeddings side by side (P = 2048); its
direction offsets both, packed as SDXL's. FLUX.1 gives its transformer T5's tokens (512, 4096) and
CLIP-L's pooled embedding (768), which only modulates the blocks; its pipeline lets a step callback
swap the tokens but not the pooled embedding, so the direction offsets the T5 tokens alone
(T = 512, P = 0) and the pooled embedding rides along unchanged, packed in the last row.
FLUX.1-dev's guidance is an input of the transformer, not a second prediction: its trajectories
follow its one prediction, and v_0 and v_u come from that same call.
"""

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

FAMILIES = {"sd1": "SD v1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD 3.x", "flux": "FLUX.1"}
FLOW = ("sd3", "flux")  # flow matching: a transformer, FlowMatchEulerDiscreteScheduler
T5_TOKENS = {"sd3": 256, "flux": 512}  # the pipelines' default max_sequence_length
# The steps and guidance a family trains and samples with where none are given: the paper's for the
# U-Net families; SD 3.x's and FLUX.1-dev's pipelines' own; FLUX.1-schnell's 4 steps, where the guidance
# (FLUX.1-dev's, ours) only scales the erase target: that model has no guidance input.
DEFAULTS = {"sd1": (50, 7.5), "sd2": (50, 7.5), "sdxl": (50, 7.5), "sd3": (28, 7.0), "flux": (28, 3.5),
            "flux-schnell": (4, 3.5)}


def family(pipe):
    """The family of a loaded pipeline: by its class for the transformers, by its text encoders for the U-Nets."""
    name = type(pipe).__name__
    if name == "StableDiffusion3Pipeline":
        return "sd3"
    if name == "FluxPipeline":
        return "flux"
    if hasattr(pipe, "text_encoder_2"):
        return "sdxl"
    return "sd2" if pipe.text_encoder.config.hidden_size == 1024 else "sd1"


def distilled_guidance(pipe):
    """FLUX.1-dev: the guidance scale is an input of the transformer, not a second prediction."""
    return family(pipe) == "flux" and pipe.transformer.config.guidance_embeds


def text_shape(pipe):
    """(T, D, P): the tokens and the width of a token's embedding, and the width of the pooled embedding
    the direction offsets (0: none)."""
    kind = family(pipe)
    if kind in FLOW:
        config = pipe.transformer.config
        clip_tokens = pipe.tokenizer_max_length if kind == "sd3" else 0
        return clip_tokens + T5_TOKENS[kind], config.joint_attention_dim, config.pooled_projection_dim * (kind == "sd3")
    tokens, first = pipe.tokenizer.model_max_length, pipe.text_encoder.config
    if kind != "sdxl":
        return tokens, first.hidden_size, 0
    second = pipe.text_encoder_2.config
    return tokens, first.hidden_size + second.hidden_size, second.projection_dim


def pooled_width(pipe):
    """The width of the pooled embedding packed with the tokens, offset or not (FLUX's is not)."""
    return pipe.transformer.config.pooled_projection_dim if family(pipe) == "flux" else text_shape(pipe)[2]


def describe(pipe):
    """The model's family and the defaults that follow from it, as train.py prints and stores them."""
    kind = family(pipe)
    tokens, width, pooled = text_shape(pipe)
    text = f"{tokens}x{width}" + (f" + pooled {pooled}" if pooled else "")
    if kind in FLOW:
        config = pipe.scheduler.config
        shift = "shift by image size" if config.use_dynamic_shifting else f"shift {config.shift:g}"
        guidance = ", guidance distilled" if distilled_guidance(pipe) else ", no guidance" if kind == "flux" else ""
        return {"family": kind, "text": text + (f" (pooled {pooled_width(pipe)} not offset)" if kind == "flux" else ""),
                "resolution": pipe.default_sample_size * pipe.vae_scale_factor,
                "scheduler": f"flow-matching Euler, {shift}, velocity prediction{guidance}"}
    return {"family": kind, "text": text,
            "resolution": pipe.unet.config.sample_size * pipe.vae_scale_factor,  # the pipeline's own default
            "scheduler": f"LMS, {pipe.scheduler.config.prediction_type} prediction"}


def pack(tokens, pooled):
    """Token (N, T, D) and pooled (N, P) embeddings as one tensor, (N, T + 1, D)."""
    return torch.cat([tokens, F.pad(pooled, (0, tokens.shape[-1] - pooled.shape[-1]))[:, None]], dim=1)


def unpack(embeds, pooled):
    """pack's inverse: the tokens (N, T, D) and the first `pooled` entries of the last row, (N, P)."""
    return embeds[:, :-1], embeds[:, -1, :pooled]


@torch.no_grad()
def embed(pipe, prompts):
    """E(p), what the text encoders hand the denoiser for each prompt: (N, T, D); packed (N, T + 1, D)
    where there is a pooled embedding (SDXL, SD 3.x, FLUX.1)."""
    kind = family(pipe)
    if kind == "flux":
        tokens, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=pipe.device, num_images_per_prompt=1,
                                               max_sequence_length=T5_TOKENS["flux"])
        return pack(tokens, pooled)
    extra = dict(prompt_2=None, prompt_3=None, max_sequence_length=T5_TOKENS["sd3"]) if kind == "sd3" else {}
    out = pipe.encode_prompt(prompts, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                             **extra)
    return pack(out[0], out[2]) if kind in ("sdxl", "sd3") else out[0]


def unconditional(pipe, n=1, negative_prompt=""):
    """The unconditional embedding of CFG, (n, T, D): E(negative_prompt), or zeros for an empty one
    where the model's own pipeline uses zeros (SDXL's force_zeros_for_empty_prompt)."""
    embeds = embed(pipe, [negative_prompt] * n)
    zeros = not negative_prompt and pipe.config.get("force_zeros_for_empty_prompt", False)
    return torch.zeros_like(embeds) if zeros else embeds


class PooledUNet:
    """SDXL's U-Net called as SD's is, unet(x, t, encoder_hidden_states=E), E packed (N, T + 1, D): the
    pooled embedding goes to added_cond_kwargs, with the time ids (original size, crop corner, size)."""

    def __init__(self, unet, pooled, resolution):
        self.unet, self.pooled, self.dtype, self.config = unet, pooled, unet.dtype, unet.config
        self.time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]])  # (1, 6)

    def __call__(self, x, t, encoder_hidden_states):
        tokens, pooled = unpack(encoder_hidden_states, self.pooled)
        time_ids = self.time_ids.to(x.device, x.dtype).expand(len(x), -1)
        return self.unet(x, t, encoder_hidden_states=tokens, added_cond_kwargs={"text_embeds": pooled,
                                                                                 "time_ids": time_ids})


class FlowTransformer:
    """SD 3.x's or FLUX.1's transformer called as SD's U-Net is, model(x, t, encoder_hidden_states=E).sample:
    x the latent (N, C, H, W), t the scheduler's timestep (1000 sigma), E packed (N, T + 1, D). Its output
    is the velocity v = eps - x0, (N, C, H, W). FLUX's latent goes in as 2 x 2 patches, (N, HW / 4, 4C),
    with their positions; FLUX.1-dev's distilled guidance scale goes in as an input."""

    def __init__(self, pipe, guidance):
        self.model, self.flux, self.pooled = pipe.transformer, family(pipe) == "flux", pooled_width(pipe)
        self.pipeline = type(pipe)  # FluxPipeline: its own (un)patching and patch positions
        self.dtype = self.model.dtype
        self.config = SimpleNamespace(in_channels=self.model.config.in_channels // (4 if self.flux else 1))
        self.guidance = guidance if distilled_guidance(pipe) else None

    def __call__(self, x, t, encoder_hidden_states):
        tokens, pooled = unpack(encoder_hidden_states, self.pooled)
        n, c, h, w = x.shape
        t = t.expand(n)
        if not self.flux:
            return self.model(hidden_states=x, timestep=t, encoder_hidden_states=tokens, pooled_projections=pooled)
        patches = self.pipeline._pack_latents(x, n, c, h, w)
        guidance = None if self.guidance is None else torch.full([n], self.guidance, device=x.device)
        v = self.model(hidden_states=patches, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                       pooled_projections=pooled, encoder_hidden_states=tokens,
                       txt_ids=torch.zeros(tokens.shape[1], 3, device=x.device, dtype=x.dtype),
                       img_ids=self.pipeline._prepare_latent_image_ids(n, h // 2, w // 2, x.device, x.dtype)).sample
        return SimpleNamespace(sample=self.pipeline._unpack_latents(v, h, w, 1))


class FlowSampler:
    """FlowMatchEulerDiscreteScheduler as training calls an SD scheduler: set_timesteps(steps) gives the sigmas
    the family's pipeline uses at this image size (FLUX: 1 to 1/steps, shifted by the image's patch count);
    the trajectory starts at pure noise, x_1 = eps, and the model's input is not scaled."""
    init_noise_sigma = 1.0

    def __init__(self, pipe, resolution):
        self.scheduler, self.flux = pipe.scheduler, family(pipe) == "flux"
        patch = 2 if self.flux else pipe.transformer.config.patch_size
        self.image_tokens = (resolution // pipe.vae_scale_factor // patch) ** 2

    def set_timesteps(self, steps, device=None):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        config, schedule = self.scheduler.config, {}
        if self.flux:
            schedule["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        if config.use_dynamic_shifting or self.flux:
            schedule["mu"] = calculate_shift(self.image_tokens, config.get("base_image_seq_len", 256),
                                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                             config.get("max_shift", 1.15 if self.flux else 1.16))
        self.scheduler.set_timesteps(None if self.flux else steps, device=device, **schedule)

    @property
    def timesteps(self):
        return self.scheduler.timesteps

    def scale_model_input(self, x, t):
        return x

    def step(self, v, t, x):
        return self.scheduler.step(v, t, x)


def denoiser(pipe, resolution, guidance=None):
    """The denoiser as training calls it: SD's U-Net, SDXL's wrapped as a PooledUNet, SD 3.x's and FLUX.1's
    transformers as FlowTransformers (guidance: FLUX.1-dev's distilled guidance input)."""
    if family(pipe) in FLOW:
        return FlowTransformer(pipe, guidance)
    return PooledUNet(pipe.unet, text_shape(pipe)[2], resolution) if family(pipe) == "sdxl" else pipe.unet


def sampler(pipe, resolution):
    """The scheduler as training calls it: the pipeline's own (LMS), the flow-matching one as a FlowSampler."""
    return FlowSampler(pipe, resolution) if family(pipe) in FLOW else pipe.scheduler


def guided(pipe, null, cond, guidance):
    """The prediction a trajectory follows: CFG, or FLUX's single prediction (its guidance, if any, is an input)."""
    return cond if family(pipe) == "flux" else null + guidance * (cond - null)


def decode(pipe, latents, resolution):
    """Final latents as the family's pipeline decodes them, (N, 3, H, W) in [-1, 1]: SD 3.x's and FLUX.1's
    VAEs also shift the latent, and FLUX's latent comes as 2 x 2 patches, (N, HW / 4, 4C)."""
    config = pipe.vae.config
    if family(pipe) not in FLOW:
        return pipe.vae.decode(latents / config.scaling_factor).sample
    if family(pipe) == "flux":
        latents = pipe._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor)
    return pipe.vae.decode(latents / config.scaling_factor + config.shift_factor).sample


def pipeline_inputs(pipe, cond, uncond):
    """The pipeline's arguments for conditional and unconditional embeddings, each (N, T, D) or packed.
    FLUX.1 takes no unconditional one: its guidance is distilled (dev) or absent (schnell)."""
    kind = family(pipe)
    if kind in ("sd1", "sd2"):
        return dict(prompt_embeds=cond, negative_prompt_embeds=uncond)
    (tokens, pooled), (null, null_pooled) = (unpack(e, pooled_width(pipe)) for e in (cond, uncond))
    if kind == "flux":
        return dict(prompt_embeds=tokens, pooled_prompt_embeds=pooled, max_sequence_length=tokens.shape[1])
    return dict(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null,
                negative_pooled_prompt_embeds=null_pooled)


def callback_tensors(pipe, embeds):
    """What steering swaps, by the names of the pipeline's callback_on_step_end tensor inputs."""
    kind = family(pipe)
    if kind in ("sd1", "sd2"):
        return {"prompt_embeds": embeds}
    tokens, pooled = unpack(embeds, pooled_width(pipe))
    if kind == "flux":
        return {"prompt_embeds": tokens}  # FLUX's callback can swap no other text input
    return {"prompt_embeds": tokens, ("add_text_embeds" if kind == "sdxl" else "pooled_prompt_embeds"): pooled}
