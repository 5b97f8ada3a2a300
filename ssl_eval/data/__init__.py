"""Datasets, preprocessing and splits."""
