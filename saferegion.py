"""
Responsible diffusion by constraining text embeddings within safe regions: one small offset d in
the text-embedding space of Stable Diffusion v1.x, learned by self-discovery and added to every
prompt's embedding in the later denoising steps. The README's "How the method works" writes each
step as an equation. The same method runs on SD 2.x, SDXL, SD 3.x and FLUX.1 (ours, not the paper's); what differs
between these model families is in families.py, loading in models.py, the file format in directions.py.

References:
1) Li, Chen, Fan, Chen, Li, Wang, Zhou. "Responsible Diffusion Models via Constraining Text
   Embeddings within Safe Regions." The Web Conference (WWW) 2025. arXiv:2505.15427
2) Li, Shen, Torr, Tresp, Gu. "Self-Discovering Interpretable Diffusion Latent Directions for
   Responsible Text-to-Image Generation." CVPR 2024. arXiv:2311.17216 (the predecessor)

Reading order: concepts, the direction, self-discovery and its training loop, steering, safe regions (ours:
embeddings constrained, not moved), the direction's file. Shapes: T = 77 tokens, D = the text width (768 for
SD v1.x), C, H, W = the latent's. Windows are written in steps of the paper's 50-step sampler: the *update
window* of training (10-50) and the *steer window* of inference (15-50 for safety, 10-50 for fairness).
"""

import math
import random
from dataclasses import dataclass
from itertools import zip_longest

import torch
import torch.nn as nn
import torch.nn.functional as F

# What the method uses from next door, and what users reach as saferegion.X
from directions import check_fits, not_a_direction, read_direction, save_direction  # noqa: F401
from families import (  # noqa: F401
    FAMILIES,
    PooledUNet,
    callback_tensors,
    decode,
    denoiser,
    describe,
    embed,
    family,
    guided,
    pack,
    pipeline_inputs,
    sampler,
    text_shape,
    unconditional,
    unpack,
)
from inputs import RELEASE_STEPS, UserError, file_name
from models import load_pipeline, load_unet  # noqa: F401

LOSS_WEIGHT = 10.0  # the release multiplies the MSE by 10


# -----------------------------------------------------------------------------
# Concepts: what a direction learns

# The unsafe concept c_u of the release: Safe Latent Diffusion's list plus "nude".
UNSAFE = ("hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity,nude, "
          "bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, "
          "weapons, child abuse, brutality, cruelty")
# Ours, not the paper's: the same recipe narrowed to sexual content.
NUDITY = ("nudity, nude, naked, sexual, explicit, topless, bare breasts, genitals, "
          "pornography, erotic")
FACE = "a photo of a face"  # the release's neutral prompt for the fairness directions


@dataclass(frozen=True)
class Concept:
    """What one direction learns. kind "erase": the steered training prompt should act like CFG
    *away from* `target` (c_u); kind "attribute": like the attribute prompt `target`. The defaults
    of `steer_window` and `trajectories` are the release's for safety (fairness: 10-50 and 50)."""
    name: str
    kind: str
    prompt: str
    target: str
    steer_window: tuple = (15, 50)
    trajectories: int = 60


def erase(text, name=None, prefix="an image of "):
    """An erase concept from free text; the training prompt is `prefix + text`."""
    if not text.strip():
        raise UserError("the concept to erase is empty")
    return Concept(name or file_name(text), "erase", prefix + text, text)


def attribute(target, neutral, name=None):
    """A direction that makes the `neutral` prompt act like the `target` prompt."""
    if not target.strip() or not neutral.strip():
        raise UserError("--attribute and --neutral must both be non-empty")
    return Concept(name or file_name(target), "attribute", neutral, target, steer_window=(10, 50), trajectories=50)


def face(value, group):
    return attribute(f"a photo of a {value} person's face", FACE, name=f"{group}-{value}")


BUILTINS = {
    # The release's safety direction, training prompt typo included ("iamge").
    "unsafe": [erase(UNSAFE, "unsafe", prefix="a iamge of ")],
    "nudity": [erase(NUDITY, "nudity")],
    # One direction per attribute value; at sampling one is drawn per image.
    "gender": [face(v, "gender") for v in ("male", "female")],
    "race": [face(v, "race") for v in ("white", "black", "asian")],
}


def builtin(name):
    if name not in BUILTINS:
        raise UserError(f"unknown concept {name!r}; built-ins are: {', '.join(BUILTINS)}")
    return BUILTINS[name]


def concepts_for(*, concept=None, erase_text=None, attribute_text=None, neutral=None):
    """The concepts train.py is asked for: a built-in (one or more), --erase or --attribute with --neutral."""
    if neutral is not None and attribute_text is None:
        raise UserError("--neutral goes with --attribute")
    if concept:
        return builtin(concept)
    if erase_text is not None:
        return [erase(erase_text)]
    if neutral is None:
        raise UserError("--attribute needs --neutral, the prompt to turn into the attribute one")
    return [attribute(attribute_text, neutral)]


# -----------------------------------------------------------------------------
# The direction: a rank-r offset in text-embedding space, "LoRA-initialised"

class Direction(nn.Module):
    """The offset d = B @ A, (T, D), added to all T token embeddings of a prompt.

    B (T, r) starts at zero and A (r, D) standard normal, as a LoRA update is initialised, so
    training starts from exactly the original model and d stays rank r. No alpha/r scaling.
    rank=0 is the ablation the paper argues against: a free, unfactored offset, zero-initialised.
    pooled=P (SDXL, ours): also an offset pooled_B @ pooled_A, (1, P), on the pooled embedding,
    initialised the same way; d is then both, packed as embed() packs them, (T + 1, D).
    """

    def __init__(self, width, tokens=77, rank=1, seed=0, *, pooled=0):
        super().__init__()
        self.pooled = pooled
        if rank == 0:
            self.offset = nn.Parameter(torch.zeros(tokens, width))  # (T, D)
            if pooled:
                self.pooled_offset = nn.Parameter(torch.zeros(1, pooled))  # (1, P)
            return
        generator = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(rank, width, generator=generator))  # (r, D)
        self.B = nn.Parameter(torch.zeros(tokens, rank))  # (T, r)
        if pooled:
            self.pooled_A = nn.Parameter(torch.randn(rank, pooled, generator=generator))  # (r, P)
            self.pooled_B = nn.Parameter(torch.zeros(1, rank))  # (1, r)

    def forward(self):
        free = hasattr(self, "offset")
        tokens = self.offset if free else self.B @ self.A  # (T, D)
        if not self.pooled:
            return tokens
        pooled = self.pooled_offset if free else self.pooled_B @ self.pooled_A  # (1, P)
        return pack(tokens[None], pooled)[0]  # (T + 1, D)


def steer(embeds, offset, beta=1.0):
    """The steered embedding E(p) + beta * d; embeds (N, T, D), offset (T, D) or (N, T, D). Rows that the
    offset lacks (FLUX's pooled embedding, packed last) are not offset."""
    offset = F.pad(offset, (0, 0, 0, embeds.shape[-2] - offset.shape[-2]))
    return embeds + beta * offset.to(embeds.dtype)


def scale_window(window, steps):
    """A window written for the paper's 50 steps, (start, end) 1-indexed, scaled to `steps`."""
    start, end = window
    return math.ceil(start * steps / RELEASE_STEPS), math.ceil(end * steps / RELEASE_STEPS)


def updates_per_trajectory(steps, update_window=(10, 50)):
    """How many Adam updates one training trajectory makes: one per step of the update window."""
    start, end = scale_window(update_window, steps)
    return max(0, min(end, steps) - start + 1)


# -----------------------------------------------------------------------------
# Self-discovery: the frozen model's own predictions are the training signal

def self_discovery_target(eps_null, eps_target, kind, guidance):
    """eps*, what the steered prediction should be; all (1, C, H, W)."""
    if kind == "erase":  # CFG with c_u as the negative prompt: the score pushed away from c_u
        return eps_target + guidance * (eps_null - eps_target)
    return eps_target  # attribute: the steered neutral prompt should predict what the attribute prompt does


def self_discovery_loss(unet, x, t, direction, prompt, *, null, target, kind, guidance):
    """The loss of one denoising step; returns (loss, eps_null, eps_cond) for the trajectory's CFG.

    x: the scaled latent (1, C, H, W); prompt, null, target: E(p), E(""), E(c_u) or E(a), each
    (1, T, D); unet: the U-Net, SDXL's wrapped by `denoiser`. The two predictions without gradient go
    through the U-Net as one batch; only the steered eps_p' carries a gradient, which reaches A and B
    through the cross-attention. With v-prediction (SD 2.x) and flow matching (SD 3.x, FLUX.1) each "eps"
    is the model's v, and the target the same combination of its outputs (docs/families.md)."""
    with torch.no_grad():
        both = torch.cat([null, target])
        eps_null, eps_target = unet(x.expand(2, -1, -1, -1), t, encoder_hidden_states=both).sample.float().chunk(2)
        eps_star = self_discovery_target(eps_null, eps_target, kind, guidance)
    steered = steer(prompt.float(), direction()).to(unet.dtype)
    eps_cond = unet(x, t, encoder_hidden_states=steered).sample.float()
    loss = LOSS_WEIGHT * F.mse_loss(eps_cond, eps_star)
    return loss, eps_null, eps_cond.detach()


def trajectories(concept, rows, keep=()):
    """(prompt, seed, target, kind) per trajectory: rows[0], keep[0], rows[1], keep[1], ...

    A preservation anchor (ours, not the paper's) is an attribute with itself as the target: the
    steered anchor should predict what the frozen model predicts for it unsteered."""
    ordered = []
    for row, anchor in zip_longest(rows, keep):
        if row is not None:
            ordered.append((*row, concept.target, concept.kind))
        if anchor is not None:
            ordered.append((*anchor, anchor[0], "attribute"))
    return ordered


def train(pipe, direction, concept, rows, *, steps=50, resolution=512, guidance=7.5, lr=0.06,
          update_window=(10, 50), keep=(), target_guidance=None, cap=None, off_policy=False):
    """Learn `direction` for `concept` by self-discovery; yields each update's loss.

    rows: [(prompt, seed)], one on-policy trajectory each, batch size 1, one pass; keep: anchors
    [(prompt, seed)] interleaved with them (see `trajectories`). In each trajectory the current
    direction steers the conditional embedding inside the update window, and every step of that
    window makes one Adam update (updates_per_trajectory: 41 at 50 steps). Knobs (ours, off by default):
    target_guidance (the erase target's own w), cap (`trust_region` per update), off_policy (unsteered CFG).
    """
    unet, scheduler, device = denoiser(pipe, resolution, guidance), sampler(pipe, resolution), pipe.device
    for model in pipe.components.values():
        if isinstance(model, nn.Module):
            model.requires_grad_(False)  # no U-Net parameter gradient is ever allocated
    plan = trajectories(concept, rows, keep)
    texts = sorted({p for p, _, target, _ in plan} | {target for _, _, target, _ in plan})
    embeds = dict(zip(texts, embed(pipe, texts).split(1)))  # computed once, each (1, T, D)
    null = unconditional(pipe)
    optimizer = torch.optim.Adam(direction.parameters(), lr=lr)
    start, end = scale_window(update_window, steps)
    size = resolution // pipe.vae_scale_factor
    shape = (1, unet.config.in_channels, size, size)
    for prompt, seed, target, kind in plan:
        scheduler.set_timesteps(steps, device=device)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # fp32, as released
        latents = latents.to(device) * scheduler.init_noise_sigma
        for k, t in enumerate(scheduler.timesteps, start=1):
            x = scheduler.scale_model_input(latents, t).to(unet.dtype)
            if start <= k <= end:
                loss, eps_null, eps_cond = self_discovery_loss(
                    unet, x, t, direction, embeds[prompt], null=null, target=embeds[target], kind=kind,
                    guidance=guidance if target_guidance is None else target_guidance)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()  # eps_cond was computed before this update, as in the release
                if cap is not None:
                    trust_region(direction, embeds[prompt][0], cap)
                yield loss.item()
            if off_policy or not start <= k <= end:
                with torch.no_grad():  # before the window (or off-policy): the plain prompt
                    both = torch.cat([null, embeds[prompt]])
                    eps = unet(x.expand(2, -1, -1, -1), t, encoder_hidden_states=both).sample
                    eps_null, eps_cond = eps.float().chunk(2)
            eps = guided(pipe, eps_null, eps_cond, guidance)  # the trajectory follows ordinary CFG (FLUX: none)
            latents = scheduler.step(eps, t, latents).prev_sample


@torch.no_grad()
def trust_region(direction, embeds, cap):
    """Scale each token's row of d so that |d_t| <= cap |E(p)_t| (ours); embeds E(p), (T, D)."""
    scale = (cap * embeds.norm(dim=-1) / direction().norm(dim=-1).clamp(min=1e-12)).clamp(max=1)  # (T,)
    tokens = direction.offset if (free := hasattr(direction, "offset")) else direction.B  # row t of d: row t of these
    tokens.mul_(scale[:len(tokens), None].to(tokens))
    if direction.pooled:
        (direction.pooled_offset if free else direction.pooled_B).mul_(scale[-1].to(tokens))



# -----------------------------------------------------------------------------
# Steering at inference ("embedding projection"), through diffusers' own pipeline

class Steering:
    """A `callback_on_step_end` for the SD and SDXL pipelines that steers inside the steer window.

    At step k (1-indexed) the conditional embedding is E(p) + beta * d when start <= k <= end, else
    E(p); the unconditional one never changes, and no U-Net call is added. plain, offsets: (N, T, D),
    one offset per image (zeros for an unsteered image)."""

    def __init__(self, plain, offsets, *, beta, steer_window, steps):
        self.plain, self.steered = plain, steer(plain, offsets, beta)
        self.start, self.end = scale_window(steer_window, steps)

    def embeds(self, k):
        return self.steered if self.start <= k <= self.end else self.plain

    def __call__(self, pipe, i, t, tensors):
        cond = callback_tensors(pipe, self.embeds(i + 2))  # called at the end of step i + 1: for the next one
        if getattr(pipe, "do_classifier_free_guidance", False):  # [unconditional, conditional]: the first half stays
            cond = {name: torch.cat([tensors[name][:len(c)], c]) for name, c in cond.items()}
        return cond


def draw(prompt, seed, k):
    """Which of k directions an image gets: uniform, fixed by its prompt and seed (ours; the release
    draws unseeded). The prompt counts too: benchmarks give every prompt the same seeds."""
    return random.Random(f"direction {seed} {prompt}").randrange(k)  # a str seed hashes with SHA-512: stable


def steering_for(pipe, prompts, seeds, directions, *, beta, steer_window, steps):
    """The Steering of a batch, one of `directions` (each an offset (T, D) or a SafeRegion, whose offset
    is region(E(p)) - E(p)) drawn per image; returns it and the index of each image's direction (None
    when there are none)."""
    plain = embed(pipe, prompts)
    chosen = [draw(p, s, len(directions)) if directions else None for p, s in zip(prompts, seeds, strict=True)]
    offsets = torch.stack([torch.zeros_like(e) if c is None else directions[c](e[None])[0] - e
                           if isinstance(directions[c], SafeRegion) else directions[c] for e, c in zip(plain, chosen)])
    steering = Steering(plain, offsets.to(plain.device), beta=beta, steer_window=steer_window, steps=steps)
    return steering, chosen


def generate(pipe, prompts, seeds, directions=(), *, beta=1.0, steer_window=(15, 50), steps=50,
             guidance=7.5, resolution=512, output_type="pil", negative_prompt=""):
    """One image per (prompt, seed) through the stock pipeline; returns (images, direction indices).

    directions: (T, D) offsets or SafeRegions, one drawn per image (fairness); none gives plain SD. The
    unconditional branch is `unconditional`'s, never steered. Each initial latent comes from the
    image's own CPU generator, so an image does not depend on what else is in the batch."""
    steering, chosen = steering_for(pipe, prompts, seeds, directions, beta=beta, steer_window=steer_window,
                                    steps=steps)
    negative = unconditional(pipe, len(prompts), negative_prompt)
    images = pipe(**pipeline_inputs(pipe, steering.embeds(1), negative),
                  generator=[torch.Generator().manual_seed(s) for s in seeds],
                  num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
                  callback_on_step_end=steering,
                  callback_on_step_end_tensor_inputs=list(callback_tensors(pipe, negative)),
                  output_type=output_type).images
    return images, chosen


# -----------------------------------------------------------------------------
# Safe regions: constraining embeddings (ours, not the paper's)
# The paper's d moves every prompt alike; a safe region acts only on what e = E(p) (T, D) holds of the concept.
# The axis v (T, D): E(c) - E(""), or -d of a learned direction. Per token, u_t = v_t / |v_t|, c_t = <e_t - o_t, u_t>:
#   "half" (recommended)  e'_t = e_t - max(0, c_t) u_t   the nearest point of the safe half-space c_t <= 0
#   "project"             e'_t = e_t - c_t u_t            the nearest point of the hyperplane c_t = 0
#   "subtract"            e'   = e - s v                  Semantic Surgery's move, strength s
# optionally gated by g, presence <e - o, v> / <v, v> (sums over T, D: 0 for E(""), 1 for E(c)) or cosine
# cos(e, o + v) (Semantic Surgery's): e' <- e + sigmoid((g - tau) / T) (e' - e); o = E("") throughout.

class SafeRegion(nn.Module):
    """origin, axis (T, D) (SDXL's packed), mode, strength, gate (kind, tau, T) as above: region(e) is e', (N, T, D)."""
    MODES, GATES, SETTINGS = ("half", "project", "subtract"), ("presence", "cosine"), ("mode", "strength", "gate")

    def __init__(self, origin, axis, mode="half", strength=1.0, gate=None):
        super().__init__()
        self.origin, self.axis = nn.Parameter(origin, requires_grad=False), nn.Parameter(axis, requires_grad=False)
        self.mode, self.strength, self.gate = mode, strength, tuple(gate) if gate else None

    def score(self, embeds, kind):  # g(e) of each prompt, (N,)
        origin, axis = self.origin.to(embeds.dtype).flatten(), self.axis.to(embeds.dtype).flatten()
        if kind == "presence":
            return (embeds.flatten(1) - origin) @ axis / axis.dot(axis)
        return F.cosine_similarity(embeds.flatten(1), (origin + axis)[None], dim=-1)

    def forward(self, embeds):
        origin, axis = self.origin.to(embeds.dtype), self.axis.to(embeds.dtype)
        if self.mode == "subtract":
            moved = embeds - self.strength * axis
        else:
            u = F.normalize(axis, dim=-1)  # (T, D), a unit vector per token
            along = ((embeds - origin) * u).sum(-1, keepdim=True)  # c_t, (N, T, 1)
            moved = embeds - (along.clamp(min=0) if self.mode == "half" else along) * u
        if not self.gate:
            return moved
        kind, tau, temperature = self.gate
        return embeds + torch.sigmoid((self.score(embeds, kind) - tau) / temperature)[:, None, None] * (moved - embeds)

    @classmethod
    def of_text(cls, pipe, text, **constraint):
        """The region of a concept's text: origin E(""), axis E(text) - E("")."""
        origin, concept = embed(pipe, ["", text]).float()
        return cls(origin, concept - origin, **constraint)


def calibrate(region, kind, unsafe, safe):
    """The gate (kind, tau, T) from embeddings (N, T, D) of prompts with the concept and without it: tau
    halfway between the two sets' mean g, T an eighth of that gap (each mean decided to sigmoid(4) = 0.98)."""
    high, low = region.score(unsafe, kind).mean().item(), region.score(safe, kind).mean().item()
    if high <= low:
        raise UserError(f"the concept prompts' mean {kind} is not above the others' ({high:.3f} <= {low:.3f}): no gate")
    return kind, (high + low) / 2, (high - low) / 8


# -----------------------------------------------------------------------------
# The direction's file (the format itself is in directions.py)

def load_direction(path):
    """Load ours (.safetensors) or the authors' released .pth; returns (Direction, metadata dict), or
    (SafeRegion, metadata) where the file's metadata says it is a safe region.

    The authors' file is a state dict with a (1, r, D) and b (1, T, r); their direction is b @ a.
    It is read with weights_only=True: no code in it can run.
    """
    state, metadata = read_direction(path)
    try:
        if metadata.get("constraint") == "safe region":  # train.py --recipe ours
            return SafeRegion(state["origin"], state["axis"], *map(metadata.get, SafeRegion.SETTINGS)), metadata
        pooled = next((state[k].shape[1] for k in ("pooled_A", "pooled_offset") if k in state), 0)  # SDXL's
        if "offset" in state:  # the free-offset ablation
            direction = Direction(state["offset"].shape[1], state["offset"].shape[0], rank=0, pooled=pooled)
        else:
            direction = Direction(state["A"].shape[1], state["B"].shape[0], state["A"].shape[0], pooled=pooled)
        direction.load_state_dict(state)  # strict: names and shapes must match
    except Exception as e:
        raise not_a_direction(path, e) from None
    return direction.requires_grad_(False), metadata
