"""Concept names in any script, damaged or foreign direction files, failed starts, and property-based
tests of the readers of untrusted input: a valid result or one UserError line, never a traceback."""

import errno
import json
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import runs
import saferegion as sr
import sample
import train
from conftest import run_script
from directions import read_direction
from inputs import UserError, file_name, parse_window, read_prompts, read_seed
from runs import read_jsonl

BUDGET = settings(max_examples=60, deadline=None, derandomize=True)
SMALL = ["--resolution", "32", "--steps", "2"]


def test_a_concept_in_another_script_keeps_its_letters_and_reads_back(tiny_model, tmp_path, capsys):
    train.main(["--erase", "насилие, кровь", "--model", tiny_model, "--trajectories", "1", *SMALL,
                "--out", str(tmp_path / "d")])
    printed = capsys.readouterr().out.split("wrote ")[1].split(" (")[0]
    assert printed == str(tmp_path / "d" / "насилие-кровь.safetensors")
    sample.main(["--prompt", "a photo", "--model", tiny_model, "--direction", printed, *SMALL,
                 "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "a-photo_0.png").exists()
    assert [file_name(t) for t in ("暴力", "nudité", "violence, blood")] == ["暴力", "nudité", "violence-blood"]


def test_an_argument_that_is_not_utf8_stops_in_one_line(tiny_model, tmp_path):
    with pytest.raises(UserError, match=r"^--erase holds bytes that are not UTF-8 text \(0xe9\)"):
        train.main(["--erase", "nudit\udce9", "--model", tiny_model, *SMALL, "--out", str(tmp_path / "d")])


def save(path, tensors=None, **metadata):
    direction = sr.Direction(32)
    tensors = tensors or {k: v.detach().contiguous() for k, v in direction.named_parameters()}
    save_file(tensors, path, metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return path


DAMAGED = {
    "a window that is not two steps": ({"steer_window": {"a": 1}}, "metadata steer_window is {\"a\": 1}"),
    "a backwards window": ({"steer_window": [40, 10]}, "metadata steer_window is [40, 10]"),
    "a beta that is text": ({"beta": "strong"}, 'metadata beta is "strong", not a finite number'),
    "an unknown family": ({"family": "sd9"}, 'metadata family is "sd9", not one of sd1, sd2, sdxl'),
    "integer tensors": ({"tensors": {"A": torch.zeros(1, 32, dtype=torch.int32), "B": torch.zeros(77, 1)}},
                        "tensor A is torch.int32"),
    "an extra tensor": ({"tensors": {"A": torch.zeros(1, 32), "B": torch.zeros(77, 1), "C": torch.zeros(2)}},
                        "tensors A, B, C"),
    "shapes that do not fit": ({"tensors": {"A": torch.zeros(2, 32), "B": torch.zeros(77, 1)}},
                               "tensor B does not fit the others (A 2x32, B 77x1)"),
}


@pytest.mark.parametrize("case", DAMAGED, ids=list(DAMAGED))
def test_a_damaged_direction_stops_in_one_line_naming_the_field_before_anything_is_made(case, tiny_model,
                                                                                          tmp_path):
    fields, message = DAMAGED[case]
    path = save(tmp_path / "d.safetensors", **fields)
    with pytest.raises(UserError) as error:
        sample.main(["--prompt", "a photo", "--model", tiny_model, "--direction", str(path), *SMALL,
                     "--out", str(tmp_path / "run")])
    assert str(error.value).startswith(f"direction {path}: ") and message in str(error.value)
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()


def test_a_run_that_stops_before_its_first_image_leaves_no_run_folder(tiny_model, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise UserError("no memory")
    monkeypatch.setattr(sr, "generate", out_of_memory)
    with pytest.raises(UserError):
        sample.main(["--prompt", "a photo", "--model", tiny_model, *SMALL, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@BUDGET
@given(st.text(max_size=12))
def test_any_window_string_is_a_window_or_one_error_line(text):
    try:
        start, end = parse_window(text)
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert 1 <= start <= end <= 50


@BUDGET
@given(st.text(max_size=24))
def test_any_seed_cell_is_a_seed_or_a_value_error(text):
    try:
        seed = read_seed(text)
    except ValueError:
        return
    assert type(seed) is int and 0 <= seed < 2**64


@BUDGET
@given(st.dictionaries(st.sampled_from(["steer_window", "beta", "family", "rank", "keep", "concept", "x"]),
                       st.one_of(st.text(max_size=8), st.integers(), st.floats(), st.lists(st.integers(), max_size=3),
                                 st.none()), max_size=4))
def test_any_direction_metadata_reads_or_stops_in_one_line(tmp_path_factory, metadata):
    path = save(tmp_path_factory.mktemp("d") / "d.safetensors", **metadata)
    try:
        state, read = read_direction(path)
    except UserError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    assert set(state) == {"A", "B"} and isinstance(read, dict)


CELLS = st.one_of(st.text(max_size=10), st.sampled_from(["1", "17.0", "-1", "inf", "nan", "1e30", str(2**64), "7.5"]))
COLUMN_NAMES = st.sampled_from(["prompt", "evaluation_seed", "evaluation_guidance", "categories", "case_number",
                                "adv_prompt", "sd_seed", "x", ""]) | st.text(st.sampled_from('ab,\n"é'), max_size=6)


@BUDGET
@given(st.lists(COLUMN_NAMES, min_size=1, max_size=4), st.lists(st.lists(CELLS, max_size=5), max_size=4),
       st.binary(max_size=8), st.integers(1, 3) | st.none(), st.sampled_from([(), ("sexual",)]))
def test_any_prompt_csv_gives_rows_or_one_error_line(tmp_path_factory, header, rows, noise, limit, categories):
    import csv
    import io
    text = io.StringIO()
    csv.writer(text).writerows([header, *rows])
    path = tmp_path_factory.mktemp("csv") / "p.csv"
    path.write_bytes(text.getvalue().encode() + noise)
    try:
        read = read_prompts(path, limit, categories=categories)
    except UserError as e:
        assert "\n" not in str(e) and "\r" not in str(e), str(e)
        return
    for row in read:
        assert isinstance(row["prompt"], str)
        assert "seed" not in row or 0 <= row["seed"] < 2**64
        assert "guidance" not in row or math.isfinite(row["guidance"])


@BUDGET
@given(st.lists(st.one_of(st.text(max_size=12), st.sampled_from(['{"file": "a.png"}', '{"file"', "[1]", "{}"])),
                max_size=5), st.booleans())
def test_any_manifest_gives_records_or_one_error_line(tmp_path_factory, lines, final_newline):
    path = tmp_path_factory.mktemp("run") / "manifest.jsonl"
    path.write_text("\n".join(lines) + ("\n" if final_newline else ""), encoding="utf-8", errors="surrogatepass")
    try:
        records = read_jsonl(path, "fix it", key="file")
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert all(isinstance(r, dict) and "file" in r for r in records)


NAMES = st.sampled_from(["A", "B", "offset", "pooled_A", "pooled_B", "pooled_offset", "a", "x"])
TENSORS = st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype),
                    st.lists(st.integers(0, 4), max_size=3).map(tuple),
                    st.sampled_from([torch.float32, torch.float16, torch.int32, torch.bool]))


@BUDGET
@given(st.dictionaries(NAMES, TENSORS, min_size=1, max_size=4), st.sampled_from([".safetensors", ".pth"]))
def test_any_tensors_in_a_direction_file_read_or_stop_in_one_line(tmp_path_factory, tensors, suffix):
    path = tmp_path_factory.mktemp("d") / f"d{suffix}"
    if suffix == ".pth":
        torch.save({k.lower(): v for k, v in tensors.items()}, path)
    else:
        save_file(tensors, path)
    try:
        direction, _ = sr.load_direction(path)
    except UserError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    offset = direction()
    assert offset.dim() == 2 and offset.dtype == torch.float32


@BUDGET
@given(st.binary(max_size=64), st.sampled_from([".safetensors", ".pth", ".csv"]))
def test_any_bytes_as_a_direction_or_a_prompt_file_stop_in_one_line(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("f") / f"f{suffix}"
    path.write_bytes(data)
    try:
        read_prompts(path) if suffix == ".csv" else sr.load_direction(path)
    except UserError as e:
        assert "\n" not in str(e)


def test_a_foreign_pth_stops_in_one_line_without_the_libraries_warnings(tiny_model, tmp_path):
    import pickle
    with open(tmp_path / "pickled.pth", "wb") as f:  # plain pickle: torch warns about its protocol
        pickle.dump({"a": torch.zeros(1, 1, 32), "b": torch.zeros(1, 77, 1)}, f)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "script.pth")  # torch warns: TorchScript
    for name in ("pickled.pth", "script.pth"):
        done = run_script("sample.py", "--prompt", "a photo", "--model", tiny_model, "--direction", name, *SMALL,
                          cwd=tmp_path)
        assert done.returncode == 1
        assert done.stderr.strip() == f"error: cannot read direction {name}: not a direction file (" + \
            ("UnpicklingError)" if name == "pickled.pth" else "RuntimeError)"), done.stderr
        assert not (tmp_path / "samples").exists()


def test_a_first_image_that_cannot_be_written_leaves_no_run_folder(tiny_model, tmp_path, monkeypatch):
    def disk_full(out, images, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / images[0]["file"]))
    monkeypatch.setattr(runs, "save_images", disk_full)
    with pytest.raises(UserError, match="No space left on device"):
        sample.main(["--prompt", "a photo", "--model", tiny_model, *SMALL, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_forced_run_that_stops_before_its_first_image_leaves_the_old_run_as_it_was(tiny_model, tmp_path,
                                                                                     monkeypatch):
    run = tmp_path / "run"
    sample.main(["--prompt", "a photo", "--model", tiny_model, *SMALL, "--out", str(run)])
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def out_of_memory(*args, **kwargs):
        raise UserError("no memory")
    monkeypatch.setattr(sr, "generate", out_of_memory)
    with pytest.raises(UserError):
        sample.main(["--prompt", "a photo", "--model", tiny_model, *SMALL, "--seed", "7", "--force", "--out", str(run)])
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
