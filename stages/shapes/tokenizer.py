"""A tokenizer of the shapes world's own words, trained on the texts its generator says.

The tiny Qwen2.5's 50k-row vocabulary is most of a small model: with tied embeddings
at width 128 it is 6.4M of the CPU recipe's 8.2M parameters, every one of them updated
by AdamW and averaged into the EMA at every step, and each labelled token's logits span
rows the world never uses. The world says a few hundred words, so the recipe can train
a byte-level BPE on them (the `tokenizers` library, as GPT-2's) and load it through
`AutoTokenizer` like any other local tokenizer. Byte-level means no text is out of
vocabulary: a word the generator never said falls back to bytes.

The trainer needs three special tokens and finds them by name: `<|endoftext|>` (eos,
also pad), `<|vision_start|>` and `<|vision_end|>` (the image markers the packer wraps
every image in).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from weft.schemas.run_dir import build_dir_once
from weft.stages.shapes.samples import TASKS, TasksConfig, make_sample
from weft.stages.shapes.scene import SceneConfig
from weft.stages.shapes.text import CAPTION_QUESTION

EOS = "<|endoftext|>"
SPECIAL_TOKENS = (EOS, "<|vision_start|>", "<|vision_end|>")


def world_texts(scene: SceneConfig, tasks: TasksConfig, per_task: int = 2000,
                seed: int = 0) -> Iterator[str]:
    """Every text of `per_task` fresh samples of every task (video included, whether or
    not a mixture draws it): prompts, questions, answers, instructions, captions."""
    rng = np.random.default_rng(seed)
    yield CAPTION_QUESTION
    for task in TASKS:
        made = tries = 0
        while made < per_task and tries < 4 * per_task:
            tries += 1
            sample = make_sample(task, rng, scene, tasks)
            if sample is None:
                continue
            made += 1
            for item in sample.sequence:
                if item["type"] == "text":
                    yield item["text"]


def train_shapes_tokenizer(out_dir: str | Path, texts: Iterable[str],
                           vocab_size: int = 512) -> Path:
    """A byte-level BPE of at most vocab_size tokens (256 bytes and the special tokens
    included) trained on texts, saved as a Hugging Face tokenizer directory.

    Written complete or not at all; a complete directory is reused as it is.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (bytes and special tokens), "
                         f"got {vocab_size}")

    def build(staging: Path) -> None:
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                      special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        core.train_from_iterator(texts, trainer=trainer)
        PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS,
                                additional_special_tokens=list(SPECIAL_TOKENS[1:])
                                ).save_pretrained(staging)

    return build_dir_once(out_dir, build, lambda path: (path / "tokenizer.json").is_file())


def shapes_tokenizer(root: str | Path, scene: SceneConfig, tasks: TasksConfig,
                     vocab_size: int = 512) -> Path:
    """The world's tokenizer under root, in a directory named by what it was trained on."""
    from weft.schemas.ids import hash_of
    from weft.stages.shapes.samples import GENERATOR_VERSION

    key = hash_of("shapes-tokenizer", scene.model_dump(mode="json"),
                  tasks.model_dump(mode="json"), GENERATOR_VERSION, vocab_size, length=12)
    return train_shapes_tokenizer(Path(root) / f"tokenizer-{key}",
                                  world_texts(scene, tasks), vocab_size)


def describe(tokenizer_dir: str | Path) -> dict[str, Any]:
    """Vocabulary size and the special tokens' ids, for logs and tests."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    vocab = tok.get_vocab()
    return {"vocab_size": len(tok), "eos": tok.eos_token_id,
            **{name: vocab.get(name) for name in SPECIAL_TOKENS}}


__all__ = ["EOS", "SPECIAL_TOKENS", "describe", "shapes_tokenizer", "train_shapes_tokenizer",
           "world_texts"]
