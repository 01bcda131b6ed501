"""The shapes world's own tokenizer: trained on the world's texts, loaded through
AutoTokenizer, every text round-trips, the world's words are single tokens, and the
packer finds its image markers and eos."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from weft.pipelines.shapes import load_config
from weft.stages.shapes.recipe import CPU_RECIPE, RecipeError, load_recipe, shapes_tokenizer_dir
from weft.stages.shapes.tokenizer import (
    SPECIAL_TOKENS,
    describe,
    shapes_tokenizer,
    train_shapes_tokenizer,
    world_texts,
)
from weft.train.packer import TextTokens


@pytest.fixture(scope="module")
def world():
    return load_config()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, world):
    return shapes_tokenizer(tmp_path_factory.mktemp("tok"), world.scene, world.tasks, 512)


def test_every_world_text_round_trips_in_few_tokens(tokenizer_dir, world) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    assert len(tok) <= 512
    # texts the tokenizer was not trained on: another seed's samples
    texts = list(world_texts(world.scene, world.tasks, per_task=100, seed=7))
    assert len(texts) > 500
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert len(ids) <= len(text.split()) + text.count(",") + text.count(".") + \
            text.count("?") + 1, text  # a word (or punctuation mark) a token
    for word in (*world.scene.shapes, *world.scene.colours):
        assert len(tok(f"a {word}", add_special_tokens=False)["input_ids"]) == 2, word


def test_special_tokens_are_what_the_packer_needs(tokenizer_dir) -> None:
    info = describe(tokenizer_dir)
    assert [info[name] for name in SPECIAL_TOKENS] == [0, 1, 2] and info["eos"] == 0
    text = TextTokens(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
    assert text.markers == (1, 2) and text.eos == 0
    # a marker string inside plain text stays text
    assert 1 not in text.encode("see <|vision_start|> here")


def test_unseen_text_falls_back_to_bytes(tokenizer_dir) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    for text in ("zebra quokka", "ünïcödé ✓", "circleangle"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_the_tokenizer_is_reused_and_keyed_by_its_world(tmp_path, world) -> None:
    first = shapes_tokenizer(tmp_path, world.scene, world.tasks, 300)
    stamp = (first / "tokenizer.json").stat().st_mtime_ns
    assert shapes_tokenizer(tmp_path, world.scene, world.tasks, 300) == first
    assert (first / "tokenizer.json").stat().st_mtime_ns == stamp
    small = world.scene.model_copy(update={"shapes": ["circle", "square"]})
    assert shapes_tokenizer(tmp_path, small, world.tasks, 300) != first
    assert describe(first)["vocab_size"] <= 300
    with pytest.raises(ValueError, match="at least 259"):
        train_shapes_tokenizer(tmp_path / "tiny", ["a b"], vocab_size=100)


def test_an_incomplete_tokenizer_dir_is_replaced(tmp_path) -> None:
    out = tmp_path / "tokenizer-x"
    out.mkdir()
    (out / "tokenizer_config.json").write_text("{")  # a copy cut short: no tokenizer.json
    train_shapes_tokenizer(out, ["a red circle", "a blue square"], vocab_size=300)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.decode(tok("a red circle")["input_ids"]) == "a red circle"


def test_the_recipe_picks_its_tokenizer(tmp_path) -> None:
    recipe = load_recipe(CPU_RECIPE, {"tokenizer": {"kind": "shapes", "vocab_size": 400}})
    path = shapes_tokenizer_dir(tmp_path, recipe, recipe.shapes_config())
    assert describe(path)["vocab_size"] <= 400
    with pytest.raises(RecipeError, match=r"tokenizer\.kind"):
        load_recipe(CPU_RECIPE, {"tokenizer": {"kind": "gpt2"}})
