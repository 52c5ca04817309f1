"""Sample-quality metrics: feature detectors (`detectors.py`) and the statistics computed on their features
(`stats.py`: Fréchet distance, KID, precision/recall)."""
