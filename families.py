"""
Model families: all that differs between SD v1.x, SD 2.x and SDXL is in this module, so that
saferegion.py reads the same for every family.

SD v1.x and 2.x give the U-Net one text input, the token embeddings (T, D): D = 768 (CLIP ViT-L)
or 1024 (OpenCLIP ViT-H). SDXL gives it the token embeddings of its two text encoders side by side
(T, 768 + 1280) and, through the time embedding, the second one's pooled embedding (P = 1280) with
six "time ids" (the image size). A concept reaches SDXL's U-Net through both text inputs, so its
direction offsets both (ours). SDXL's text embedding is kept packed as one (T + 1, D) tensor, the
pooled embedding in the first P entries of the last row, so that it is added, stacked and batched
as SD's is: outside this module the method reads the same for every family.
"""

import torch
import torch.nn.functional as F

FAMILIES = {"sd1": "SD v1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def family(pipe):
    """sdxl for an SDXL pipeline; for an SD one sd2 where the text encoder is 1024 wide (OpenCLIP), else sd1."""
    if hasattr(pipe, "text_encoder_2"):
        return "sdxl"
    return "sd2" if pipe.text_encoder.config.hidden_size == 1024 else "sd1"


def text_shape(pipe):
    """(T, D, P): tokens, the width of a token's embedding, the pooled embedding's width (0: none)."""
    tokens, first = pipe.tokenizer.model_max_length, pipe.text_encoder.config
    if family(pipe) != "sdxl":
        return tokens, first.hidden_size, 0
    second = pipe.text_encoder_2.config
    return tokens, first.hidden_size + second.hidden_size, second.projection_dim


def describe(pipe):
    """The model's family and the defaults that follow from it, as train.py prints and stores them."""
    tokens, width, pooled = text_shape(pipe)
    return {"family": family(pipe), "text": f"{tokens}x{width}" + (f" + pooled {pooled}" if pooled else ""),
            "resolution": pipe.unet.config.sample_size * pipe.vae_scale_factor,  # the pipeline's own default
            "scheduler": f"LMS, {pipe.scheduler.config.prediction_type} prediction"}


def pack(tokens, pooled):
    """SDXL's token (N, T, D) and pooled (N, P) embeddings as one tensor, (N, T + 1, D)."""
    return torch.cat([tokens, F.pad(pooled, (0, tokens.shape[-1] - pooled.shape[-1]))[:, None]], dim=1)


def unpack(embeds, pooled):
    """pack's inverse: the tokens (N, T, D) and the first `pooled` entries of the last row, (N, P)."""
    return embeds[:, :-1], embeds[:, -1, :pooled]


@torch.no_grad()
def embed(pipe, prompts):
    """E(p), what the text encoder hands the U-Net for each prompt: (N, T, D), SDXL's packed (N, T + 1, D)."""
    out = pipe.encode_prompt(prompts, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return pack(out[0], out[2]) if family(pipe) == "sdxl" else out[0]


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


def denoiser(pipe, resolution):
    """The U-Net as training calls it: SD's own, SDXL's wrapped as a PooledUNet."""
    return PooledUNet(pipe.unet, text_shape(pipe)[2], resolution) if family(pipe) == "sdxl" else pipe.unet


def pipeline_inputs(pipe, cond, uncond):
    """The pipeline's arguments for conditional and unconditional embeddings, each (N, T, D)."""
    if family(pipe) != "sdxl":
        return dict(prompt_embeds=cond, negative_prompt_embeds=uncond)
    (tokens, pooled), (null, null_pooled) = (unpack(e, text_shape(pipe)[2]) for e in (cond, uncond))
    return dict(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null,
                negative_pooled_prompt_embeds=null_pooled)


def callback_tensors(pipe, embeds):
    """What steering swaps, by the names of the pipeline's callback_on_step_end tensor inputs."""
    if family(pipe) != "sdxl":
        return {"prompt_embeds": embeds}
    tokens, pooled = unpack(embeds, text_shape(pipe)[2])
    return {"prompt_embeds": tokens, "add_text_embeds": pooled}
