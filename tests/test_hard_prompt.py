"""Hard prompts (paper Sec. 4.4): real tokens chosen by straight-through Gumbel-softmax, decoded to text."""

import math

import pyarrow.dataset as ds
import pytest
import torch
from conftest import TINY_YAML
from test_toyworld import HELD_OUT, _preset_prompt, world  # noqa: F401  (the trained toy world: one copy per test cache)

from dxray import prompts
from dxray.config import build_config, load_config
from dxray.errors import DxrayError
from dxray.objectives import class_ce
from dxray.optimize import HardSettings, OptimizeSettings, Target, best_of, optimize, sample
from dxray.prompts import MAX_LENGTH
from dxray.toyworld import render
from dxray.toyworld.train import world_tokenizer

# Every word the toy world's captions use: a readable vocabulary where each word is one token.
WORLD_WORDS = sorted({w for c in render.CLASSES for w in c} | set(render.BACKGROUND_COLOURS)
                     | {"a", "on", "background", "striped", "plain", "of", "texture", "shape"})


# The toy-world test's settings (prompt shape: the preset's). World v3, measured: 30 steps left 2 of 6 classes worse
# (6.2 -> 3.9 mean); 60 steps: 6 of 6 no worse, 6.2 -> 3.2. World v4, 60 steps: 5 of 6 no worse, 3.14 -> 1.72.
STEPS, LR, SEED, RESTARTS = 60, 0.3, 10, 3


def _tokenizers(tiny_generator):
    return {"tiny CLIP": tiny_generator.tokenizer, "toy world": world_tokenizer()}


@pytest.mark.parametrize("which", ["tiny CLIP", "toy world"])
def test_decoded_text_tokenises_back_to_the_chosen_ids(tiny_generator, which):
    tok = _tokenizers(tiny_generator)[which]
    vocabularies = [prompts.vocabulary_ids(tok, None)]
    if which == "toy world":
        vocabularies.append(prompts.vocabulary_ids(tok, WORLD_WORDS))
    for vocab in vocabularies:
        assert vocab and not set(vocab) & set(tok.all_special_ids)
        for seed in range(50):
            logits = torch.randn(3, len(vocab), generator=torch.Generator().manual_seed(seed))
            ids = prompts.chosen_ids(logits, vocab)
            text = prompts.decode(tok, ids)
            assert text and tok(text, add_special_tokens=False).input_ids == ids, (text, ids)


def test_forward_is_exactly_the_chosen_rows_and_gradient_reaches_the_logits(tiny_generator, tiny_classifier):
    g = tiny_generator
    vocab = prompts.vocabulary_ids(g.tokenizer, None)
    table = g.text_encoder.get_input_embeddings().weight.detach()[vocab]
    logits = torch.nn.Parameter(torch.randn(2, len(vocab), generator=torch.Generator().manual_seed(0)))
    rows = prompts.hard_rows(logits, table, tau=1.0, seed=7)
    # The forward value is exactly two rows of the table: the sampled tokens.
    picked = [int((table == r).all(1).nonzero()[0]) for r in rows.detach()]
    assert torch.equal(rows.detach(), table[picked])
    sp = g.soft_prompt("a texture of {}", 2)
    cond = g.encode([sp], [rows])
    text = "a texture of " + prompts.decode(g.tokenizer, [vocab[j] for j in picked])
    ids = g.tokenizer(text, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = g.text_encoder(input_ids=ids).last_hidden_state
    torch.testing.assert_close(cond, plain)
    # Straight-through: the loss of the generated image reaches every logit row.
    loss = class_ce(0)(tiny_classifier(g.generate(cond, [[2**31]]), layers=[])).mean()
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert (logits.grad.abs().sum(1) > 0).all()


def test_gumbel_noise_is_seeded_and_leaves_the_global_rng_alone():
    table = torch.randn(50, 8)
    logits = torch.zeros(3, 50)
    state = torch.get_rng_state()
    a = prompts.hard_rows(logits, table, 0.5, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, prompts.hard_rows(logits, table, 0.5, seed=1))
    assert not torch.equal(a, prompts.hard_rows(logits, table, 0.5, seed=2))


def test_temperature_anneals_from_start_to_end():
    taus = [prompts.temperature(s, 5, 2.0, 0.125) for s in range(5)]
    assert taus[0] == 2.0 and taus[-1] == pytest.approx(0.125)
    assert all(b == pytest.approx(a / 2) for a, b in zip(taus, taus[1:], strict=False))


def test_word_init_puts_the_argmax_on_that_word(tiny_generator):
    tok = world_tokenizer()
    vocab = prompts.vocabulary_ids(tok, WORLD_WORDS)
    logits = prompts.init_logits(tok, vocab, 2, "word:green circle", torch.Generator().manual_seed(0))
    assert prompts.decode(tok, prompts.chosen_ids(logits, vocab)) == "green circle"
    p = logits.softmax(-1).max(-1).values  # drawn about half the time at the first step
    assert ((p > 0.4) & (p < 0.6)).all()
    with pytest.raises(DxrayError, match="prompt.init: word 'violet' has no token in the hard-prompt vocabulary"):
        prompts.init_logits(tok, vocab, 1, "word:violet", torch.Generator())


def test_only_allowed_ids_are_ever_chosen(tiny_generator, tiny_classifier, monkeypatch):
    g = tiny_generator
    words = ["x", "y", "z"]
    allowed = prompts.vocabulary_ids(g.tokenizer, words)
    table = g.text_encoder.get_input_embeddings().weight.detach()
    seen = []
    encode = g.encode

    def recording(soft_prompts, rows):
        seen.extend(r.detach() for r in rows)
        return encode(soft_prompts, rows)

    monkeypatch.setattr(g, "encode", recording)
    targets = [Target(class_ce(c), "{}", 2, "random", seed=c, class_index=c) for c in (0, 1)]
    settings = OptimizeSettings(steps=4, lr=0.5, samples_per_step=1, hard=HardSettings(vocabulary=words))
    results = optimize(g, tiny_classifier, targets, settings)
    assert len(seen) == 2 * 4 + 2  # each step's draws, then each chosen prompt scored once (chosen_loss)
    for rows in seen:
        for row in rows:
            [[tid]] = (table == row).all(1).nonzero().tolist()
            assert tid in allowed
    for r in results:
        assert set(r.token_ids) <= set(allowed) and len(r.token_ids) == 2
        assert r.text == prompts.decode(g.tokenizer, r.token_ids)
        assert set(r.text.split()) <= set(words)
        assert torch.equal(r.rows, table[r.token_ids])  # what prompt_embedding stores: the words' rows


def test_restarts_are_ranked_by_the_loss_of_the_prompt_they_return(tiny_generator, tiny_classifier):
    """Each step's loss is a Gumbel draw's, and the draw's tokens can differ from the argmax prompt a hard-prompt
    run returns: chosen_loss is the returned prompt's own loss on the last step's seeds, and best_of ranks by it."""
    from dxray.optimize import OptimizeResult, best_of

    g = tiny_generator
    targets = [Target(class_ce(c), "{}", 2, "random", seed=c + k, class_index=c) for c in (0, 1) for k in (7, 20)]
    hard = optimize(g, tiny_classifier, targets, OptimizeSettings(steps=3, lr=0.5, samples_per_step=2,
                                                                     hard=HardSettings(vocabulary=["x", "y", "z"])))
    for t, r in zip(targets, hard, strict=True):
        with torch.no_grad():
            images = g.generate(g.encode([g.soft_prompt("{}", 2)], [r.rows]), [r.train_seeds[-1]])
            own = t.objective(tiny_classifier(images, layers=[])).mean().item()
        assert r.chosen_loss == pytest.approx(own, rel=1e-4, abs=1e-5)
    soft = optimize(g, tiny_classifier, targets[:1], OptimizeSettings(steps=2, samples_per_step=2))
    assert soft[0].chosen_loss is None  # a soft prompt's rows are what each step rendered
    rows = torch.zeros(1, 2)
    lucky = OptimizeResult(rows, loss_curve=[0.01], chosen_loss=8.4, init_seed=1)
    steady = OptimizeResult(rows, loss_curve=[4.6], chosen_loss=1.7, init_seed=2)
    assert best_of([lucky, steady]).init_seed == 2


def test_a_multi_token_word_is_a_one_line_error(tiny_generator, tiny_config):
    with pytest.raises(DxrayError, match="word 'goldfish' is 8 tokens for this tokenizer; each word must be a single token") as err:
        prompts.vocabulary_ids(tiny_generator.tokenizer, ["x", "goldfish"])
    assert "\n" not in str(err.value)
    from dxray.pipeline.explainer import Explainer

    cfg = load_config(TINY_YAML, [f"output={tiny_config.output}", f"cache_dir={tiny_config.cache_dir}", "device=cpu",
                                  "prompt.kind=hard", "prompt.hard.vocabulary=[x, goldfish]"])
    with pytest.raises(DxrayError, match="prompt.hard.vocabulary: word 'goldfish'"):
        Explainer(cfg, generator=tiny_generator)


def test_config_hard_prompt_and_template_presets(tmp_path):
    cfg = build_config({}, ["prompt.templates=[object, texture, shape, 'a photo of {}']"])
    assert cfg.prompt.templates == ["{}", "a texture of {}", "a shape of {}", "a photo of {}"]
    assert cfg.prompt.kind == "soft"
    with pytest.raises(DxrayError, match="prompt.templates.*name the same template twice"):
        build_config({}, ["prompt.templates=[object, '{}']"])
    with pytest.raises(DxrayError, match=r"prompt.templates.*'textures' must contain '\{\}' exactly once \(or be one of object, texture, shape\)"):
        build_config({}, ["prompt.templates=[textures]"])
    words = tmp_path / "words.txt"
    words.write_text("red\n\ncircle \nred\n")
    assert build_config({}, [f"prompt.hard.vocabulary={words}"]).prompt.hard.vocabulary == ["red", "circle"]
    with pytest.raises(DxrayError, match="config field 'prompt.hard.vocabulary': file not found"):
        build_config({}, [f"prompt.hard.vocabulary={tmp_path / 'none.txt'}"])
    with pytest.raises(DxrayError, match="prompt.kind"):
        build_config({}, ["prompt.kind=medium"])
    with pytest.raises(DxrayError, match="prompt.hard.tau_end"):
        build_config({}, ["prompt.hard.tau_end=0"])


def test_run_and_task_ids_change_with_hard_settings_only_for_hard_prompts():
    from dxray.identity import task_id as _task_id

    soft = build_config({})
    assert soft.fingerprint() == build_config({}, ["prompt.hard.tau_start=3", "prompt.templates=[object]"]).fingerprint()
    hard = build_config({}, ["prompt.kind=hard"])
    hotter = build_config({}, ["prompt.kind=hard", "prompt.hard.tau_start=3"])
    assert len({soft.fingerprint(), hard.fingerprint(), hotter.fingerprint()}) == 3
    ids = {_task_id(c, kind="class", template="{}") for c in (soft, hard, hotter)}
    assert len(ids) == 3
    assert _task_id(soft, kind="class") == _task_id(build_config({}, ["prompt.hard.lr=0.5"]), kind="class")


def _held_out_ce(gen, clf, rows, c):
    got = sample(gen, clf, _preset_prompt()[0], rows, HELD_OUT, class_index=c, batch_size=16)
    return sum(-math.log(max(s.class_prob, 1e-12)) for s in got) / len(got)


@pytest.mark.timeout(1800)  # minutes of optimisation on a busy 2-core box
def test_hard_prompt_optimisation_lowers_the_held_out_loss_on_the_toy_world(world):  # noqa: F811
    """Class CE on held-out seeds: the initial argmax words vs the final ones. Hard prompts are
    unstable (the paper says so too): each class takes the best of RESTARTS initialisations by final
    training loss, as optimize.restarts does in an audit."""
    _, gen, clf = world
    classes = list(range(len(render.CLASSES)))
    template, n_tokens = _preset_prompt()
    targets = [Target(class_ce(c), template, n_tokens, "random", seed=SEED + c + 100 * k, class_index=c)
               for c in classes for k in range(RESTARTS)]
    settings = OptimizeSettings(steps=STEPS, lr=LR, samples_per_step=4, hard=HardSettings(vocabulary=WORLD_WORDS))
    runs = optimize(gen, clf, targets, settings)
    pairs = []
    for c in classes:
        best = best_of(runs[c * RESTARTS:(c + 1) * RESTARTS])
        pairs.append((_held_out_ce(gen, clf, best.start_rows, c), _held_out_ce(gen, clf, best.rows, c), best.text))
    assert all(text and set(text.split()) <= set(WORLD_WORDS) for _, _, text in pairs), pairs
    before, after = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
    # Measured: v3 about 6.2 -> 3.2, v4 3.14 -> 1.72; v4 on the CI box 4.23 -> 3.73 (2 of 6 worse) while restarts were
    # ranked by their last Gumbel draw's loss, 6.87 -> 1.78 (6 of 6 no worse) ranked by the returned prompt's.
    assert after < before - 1.0, pairs
    assert sum(a <= b + 0.1 for b, a, _ in pairs) >= len(classes) - 1, pairs


def test_explain_with_hard_prompts_writes_the_words(tmp_path, cache_dir):
    from test_cli import run_cli

    out = tmp_path / "out"
    res = run_cli("explain", str(TINY_YAML), f"output={out}", "optimize.steps=2", "sample.k=2", "device=cpu",
                  "prompt.kind=hard", "prompt.templates=[object, texture]", "targets.top_k=0", cache=cache_dir)
    assert res.returncode == 0, res.stderr
    [root] = [p for p in out.iterdir() if p.is_dir()]
    tasks = ds.dataset(root / "tasks", format="parquet").to_table().to_pylist()
    assert sorted((t["class_index"], t["template"]) for t in tasks) == [
        (0, "a texture of {}"), (0, "{}"), (1, "a texture of {}"), (1, "{}")]
    tok = _tokenizers_for_cli(cache_dir)
    for t in tasks:
        assert t["status"] == "ok" and t["hard_prompt_text"], t
        ids = tok(t["hard_prompt_text"], add_special_tokens=False).input_ids
        assert len(ids) == 1 == len(t["prompt_embedding"])  # one learnable token, one real word
        assert t["baseline_prob"] is not None and math.isfinite(t["baseline_prob"])
        assert t["chosen_loss"] is not None and math.isfinite(t["chosen_loss"])  # how the restart was picked


def _tokenizers_for_cli(cache_dir):
    from transformers import CLIPTokenizer

    from dxray.models.tiny import ensure_tiny_lcm

    return CLIPTokenizer.from_pretrained(ensure_tiny_lcm(cache_dir) / "tokenizer")


def test_prompt_param_picks_soft_or_hard_and_each_keeps_its_interface(tiny_generator):
    """The one factory: soft rows are the parameters themselves (settings.lr); hard rows are exactly
    rows of the allowed part of the embedding table, seeded per step, with the gradient reaching the
    logits (hard.lr, else settings.lr); a hard result's rows are the table rows of its token ids."""
    from dxray.optimize import HardPrompts, SoftPrompts, prompt_param

    g = tiny_generator
    targets = [Target(class_ce(c), "{}", 2, "random", seed=c, class_index=c) for c in (0, 1)]
    soft = prompt_param(g, targets, OptimizeSettings(steps=4, lr=0.2))
    assert isinstance(soft, SoftPrompts) and soft.lr == 0.2 and len(soft.parameters()) == 2
    for i, t in enumerate(targets):
        assert soft.rows(i, 3, 99) is soft.parameters()[i]
        assert torch.equal(soft.result_fields(i)["rows"], g.init_rows(2, "random", t.seed))
        assert soft.result_fields(i).keys() == {"rows"}

    words = ["x", "y", "z"]
    allowed = prompts.vocabulary_ids(g.tokenizer, words)
    table = g.text_encoder.get_input_embeddings().weight.detach()
    hard = prompt_param(g, targets, OptimizeSettings(steps=4, lr=0.2, hard=HardSettings(vocabulary=words)))
    assert isinstance(hard, HardPrompts) and hard.lr == 0.2
    assert prompt_param(g, targets, OptimizeSettings(lr=0.2, hard=HardSettings(lr=0.7, vocabulary=words))).lr == 0.7
    [logits, _] = hard.parameters()
    assert logits.shape == (2, len(allowed))
    drawn = [hard.rows(0, step, seed) for step in range(4) for seed in (1, 2)]
    for rows in drawn:
        for row in rows.detach():
            [[tid]] = (table == row).all(1).nonzero().tolist()
            assert tid in allowed
    assert torch.equal(hard.rows(0, 1, 5), hard.rows(0, 1, 5))  # the Gumbel noise is the seed's
    assert len({tuple(r.detach().flatten().tolist()) for r in drawn}) > 1
    drawn[0].sum().backward()
    assert logits.grad is not None and (logits.grad.abs().sum(1) > 0).all()
    for i in (0, 1):
        fields = hard.result_fields(i)
        assert fields.keys() == {"rows", "token_ids", "text"}
        assert fields["token_ids"] == prompts.chosen_ids(hard.parameters()[i], allowed)
        assert torch.equal(fields["rows"], table[fields["token_ids"]])
        assert fields["text"] == prompts.decode(g.tokenizer, fields["token_ids"])
