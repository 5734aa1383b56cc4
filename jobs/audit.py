"""Ray job entrypoint: ``ray job submit --working-dir . -- python jobs/audit.py CONFIG [key=value ...]``.

Joins the cluster the job runs on (RAY_ADDRESS is set by Ray); prints the run folder on success.
"""

import logging
import sys

from dxray.config import load_config
from dxray.distributed.audit import run_distributed
from dxray.errors import DxrayError


def main(cfg):
    summary = run_distributed(cfg)
    print(f"run {summary.run_id}: {summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped -> {summary.root}")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        summary = main(load_config(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]))
    except DxrayError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(1 if summary.failed else 0)
