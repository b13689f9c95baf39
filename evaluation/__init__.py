"""The measures evaluate.py applies to run folders, one module per measure.

    nsfw.py     NudeNet's detections, its v2 classifier and Q16, under each paper's rule (RULES)
    bias.py     zero-shot attribute per image, deviation ratio per profession
    quality.py  CLIP score against each image's prompt, FID against real images (clean-fid)
    table.py    the field's comparison table: a row per method, a column per prompt set

and what they share: clip.py (batched, normalised CLIP embeddings) and reports.py (a run's
manifest and settings in; reports, plain tables and charts out).
"""
