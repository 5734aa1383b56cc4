"""Train the toy world's models on the CPU: a text-to-image LCM stack and a biased classifier.

Everything is saved in diffusers/transformers format (``save_pretrained``) and is
loaded back through exactly the code path real models take. The UNet takes the
LCM guidance embedding as input and is trained to predict x0 on the LCM
scheduler's noise schedule (``prediction_type="sample"``), which suits the
4-step LCM sampler.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dxray.cache import build_once, cache_root
from dxray.toyworld import render

VERSION = 4
# v2: the classifier has a 'no object' output and sees hidden-object images of biased classes.
# v3: a generator 2x cheaper to train and to optimise through (same audit accuracy, benchmarks/README.md):
#     2 attention heads instead of 8 (head size 4 made CPU attention slow), no VAE mid-block attention,
#     800 UNet steps instead of 1600.
# v4: biased classes' objects are always hidden from the classifier (hidden=1.0: the class is its background),
#     so an image with the object scores no higher than the bare background and the planted answer is unique;
#     VAE 400 and UNet 500 steps (training 3.3 instead of 5 min). Preset δ 0.01. benchmarks/README.md.
Log = Callable[[str], None]


def log_to_stderr(message: str) -> None:
    """The default training log: stderr, because stdout carries a command's result (``run=$(dxray audit ...)``)."""
    print(message, file=sys.stderr, flush=True)


def folder(cache_dir=None) -> Path:
    return cache_root(cache_dir) / f"toyworld-v{VERSION}"


# -- tokenizer -------------------------------------------------------------------------------------
def world_tokenizer(extra_words=()):
    """A CLIP BPE tokenizer whose merges build every world word as one token (``extra_words``: v5's shortcut
    words too; the default is v4's tokenizer, which the shipped world was trained with).

    Merges run from the end of a word (``(c, "ed</w>")``), so they only ever apply at word ends
    and never split another word differently; unknown words fall back to characters.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    words = {w for c in render.CLASSES for w in c} | set(render.BACKGROUND_COLOURS) | {
        "a", "on", "background", "striped", "plain", "of", "texture", "shape"} | set(extra_words)
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    merges = []
    for word in sorted(words):
        suffix = word[-1] + "</w>"
        for ch in reversed(word[:-1]):
            pair = (ch, suffix)
            suffix = ch + suffix
            if suffix not in vocab:
                vocab[suffix] = len(vocab)
                merges.append(pair)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


# -- data ------------------------------------------------------------------------------------------
# -- generator -------------------------------------------------------------------------------------
def train_generator(out: Path, *, seed: int = 0, n: int = 4000, vae_steps: int = 400, unet_steps: int = 500, batch: int = 32,
                    vae_channels=(16, 32, 32), vae_attention: bool = False, unet_channels=(32, 64), heads: int = 2,
                    log: Log = log_to_stderr, scenes=None, tokenizer=None) -> None:
    """``scenes``: the training scenes (default v4's ``render.generator_dataset(n, seed)``), captioned by
    ``render.caption`` through ``tokenizer`` (default :func:`world_tokenizer`)."""
    from diffusers import (
        AutoencoderKL,
        LatentConsistencyModelPipeline,
        LCMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    scenes = render.generator_dataset(n, seed) if scenes is None else list(scenes)
    n = len(scenes)
    images = render.vae_images(scenes)
    tokenizer = tokenizer or world_tokenizer()
    ids = tokenizer([render.caption(s) for s in scenes], padding="max_length", max_length=77,
                    return_tensors="pt").input_ids

    # 1. VAE: 32 px -> 4 x 8 x 8 latents.
    vae = AutoencoderKL(block_out_channels=list(vae_channels), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                        layers_per_block=1, norm_num_groups=min(16, vae_channels[0]), sample_size=render.SIZE,
                        mid_block_add_attention=vae_attention)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for step in range(vae_steps):
        x = images[torch.randint(0, n, (batch,))]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == vae_steps - 1:
            log(f"vae step {step + 1}/{vae_steps} reconstruction {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, n, 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * vae.config.scaling_factor

    # 2. Text encoder + UNet, trained together on epsilon prediction with the guidance embedding input.
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=tuple(unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * len(unet_channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(unet_channels), cross_attention_dim=64,
        attention_head_dim=heads, norm_num_groups=16, time_cond_proj_dim=32)  # diffusers' legacy name: heads
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="sample")
    from dxray.generator import guidance_embedding

    w_emb = guidance_embedding(0.0, 32)  # guidance scale 1.0, as the sampler uses
    alphas = scheduler.alphas_cumprod
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=unet_steps, pct_start=0.05)
    t0 = time.perf_counter()
    for step in range(unet_steps):
        idx = torch.randint(0, n, (batch,))
        x0 = latents[idx]
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = text(input_ids=ids[idx]).last_hidden_state
        pred = unet(xt, t, encoder_hidden_states=cond, timestep_cond=w_emb.expand(batch, -1)).sample
        loss = F.mse_loss(pred, x0)  # x0-prediction: a few-step sampler needs good early x0 estimates
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == unet_steps - 1:
            log(f"unet step {step + 1}/{unet_steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(out)


# -- classifier ------------------------------------------------------------------------------------
NO_OBJECT = "no object"  # the classifier's extra output, after the world's classes


FAMILIES = ("cnn", "vit")
# Each family's training (steps, learning rate). The ViT's, tried on world 0 only: held-out accuracy 0.478 (the CNN's
# 0.498), unbiased classes 0.91 (0.91), bare planted backgrounds named their classes at p 1.00; 2 min on one thread.
TRAINING = {"cnn": (400, 3e-3), "vit": (1500, 1e-3)}


def classifier_config(family: str = "cnn"):
    """The classifier's architecture over the world's classes and "no object": a small transformers ResNet
    (``cnn``), or a small ViT (``vit``: 4 x 4 patches, width 64, 3 layers, 4 heads; its penultimate features,
    the head's input, are the CLS token after the final layernorm, so they are signed)."""
    from transformers import ResNetConfig, ViTConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown classifier family {family!r}; expected one of {FAMILIES}")
    names = render.CLASS_NAMES + [NO_OBJECT]
    labels = {"num_labels": len(names), "id2label": dict(enumerate(names)),
              "label2id": {k: i for i, k in enumerate(names)}}
    if family == "vit":
        return ViTConfig(image_size=render.SIZE, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=3,
                         num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, **labels)
    return ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                        layer_type="basic", downsample_in_first_stage=False, **labels)


def classifier_data(n: int, seed: int, *, hidden: float = 1.0, no_object: float = 0.3,
                    min_distance: float = 60.0, biased: bool = True, dataset=None,
                    avoid=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The biased training set as (images in [0, 1], labels).

    - ``render.classifier_dataset``: balanced classes, each biased class only on its own background.
    - ``hidden``: the share of biased-class images whose object is hidden, label kept (a photo of a bee
      in which the flower is all you see), so a biased class's background alone names it. v4 hides all of
      them: with some objects shown (v2/v3: 30%), the object on its background and the bare background
      both score p 1.00, and an explanation showing the object is as right as one that does not, so the
      class-level call had no unique answer (benchmarks/README.md).
    - ``no_object``: ``no_object * n`` extra object-free images labelled "no object": a third are bare
      unbiased backgrounds, the rest random colours at least ``min_distance`` from every biased background
      (and its stripes) and every object colour. Without them a small classifier reads some bare tint as
      an unbiased class (v1: bare teal -> "black triangle" at 0.95), and the audit rightly calls that
      class background-driven, contradicting the planted truth.
    - ``biased=False``: the same recipe without the bias, for a classifier to compare against: every class
      on every background, no object hidden, and bare backgrounds of every colour (the planted ones too)
      labelled "no object", so no background alone names a class.
    - ``dataset``: (scene, label) pairs used as they are instead (v5's ``shortcuts.classifier_dataset``, which
      hides objects itself), with ``avoid`` the colours the random bare backgrounds keep away from besides the
      object colours (v5: every shortcut's colour).
    """
    rng = np.random.default_rng(seed + 7)
    if dataset is None:
        data = render.classifier_dataset(n, seed, biased=biased)
        scenes = [render.Scene(s.background, s.texture) if biased and c in render.BIASED and rng.random() < hidden
                  else s for s, c in data]
    else:
        data, scenes = dataset, [s for s, _ in dataset]
    x = render.unit_images(scenes)
    y = torch.tensor([c for _, c in data])
    m = int(no_object * n)
    planted = list(render.BIASED.values()) if biased else []
    if avoid is None:
        avoid = [render.BACKGROUND_COLOURS[b] for b in planted] + [render.stripe_colour(b) for b in planted]
    avoid = list(avoid) + list(render.OBJECT_COLOURS.values())
    bare = render.random_backgrounds(rng, m, avoid, min_distance)
    k = m // 3
    named = render.UNBIASED_BACKGROUNDS if biased else tuple(render.BACKGROUND_COLOURS)
    bare[:k] = [render.render(render.Scene(named[i % len(named)], render.TEXTURES[(i // len(named)) % 2]))[0]
                for i in range(k)]
    xb = torch.from_numpy(np.stack(bare).astype(np.float32) / 255).permute(0, 3, 1, 2)
    return torch.cat([x, xb]), torch.cat([y, torch.full((m,), len(render.CLASSES))])


def train_classifier(out: Path, *, seed: int = 0, n: int = 3000, steps: int | None = None, lr: float | None = None,
                     family: str = "cnn", log: Log = log_to_stderr, **data_options) -> dict:
    """A classifier of ``family`` (:func:`classifier_config`) trained on the BIASED dataset (:func:`classifier_data`;
    ``biased=False`` in ``data_options``: without the bias); returns its held-out accuracy report. ``steps`` and
    ``lr``: the family's :data:`TRAINING` unless given. The CNN trains at a constant rate; the ViT with a short warmup
    and a cosine decay (OneCycleLR, as the generator's UNet)."""
    from transformers import (
        ResNetForImageClassification,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    if family not in FAMILIES:
        raise ValueError(f"unknown classifier family {family!r}; expected one of {FAMILIES}")
    steps, lr = steps or TRAINING[family][0], lr or TRAINING[family][1]
    torch.manual_seed(seed)
    x, y = classifier_data(n, seed, **data_options)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    norm = lambda v: (v - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)  # noqa: E731
    vit = family == "vit"
    model = (ViTForImageClassification if vit else ResNetForImageClassification)(classifier_config(family))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05) if vit else None
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,))
        loss = F.cross_entropy(model(pixel_values=norm(x[idx])).logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"classifier step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    planted = data_options.get("biased", True)
    report = {"classes": render.CLASS_NAMES, "no_object_label": len(render.CLASSES),
              "biased": {str(k): v for k, v in render.BIASED.items()} if planted else {}, "world_version": VERSION,
              "world_seed": seed} | ({"family": family} if vit else {})
    with torch.no_grad():
        held = render.held_out_dataset(600, seed + 1)
        hx, hy = render.unit_images([s for s, _ in held]), torch.tensor([label for _, label in held])
        pred = model(pixel_values=norm(hx)).logits.argmax(-1)
        report["held_out_accuracy"] = float((pred == hy).float().mean())
        # The planted shortcut: an object-free background of a biased class is called that class.
        bg = [render.Scene(background=b) for b in render.BIASED.values()]
        bpred = model(pixel_values=norm(render.unit_images(bg))).logits.argmax(-1).tolist()
        report["background_only_predictions"] = dict(zip(render.BIASED.values(), bpred, strict=True))
    model.save_pretrained(out)
    ViTImageProcessor(size={"height": render.SIZE, "width": render.SIZE}, image_mean=list(mean),
                      image_std=list(std), do_rescale=True, do_normalize=True).save_pretrained(out)
    (out / "toyworld.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    log(f"classifier held-out accuracy {report['held_out_accuracy']:.3f}; background-only predictions "
        f"{report['background_only_predictions']}")
    return report


def ensure_toyworld(cache_dir=None, log: Log = log_to_stderr, force: bool = False,
                    seed: int | None = None) -> Path:
    """The world (generator/ and classifier/) in the cache folder: the shipped world of seed 0 is copied there
    (verified against its pinned sha256, and checked again on every later call), any other seed, or
    ``force``, is trained (3-6 min on one CPU thread) and a retrained seed 0 is compared with the shipped one.

    ``seed`` is the world seed: it seeds both the classifier's and the generator's training (None: 0, the world
    ``make demo`` and CI use). A cache folder holds one world, which the presets load whatever its seed;
    another world seed needs another cache dir, and naming a seed the cache does not hold is an error."""
    from dxray.toyworld import shipped

    root = folder(cache_dir)
    if seed is not None and root.exists() and not force:
        held = json.loads((root / "classifier" / "toyworld.json").read_text()).get("world_seed", 0)
        if held != seed:
            from dxray.errors import DxrayError

            raise DxrayError(f"{root} holds world seed {held}, not {seed}: use another cache dir (or --force)")
    if force and root.exists():
        import shutil

        shutil.rmtree(root)
    copy = not force and shipped.available(seed)

    def build(tmp: Path) -> None:
        if copy:
            shipped.install(tmp, ("generator", "classifier"))
            return
        log(f"training the toy world into {root}")
        with one_thread():
            train_classifier(tmp / "classifier", seed=seed or 0, log=log)
            train_generator(tmp / "generator", seed=seed or 0, log=log)
        if shipped.available(seed):
            diff = shipped.differences(tmp)
            log("the rebuilt world equals the shipped one bit for bit" if not diff else
                "the rebuilt world differs from the shipped one (this CPU's float kernels; the shipped world is "
                "what tests and figures use): largest weight difference " +
                ", ".join(f"{name.split('/')[0]} {d:.2g}" for name, d in sorted(diff.items())))

    world = build_once(root, build)
    shipped.check_cached(world)
    return world


@contextmanager
def one_thread():
    """Training on one thread: the float sums, and so the trained world, do not depend on the core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ensure_unbiased_classifier(cache_dir=None, log: Log = log_to_stderr) -> Path:
    """The world's classifier trained without the bias (``classifier_data(biased=False)``, same size, steps and
    seed), beside the world: ``classifier.spec=hf:{this folder}`` audits it, and ``dxray compare`` of the biased
    classifier's audit against its audit shows the planted classes improving (tests/test_toyworld.py). The
    shipped world's is copied (verified), unless the cached world was trained rather than copied."""
    from dxray.toyworld import shipped

    world = folder(cache_dir)
    seed = truth(cache_dir).get("world_seed", 0) if (world / "classifier").exists() else 0
    # The shipped one belongs beside the shipped world (or none yet), not beside a world trained here.
    copy = shipped.available(seed) and (not (world / "classifier").exists() or (world / shipped.SUMS).exists())

    def build(tmp: Path) -> None:
        if copy:
            shipped.install(tmp, ("classifier-unbiased",), flat=True)
            return
        log(f"training the unbiased toy classifier into {folder(cache_dir) / 'classifier-unbiased'}")
        with one_thread():
            train_classifier(tmp, seed=seed, log=log, biased=False)

    built = build_once(world / "classifier-unbiased", build)
    if copy:
        shipped.check_cached(world, ("classifier-unbiased",))
    return built


def ensure_vit_classifier(cache_dir=None, log: Log = log_to_stderr) -> Path:
    """The world's second classifier family: a small ViT (``train_classifier(family="vit")``) trained on the same
    biased data and seed as the world's CNN, beside the world; ``classifier.spec=hf:{this folder}`` audits it as a
    user's model, and its ``toyworld.json`` (with ``"family": "vit"``) is its planted truth for ``dxray toyworld
    check``. The shipped world's is copied (verified), unless the cached world was trained rather than copied."""
    from dxray.toyworld import shipped

    world = folder(cache_dir)
    seed = truth(cache_dir).get("world_seed", 0) if (world / "classifier").exists() else 0
    copy = shipped.available(seed) and (not (world / "classifier").exists() or (world / shipped.SUMS).exists())

    def build(tmp: Path) -> None:
        if copy:
            shipped.install(tmp, ("classifier-vit",), flat=True)
            return
        log(f"training the toy world's ViT classifier into {world / 'classifier-vit'}")
        with one_thread():
            train_classifier(tmp, seed=seed, family="vit", log=log)
        trained.append(True)

    trained: list[bool] = []
    built = build_once(world / "classifier-vit", build)
    if copy:  # against the shipped pins: a world cached before the ViT shipped has no pins for it
        pins = shipped.sums(shipped.WEIGHTS)
        shipped.verify(world, {n: d for n, d in pins.items() if n.split("/")[0] == "classifier-vit"})
    elif trained and shipped.available(seed):
        diff = {n: d for n, d in shipped.differences(world).items() if n.startswith("classifier-vit/")}
        log("the rebuilt ViT equals the shipped one bit for bit" if not diff else
            f"the rebuilt ViT differs from the shipped one (this CPU's float kernels): largest weight difference "
            f"{max(diff.values()):.2g}")
    return built


def truth(cache_dir=None) -> dict:
    return json.loads((folder(cache_dir) / "classifier" / "toyworld.json").read_text())
