import pytest
import torch

from dxray.errors import DxrayError
from dxray.prompts import MAX_LENGTH, SoftPrompt, encode, init_rows


def test_template_keeps_real_special_tokens(tiny_generator):
    tok = tiny_generator.tokenizer
    sp = SoftPrompt.build(tok, "a shape of {}", 2)
    ids = sp.input_ids.tolist()
    assert len(ids) == MAX_LENGTH
    assert ids[0] == tok.bos_token_id
    prefix = tok("a shape of", add_special_tokens=False).input_ids
    assert ids[1:1 + len(prefix)] == prefix
    assert sp.positions.tolist() == [1 + len(prefix), 2 + len(prefix)]
    assert ids[3 + len(prefix)] == tok.eos_token_id
    assert all(i == tok.pad_token_id for i in ids[4 + len(prefix):])


def test_injected_word_rows_equal_the_plain_prompt(tiny_generator):
    """Rows initialised from a word give exactly the conditioning of the text with that word."""
    g = tiny_generator
    sp = g.soft_prompt("a texture of {}", 1)
    rows = g.init_rows(1, "word:x", seed=0)
    soft = g.encode([sp], [rows])
    ids = g.tokenizer("a texture of x", padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = g.text_encoder(input_ids=ids).last_hidden_state
    torch.testing.assert_close(soft, plain)


def test_exported_rows_rebuild_the_same_conditioning(tiny_generator):
    g = tiny_generator
    rows = g.init_rows(3, "random", seed=1)
    a = g.encode([g.soft_prompt("{} of a dog", 3)], [rows])
    exported = rows.tolist()  # what the tasks table stores
    b = g.encode([g.soft_prompt("{} of a dog", 3)], [torch.tensor(exported)])
    torch.testing.assert_close(a, b)
    other = g.encode([g.soft_prompt("{} of a dog", 3)], [g.init_rows(3, "random", seed=2)])
    assert not torch.allclose(a, other)


def test_random_init_has_embedding_table_scale(tiny_generator):
    g = tiny_generator
    table = g.text_encoder.get_input_embeddings().weight
    rows = init_rows(g.tokenizer, g.text_encoder, 4, "random", torch.Generator().manual_seed(0))
    torch.testing.assert_close(rows.norm(dim=1), table.norm(dim=1).mean().expand(4))


def test_batch_of_prompts_each_gets_its_rows(tiny_generator):
    g = tiny_generator
    p1, p2 = g.soft_prompt("{}", 1), g.soft_prompt("a shape of {}", 2)
    r1, r2 = g.init_rows(1, "random", 3), g.init_rows(2, "random", 4)
    both = encode(g.text_encoder, [p1, p2], [r1, r2])
    torch.testing.assert_close(both[0], encode(g.text_encoder, [p1], [r1])[0])
    torch.testing.assert_close(both[1], encode(g.text_encoder, [p2], [r2])[0])
    assert not g.text_encoder.get_input_embeddings()._forward_hooks  # hook removed after the call


@pytest.mark.parametrize("template", ["no placeholder", "{} and {}"])
def test_template_needs_one_placeholder(tiny_generator, template):
    with pytest.raises(DxrayError, match="exactly once"):
        tiny_generator.soft_prompt(template, 1)


def test_too_long_template(tiny_generator):
    with pytest.raises(DxrayError, match="limit is 77"):
        tiny_generator.soft_prompt("{} " + "word " * 40, 1)
