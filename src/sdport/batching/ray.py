"""The Ray executor: each entry a Ray task on an existing cluster (or a local one), retried when its worker is lost.

The task carries the entry (a picklable request) and declares the memory it is expected to peak at;
downloads happen on the worker, into that node's cache; outputs go to the batch's folder, which every
node must see (a shared file system). A retried entry starts over in a staging folder of its own, so
a retry is safe. sdport must be installed in the cluster's Python environment.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import MissingExtraError
from .local import expected_peak
from .manifest import Entry
from .runner import EntryResult, run_entry

#: how many times Ray re-runs an entry whose worker or node died
RETRIES = 3


def run_ray(entries: list[Entry], out: str, address: str | None, done: Callable[[EntryResult], None]) -> None:
    """Run every entry as a Ray task; ``done`` is called with each result as it comes."""
    try:
        import ray
    except ImportError:
        raise MissingExtraError("--executor ray", "ray", ["ray"]) from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    memory = ray.cluster_resources().get("memory", 0)
    # a fresh worker process per entry: its peak RSS is the entry's, and torch's memory goes back when it ends
    task = ray.remote(max_retries=RETRIES, retry_exceptions=False, num_cpus=1, max_calls=1)(run_entry)
    refs = {task.options(memory=min(expected_peak(e), int(memory * 0.8))).remote(e, out): e for e in entries}
    while refs:
        finished, _ = ray.wait(list(refs), num_returns=1)
        for ref in finished:
            entry = refs.pop(ref)
            try:
                done(ray.get(ref))
            except ray.exceptions.RayError as exc:
                line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                done(EntryResult(entry.name, entry.where, "failed", error=f"sdport: {entry.where}: Ray: {line}"))
