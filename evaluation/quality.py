"""Quality: CLIP score against each image's prompt and FID against real images, as the release has them.

CLIP score: 100 * cos(image, prompt) with CLIP ViT-L/14, clamped at 0 per image as torchmetrics'
CLIPScore does (Hessel et al., EMNLP 2021). FID: clean-fid's clean mode on Inception-v3 (Parmar et
al., CVPR 2022), over exactly the images the manifest lists.
"""

import os
import tempfile
from pathlib import Path

import torch

from evaluation.clip import CLIP_L14, embed_images, embed_texts, load_clip
from evaluation.reports import package_version, write_report
from inputs import UserError
from runs import RunFolder

IMAGE_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # what clean-fid reads


def clean_fid():
    try:
        from cleanfid import fid
    except ImportError:
        raise UserError("FID needs clean-fid: pip install clean-fid (it pulls torchvision: install the "
                        "torch wheel for your CUDA first)") from None
    return fid


def measure_quality(run_dir, *, real=None, clip=CLIP_L14, device="cpu", batch_size=32):
    """The run's CLIP score, and its FID against the images in `real` when given."""
    if real is not None:
        fid = clean_fid()
        real_images = [p for p in Path(real).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        if not real_images:
            raise UserError(f"no real images in {real}")
    records = RunFolder(run_dir).records()
    paths = [Path(run_dir) / r["file"] for r in records]
    model, processor = load_clip(clip, device)
    cos = (embed_images(model, processor, paths, batch_size)
           * embed_texts(model, processor, [r["prompt"] for r in records], batch_size)).sum(-1)  # (N,)
    scores = (100 * cos).clamp(min=0)  # as torchmetrics' CLIPScore: a negative cosine counts as 0
    report = {
        "metric": "quality", "run_dir": str(run_dir), "n": len(records),
        "clip_score": {"model": clip, "scale": "100*cos(image, prompt), clamped at 0 per image",
                       "mean": scores.mean().item()},
        "fid": None, "images": [{"file": r["file"], "clip_score": s} for r, s in zip(records, scores.tolist())],
    }
    print(f"\nCLIP score of {run_dir}: {scores.mean():.2f} ({clip}, 100*cos(image, prompt) "
          f"clamped at 0, N = {len(records)})")
    if real is not None:
        with tempfile.TemporaryDirectory() as only:  # exactly the manifest's images: no charts, no leftovers
            for i, path in enumerate(paths):
                os.symlink(path.resolve(), Path(only) / f"{i:06d}{path.suffix}")
            value = float(fid.compute_fid(only, str(real), mode="clean", device=torch.device(device),
                                          batch_size=batch_size))
        library = f"clean-fid {package_version('clean-fid')}, clean mode, Inception-v3"
        report["fid"] = {"value": value, "real_dir": str(real), "n": len(paths), "n_real": len(real_images),
                         "library": library}
        print(f"FID against {real}: {value:.2f} ({library}, N = {len(paths)} generated, {len(real_images)} real)")
    write_report(Path(run_dir) / "eval-quality.json", report)
    return report
