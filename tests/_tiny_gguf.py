"""Write a tiny random-weight llama GGUF (a few hundred KB) for fast, deterministic model tests.

The weights are random (seeded), so the text is gibberish, but llama.cpp loads it in a blink and
runs every code path a real model does: tokenizing a chat prompt, prompt evaluation, sampling,
streaming, grammar-constrained (JSON) output and stopping.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

__all__ = ["write_tiny_llama"]

# vocabulary: 3 specials, 256 byte-fallback tokens, then printable characters and a few words
_WORDS = ["▁the", "▁a", "▁is", "▁hot", "▁cold", "▁boiler", "▁alert", "▁sensor", "▁value", "▁high", "er", "in"]


def _vocab() -> tuple[list[str], list[float], list[int]]:
    toks = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for b in range(256):
        toks.append(f"<0x{b:02X}>")
        types.append(gguf.TokenType.BYTE)
    for c in range(32, 127):
        ch = "▁" if chr(c) == " " else chr(c)
        if ch not in toks:
            toks.append(ch)
            types.append(gguf.TokenType.NORMAL)
    for w in _WORDS:
        toks.append(w)
        types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * 259 + [-float(i) for i in range(len(toks) - 259)]
    return toks, scores, [int(t) for t in types]


def write_tiny_llama(
    path: str | Path,
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 128,
    n_ctx: int = 512,
) -> Path:
    """Write the model to ``path`` (overwritten) and return it."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    toks, scores, types = _vocab()
    n_vocab = len(toks)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("sluice-tiny-test")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def t(name: str, *shape: int, scale: float = 0.2) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    t("token_embd.weight", n_vocab, n_embd, scale=1.0)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(f"blk.{i}.{name}.weight", n_embd, n_embd)
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    t("output.weight", n_vocab, n_embd, scale=1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
