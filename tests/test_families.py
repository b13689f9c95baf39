"""SD 2.x (v-prediction) and SDXL (two text encoders and a pooled embedding) against loops written
out by hand, on tiny pipelines built in code and loaded back through from_pretrained."""

import shlex
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import LMSDiscreteScheduler
from PIL import Image

import bench
import saferegion as sr
import sample
import tiny
import train
from conftest import run_script
from hub import direction_files

pytestmark = pytest.mark.slow  # builds, trains and samples each model family

W = 7.5
FAMILIES = ["sd2", "sdxl"]


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    """A tiny SD 2.x pipeline folder: 1024-wide text encoder, v-prediction."""
    return tiny.save_sd2_pipeline(tmp_path_factory.mktemp("tiny-sd2"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL pipeline folder: two 32-wide text encoders (64 per token), pooled embedding 32."""
    return tiny.save_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module", params=FAMILIES)
def pipe64(request):
    """Each tiny family in float64, so that comparisons with hand-written loops can be tight."""
    return sr.load_pipeline(request.getfixturevalue(f"tiny_{request.param}"), dtype=torch.float64)


# -----------------------------------------------------------------------------
# The reference: each family's text inputs and U-Net call, written out from the pipelines' own code

def hand_embed(pipe, text):
    """What the pipeline feeds the U-Net for `text`: (tokens (1, 77, D), pooled (1, P) or None)."""
    def ids(tokenizer):
        return tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        if not hasattr(pipe, "text_encoder_2"):  # SD 2.x as SD v1.x: the last hidden state
            return pipe.text_encoder(ids(pipe.tokenizer)).last_hidden_state, None
        first = pipe.text_encoder(ids(pipe.tokenizer), output_hidden_states=True)
        second = pipe.text_encoder_2(ids(pipe.tokenizer_2), output_hidden_states=True)
        # SDXL: both encoders' last-but-one hidden states side by side, and the second's projected pooled output
        return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


def hand_null(pipe):
    """The unconditional input: E("") for SD 2.x, zeros for SDXL (its force_zeros_for_empty_prompt)."""
    tokens, pooled = hand_embed(pipe, "")
    return (tokens, None) if pooled is None else (torch.zeros_like(tokens), torch.zeros_like(pooled))


def hand_unet(pipe, x, t, tokens, pooled, resolution):
    """One U-Net call; for SDXL with added_cond_kwargs spelled out: the pooled embedding, and the time
    ids (original height and width, crop top and left, target height and width)."""
    if pooled is None:
        return pipe.unet(x, t, encoder_hidden_states=tokens).sample
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=x.dtype)
    return pipe.unet(x, t, encoder_hidden_states=tokens,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def random_direction(pipe, seed):
    """A direction away from zero, pooled part included, so that steering changes something."""
    tokens, pooled = hand_embed(pipe, "")
    direction = sr.Direction(tokens.shape[-1], seed=seed, pooled=0 if pooled is None else pooled.shape[-1])
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        direction.B.copy_(torch.randn(77, 1, generator=generator))
        if pooled is not None:
            direction.pooled_B.copy_(torch.randn(1, 1, generator=generator))
    return direction


def hand_offsets(direction):
    """The direction's two offsets by hand: B @ A (77, D) and, for SDXL, pooled_B @ pooled_A (1, P)."""
    pooled = direction.pooled_B @ direction.pooled_A if hasattr(direction, "pooled_A") else None
    return direction.B @ direction.A, pooled


def hand_trained_direction(pipe, concept, rows, *, steps, window, lr, seed, resolution):
    """The training loop written out step by step, with separate U-Net calls; [A, B] or, for SDXL,
    [A, B, pooled_A, pooled_B]. For v-prediction "eps" is the model's v: the target is the same
    linear combination of its outputs. The pipeline is float64, the direction float32, as in saferegion."""
    null = hand_null(pipe)
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(1, null[0].shape[-1], generator=generator).requires_grad_()
    B = torch.zeros(77, 1).requires_grad_()
    parameters = [A, B]
    if null[1] is not None:  # SDXL: the pooled offset, initialised the same way; its A drawn after the tokens' A
        pooled_A = torch.randn(1, null[1].shape[-1], generator=generator).requires_grad_()
        pooled_B = torch.zeros(1, 1).requires_grad_()
        parameters += [pooled_A, pooled_B]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    scheduler = LMSDiscreteScheduler.from_config(pipe.scheduler.config)
    target = hand_embed(pipe, concept.target)
    size = resolution // pipe.vae_scale_factor
    for prompt, row_seed in rows:
        tokens, pooled = hand_embed(pipe, prompt)
        scheduler.set_timesteps(steps)
        latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(row_seed))
        latents = latents.double() * scheduler.init_noise_sigma
        for k, t in enumerate(scheduler.timesteps, start=1):
            x = scheduler.scale_model_input(latents, t)
            in_window = window[0] <= k <= window[1]
            with torch.no_grad():
                eps_null = hand_unet(pipe, x, t, *null, resolution)
            cond = (tokens, pooled)
            if in_window:
                cond = ((tokens.float() + B @ A).double(),
                        None if pooled is None else (pooled.float() + pooled_B @ pooled_A).double())
            eps_cond = hand_unet(pipe, x, t, *cond, resolution)
            if in_window:
                with torch.no_grad():
                    eps_target = hand_unet(pipe, x, t, *target, resolution)
                wanted = eps_target + W * (eps_null - eps_target) if concept.kind == "erase" else eps_target
                loss = 10 * ((eps_cond - wanted) ** 2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            eps = eps_null + W * (eps_cond.detach() - eps_null)
            latents = scheduler.step(eps, t, latents).prev_sample
    return [p.detach() for p in parameters]


# -----------------------------------------------------------------------------

def test_each_family_is_recognised_with_the_defaults_that_follow_from_it(tiny_model, tiny_sd2, tiny_sdxl):
    expected = {tiny_model: ("sd1", "77x32", "epsilon"), tiny_sd2: ("sd2", "77x1024", "v_prediction"),
                tiny_sdxl: ("sdxl", "77x64 + pooled 32", "epsilon")}
    for folder, (family, text, prediction) in expected.items():
        pipe = sr.load_pipeline(folder)
        described = sr.describe(pipe)
        assert (described["family"], described["text"]) == (family, text)
        # the paper's LMS for every family, with the model's own prediction type (SD 2.1's v)
        assert type(pipe.scheduler) is LMSDiscreteScheduler and pipe.scheduler.config.prediction_type == prediction
        assert prediction in described["scheduler"]
        assert described["resolution"] == 16 * 2  # what the stock pipeline draws: U-Net sample size x VAE factor


def test_training_gives_the_same_direction_as_the_loop_written_out(pipe64):
    pipe, (concept,) = pipe64, sr.builtin("nudity")
    rows = [(concept.prompt, 11), ("a blue circle", 12)]
    tokens, width, pooled = sr.text_shape(pipe)
    direction = sr.Direction(width, seed=5, pooled=pooled)
    losses = list(sr.train(pipe, direction, concept, rows, steps=10, resolution=32, lr=0.06, update_window=(10, 50)))
    assert len(losses) == 2 * 9  # window 10-50 of 50 is steps 2-10 of 10
    expected = hand_trained_direction(pipe, concept, rows, steps=10, window=(2, 10), lr=0.06, seed=5, resolution=32)
    names = ["A", "B", "pooled_A", "pooled_B"][:len(expected)]
    assert len(dict(direction.named_parameters())) == len(names)
    for name, value in zip(names, expected):
        if name.endswith("B"):
            assert value.abs().max() > 1e-3  # it learned something, so the comparison means something
        torch.testing.assert_close(getattr(direction, name).detach(), value, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_sampling_through_the_stock_pipeline_equals_a_hand_written_cfg_loop(pipe64):
    pipe = pipe64
    direction = random_direction(pipe, seed=2)
    beta, steps, resolution = 0.7, 10, 32
    seen = []  # what the U-Net is given at each step: token embeddings and, for SDXL, pooled embeddings

    def record(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        seen.append((kwargs["encoder_hidden_states"].clone(), added.get("text_embeds")))

    hook = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        latents, _ = sr.generate(pipe, ["a red circle"], [9], [direction().detach().double()], beta=beta,
                                 steer_window=(15, 50), steps=steps, resolution=resolution, output_type="latent")
    finally:
        hook.remove()

    plain, null = hand_embed(pipe, "a red circle"), hand_null(pipe)
    offsets = [None if o is None else o.detach().double() for o in hand_offsets(direction)]
    steered = tuple(None if e is None else e + beta * o for e, o in zip(plain, offsets))
    start = 3  # 15 of 50 is 3 of 10
    assert len(seen) == steps
    for k, inputs in enumerate(seen, start=1):
        expected = steered if k >= start else plain
        for given, uncond, cond in zip(inputs, null, expected):
            if cond is None:
                assert given is None
                continue
            torch.testing.assert_close(given[:1], uncond, rtol=0, atol=1e-6)  # unconditional: never changed
            torch.testing.assert_close(given[1:], cond, rtol=0, atol=1e-6)

    scheduler = LMSDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    size = resolution // pipe.vae_scale_factor
    x = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x = x * scheduler.init_noise_sigma
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps, start=1):
            x_in = scheduler.scale_model_input(x, t)
            eps_null = hand_unet(pipe, x_in, t, *null, resolution)
            eps_cond = hand_unet(pipe, x_in, t, *(steered if k >= start else plain), resolution)
            x = scheduler.step(eps_null + W * (eps_cond - eps_null), t, x).prev_sample
    torch.testing.assert_close(latents, x, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_direction_at_zero_changes_nothing(family, request):
    pipe = sr.load_pipeline(request.getfixturevalue(f"tiny_{family}"))
    settings = dict(steps=4, resolution=32, output_type="latent")
    prompts, seeds = ["a red square"] * 2, [3, 4]
    _, width, pooled = sr.text_shape(pipe)
    plain, _ = sr.generate(pipe, prompts, seeds, **settings)
    zero, _ = sr.generate(pipe, prompts, seeds, [sr.Direction(width, pooled=pooled)()], **settings)
    assert torch.equal(plain, zero)
    stock = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=4,
                 guidance_scale=W, height=32, width=32, output_type="latent").images  # the pipeline without us
    torch.testing.assert_close(plain, stock, rtol=1e-6, atol=1e-6)
    moved = random_direction(pipe, seed=0)()
    assert (sr.generate(pipe, prompts, seeds, [moved], **settings)[0] - plain).abs().max() > 1e-3


def test_the_pooled_offset_alone_reaches_sdxls_unet(tiny_sdxl):
    pipe = sr.load_pipeline(tiny_sdxl)
    direction = random_direction(pipe, seed=0)
    with torch.no_grad():
        direction.B.zero_()  # the token offset is zero: only the pooled one is left
    settings = dict(steps=4, resolution=32, output_type="latent", steer_window=(1, 50))
    plain, _ = sr.generate(pipe, ["a red square"], [3], **settings)
    steered, _ = sr.generate(pipe, ["a red square"], [3], [direction()], **settings)
    assert (steered - plain).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_train_then_sample_as_a_user_runs_them(family, request, tmp_path):
    folder = request.getfixturevalue(f"tiny_{family}")
    small = ["--steps", 10, "--resolution", 64]
    done = run_script("train.py", "--concept", "nudity", "--model", folder, "--trajectories", 2, *small, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{sr.FAMILIES[family]}, text" in done.stdout  # the family and its defaults, printed
    path = tmp_path / "directions" / "nudity.safetensors"
    direction, metadata = sr.load_direction(path)
    assert metadata["family"] == family and metadata["base_model"] == folder and metadata["resolution"] == 64

    pipe = sr.load_pipeline(folder)  # the artifact is exactly what the same training gives in this process
    (concept,) = sr.builtin("nudity")
    _, width, pooled = sr.text_shape(pipe)
    expected = sr.Direction(width, seed=0, pooled=pooled)
    for _ in sr.train(pipe, expected, concept, [(concept.prompt, 0), (concept.prompt, 1)], steps=10, resolution=64):
        pass
    torch.testing.assert_close(direction(), expected().detach(), rtol=1e-6, atol=1e-6)
    assert expected.B.abs().max() > 1e-3

    done = run_script("sample.py", "--model", folder, "--prompt", "a photo", "--direction", path, "--compare", *small,
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    samples = tmp_path / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [
        "a-photo_0.png", "a-photo_0_base.png", "compare.png", "manifest.jsonl", "run.json"]
    steered, _ = sr.generate(pipe, ["a photo"], [0], [direction()], steps=10, resolution=64)
    plain, _ = sr.generate(pipe, ["a photo"], [0], steps=10, resolution=64)
    assert Image.open(samples / "a-photo_0.png").tobytes() == steered[0].tobytes()
    assert Image.open(samples / "a-photo_0_base.png").tobytes() == plain[0].tobytes()
    assert steered[0].tobytes() != plain[0].tobytes()


def saved_direction(path, width, *, pooled=0, family):
    direction = sr.Direction(width, pooled=pooled)
    sr.save_direction(path, direction, {"family": family, "base_model": "somewhere", "steer_window": [15, 50]})
    return path


def test_a_direction_is_refused_on_another_family_in_one_line(tiny_model_768, tiny_sd2, tiny_sdxl, tmp_path):
    generator = torch.Generator().manual_seed(0)  # the authors' release: SD v1.4, 77 x 768
    torch.save({"b": torch.randn(1, 77, 1, generator=generator), "a": torch.randn(1, 1, 768, generator=generator)},
               tmp_path / "official.pth")
    saved_direction(tmp_path / "xl.safetensors", 64, pooled=32, family="sdxl")
    cases = [(tiny_sdxl, "official.pth", "made for SD v1.x and this model is SDXL"),
             (tiny_sd2, "xl.safetensors", "made for SDXL and this model is SD 2.x"),
             (tiny_model_768, "xl.safetensors", "made for SDXL and this model is SD v1.x")]
    for i, (model, direction, message) in enumerate(cases):
        done = run_script("sample.py", "--model", model, "--prompt", "a photo", "--direction", direction,
                          "--resolution", 32, "--steps", 2, "--out", f"run{i}", cwd=tmp_path)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
        assert message in lines[0] and "does not move between model families" in lines[0]
        assert not (tmp_path / f"run{i}").exists()


def test_a_direction_moves_within_a_family_with_one_note(tiny_sdxl, tmp_path, capsys):
    path = saved_direction(tmp_path / "xl.safetensors", 64, pooled=32, family="sdxl")
    other = tiny.save_sdxl_pipeline(tmp_path / "fine-tune", seed=1)  # same shapes, other weights
    capsys.readouterr()
    sample.main(["--model", other, "--prompt", "a photo", "--direction", str(path), "--resolution", "32",
                 "--steps", "2", "--out", str(tmp_path / "run")])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {path} was trained on somewhere; using it on {other}"]
    assert (tmp_path / "run" / "a-photo_0.png").is_file()


def test_a_hub_direction_is_downloaded_by_repo_id(tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    for name in ("gender-male", "gender-female"):
        saved_direction(snapshot / f"{name}.safetensors", 32, family="sd1")
    calls = []

    def snapshot_download(repo, allow_patterns):
        calls.append((repo, allow_patterns))
        return str(snapshot)

    def hf_hub_download(repo, filename):
        calls.append((repo, filename))
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert direction_files("someone/gender") == [
        ("someone/gender/gender-female.safetensors", str(snapshot / "gender-female.safetensors")),
        ("someone/gender/gender-male.safetensors", str(snapshot / "gender-male.safetensors"))]
    assert direction_files("someone/gender/gender-male.safetensors") == [
        ("someone/gender/gender-male.safetensors", str(snapshot / "gender-male.safetensors"))]
    assert calls == [("someone/gender", ["*.safetensors"]), ("someone/gender", "gender-male.safetensors")]
    assert direction_files("directions/nudity.safetensors") == [("directions/nudity.safetensors",) * 2]  # local


def test_a_hub_direction_offline_stops_with_one_line(tiny_model, tmp_path):
    done = run_script("sample.py", "--model", tiny_model, "--prompt", "a photo", "--direction", "someone/nudity-sdxl",
                      "--resolution", 32, "--steps", 2, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert lines[0] == ("error: direction someone/nudity-sdxl is not a local file, and cannot be fetched from the "
                        "Hugging Face hub (offline, or no such repo or file?)")
    assert list(tmp_path.iterdir()) == []


def test_push_to_hub_uploads_the_directions_with_a_card_made_from_their_metadata(tiny_sdxl, tmp_path, monkeypatch,
                                                                                 capsys):
    uploaded = {}

    def create_repo(self, repo_id, exist_ok):
        uploaded["created"] = (repo_id, exist_ok)

    def upload_folder(self, *, repo_id, folder_path, commit_message):
        uploaded["repo"] = repo_id
        uploaded["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = tmp_path / "directions"
    argv = ["--concept", "nudity", "--model", tiny_sdxl, "--trajectories", "1", "--steps", "4", "--resolution", "32",
            "--out", str(out), "--keep", "a photo of a beach", "--push-to-hub", "someone/nudity-sdxl"]
    train.main(argv)
    assert uploaded["created"] == ("someone/nudity-sdxl", True) and uploaded["repo"] == "someone/nudity-sdxl"
    assert sorted(uploaded["files"]) == ["README.md", "nudity.loss.csv", "nudity.safetensors"]
    assert uploaded["files"]["nudity.safetensors"] == (out / "nudity.safetensors").read_bytes()

    _, metadata = sr.load_direction(out / "nudity.safetensors")
    card = uploaded["files"]["README.md"].decode()
    assert card.startswith(f"---\nbase_model: {tiny_sdxl}\n")
    assert shlex.split(metadata["command"]) == ["python", "train.py", *argv]  # a command that can be run again
    for wanted in [f"`{tiny_sdxl}` (SDXL)", "text embedding (77x64 + pooled 32)",
                   f"| nudity.safetensors | erase | {sr.NUDITY} | {metadata['final_loss']:.6g} |",
                   "steer window 15-50 and update window 10-50", "1 trajectories of 4 steps at 32 px",
                   f"    {metadata['command']}\n", "--direction someone/nudity-sdxl",
                   "Ours: the concept nudity; running the method on SDXL; the offset on the pooled embedding; "
                   "steps 4 (the paper's: 50); 1 preservation anchors."]:
        assert wanted in card, wanted

    uploaded.clear()  # the same command again: the direction is kept, not trained again, and pushed again
    capsys.readouterr()
    train.main(argv)
    assert capsys.readouterr().out.startswith(f"kept {out / 'nudity.safetensors'}: this same command wrote it\n")
    assert uploaded["files"]["nudity.safetensors"] == (out / "nudity.safetensors").read_bytes()
    assert uploaded["files"]["README.md"].decode() == card


def test_a_push_that_cannot_reach_the_hub_stops_before_training(tiny_model, tmp_path):
    done = run_script("train.py", "--concept", "nudity", "--model", tiny_model, "--push-to-hub", "someone/nudity",
                      "--resolution", 32, "--steps", 2, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: cannot create the Hugging Face hub repo someone/nudity: ")
    assert list(tmp_path.iterdir()) == []


def test_the_release_cost_model_learns_the_same_direction_on_each_family(pipe64):
    (concept,) = sr.builtin("unsafe")
    directions = []
    for learn in (sr.train, bench.release_train):
        _, width, pooled = sr.text_shape(pipe64)
        direction = sr.Direction(width, seed=5, pooled=pooled)
        losses = list(learn(pipe64, direction, concept, [(concept.prompt, 11)], steps=6, resolution=32))
        directions.append(direction().detach())
    assert len(losses) == 5 and directions[0].abs().max() > 1e-3
    torch.testing.assert_close(directions[1], directions[0], rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad or p.grad is not None for p in pipe64.unet.parameters())
