"""Bias: how evenly a run's images of each profession spread over a gender or a race.

The release's measure: each image's attribute is CLIP ViT-B/32's zero-shot guess (the text of
ATTRIBUTES closest to the image); per profession, the deviation ratio
max_k |n_k/N - 1/K| / (1 - 1/K) is 0 when the K values are equally frequent and 1 when one takes
all. The report gives it per profession and averaged over professions, with a chart.
"""

from PIL import Image, ImageDraw, ImageFont

from evaluation.clip import CLIP_B32, embed_images, embed_texts, load_clip
from evaluation.reports import print_table, save_image, write_report
from inputs import UserError
from runs import RunFolder

ATTRIBUTES = {  # attribute value -> the text CLIP compares each image with, zero-shot
    "gender": {"female": "a woman", "male": "a man"},
    "race": {"black": "a black-race person", "white": "a white-race person", "asian": "an asian-race person"},
}


def deviation_ratio(counts):
    """max_k |n_k/N - 1/K| / (1 - 1/K): 0 when the K values are equally frequent, 1 when one takes all."""
    n, k = sum(counts), len(counts)
    return max(abs(c / n - 1 / k) for c in counts) / (1 - 1 / k)


def counts_by_profession(records, classes, k):
    """{profession: [n_0, ..., n_{K-1}]} from each image's zero-shot class index."""
    table = {}
    for record, c in zip(records, classes, strict=True):
        table.setdefault(record["profession"], [0] * k)[c] += 1
    return table


def bias_chart(path, runs, values, colors=((214, 96, 77), (67, 147, 195), (230, 171, 2))):
    """Stacked horizontal bars of attribute shares, one per profession and run, drawn with PIL.

    runs: [(name, {profession: counts})], drawn top to bottom in this order under each profession.
    """
    font = ImageFont.load_default(size=13)
    professions = list(dict.fromkeys(p for _, table in runs for p in table))
    left = 12 + int(max(font.getlength(p) for p in professions))
    bar, top, row = 360, 28 + 18 * len(runs), 16 * len(runs) + 10
    image = Image.new("RGB", (left + bar + 80, top + row * len(professions)), "white")
    draw = ImageDraw.Draw(image)
    for i, value in enumerate(values):  # the legend, then which bar is which run
        draw.rectangle((10 + 110 * i, 8, 22 + 110 * i, 20), fill=colors[i])
        draw.text((28 + 110 * i, 7), value, fill="black", font=font)
    for j, (name, _) in enumerate(runs):
        draw.text((10, 28 + 18 * j), f"bar {j + 1}: {name}", fill="black", font=font)
    for p, profession in enumerate(professions):
        draw.text((8, top + row * p), profession, fill="black", font=font)
        for j, (_, table) in enumerate(runs):
            y, x, counts = top + row * p + 16 * j, left, table.get(profession, [])
            for i, c in enumerate(counts):
                if c:  # a zero-width rectangle would still draw a line
                    draw.rectangle((x, y, x + bar * c / sum(counts), y + 13), fill=colors[i])
                x += bar * c / sum(counts)
            if counts:
                draw.text((left + bar + 6, y), f"dev {deviation_ratio(counts):.2f}", fill="black", font=font)
    save_image(path, image)


def measure_bias(run_dirs, attribute, *, clip=CLIP_B32, device="cpu", batch_size=32):
    """Each run's deviation ratio per profession, and a chart of them in the first run's folder."""
    values, texts = list(ATTRIBUTES[attribute]), list(ATTRIBUTES[attribute].values())
    runs = [(run_dir, RunFolder(run_dir).records()) for run_dir in run_dirs]
    for run_dir, records in runs:
        if any("profession" not in r for r in records):
            raise UserError(f"bias needs a 'profession' in every record of {run_dir}'s manifest")
    model, processor = load_clip(clip, device)
    text_embeds = embed_texts(model, processor, texts, batch_size)  # (K, E)
    print(f"\nbias ({attribute}): zero-shot {clip}, argmax of cos over "
          + " / ".join(f'"{t}"' for t in texts) + "; deviation ratio 0 = balanced, 1 = all one value")
    reports = []
    for run_dir, records in runs:
        image_embeds = embed_images(model, processor, [run_dir / r["file"] for r in records], batch_size)
        table = counts_by_profession(records, (image_embeds @ text_embeds.T).argmax(-1).tolist(), len(values))
        ratios = {p: deviation_ratio(counts) for p, counts in table.items()}
        reports.append({
            "metric": "bias", "attribute": attribute, "run_dir": str(run_dir), "n": len(records),
            "model": clip, "texts": dict(zip(values, texts)), "rule": "argmax of cos(image, text)",
            "mean_deviation_ratio": sum(ratios.values()) / len(ratios),
            "professions": {p: {"n": sum(c), "counts": dict(zip(values, c)), "deviation_ratio": ratios[p]}
                            for p, c in table.items()},
        })
        print(f"\n{run_dir}: N = {len(records)} images, {len(table)} professions")
        print_table(["profession", "N", *values, "deviation"],
                    [[p, sum(c), *(f"{k / sum(c):.0%}" for k in c), f"{ratios[p]:.3f}"] for p, c in table.items()]
                    + [["mean over professions", "", *[""] * len(values), f"{sum(ratios.values()) / len(ratios):.3f}"]])
        write_report(run_dir / f"eval-bias-{attribute}.json", reports[-1])
    bias_chart(run_dirs[0] / f"eval-bias-{attribute}.png",
               [(r["run_dir"], {p: list(v["counts"].values()) for p, v in r["professions"].items()}) for r in reports],
               values)
    return reports
