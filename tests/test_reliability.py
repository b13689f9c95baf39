"""Nothing lost, nothing stale, nothing cryptic: train.py, sample.py and evaluate.py against bad input,
faults, interruptions and a second process, as a hostile but realistic user tries them.

Bad input stops before any compute with one `error:` line, a non-zero exit and no new file; a run
folder is identified by what makes its images; a crash, Ctrl-C or a full disk loses nothing made.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import torch

import directions
import runs
import saferegion as sr
import sample
import train
from conftest import ROOT, run_script
from inputs import UserError, read_prompts
from runs import sole_writer

SMALL = ["--resolution", "32", "--steps", "3"]
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"  # the start of a PNG file: not text


def random_direction(path, seed=1, scale=1.0):
    """A direction file with B non-zero (a trained one), so that it changes images."""
    direction = sr.Direction(32, seed=0)
    with torch.no_grad():
        direction.B.copy_(scale * torch.randn(77, 1, generator=torch.Generator().manual_seed(seed)))
    sr.save_direction(path, direction, {"steer_window": [15, 50], "beta": 1.0})
    return path


def unwritable_folder(tmp_path):
    """A folder nothing can be written in. chmod does not stop root, so as root a sysfs folder stands in."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return folder
    folder.chmod(0o755)
    folder.rmdir()
    try:
        with tempfile.TemporaryFile(dir="/sys/fs"):
            pass
    except OSError:
        return Path("/sys/fs")
    pytest.skip("no folder here refuses writes to this user")


def files_under(folder):
    return set(folder.rglob("*"))


# -----------------------------------------------------------------------------
# Bad input, by kind: one `error:` line, a non-zero exit, no new file, before the model loads

BAD = {
    # non-finite and out-of-range numbers
    "train lr inf": (["train.py", "--concept", "nudity", "--lr", "inf"], "--lr must be a finite number, not inf"),
    "train lr zero": (["train.py", "--concept", "nudity", "--lr", "0"], "--lr must be above 0"),
    "train guidance nan": (["train.py", "--concept", "nudity", "--guidance", "nan"],
                           "--guidance must be a finite number, not nan"),
    "train seed negative": (["train.py", "--concept", "nudity", "--seed", "-1"],
                            "--seed -1 is not a seed a torch generator takes"),
    "train resolution off the VAE grid": (["train.py", "--concept", "nudity", "--resolution", "36"],
                                          "--resolution must be a multiple of 8"),
    "train rank above the direction's": (["train.py", "--concept", "nudity", "--rank", "100"],
                                         "--rank must be at most 32: the direction is 77 x 32"),
    "sample beta nan": (["sample.py", "--prompt", "a photo", "--direction", "d.safetensors", "--beta", "nan"],
                        "--beta must be a finite number, not nan"),
    "sample guidance nan": (["sample.py", "--prompt", "a photo", "--guidance", "nan"],
                            "--guidance must be a finite number, not nan"),
    "sample seed above 2**64": (["sample.py", "--prompt", "a photo", "--seed", str(2**64)],
                                f"--seed {2**64} is not a seed a torch generator takes"),
    "sample limit zero": (["sample.py", "--prompts", "ok.csv", "--limit", "0"], "--limit must be at least 1"),
    "sample resolution off the VAE grid": (["sample.py", "--prompt", "a photo", "--resolution", "36"],
                                           "--resolution must be a multiple of 8"),
    "sample NaN direction": (["sample.py", "--prompt", "a photo", "--direction", "nan.safetensors"],
                             "direction nan.safetensors holds NaN or inf"),
    "csv seed inf": (["sample.py", "--prompts", "infseed.csv"],
                     "infseed.csv, line 3: seed 'inf' is not a whole number"),
    "csv guidance nan": (["sample.py", "--prompts", "nanguidance.csv", "--row-guidance"],
                         "nanguidance.csv, line 2: guidance 'nan' is not a finite number"),
    # outputs that are files or cannot be written
    "train out is a file": (["train.py", "--concept", "nudity", "--out", "file.txt"],
                            "--out file.txt: file.txt is a file, not a folder"),
    "train out unwritable": (["train.py", "--concept", "nudity", "--out", "{unwritable}/directions"],
                             "cannot write in"),
    "train direction path is a folder": (["train.py", "--concept", "nudity", "--out", "made"],
                                         "made/nudity.safetensors is a folder"),
    "sample out is a file": (["sample.py", "--prompt", "a photo", "--out", "file.txt"], "is a file, not a folder"),
    "sample out unwritable": (["sample.py", "--prompt", "a photo", "--out", "{unwritable}/run"], "cannot write in"),
    "evaluate run dir unwritable": (["evaluate.py", "quality", "{unwritable}"], ": cannot write in"),
    # a device this torch does not have
    "train cuda without CUDA": (["train.py", "--concept", "nudity", "--device", "cuda"],
                                "--device cuda: this torch is a CPU-only build"),
    "sample cuda without CUDA": (["sample.py", "--prompt", "a photo", "--device", "cuda"],
                                 "--device cuda: this torch is a CPU-only build"),
    "evaluate cuda without CUDA": (["evaluate.py", "quality", "run", "--device", "cuda"],
                                   "--device cuda: this torch is a CPU-only build"),
    "not a device": (["sample.py", "--prompt", "a photo", "--device", "gpu"], "--device 'gpu' is not a device"),
    # text files: encodings, a missing field, no rows
    "csv in Latin-1": (["sample.py", "--prompts", "latin1.csv"], "latin1.csv, line 3: not UTF-8 text (byte 0xe9)"),
    "csv that is binary": (["train.py", "--concept", "nudity", "--prompts", "image.png"],
                           "image.png, line 1: not UTF-8 text (byte 0x89)"),
    "csv row missing a field": (["train.py", "--concept", "nudity", "--prompts", "short.csv"],
                                "short.csv, line 3: 1 field(s) where the header has 2"),
    "csv row with an unquoted comma": (["sample.py", "--prompts", "comma.csv"],
                                       "comma.csv, line 2: 3 field(s) where the header has 2 (a comma inside a prompt"),
    "csv header without rows": (["sample.py", "--prompts", "header.csv"], "header.csv has a header but no rows"),
    "keep-prompts in Latin-1": (["train.py", "--concept", "nudity", "--keep-prompts", "latin1.csv"],
                                "latin1.csv, line 3: not UTF-8 text"),
    "evaluate manifest that is binary": (["evaluate.py", "quality", "binary-run"],
                                         "manifest.jsonl, line 1: not UTF-8 text"),
}


@pytest.mark.slow  # a script started per case
@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_of_each_kind_stops_in_one_line_before_any_work(case, tiny_model, tmp_path):
    if "cuda" in case and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    random_direction(tmp_path / "d.safetensors")
    nan = sr.Direction(32)
    with torch.no_grad():
        nan.B[3, 0] = float("nan")
    sr.save_direction(tmp_path / "nan.safetensors", nan, {})
    (tmp_path / "ok.csv").write_text("prompt,evaluation_seed\na photo,1\n")
    (tmp_path / "infseed.csv").write_text("prompt,evaluation_seed\na photo,1\na cat,inf\n")
    (tmp_path / "nanguidance.csv").write_text("prompt,evaluation_guidance\na photo,nan\n")
    (tmp_path / "latin1.csv").write_bytes("prompt\na photo\nun café\n".encode("latin-1"))
    (tmp_path / "short.csv").write_text("prompt,evaluation_seed\na photo,1\na cat\n")
    (tmp_path / "comma.csv").write_text("prompt,evaluation_seed\na dark alley, blood,1\n")
    (tmp_path / "header.csv").write_text("prompt,evaluation_seed\n")
    (tmp_path / "file.txt").write_text("not a folder\n")
    (tmp_path / "made" / "nudity.safetensors").mkdir(parents=True)
    (tmp_path / "image.png").write_bytes(PNG)
    (tmp_path / "binary-run").mkdir()
    (tmp_path / "binary-run" / "manifest.jsonl").write_bytes(PNG)
    (script, *args), message = BAD[case]
    args = [a.replace("{unwritable}", str(unwritable_folder(tmp_path))) for a in args]
    if script != "evaluate.py":
        args = ["--model", tiny_model, *SMALL, *args]  # the case's own options last, so that they win
    before = files_under(tmp_path)
    done = run_script(script, *args, cwd=tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert files_under(tmp_path) == before


def test_utf8_with_or_without_a_byte_order_mark_reads_the_same_rows(tmp_path):
    text = 'prompt,evaluation_seed\nun café,1\n"a dark alley, blood",2\n'
    (tmp_path / "plain.csv").write_text(text, encoding="utf-8")
    (tmp_path / "excel.csv").write_text(text, encoding="utf-8-sig")  # what Excel's "CSV UTF-8" writes
    assert (tmp_path / "excel.csv").read_bytes()[:3] == b"\xef\xbb\xbf"
    expected = [{"prompt": "un café", "seed": 1}, {"prompt": "a dark alley, blood", "seed": 2}]
    assert read_prompts(tmp_path / "plain.csv") == expected
    assert read_prompts(tmp_path / "excel.csv") == expected


def test_non_ascii_concepts_get_file_names_that_do_not_collide():
    def name(text):
        args = train.parse_args(["--erase", text])
        (concept,) = sr.concepts_for(concept=args.concept, erase_text=args.erase, attribute_text=args.attribute,
                                     neutral=args.neutral)
        return concept.name

    names = [name("暴力"), name("血"), name("nudité"), name("nudita")]
    assert len(set(names)) == 4 and all(n and "/" not in n for n in names)
    assert name("violence, blood") == "violence-blood"  # a slug that keeps every letter stays as it was
    assert name("nudita") == "nudita"


# -----------------------------------------------------------------------------
# Non-finite numbers stop the work in one line instead of writing NaN

def test_training_that_diverges_stops_naming_the_update_and_writes_nothing(tiny_model, tmp_path):
    # guidance 1e30 is finite, but the erase target eps_t + w (eps_0 - eps_t) is then ~1e30, and its
    # squared error overflows float32: the first update's loss is not finite
    done = run_script("train.py", "--concept", "nudity", "--model", tiny_model, "--trajectories", 2,
                      "--guidance", "1e30", *SMALL, cwd=tmp_path)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: nudity: training diverged at update 1 (trajectory 1)")
    assert not (tmp_path / "directions").exists()


def test_sampling_that_gives_nan_latents_writes_no_image(tiny_model, tmp_path):
    random_direction(tmp_path / "d.safetensors")
    done = run_script("sample.py", "--prompt", "a photo", "--model", tiny_model, "--direction", "d.safetensors",
                      "--beta", "1e30", *SMALL, cwd=tmp_path)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == ["error: a-photo_0.png came out NaN or inf, and is not written; lower --beta or --guidance"]
    assert not list((tmp_path / "samples").glob("*.png"))
    assert (tmp_path / "samples" / "manifest.jsonl").read_text() == ""


# -----------------------------------------------------------------------------
# A run folder is identified by what makes its images

def manifest(run_dir):
    return [json.loads(line) for line in (run_dir / "manifest.jsonl").read_text().splitlines()]


def test_a_run_folder_refuses_a_retrained_direction_an_edited_csv_or_a_new_seed(tiny_model, tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\na photo\na cat\n")  # no seeds: they come from --seed
    direction = random_direction(tmp_path / "d.safetensors", seed=1)
    run_dir = tmp_path / "run"
    args = ["--prompts", str(prompts), "--direction", str(direction), "--model", tiny_model, "--out", str(run_dir),
            *SMALL]
    sample.main(args)
    made = {r["file"]: (run_dir / r["file"]).read_bytes() for r in manifest(run_dir)}

    random_direction(direction, seed=2)  # retrained in place: same path, other content
    with pytest.raises(UserError, match=r"other settings \(directions_sha256 differ\)"):
        sample.main(args)
    random_direction(direction, seed=1)
    prompts.write_text("prompt\na photo\na dog\n")  # one row edited
    with pytest.raises(UserError, match=r"other settings \(prompts_sha256 differ\)"):
        sample.main(args)
    prompts.write_text("prompt\na photo\na cat\n")
    with pytest.raises(UserError, match=r"other settings \(seed differ\)"):
        sample.main(args + ["--seed", "5"])
    assert {r["file"]: (run_dir / r["file"]).read_bytes() for r in manifest(run_dir)} == made  # all refused untouched

    # the same content under another path is the same run: nothing to make again
    (tmp_path / "copy.csv").write_text(prompts.read_text())
    times = {f: (run_dir / f).stat().st_mtime_ns for f in made}
    sample.main([a if a != str(prompts) else str(tmp_path / "copy.csv") for a in args])
    assert {f: (run_dir / f).stat().st_mtime_ns for f in made} == times
    assert json.loads((run_dir / "run.json").read_text())["source"] == str(tmp_path / "copy.csv")

    sample.main(args + ["--seed", "5", "--force"])  # --force starts the folder over with the new seed
    assert [r["seed"] for r in manifest(run_dir)] == [5, 6]


def test_limit_and_n_change_the_selection_without_dropping_images_from_the_manifest(tiny_model, tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,evaluation_seed\n" + "".join(f"prompt {i},{10 * i}\n" for i in range(4)))
    run_dir = tmp_path / "run"
    args = ["--prompts", str(prompts), "--model", tiny_model, "--out", str(run_dir), *SMALL]
    sample.main(args)
    everything = manifest(run_dir)
    assert [r["file"] for r in everything] == ["00000_0.png", "00001_10.png", "00002_20.png", "00003_30.png"]

    sample.main(args + ["--limit", "2"])  # a smaller selection: the other two images stay listed
    assert manifest(run_dir) == everything
    sample.main(args + ["--limit", "2", "--n", "2"])  # a second image for the first two rows
    files = [r["file"] for r in manifest(run_dir)]
    assert files == ["00000_0.png", "00000_1.png", "00001_10.png", "00001_11.png", "00002_20.png", "00003_30.png"]
    on_disk = sorted(p.name for p in run_dir.glob("*.png"))
    assert sorted(files) == on_disk  # the manifest lists every image of the run on disk, and only those


# -----------------------------------------------------------------------------
# Crash-safe resume

def test_a_manifest_line_cut_mid_write_is_dropped_and_its_image_made_again(tiny_model, tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,evaluation_seed\n" + "".join(f"prompt {i},{i}\n" for i in range(3)))
    run_dir = tmp_path / "run"
    args = ["--prompts", str(prompts), "--model", tiny_model, "--out", str(run_dir), *SMALL]
    sample.main(args)
    full = manifest(run_dir)
    original = {r["file"]: (run_dir / r["file"]).read_bytes() for r in full}

    # as if killed while writing the third line: its image is on disk, its line half there
    text = (run_dir / "manifest.jsonl").read_text()
    (run_dir / "manifest.jsonl").write_text(text[:len(text) - 25])
    kept = {r["file"]: (run_dir / r["file"]).stat().st_mtime_ns for r in full[:2]}
    sample.main(args)
    assert manifest(run_dir) == full
    assert {f: (run_dir / f).stat().st_mtime_ns for f in kept} == kept  # the two whole lines were not redone
    assert {r["file"]: (run_dir / r["file"]).read_bytes() for r in full} == original


def test_a_corrupt_manifest_line_or_run_json_is_named_with_what_to_do(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--prompt", "a photo", "--n", "3", "--model", tiny_model, "--out", str(run_dir), *SMALL]
    sample.main(args)
    lines = (run_dir / "manifest.jsonl").read_text().splitlines()
    (run_dir / "manifest.jsonl").write_text("\n".join([lines[0], "{not json", lines[2]]) + "\n")
    with pytest.raises(UserError, match=r"manifest.jsonl, line 2: not a record with a 'file'; delete that line "
                                        r"\(its image is made again\), or pass --force"):
        sample.main(args)
    (run_dir / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "run.json").write_text('{"model": "x",\n "steps": }')
    with pytest.raises(UserError, match=r"run.json, line 2: not valid JSON \(Expecting value\); pass --force"):
        sample.main(args)


# -----------------------------------------------------------------------------
# One writer per run folder; Ctrl-C; a full disk

def test_a_second_process_on_a_run_folder_is_refused_while_the_first_holds_it(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with sole_writer(run_dir):  # this test's process is the first writer
        done = run_script("sample.py", "--prompt", "a photo", "--model", tiny_model, "--out", run_dir, *SMALL,
                          cwd=tmp_path)
        assert done.returncode == 1 and done.stderr.splitlines() == [
            f"error: another process is writing to {run_dir}; wait for it to finish, or choose another --out"]
        assert list(run_dir.iterdir()) == []
    sample.main(["--prompt", "a photo", "--model", tiny_model, "--out", str(run_dir), *SMALL])  # released
    assert (run_dir / "a-photo_0.png").is_file()


def answer_ctrl_c():
    """In the child: SIGINT as a terminal delivers it. A shell running tests in the background
    ignores SIGINT, the child would inherit that, and Python would then never raise KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted(script, args, cwd, ready, timeout=300):
    """Start `script`, send it Ctrl-C (SIGINT) as soon as ready(stderr so far) is true; returns its
    exit status and stderr."""
    process = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=answer_ctrl_c)
    stderr = []
    reader = threading.Thread(target=partial(stderr.extend, iter(partial(process.stderr.read, 1), "")))
    reader.start()
    began = time.time()
    while not ready("".join(stderr)):
        assert process.poll() is None, "".join(stderr)
        assert time.time() - began < timeout
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    reader.join()
    return process.returncode, "".join(stderr)


@pytest.mark.slow
def test_ctrl_c_while_sampling_says_what_is_saved_exits_130_and_the_same_command_resumes(tiny_model, tmp_path,
                                                                                       monkeypatch):
    n = 300  # enough that the run is still going when Ctrl-C arrives, even on a busy machine
    args = ["--prompt", "a photo", "--n", str(n), "--batch-size", "2", "--model", tiny_model, "--out", "run", *SMALL]
    manifest_file = tmp_path / "run" / "manifest.jsonl"

    def two_images_listed(stderr):
        return manifest_file.exists() and manifest_file.read_text().count("\n") >= 2

    returncode, stderr = interrupted("sample.py", args, tmp_path, two_images_listed)
    assert returncode == 130
    lines = [line for line in stderr.splitlines() if "interrupted" in line or "Traceback" in line]
    listed = manifest(tmp_path / "run")
    assert lines == [f"interrupted: {len(listed)} images of run are saved and listed in its manifest; "
                     "the same command resumes"]
    assert 2 <= len(listed) < n and all((tmp_path / "run" / r["file"]).is_file() for r in listed)
    times = {r["file"]: (tmp_path / "run" / r["file"]).stat().st_mtime_ns for r in listed}

    monkeypatch.chdir(tmp_path)
    sample.main(args)
    assert [r["seed"] for r in manifest(tmp_path / "run")] == list(range(n))
    assert {f: (tmp_path / "run" / f).stat().st_mtime_ns for f in times} == times  # nothing made twice


@pytest.mark.slow
def test_ctrl_c_while_training_keeps_finished_directions_and_the_same_command_resumes(tiny_model, tmp_path):
    args = ["--concept", "gender", "--trajectories", "12", "--steps", "4", "--resolution", "32",
            "--model", tiny_model, "--out", str(tmp_path / "directions")]
    male, female = (tmp_path / "directions" / f"gender-{v}.safetensors" for v in ("male", "female"))

    def training_the_second(stderr):
        return "gender-female:" in stderr  # its progress bar is up: gender-male is written

    returncode, stderr = interrupted("train.py", args, tmp_path, training_the_second)
    assert returncode == 130
    lines = [line for line in stderr.splitlines() if "interrupted" in line or "Traceback" in line]
    assert lines == ["interrupted: gender-female was not finished and nothing of it is written; gender-male saved; "
                     "the same command resumes"]
    assert not female.exists()
    written = male.stat().st_mtime_ns

    train.main(args)  # keeps gender-male, trains gender-female
    assert male.stat().st_mtime_ns == written
    assert sr.load_direction(female)[1]["trajectories"] == 12


def test_a_save_that_fails_at_the_end_leaves_the_direction_where_the_error_says(tiny_model, pipe, tmp_path,
                                                                                 monkeypatch):
    out = tmp_path / "directions"
    save = directions.save_direction

    def disk_full_in_out(path, direction, metadata):
        if Path(path).parent == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        save(path, direction, metadata)

    monkeypatch.setattr(directions, "save_direction", disk_full_in_out)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.raises(UserError) as error:
        train.main(["--erase", "nudity", "--model", tiny_model, "--trajectories", "1", "--steps", "3",
                    "--resolution", "32", "--out", str(out)])
    message = str(error.value)
    assert message.startswith(f"cannot write {out / 'nudity.safetensors'} (No space left on device); "
                              "the trained nudity is saved in ")
    rescue = Path(message.split(" is saved in ")[1].removesuffix(" instead"))
    assert rescue.parent == tmp_path / "tmp"
    assert sorted(p.name for p in rescue.iterdir()) == ["nudity.loss.csv", "nudity.safetensors"]
    assert not list(out.glob("*.safetensors"))

    direction, _ = sr.load_direction(rescue / "nudity.safetensors")
    expected = sr.Direction(32, seed=0)
    for _ in sr.train(pipe, expected, sr.erase("nudity"), [("an image of nudity", 0)], steps=3, resolution=32):
        pass
    torch.testing.assert_close(direction.B, expected.B.detach(), rtol=1e-6, atol=1e-6)
    assert expected.B.abs().max() > 0


def test_a_full_disk_while_sampling_keeps_what_is_saved_and_the_same_command_resumes(tiny_model, tmp_path,
                                                                                     monkeypatch):
    run_dir = tmp_path / "run"
    args = ["--prompt", "a photo", "--n", "6", "--batch-size", "2", "--model", tiny_model, "--out", str(run_dir),
            *SMALL]
    save, calls = runs.save_images, []

    def full_after_one_batch(out, images, *rest, **options):
        calls.append(len(images))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / images[0]["file"]))
        save(out, images, *rest, **options)

    monkeypatch.setattr(runs, "save_images", full_after_one_batch)
    with pytest.raises(UserError) as error:
        sample.main(args)
    assert str(error.value) == (f"cannot write {run_dir / 'a-photo_2.png'} (No space left on device); 2 images of "
                                f"{run_dir} are saved and listed in its manifest; the same command resumes once "
                                "it can write")
    assert [r["seed"] for r in manifest(run_dir)] == [0, 1]
    monkeypatch.setattr(runs, "save_images", save)
    sample.main(args)
    assert [r["seed"] for r in manifest(run_dir)] == list(range(6))
