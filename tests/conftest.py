import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub id must fail fast, here and in the scripts we start
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import saferegion  # noqa: E402
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny SD v1.x pipeline folder (text width 32), as a user's local model would be."""
    return tiny.save_pipeline(tmp_path_factory.mktemp("tiny32"), width=32)


@pytest.fixture(scope="session")
def tiny_model_768(tmp_path_factory):
    """The same, with SD v1.x's text width of 768, for the authors' released direction."""
    return tiny.save_pipeline(tmp_path_factory.mktemp("tiny768"), width=768)


@pytest.fixture(scope="session")
def pipe(tiny_model):
    return saferegion.load_pipeline(tiny_model)


@pytest.fixture(scope="session")
def pipe64(tiny_model):
    """The tiny pipeline in float64, so that comparisons with hand-written loops can be tight.

    In float32, batched and separate U-Net calls round differently (~5e-6 in A after 6 steps,
    ~1.4e-5 after 50), and Adam, dividing by the gradient's size, carries that forward."""
    return saferegion.load_pipeline(tiny_model, dtype=torch.float64)


LAUNCHER = {}


def run_script(script, *args, cwd, timeout=600):
    """One of the project's scripts as a user runs it, in a process of its own with this process's
    environment; returns the CompletedProcess. The process is forked by tests/launcher.py, which has
    imported torch already: the same run, a second sooner."""
    if "process" not in LAUNCHER or LAUNCHER["process"].poll() is not None:  # first, or after a timeout
        LAUNCHER.setdefault("folder", Path(tempfile.mkdtemp(prefix="launcher-")))
        LAUNCHER["process"] = subprocess.Popen([sys.executable, str(ROOT / "tests" / "launcher.py")], text=True,
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    process, out, err = LAUNCHER["process"], LAUNCHER["folder"] / "stdout", LAUNCHER["folder"] / "stderr"
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    process.stdin.write(json.dumps({"script": command[1], "args": command[2:], "cwd": str(cwd),
                                    "env": dict(os.environ), "stdout": str(out), "stderr": str(err)}) + "\n")
    process.stdin.flush()
    if not select.select([process.stdout], [], [], timeout)[0]:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and the script it runs
        process.wait()
        raise subprocess.TimeoutExpired(command, timeout)
    status = int(process.stdout.readline())
    return subprocess.CompletedProcess(command, status, out.read_text(), err.read_text())


@contextmanager
def recorded_unet_inputs(unet):
    """The text embeddings (encoder_hidden_states) the U-Net is given inside the block, one per call."""
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].clone())

    hook = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """A study test is slow too, so that the quick loop's -m "not slow" (which replaces the default
    -m "not study") leaves it out."""
    for item in items:
        if item.get_closest_marker("study"):
            item.add_marker(pytest.mark.slow)

# -----------------------------------------------------------------------------
# World 1 of the toy world, measured by toyworld.py in the background while the rest of the suite runs

WORLD_1 = {}


def pytest_collection_finish(session):
    """Start `python toyworld.py --seed 1 --methods plain,ours` as soon as a test that needs it is
    selected: its minutes on one core then run beside the other tests, not after them."""
    if WORLD_1 or not any("world_1_lines" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    folder = Path(tempfile.mkdtemp(prefix="toyworld-1-"))
    output = open(folder / "output.txt", "w")
    WORLD_1.update(folder=folder, output=output, process=subprocess.Popen(
        [sys.executable, str(ROOT / "toyworld.py"), "--seed", "1", "--methods", "plain,ours", "--out", str(folder)],
        stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}))


def pytest_sessionfinish(session, exitstatus):
    if LAUNCHER:
        LAUNCHER["process"].stdin.close()  # the launcher ends at the end of its input
        LAUNCHER["process"].wait()
        shutil.rmtree(LAUNCHER["folder"], ignore_errors=True)
    if WORLD_1:
        if WORLD_1["process"].poll() is None:
            WORLD_1["process"].kill()
            WORLD_1["process"].wait()
        WORLD_1["output"].close()
        shutil.rmtree(WORLD_1["folder"], ignore_errors=True)


@pytest.fixture(scope="session")
def world_1_lines():
    """{method: {figure: value}} from the lines toyworld.py printed for world 1."""
    text = lambda: (WORLD_1["folder"] / "output.txt").read_text()  # noqa: E731
    assert WORLD_1["process"].wait(timeout=1800) == 0, text()[-3000:]
    found = {}
    for line in text().splitlines():
        if line.startswith("toyworld seed=1 method="):
            fields = dict(field.split("=") for field in line.split()[2:])  # after "toyworld seed=1"
            method = fields.pop("method")
            found[method] = {key: float(value) for key, value in fields.items()}
    return found
