"""A tiny random FLUX pipeline, built offline, for tests and the demo.

It is a real `FluxPipeline` (FluxTransformer2DModel, a FLUX-shaped AutoencoderKL,
CLIPTextModel + CLIPTokenizer, T5EncoderModel + T5Tokenizer, the flow-matching
Euler scheduler) with tiny random weights, saved with `save_pretrained`, so tests
load it exactly as production loads FLUX.1: `FluxPipeline.from_pretrained(dir,
local_files_only=True)`. Nothing comes from a hub: both tokenizers are built
in memory. The CLIP tokenizer is byte-level BPE with no merges (every byte is a
token, as GPT-2's byte alphabet); the T5 tokenizer is a Unigram model over
letters, digits and punctuation. A 32 x 32 image renders in well under a second
on a CPU. Its pictures are noise shaped by random weights: fine for plumbing,
meaningless as images.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from weft.schemas.run_dir import build_dir_once

BUILD_FORMAT = 1
MARKER = "weft_tiny_flux.json"


def tiny_clip_tokenizer() -> Any:
    """CLIP's tokenizer class over GPT-2's byte alphabet with no merges (offline)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"{c}</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_t5_tokenizer() -> Any:
    """T5's (Unigram) tokenizer class over letters, digits and punctuation (offline)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _build(out: Path, seed: int) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from weft.model.tiny_parts import FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR

    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bos, eos = clip_tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, projection_dim=32, max_position_embeddings=77,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64,
                                     num_layers=2, num_heads=4, decoder_start_token_id=0,
                                     pad_token_id=0, eos_token_id=1))
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
            layers_per_block=1, norm_num_groups=8, latent_channels=16, sample_size=64,
            scaling_factor=FLUX_SCALING_FACTOR, shift_factor=FLUX_SHIFT_FACTOR,
            use_quant_conv=False, use_post_quant_conv=False)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                        tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
                        transformer=transformer)
    pipe.save_pretrained(str(out))  # safetensors
    (out / MARKER).write_text(f'{{"format": {BUILD_FORMAT}, "seed": {seed}}}\n')


def is_complete(path: Path, seed: int = 0) -> bool:
    marker = path / MARKER
    return marker.is_file() and marker.read_text() == \
        f'{{"format": {BUILD_FORMAT}, "seed": {seed}}}\n' and \
        (path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def make_tiny_flux(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny FLUX pipeline in `out_dir` (skipped when already complete)."""
    return build_dir_once(Path(out_dir).expanduser(), lambda tmp: _build(tmp, seed),
                          lambda path: is_complete(path, seed))
