"""
Safe Latent Diffusion (Schramowski et al., CVPR 2023), diffusers' StableDiffusionPipelineSafe, with a
direction steering its prompt embedding as saferegion.generate steers the stock pipeline's.
"""

import warnings

import torch

import saferegion as sr
from inputs import UserError
from models import pipeline_class


def refuse_other_families(model, preset):
    """--sld on an SDXL, SD 3.x or FLUX.1 model: refused before anything loads."""
    name = pipeline_class(model).__name__ if preset else "StableDiffusionPipeline"
    if name != "StableDiffusionPipeline":
        other = {"StableDiffusionXLPipeline": "SDXL", "StableDiffusion3Pipeline": "SD 3.x"}.get(name, "FLUX.1")
        raise UserError(f"--sld works on SD v1.x and 2.x: diffusers' Safe Latent Diffusion has no {other} pipeline")


def check_sld(images, *, preset, concept):
    """--sld-concept without --sld, or --sld without the guidance it acts through: refused."""
    if concept is not None and (not preset or not concept.strip()):
        raise UserError("--sld-concept needs --sld and a non-empty concept")
    if preset and min(im["guidance"] for im in images) <= 1:
        raise UserError("--sld needs a guidance scale above 1: Safe Latent Diffusion acts through guidance")


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
