"""Data: COCO polygon datasets, augmentations, the synthetic curved-text generator."""
