"""SAM from the original segment-anything package (``segment.sam=segment-anything:vit_b:PATH.pth``): the package's
own classes with random weights, saved as a plain state dict (as ``sam_vit_b_01ec64.pth`` is), loaded through the
config, and compared mask for mask with the package's ``SamPredictor`` on the same boxes."""

from __future__ import annotations

import argparse
import sys
from functools import partial

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor, sam_model_registry  # the dev extra installs it
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from dxray.config import SegmentConfig
from dxray.errors import DxrayError
from dxray.models import load_segmenter
from dxray.models.tiny_segment import ensure_tiny_grounding_dino
from dxray.segment import Segmenter, boxes_mask, rle_decode

PROMPTS = ["goldfish.", "tabby cat.", "dog.", "cat.", "goldfish.", "tabby cat."]


def small_vit_b(embed_dim: int = 64, img_size: int = 256) -> Sam:
    """``build_sam._build_sam`` line for line (vit_b's layout: windowed blocks with every other one global, the
    real prompt encoder and mask decoder) with a 2-block, 64-wide encoder at 256 px. Written out because
    ``_build_sam`` fixes the input at 1024 px, which costs ~10x the time on this CPU; the package's preprocessing
    (ResizeLongestSide, pad, postprocess) all follow ``image_encoder.img_size``."""
    prompt_embed_dim, patch = 256, 16
    grid = img_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=embed_dim, img_size=img_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=patch, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=[1], window_size=14, out_chans=prompt_embed_dim),
        prompt_encoder=PromptEncoder(embed_dim=prompt_embed_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_embed_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


@pytest.fixture
def small_registry(monkeypatch):
    """The package's registry is a plain dict of builders; dxray builds whatever ``vit_b`` names there."""
    monkeypatch.setitem(sam_model_registry, "vit_b", small_vit_b)


@pytest.fixture(scope="module")
def detector(cache_dir):
    return str(ensure_tiny_grounding_dino(cache_dir))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random small vit_b saved as the released checkpoints are: a plain state dict of tensors."""
    torch.manual_seed(1)
    state = small_vit_b().state_dict()
    path = tmp_path_factory.mktemp("sam") / "sam_small_vit_b.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return ([rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(5)]
            + [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)])


def segmenter(detector, sam, **kw) -> Segmenter:
    cfg = SegmentConfig(detector=detector, sam=sam, **{"box_threshold": 0.55, "batch_size": 4, **kw})
    return load_segmenter(cfg)


def test_same_masks_as_the_packages_predictor(small_registry, detector, checkpoint, images):
    path, state = checkpoint
    seg = segmenter(detector, f"segment-anything:vit_b:{path}")
    assert seg.sam_backend == "segment-anything" and isinstance(seg.sam, Sam) and not seg.sam.training
    assert all(torch.equal(v, state[k]) for k, v in seg.sam.state_dict().items())
    results = seg(images, PROMPTS)  # batches of 4 and 2 images: one image-encoder call each
    assert len({len(r.boxes) for r in results}) > 1 and all(r.boxes for r in results)

    reference = small_vit_b()
    reference.load_state_dict(state)
    predictor = SamPredictor(reference)  # the package's one-image-at-a-time path
    for image, res in zip(images, results, strict=True):
        h, w = image.shape[:2]
        predictor.set_image(image)
        boxes = predictor.transform.apply_boxes_torch(torch.tensor(res.boxes), (h, w))  # as its README does
        masks, _, _ = predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
        union = masks[:, 0].any(0).numpy()
        got = rle_decode(res.mask_rle, h, w)
        assert np.array_equal(got, union)
        assert res.object_fraction == union.mean()
        assert not np.array_equal(got, boxes_mask(res.boxes, h, w))  # SAM's masks, not the boxes
    assert 0.0 < min(r.object_fraction for r in results) and max(r.object_fraction for r in results) < 1.0

    # the same boxes and scores as the transformers path (the detector is shared; only the masks differ)
    boxes_only = segmenter(detector, None)(images, PROMPTS)
    assert [r.boxes for r in boxes_only] == [r.boxes for r in results]


def test_a_checkpoint_that_needs_pickle_is_refused_unless_allowed(small_registry, detector, checkpoint, tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": checkpoint[1], "args": argparse.Namespace(lr=0.1)}, path)
    ref = f"segment-anything:vit_b:{path}"
    with pytest.raises(DxrayError, match=r"argparse\.Namespace.*segment\.allow_pickle=true") as e:
        segmenter(detector, ref)
    assert "\n" not in str(e.value)
    seg = segmenter(detector, ref, allow_pickle=True)
    assert all(torch.equal(v, checkpoint[1][k]) for k, v in seg.sam.state_dict().items())


def test_a_checkpoint_of_another_size_is_one_line(small_registry, detector, tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(small_vit_b(embed_dim=32).state_dict(), path)
    with pytest.raises(DxrayError, match=r"^segment\.sam: checkpoint .* is not a segment-anything vit_b: "
                                         r"image_encoder\.pos_embed is \(1, 16, 16, 32\) there, "
                                         r"\(1, 16, 16, 64\) in vit_b") as e:
        segmenter(detector, f"segment-anything:vit_b:{path}")
    assert "\n" not in str(e.value)
    state = small_vit_b().state_dict()
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, path)
    with pytest.raises(DxrayError, match=r"does not fit segment-anything vit_b: 1 missing keys "
                                         r"\['mask_decoder.iou_token.weight'\], 0 unexpected"):
        segmenter(detector, f"segment-anything:vit_b:{path}")


@pytest.mark.parametrize(("ref", "match"), [
    ("segment-anything:vit_x:{file}", "segment.sam: unknown segment-anything model type 'vit_x' in "
                                      "'segment-anything:vit_x:.*'; give segment-anything:TYPE:PATH.pth with "
                                      "TYPE one of vit_b, vit_l, vit_h"),
    ("segment-anything:default:{file}", "unknown segment-anything model type 'default'"),
    ("segment-anything:vit_b", "segment.sam: 'segment-anything:vit_b' names no checkpoint"),
    ("segment-anything:vit_h:/no/such/sam_vit_h.pth", "segment.sam: SAM checkpoint not found: /no/such/sam_vit_h.pth"),
    ("segment-anything:vit_l:{dir}", "segment.sam: SAM checkpoint is a folder, not a checkpoint file"),
])
def test_bad_references_are_one_line_before_any_model_loads(tmp_path, ref, match):
    file = tmp_path / "sam.pth"
    file.write_bytes(b"not read: the reference is refused first")
    with pytest.raises(DxrayError, match=match) as e:
        Segmenter("/no/such/detector", ref.format(file=file, dir=tmp_path))  # the detector would fail next
    assert "\n" not in str(e.value)


def test_without_the_package_the_reference_says_what_to_install(tmp_path, monkeypatch):
    file = tmp_path / "sam.pth"
    file.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # as if not installed: import fails, no spec
    with pytest.raises(DxrayError, match=r"^segment\.sam: 'segment-anything:vit_b:.*' needs the segment-anything "
                                         r"package, which is not installed: pip install 'dxray\[sam\]'$"):
        Segmenter("/no/such/detector", f"segment-anything:vit_b:{file}")
