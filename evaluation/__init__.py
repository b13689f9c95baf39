"""The measures evaluate.py applies to run folders, one module per measure.

What they share: clip.py (batched, normalised CLIP embeddings) and reports.py (a run's manifest
and settings in; reports, plain tables and charts out).
"""
