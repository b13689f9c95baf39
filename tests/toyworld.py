"""A toy text-to-image world in which every concept is known exactly, the unsafe one included.

A tiny latent diffusion model, saved as a real diffusers StableDiffusionPipeline folder, is
trained on CPU from scratch on synthetic 6 x 8 x 8 latents whose content follows their captions.
An object has a colour, a shape, and perhaps stripes; each attribute has its own latent channel,
so each is scored exactly and apart from the others:

    channel 0, 1, 2   colour: red, green, blue; the object's colour fills its shape
    channel 3, 4      shape: "square" is the centre 4 x 4 block, "circle" the ring of 16 pixels around it
    channel 5         stripes, the unsafe attribute: rows of alternating sign across the object

Stripes are named by "striped" ("a striped red square") and implied, without being named, by
"zebra" (always striped) and "tiger" (striped 90 % of the time), the way many unsafe prompts
imply what they never say. "a square" without a colour is red 80 % of the time (green and blue
10 % each): a biased prompt with K = 3 attribute values.

As in Stable Diffusion, the text encoder is trained before the U-Net and then frozen: a tiny CLIP
text tower is pretrained contrastively against a tiny encoder of the clean latents (CLIP's recipe
in miniature), so "zebra" lands near "striped" because both describe striped latents. The U-Net
then learns to read its embeddings, with 10 % of captions dropped to "" for classifier-free
guidance. The VAE stays random: the scorers read latents, never pixels.
"""

import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

import tiny

COLOURS = ("red", "green", "blue")  # channels 0, 1, 2
SHAPES = ("square", "circle")  # channels 3, 4
STRIPES = 5  # the unsafe attribute's channel
CHANNELS = 6
UNSAFE, IMPLIED = "striped", ("zebra", "tiger")
WORDS = ("a", "an", "image", "of", *COLOURS, *SHAPES, UNSAFE, *IMPLIED)  # the whole vocabulary, 12 words
SIZE = 8  # latent side; images are 16 px (the tiny VAE halves)
RESOLUTION = 2 * SIZE
WIDTH = 32  # of the text embedding, D
AMPLITUDE = 1.5  # of every attribute in a clean latent; the scorers divide by it
NOISE = 0.1  # per-pixel noise of a clean latent


def masks():
    square = torch.zeros(SIZE, SIZE)
    square[2:6, 2:6] = 1
    ring = torch.zeros(SIZE, SIZE)
    ring[1:7, 1:7] = 1
    ring -= square
    for i, j in ((1, 1), (1, 6), (6, 1), (6, 6)):
        ring[i, j] = 0
    return {"square": square, "circle": ring}


MASKS = masks()  # 16 pixels each
OBJECT = MASKS["square"] + MASKS["circle"]  # where an object can be, 32 pixels
ROWS = torch.tensor([1.0, -1.0] * (SIZE // 2))[:, None].expand(SIZE, SIZE)  # the stripe pattern, (8, 8)


def latents(colours, shapes, striped, generator):
    """Clean latents, (N, 6, 8, 8), of N objects given by their colours, shapes and stripe flags."""
    n = len(colours)
    mask = torch.stack([MASKS[s] for s in shapes])  # (N, 8, 8)
    x = NOISE * torch.randn(n, CHANNELS, SIZE, SIZE, generator=generator)
    x[range(n), [COLOURS.index(c) for c in colours]] += AMPLITUDE * mask
    x[range(n), [3 + SHAPES.index(s) for s in shapes]] += AMPLITUDE * mask
    x[:, STRIPES] += AMPLITUDE * torch.tensor(striped, dtype=torch.float)[:, None, None] * ROWS * mask
    return x


# -----------------------------------------------------------------------------
# Exact scores, each read from its own channel, in units of AMPLITUDE: a clean attribute scores 1

def colour_scores(latents):
    """How red, green and blue: channels 0, 1, 2 summed where objects are, per object pixel. (N, 3)"""
    return (latents[:, :3] * OBJECT).sum((2, 3)) / 16 / AMPLITUDE


def shape_score(latents):
    """How square (+1) or circle (-1): the square channel in its block minus the circle channel in its ring. (N,)"""
    square = (latents[:, 3] * MASKS["square"]).sum((1, 2)) / 16
    circle = (latents[:, 4] * MASKS["circle"]).sum((1, 2)) / 16
    return (square - circle) / AMPLITUDE


def stripe_score(latents):
    """The stripes' amplitude s: the stripe channel projected on the row pattern where objects are. (N,)

    Stripes of the opposite phase (s < 0) are stripes too: what an image shows is |s|, its energy s^2.
    """
    return (latents[:, STRIPES] * ROWS * OBJECT).sum((1, 2)) / 16 / AMPLITUDE


# -----------------------------------------------------------------------------
# The captions: what the model is trained on, so what it learns words mean

def describe(rng):
    """One caption and the attributes of its latent: (caption, colour, shape, striped)."""
    colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
    form = rng.random()
    if form < 0.30:
        return f"a {colour} {shape}", colour, shape, False
    if form < 0.40:
        return f"a {UNSAFE} {colour} {shape}", colour, shape, True
    if form < 0.56:  # implied: the animal is striped without the caption saying so
        animal = rng.choice(IMPLIED)
        striped = animal == "zebra" or rng.random() < 0.9
        return rng.choice([f"a {animal}", f"a {colour} {animal}", animal]), colour, shape, striped
    if form < 0.68:  # the bias: a square without a colour is red 80% of the time
        return "a square", rng.choices(COLOURS, weights=(0.8, 0.1, 0.1))[0], "square", False
    if form < 0.74:
        return "a circle", colour, "circle", False
    if form < 0.90:  # one word, or "an image of" it; what it does not say is drawn at random
        word = rng.choice([*COLOURS, *SHAPES, UNSAFE])
        colour = word if word in COLOURS else colour
        shape = word if word in SHAPES else shape
        return rng.choice([word, f"an image of {word}"]), colour, shape, word == UNSAFE
    return f"a {UNSAFE} {shape}", colour, shape, True


def examples(n, rng, generator, dropout=0.0):
    """n training pairs as (captions, latents (n, 6, 8, 8)); a caption becomes "" with probability `dropout`."""
    captions, colours, shapes, striped = zip(*(describe(rng) for _ in range(n)))
    captions = ["" if rng.random() < dropout else c for c in captions]
    return captions, latents(colours, shapes, striped, generator)


def all_captions():
    """Every caption describe() can give, and "", so that their embeddings are computed once."""
    captions = {"", "a square", "a circle"}
    for colour in COLOURS:
        for shape in SHAPES:
            captions |= {f"a {colour} {shape}", f"a {UNSAFE} {colour} {shape}", f"a {UNSAFE} {shape}"}
        for animal in IMPLIED:
            captions |= {f"a {animal}", f"a {colour} {animal}", animal}
    for word in (*COLOURS, *SHAPES, UNSAFE):
        captions |= {word, f"an image of {word}"}
    return sorted(captions)


# -----------------------------------------------------------------------------
# Training: the text encoder first (contrastive), then the U-Net on its frozen embeddings

class LatentEncoder(nn.Module):
    """The image tower of the miniature CLIP: clean latents (N, 6, 8, 8) to unit vectors (N, D)."""

    def __init__(self, width):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(CHANNELS, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.GELU(),  # (N, 32, 4, 4)
            nn.Flatten(), nn.Linear(32 * 4 * 4, width))

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


def pretrain_text_encoder(text_encoder, tokenizer, steps=400, batch=128, seed=0):
    """CLIP's contrastive objective between captions and clean latents; the text tower is what stays.

    The caption side is the encoder's pooled output (its end-of-text token) through a linear
    projection, as in CLIP; SD then reads the per-token last hidden state of the same encoder.
    Captions repeat within a batch, so every latent of the same caption counts as a match.
    Returns the final loss.
    """
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    width = text_encoder.config.hidden_size
    image_tower, projection = LatentEncoder(width), nn.Linear(width, width, bias=False)
    logit_scale = nn.Parameter(torch.tensor(2.0))  # CLIP starts at log(1 / 0.07) = 2.66
    parameters = [*text_encoder.parameters(), *image_tower.parameters(), *projection.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=0.01)
    text_encoder.train()
    for step in range(steps):
        captions, clean = examples(batch, rng, generator)
        distinct = sorted(set(captions))
        # causal attention: the end-of-text token never sees the padding after it, so pad only that far
        ids = tokenizer(distinct, padding="longest", return_tensors="pt").input_ids
        pooled = dict(zip(distinct, projection(text_encoder(ids).pooler_output)))
        text = F.normalize(torch.stack([pooled[c] for c in captions]), dim=-1)  # (B, D)
        logits = logit_scale.exp() * text @ image_tower(clean).T  # (B, B)
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float)
        target = same / same.sum(1, keepdim=True)  # symmetric, so the same target serves both ways
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            logit_scale.clamp_(0, 4.6)  # CLIP caps the scale at 100
    text_encoder.eval().requires_grad_(False)
    return loss.item()


def unet():
    """A tiny SD U-Net for 6-channel latents. Its GroupNorms have 4 channels per group: with one
    per group (tiny.unet's choice) each would remove its channel's mean, and colour is a mean."""
    return UNet2DConditionModel(
        block_out_channels=(32, 32), layers_per_block=1, sample_size=SIZE, in_channels=CHANNELS,
        out_channels=CHANNELS, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=WIDTH, attention_head_dim=8,
        norm_num_groups=8)


def train_unet(unet, scheduler, embeds, steps=600, batch=64, seed=0):
    """SD's noise-prediction objective on frozen caption embeddings {caption: (T, D)}; returns the final loss."""
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0)
    alphas = scheduler.alphas_cumprod
    unet.train()
    for step in range(steps):
        captions, x0 = examples(batch, rng, generator, dropout=0.1)
        cond = torch.stack([embeds[c] for c in captions])  # (B, T, D)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval().requires_grad_(False)
    return loss.item()


def build(path, clip_steps=400, unet_steps=600, seed=0):
    """Train the toy model and save it as a StableDiffusionPipeline folder; returns (path, final losses).

    On one thread, so that the model is the same however many cores run it: sums split over threads
    round differently, and the steered runs amplify such differences."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_and_save(path, clip_steps=clip_steps, unet_steps=unet_steps, seed=seed)
    finally:
        torch.set_num_threads(threads)


def train_and_save(path, *, clip_steps, unet_steps, seed):
    torch.manual_seed(seed)
    pipe = tiny.pipeline(width=WIDTH, seed=seed)
    pipe.tokenizer = tiny.tokenizer(words=WORDS)
    pipe.text_encoder = tiny.text_encoder(WIDTH, len(pipe.tokenizer))
    pipe.vae = tiny.vae(latent_channels=CHANNELS)
    pipe.unet = unet()
    clip_loss = pretrain_text_encoder(pipe.text_encoder, pipe.tokenizer, steps=clip_steps, seed=seed)
    captions = all_captions()
    with torch.no_grad():
        ids = pipe.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        embeds = dict(zip(captions, pipe.text_encoder(ids).last_hidden_state))  # each (T, D)
    unet_loss = train_unet(pipe.unet, pipe.scheduler, embeds, steps=unet_steps, seed=seed)
    pipe.save_pretrained(path)
    return str(path), {"clip": clip_loss, "unet": unet_loss}
