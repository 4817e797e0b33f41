"""Caption images with Gemma 3 from soft tokens saved by ``gemma3-vision encode``: the vision tower never runs here.

Step 1, once, wherever the encoder runs (a CPU box, another machine, a batch job)::

    gemma3-vision encode photos/ --model google/gemma-3-4b-it --out tokens/ --dtype float32 [--pan-and-scan]

Step 2, here: load the language model alone, and ask it about each image from its saved tokens (``.npy`` files
or safetensors shards, read with ``gemma3_vision.open_embeddings``)::

    python examples/caption_from_tokens.py google/gemma-3-4b-it tokens/ --prompt "<start_of_image>Describe this."

One line per image: its input path, a tab, the caption as a JSON string. ``--prompt`` is the text around the
image, ``<start_of_image>`` where it goes, as the Gemma 3 processor takes it (the default is Gemma 3 IT's chat turn);
each placeholder becomes the image's full block, or its Pan & Scan sentence when the folder has crops.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

import gemma3_vision as g3

DEFAULT_PROMPT = "<start_of_turn>user\n<start_of_image>Describe this image.<end_of_turn>\n<start_of_turn>model\n"


def saved_tokens(out: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each encoded input of an output folder (``.npy`` files or shards) and its views ``(V, T, D)``: the image,
    then its crops in order."""
    emb = g3.open_embeddings(out)
    for name in emb.inputs():
        arrays = emb.arrays(name)  # {"": image, "crop1": ..., "crop2": ...}
        crops = sorted((k for k in arrays if k.startswith("crop") and k[4:].isdigit()), key=lambda k: int(k[4:]))
        yield name, torch.stack([arrays[""], *(arrays[k] for k in crops)]).float()  # (1 + crops, T, D)


def load_language_model(checkpoint: str, dtype: torch.dtype):
    """The checkpoint's ``Gemma3ForConditionalGeneration`` without its vision tower and projector: the soft tokens
    come from files. (The class, not ``Gemma3ForCausalLM``: it builds the bidirectional image mask.)"""
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).eval()
    model.model.vision_tower = None  # freed: forward uses neither when no pixel_values are given
    model.model.multi_modal_projector = None
    return model, AutoTokenizer.from_pretrained(checkpoint)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("checkpoint", help="the Gemma 3 folder or hub id the tokens were encoded with")
    parser.add_argument("tokens", type=Path, help="the output folder of gemma3-vision encode")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text with one <start_of_image>")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    if not (args.tokens / "index.jsonl").is_file():
        parser.error(f"{args.tokens} has no index.jsonl: give the --out folder of gemma3-vision encode")

    model, tokenizer = load_language_model(args.checkpoint, getattr(torch, args.dtype))
    embed = model.get_input_embeddings()
    for name, views in saved_tokens(args.tokens):
        try:
            text = g3.expand_prompt(args.prompt, [views])
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                prompt = g3.splice_images(ids, [views], embed, image_token_id=model.config.image_token_id)
        except g3.PromptError as e:  # e.g. --prompt without one <start_of_image>, or tokens of another checkpoint
            print(f"error: {name}: {e}", file=sys.stderr)
            return 1
        new = g3.greedy_generate(model, prompt, args.max_new_tokens, eos_token_id=model.generation_config.eos_token_id)
        print(f"{name}\t{json.dumps(tokenizer.decode(new[0], skip_special_tokens=True))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
