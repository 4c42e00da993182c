"""The semi-supervised pipeline without Prefect: the work dir's layout (:mod:`.workdir`), the stages' typed
settings (:mod:`.params`) and the pipeline's error (:mod:`.errors`). The Prefect flows in ``flows/`` decorate
and compose these."""
