"""SD 3.x and FLUX.1 (flow matching, velocity prediction) against loops written out by hand, on tiny
pipelines built in code and loaded back through from_pretrained."""

import math
from functools import partial

import pytest
import torch
from PIL import Image

import bench
import saferegion as sr
import sample
import tiny_flow
import train
from conftest import run_script
from models import default_resolution, family_defaults

W = 7.5
FAMILIES = ["sd3", "flux", "schnell"]  # schnell: FLUX.1 without the distilled guidance input


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    return tiny_flow.save_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    return tiny_flow.save_flux_pipeline(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_schnell(tmp_path_factory):
    return tiny_flow.save_flux_pipeline(tmp_path_factory.mktemp("tiny-schnell"), guidance=False)


@pytest.fixture(scope="module", params=FAMILIES)
def pipe64(request):
    return sr.load_pipeline(request.getfixturevalue(f"tiny_{request.param}"), dtype=torch.float64)


# -----------------------------------------------------------------------------
# The reference: each family's text inputs, sigmas and transformer call, written out from the pipelines' own code

def hand_embed(pipe, text):
    """What the pipeline feeds the transformer for `text`: tokens (1, T, D) and pooled (1, P)."""
    def ids(tokenizer, length):
        return tokenizer(text, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        if type(pipe).__name__ == "FluxPipeline":  # CLIP-L's pooled output; T5's 512 tokens
            tokens = pipe.text_encoder_2(ids(pipe.tokenizer_2, 512))[0]
            return tokens, pipe.text_encoder(ids(pipe.tokenizer, 77)).pooler_output
        # SD 3: each CLIP's last-but-one hidden states side by side, zero-padded to T5's width, then T5's 256 tokens;
        # the two CLIPs' projected pooled outputs side by side
        first = pipe.text_encoder(ids(pipe.tokenizer, 77), output_hidden_states=True)
        second = pipe.text_encoder_2(ids(pipe.tokenizer_2, 77), output_hidden_states=True)
        t5 = pipe.text_encoder_3(ids(pipe.tokenizer_3, 256))[0]
        clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        clip = torch.cat([clip, torch.zeros(1, 77, t5.shape[-1] - clip.shape[-1], dtype=clip.dtype)], dim=-1)
        return torch.cat([clip, t5], dim=1), torch.cat([first.text_embeds, second.text_embeds], dim=-1)


def hand_sigmas(pipe, steps, resolution):
    """sigma_1 .. sigma_steps and the final 0, as the pipelines set them, in float64.

    SD 3: t linear from 1 to the shifted training minimum, then shifted, sigma = s t / (1 + (s - 1) t), s = 3.
    FLUX: t linear from 1 to 1 / steps, then shifted by mu, linear in the image's patch count n:
    sigma = e^mu / (e^mu + 1 / t - 1), mu = 0.5 + (1.15 - 0.5) (n - 256) / (4096 - 256)."""
    size = resolution // pipe.vae_scale_factor
    if type(pipe).__name__ == "FluxPipeline":
        t = torch.linspace(1, 1 / steps, steps, dtype=torch.float64)
        mu = 0.5 + (1.15 - 0.5) * ((size // 2) ** 2 - 256) / (4096 - 256)
        sigmas = math.exp(mu) / (math.exp(mu) + 1 / t - 1)
    else:
        def shift(t):
            return 3 * t / (1 + 2 * t)
        sigmas = shift(torch.linspace(1, shift(torch.tensor(1 / 1000, dtype=torch.float64)).item(), steps,
                                      dtype=torch.float64))
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def hand_velocity(pipe, x, sigma, tokens, pooled, guidance):
    """v = eps - x0 predicted for the latent x (1, C, H, W) at noise level sigma (a float32 value, as the
    scheduler keeps it). SD 3: the MMDiT takes the latent and t = 1000 sigma. FLUX: the latent as 2 x 2
    patches, (1, HW / 4, 4C), each with its position (0, row, column), the text tokens at position 0,
    t = sigma, and for FLUX.1-dev the guidance scale; its output is unpatched the same way."""
    t = (sigma * 1000).reshape(1)  # float32, as the scheduler's timesteps
    if type(pipe).__name__ != "FluxPipeline":
        return pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=tokens,
                                pooled_projections=pooled).sample
    _, c, h, w = x.shape
    patches = x.reshape(1, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, h * w // 4, 4 * c)
    rows, columns = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).to(x.dtype)
    txt_ids = torch.zeros(tokens.shape[1], 3, dtype=x.dtype)
    g = torch.tensor([guidance], dtype=torch.float32) if pipe.transformer.config.guidance_embeds else None
    v = pipe.transformer(hidden_states=patches, timestep=t.to(x.dtype) / 1000, guidance=g, pooled_projections=pooled,
                         encoder_hidden_states=tokens, txt_ids=txt_ids, img_ids=img_ids).sample
    return v.reshape(1, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, c, h, w)


def hand_trained_direction(pipe, concept, rows, *, steps, window, lr, seed, resolution, guidance):
    """The training loop written out step by step, with separate transformer calls; [A, B] or, for SD 3,
    [A, B, pooled_A, pooled_B]. The erase target is the eps case's, v* = v_u + w (v_0 - v_u), on
    velocities (docs/families.md: exact, at each step, for any weights summing to 1). SD 3's trajectory
    follows CFG; FLUX's its one prediction, FLUX.1-dev's at the distilled guidance w, which also makes
    its v_0 and v_u. The pipeline is float64, the direction and the latent float32, as in saferegion."""
    flux = type(pipe).__name__ == "FluxPipeline"
    null, target = hand_embed(pipe, ""), hand_embed(pipe, concept.target)
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(1, null[0].shape[-1], generator=generator).requires_grad_()
    B = torch.zeros(null[0].shape[1], 1).requires_grad_()
    parameters = [A, B]
    if not flux:  # SD 3: the pooled offset too, initialised the same way; its A drawn after the tokens' A
        pooled_A = torch.randn(1, null[1].shape[-1], generator=generator).requires_grad_()
        pooled_B = torch.zeros(1, 1).requires_grad_()
        parameters += [pooled_A, pooled_B]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    sigmas = hand_sigmas(pipe, steps, resolution).float()  # the scheduler keeps them in float32
    size = resolution // pipe.vae_scale_factor
    for prompt, row_seed in rows:
        tokens, pooled = hand_embed(pipe, prompt)
        x = torch.randn(1, 16, size, size, generator=torch.Generator().manual_seed(row_seed))  # x_1 = eps
        for k in range(1, steps + 1):
            sigma, x_in = sigmas[k - 1], x.double()
            in_window = window[0] <= k <= window[1]
            cond = (tokens, pooled)
            if in_window:
                cond = ((tokens.float() + B @ A).double(),
                        pooled if flux else (pooled.float() + pooled_B @ pooled_A).double())
            with torch.no_grad():
                v_null = hand_velocity(pipe, x_in, sigma, *null, guidance).float()
            v_cond = hand_velocity(pipe, x_in, sigma, *cond, guidance).float()
            if in_window:
                with torch.no_grad():
                    v_target = hand_velocity(pipe, x_in, sigma, *target, guidance).float()
                wanted = v_target + guidance * (v_null - v_target) if concept.kind == "erase" else v_target
                loss = 10 * ((v_cond - wanted) ** 2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            v = v_cond.detach() if flux else v_null + guidance * (v_cond.detach() - v_null)
            x = x + (sigmas[k] - sigma) * v  # Euler from sigma_k to sigma_k+1 along the velocity
    return [p.detach() for p in parameters]


# -----------------------------------------------------------------------------

def test_the_scheduler_gives_the_sigmas_written_out(pipe64):
    sampler = sr.sampler(pipe64, 64)
    sampler.set_timesteps(10)
    torch.testing.assert_close(pipe64.scheduler.sigmas.double(), hand_sigmas(pipe64, 10, 64), rtol=0, atol=1e-6)
    torch.testing.assert_close(sampler.timesteps, pipe64.scheduler.sigmas[:-1] * 1000)


def test_training_gives_the_same_direction_as_the_loop_written_out(pipe64):
    pipe, (concept,) = pipe64, sr.builtin("nudity")
    rows = [(concept.prompt, 11), ("a blue circle", 12)]
    tokens, width, pooled = sr.text_shape(pipe)
    direction = sr.Direction(width, tokens, seed=5, pooled=pooled)
    guidance = 3.5 if sr.family(pipe) == "flux" else W
    losses = list(sr.train(pipe, direction, concept, rows, steps=6, resolution=32, lr=0.06, guidance=guidance,
                           update_window=(10, 50)))
    assert len(losses) == 2 * 5  # window 10-50 of 50 is steps 2-6 of 6
    expected = hand_trained_direction(pipe, concept, rows, steps=6, window=(2, 6), lr=0.06, seed=5, resolution=32,
                                      guidance=guidance)
    names = ["A", "B", "pooled_A", "pooled_B"][:len(expected)]
    assert len(dict(direction.named_parameters())) == len(names)
    for name, value in zip(names, expected):
        if name.endswith("B"):
            assert value.abs().max() > 1e-3  # it learned something, so the comparison means something
        torch.testing.assert_close(getattr(direction, name).detach(), value, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in pipe.transformer.parameters())


def random_direction(pipe, seed):
    """A direction away from zero, SD 3's pooled part included, so that steering changes something."""
    tokens, width, pooled = sr.text_shape(pipe)
    direction = sr.Direction(width, tokens, seed=seed, pooled=pooled)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        direction.B.copy_(torch.randn(tokens, 1, generator=generator))
        if pooled:
            direction.pooled_B.copy_(torch.randn(1, 1, generator=generator))
    return direction


def recorded_transformer_inputs(pipe):
    """A hook that keeps what the transformer is given at each call: (timestep, tokens, pooled)."""
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs["timestep"].clone(), kwargs["encoder_hidden_states"].clone(),
                     kwargs["pooled_projections"].clone()))
    return seen, pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("steps", [10, 4])
def test_the_steer_window_is_honoured_in_flow_matching_time(pipe64, steps):
    """Steps start..end of the scaled window, and only those, are given E(p) + beta d: at 10 steps the
    window 15-50 is steps 3-10, sigma <= sigma_3; at 4 steps it is steps 2-4. The unconditional input
    (SD 3's CFG) never changes, and FLUX's pooled embedding is never offset."""
    pipe, beta, resolution = pipe64, 0.7, 32
    flux = sr.family(pipe) == "flux"
    direction = random_direction(pipe, seed=2)
    seen, hook = recorded_transformer_inputs(pipe)
    try:
        sr.generate(pipe, ["a red circle"], [9], [direction().detach().double()], beta=beta, steer_window=(15, 50),
                    steps=steps, resolution=resolution, guidance=3.5 if flux else W, output_type="latent")
    finally:
        hook.remove()
    tokens, pooled = hand_embed(pipe, "a red circle")
    null = hand_embed(pipe, "")
    offset = (direction.B @ direction.A).detach().double()
    pooled_offset = 0 if flux else (direction.pooled_B @ direction.pooled_A).detach().double()
    start = math.ceil(15 * steps / 50)
    sigmas = hand_sigmas(pipe, steps, resolution)
    assert len(seen) == steps
    for k, (t, given, given_pooled) in enumerate(seen, start=1):
        steered = k >= start
        torch.testing.assert_close(t.double() / (1 if flux else 1000), sigmas[k - 1].expand(len(t)), rtol=0, atol=1e-6)
        if steered:
            assert sigmas[k - 1] <= sigmas[start - 1]  # the window is the low-noise end of the flow
        cond, cond_pooled = given[-1:], given_pooled[-1:]
        torch.testing.assert_close(cond, tokens + beta * offset if steered else tokens, rtol=0, atol=1e-6)
        torch.testing.assert_close(cond_pooled, pooled + beta * pooled_offset if steered else pooled, rtol=0, atol=1e-6)
        if not flux:  # [unconditional, conditional]
            torch.testing.assert_close(given[:1], null[0], rtol=0, atol=1e-6)
            torch.testing.assert_close(given_pooled[:1], null[1], rtol=0, atol=1e-6)
        else:
            assert len(given) == 1  # no second prediction: FLUX's guidance is distilled or absent


@pytest.mark.parametrize("family", FAMILIES)
def test_a_direction_at_zero_changes_nothing(family, request):
    pipe = sr.load_pipeline(request.getfixturevalue(f"tiny_{family}"))
    guidance = 3.5 if family != "sd3" else W
    settings = dict(steps=4, resolution=32, output_type="latent", guidance=guidance)
    prompts, seeds = ["a red square", "a blue circle"], [3, 4]
    tokens, width, pooled = sr.text_shape(pipe)
    plain, _ = sr.generate(pipe, prompts, seeds, **settings)
    zero, _ = sr.generate(pipe, prompts, seeds, [sr.Direction(width, tokens, pooled=pooled)()], **settings)
    stock = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=4,
                 guidance_scale=guidance, height=32, width=32, output_type="latent").images  # the pipeline without us
    assert torch.equal(plain, zero) and torch.equal(plain, stock)
    moved = random_direction(pipe, seed=0)()
    assert (sr.generate(pipe, prompts, seeds, [moved], **settings)[0] - plain).abs().max() > 1e-3


def test_each_flow_family_is_recognised_with_the_defaults_that_follow_from_it(tiny_sd3, tiny_flux, tiny_schnell):
    expected = {tiny_sd3: ("sd3", "333x96 + pooled 80", "shift 3,", (28, 7.0)),
                tiny_flux: ("flux", "512x48 (pooled 32 not offset)", "guidance distilled", (28, 3.5)),
                tiny_schnell: ("flux", "512x48 (pooled 32 not offset)", "no guidance", (4, 3.5))}
    for folder, (family, text, scheduler, defaults) in expected.items():
        pipe = sr.load_pipeline(folder)
        described = sr.describe(pipe)
        assert (described["family"], described["text"]) == (family, text)
        assert scheduler in described["scheduler"]
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        # what the stock pipeline draws: SD 3's transformer sample size, FLUX's fixed 128, times the VAE's factor 2
        assert described["resolution"] == (16 if family == "sd3" else 128) * 2 == default_resolution(folder)
        assert family_defaults(folder) == defaults and family_defaults(folder, 3, 1.5) == (3, 1.5)
        tokens, width, pooled = sr.text_shape(pipe)
        assert sr.embed(pipe, ["a photo"]).shape == (1, tokens + 1, width)  # the pooled embedding packed last


def test_bench_builds_the_published_architectures():
    """Parameter counts of the real models (SD 3 medium; FLUX.1-dev), counted on the meta device."""
    def counts(models):
        with torch.device("meta"):
            return {name: sum(p.numel() for p in m.parameters()) for name, m in models().items()}
    sd3, flux = counts(bench.sd3_models), counts(bench.flux_models)
    assert sd3 == {"transformer": 2_028_328_000, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840,
                   "text_encoder_3": 4_762_310_656, "vae": 83_819_683}
    assert flux == {"transformer": 11_901_408_320, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656,
                    "vae": 83_819_683}


def test_bench_refuses_an_architecture_that_does_not_fit_in_one_line(monkeypatch):
    monkeypatch.setattr(bench, "free_memory", lambda device: 20 * 2**30)
    with pytest.raises(sr.UserError) as refused:
        bench.check_memory("FLUX.1-dev", bench.flux_models, torch.device("cpu"), "bf16")
    count = 11_901_408_320 + 123_060_480 + 4_762_310_656 + 83_819_683
    assert str(refused.value) == (f"FLUX.1-dev's 16.9B parameters take {count * 2 / 2**30:.1f} GiB in bf16 and this "
                                  "cpu has 20.0 GiB free: run it where they fit")
    bench.check_memory("SD 3 medium", partial(bench.sd3_models, t5=False), torch.device("cpu"), "bf16")  # 5.5 GiB


def saved_direction(path, width, tokens, *, pooled=0, family):
    direction = sr.Direction(width, tokens, pooled=pooled)
    sr.save_direction(path, direction, {"family": family, "base_model": "somewhere", "steer_window": [15, 50]})
    return path


@pytest.mark.slow
def test_a_direction_is_refused_on_another_family_in_one_line(tiny_sd3, tiny_flux, tiny_model, tmp_path):
    saved_direction(tmp_path / "sd3.safetensors", 96, 333, pooled=80, family="sd3")
    saved_direction(tmp_path / "flux.safetensors", 48, 512, family="flux")
    saved_direction(tmp_path / "sd1.safetensors", 32, 77, family="sd1")
    cases = [(tiny_flux, "sd3.safetensors", "made for SD 3.x and this model is FLUX.1"),
             (tiny_sd3, "flux.safetensors", "made for FLUX.1 and this model is SD 3.x"),
             (tiny_model, "flux.safetensors", "made for FLUX.1 and this model is SD v1.x"),
             (tiny_flux, "sd1.safetensors", "made for SD v1.x and this model is FLUX.1")]
    for i, (model, direction, message) in enumerate(cases):
        argv = ["--model", model, "--prompt", "a photo", "--direction", direction, "--resolution", 32, "--steps", 2,
                "--out", f"run{i}"]
        if i == 0:  # as a user meets it: one line on stderr
            done = run_script("sample.py", *argv, cwd=tmp_path)
            lines = done.stderr.strip().splitlines()
            assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
            assert message in lines[0] and "does not move between model families" in lines[0]
        else:
            with pytest.raises(sr.UserError, match=message):
                sample.main([str(a) for a in argv[:5]] + [str(tmp_path / direction)] + [str(a) for a in argv[6:-1]]
                            + [str(tmp_path / f"run{i}")])
        assert not (tmp_path / f"run{i}").exists()


def test_what_the_flow_families_cannot_take_is_refused_before_loading(tiny_sd3, tiny_flux, tmp_path):
    base = ["--prompt", "a photo", "--resolution", "32", "--steps", "2", "--out", str(tmp_path / "run")]
    refusals = [(tiny_flux, ["--negative-prompt", "blurry"], "FLUX.1 makes no unconditional prediction"),
                (tiny_sd3, ["--sld", "medium"], "no SD 3.x pipeline"),
                (tiny_flux, ["--sld", "medium"], "no FLUX.1 pipeline"),
                (tiny_sd3, ["--unet", str(tmp_path)], "--unet swaps a U-Net")]
    for model, extra, message in refusals:
        with pytest.raises(sr.UserError, match=message):
            sample.main(["--model", model, *base, *extra])
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("family, subprocess", [("sd3", True), ("flux", False)])
def test_train_then_sample_as_a_user_runs_them(family, subprocess, request, tmp_path, monkeypatch, capsys):
    """SD 3.x's scripts in subprocesses, as a user starts them; FLUX.1's through their main(), in this
    process (the same code path; one start-up less)."""
    folder = request.getfixturevalue(f"tiny_{family}")
    small = ["--steps", 6, "--resolution", 32]

    def run(script, *args):
        if subprocess:
            done = run_script(script, *args, cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            return done.stdout
        monkeypatch.chdir(tmp_path)
        {"train.py": train, "sample.py": sample}[script].main([str(a) for a in args])
        return capsys.readouterr().out

    printed = run("train.py", "--concept", "nudity", "--model", folder, "--trajectories", 2, *small)
    assert f"{sr.FAMILIES[family]}, text" in printed and "flow-matching Euler" in printed
    direction, metadata = sr.load_direction(tmp_path / "directions" / "nudity.safetensors")
    assert metadata["family"] == family and metadata["training_args"]["guidance"] == (7.0 if family == "sd3" else 3.5)

    pipe = sr.load_pipeline(folder)  # the artifact is exactly what the same training gives in this process
    (concept,) = sr.builtin("nudity")
    tokens, width, pooled = sr.text_shape(pipe)
    guidance = 7.0 if family == "sd3" else 3.5  # the family's default
    expected = sr.Direction(width, tokens, seed=0, pooled=pooled)
    for _ in sr.train(pipe, expected, concept, [(concept.prompt, 0), (concept.prompt, 1)], steps=6, resolution=32,
                      guidance=guidance):
        pass
    torch.testing.assert_close(direction(), expected().detach(), rtol=1e-6, atol=1e-6)
    assert expected.B.abs().max() > 1e-3

    run("sample.py", "--model", folder, "--prompt", "a photo", "--direction",
        tmp_path / "directions" / "nudity.safetensors", "--compare", *small)
    samples = tmp_path / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [
        "a-photo_0.png", "a-photo_0_base.png", "compare.png", "manifest.jsonl", "run.json"]
    steered, _ = sr.generate(pipe, ["a photo"], [0], [direction()], steps=6, resolution=32, guidance=guidance)
    plain, _ = sr.generate(pipe, ["a photo"], [0], steps=6, resolution=32, guidance=guidance)
    assert Image.open(samples / "a-photo_0.png").tobytes() == steered[0].tobytes()
    assert Image.open(samples / "a-photo_0_base.png").tobytes() == plain[0].tobytes()
    assert steered[0].tobytes() != plain[0].tobytes()
