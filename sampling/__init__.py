"""Samplers shared by sample.py and the training scripts' in-loop grids."""
