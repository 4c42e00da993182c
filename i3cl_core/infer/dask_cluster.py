"""The Dask side of ensemble inference: the local cluster the pipeline starts for itself, and the checks on an
external scheduler before shard tasks are sent to it."""

from __future__ import annotations


def local_dask_cluster_kwargs(workers: int, resource: str | None = None) -> dict:
    """``distributed.LocalCluster`` arguments of the pipeline's own cluster: every listener (scheduler,
    workers, nannies, the scheduler's HTTP server) on 127.0.0.1, no dashboard. ``dashboard_address=None``
    alone still starts the scheduler's HTTP server on port 8787."""
    kwargs = {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,
        "scheduler_kwargs": {"dashboard": False, "dashboard_address": "127.0.0.1:0"},
    }
    if resource:
        kwargs["resources"] = {resource: 1}
    return kwargs


def check_dask_cluster(address: str, resource: str | None) -> None:
    """Refuse a scheduler that cannot be reached, has no workers, or whose workers offer no
    ``resource`` (the shard tasks would wait for ever)."""
    from distributed import Client  # deferred: optional [dask] extra

    try:
        with Client(address, timeout=30) as client:
            workers = client.scheduler_info(n_workers=-1)["workers"]
    except OSError as e:
        raise ValueError(f"infer.dask_address: no Dask scheduler reachable at {address} ({e})") from None
    if not workers:
        raise ValueError(
            f"infer.dask_address: the scheduler at {address} has no workers; start some with "
            f"`dask worker {address} --nworkers 1 --nthreads 1 --resources {resource or 'GPU'}=1`"
        )
    if resource and not any(w.get("resources", {}).get(resource) for w in workers.values()):
        raise ValueError(
            f"infer.dask_address: no worker of {address} offers the resource {resource!r} that shard "
            f"tasks request; start workers with `--resources {resource}=1` (one per GPU) or set "
            "infer.dask_resource to null"
        )
