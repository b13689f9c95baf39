"""Safe regions and the training knobs against computations written out by hand, on a tiny random SD."""

import math

import pytest
import torch
from diffusers import LMSDiscreteScheduler
from safetensors.torch import load_file

import saferegion as sr
import training
from conftest import recorded_unet_inputs, run_script
from test_method import W, hand_embed


def random_region(mode="half", gate=None, strength=1.0, seed=0, tokens=5, width=4):
    g = torch.Generator().manual_seed(seed)
    return sr.SafeRegion(torch.randn(tokens, width, generator=g, dtype=torch.float64),
                         torch.randn(tokens, width, generator=g, dtype=torch.float64), mode=mode, strength=strength,
                         gate=gate)


def hand_constrained(region, e):
    """The constraint written out per prompt and token."""
    out = e.clone()
    o, v = region.origin, region.axis
    for n in range(len(e)):
        if region.mode == "subtract":
            moved = e[n] - region.strength * v
        else:
            moved = e[n].clone()
            for t in range(len(v)):
                size = math.sqrt(sum(x * x for x in v[t].tolist()))
                if size == 0:  # the start token: the same for every prompt, so no axis there
                    continue
                u = v[t] / size
                c = sum(((e[n, t] - o[t]) * u).tolist())
                moved[t] = e[n, t] - (max(c, 0.0) if region.mode == "half" else c) * u
        weight = 1.0
        if region.gate:
            kind, tau, temperature = region.gate
            if kind == "presence":
                score = ((e[n] - o) * v).sum().item() / (v * v).sum().item()
            else:
                target = o + v
                score = (e[n] * target).sum().item() / (e[n].norm() * target.norm()).item()
            weight = 1 / (1 + math.exp(-(score - tau) / temperature))
        out[n] = e[n] + weight * (moved - e[n])
    return out


@pytest.mark.parametrize("mode", sr.SafeRegion.MODES)
@pytest.mark.parametrize("gate", [None, ("presence", 0.1, 0.3), ("cosine", 0.2, 0.05)], ids=["ungated", "presence",
                                                                                               "cosine"])
def test_each_constraint_is_the_formula_written_out(mode, gate):
    region = random_region(mode, gate, strength=1.5)
    e = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    e[0] = region.origin + 0.8 * region.axis  # a prompt that holds the concept
    torch.testing.assert_close(region(e), hand_constrained(region, e), rtol=0, atol=1e-12)


def test_the_half_space_projection_lands_in_the_safe_region_and_leaves_it_alone():
    region = random_region("half")
    e = torch.randn(4, 5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u = region.axis / region.axis.norm(dim=-1, keepdim=True)
    inside = region(e)
    assert (((inside - region.origin) * u).sum(-1) <= 1e-12).all()  # every token on the safe side
    torch.testing.assert_close(region(inside), inside, rtol=0, atol=1e-12)  # a projection: idempotent
    safe = ((e - region.origin) * u).sum(-1) <= 0
    assert safe.any() and (~safe).any()
    assert torch.equal(inside[safe], e[safe])  # tokens already safe do not move
    # the nearest point of the half-space: no other safe point on the segment to e is closer
    for n, t in zip(*torch.nonzero(~safe, as_tuple=True)):
        assert (inside[n, t] - e[n, t]).norm() <= ((e[n, t] - region.origin[t]) @ u[t]).abs() + 1e-12


def test_the_presence_of_the_concept_itself_is_one_and_of_the_origin_zero():
    region = random_region()
    both = torch.stack([region.origin, region.origin + region.axis])
    torch.testing.assert_close(region.score(both, "presence"), torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_calibration_puts_tau_halfway_between_the_means_and_refuses_prompts_that_do_not_separate():
    region = random_region()
    unsafe = torch.stack([region.origin + a * region.axis for a in (0.7, 0.9)])  # presence 0.7 and 0.9
    safe = torch.stack([region.origin + a * region.axis for a in (-0.1, 0.2)])
    kind, tau, temperature = sr.calibrate(region, "presence", unsafe, safe)
    assert (kind, tau, temperature) == ("presence", pytest.approx(0.425), pytest.approx(0.75 / 8))
    with pytest.raises(sr.UserError, match="no gate"):
        sr.calibrate(region, "presence", safe, unsafe)


def test_a_region_from_the_concepts_text_is_measured_from_the_empty_prompt(pipe64):
    region = sr.SafeRegion.of_text(pipe64, "nudity, nude")
    null, concept = hand_embed(pipe64, "")[0], hand_embed(pipe64, "nudity, nude")[0]
    torch.testing.assert_close(region.origin, null.float(), rtol=0, atol=1e-6)  # kept in float32, as files are
    torch.testing.assert_close(region.axis, (concept - null).float(), rtol=0, atol=1e-6)


def test_sampling_with_a_region_gives_the_unet_the_constrained_embedding_at_every_step(pipe64):
    region = sr.SafeRegion.of_text(pipe64, "a blue circle")
    prompts = ["a blue circle", "a red square"]
    with recorded_unet_inputs(pipe64.unet) as seen:
        sr.generate(pipe64, prompts, [3, 4], [region], steer_window=(1, 50), steps=4, resolution=32,
                    output_type="latent")
    plain, null = torch.cat([hand_embed(pipe64, p) for p in prompts]), hand_embed(pipe64, "")
    expected = hand_constrained(region, plain)
    assert len(seen) == 4 and (expected - plain).abs().max() > 1e-3
    for embeds in seen:
        torch.testing.assert_close(embeds[:2], null.expand(2, -1, -1), rtol=0, atol=1e-6)  # never touched
        torch.testing.assert_close(embeds[2:], expected, rtol=0, atol=1e-6)


def test_the_trust_region_caps_each_tokens_offset_relative_to_its_embedding():
    direction = sr.Direction(4, tokens=5, rank=2, seed=0)
    with torch.no_grad():
        direction.B.copy_(torch.randn(5, 2, generator=torch.Generator().manual_seed(3)))
    embeds = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    before = direction().detach().clone()
    sr.trust_region(direction, embeds, cap=0.3)
    for t in range(5):
        limit = 0.3 * embeds[t].norm()
        wanted = before[t] * min(1.0, (limit / before[t].norm()).item())
        torch.testing.assert_close(direction()[t], wanted, rtol=1e-6, atol=1e-7)
    assert (before.norm(dim=-1) > 0.3 * embeds.norm(dim=-1)).any()  # some token was capped


def test_relative_size_is_the_mean_over_tokens_of_the_norm_ratio():
    offset, embeds = torch.ones(3, 2), torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]])
    ratios = [math.sqrt(2) / 5, math.sqrt(2), math.sqrt(2)]
    assert training.relative_size(offset, embeds) == pytest.approx(sum(ratios) / 3)


def hand_trained_with_knobs(pipe, concept, rows, *, steps, window, lr, seed, target_guidance, cap, off_policy):
    """test_method's training loop written out again, with the knobs: the erase target's own guidance,
    a per-token cap after every Adam step, and trajectories that follow the unsteered prompt."""
    A = torch.randn(1, 32, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    B = torch.zeros(77, 1).requires_grad_()
    optimizer = torch.optim.Adam([A, B], lr=lr)
    scheduler = LMSDiscreteScheduler.from_config(pipe.scheduler.config)
    null, target = hand_embed(pipe, ""), hand_embed(pipe, concept.target)
    for prompt, row_seed in rows:
        plain = hand_embed(pipe, prompt)
        scheduler.set_timesteps(steps)
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(row_seed)).double()
        latents = latents * scheduler.init_noise_sigma
        for k, t in enumerate(scheduler.timesteps, start=1):
            x = scheduler.scale_model_input(latents, t)
            in_window = window[0] <= k <= window[1]
            with torch.no_grad():
                eps_null = pipe.unet(x, t, encoder_hidden_states=null).sample
                eps_plain = pipe.unet(x, t, encoder_hidden_states=plain).sample
            eps_cond = pipe.unet(x, t, encoder_hidden_states=(plain.float() + B @ A).double()).sample
            if in_window:
                with torch.no_grad():
                    eps_target = pipe.unet(x, t, encoder_hidden_states=target).sample
                wanted = eps_target + target_guidance * (eps_null - eps_target)
                loss = 10 * ((eps_cond - wanted) ** 2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for i in range(77):
                        size, limit = (B[i] @ A).norm(), cap * plain[0, i].norm()
                        if size > limit:
                            B[i] *= (limit / size).float()
            followed = eps_plain if off_policy or not in_window else eps_cond.detach()
            latents = scheduler.step(eps_null + W * (followed - eps_null), t, latents).prev_sample
    return A.detach(), B.detach()


def test_the_training_knobs_give_the_direction_of_the_loop_written_out(pipe64):
    concept = sr.builtin("nudity")[0]
    rows = [(concept.prompt, 11), ("a blue circle", 12)]
    direction = sr.Direction(32, seed=5)
    for _ in sr.train(pipe64, direction, concept, rows, steps=10, resolution=32, lr=0.06, target_guidance=2.0,
                      cap=0.05, off_policy=True):
        pass
    A, B = hand_trained_with_knobs(pipe64, concept, rows, steps=10, window=(2, 10), lr=0.06, seed=5,
                                   target_guidance=2.0, cap=0.05, off_policy=True)
    last = hand_embed(pipe64, rows[-1][0])[0].float()
    ratio = (B @ A).norm(dim=-1) / last.norm(dim=-1)
    assert B.abs().max() > 1e-3 and ratio.max() == pytest.approx(0.05, rel=1e-4)  # learned, and the cap binds
    torch.testing.assert_close(direction.A.detach(), A, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(direction.B.detach(), B, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # starts the scripts
def test_train_recipe_ours_writes_a_region_that_sample_applies_as_its_file_says(tiny_model, tmp_path, pipe):
    done = run_script("train.py", "--erase", "a blue circle", "--recipe", "ours", "--gate", "presence",
                      "--concept-prompt", "a blue circle, a blue circle", "--keep", "a red square", "--model",
                      tiny_model, "--out", "d", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    region, metadata = sr.load_direction(tmp_path / "d" / "a-blue-circle.safetensors")
    assert isinstance(region, sr.SafeRegion) and metadata["constraint"] == "safe region"
    assert metadata["mode"] == "half" and metadata["steer_window"] == [1, 50]
    assert metadata["calibration"] == {"holding": ["a blue circle, a blue circle"], "without": ["a red square"]}
    expected = sr.SafeRegion.of_text(pipe, "a blue circle")
    torch.testing.assert_close(region.axis, expected.axis)
    kind, tau, temperature = sr.calibrate(expected, "presence", sr.embed(pipe, ["a blue circle, a blue circle"]),
                                          sr.embed(pipe, ["a red square"]))
    assert region.gate == pytest.approx((kind, tau, temperature))
    done = run_script("sample.py", "--prompt", "a blue circle", "--direction", "d/a-blue-circle.safetensors",
                      "--model", tiny_model, "--steps", 4, "--resolution", 32, "--save-latents", "--out", "s",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    latent = load_file(next((tmp_path / "s").glob("*.latents.safetensors")))["latent"]
    wanted, _ = sr.generate(pipe, ["a blue circle"], [0], [region], steer_window=(1, 50), steps=4, resolution=32,
                            output_type="latent")
    torch.testing.assert_close(latent, wanted[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # starts the scripts
@pytest.mark.parametrize("args, message", [
    (["--erase", "x", "--gate", "presence"], "--gate goes with --recipe ours"),
    (["--erase", "x", "--recipe", "ours", "--cap", 0.3], "--cap trains"),
    (["--erase", "x", "--recipe", "ours", "--gate", "presence"], "--gate needs prompts"),
    (["--attribute", "a", "--neutral", "b", "--recipe", "ours"], "--recipe ours erases"),
])
def test_recipe_options_that_do_not_go_together_are_one_error_line(tiny_model, tmp_path, args, message):
    done = run_script("train.py", *args, "--model", tiny_model, "--out", "d", cwd=tmp_path)
    assert done.returncode != 0 and done.stderr.strip().startswith("error:") and message in done.stderr
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


@pytest.mark.slow  # starts the scripts
def test_training_logs_the_offsets_size_per_trajectory_and_warns_past_one(tiny_model, tmp_path, pipe):
    done = run_script("train.py", "--erase", "a blue circle", "--lr", 1, "--trajectories", 2, "--steps", 10,
                      "--resolution", 32, "--model", tiny_model, "--out", "d", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    direction, metadata = sr.load_direction(tmp_path / "d" / "a-blue-circle.safetensors")
    sizes = metadata["offset_size"]
    assert len(sizes) == 2
    plain = hand_embed(pipe, "an image of a blue circle")[0]
    by_hand = sum((direction()[t].norm() / plain[t].norm()).item() for t in range(77)) / 77
    assert sizes[-1] == pytest.approx(by_hand, rel=1e-5)
    assert max(sizes) > 1 and "warning: after trajectory" in done.stdout + done.stderr
