"""Sizes that cannot fit are refused before the model loads, in one line naming the limit and the
largest setting that fits; the memory estimate behind it is compared with peaks measured by torch's
CPU allocator profiling on tiny models of two U-Net shapes.

Measured / estimated is 0.89 to 1.02 on these cases (the VAE's decoding, the peak of sampling on the
tiny model, is the loosest; on a batch of 4 at 128 px, not a case here, it was 0.76)."""

import json
import math
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from torch.profiler import ProfilerActivity, profile

import limits
import saferegion as sr
import sample
import train
from conftest import ROOT
from inputs import UserError

LOW, HIGH = 0.7, 1.1  # measured peak / estimate, fixed before measuring the cases below


def measured_peak(job):
    """The peak growth of live bytes in torch's CPU allocator while job() runs, from the profiler's
    allocation and free events in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        job()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def sampling(pipe, resolution, batch):
    def job():
        latents, _ = sr.generate(pipe, ["a photo"] * batch, list(range(batch)), steps=1, resolution=resolution,
                                 output_type="latent")
        with torch.no_grad():
            pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
    return job


def training(pipe, resolution):
    def job():
        direction = sr.Direction(sr.text_shape(pipe)[1])
        for _ in sr.train(pipe, direction, sr.erase("nudity"), [("a photo", 0)], steps=1, resolution=resolution,
                          update_window=(1, 50)):
            pass
    return job


@pytest.fixture(scope="module")
def deep_pipe(pipe):
    """The tiny pipeline with a U-Net of another shape: three levels, attention on each, two layers per block."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=16,
                                down_block_types=("CrossAttnDownBlock2D",) * 3,
                                up_block_types=("CrossAttnUpBlock2D",) * 3,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32).requires_grad_(False)
    return StableDiffusionPipeline(**{**pipe.components, "unet": unet})


@pytest.mark.parametrize("case", ["sample 64 1", "sample 128 1", "sample 128 2", "train 64", "train 128",
                                  "deep sample 64 1", "deep train 64"])
def test_the_memory_estimate_is_close_to_the_peak_measured_on_tiny_models(case, pipe, deep_pipe):
    *deep, job, resolution, batch = case.split() + ([] if "sample" in case else ["1"])
    model = deep_pipe if deep else pipe
    resolution, batch = int(resolution), int(batch)
    warm = sampling(model, 16, 1) if job == "sample" else training(model, 16)
    warm()  # lazy first-call allocations are not the job's
    run = sampling(model, resolution, batch) if job == "sample" else training(model, resolution)
    peak = measured_peak(run)
    estimate = limits.needed(unet=dict(model.unet.config), vae=dict(model.vae.config), weights=None,
                             resolution=resolution, factor=model.vae_scale_factor, batch=batch, dtype=torch.float32,
                             training=job == "train")
    assert LOW <= peak / estimate <= HIGH, f"measured {peak / 2**20:.2f} MiB, estimated {estimate / 2**20:.2f} MiB"


def test_the_weights_are_counted_from_the_file_headers(tiny_model, pipe):
    tensors = [t for part in (pipe.unet, pipe.vae, pipe.text_encoder) for t in part.state_dict().values()]
    assert limits.weight_counts(tiny_model) == (sum(t.numel() for t in tensors), max(t.numel() for t in tensors))


def test_the_largest_setting_is_found_by_search_as_by_counting_up():
    def fits(value):
        return value**2 <= 5000

    assert limits.largest(fits, 8192, 8) == max(r for r in range(8, 8193, 8) if fits(r)) == 64
    assert limits.largest(fits, 40, 8) == 40 and limits.largest(lambda v: False, 64, 8) is None


def address_space(gib):
    """For a child process: at most `gib` GiB of address space (ulimit -v), so that allocating more fails."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (gib * 2**30, gib * 2**30))
    return limit


@pytest.mark.parametrize("script", ["sample.py", "train.py"])
def test_a_size_that_cannot_fit_stops_in_one_line_naming_the_limit_and_the_largest_that_fits(script, tiny_model,
                                                                                              tmp_path):
    args = ["--prompt", "a photo"] if script == "sample.py" else ["--erase", "nudity"]
    done = subprocess.run([sys.executable, str(ROOT / script), *args, "--model", tiny_model, "--resolution", "8192",
                           "--steps", "2", "--out", "out"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, preexec_fn=address_space(4))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
    batch = " with --batch-size 4" if script == "sample.py" else ""
    found = re.fullmatch(rf"error: --resolution 8192{batch} needs about ([\d.]+) GiB on cpu, and ([\d.]+) GiB is "
                         r"available \(this process's address-space limit, ulimit -v 4194304\); the largest that "
                         rf"fits: --resolution (\d+)(?: at --batch-size 4)?", lines[0])
    assert found, lines[0]
    need, free, largest = float(found[1]), float(found[2]), int(found[3])
    assert free < 4 < need
    config = {name: json.loads((Path(tiny_model) / name / "config.json").read_text()) for name in ("unet", "vae")}

    def estimate(resolution):
        return limits.needed(unet=config["unet"], vae=config["vae"], weights=limits.weight_counts(tiny_model),
                             resolution=resolution, factor=2, batch=4 if batch else 1, dtype=torch.float32,
                             training=script == "train.py") / 2**30

    assert largest % 8 == 0 and estimate(largest) <= free + 0.05 and estimate(largest + 8) > free - 0.05
    assert math.isclose(estimate(8192), need, abs_tol=0.05)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the folder


@pytest.mark.parametrize("script", [sample, train], ids=["sample.py", "train.py"])
def test_more_steps_than_the_scheduler_has_stop_in_one_line(script, tiny_model, tmp_path):
    args = ["--prompt", "a photo"] if script is sample else ["--erase", "nudity"]
    with pytest.raises(UserError) as error:
        script.main([*args, "--model", tiny_model, "--resolution", "32", "--steps", "1001",
                     "--out", str(tmp_path / "out")])
    assert str(error.value) == ("--steps 1001 is more than the model's scheduler has: at most 1000, its training "
                                "timesteps")
    assert list(tmp_path.iterdir()) == []
