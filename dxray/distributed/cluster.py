"""Connect to a Ray cluster, or start a local one (the embedded default)."""

from __future__ import annotations

import os
import signal
import threading

from dxray.config import ClusterConfig
from dxray.errors import DxrayError


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # torch missing or CUDA broken: a CPU-only local cluster
        return 0


def connect(cluster: ClusterConfig, address: str | None = None) -> str:
    """Join the cluster at ``address`` (argument, then ``cluster.address``, then RAY_ADDRESS), or start a
    local Ray. Returns a one-word description: 'local' or the address. Re-uses an initialised Ray."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or cluster.address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    # ray.init makes SIGTERM a bare sys.exit; a handler the caller set (the CLI's: SIGTERM is an interrupt
    # like Ctrl-C, with its line of what was committed) is put back after it.
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        if address:
            ray.init(address=address, **kwargs)
            return address
        # A fresh local cluster turns token auth on by default; this one lives and dies with this
        # process and listens on this machine only, so it runs without (an explicit setting wins).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        gpus = cluster.local_gpus if cluster.local_gpus is not None else _local_gpus()
        ray.init(num_cpus=cluster.local_cpus, num_gpus=gpus, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DxrayError(f"cannot connect to Ray at {address or 'a new local cluster'}: {first}") from None
    finally:
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)
    # A local Ray never grows: an actor wanting more CPUs than it has would wait forever, silently.
    cpus = float(ray.cluster_resources().get("CPU", 0))
    for field in ("cpus_per_explainer", "cpus_per_segmenter"):
        need = getattr(cluster, field)
        if need > cpus + 1e-9:
            ray.shutdown()
            raise DxrayError(f"cluster.{field}={need:g} but the local Ray has {cpus:g} CPU(s): lower it "
                             f"(or raise cluster.local_cpus)")
    return "local"
