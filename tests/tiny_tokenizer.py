"""A tiny BLOOM-style tokenizer, trained at test time.

It has BLOOM's exact pipeline (pre-tokenizer, byte-level BPE, post-processor,
decoder and special tokens at ids 0..3) but only a few hundred merges, so it
trains in milliseconds and its vocabulary fits a tiny model.
"""

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "BLOOM is a multilingual language model trained on 46 natural languages and 13 programming languages.",
    "Hello, world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "Où est la bibliothèque ? Je voudrais un café crème, s'il vous plaît.",
    "Les élèves étudient à l'école française depuis des années.",
    "El niño comió una manzana en el jardín.",
    "我爱自然语言处理。今天天气很好，我们去公园吧！",
    "日本語のテキストも少し含まれています。",
    "नमस्ते, आप कैसे हैं।",
    "مرحبا بالعالم، كيف حالك؟",
    "Emoji are bytes too: 🙂 🚀 🌸 👍🏽",
]


def build_tiny_tokenizer(folder: Path) -> Path:
    """Train the tiny tokenizer and write tokenizer.json plus its config files into `folder`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(" ?[^(\\s|[.,!?…。，、।۔،])]+"), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "BloomTokenizerFast",
        "padding_side": "left",
        "add_prefix_space": False,
        "model_max_length": 2048,
        **SPECIAL_TOKENS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2))
    return folder
