"""Rank each class's top-k features over an image folder on Ray Data; writes the feature_ranking table.

    ray job submit --working-dir . -- python jobs/rank_features.py jobs/configs/imagenet.yaml \
        targets.feature_source=images targets.feature_images.path=s3://bucket/imagenet/train

Prints the feature_ranking folder; a later audit reads it with
``targets.feature_source=table targets.feature_table=<that folder>``.
"""

from __future__ import annotations

import sys

from dxray.config import Config, load_config
from dxray.distributed.rank import progress_printer, rank_features_distributed
from dxray.errors import DxrayError


def main(cfg: Config) -> str:
    result = rank_features_distributed(cfg, progress=progress_printer(cfg.cluster.log_every_s))
    print(f"ranked {result.images} images with {result.actors} actor(s) in {result.seconds:.1f} s", file=sys.stderr)
    return result.table


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: python jobs/rank_features.py CONFIG [key=value ...]", file=sys.stderr)
        sys.exit(2)
    try:
        print(main(load_config(sys.argv[1], sys.argv[2:])))
    except DxrayError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
