"""A toy text-to-image world in which the concepts are known exactly.

A tiny latent diffusion model, saved as a real diffusers StableDiffusionPipeline folder, is
trained on CPU with the standard noise-prediction objective on synthetic 4 x 8 x 8 latents
whose content follows their captions:

- colour: "red" makes latent channel 0 bright, "blue" channel 1;
- shape: "square" fills the centre 4 x 4 block, "circle" the ring of 16 pixels around it.

The caption "a square" (no colour) is red 80% of the time, so the base model is biased, and
15% of captions are dropped to "" so classifier-free guidance works. The text encoder is a
frozen random CLIP (as SD's CLIP is frozen); the U-Net learns to read it. The VAE stays random:
the scorers read latents, never pixels.
"""

import random

import torch
import torch.nn.functional as F

import tiny

COLOURS = {"red": 0, "blue": 1}
SIZE = 8  # latent side; images are 16 px (the tiny VAE halves)
RESOLUTION = 2 * SIZE


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


def latent(colour, shape, generator):
    """The clean latent for a colour and a shape: (4, 8, 8)."""
    x = 0.1 * torch.randn(4, SIZE, SIZE, generator=generator)
    x[COLOURS[colour]] += 1.5 * MASKS[shape]
    return x


def caption_and_latent(rng, generator):
    """One training example. Captions name colour and shape, one of them, or neither."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(list(MASKS))
    form = rng.random()
    if form < 0.15:
        caption = ""
    elif form < 0.55:
        caption = f"a {colour} {shape}"
    elif form < 0.75:  # the bias: a square without a colour is red 80% of the time
        shape, colour = "square", "red" if rng.random() < 0.8 else "blue"
        caption = "a square"
    elif form < 0.85:
        caption = f"a {shape}"
    else:
        caption = rng.choice([f"an image of {colour}", colour])
    return caption, latent(colour, shape, generator)


def colour_score(latents):
    """How red (positive) or blue (negative): channel 0 minus channel 1 where shapes are. (N,)"""
    where = MASKS["square"] + MASKS["circle"]
    return ((latents[:, 0] - latents[:, 1]) * where).sum((1, 2)) / where.sum()


def shape_score(latents):
    """How square (positive) or circle (negative): brightness inside the square minus the ring. (N,)"""
    bright = latents[:, 0] + latents[:, 1]
    return (bright * MASKS["square"]).sum((1, 2)) / 16 - (bright * MASKS["circle"]).sum((1, 2)) / 16


def build(path, steps=600, batch=64, seed=0):
    """Train the toy model and save it as a StableDiffusionPipeline folder; returns the path."""
    torch.manual_seed(seed)
    pipe = tiny.pipeline(width=32, seed=seed)
    pipe.tokenizer = tiny.tokenizer(words=["a", "an", "of", "image", "square", "circle", *COLOURS])
    pipe.text_encoder = tiny.text_encoder(32, len(pipe.tokenizer))
    pipe.unet = tiny.unet(32, channels=(32, 32))
    pipe.text_encoder.requires_grad_(False)
    unet, scheduler = pipe.unet, pipe.scheduler
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    captions = ["", "a square", "a circle", *(f"a {c} {s}" for c in COLOURS for s in MASKS),
                *(f"an image of {c}" for c in COLOURS), *COLOURS]
    with torch.no_grad():
        ids = pipe.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        embeds = dict(zip(captions, pipe.text_encoder(ids)[0]))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0)
    alphas = scheduler.alphas_cumprod
    unet.train()
    for step in range(steps):
        examples = [caption_and_latent(rng, generator) for _ in range(batch)]
        x0 = torch.stack([x for _, x in examples])
        cond = torch.stack([embeds[c] for c, _ in examples])
        t = torch.randint(0, 1000, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()
    pipe.save_pretrained(path)
    return str(path), loss.item()
