"""The hand-off to Gemma 3's language model, end to end: a random full Gemma 3 saved by transformers, its images
encoded by gemma3-vision from the saved folder, and the soft tokens given to transformers' model through
``splice_images``. The logits and the greedy tokens must equal transformers' own run from the processor's pixels,
and the same splice without the bidirectional image mask must not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gemma3_vision as g3
from conftest import TINY_PROJECTOR, TINY_VISION, TOL, make_rgb, max_abs
from gemma3_vision.language_model import BOI_TOKEN_ID, EOI_TOKEN_ID, IMAGE_TOKEN_ID, NEWLINES_TOKEN_ID

transformers = pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "caption_from_tokens.py"
# Without the bidirectional mask the logits must differ by far more than the parity tolerance.
NO_MASK_FLOOR = 100 * TOL["fp32_max_abs"]
NEW_TOKENS = 20
TEXT = " Describe this image."


def tiny_tokenizer():
    """A Gemma tokenizer whose special tokens have Gemma 3's ids (``"\\n\\n"`` 108, ``<start_of_image>`` 255999,
    ``<end_of_image>`` 256000, ``<image_soft_token>`` 262144); other text falls back to byte tokens."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\n": 107, "\n\n": NEWLINES_TOKEN_ID,
             "<start_of_image>": BOI_TOKEN_ID, "<end_of_image>": EOI_TOKEN_ID, "<image_soft_token>": IMAGE_TOKEN_ID,
             **{f"<0x{b:02X}>": 300 + b for b in range(256)}}
    return transformers.GemmaTokenizer(
        vocab=vocab, merges=[("\n", "\n")],
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})


def tiny_gemma3_config():
    """The tiny vision tower of conftest and a 2-layer text model (one sliding-window layer, one global, as Gemma 3
    alternates them) with Gemma 3's vocabulary size, so that its special token ids are real."""
    return transformers.Gemma3Config(
        vision_config={
            "model_type": "siglip_vision_model", "hidden_size": TINY_VISION.hidden_size,
            "image_size": TINY_VISION.image_size, "intermediate_size": TINY_VISION.intermediate_size,
            "num_attention_heads": TINY_VISION.num_attention_heads,
            "num_hidden_layers": TINY_VISION.num_hidden_layers, "patch_size": TINY_VISION.patch_size,
            "layer_norm_eps": TINY_VISION.layer_norm_eps, "vision_use_head": False,
        },
        text_config={"hidden_size": TINY_PROJECTOR.text_hidden_size, "num_hidden_layers": 2,
                     "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                     "vocab_size": 262_208, "sliding_window": 24,
                     "layer_types": ["sliding_attention", "full_attention"]},
        mm_tokens_per_image=TINY_PROJECTOR.mm_tokens_per_image,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny Gemma3ForConditionalGeneration with its processor (tokenizer + image processor), saved by
    transformers, and the same model in memory as the reference."""
    folder = tmp_path_factory.mktemp("gemma3_full")
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(tiny_gemma3_config()).eval()
    with torch.no_grad():  # the default init leaves norm weights and biases at 0: perturb them
        for p in model.model.vision_tower.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.model.multi_modal_projector.mm_soft_emb_norm.weight.normal_(0, 0.1)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.1)
        for layer in model.model.language_model.layers:
            layer.input_layernorm.weight.normal_(0, 0.1)
    model.save_pretrained(folder)
    image_processor = transformers.Gemma3ImageProcessorPil(
        size={"height": TINY_VISION.image_size, "width": TINY_VISION.image_size},
        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tiny_tokenizer(),
                                             image_seq_length=TINY_PROJECTOR.mm_tokens_per_image)
    processor.save_pretrained(folder)
    return folder, model, processor


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return g3.load(checkpoint[0], dtype="float32", device="cpu")


# Each case: the images of one prompt, and whether they are encoded with Pan & Scan. The Pan & Scan case mixes a
# wide image (2 crops of 350x300) and a square one (no crops) in one prompt.
CASES = {
    "one-image": ([(120, 90, 1)], False),
    "two-images": ([(120, 90, 1), (64, 100, 2)], False),
    "pan-and-scan": ([(300, 700, 3), (120, 120, 4)], True),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, checkpoint, encoder):
    """transformers' inputs from the processor, and ours: the encoder's tokens, the prompt from expand_prompt."""
    _, _, processor = checkpoint
    sizes, pan_and_scan = CASES[request.param]
    images = [Image.fromarray(make_rgb(h, w, seed)) for h, w, seed in sizes]
    text = "<start_of_image>" * len(images) + TEXT
    reference = processor(text=text, images=images, do_pan_and_scan=pan_and_scan, return_tensors="pt")
    tokens = encoder.encode(images, pan_and_scan=pan_and_scan)  # (B, T, D), or one ImageEncoding per image
    ids = processor.tokenizer(g3.expand_prompt(text, tokens), return_tensors="pt")["input_ids"]
    return request.param, reference, tokens, ids


def test_prompt_layout_equals_the_processors(case, checkpoint):
    name, reference, tokens, ids = case
    model = checkpoint[1]
    assert torch.equal(ids, reference["input_ids"]), f"{name}: expand_prompt's ids differ from the processor's"
    spliced = g3.splice_images(ids, tokens, model.get_input_embeddings())
    assert torch.equal(spliced.token_type_ids, reference["token_type_ids"]), f"{name}: token types differ"
    crops = [len(t.crops) for t in tokens] if isinstance(tokens, list) else [0] * len(tokens)
    blocks = sum(1 + n for n in crops)
    assert int((ids == BOI_TOKEN_ID).sum()) == int((ids == EOI_TOKEN_ID).sum()) == blocks
    assert int((ids == IMAGE_TOKEN_ID).sum()) == blocks * TINY_PROJECTOR.mm_tokens_per_image


def test_logits_equal_transformers_from_pixels(case, checkpoint):
    name, reference, tokens, ids = case
    model = checkpoint[1]
    with torch.no_grad():
        theirs = model(**reference).logits
        ours = model(**g3.splice_images(ids, tokens, model.get_input_embeddings()).kwargs()).logits
    d = max_abs(ours, theirs)
    print(f"{name}: logits max abs diff {d:.3g} (tolerance {TOL['fp32_max_abs']})")
    assert d <= TOL["fp32_max_abs"], f"{name}: logits max abs diff {d:.3g} > {TOL['fp32_max_abs']}"


def test_greedy_tokens_equal_transformers_generate(case, checkpoint):
    name, reference, tokens, ids = case
    model = checkpoint[1]
    config = transformers.GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                           pad_token_id=0)
    with torch.no_grad():
        theirs = model.generate(**reference, generation_config=config)[:, ids.shape[1]:]
    ours = g3.greedy_generate(model, g3.splice_images(ids, tokens, model.get_input_embeddings()), NEW_TOKENS)
    print(f"{name}: {ours.tolist()[0]}")
    assert theirs.shape == ours.shape == (1, NEW_TOKENS)
    assert torch.equal(ours, theirs), f"{name}: greedy tokens differ:\nours   {ours.tolist()}\ntheirs {theirs.tolist()}"


def test_without_the_image_mask_the_logits_differ(case, checkpoint):
    """The trap: the same splice without token_type_ids reads each image causally. The proof above can fail."""
    name, reference, tokens, ids = case
    model = checkpoint[1]
    spliced = g3.splice_images(ids, tokens, model.get_input_embeddings())
    with torch.no_grad():
        theirs = model(**reference).logits
        causal = model(inputs_embeds=spliced.inputs_embeds).logits
    d = max_abs(causal, theirs)
    print(f"{name}: without token_type_ids the logits differ by {d:.3g} (floor {NO_MASK_FLOOR:.3g}; the logits "
          f"reach {theirs.abs().max().item():.3g})")
    assert d >= NO_MASK_FLOOR, f"{name}: dropping the image mask changed the logits by only {d:.3g}"
    first_image = int((ids[0] == IMAGE_TOKEN_ID).nonzero()[0])
    before = max_abs(causal[:, :first_image], theirs[:, :first_image])
    assert before <= TOL["fp32_max_abs"], f"{name}: text before the first image differs by {before:.3g}"


def test_scaled_soft_tokens_differ(checkpoint, encoder):
    """The other trap: Gemma's sqrt(D) embedding scale is for token embeddings; soft tokens scaled by it differ."""
    _, model, processor = checkpoint
    image = make_rgb(120, 90, 1)
    tokens = encoder.encode([image])
    ids = processor.tokenizer(g3.expand_prompt("<start_of_image>" + TEXT, tokens), return_tensors="pt")["input_ids"]
    embed = model.get_input_embeddings()
    scale = model.config.text_config.hidden_size ** 0.5
    with torch.no_grad():
        right = model(**g3.splice_images(ids, tokens, embed).kwargs()).logits
        scaled = model(**g3.splice_images(ids, tokens * scale, embed).kwargs()).logits
    d = max_abs(scaled, right)
    print(f"soft tokens times sqrt(D) = {scale:.3g}: the logits differ by {d:.3g} (floor {NO_MASK_FLOOR:.3g})")
    assert d >= NO_MASK_FLOOR, f"scaling the soft tokens changed the logits by only {d:.3g}"


def test_slot_count_mismatch_is_a_prompt_error(checkpoint, encoder):
    _, model, processor = checkpoint
    tokens = encoder.encode([make_rgb(64, 64, 5), make_rgb(80, 64, 6)])  # (2, T, D)
    ids = processor.tokenizer(g3.expand_prompt("<start_of_image>" + TEXT, tokens[:1]))["input_ids"]
    embed = model.get_input_embeddings()
    with pytest.raises(g3.PromptError, match=r"has 1 image slots .* images give 2 \(2 images, 0 Pan & Scan crops\)"):
        g3.splice_images(ids, tokens, embed)
    with pytest.raises(g3.PromptError, match=r"has 1 <start_of_image> placeholders, but 2 images"):
        g3.expand_prompt("<start_of_image>" + TEXT, tokens)
    with pytest.raises(g3.PromptError, match=r"slot 0 holds 16 tokens, but its view has 15"):
        g3.splice_images(ids, [tokens[0, :15]], embed)
    with pytest.raises(g3.PromptError, match=r"96 wide, the language model's embeddings 64"):
        g3.splice_images(ids, tokens[:1], lambda ids: torch.zeros(*ids.shape, 64))
    with pytest.raises(g3.OptionError, match=r"image 0 must be \(T, D\)"):
        g3.splice_images(ids, [torch.zeros(16)], embed)


def test_splice_takes_the_cli_files(checkpoint, encoder):
    """A (V, T, D) stack of an image's .npy files (original, crop1, ...), or a list of them, is that image with its
    crops."""
    _, model, processor = checkpoint
    [encoding] = encoder.encode([make_rgb(300, 700, 3)], pan_and_scan=True)
    stacked = np.stack([view.embeddings.numpy() for view in encoding.views])
    ids = processor.tokenizer(g3.expand_prompt("<start_of_image>" + TEXT, [stacked]))["input_ids"]
    embed = model.get_input_embeddings()
    with torch.no_grad():
        a = g3.splice_images(ids, [encoding], embed)
        b = g3.splice_images(ids, [stacked], embed)
        c = g3.splice_images(ids, [list(stacked)], embed)
    for other in (b, c):
        assert torch.equal(a.inputs_embeds, other.inputs_embeds)
        assert torch.equal(a.token_type_ids, other.token_type_ids)


@pytest.mark.parametrize("layout", [[], ["--format", "safetensors", "--shard-size", "2"]], ids=["npy", "shards"])
def test_example_captions_from_cli_tokens(checkpoint, tmp_path, layout):
    """examples/caption_from_tokens.py on tokens the CLI saved, as .npy files or shards: the same words as
    transformers from the pixels."""
    folder, model, processor = checkpoint
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(make_rgb(300, 700, 3)).save(images / "wide.png")
    Image.fromarray(make_rgb(120, 90, 1)).save(images / "small.png")
    out = tmp_path / "tokens"
    encode = subprocess.run([sys.executable, "-m", "gemma3_vision", "encode", str(images), "-m", str(folder),
                             "-o", str(out), "--dtype", "float32", "--pan-and-scan", *layout],
                            capture_output=True, text=True, timeout=300)
    assert encode.returncode == 0, encode.stderr
    caption = subprocess.run([sys.executable, str(EXAMPLE), str(folder), str(out), "--prompt", "<start_of_image>" + TEXT,
                              "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert caption.returncode == 0, caption.stderr
    lines = dict(line.split("\t", 1) for line in caption.stdout.splitlines())
    assert sorted(lines) == sorted(str(p) for p in images.iterdir())
    for path, words in lines.items():
        with Image.open(path) as image:
            inputs = processor(text="<start_of_image>" + TEXT, images=[image.convert("RGB")], do_pan_and_scan=True,
                               return_tensors="pt")
        with torch.no_grad():  # the model's generation config: it stops at its eos, as the example does
            new = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert json.loads(words) == processor.tokenizer.decode(new, skip_special_tokens=True), path

