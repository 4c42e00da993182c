"""I3CL scene text detection with semi-supervised pseudo-labelling (no Prefect imports here)."""

__version__ = "0.1.0"
