"""Soft prompts: a template whose ``{}`` holds N learnable token embeddings.

The template is tokenised once; BOS, EOS and padding stay real tokens. The
learnable rows are injected into the CLIP token-embedding output with a forward
hook (transformers 5's ``CLIPTextModel`` takes no ``inputs_embeds``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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
