"""Segmentation: prompts, RLE, union fraction, tiny Grounding DINO + SAM end to end."""

import numpy as np
import pytest
import torch

from dxray.errors import DxrayError
from dxray.models.tiny_segment import (
    ensure_tiny_grounding_dino,
    ensure_tiny_sam,
    tiny_grounding_dino,
    tiny_sam,
)
from dxray.segment import (
    Segmenter,
    boxes_mask,
    detection_prompt,
    rle_decode,
    rle_encode,
    union_fraction,
)


def _tiny(cache) -> tuple[str, str]:
    """The tiny Grounding DINO and SAM folders (built on first use), as a user's local models are given."""
    return str(ensure_tiny_grounding_dino(cache)), str(ensure_tiny_sam(cache))


PROMPTS = ["goldfish.", "tabby cat.", "dog.", "cat.", "goldfish.", "tabby cat."]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("segment-cache")


@pytest.fixture(scope="module")
def images():
    """Noise and solid colours, 128 px, plus a non-square 64 x 96 (the tiny generator makes 64 px)."""
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(3)]
    solid = [np.full((128, 128, 3), c, np.uint8) for c in ([255, 0, 0], [0, 0, 255])]
    return noise + solid + [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)]


@pytest.fixture(scope="module")
def low(cache):
    return Segmenter(*_tiny(cache), box_threshold=0.0, text_threshold=0.0, batch_size=4)


@pytest.mark.parametrize(("name", "prompt"), [
    ("tench, Tinca tinca", "tench."), ("Tabby Cat", "tabby cat."), ("dog.", "dog."), ("  Goldfish ", "goldfish."),
])
def test_detection_prompt(name, prompt):
    assert detection_prompt(name) == prompt


@pytest.mark.parametrize("name", ["", "  ", ", Tinca tinca"])
def test_detection_prompt_rejects_empty(name):
    with pytest.raises(DxrayError, match="empty class name") as e:
        detection_prompt(name)
    assert "\n" not in str(e.value)


def test_rle_hand_checked():
    mask = np.array([[0, 1, 1], [0, 1, 0]], dtype=bool)  # columns: [0,0] [1,1] [1,0]
    assert rle_encode(mask) == [2, 3, 1]
    assert rle_encode(~mask) == [0, 2, 3, 1]
    assert rle_decode([2, 3, 1], 2, 3).tolist() == mask.tolist()


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (7, 5), (33, 17)])
def test_rle_round_trip(shape):
    rng = np.random.default_rng(sum(shape))
    for mask in (np.zeros(shape, bool), np.ones(shape, bool), rng.random(shape) < 0.3, rng.random(shape) < 0.9):
        counts = rle_encode(mask)
        assert sum(counts) == mask.size and all(c > 0 for c in counts[1:])
        assert np.array_equal(rle_decode(counts, *shape), mask)
    assert rle_encode(np.zeros(shape, bool)) == [shape[0] * shape[1]]
    assert rle_encode(np.ones(shape, bool)) == [0, shape[0] * shape[1]]


def test_rle_decode_rejects_wrong_total():
    with pytest.raises(ValueError, match="2x3"):
        rle_decode([2, 3], 2, 3)


def test_union_fraction_and_boxes_mask():
    a, b = np.zeros((4, 5), bool), np.zeros((4, 5), bool)
    a[0, :] = True  # 5 pixels
    b[:, 0] = True  # 4 pixels, 1 shared with a
    union, r = union_fraction(np.stack([a, b]), 4, 5)
    assert r == 8 / 20 and union.sum() == 8
    union, r = union_fraction([], 4, 5)
    assert r == 0.0 and not union.any() and union.shape == (4, 5)
    union, r = union_fraction(np.zeros((0, 4, 5), bool), 4, 5)
    assert r == 0.0 and union.shape == (4, 5)
    mask = boxes_mask([[0, 0, 4, 4], [2, 2, 6, 6]], 10, 10)
    assert mask.sum() == 16 + 16 - 4
    assert union_fraction([mask], 10, 10)[1] == (16 + 16 - 4) / 100
    assert boxes_mask([[-5, -5, 20, 3]], 10, 10).sum() == 30  # clipped to the image
    assert not boxes_mask([], 10, 10).any()


def test_tiny_vocab_keeps_bert_special_ids():
    tokenizer = tiny_grounding_dino()[1].tokenizer
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[CLS]", "[SEP]", ".", "?"]) == [0, 101, 102, 1012, 1029]
    for word in ["goldfish", "tabby", "cat", "dog"]:
        assert tokenizer.tokenize(word) == [word]


def test_tiny_models_round_trip_through_from_pretrained(cache, images):
    from transformers import (
        AutoModelForZeroShotObjectDetection,
        AutoProcessor,
        SamModel,
        SamProcessor,
    )

    model, processor = tiny_grounding_dino()
    folder = ensure_tiny_grounding_dino(cache)
    loaded, loaded_processor = AutoModelForZeroShotObjectDetection.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    batch = dict(images=images[:2], text=PROMPTS[:2], return_tensors="pt", padding=True)
    inputs, loaded_inputs = processor(**batch), loaded_processor(**batch)
    for key in inputs:
        assert torch.equal(inputs[key], loaded_inputs[key]), key
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded.eval()(**loaded_inputs).logits)

    sam, sam_processor = tiny_sam()
    folder = ensure_tiny_sam(cache)
    loaded, loaded_processor = SamModel.from_pretrained(folder).eval(), SamProcessor.from_pretrained(folder)
    batch = dict(images=images[:1], input_boxes=[[[10.0, 20.0, 90.0, 100.0]]], return_tensors="pt")
    inputs, loaded_inputs = sam_processor(**batch), loaded_processor(**batch)
    with torch.no_grad():
        a = sam(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False)
        b = loaded(pixel_values=loaded_inputs["pixel_values"], input_boxes=loaded_inputs["input_boxes"], multimask_output=False)
    assert torch.equal(a.pred_masks, b.pred_masks) and a.pred_masks.shape[:3] == (1, 1, 1)


def test_segmenter_on_images(low, images):
    results = low(images, PROMPTS)
    assert len(results) == len(images)
    for image, res in zip(images, results, strict=True):
        h, w = image.shape[:2]
        assert 0.0 <= res.object_fraction <= 1.0
        assert len(res.boxes) == len(res.box_scores) > 0  # threshold 0: every query is kept
        assert all(0 <= s <= 1 for s in res.box_scores)
        for x0, y0, x1, y1 in res.boxes:
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
        mask = rle_decode(res.mask_rle, h, w)
        assert mask.shape == (h, w) and mask.mean() == res.object_fraction


def test_segmenter_batched_equals_one_by_one(cache, images):
    # noise images only: on a solid colour many queries tie and float noise reorders them
    noise, prompts = images[:3] + images[5:], PROMPTS[:3] + PROMPTS[5:]
    batched, single = (Segmenter(*_tiny(cache), box_threshold=0.5, batch_size=n) for n in (4, 1))
    a_all, b_all = batched(noise, prompts), single(noise, prompts)
    assert len({len(a.boxes) for a in a_all}) > 1  # SAM gets a ragged batch of boxes
    for a, b in zip(a_all, b_all, strict=True):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.box_scores, b.box_scores, atol=1e-4)
        assert abs(a.object_fraction - b.object_fraction) < 1e-3


def test_sam_gets_ragged_box_lists(cache, images):
    """A fake detector keeps (words in the prompt) queries, so one batch holds 1, 2 and 3 boxes."""

    def fake(segmenter):
        detect = segmenter.detector

        def detector(**inputs):
            out = detect(**inputs)
            keep = torch.arange(out.logits.shape[1]) < inputs["attention_mask"].sum(-1, keepdim=True) - 3
            text = out.logits.isfinite()  # positions past the prompt stay -inf
            out.logits = torch.where(text & keep[..., None], 10.0, torch.where(text, -10.0, out.logits))
            centres = torch.linspace(0.2, 0.8, out.pred_boxes.shape[1])
            out.pred_boxes = torch.stack([centres, 1 - centres, *[torch.full_like(centres, 0.3)] * 2], -1)
            out.pred_boxes = out.pred_boxes.expand(len(keep), -1, -1)
            return out

        segmenter.detector = detector
        return segmenter

    prompts = ["goldfish.", "tabby cat.", "the tabby cat."]
    batched, single = (fake(Segmenter(*_tiny(cache), batch_size=n)) for n in (3, 1))
    a_all, b_all = batched(images[:3], prompts), single(images[:3], prompts)
    assert [len(a.boxes) for a in a_all] == [1, 2, 3]
    for a, b in zip(a_all, b_all, strict=True):
        assert a.boxes == b.boxes and a.box_scores == b.box_scores
        assert abs(a.object_fraction - b.object_fraction) < 1e-3 and 0.0 < a.object_fraction < 1.0
    # the one-box mask is SAM's own mask for that box
    sam_inputs = single.sam_processor(images=images[:1], input_boxes=[b_all[0].boxes], return_tensors="pt")
    with torch.no_grad():
        pred = single.sam(pixel_values=sam_inputs["pixel_values"], input_boxes=sam_inputs["input_boxes"],
                          multimask_output=False).pred_masks
    mask = single.sam_processor.post_process_masks(pred, sam_inputs["original_sizes"], sam_inputs["reshaped_input_sizes"])
    assert np.array_equal(rle_decode(b_all[0].mask_rle, 128, 128), mask[0][0, 0].numpy())


def test_boxes_outside_the_image_are_clipped(cache, images):
    segmenter = Segmenter(_tiny(cache)[0], None, box_threshold=0.0)
    detect = segmenter.detector

    def corner_boxes(**inputs):  # centre (0, 0), size 0.5 x 0.5: three quarters lie outside
        out = detect(**inputs)
        out.pred_boxes = torch.tensor([0.0, 0.0, 0.5, 0.5]).expand_as(out.pred_boxes)
        return out

    segmenter.detector = corner_boxes
    for image, res in zip(images[-2:], segmenter(images[-2:], PROMPTS[:2]), strict=True):
        h, w = image.shape[:2]
        assert res.boxes == [[0.0, 0.0, w / 4, h / 4]] * len(res.boxes)
        assert res.object_fraction == 1 / 16


def test_nothing_detected_at_threshold_one(cache, images):
    results = Segmenter(*_tiny(cache), box_threshold=1.0)(images, PROMPTS)
    for image, res in zip(images, results, strict=True):
        h, w = image.shape[:2]
        assert res.object_fraction == 0.0 and res.boxes == [] and res.box_scores == []
        assert res.mask_rle == [h * w]


def test_without_sam_the_mask_is_the_union_of_boxes(cache, images):
    results = Segmenter(_tiny(cache)[0], None, box_threshold=0.5)(images, PROMPTS)
    assert any(res.boxes for res in results)
    for image, res in zip(images, results, strict=True):
        h, w = image.shape[:2]
        assert np.array_equal(rle_decode(res.mask_rle, h, w), boxes_mask(res.boxes, h, w))
        assert res.object_fraction == boxes_mask(res.boxes, h, w).mean()
        assert all(s > 0.5 for s in res.box_scores)


def test_prompts_without_a_period_stay_one_query_per_image(low, images):
    # the processor would merge ["goldfish", "cat"] into a single "goldfish. cat." query
    a = low(images[:2], ["goldfish", "Cat"])
    b = low(images[:2], ["goldfish.", "cat."])
    assert a == b


def test_mismatched_images_and_prompts(low, images):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        low(images[:2], PROMPTS[:1])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"detector": "./no-such-detector"}, "detector folder not found: ./no-such-detector"),
    ({"detector": "/no/such/detector"}, "detector folder not found: /no/such/detector"),
    ({"sam": "~/no-such-sam-folder"}, "SAM folder not found: ~/no-such-sam-folder"),
    ({"box_threshold": 1.5}, "segment.box_threshold"),
    ({"box_threshold": -0.1}, "segment.box_threshold"),
    ({"text_threshold": 2}, "segment.text_threshold"),
    ({"batch_size": 0}, "segment.batch_size"),
    ({"dtype": "float64"}, "segment.dtype"),
])
def test_bad_settings_are_one_line_errors(cache, kwargs, match):
    args = {"detector": _tiny(cache)[0], "sam": _tiny(cache)[1], **kwargs}
    with pytest.raises(DxrayError, match=match) as e:
        Segmenter(args.pop("detector"), args.pop("sam"), **args)
    assert "\n" not in str(e.value)


def boxes_agree(low: list, full: list, px: float) -> float:
    """Share of ``low``'s boxes with a box of ``full`` whose corners are all within ``px`` pixels (a box near the
    threshold may pass in one precision only, so counts can differ by a few)."""
    if not low:
        return 1.0 if not full else 0.0
    a, b = np.asarray(low, dtype=float), np.asarray(full, dtype=float).reshape(-1, 4)
    return float(np.mean([bool(len(b)) and np.abs(b - box).max(axis=1).min() <= px for box in a]))


def test_bfloat16_runs_both_models_in_bfloat16_and_keeps_the_boxes(cache, images):
    detector, sam = _tiny(cache)
    full = Segmenter(detector, sam, box_threshold=0.5, batch_size=2)(images[:2], PROMPTS[:2])
    low = Segmenter(detector, sam, box_threshold=0.5, batch_size=2, dtype="bfloat16")
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append((mod.name, o.dtype)))
             for m in _first_linears(low.detector, low.sam)]
    found = low(images[:2], PROMPTS[:2])
    for h in hooks:
        h.remove()
    assert {name for name, _ in seen} == {"detector", "sam"} and {d for _, d in seen} == {torch.bfloat16}
    for a, b in zip(found, full, strict=True):
        assert a.boxes and boxes_agree(a.boxes, b.boxes, px=1.5) >= 0.8, (a.boxes, b.boxes)
        assert abs(a.object_fraction - b.object_fraction) < 0.05


def _first_linears(detector, sam) -> list:
    out = []
    for name, model in (("detector", detector), ("sam", sam)):
        layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        layer.name = name
        out.append(layer)
    return out


def test_unloadable_models_are_one_line_errors(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once instead of retrying the network
    with pytest.raises(DxrayError, match="cannot load detector 'no-such-org/no-such-model'") as e:
        Segmenter("no-such-org/no-such-model", None)
    assert "\n" not in str(e.value)
    with pytest.raises(DxrayError, match="cannot load SAM") as e:
        Segmenter(_tiny(cache)[0], str(tmp_path))  # an existing folder without a model
    assert "\n" not in str(e.value)


CONCEPTS = ["snow", "water", "grass"]


def test_concepts_leave_the_object_columns_as_they_were(cache, images):
    """Issue 20: the concept query shares SAM with the object's boxes but never changes r, mask or boxes."""
    plain = Segmenter(*_tiny(cache), box_threshold=0.0, text_threshold=0.0)(images, PROMPTS)
    named = Segmenter(*_tiny(cache), box_threshold=0.0, text_threshold=0.0, concepts=CONCEPTS)(images, PROMPTS)
    for p, n in zip(plain, named, strict=True):
        assert (n.object_fraction, n.mask_rle, n.boxes, n.box_scores) == (p.object_fraction, p.mask_rle, p.boxes,
                                                                           p.box_scores)
        assert p.concept_fractions is None and len(n.concept_fractions) == len(CONCEPTS)
        assert all(0.0 <= f <= 1.0 for f in n.concept_fractions)
    skipped = Segmenter(*_tiny(cache), concepts=CONCEPTS)(images, PROMPTS, with_concepts=False)
    assert all(s.concept_fractions is None for s in skipped)


def test_a_concept_covers_the_boxes_whose_phrase_names_it(cache, images):
    """Without SAM a box is its mask. At text threshold 0 every box's phrase holds every word of the query, so each
    concept covers the union of all the query's boxes: what the object path gives for that query as a prompt. At
    text threshold 1 no box is named by any phrase: every coverage is 0."""
    detector = _tiny(cache)[0]
    query = " ".join(f"{c}." for c in CONCEPTS)
    as_object = Segmenter(detector, None, box_threshold=0.0)(images, [query] * len(images))
    named = Segmenter(detector, None, box_threshold=0.0, text_threshold=0.0, concepts=CONCEPTS)(images, PROMPTS)
    for o, n in zip(as_object, named, strict=True):
        assert o.object_fraction > 0 and n.concept_fractions == [pytest.approx(o.object_fraction)] * len(CONCEPTS)
    unnamed = Segmenter(detector, None, box_threshold=0.0, text_threshold=1.0, concepts=CONCEPTS)(images, PROMPTS)
    assert all(n.concept_fractions == [0.0] * len(CONCEPTS) for n in unnamed)


@pytest.mark.parametrize(("label", "owners"), [("snow", [0]), ("water snow", [0, 1]), ("snowy", []), ("", []),
                                               ("snow. water. grass. [SEP]", [0, 1, 2]), ("Grass.", [2])])
def test_a_phrase_names_concepts_by_whole_words(cache, label, owners):
    seg = Segmenter(_tiny(cache)[0], None, concepts=CONCEPTS)
    assert seg._owners(label) == owners
