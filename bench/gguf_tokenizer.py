"""Writes a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) read from a GGUF
file's vocabulary: byte-level BPE (``tokenizer.ggml.model == "gpt2"``, as SmolLM2's). Runs in
``.venv-bench`` (``gguf`` and ``tokenizers``, no torch): AIPerf needs a tokenizer for its
synthetic prompts, and nothing may be downloaded from the Hub.

Usage: python bench/gguf_tokenizer.py MODEL.gguf OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

CONTROL = 3  # llama.cpp's token type for special tokens


def main(model: Path, out: Path) -> None:
    fields = {
        name: field.contents() for name, field in GGUFReader(model).fields.items() if name.startswith("tokenizer.")
    }
    if fields["tokenizer.ggml.model"] != "gpt2":
        raise SystemExit(f"only byte-level BPE vocabularies are converted, not {fields['tokenizer.ggml.model']!r}")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [t for t, kind in zip(tokens, fields["tokenizer.ggml.token_type"], strict=True) if kind == CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[fields["tokenizer.ggml.bos_token_id"]],
        "eos_token": tokens[fields["tokenizer.ggml.eos_token_id"]],
        "pad_token": tokens[fields["tokenizer.ggml.padding_token_id"]],
        "unk_token": tokens[fields["tokenizer.ggml.unknown_token_id"]],
        "chat_template": fields.get("tokenizer.chat_template"),
        "model_max_length": 8192,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
