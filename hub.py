"""
Directions on the Hugging Face hub: downloaded by repo id (user/repo or user/repo/file.safetensors),
and uploaded with a model card made from their metadata, as diffusers' training scripts make theirs.
"""

import re
import shutil
import tempfile
from pathlib import Path

from inputs import UserError, first_line

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(/[\w./-]+\.safetensors)?")  # user/repo or user/repo/path/file.safetensors


def direction_files(source):
    """[(name, local file)] for a --direction: a local file as it is, or a hub repo id, `user/repo`
    (every .safetensors direction in it, e.g. both of a fairness pair) or `user/repo/file.safetensors`,
    downloaded by huggingface_hub or found in its cache."""
    parts = source.split("/")
    local = Path(source).exists() or Path(source).suffix in (".safetensors", ".pth", ".pt") and len(parts) < 3
    if local or not HUB_ID.fullmatch(source):
        return [(source, source)]
    from huggingface_hub import hf_hub_download, snapshot_download
    repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        if file:
            return [(source, hf_hub_download(repo, file))]
        folder = Path(snapshot_download(repo, allow_patterns=["*.safetensors"]))
    except Exception:
        raise UserError(f"direction {source} is not a local file, and cannot be fetched from the Hugging Face hub "
                        "(offline, or no such repo or file?)") from None
    found = sorted(folder.rglob("*.safetensors"))
    if not found:
        raise UserError(f"the hub repo {repo} holds no .safetensors direction")
    return [(f"{repo}/{path.relative_to(folder).as_posix()}", str(path)) for path in found]


def create_hub_repo(repo):
    """Create the hub model repo if it does not exist yet; needs a token (huggingface-cli login); nothing
    without a repo."""
    if not repo:
        return
    from huggingface_hub import HfApi
    try:
        HfApi().create_repo(repo, exist_ok=True)
    except Exception as e:
        raise UserError(f"cannot create the Hugging Face hub repo {repo}: {first_line(e)}") from None


def push_to_hub(repo, files, card):
    """Upload `files` and the model card (README.md) to the hub repo in one commit."""
    from huggingface_hub import HfApi
    with tempfile.TemporaryDirectory() as folder:
        for path in files:
            shutil.copy(path, folder)
        (Path(folder) / "README.md").write_text(card, encoding="utf-8")
        try:
            HfApi().upload_folder(repo_id=repo, folder_path=folder, commit_message="Directions and their model card")
        except Exception as e:
            raise UserError(f"the directions are written, but the upload to {repo} failed: {first_line(e)}") from None


PAPER_CONCEPTS = {"unsafe", "gender-male", "gender-female", "race-white", "race-black", "race-asian"}
PAPER_SETTINGS = {"steps": 50, "guidance": 7.5, "lr": 0.06, "window": "10-50", "rank": 1, "dtype": "fp32"}
CARD = """---
base_model: {base_model}
tags:
- text-to-image
- {tag}
- safety
---

# {names}: directions in {family}'s text-embedding space

Learned by self-discovery as in "Responsible Diffusion Models via Constraining Text Embeddings within
Safe Regions" (Li et al., WWW 2025, [arXiv:2505.15427](https://arxiv.org/abs/2505.15427)). Added to every
prompt's text embedding ({text}) inside the steer window, a direction steers the model away from its
target (kind erase) or towards it (kind attribute).

| file | kind | target | final loss |
|---|---|---|---|
{rows}

Base model `{base_model}` ({family}); steer window {steer} and update window {update} (steps of 50),
beta {beta}; rank {rank}; {trajectories} trajectories of {steps} steps at {resolution} px.

## Use

    python sample.py --model {base_model} --prompt "a photo" --direction {repo} --compare

## How it was made

    {command}

## The paper's and ours

The method is the paper's: a rank-r, LoRA-initialised offset in the text-embedding space, learned from
the frozen model's own guidance along on-policy trajectories, and added inside the steer window.
Ours: {ours}.
"""


def publish(repo, paths, *, load):
    """--push-to-hub: the directions, their loss logs and a model card made from their metadata (load: a
    direction file's (direction, metadata)); nothing without a repo."""
    if not repo:
        return
    from families import FAMILIES
    cards = [load(path)[1] for path in paths.values()]
    files = [file for path in paths.values() for file in (path, path.with_suffix(".loss.csv"))]
    push_to_hub(repo, files, model_card(cards, repo=repo, family=FAMILIES[cards[0]["family"]]))
    print(f"pushed {len(files)} files and a model card to https://huggingface.co/{repo}")


TAGS = {"sdxl": "stable-diffusion-xl", "sd3": "stable-diffusion-3", "flux": "flux"}  # the hub's tags for the base


def model_card(cards, *, repo, family):
    """The hub repo's README.md, made from the directions' metadata (one dict each, as train.py stores
    it) the way diffusers' training scripts make theirs."""
    first, args = cards[0], cards[0]["training_args"]
    ours = [f"the concept {c['concept']}" for c in cards if c["concept"] not in PAPER_CONCEPTS]
    if first["family"] != "sd1":
        ours.append(f"running the method on {family}")
    if first["family"] in ("sdxl", "sd3"):
        ours.append("the offset on the pooled embedding")
    ours += [f"{key} {args[key]} (the paper's: {value})" for key, value in PAPER_SETTINGS.items()
             if args.get(key) != value]
    ours += [f"{len(first['keep'])} preservation anchors"] if first["keep"] else []
    ours += [f"stacked on the {what} {first[what]}" for what in ("unet", "lora") if first.get(what)]
    rows = [f"| {c['concept']}.safetensors | {c['kind']} | {c['target']} | {c['final_loss']:.6g} |" for c in cards]
    return CARD.format(
        base_model=first["base_model"], tag=TAGS.get(first["family"], "stable-diffusion"),
        names=", ".join(c["concept"] for c in cards), family=family, text=first["text"], rows="\n".join(rows),
        steer="{}-{}".format(*first["steer_window"]), update="{}-{}".format(*first["update_window"]),
        beta=first["beta"], rank=first["rank"], trajectories=first["trajectories"], steps=args["steps"],
        resolution=first["resolution"], repo=repo, command=first["command"],
        ours="; ".join(ours) or "nothing: this is the paper's setting")
