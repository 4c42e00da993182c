"""Register a ``default`` deployment for every flow and serve them (long-running):

export PREFECT_API_URL=http://127.0.0.1:4200/api
python -m flows.serve
prefect deployment run 'ssl-pipeline/default' --watch
prefect deployment run 'fuse-pseudo-labels/default' -p work_dir=runs/demo -p 'fuse={"keep_thr": 0.6}'
"""

from __future__ import annotations

import argparse


def deployments():
    from flows.pipeline import ALL_FLOWS  # deferred: pulls prefect (serve --help stays fast)

    return [f.to_deployment(name="default", tags=["i3cl"]) for f in ALL_FLOWS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=2, help="flow runs at once in this process")
    args = ap.parse_args()
    from prefect import serve  # deferred: prefect loads only when serving

    serve(*deployments(), limit=args.limit)


if __name__ == "__main__":
    main()
