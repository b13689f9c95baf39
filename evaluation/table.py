"""The comparison table the field prints: a row per method, a column per prompt set, then FID, CLIP score.

A row is one method (the model and the directions, with what they stack on, read from each run's
run.json); a column is one prompt set, named as the field's tables name it, with its NSFW rate,
attack success rate or detection count under one paper's rule (evaluation.nsfw.RULES; SAFREE's rule
counts UnlearnDiffAtk's prompts at its own threshold). Reports already beside the images under the
same rule are reused; what is missing is measured. The table is printed and written as Markdown,
CSV, JSON and a bar chart.
"""

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from evaluation.clip import CLIP_L14
from evaluation.nsfw import SAFREE_UNLEARNDIFFATK, load_classifier, measure_nsfw, report_name
from evaluation.quality import measure_quality
from evaluation.reports import save_image, save_text
from inputs import UserError
from runs import RunFolder

# Prompt files as the field ships them (file stem) -> the name its tables give the set.
SET_NAMES = {"i2p": "I2P", "i2p_benchmark": "I2P", "i2p-4703": "I2P", "unsafe-prompts4703": "I2P",
             "p4dn_16_prompt": "P4D-N", "p4dk_16_prompt": "P4D-K", "nudity-ring-a-bell": "Ring-A-Bell",
             "mma-diffusion-nsfw-adv-prompts": "MMA-Diffusion", "nudity": "UnlearnDiffAtk",
             "unlearn_diff_nudity": "UnlearnDiffAtk"}
FIELD_ORDER = ("I2P", "I2P-sexual", "P4D", "P4D-N", "P4D-K", "Ring-A-Bell", "MMA-Diffusion", "UnlearnDiffAtk")


# -----------------------------------------------------------------------------
# Naming runs: the prompt set and the method, from run.json

def prompt_set(settings):
    """The prompt set a run generated, as the field's tables name it: "I2P-sexual", "Ring-A-Bell", ..."""
    source = str(settings.get("source") or "?")
    stem = Path(source).stem if Path(source).suffix.lower() == ".csv" else source
    name = "-".join([SET_NAMES.get(stem.lower(), stem), *settings.get("categories", [])])
    return f"{name} ({settings['prompt_column']})" if settings.get("prompt_column") else name


def is_captions(name):
    """COCO caption runs give FID and CLIP score, not an attack success rate."""
    return name.lower().startswith("coco")


def method_label(settings):
    """What a run measured, from its run.json: the model and the directions, with what they stack on."""
    parts = [str(settings.get("model", "?"))]
    parts += [f"U-Net {Path(settings['unet']).name}"] if settings.get("unet") else []
    parts += [f"LoRA {Path(lora).name}" for lora in settings.get("lora", [])]
    parts += [f"SLD {settings['sld']}"] if settings.get("sld") else []
    parts += ["negative prompt"] if settings.get("negative_prompt") else []
    parts += [Path(d).name for d in settings.get("directions", [])]
    beta = settings.get("beta", 1.0)
    return " + ".join(parts) + (f" (beta {beta:g})" if settings.get("directions") and beta != 1 else "")


def run_folders(run):
    """A run folder, or a method's folder holding one run folder per prompt set."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    if any(run.glob("manifest*.jsonl")):
        return [run]
    inside = sorted(p for p in run.iterdir() if p.is_dir() and any(p.glob("manifest*.jsonl")))
    if not inside:
        raise UserError(f"{run} is neither a run folder (manifest.jsonl) nor a folder of run folders")
    return inside


# -----------------------------------------------------------------------------
# The reports behind the cells: reused when they say this rule, measured otherwise

def rule_for_set(rule, name):
    """SAFREE counts UnlearnDiffAtk's prompts at 0.45, every other set at 0.6."""
    if rule.name == "safree" and name == "UnlearnDiffAtk":
        return replace(rule, threshold=SAFREE_UNLEARNDIFFATK)
    return rule


def nsfw_report(run_dir, rule, *, q16, clip, classifier, device, batch_size):
    """The run's report under `rule`, reused when it is there and says this rule, computed otherwise."""
    path = run_dir / report_name(rule)
    if path.is_file():
        report = json.loads(path.read_text(encoding="utf-8"))
        same = report.get("preset") == rule.name and (report.get("nudenet") or report.get("classifier") or {}).get(
            "threshold") == rule.threshold and (report["q16"] is not None) == (q16 is not None)
        if same:
            return report
    return measure_nsfw(run_dir, rule, q16=q16, clip=clip, classifier=classifier, device=device,
                        batch_size=batch_size)


def quality_report(run_dir, *, real, clip, device, batch_size):
    """The run's CLIP score and FID, reused when there and holding the FID asked for, computed otherwise."""
    path = run_dir / "eval-quality.json"
    if path.is_file():
        report = json.loads(path.read_text(encoding="utf-8"))
        if report["fid"] is not None or real is None:
            return report
    return measure_quality(run_dir, real=real, clip=clip, device=device, batch_size=batch_size)


def table_rows(runs, rule, *, q16, real, clip, classifier, device, batch_size):
    """[(run, label, {set: NSFW report}, quality report or None)], reports reused or computed."""
    rows = []
    for run in runs:
        folders = run_folders(run)
        settings = [RunFolder(folder).settings() for folder in folders]
        labels = sorted({method_label(s) for s in settings})
        if len(labels) > 1:
            raise UserError(f"the runs in {run} are of different methods ({' / '.join(labels)}): "
                            "a row of the table is one method")
        reports, quality = {}, None
        for folder, s in zip(folders, settings):
            name = prompt_set(s)
            if is_captions(name):
                if quality is not None:
                    raise UserError(f"{run} holds two caption runs; FID and CLIP score come from one")
                quality = quality_report(folder, real=real, clip=clip, device=device, batch_size=batch_size)
            elif name in reports:
                raise UserError(f"{run} holds two runs of {name}")
            else:
                reports[name] = nsfw_report(folder, rule_for_set(rule, name), q16=q16, clip=clip,
                                            classifier=classifier, device=device, batch_size=batch_size)
        rows.append((str(run), labels[0], reports, quality))
    return rows


# -----------------------------------------------------------------------------
# The table, its files and its chart

def field_order(name):
    """Sets in the order the field's tables print them; others after, as they come."""
    return FIELD_ORDER.index(name) if name in FIELD_ORDER else len(FIELD_ORDER)


def n_label(ns):
    """"N=931" when every cell of a column has the same N, else "N varies" (each cell then gives its own)."""
    ns = sorted(set(ns))
    return f"N={ns[0]}" if len(ns) == 1 else "N varies"


def headline(report):
    """The number a table shows for an NSFW report: the fraction flagged, or MACE's total count."""
    return sum(report["counts"].values()) if report["unit"] == "count" else report["rates"]["all"]["inappropriate"]


def comparison(rows, rule):
    """The table as header, cells (strings), legend lines and the numbers behind it."""
    names = sorted(dict.fromkeys(n for _, _, reports, _ in rows for n in reports), key=field_order)
    unit = {"rate": "rate %", "ASR": "ASR %", "count": "detections"}[rule.unit]
    header, columns, legend = ["run", "model + directions"], [], []
    for name in names:
        cells = [reports.get(name) for _, _, reports, _ in rows]
        texts = sorted({r["rule"] for r in cells if r})
        if len(texts) > 1:
            raise UserError(f"the {name} column would mix rules ({' / '.join(texts)}): measure every run of "
                            f"it with one rule (evaluate.py nsfw RUN --rule {rule.name})")
        ns = [r["n"] for r in cells if r]
        first = next(r for r in cells if r)
        header.append(f"{name} {unit} ({first['preset']}, {rule_for_set(rule, name).passing}, {n_label(ns)})")
        columns.append((name, cells, len(set(ns)) > 1))
        legend.append(f"{name}: {first['preset']} ({first['used_by']}): {first['rule']}; unit {first['unit']}")
    fids = [q["fid"] for _, _, _, q in rows if q and q["fid"]]
    clips = [q for _, _, _, q in rows if q]
    header.append("FID" + (f" ({n_label(f['n'] for f in fids)})" if fids else ""))
    header.append("CLIP score" + (f" ({n_label(q['n'] for q in clips)})" if clips else ""))
    legend += sorted({f"FID: {f['library']}, against {f['real_dir']} ({f['n_real']} real images)" for f in fids})
    legend += sorted({f"CLIP score: {q['clip_score']['model']}, {q['clip_score']['scale']}" for q in clips})
    body, numbers = [], []
    for i, (run, label, reports, quality) in enumerate(rows):
        cells, values = [run, label], {}
        for name, column, varies in columns:
            report = column[i]
            values[name] = headline(report) if report else None
            if report is None:
                cell = "—"
            else:
                cell = f"{values[name]:d}" if rule.unit == "count" else f"{100 * values[name]:.2f}"
            cells.append(cell + (f" (N={report['n']})" if report and varies else ""))
        fid = quality["fid"]["value"] if quality and quality["fid"] else None
        clip = quality["clip_score"]["mean"] if quality else None
        cells += ["—" if fid is None else f"{fid:.2f}", "—" if clip is None else f"{clip:.2f}"]
        body.append(cells)
        numbers.append({"run": run, "label": label, "values": values, "fid": fid, "clip_score": clip,
                        "n": {name: column[i]["n"] for name, column, _ in columns if column[i]}})
    return header, body, legend, numbers


def markdown(header, body, legend):
    def row(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    align = ["---", "---"] + ["---:"] * (len(header) - 2)
    return "\n".join([row(header), row(align), *map(row, body), "", *legend]) + "\n"


def asr_chart(path, labels, names, values, *, title, unit, colors=((214, 96, 77), (67, 147, 195), (230, 171, 2),
                                                                   (102, 166, 30), (117, 112, 179), (166, 118, 29))):
    """Grouped vertical bars drawn with PIL: one group per prompt set, one bar per run (labels), value on top.

    values: [{set: fraction, count or None}] per run; fractions are drawn on 0-100 %, counts on 0-max.
    """
    font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    height, bar, left = 200, 18, 50
    scale = 1.0 if unit != "count" else max([v for run in values for v in run.values() if v] or [1])
    group = max(bar * len(labels) + 16, 16 + int(max(font.getlength(name) for name in names)))
    top = 40 + 18 * len(labels)  # under the title and the legend: which colour is which run
    width = max(left + group * len(names) + 10, 40 + int(max(font.getlength(t) for t in [title, *labels])))
    image = Image.new("RGB", (width, top + height + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black", font=font)
    for j, label in enumerate(labels):
        draw.rectangle((10, 30 + 18 * j, 21, 41 + 18 * j), fill=colors[j % len(colors)])
        draw.text((28, 28 + 18 * j), label, fill="black", font=font)
    base = top + height
    for quarter in range(5):  # grid lines at 0, 25, 50, 75 and 100 % of the scale
        y = base - height * quarter // 4
        draw.line((left, y, width - 10, y), fill="black" if quarter == 0 else (225, 225, 225))
        tick = f"{25 * quarter}%" if unit != "count" else f"{scale * quarter / 4:g}"
        draw.text((left - 6 - font.getlength(tick), y - 8), tick, fill="black", font=font)
    for s, name in enumerate(names):
        x = left + 8 + group * s
        for j, run in enumerate(values):
            if run.get(name) is None:
                continue
            h = round(height * run[name] / scale)
            if h:  # a zero-height rectangle would still draw a line
                draw.rectangle((x + bar * j, base - h, x + bar * (j + 1) - 1, base - 1), fill=colors[j % len(colors)])
            shown = f"{100 * run[name]:.0f}" if unit != "count" else f"{run[name]:g}"
            draw.text((x + bar * j, base - h - 13), shown, fill="black", font=small)
        draw.text((x, base + 6), name, fill="black", font=font)
    save_image(path, image)


def compare(runs, rule, *, out, q16=None, real=None, clip=CLIP_L14, classifier=None, device="cpu", batch_size=32):
    """The table of `runs` under `rule` (a preset): printed, written as OUT.md, .csv, .json and .png; its numbers."""
    if rule.detector == "classifier":
        load_classifier(classifier)  # a missing file stops the table before any work
    rows = table_rows(runs, rule, q16=q16, real=real, clip=clip, classifier=classifier, device=device,
                      batch_size=batch_size)
    header, body, legend, numbers = comparison(rows, rule)
    text = markdown(header, body, legend)
    print("\n" + text)
    out = Path(out)
    save_text(out.with_suffix(".md"), text)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *body])
    save_text(out.with_suffix(".csv"), buffer.getvalue())
    save_text(out.with_suffix(".json"), json.dumps({"rule": rule.name, "header": header, "legend": legend,
                                                    "rows": numbers}, indent=1) + "\n")
    names = [n for n in numbers[0]["values"]] if numbers else []
    if names:
        unit = {"rate": "rate (%)", "ASR": "attack success rate (%)", "count": "detections"}[rule.unit]
        asr_chart(out.with_suffix(".png"), [f"{row['label']} ({row['run']})" for row in numbers], names,
                  [row["values"] for row in numbers], title=f"{unit} per prompt set, rule {rule.name}", unit=rule.unit)
    return numbers
