"""Tiny random Grounding DINO and SAM for the demo preset and the tests.

Built from configs with random weights, saved with ``save_pretrained`` on first
use and loaded back through the same ``from_pretrained`` path as real models.
Grounding DINO hard-codes the BERT ids of [CLS]/[SEP]/"."/"?" (101/102/1012/1029),
so the tiny WordPiece vocabulary keeps them at those ids.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from dxray.cache import build_once, cache_root

TINY_DETECTOR_SIZE = 128  # the Swin backbone needs inputs of at least ~128 px
TINY_SAM_SIZE = 64
TINY_WORDS = ["goldfish", "tabby", "cat", "dog", "tench", "fish", "object", "a", "an", "the", "of", "photo"]
_FIXED = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}


def tiny_vocab() -> list[str]:
    """1030 WordPiece tokens: BERT's special ids kept, letters, test words, [unusedN] in the gaps."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    fill = iter(letters + ["##" + c for c in letters] + TINY_WORDS + [",", "!", "-", "'"])
    vocab, unused = [], 0
    for i in range(1030):
        token = _FIXED.get(i) or (next(fill, None) if i > 103 else None)
        if token is None:
            token, unused = f"[unused{unused}]", unused + 1
        vocab.append(token)
    return vocab


def tiny_detector_processor():
    from transformers import BertTokenizer, GroundingDinoProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import GroundingDinoImageProcessor as ImageProcessor
    else:  # transformers' PIL fallback
        from transformers import GroundingDinoImageProcessorPil as ImageProcessor
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("\n".join(tiny_vocab()) + "\n")
        tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True)
    size = {"height": TINY_DETECTOR_SIZE, "width": TINY_DETECTOR_SIZE}
    return GroundingDinoProcessor(image_processor=ImageProcessor(size=size), tokenizer=tokenizer)


def tiny_grounding_dino(seed: int = 0):
    """(GroundingDinoForObjectDetection, GroundingDinoProcessor) with random weights."""
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        SwinConfig,
    )

    processor = tiny_detector_processor()
    torch.manual_seed(seed)
    backbone = SwinConfig(
        image_size=TINY_DETECTOR_SIZE, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
        mlp_ratio=1.0, drop_path_rate=0.0, out_indices=[2, 3, 4],
    )
    text = BertConfig(
        vocab_size=len(processor.tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=256,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, num_queries=20, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_n_points=1, decoder_n_points=1, num_feature_levels=3, fusion_droppath=0.0,
    )
    return GroundingDinoForObjectDetection(config).eval(), processor


def tiny_sam(seed: int = 0):
    """(SamModel, SamProcessor) with random weights, 64-px image encoder."""
    from transformers import (
        SamConfig,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import SamImageProcessor as ImageProcessor
    else:
        from transformers import SamImageProcessorPil as ImageProcessor
    torch.manual_seed(seed)
    size, patch, hidden = TINY_SAM_SIZE, 8, 16
    config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=32, output_channels=hidden, num_hidden_layers=1, num_attention_heads=2, image_size=size,
            patch_size=patch, window_size=4, global_attn_indexes=[0], num_pos_feats=hidden // 2, mlp_dim=32,
            initializer_range=0.2,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=hidden, image_size=size, patch_size=patch, mask_input_channels=4),
        initializer_range=0.5,
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=hidden, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=16,
        ),
    )
    image_processor = ImageProcessor(
        size={"longest_edge": size}, pad_size={"height": size, "width": size},
        mask_size={"longest_edge": size // 4}, mask_pad_size={"height": size // 4, "width": size // 4},
    )
    return SamModel(config).eval(), SamProcessor(image_processor=image_processor)


def _save(pair, folder: Path) -> None:
    model, processor = pair
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def ensure_tiny_grounding_dino(cache_dir=None) -> Path:
    """Path of the tiny Grounding DINO folder, built on first use."""
    return build_once(cache_root(cache_dir) / "tiny-grounding-dino", lambda folder: _save(tiny_grounding_dino(), folder))


def ensure_tiny_sam(cache_dir=None) -> Path:
    """Path of the tiny SAM folder, built on first use."""
    return build_once(cache_root(cache_dir) / "tiny-sam", lambda folder: _save(tiny_sam(), folder))
