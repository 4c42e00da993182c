"""Single-node launcher of a training's processes whose rendezvous listens on 127.0.0.1 only.

``torchrun --standalone`` hosts two TCP stores (the rendezvous and the workers' store) that bind to every
network interface, unauthenticated, whatever address it is given. On one machine nothing needs to reach
them from outside, so the pipeline starts its single-node trainings with this launcher instead:

    python -m i3cl_core.engine.local_launch --nproc_per_node=N -m i3cl_core.cli train CONFIG ...

It binds one socket to 127.0.0.1 on a free port, hosts the store on it (``TCPStore(master_listen_fd=...)``),
and starts N trainer processes with the variables torchrun sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``, ``TORCHELASTIC_USE_AGENT_STORE``: every rank is a client of this
store). The first process that fails stops the others (SIGTERM, then SIGKILL after a grace period) and its
exit code is the launcher's; SIGTERM/SIGINT to the launcher reach every trainer, and the trainers die with
the launcher even when it is SIGKILLed (they set PR_SET_PDEATHSIG when ``TORCHELASTIC_RUN_ID`` is set).
Multi-node runs use torchrun with the endpoint the user gives (``train.launcher``).
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time

from i3cl_core.utils import terminate_with_parent

GRACE_S = 15.0


USAGE = "usage: python -m i3cl_core.engine.local_launch [--nproc_per_node=N] PYTHON_ARGS..."


def _parse(argv: list[str]) -> tuple[int, list[str]]:
    """``(nproc, trainer's python arguments)``: the launcher's options come first, the rest is the
    trainer's."""
    nproc, rest = 1, list(argv)
    while rest and rest[0].startswith(("--nproc_per_node", "--nproc-per-node", "-h", "--help")):
        opt = rest.pop(0)
        if opt in ("-h", "--help"):
            print(USAGE + "\n" + (__doc__ or ""))
            raise SystemExit(0)
        value = opt.split("=", 1)[1] if "=" in opt else (rest.pop(0) if rest else "")
        try:
            nproc = int(value)
        except ValueError:
            nproc = 0
        if nproc < 1:
            raise SystemExit(f"{USAGE}\nerror: --nproc_per_node must be a whole number >= 1, got {value!r}")
    if not rest:
        raise SystemExit(f"{USAGE}\nerror: no trainer command given")
    return nproc, rest


def loopback_store(world_size: int):
    """``(store, port)``: a TCP store served on a socket bound to 127.0.0.1 (a free port); the store owns the
    socket from then on."""
    import torch.distributed as dist  # deferred: torch loads only for a multi-process store

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        world_size=world_size,
        is_master=True,
        wait_for_workers=False,
        master_listen_fd=sock.detach(),
        timeout=datetime.timedelta(minutes=30),
    )
    return store, port


def _stop(procs: list[subprocess.Popen], grace: float = GRACE_S) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(nproc: int, command: list[str]) -> int:
    """Run ``python *command`` as ``nproc`` ranks; the first non-zero exit code, else 0."""
    store = None
    env = dict(
        os.environ,
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK="0",
        ROLE_RANK="0",
        TORCHELASTIC_RUN_ID=os.environ.get("TORCHELASTIC_RUN_ID", f"i3cl-local-{os.getpid()}"),
    )
    if nproc > 1:
        store, port = loopback_store(nproc)
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum, frame):  # noqa: ARG001
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for rank in range(nproc):
            procs.append(
                subprocess.Popen(
                    [sys.executable, *command],
                    env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc)),
                    preexec_fn=terminate_with_parent,
                )
            )
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                first = next(i for i, c in enumerate(codes) if c not in (None, 0))
                print(
                    f"local_launch: rank {first} exited with code {failed[0]}; stopping the others",
                    file=sys.stderr,
                )
                _stop(procs)
                return failed[0] if failed[0] > 0 else 128 - failed[0]
            if all(c == 0 for c in codes):
                return 128 + received[0] if received else 0
            time.sleep(0.2)
    finally:
        _stop(procs)
        for s, handler in old.items():
            signal.signal(s, handler)
        del store  # closes the listening socket


def main(argv: list[str] | None = None) -> int:
    nproc, command = _parse(sys.argv[1:] if argv is None else argv)
    return launch(nproc, command)


if __name__ == "__main__":
    sys.exit(main())
