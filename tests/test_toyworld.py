"""The paper's three effects, measured in a toy world where concepts can be scored exactly.

Everything runs through train.py and sample.py as a user runs them. Bounds, fixed in advance:
suppression >= 0.5, drift <= 0.2, deviation ratio <= 0.25 with the directions and >= 0.5 without.
`python -m pytest tests/test_toyworld.py -s` prints one summary line.
"""

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import toyworld
from conftest import ROOT

STEPS = ["--steps", "20", "--resolution", str(toyworld.RESOLUTION)]
RED, BLUE = ["a red square", "a red circle"], ["a blue square", "a blue circle"]


def run(script, *args, cwd):
    done = subprocess.run([sys.executable, str(ROOT / script), *map(str, args), *STEPS], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def scores(run_dir):
    """Per prompt: colour and shape scores of the images without (base) and with the direction."""
    result = {}
    for line in (run_dir / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line)
        stem = run_dir / entry["file"][:-4]
        for kind, suffix in (("base", "_base"), ("steered", "")):
            latent = load_file(f"{stem}{suffix}.latents.safetensors")["latent"][None]
            result.setdefault((entry["prompt"], kind), []).append(
                (toyworld.colour_score(latent).item(), toyworld.shape_score(latent).item()))
    return {key: torch.tensor(values) for key, values in result.items()}  # (images, 2)


def deviation_ratio(colours):
    """max_k |n_k/N - 1/K| / (1 - 1/K) over K = 2 colours, each image classified by its sign."""
    red = (colours > 0).float().mean().item()
    return max(abs(red - 0.5), abs((1 - red) - 0.5)) / 0.5


def erase_figures(s):
    """Suppression of red on red prompts and drift of blue prompts, as fractions of the red-blue gap."""
    mean = {key: value.mean(0) for key, value in s.items()}  # (colour, shape)
    gap = (sum(mean[p, "base"][0] for p in RED) - sum(mean[p, "base"][0] for p in BLUE)) / 2
    suppression = sum(mean[p, "base"][0] - mean[p, "steered"][0] for p in RED) / 2 / gap
    drift = sum((mean[p, "steered"] - mean[p, "base"]).abs().sum() for p in BLUE) / 4 / gap
    return suppression.item(), drift.item()


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    began = time.time()
    work = tmp_path_factory.mktemp("toyworld")
    model, _ = toyworld.build(work / "model")
    (work / "keep.csv").write_text("prompt\n" + "\n".join(RED + BLUE) + "\n")
    found = {}
    for name, rank in (("rank1", 1), ("rank4", 4), ("free", 0)):
        run("train.py", "--erase", "red", "--model", model, "--trajectories", 10, "--rank", rank,
            "--out", f"directions/{name}", cwd=work)
        run("sample.py", "--prompts", "keep.csv", "--n", 16, "--model", model, "--direction",
            f"directions/{name}/red.safetensors", "--compare", "--save-latents", "--batch-size", 16,
            "--out", f"runs/{name}", cwd=work)
        found[name] = erase_figures(scores(work / "runs" / name))
    for colour in ("red", "blue"):
        run("train.py", "--attribute", f"a {colour} square", "--neutral", "a square", "--model", model,
            "--trajectories", 10, "--out", "directions/balance", cwd=work)
    run("sample.py", "--prompt", "a square", "--n", 50, "--model", model, "--direction",
        "directions/balance/a-red-square.safetensors", "directions/balance/a-blue-square.safetensors",
        "--compare", "--save-latents", "--batch-size", 25, "--out", "runs/balance", cwd=work)
    balance = scores(work / "runs" / "balance")
    figures = {
        "suppression": found["rank1"][0], "drift": found["rank1"][1],
        "deviation_base": deviation_ratio(balance["a square", "base"][:, 0]),
        "deviation_directions": deviation_ratio(balance["a square", "steered"][:, 0]),
        "rank1_drift": found["rank1"][1], "rank4_drift": found["rank4"][1], "free_drift": found["free"][1],
        "rank1_suppression": found["rank1"][0], "rank4_suppression": found["rank4"][0],
        "free_suppression": found["free"][0],
    }
    shown = ["suppression", "drift", "deviation_base", "deviation_directions", "rank1_drift", "rank4_drift",
             "free_drift"]
    print("\ntoy-world: " + " ".join(f"{k}={figures[k]:.2f}" for k in shown) + f" seconds={time.time() - began:.0f}")
    print("toy-world ablation: " + " ".join(f"{k}={figures[k]:.2f}" for k in
                                             ("rank1_suppression", "rank4_suppression", "free_suppression")))
    return figures


def test_erasing_red_removes_it_from_prompts_that_ask_for_it(figures):
    assert figures["suppression"] >= 0.5


@pytest.mark.xfail(strict=True, reason="measured: erasing red makes blue prompts bluer and blurs circles "
                   "(drift about 0.5); see the README's toy-world section")
def test_erasing_red_leaves_blue_prompts_alone(figures):
    assert figures["drift"] <= 0.2


def test_attribute_directions_balance_a_biased_prompt(figures):
    assert figures["deviation_base"] >= 0.5
    assert figures["deviation_directions"] <= 0.25
