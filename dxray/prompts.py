"""Soft and hard prompts: a template whose ``{}`` holds N learnable token embeddings.

The template is tokenised once; BOS, EOS and padding stay real tokens. The
learnable rows are injected into the CLIP token-embedding output with a forward
hook (transformers 5's ``CLIPTextModel`` takes no ``inputs_embeds``).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dxray.errors import DxrayError

MAX_LENGTH = 77


@dataclass(frozen=True)
class SoftPrompt:
    """A tokenised template: ``input_ids`` (77,) and the positions of the learnable rows."""

    template: str
    n_tokens: int
    input_ids: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def build(cls, tokenizer, template: str, n_tokens: int) -> SoftPrompt:
        if template.count("{}") != 1:
            raise DxrayError(f"template {template!r} must contain '{{}}' exactly once")
        if n_tokens < 1:
            raise DxrayError(f"n_tokens must be >= 1, got {n_tokens}")
        prefix, suffix = (part.strip() for part in template.split("{}"))
        pre = _ids(tokenizer, prefix)
        suf = _ids(tokenizer, suffix)
        # The placeholder id never reaches the encoder (its rows are replaced); it only must not be EOS,
        # which CLIP pooling looks for.
        placeholder = tokenizer.bos_token_id
        ids = [tokenizer.bos_token_id, *pre, *[placeholder] * n_tokens, *suf, tokenizer.eos_token_id]
        if len(ids) > MAX_LENGTH:
            raise DxrayError(f"template {template!r} with {n_tokens} tokens is {len(ids)} tokens long; the limit is {MAX_LENGTH}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids += [pad] * (MAX_LENGTH - len(ids))
        start = 1 + len(pre)
        return cls(template, n_tokens, torch.tensor(ids), torch.arange(start, start + n_tokens))


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def embedding_table(text_encoder) -> torch.nn.Embedding:
    return text_encoder.get_input_embeddings()


def init_rows(tokenizer, text_encoder, n_tokens: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """Initial learnable rows (n_tokens × D, float32, CPU).

    ``random``: Gaussian directions scaled to the mean norm of the embedding table;
    ``word:WORD``: the embeddings of WORD's tokens (cycled to fill n_tokens).
    """
    table = embedding_table(text_encoder).weight.detach().float().cpu()
    if init == "random":
        rows = torch.randn(n_tokens, table.shape[1], generator=generator)
        return rows / rows.norm(dim=1, keepdim=True) * table.norm(dim=1).mean()
    if not init.startswith("word:"):
        raise DxrayError(f"init {init!r} must be 'random' or 'word:WORD'")
    word = init[5:].strip()
    ids = _ids(tokenizer, word)
    if not ids:
        raise DxrayError(f"init word {word!r} has no tokens")
    return table[[ids[i % len(ids)] for i in range(n_tokens)]].clone()


def word_rows(tokenizer, text_encoder, words: str) -> torch.Tensor:
    """The embedding rows of every token of ``words``: in a template's '{}' they make exactly the plain
    prompt with the words written in (the segmenter control's prompt)."""
    ids = _ids(tokenizer, words.strip())
    if not ids:
        raise DxrayError(f"{words!r} has no tokens")
    return embedding_table(text_encoder).weight.detach().float().cpu()[ids].clone()


def encode(text_encoder, prompts: Sequence[SoftPrompt], rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """CLIP last hidden states (P × 77 × D) with each prompt's learnable rows in place."""
    if len(prompts) != len(rows):
        raise ValueError(f"{len(prompts)} prompts but {len(rows)} row tensors")
    device = embedding_table(text_encoder).weight.device
    input_ids = torch.stack([p.input_ids for p in prompts]).to(device)
    which = torch.cat([torch.full((p.n_tokens,), i) for i, p in enumerate(prompts)]).to(device)
    where = torch.cat([p.positions for p in prompts]).to(device)
    values = torch.cat(list(rows)).to(device)

    def inject(_module, _inputs, output):
        return output.index_put((which, where), values.to(output.dtype))

    handle = embedding_table(text_encoder).register_forward_hook(inject)
    try:
        return text_encoder(input_ids=input_ids).last_hidden_state
    finally:
        handle.remove()


# -- hard prompts (paper Sec. 4.4) -----------------------------------------------------------------
# Per learnable token a logit vector over the allowed token ids; each step a straight-through
# Gumbel-softmax sample picks one row of the embedding table, which is injected by :func:`encode`
# exactly like a soft row. The result is a list of token ids: real words.

RANDOM_LOGIT_STD = 0.01  # "random" init: near-uniform logits, a random argmax token
_WHOLE_WORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def whole_word_ids(tokenizer) -> list[int]:
    """Every non-special token that is a word by itself: it decodes to text that tokenises back to
    exactly that token (for CLIP: word-final tokens that BPE reaches). The default hard-prompt
    vocabulary, so that the decoded explanation reads back as the same tokens."""
    cached = _WHOLE_WORDS.get(tokenizer)
    if cached is None:
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(len(tokenizer)) if i not in special]
        texts = tokenizer.batch_decode([[i] for i in ids])
        back = tokenizer(texts, add_special_tokens=False).input_ids
        cached = [i for i, text, b in zip(ids, texts, back, strict=True) if text.strip() and list(b) == [i]]
        _WHOLE_WORDS[tokenizer] = cached
    return cached


def vocabulary_ids(tokenizer, words: Sequence[str] | None, field: str = "prompt.hard.vocabulary") -> list[int]:
    """Token ids a hard prompt may choose: one per word (each must be a single token), or every
    whole-word token when ``words`` is None."""
    if words is None:
        return whole_word_ids(tokenizer)
    ids: list[int] = []
    for word in words:
        tokens = _ids(tokenizer, word)
        if len(tokens) != 1:
            raise DxrayError(f"{field}: word {word!r} is {len(tokens)} tokens for this tokenizer; each word must be "
                             "a single token")
        ids.append(tokens[0])
    if not ids:
        raise DxrayError(f"{field}: no words")
    return list(dict.fromkeys(ids))


def init_logits(tokenizer, vocab: Sequence[int], n_tokens: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """Initial hard-prompt logits (n_tokens × len(vocab), float32, CPU).

    ``random``: small Gaussian logits (a random argmax token, near-uniform samples);
    ``word:WORD``: WORD's tokens (those in the vocabulary, cycled) get logit log(V - 1), so each is
    the argmax and drawn with probability about 1/2 at the first step.
    """
    logits = torch.randn(n_tokens, len(vocab), generator=generator) * RANDOM_LOGIT_STD
    if init == "random":
        return logits
    if not init.startswith("word:"):
        raise DxrayError(f"init {init!r} must be 'random' or 'word:WORD'")
    word = init[5:].strip()
    column = {t: j for j, t in enumerate(vocab)}
    cols = [column[t] for t in _ids(tokenizer, word) if t in column]
    if not cols:
        raise DxrayError(f"prompt.init: word {word!r} has no token in the hard-prompt vocabulary")
    high = math.log(max(len(vocab) - 1, 1))
    for i in range(n_tokens):
        logits[i, cols[i % len(cols)]] = high
    return logits


def temperature(step: int, steps: int, start: float, end: float) -> float:
    """Exponential anneal from ``start`` (first step) to ``end`` (last step)."""
    if steps <= 1:
        return start
    return start * (end / start) ** (step / (steps - 1))


def hard_rows(logits: torch.Tensor, table: torch.Tensor, tau: float, seed: int | None = None) -> torch.Tensor:
    """Straight-through Gumbel-softmax rows (n_tokens × D): forward, exactly the embedding-table rows of
    the sampled tokens; backward, the gradient of the tempered softmax. ``table`` holds the rows of the
    allowed ids (V × D); ``seed`` makes the Gumbel noise reproducible without touching the global RNG."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
        one_hot = F.gumbel_softmax(logits.float(), tau=tau, hard=True)
    one_hot = one_hot.to(table.device)
    exact = table[one_hot.detach().argmax(-1)].float()
    return exact + (one_hot - one_hot.detach()) @ table.float()  # value: the rows; gradient: through one_hot


def chosen_ids(logits: torch.Tensor, vocab: Sequence[int]) -> list[int]:
    """The discrete prompt: the argmax token id of every learnable position."""
    return [int(vocab[j]) for j in logits.detach().argmax(-1).tolist()]


def decode(tokenizer, ids: Sequence[int]) -> str:
    """The words of a hard prompt (its learnable tokens only; the template is stored beside it)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
