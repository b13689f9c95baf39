"""Tiny Stable Diffusion pipelines with random weights, built in code and saved as a folder.

They have SD v1.x's structure (CLIP text encoder, conditional U-Net, VAE, PNDM scheduler as
shipped by SD v1.4) at a size that runs on a CPU in milliseconds. The tokenizer is a real
CLIPTokenizer over single printable characters, padded to 77 tokens like SD's.
"""

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def tokenizer(words=()):
    """Characters 33..126 as tokens, plus whole `words` as single tokens (through BPE merges)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = [chr(i) for i in range(33, 127)]
    for piece in chars + [c + "</w>" for c in chars]:
        vocab[piece] = len(vocab)
    merges = []
    for word in words:  # merge left to right: "r e d</w>" -> "re d</w>" -> "red</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def text_encoder(width, vocab_size, layers=2):
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config)


def unet(width, channels=(32, 64), latent_channels=4):
    return UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=1, sample_size=16, in_channels=latent_channels,
        out_channels=latent_channels, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=width,
        attention_head_dim=8, norm_num_groups=min(channels))


def vae(latent_channels=4):
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=32)


def scheduler():
    """SD v1.4's scheduler config (PNDM); saferegion swaps in LMS with the same betas."""
    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)


def pipeline(width=32, seed=0):
    torch.manual_seed(seed)
    tok = tokenizer()
    return StableDiffusionPipeline(vae=vae(), text_encoder=text_encoder(width, len(tok)), tokenizer=tok,
                                   unet=unet(width), scheduler=scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def save_pipeline(path, width=32, seed=0):
    pipeline(width, seed).save_pretrained(path)
    return str(path)


# -----------------------------------------------------------------------------
# Other families: SD 2.x (OpenCLIP, v-prediction) and SDXL (two text encoders, pooled embedding)

def sd2_pipeline(seed=0):
    """SD 2.1's structure: a 1024-wide text encoder (OpenCLIP ViT-H's width, gelu), a U-Net with
    linear projections in its attention, and SD 2.1's scheduler, DDIM with v-prediction."""
    from diffusers import DDIMScheduler
    torch.manual_seed(seed)
    tok = tokenizer()
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    denoiser = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=1024, attention_head_dim=8, use_linear_projection=True, norm_num_groups=32)
    schedule = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                             num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1,
                             prediction_type="v_prediction")
    return StableDiffusionPipeline(vae=vae(), text_encoder=CLIPTextModel(config), tokenizer=tok, unet=denoiser,
                                   scheduler=schedule, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sdxl_pipeline(width=32, seed=0):
    """SDXL's structure: two CLIP text encoders whose last-but-one hidden states are concatenated
    (2 x width per token), the second with a projection giving the pooled embedding (width), a U-Net
    with addition_embed_type="text_time" (pooled embedding and six time ids enter through the time
    embedding), SDXL's Euler scheduler and its zero unconditional embedding for an empty prompt."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection
    torch.manual_seed(seed)
    tok = tokenizer()
    config = dict(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                  bos_token_id=0, eos_token_id=1, pad_token_id=1)
    time_embed = 8  # per time id; SDXL's is 256
    denoiser = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * width, attention_head_dim=8, use_linear_projection=True, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=6 * time_embed + width)
    schedule = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae(), text_encoder=CLIPTextModel(CLIPTextConfig(**config)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config, projection_dim=width)),
        tokenizer_2=tokenizer(), unet=denoiser, scheduler=schedule, force_zeros_for_empty_prompt=True,
        add_watermarker=False)


def save_sd2_pipeline(path, seed=0):
    sd2_pipeline(seed).save_pretrained(path)
    return str(path)


def save_sdxl_pipeline(path, width=32, seed=0):
    sdxl_pipeline(width, seed).save_pretrained(path)
    return str(path)
