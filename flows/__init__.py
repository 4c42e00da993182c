"""Prefect flows of the semi-supervised pipeline: decorators and task calls around ``i3cl_core.pipeline``.

Flows (each with a ``default`` deployment, see ``flows/serve.py`` and ``prefect.yaml``):
``ssl-pipeline`` (the parent) calls ``train-teachers``, ``ensemble-inference``,
``fuse-pseudo-labels``, ``train-student`` and ``evaluate`` as subflows.
"""
