"""CLIP, as the measures use it: a model from the hub or a folder, batched normalised embeddings.

Q16 and the CLIP score compare images with ViT-L/14, the bias measure classifies them zero-shot
with ViT-B/32 (Radford et al., ICML 2021).
"""

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluation.reports import open_image
from inputs import UserError

CLIP_L14, CLIP_B32 = "openai/clip-vit-large-patch14", "openai/clip-vit-base-patch32"


def load_clip(name, device):
    """CLIPModel and CLIPProcessor from a hub id or a local folder."""
    import transformers
    from transformers import CLIPModel, CLIPProcessor
    transformers.utils.logging.set_verbosity_error()  # e.g. its notice about a missing torchvision
    transformers.utils.logging.disable_progress_bar()
    if not Path(name).is_dir() and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise UserError(f"CLIP folder {name} does not exist")
    try:
        model, processor = CLIPModel.from_pretrained(name), CLIPProcessor.from_pretrained(name)
    except Exception as e:
        reason = ((str(e).strip().splitlines() or [type(e).__name__])[0] if Path(name).is_dir() else
                  "not a local folder, and not found on the Hugging Face hub or in its cache (offline?)")
        raise UserError(f"cannot load CLIP {name!r}: {reason}") from None
    return model.eval().requires_grad_(False).to(device), processor


def projected(output):
    """get_*_features gives a tensor in transformers 4, an output with the projection in pooler_output in 5."""
    return output if torch.is_tensor(output) else output.pooler_output


@torch.no_grad()
def embed_images(model, processor, paths, batch_size):
    """CLIP image embeddings, normalised, (N, E) on the CPU."""
    out = []
    for i in tqdm(range(0, len(paths), batch_size), desc=f"CLIP, {len(paths)} images", unit="batch"):
        pixels = processor(images=[open_image(p) for p in paths[i:i + batch_size]], return_tensors="pt")
        out.append(projected(model.get_image_features(pixel_values=pixels["pixel_values"].to(model.device))))
    return F.normalize(torch.cat(out).float().cpu(), dim=-1)


@torch.no_grad()
def embed_texts(model, processor, texts, batch_size):
    """CLIP text embeddings, normalised, (N, E); a text longer than CLIP's 77 tokens is cut."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = processor(text=texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True)
        out.append(projected(model.get_text_features(**{k: v.to(model.device) for k, v in tokens.items()})))
    return F.normalize(torch.cat(out).float().cpu(), dim=-1)
