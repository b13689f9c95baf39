"""The direction stacked on other safety methods and moved to other SD v1.x models, on tiny pipelines.

Each path is compared with the same thing done by hand: U-Net weights loaded with load_state_dict,
LoRA merged into the weights as W + scale * (alpha / r) * B @ A, diffusers' own SLD pipeline.
"""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionPipelineSafe
from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from PIL import Image
from safetensors.torch import load_file, save_file

import saferegion as sr
import sample
import tiny
import train
from conftest import recorded_unet_inputs, run_script
from inputs import UserError

SMALL = ["--resolution", "32", "--steps", "4"]
SETTINGS = dict(steps=4, resolution=32, output_type="latent")


def sample_latent(tiny_model, out, *args):
    """sample.py with latents saved; returns the latent of image 0, (C, H, W)."""
    sample.main(["--prompt", "a photo", "--model", str(tiny_model), "--out", str(out), "--save-latents", *SMALL,
                 *map(str, args)])
    return load_file(out / "a-photo_0.latents.safetensors")["latent"]


def random_direction(path, base_model, width=32):
    direction = sr.Direction(width, seed=0)
    with torch.no_grad():
        direction.B.copy_(torch.randn(77, 1, generator=torch.Generator().manual_seed(1)))
    sr.save_direction(path, direction, {"base_model": base_model, "steer_window": [15, 50], "beta": 1.0})
    return direction


def erased_unet(tiny_model, keep=lambda key: True):
    """A U-Net state dict as ESD ships one: diffusers names, the base weights plus a change."""
    generator = torch.Generator().manual_seed(0)
    state = sr.load_pipeline(tiny_model).unet.state_dict()
    return {k: (v + 0.05 * torch.randn(v.shape, generator=generator)).contiguous() for k, v in state.items() if keep(k)}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_an_erased_unet_file_acts_as_its_weights_loaded_by_hand(suffix, tiny_model, pipe, tmp_path):
    state = erased_unet(tiny_model)
    path = tmp_path / f"esd{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, path)
    latent = sample_latent(tiny_model, tmp_path / "run", "--unet", path)

    by_hand = sr.load_pipeline(tiny_model)
    by_hand.unet.load_state_dict(state)  # strict
    expected, _ = sr.generate(by_hand, ["a photo"], [0], **SETTINGS)
    plain, _ = sr.generate(pipe, ["a photo"], [0], **SETTINGS)
    assert torch.equal(latent, expected[0])
    assert (latent - plain[0]).abs().max() > 0.1  # the U-Net swap changed the image


def test_a_unet_file_of_only_the_changed_layers_keeps_the_others(tiny_model, tmp_path, capsys):
    state = erased_unet(tiny_model, keep=lambda key: "attn2" in key)  # as ESD's esd-x files hold
    save_file(state, tmp_path / "esd-x.safetensors")
    latent = sample_latent(tiny_model, tmp_path / "run", "--unet", tmp_path / "esd-x.safetensors")
    by_hand = sr.load_pipeline(tiny_model)
    assert by_hand.unet.load_state_dict(state, strict=False).unexpected_keys == []
    expected, _ = sr.generate(by_hand, ["a photo"], [0], **SETTINGS)
    assert torch.equal(latent, expected[0])
    total = len(by_hand.unet.state_dict())
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {tmp_path / 'esd-x.safetensors'} sets {len(state)} of the U-Net's {total} tensors; "
                     "the others are the model's"]


def test_a_direction_learned_on_an_erased_unet_is_the_one_learned_with_it_by_hand(tiny_model, tmp_path):
    state = erased_unet(tiny_model)
    torch.save(state, tmp_path / "esd.pt")
    train.main(["--erase", "nudity", "--model", tiny_model, "--unet", str(tmp_path / "esd.pt"), "--trajectories", "1",
                "--steps", "3", "--resolution", "32", "--out", str(tmp_path / "directions")])
    direction, metadata = sr.load_direction(tmp_path / "directions" / "nudity.safetensors")
    assert metadata["unet"] == str(tmp_path / "esd.pt") and metadata["base_model"] == tiny_model

    by_hand = sr.load_pipeline(tiny_model)
    by_hand.unet.load_state_dict(state)
    expected = sr.Direction(32, seed=0)
    for _ in sr.train(by_hand, expected, sr.erase("nudity"), [("an image of nudity", 0)], steps=3, resolution=32):
        pass
    assert torch.equal(direction.B, expected.B.detach()) and expected.B.abs().max() > 0


def test_a_unet_folder_loads_like_its_weights(tiny_model, tmp_path):
    erased = sr.load_pipeline(tiny_model).unet
    erased.load_state_dict(erased_unet(tiny_model))
    erased.save_pretrained(tmp_path / "esd-unet")
    latent = sample_latent(tiny_model, tmp_path / "run", "--unet", tmp_path / "esd-unet")
    by_hand = sr.load_pipeline(tiny_model)
    by_hand.unet = erased
    assert torch.equal(latent, sr.generate(by_hand, ["a photo"], [0], **SETTINGS)[0][0])


@pytest.mark.slow
def test_a_file_that_is_not_this_unet_is_refused_in_one_line(tiny_model, tmp_path):
    state = {f"model.diffusion_model.{k}": v for k, v in erased_unet(tiny_model).items()}  # a CompVis checkpoint
    torch.save(state, tmp_path / "ldm.ckpt")
    with pytest.raises(UserError, match="unexpected tensor model.diffusion_model.conv_in.weight"):
        sr.load_pipeline(tiny_model, unet=str(tmp_path / "ldm.ckpt"))
    wider = tiny.unet(48).state_dict()  # a U-Net for a 48-d text encoder
    save_file(wider, tmp_path / "wider.safetensors")
    with pytest.raises(UserError, match="unexpected tensor .*attn2.to_k.weight"):
        sr.load_pipeline(tiny_model, unet=str(tmp_path / "wider.safetensors"))
    with pytest.raises(UserError, match="missing.pt does not exist"):
        sr.load_pipeline(tiny_model, unet=str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="not found on the Hugging Face hub"):
        sr.load_pipeline(tiny_model, lora=["someone/a-lora"])

    # as the user sees it: one line, no loader's warning above it (the U-Net loader gives one offline)
    done = run_script("sample.py", "--prompt", "a photo", "--model", tiny_model, "--unet", "someone/esd-unet",
                      cwd=tmp_path)
    assert done.returncode != 0 and done.stderr.splitlines() == [
        "error: cannot load U-Net 'someone/esd-unet': not a local path, and not found on the Hugging Face hub "
        "or in its cache (offline?)"]


def make_lora(model, targets, rank, alpha, seed):
    """A peft LoRA on `model` with B non-zero (init_lora_weights=False), as a training run leaves one."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(seed)
    return get_peft_model_state_dict(inject_adapter_in_model(config, model)), config


@pytest.fixture(scope="module")
def loras(tiny_model, tmp_path_factory):
    """A text-encoder LoRA and a U-Net LoRA, each saved in diffusers' LoRA format."""
    folder = tmp_path_factory.mktemp("loras")
    scratch = sr.load_pipeline(tiny_model)
    text, text_config = make_lora(scratch.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], 4, 8, 1)
    StableDiffusionPipeline.save_lora_weights(folder / "text", text_encoder_lora_layers=text,
                                              text_encoder_lora_adapter_metadata=text_config.to_dict())
    unet, unet_config = make_lora(scratch.unet, ["to_q", "to_k", "to_v", "to_out.0"], 4, 2, 2)
    StableDiffusionPipeline.save_lora_weights(folder / "unet", unet_lora_layers=unet,
                                              unet_lora_adapter_metadata=unet_config.to_dict())
    return {"text": (folder / "text", text, text_config), "unet": (folder / "unet", unet, unet_config)}


def merged_by_hand(tiny_model, loras, scale):
    """The tiny model with each LoRA merged into its weights: W + scale * (alpha / r) * B @ A."""
    pipe = sr.load_pipeline(tiny_model)
    with torch.no_grad():
        for model, (_, state, config) in ((pipe.text_encoder, loras["text"]), (pipe.unet, loras["unet"])):
            for key in [k for k in state if ".lora_A." in k]:
                layer = model.get_submodule(key.split(".lora_A.")[0])
                B, A = state[key.replace("lora_A", "lora_B")], state[key]
                layer.weight += scale * config.lora_alpha / config.r * B @ A
    return pipe


def test_lora_adapters_act_as_merged_by_hand_in_text_encoder_and_unet(tiny_model, loras, pipe, tmp_path):
    files = ["--lora", loras["text"][0], "--lora", loras["unet"][0]]
    latent = sample_latent(tiny_model, tmp_path / "run", *files, "--lora-scale", "0.7")
    by_hand = merged_by_hand(tiny_model, loras, 0.7)
    expected, _ = sr.generate(by_hand, ["a photo"], [0], **SETTINGS)
    plain, _ = sr.generate(pipe, ["a photo"], [0], **SETTINGS)
    torch.testing.assert_close(latent, expected[0], rtol=0, atol=1e-4)  # merged and unmerged round apart
    assert (latent - plain[0]).abs().max() > 0.1

    # our embeddings come through encode_prompt: the text encoder's LoRA is in them, at the scale given
    loaded = sr.load_pipeline(tiny_model, lora=[str(loras["text"][0])], lora_scale=0.7)
    with_lora, merged = sr.embed(loaded, ["a photo"]), sr.embed(by_hand, ["a photo"])
    torch.testing.assert_close(with_lora, merged, rtol=0, atol=1e-5)
    assert (with_lora - sr.embed(pipe, ["a photo"])).abs().max() > 0.1
    assert (with_lora - sr.embed(merged_by_hand(tiny_model, loras, 1.0), ["a photo"])).abs().max() > 0.1

    zero = sample_latent(tiny_model, tmp_path / "zero", *files, "--lora-scale", "0")
    assert torch.equal(zero, plain[0])  # scale 0 is the base model, exactly


def test_sld_with_a_direction_at_beta_zero_is_sld_alone(tiny_model, pipe, tmp_path):
    random_direction(tmp_path / "d.safetensors", tiny_model)
    latent = sample_latent(tiny_model, tmp_path / "run", "--direction", tmp_path / "d.safetensors", "--beta", "0",
                 "--sld", "max")  # max: SLD from the first step (medium waits 10 steps, more than this run has)
    final = []
    alone = StableDiffusionPipelineSafe(**pipe.components, requires_safety_checker=False)
    image = alone(["a photo"], generator=[torch.Generator().manual_seed(0)], num_inference_steps=4,
                  guidance_scale=7.5, height=32, width=32, callback=lambda i, t, x: final.append(x),
                  **SafetyConfig.MAX).images[0]
    assert torch.equal(latent, final[-1][0])
    assert Image.open(tmp_path / "run" / "a-photo_0.png").tobytes() == image.tobytes()
    plain, _ = sr.generate(pipe, ["a photo"], [0], **SETTINGS)
    assert (latent - plain[0]).abs().max() > 1e-3  # SLD did act
    steered = sample_latent(tiny_model, tmp_path / "steered", "--direction", tmp_path / "d.safetensors", "--sld", "max")
    assert (steered - latent).abs().max() > 0.1  # and so does the direction on top of it


def test_sld_steers_only_inside_the_window_and_never_the_other_rows(tiny_model, pipe, tmp_path):
    offset = random_direction(tmp_path / "d.safetensors", tiny_model)().detach()
    with recorded_unet_inputs(pipe.unet) as seen:
        sample.safe_latent_diffusion(pipe, ["a photo", "a cat"], [0, 1], [offset], preset="strong", guidance=7.5,
                                     beta=0.5, steer_window=(15, 50), steps=10, resolution=32,
                                     negative_prompt="blurry")
    plain, negative = sr.embed(pipe, ["a photo", "a cat"]), sr.embed(pipe, ["blurry"] * 2)
    sld_concept = StableDiffusionPipelineSafe(**pipe.components, requires_safety_checker=False).safety_concept
    concept = sr.embed(pipe, [sld_concept] * 2)
    assert len(seen) == 10
    for k, embeds in enumerate(seen, start=1):  # [unconditional, conditional, SLD's concept]
        assert torch.equal(embeds[:2], negative) and torch.equal(embeds[4:], concept)
        expected = plain + 0.5 * offset if k >= 3 else plain  # 15 of 50 is step 3 of 10
        assert torch.equal(embeds[2:4], expected)


def test_sld_concept_is_what_sld_guides_away_from_as_diffusers_sets_it(tiny_model, pipe, tmp_path):
    with recorded_unet_inputs(pipe.unet) as seen:
        sample.safe_latent_diffusion(pipe, ["a photo"], [0], [], preset="max", concept="striped", guidance=7.5,
                                     beta=1.0, steer_window=(15, 50), steps=4, resolution=32, negative_prompt="")
    assert len(seen) == 4 and all(torch.equal(embeds[2:], sr.embed(pipe, ["striped"])) for embeds in seen)

    latent = sample_latent(tiny_model, tmp_path / "run", "--sld", "max", "--sld-concept", "striped")
    final = []
    by_hand = StableDiffusionPipelineSafe(**pipe.components, requires_safety_checker=False)
    by_hand.safety_concept = "striped"  # diffusers' own setter for SLD's concept
    by_hand(["a photo"], generator=[torch.Generator().manual_seed(0)], num_inference_steps=4, guidance_scale=7.5,
            height=32, width=32, callback=lambda i, t, x: final.append(x), **SafetyConfig.MAX)
    assert torch.equal(latent, final[-1][0])
    default = sample_latent(tiny_model, tmp_path / "default", "--sld", "max")
    assert (latent - default).abs().max() > 1e-3  # the concept changed what SLD did
    assert json.loads((tmp_path / "run" / "run.json").read_text())["sld_concept"] == "striped"
    with pytest.raises(UserError, match="--sld-concept needs --sld"):
        sample_latent(tiny_model, tmp_path / "alone", "--sld-concept", "striped")


def test_negative_prompt_is_the_unsteered_unconditional_branch_and_is_recorded(tiny_model, pipe, tmp_path):
    offset = random_direction(tmp_path / "d.safetensors", tiny_model)().detach()
    with recorded_unet_inputs(pipe.unet) as seen:
        sr.generate(pipe, ["a photo"], [0], [offset], negative_prompt="blurry", steer_window=(1, 50), **SETTINGS)
    assert len(seen) == 4
    assert all(torch.equal(embeds[:1], sr.embed(pipe, ["blurry"])) for embeds in seen)
    assert all(torch.equal(embeds[1:], sr.embed(pipe, ["a photo"]) + offset) for embeds in seen)

    args = ["--direction", tmp_path / "d.safetensors", "--negative-prompt", "blurry", "--sld", "weak"]
    sample_latent(tiny_model, tmp_path / "run", *args)
    settings = json.loads((tmp_path / "run" / "run.json").read_text())
    assert settings["negative_prompt"] == "blurry" and settings["sld"] == "weak" and "unet" not in settings
    line = json.loads((tmp_path / "run" / "manifest.jsonl").read_text())
    assert line["negative_prompt"] == "blurry" and line["sld"] == "weak"
    with pytest.raises(UserError, match="other settings"):
        sample_latent(tiny_model, tmp_path / "run", *args[:-1], "medium")


def test_a_direction_moves_to_another_model_with_one_note_and_not_to_another_width(tiny_model, tmp_path, capsys):
    train.main(["--erase", "nudity", "--model", tiny_model, "--trajectories", "1", "--steps", "2",
                "--resolution", "32", "--out", str(tmp_path / "directions")])
    path = tmp_path / "directions" / "nudity.safetensors"
    other = tiny.save_pipeline(tmp_path / "other", width=32, seed=1)
    capsys.readouterr()

    def notes():
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]

    sample_latent(tiny_model, tmp_path / "same", "--direction", path)
    assert notes() == []
    sample_latent(other, tmp_path / "moved", "--direction", path)
    assert notes() == [f"note: {path} was trained on {tiny_model}; using it on {other}"]
    assert (tmp_path / "moved" / "a-photo_0.png").is_file()

    wider = tiny.save_pipeline(tmp_path / "wider", width=48)
    with pytest.raises(UserError, match="77x32 but this model's text embedding is 77x48"):
        sample_latent(wider, tmp_path / "refused", "--direction", path)
    assert notes() == []
