"""Tiny SD 3.x and FLUX.1 pipelines with random weights, built in code and saved as a folder.

They have the real pipelines' structure at a size that runs on a CPU in a fraction of a second:
SD 3.x's three text encoders (two CLIPs with projections, whose pooled outputs are concatenated,
and a T5 encoder), an MMDiT (SD3Transformer2DModel), a 16-channel VAE and the flow-matching Euler
scheduler with SD 3's shift of 3; FLUX.1's CLIP (pooled output only) and T5 encoder, a
FluxTransformer2DModel with or without the distilled guidance input (FLUX.1-dev or -schnell),
the same VAE and the scheduler with FLUX's resolution-dependent shift. The T5 tokenizer is a real
T5 tokenizer (Unigram over single printable characters) built offline.
"""

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from tiny import tokenizer as clip_tokenizer


def t5_tokenizer():
    """T5's special tokens (<pad> 0, </s> 1, <unk> 2) and the printable characters, with and without
    the word-start mark; every text ends with </s>, as T5's does."""
    pieces = ["<pad>", "</s>", "<unk>", "▁"] + [p for i in range(33, 127) for p in (chr(i), "▁" + chr(i))]
    model = Tokenizer(models.Unigram([(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)], unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def t5_encoder(width, vocab_size):
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=width, d_ff=2 * width, d_kv=8, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def clip(width, vocab_size, projection=0):
    """A CLIP text encoder; with projection=P the variant with a projected pooled output (text_embeds)."""
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                            bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=projection or width)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def vae(scaling_factor, shift_factor):
    """SD 3's and FLUX's 16 latent channels, without the quant convolutions, with their scale and shift."""
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=16, norm_num_groups=32, scaling_factor=scaling_factor,
                         shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def sd3_pipeline(seed=0, t5=True):
    """SD 3.x: CLIP-L (32 wide) and CLIP-G (48 wide) token embeddings side by side (80), zero-padded to
    the T5 width (96) and followed by T5's tokens, 77 + 256; their projected pooled outputs
    concatenated (32 + 48 = 80); an MMDiT with patch size 2. t5=False: the pipeline without T5,
    whose T5 part is zeros."""
    torch.manual_seed(seed)
    tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=96,
                                        caption_projection_dim=16, pooled_projection_dim=80, out_channels=16,
                                        pos_embed_max_size=32)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(1.5305, 0.0609), text_encoder=clip(32, len(tok), projection=32), tokenizer=tok,
        text_encoder_2=clip(48, len(tok), projection=48), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(96, len(t5_tok)) if t5 else None, tokenizer_3=t5_tok if t5 else None)


def flux_pipeline(seed=0, guidance=True):
    """FLUX.1: CLIP's pooled output (32) and T5's 512 token embeddings (48 wide); a FLUX transformer
    on 2 x 2 patches of the latent (16 x 4 = 64 channels), with the distilled guidance input
    (guidance=True, FLUX.1-dev) or without it (FLUX.1-schnell)."""
    torch.manual_seed(seed)
    tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                         pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae(0.3611, 0.1159),
                        text_encoder=clip(32, len(tok)), tokenizer=tok, text_encoder_2=t5_encoder(48, len(t5_tok)),
                        tokenizer_2=t5_tok)


def save_sd3_pipeline(path, seed=0, t5=True):
    sd3_pipeline(seed, t5).save_pretrained(path)
    return str(path)


def save_flux_pipeline(path, seed=0, guidance=True):
    flux_pipeline(seed, guidance).save_pretrained(path)
    return str(path)
