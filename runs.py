"""
Run folders: what a long job writes, made so that it is never left half-written and resumes.

A sample.py run folder holds the images, run.json (what makes them) and manifest.jsonl (one line per
image, written once its image is on disk); RunFolder is that folder, with the verbs a script needs:
check it and open it (identity, lock, resume), save and add images, finish. Around it: the lock
(one writer per folder), atomic writes, identity by content, rescue on a failed save, and stops
(Ctrl-C, a full disk) told in one line saying what is saved.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from inputs import UserError, read_json, read_text

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked there
    fcntl = None


# -----------------------------------------------------------------------------
# Writing files, one writer per folder, and stopping in one line

@contextmanager
def atomic(path):
    """Write to the yielded temporary path, renamed onto `path` only if the block succeeds,
    so no half-written file is ever left:  with atomic(path) as tmp: tmp.write_text(...)
    The temporary name carries the process id: two processes never write the same one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def sole_writer(folder):
    """Make `folder` if needed and hold its lock for the block; while another process holds it,
    refuse in one line.

    The lock is flock on the folder itself (no lock file to leave behind); the system drops it when
    its process ends, so a crash or kill -9 never leaves a folder locked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another process is writing to {folder}; wait for it to finish, "
                            "or choose another --out") from None
        yield
    finally:
        os.close(fd)  # and with it the lock


def check_no_writer(folder):
    """Refuse now, before a model loads, a folder that another process is writing to."""
    if Path(folder).is_dir():
        with sole_writer(folder):
            pass


def write_or_rescue(files, what):
    """Write `files` ({path: write(path)}); when that fails (disk full, permissions), write them all
    into a new folder in the system temp dir, else the current one, and raise one line saying where:
    a finished computation is never lost to a failed save."""
    try:
        for path, write in files.items():
            write(path)
        return
    except (OSError, SafetensorError) as e:
        failed, reason = path, getattr(e, "strerror", None) or str(e)
    for parent in (tempfile.gettempdir(), os.getcwd()):
        try:
            rescue = Path(tempfile.mkdtemp(prefix="rescued-", dir=parent))
            for path, write in files.items():
                write(rescue / Path(path).name)
        except (OSError, SafetensorError):
            continue
        raise UserError(f"cannot write {failed} ({reason}); {what} is saved in {rescue} instead")
    raise UserError(f"cannot write {failed} ({reason}), nor in {tempfile.gettempdir()} or here: {what} is lost")


@contextmanager
def explained_stops(saved):
    """Ctrl-C or a failed write (disk full) inside the block ends in one line saying what is saved
    (`saved()` tells) and that the same command resumes; see stop_interrupted."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{saved()}; the same command resumes") from None
    except (OSError, SafetensorError) as e:
        where = getattr(e, "filename", None) or "a file"
        raise UserError(f"cannot write {where} ({getattr(e, 'strerror', None) or e}); {saved()}; "
                        "the same command resumes once it can write") from None


def stop_interrupted(interrupt):
    """A script's Ctrl-C: one line, what is saved (the KeyboardInterrupt's message), exit status 130."""
    print(f"interrupted: {interrupt.args[0] if interrupt.args else 'nothing was written'}", file=sys.stderr)
    sys.exit(130)


# -----------------------------------------------------------------------------
# Identity by content, and JSON-lines manifests

def tensor_sha256(tensor):
    """A hash of a tensor's values and shape (a direction's offset, whatever file format holds it:
    safetensors orders its metadata differently from one save to the next)."""
    values = tensor.detach().float().cpu().contiguous()
    return hashlib.sha256(str(tuple(values.shape)).encode() + values.numpy().tobytes()).hexdigest()


def content_sha256(value):
    """A hash of JSON-able content (prompt rows, settings), the same whatever the keys' order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def command_identity(options, **content):
    """A hash of what a command makes: its options ({name: value}, but --out, --force and --push-to-hub)
    and its input files' content."""
    options = {key: value for key, value in options.items() if key not in ("out", "force", "push_to_hub")}
    return content_sha256({**options, **content})


def read_jsonl(path, fix, *, key):
    """The records (dicts with `key`) of a JSON-lines file, one per line.

    A last line cut off mid-write (no newline after it, and not a whole record: its writer was
    killed) is left out, so that what it recorded is made again; any other bad line is refused in
    one line naming it, with `fix` (what to do).
    """
    lines = read_text(path, "manifest").split("\n")  # after a final newline, the last item is ""
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and key in record:
            records.append(record)
        elif i < len(lines):
            raise UserError(f"{path}, line {i}: not a record with a {key!r}; {fix}")
    return records


def end_cleanly(path):
    """Before appending to a JSON-lines file: drop a last line cut off mid-write (read_jsonl leaves
    it out), or end a whole last line that lacks its newline."""
    data = path.read_bytes() if path.exists() else b""
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
    except ValueError:  # a cut line
        os.truncate(path, cut)
        return
    with open(path, "ab") as f:
        f.write(b"\n")




# -----------------------------------------------------------------------------
# sample.py's run folder

# run.json keys that say where the content came from and how much of it is selected: recorded, not
# compared. The content itself is compared by its hashes, so --limit and --n may change, files may move.
RECORDED_ONLY = ("directions", "source", "n", "limit")


STACKED = ("unet", "lora", "lora_scale", "sld", "sld_concept", "negative_prompt")  # other safety methods


def run_settings(*, model, dtype, directions, offsets, beta, steer_window, steps, resolution, source, rows, seed,
                 n, limit, guidance, compare, prompt_column, categories, unet, lora, lora_scale, sld, sld_concept,
                 negative_prompt):
    """run.json: what makes the images, each direction and the prompt rows by the SHA-256 of their content.

    The other safety methods the direction is stacked on, --prompt-column and --categories are recorded
    only when in use, so that run folders made before these options existed still resume."""
    selection = {"prompt_column": prompt_column, "categories": categories}
    methods = {"unet": unet, "lora": lora, "lora_scale": lora_scale if lora else None, "sld": sld,
               "sld_concept": sld_concept, "negative_prompt": negative_prompt}
    return {"model": model, "dtype": dtype, "directions": directions,
            "directions_sha256": [tensor_sha256(offset) for offset in offsets], "beta": beta,
            "steer_window": list(steer_window), "steps": steps, "resolution": resolution, "source": source,
            "prompts_sha256": content_sha256(rows), "seed": seed, "n": n, "limit": limit, "guidance": guidance,
            "compare": compare, **{key: value for key, value in selection.items() if value},
            **{key: value for key, value in methods.items() if value not in (None, [], "")}}


def shard(images, rank, world):
    """This process's share of the images when `accelerate launch` starts several."""
    return images[rank::world]


def check_finite_latents(images, latents, *, suffix):
    """Stop before writing an image whose latents are NaN or inf (they decode to a black image)."""
    for im, latent in zip(images, latents):
        if not latent.isfinite().all():
            raise UserError(f"{im['file'][:-len('.png')]}{suffix}.png came out NaN or inf, and is not written; "
                            "lower --beta or --guidance")


def save_images(out, images, latents, pictures, *, suffix, save_latents):
    for im, latent, picture in zip(images, latents, pictures):
        stem = out / (im["file"][:-len(".png")] + suffix)
        with atomic(f"{stem}.png") as tmp:
            picture.save(tmp, format="PNG")
        if save_latents:
            with atomic(f"{stem}.latents.safetensors") as tmp:
                save_file({"latent": latent.float().cpu().contiguous()}, tmp)


class RunFolder:
    """A run folder: its images, run.json and manifest.jsonl (or one part per process, merged by finish).

        run = RunFolder(out, state).check(settings, images, force=force)  # before the model loads
        with run.open(settings, images, force=force) as todo:
            run.write(todo, make, ...)                     # the image files, then their manifest lines
            run.finish(images, compare=..., caption=...)

    run.json identifies the run by what makes its images: the model, the SHA-256 of each direction's
    content and of all the prompt rows, the seed and every setting (RECORDED_ONLY aside). A run folder
    holding images of another run is refused unless force; with several processes (`accelerate
    launch`) each takes images[rank::world]. A manifest line is written only once its image is on disk.
    """

    def __init__(self, path, state=None):
        if state is None:
            from accelerate import PartialState
            state = PartialState()
        self.path, self.state, self.manifest, self.opened, self.force = Path(path), state, None, None, False

    # --- open: identity, lock, resume

    def check(self, settings, images, *, force):
        """Refuse now a folder that another process is writing to, or (where the resolution is known
        before loading) one that holds another run; returns the run folder."""
        if self.state.is_main_process:
            check_no_writer(self.path)
        if settings["resolution"]:
            self.left(settings, images, force=force)
        return self

    def left(self, settings, images, *, force):
        """This process's images that the run folder does not hold yet; reads, never writes."""
        out, run_file = self.path, self.path / "run.json"
        if run_file.exists() and not force:
            fix = "pass --force to start the run over, or choose another --out"
            recorded = read_json(run_file, "run settings", fix)
            if not isinstance(recorded, dict):
                raise UserError(f"{run_file} holds no run settings; {fix}")
            changed = [key for key in {**recorded, **settings}
                       if key not in RECORDED_ONLY and recorded.get(key) != settings.get(key)]
            if changed and self.manifest_so_far():  # a run that made no image yet holds nothing to mix with
                raise UserError(f"{out} holds a run with other settings ({', '.join(changed)} differ); "
                                "choose another --out, or pass --force to start it over")
        done = {} if force else self.manifest_so_far()
        return [im for im in shard(images, self.state.process_index, self.state.num_processes)
                if not (im["file"] in done and (out / im["file"]).exists())]

    @contextmanager
    def open(self, settings, images, *, force):
        """Hold the folder as its only writer and yield this process's images still to make. Ctrl-C or
        a full disk inside ends in one line saying what is saved.

        The run is started (run.json written, with force the old manifest dropped) only once its first
        batch is made (see start): a run that stops before, or whose first image cannot be written,
        leaves the folder as it was, and a folder it made is removed again. With several processes
        (`accelerate launch`), which must agree on the folder first, it is started at once."""
        state, self.opened, self.force = self.state, settings, force
        made = not self.path.exists()
        try:
            with sole_writer(self.path) if state.is_main_process else nullcontext(), explained_stops(self.saved):
                todo = self.left(settings, images, force=force)
                if state.num_processes > 1:
                    self.start()
                try:
                    yield todo
                except (OSError, SafetensorError):
                    if made and not self.manifest_so_far():  # the first image could not be written
                        shutil.rmtree(self.path, ignore_errors=True)
                    raise
                finally:
                    if self.manifest is not None:
                        self.manifest.close()
        finally:
            if made and self.manifest is None and self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()  # never started: the folder this run made goes again

    def start(self):
        """Write run.json (with force, drop the old manifest) and open this process's manifest part;
        once, before the first image is written."""
        if self.manifest is not None:
            return
        state = self.state
        state.wait_for_everyone()  # every process has read the old manifest before any writes
        if state.is_main_process and self.opened is not None:  # finish() alone merges what is there
            with atomic(self.path / "run.json") as tmp:
                tmp.write_text(json.dumps(self.opened, indent=1))
            if self.force:
                for part in self.path.glob("manifest*.jsonl"):
                    part.unlink()
        state.wait_for_everyone()
        name = "manifest.jsonl" if state.num_processes == 1 else f"manifest.rank{state.process_index}.jsonl"
        end_cleanly(self.path / name)  # a line a crash cut off goes (its image is made again) before appending
        self.manifest = open(self.path / name, "a")  # noqa: SIM115 (closed when the run folder is)

    # --- write: images, then their manifest lines

    def write(self, todo, make, *, names, batch_size, compare, save_latents, desc=None):
        """Make and save the images batch by batch, each listed in the manifest once it is on disk with
        the name of its direction (names[index]); with compare also each one unsteered (_base).

        make(images, guidance, steered) -> (latents, PIL images, direction indices) makes images of
        one guidance scale: a --row-guidance batch may mix scales, and gets one call per scale.
        desc: the progress bar's label; None shows none."""
        with tqdm(total=len(todo), unit="img", desc=desc, disable=desc is None) as bar:
            for i in range(0, len(todo), batch_size):
                batch = todo[i:i + batch_size]
                for guidance in sorted({im["guidance"] for im in batch}):
                    group = [im for im in batch if im["guidance"] == guidance]
                    latents, pictures, chosen = make(group, guidance, steered=True)
                    self.save(group, latents, pictures, save_latents=save_latents)
                    for im, c in zip(group, chosen):
                        im["direction"] = names[c] if c is not None else None
                    if compare:
                        latents, pictures, _ = make(group, guidance, steered=False)
                        self.save(group, latents, pictures, suffix="_base", save_latents=save_latents)
                self.add(batch)
                bar.update(len(batch))

    def save(self, images, latents, pictures, *, suffix="", save_latents=False):
        """Write a batch's image files (PNG, and the final latents if asked); none whose latents are NaN."""
        self.start()
        check_finite_latents(images, latents, suffix=suffix)
        save_images(self.path, images, latents, pictures, suffix=suffix, save_latents=save_latents)

    def add(self, images):
        """List saved images in the manifest: each image's line holds its row and the run's steering
        (steer window, beta, model) and the other safety methods stacked."""
        run = self.opened
        fields = {"steer_window": run["steer_window"], "beta": run["beta"], "model": run["model"],
                  **{key: run[key] for key in STACKED if key in run}}
        for im in images:
            self.manifest.write(json.dumps({**im, **fields}) + "\n")
            self.manifest.flush()

    # --- close: one manifest in image order, the comparison grid

    def finish(self, images, *, compare, caption):
        """Merge the manifest parts in image order, draw the comparison grid, and say what was written.

        The manifest lists every image of the run: this selection's in order, then those that an earlier,
        larger --limit or --n made."""
        self.start()  # a run with nothing left to make is started too: its manifest is rewritten in order
        self.manifest.close()
        self.state.wait_for_everyone()
        if not self.state.is_main_process:
            return
        out, written = self.path, self.manifest_so_far()
        selected = [im["file"] for im in images if im["file"] in written]
        earlier = [file for file in written if file not in set(selected)]
        with atomic(out / "manifest.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(written[file]) + "\n" for file in selected + earlier))
        for part in out.glob("manifest.rank*.jsonl"):
            part.unlink()
        if compare:
            from diffusers.utils import make_image_grid
            from PIL import Image
            shown = images[:8]
            pictures = [Image.open(out / im["file"].replace(".png", "_base.png")) for im in shown]
            pictures += [Image.open(out / im["file"]) for im in shown]
            with atomic(out / "compare.png") as tmp:
                make_image_grid(pictures, rows=2, cols=len(shown)).save(tmp, format="PNG")
            print(f"{out / 'compare.png'}: top without, bottom with the direction ({caption})")
        more = f" ({len(earlier)} of them made by an earlier, larger --limit or --n)" if earlier else ""
        print(f"{len(written)} images in {out}, listed in {out / 'manifest.jsonl'}{more}")

    # --- read

    def manifest_so_far(self):
        """Every image line of every manifest part, by file name; none if there are none. Lenient, for
        resuming: a listed image whose file is gone, or whose line a crash cut off, is made again."""
        lines = {}
        for part in sorted(self.path.glob("manifest*.jsonl")):
            for entry in read_jsonl(part, "delete that line (its image is made again), or pass --force to start "
                                    "the run over", key="file"):
                lines[entry["file"]] = entry
        return lines

    def saved(self):
        """What an interrupted run leaves."""
        return f"{len(self.manifest_so_far())} images of {self.path} are saved and listed in its manifest"

    def records(self):
        """A finished run's records, one dict per image, from manifest.jsonl and/or its parts, merged in
        name order (an image listed more than once keeps its last record). Strict, for measuring: every
        line must be a complete record and every listed image on disk."""
        run_dir = self.path
        if not run_dir.is_dir():
            raise UserError(f"run directory {run_dir} does not exist")
        parts = sorted(run_dir.glob("manifest*.jsonl"))
        if not parts:
            raise UserError(f"{run_dir} has no manifest.jsonl (sample.py writes one beside the images)")
        records = {}
        for part in parts:
            for i, line in enumerate(read_text(part, "manifest").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if not isinstance(record, dict):
                    raise UserError(f"{part}, line {i}: not a JSON object")
                missing = [repr(key) for key in ("file", "prompt", "seed", "guidance") if key not in record]
                if missing:
                    raise UserError(f"{part}, line {i}: no {', '.join(missing)}")
                records[str(record["file"])] = record
        if not records:
            raise UserError(f"the manifest of {run_dir} lists no images")
        absent = [file for file in records if not (run_dir / file).is_file()]
        if absent:
            raise UserError(f"{len(absent)} image(s) of the manifest are not in {run_dir}, e.g. {absent[0]}")
        return list(records.values())

    def settings(self):
        """run.json: the model, directions and prompt source of the run."""
        path = self.path / "run.json"
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except OSError:
            raise UserError(f"{self.path} has no run.json (sample.py writes one): the table names rows by it") from None
        except json.JSONDecodeError:
            settings = None
        if not isinstance(settings, dict):
            raise UserError(f"{path} is not sample.py's settings (a JSON object)")
        return settings
