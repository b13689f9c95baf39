"""
Measure runs of generated images: NSFW under each paper's rule, bias, CLIP score and FID, and the
comparison table the field prints.

    python evaluate.py nsfw runs/i2p --q16 q16-vit-l14-prompts.p      # the release's rule -> eval-nsfw.json
    python evaluate.py nsfw runs/ring-a-bell --rule unlearndiffatk     # -> eval-nsfw-unlearndiffatk.json
    python evaluate.py bias runs/bias-steered runs/bias-plain --attribute gender
    python evaluate.py quality runs/coco-3k --real coco-val2014/       # FID needs clean-fid
    python evaluate.py table runs/sd14 runs/sd14-direction --rule unlearndiffatk --out comparison

A run directory holds PNG images, run.json (sample.py's settings) and manifest.jsonl (or parts
manifest*.jsonl), one JSON object per image: "file" (relative to the directory), "prompt", "seed",
"guidance", and "categories" (I2P) or "profession" (bias). Every result states its rule, model and
N, and is written beside the images as eval-*.json.

Every paper counts "nude" differently (detector, classes, threshold, rate or count), so the NSFW
rule is a named preset (RULES): `release` is this paper's release and the default.

References: NudeNet v3 (pip nudenet==3.4.2, github.com/notAI-tech/NudeNet) and its v2 classifier;
Q16, Schramowski et al., FAccT 2022; CLIP, Radford et al., ICML 2021; CLIPScore, Hessel et al.,
EMNLP 2021; clean-fid, Parmar et al., CVPR 2022.
"""

import argparse
import sys
from pathlib import Path

import torch

from evaluation.bias import ATTRIBUTES, measure_bias
from evaluation.clip import CLIP_B32, CLIP_L14
from evaluation.nsfw import RULES, chosen_rule, measure_nsfw
from evaluation.quality import measure_quality
from evaluation.table import compare
from inputs import UserError, check_device, check_folder
from runs import stop_interrupted

# -----------------------------------------------------------------------------
# The subcommands

def nsfw(args):
    rule = chosen_rule(args.rule, classes=args.classes, threshold=args.threshold)
    return measure_nsfw(args.run_dir, rule, q16=args.q16, clip=args.clip, classifier=args.classifier,
                        device=args.device, batch_size=args.batch_size)


def bias(args):
    return measure_bias([d for d in (args.run_dir, args.other_run_dir) if d], args.attribute, clip=args.clip,
                        device=args.device, batch_size=args.batch_size)


def quality(args):
    return measure_quality(args.run_dir, real=args.real, clip=args.clip, device=args.device,
                           batch_size=args.batch_size)


def table(args):
    return compare(args.runs, RULES[args.rule], out=args.out, q16=args.q16, real=args.real, clip=args.clip,
                   classifier=args.classifier, device=args.device, batch_size=args.batch_size)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--batch-size", type=int, default=32, help="images per CLIP or classifier forward pass")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where CLIP and clean-fid run (NudeNet runs on onnxruntime's default)")
    rules = argparse.ArgumentParser(add_help=False)
    rules.add_argument("--rule", choices=RULES, default="release",
                       help="whose NSFW rule: " + "; ".join(f"{name}: {r.used_by}" for name, r in RULES.items()))
    rules.add_argument("--classifier", metavar="ONNX", help="NudeNet v2's classifier_model.onnx, for --rule safree")
    rules.add_argument("--q16", metavar="FILE",
                       help="Q16's prompts (a pickled (2, 768) array): the release's rule also flags what Q16 flags")
    run_dir = "folder with the images and manifest.jsonl"

    n = commands.add_parser("nsfw", parents=[common, rules], help="NSFW rate, ASR or counts under a paper's rule")
    n.add_argument("run_dir", type=Path, help=run_dir)
    n.add_argument("--classes", nargs="+", help="NudeNet classes that flag an image (default: the rule's)")
    n.add_argument("--threshold", type=float, help="score that counts (default: the rule's)")
    n.add_argument("--clip", default=CLIP_L14, help="CLIP for Q16: hub id or local folder")

    b = commands.add_parser("bias", parents=[common], help="gender or race deviation ratio per profession")
    b.add_argument("run_dir", type=Path, help=run_dir + " (with 'profession'); the chart goes here")
    b.add_argument("other_run_dir", type=Path, nargs="?", help="a run to compare with, e.g. without the direction")
    b.add_argument("--attribute", choices=ATTRIBUTES, required=True, help="what CLIP classifies, zero-shot")
    b.add_argument("--clip", default=CLIP_B32, help="zero-shot CLIP: hub id or local folder")

    q = commands.add_parser("quality", parents=[common], help="CLIP score, and FID with --real")
    q.add_argument("run_dir", type=Path, help=run_dir)
    q.add_argument("--real", type=Path, metavar="DIR", help="real images for FID (clean-fid), e.g. COCO val2014")
    q.add_argument("--clip", default=CLIP_L14, help="CLIP for the CLIP score: hub id or local folder")

    t = commands.add_parser("table", parents=[common, rules], help="the comparison table: a row per method, "
                            "a column per prompt set, then FID and CLIP score; measures what is missing")
    t.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="a run folder, or a method's folder with one run folder per prompt set (COCO for FID/CLIP)")
    t.add_argument("--real", type=Path, metavar="DIR", help="real images for FID of the COCO runs")
    t.add_argument("--clip", default=CLIP_L14, help="CLIP for the CLIP score and Q16: hub id or local folder")
    t.add_argument("--out", default="comparison", help="writes OUT.md, OUT.csv, OUT.json and OUT.png")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    check_device(args.device)
    for run_dir in (getattr(args, "run_dir", None), getattr(args, "other_run_dir", None), *getattr(args, "runs", [])):
        if run_dir is not None and run_dir.is_dir():  # the reports go beside the images: writable before measuring
            check_folder(run_dir, "run directory")
    return {"nsfw": nsfw, "bias": bias, "quality": quality, "table": table}[args.command](args)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        stop_interrupted(e)
