"""train.py and sample.py as a user runs them: subprocesses on a tiny local model."""

import json

import pytest
import torch
from PIL import Image

import saferegion as sr
from conftest import run_script

SMALL = ["--resolution", "32", "--steps", "10"]


@pytest.mark.slow
def test_train_then_sample_writes_what_it_says(tiny_model, pipe, tmp_path):
    done = run_script("train.py", "--concept", "nudity", "--model", tiny_model, "--trajectories", 2, *SMALL,
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "directions" / "nudity.safetensors"
    direction, metadata = sr.load_direction(path)
    assert metadata["base_model"] == tiny_model and metadata["concept"] == "nudity"
    assert metadata["rank"] == 1 and metadata["steer_window"] == [15, 50] and metadata["trajectories"] == 2
    assert metadata["final_loss"] > 0 and metadata["training_args"]["lr"] == 0.06
    log = (tmp_path / "directions" / "nudity.loss.csv").read_text().splitlines()
    assert log[0] == "update,trajectory,loss" and len(log) == 1 + 2 * 9

    # the artifact is exactly what the same training gives in this process
    (concept,) = sr.builtin("nudity")
    expected = sr.Direction(32, seed=0)
    rows = [(concept.prompt, 0), (concept.prompt, 1)]
    for _ in sr.train(pipe, expected, concept, rows, steps=10, resolution=32):
        pass
    torch.testing.assert_close(direction.A, expected.A.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(direction.B, expected.B.detach(), rtol=1e-6, atol=1e-6)
    assert metadata["final_loss"] == pytest.approx(float(log[-1].split(",")[2]), abs=1e-6)

    done = run_script("sample.py", "--model", tiny_model, "--prompt", "a photo", "--direction", path, "--n", 2,
               "--compare", *SMALL, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    samples = tmp_path / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [
        "a-photo_0.png", "a-photo_0_base.png", "a-photo_1.png", "a-photo_1_base.png", "compare.png",
        "manifest.jsonl", "run.json"]
    grid = Image.open(samples / "compare.png")
    assert grid.size == (2 * 32, 2 * 32)  # two seeds across, without / with down
    steered, _ = sr.generate(pipe, ["a photo"], [1], [direction()], steps=10, resolution=32)
    plain, _ = sr.generate(pipe, ["a photo"], [1], steps=10, resolution=32)
    assert list(Image.open(samples / "a-photo_1.png").getdata()) == list(steered[0].getdata())
    assert list(Image.open(samples / "a-photo_1_base.png").getdata()) == list(plain[0].getdata())
    assert list(grid.crop((32, 32, 64, 64)).getdata()) == list(steered[0].getdata())
    assert steered[0].tobytes() != plain[0].tobytes()

    again = run_script("train.py", "--concept", "nudity", "--model", tiny_model, "--trajectories", 1, *SMALL,
                       cwd=tmp_path)
    assert again.returncode != 0 and "--force" in again.stderr
    assert sr.load_direction(path)[1]["trajectories"] == 2  # untouched


@pytest.mark.slow
def test_gender_writes_one_direction_per_value_and_samples_with_both(tiny_model, tmp_path):
    done = run_script("train.py", "--concept", "gender", "--model", tiny_model, "--trajectories", 1,
               "--resolution", 32, "--steps", 4, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    files = sorted((tmp_path / "directions").glob("*.safetensors"))
    assert [p.name for p in files] == ["gender-female.safetensors", "gender-male.safetensors"]
    done = run_script("sample.py", "--model", tiny_model, "--prompt", "a doctor", "--direction", *files, "--n", 6,
               "--resolution", 32, "--steps", 4, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = [json.loads(line) for line in (tmp_path / "samples" / "manifest.jsonl").read_text().splitlines()]
    assert [m["seed"] for m in manifest] == list(range(6))
    assert [m["direction"] for m in manifest] == [str(files[sr.draw("a doctor", seed, 2)]) for seed in range(6)]


@pytest.mark.slow
def test_the_authors_released_file_works_where_the_width_is_768(tiny_model_768, tiny_model, tmp_path):
    generator = torch.Generator().manual_seed(0)
    torch.save({"b": torch.randn(1, 77, 1, generator=generator), "a": torch.randn(1, 1, 768, generator=generator)},
               tmp_path / "official.pth")
    done = run_script("sample.py", "--model", tiny_model_768, "--prompt", "a photo", "--direction", "official.pth",
               *SMALL, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "samples" / "a-photo_0.png").is_file()
    refused = run_script("sample.py", "--model", tiny_model, "--prompt", "a photo", "--direction", "official.pth",
                  "--out", "other", *SMALL, cwd=tmp_path)
    assert refused.returncode != 0 and "77x768" in refused.stderr and "77x32" in refused.stderr
    assert not (tmp_path / "other").exists()


BAD_INPUTS = {
    "unknown concept": (["train.py", "--concept", "nsfw"], "built-ins are: unsafe, nudity, gender, race"),
    "missing model folder": (["train.py", "--concept", "nudity", "--model", "/no/such/folder"], "does not exist"),
    "unreachable hub id": (["train.py", "--concept", "nudity", "--model", "CompVis/stable-diffusion-v1-4"],
                           "not found on the Hugging Face hub"),
    "corrupt direction": (["sample.py", "--prompt", "a photo", "--direction", "corrupt.safetensors"],
                          "not a direction file"),
    "csv without prompt column": (["train.py", "--concept", "nudity", "--prompts", "noprompt.csv"],
                                  "has no 'prompt' column; it has: text, evaluation_seed"),
    "csv with an empty prompt": (["train.py", "--concept", "nudity", "--prompts", "empty.csv"], "line 3: empty prompt"),
    "empty prompt": (["sample.py", "--prompt", " "], "the prompt is empty"),
    "backwards window": (["sample.py", "--prompt", "a photo", "--window", "40-20"], "1 <= start <= end <= 50"),
    "attribute without neutral": (["train.py", "--attribute", "a red square"], "--attribute needs --neutral"),
}


@pytest.mark.slow  # a script started per case
@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_stops_with_one_clear_line_and_leaves_no_file(case, tiny_model, tmp_path):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"A\": 1}")
    (tmp_path / "noprompt.csv").write_text("text,evaluation_seed\na photo,1\n")
    (tmp_path / "empty.csv").write_text("prompt,evaluation_seed\na photo,1\n,2\n")
    before = set(tmp_path.iterdir())
    args, message = BAD_INPUTS[case]
    if "--model" not in args:
        args = args + ["--model", tiny_model]
    done = run_script(*args, *SMALL, cwd=tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert set(tmp_path.iterdir()) == before


@pytest.mark.slow
def test_train_keeps_anchors_from_the_command_line_and_records_them(tiny_model, pipe, tmp_path):
    assert "--keep TEXT" in run_script("train.py", "--help", cwd=tmp_path).stdout
    (tmp_path / "keep.csv").write_text("prompt,evaluation_seed\na green circle,40\n")
    done = run_script("train.py", "--erase", "nudity", "--keep", "a red square", "--keep-prompts", "keep.csv",
                      "--model", tiny_model, "--trajectories", 2, *SMALL, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    direction, metadata = sr.load_direction(tmp_path / "directions" / "nudity.safetensors")
    assert metadata["keep"] == [["a red square", 0], ["a green circle", 40]]
    assert len((tmp_path / "directions" / "nudity.loss.csv").read_text().splitlines()) == 1 + 4 * 9

    concept = sr.erase("nudity")
    expected = sr.Direction(32, seed=0)
    for _ in sr.train(pipe, expected, concept, [(concept.prompt, 0), (concept.prompt, 1)], steps=10, resolution=32,
                      keep=[("a red square", 0), ("a green circle", 40)]):
        pass
    torch.testing.assert_close(direction.B, expected.B.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(direction.A, expected.A.detach(), rtol=1e-6, atol=1e-6)
