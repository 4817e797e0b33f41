"""The hand-off to Gemma 3's language model: soft tokens into a prompt, as transformers' processor and model do.

Gemma 3 reads an image as a block of ``<image_soft_token>`` slots in its prompt whose embeddings are the projector's
rows. Three things must match what transformers does with pixels for the language model to behave the same:

- the layout: each ``<start_of_image>`` of the prompt text becomes ``"\\n\\n" <start_of_image> T x
  <image_soft_token> <end_of_image> "\\n\\n"``; with Pan & Scan, a sentence holding the original image's block and one
  block per crop (``Gemma3Processor.replace_image_token``). ``expand_prompt`` writes that text;
- the embeddings: the text's token embeddings (the model's embedding layer, which multiplies by sqrt(D)) with the
  soft tokens written over the image slots as they are, not scaled (``Gemma3Model.forward``). ``splice_images``;
- the mask: tokens of one image attend to each other both ways, the rest of the prompt causally. transformers
  builds that mask from ``token_type_ids`` (1 on the soft tokens); without them the image is read causally and the
  logits differ. ``SplicedPrompt.kwargs()`` carries them.

transformers' ``generate()`` refuses ``inputs_embeds`` for Gemma 3 (5.25; 5.0 took them), so ``greedy_generate``
runs the decoding loop over forward calls with the model's KV cache. Nothing here imports transformers: the caller
passes the model, its embedding layer and its token ids (the defaults are Gemma 3's).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F

from .api import ImageEncoding
from .errors import OptionError, PromptError

# Gemma 3's tokenizer (tokenizer.json) and transformers' Gemma3Config defaults.
BOI_TOKEN, IMAGE_TOKEN, EOI_TOKEN = "<start_of_image>", "<image_soft_token>", "<end_of_image>"
BOI_TOKEN_ID, IMAGE_TOKEN_ID, EOI_TOKEN_ID = 255_999, 262_144, 256_000
NEWLINES_TOKEN_ID = 108  # "\n\n", on each side of an image's block
PAD_TOKEN_ID = 0

# One image's tokens: a (T, D) tensor or array; one image with its Pan & Scan crops: an ImageEncoding, a (V, T, D)
# tensor or array, or a list of (T, D) ones, original first.
ImageTokens: TypeAlias = "torch.Tensor | np.ndarray | ImageEncoding | Sequence[torch.Tensor | np.ndarray]"


def image_views(images: torch.Tensor | np.ndarray | Iterable[ImageTokens]) -> list[list[torch.Tensor]]:
    """Each image's views as ``(T, D)`` tensors: the image itself, then its Pan & Scan crops in the processor's order.

    Args:
        images: what ``encode`` returns, a ``(B, T, D)`` tensor (B images, no crops) or a list of ``ImageEncoding``;
            or a list whose items are one image each: ``(T, D)``, or ``(V, T, D)`` / a list of ``(T, D)`` for an
            image and its crops (``a.png.npy``, ``a.png.crop1.npy``, ... stacked).

    Raises:
        OptionError: an item that is none of these.
    """
    if isinstance(images, (torch.Tensor, np.ndarray)):
        batch = as_tensor(images, "images")
        if batch.dim() != 3:
            raise OptionError(f"images as one tensor must be (B, T, D): B images of T tokens, got {tuple(batch.shape)}")
        return [[row] for row in batch]
    views: list[list[torch.Tensor]] = []
    for i, image in enumerate(images):
        if isinstance(image, ImageEncoding):
            views.append([view.embeddings for view in image.views])
            continue
        if isinstance(image, (list, tuple)):
            image = torch.stack([as_tensor(view, f"image {i}'s views") for view in image]) if image else None
        x = as_tensor(image, f"image {i}") if image is not None else None
        if x is None or x.dim() not in (2, 3) or 0 in x.shape:
            shape = "no views" if x is None else tuple(x.shape)
            raise OptionError(f"image {i} must be (T, D) tokens, or (V, T, D) for an image and its crops, got {shape}")
        views.append([x] if x.dim() == 2 else list(x))
    return views


def as_tensor(x: object, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise OptionError(f"{what} must be a torch tensor or numpy array of soft tokens, got {type(x).__name__}")
    return x


def image_prompt(num_crops: int = 0, tokens_per_image: int = 256) -> str:
    """The text that stands for one image in a Gemma 3 prompt: what ``Gemma3Processor`` puts for its
    ``<start_of_image>``. Without crops, one block; with them, the original's block in a sentence and one block per
    crop::

        \\n\\n<start_of_image><image_soft_token>...<end_of_image>\\n\\n
        Here is the original image {block} and here are some crops to help you see better {block} {block}
    """
    block = f"\n\n{BOI_TOKEN}{IMAGE_TOKEN * tokens_per_image}{EOI_TOKEN}\n\n"
    if not num_crops:
        return block
    return (f"Here is the original image {block} and here are some crops to help you see better "
            + " ".join([block] * num_crops))


def expand_prompt(text: str, images: torch.Tensor | np.ndarray | Iterable[ImageTokens]) -> str:
    """``text`` with its i-th ``<start_of_image>`` replaced by image i's full sequence (``image_prompt``), as the
    processor does before tokenizing: tokenize the result with the model's tokenizer.

    Raises:
        PromptError: the text has a different number of ``<start_of_image>`` than there are images.
    """
    views = image_views(images)
    parts = text.split(BOI_TOKEN)
    if len(parts) - 1 != len(views):
        raise PromptError(f"the prompt has {len(parts) - 1} {BOI_TOKEN} placeholders, but {len(views)} images were "
                          "given: put one placeholder where each image goes")
    out = [parts[0]]
    for image, part in zip(views, parts[1:], strict=True):
        out += [image_prompt(len(image) - 1, image[0].shape[0]), part]
    return "".join(out)


@dataclass
class SplicedPrompt:
    """A prompt ready for ``Gemma3ForConditionalGeneration``: call ``model(**prompt.kwargs())``."""

    inputs_embeds: torch.Tensor  # (B, L, D) in the embedding layer's dtype: text embeddings, soft tokens in the slots
    token_type_ids: torch.Tensor  # (B, L) int64: 1 on the soft tokens, 0 elsewhere; makes each image bidirectional

    def kwargs(self) -> dict[str, torch.Tensor]:
        return {"inputs_embeds": self.inputs_embeds, "token_type_ids": self.token_type_ids}


def splice_images(input_ids: torch.Tensor | np.ndarray | Sequence[int],
                  images: torch.Tensor | np.ndarray | Iterable[ImageTokens],
                  embed: Callable[[torch.Tensor], torch.Tensor], *, image_token_id: int = IMAGE_TOKEN_ID,
                  pad_token_id: int = PAD_TOKEN_ID) -> SplicedPrompt:
    """Embed a tokenized prompt and write each image's soft tokens into its slots, as ``Gemma3Model.forward`` does
    with the tokens it computes from ``pixel_values``.

    Args:
        input_ids: ``(L,)`` or ``(B, L)`` token ids of a prompt written with ``expand_prompt`` (or the processor).
            Each run of ``image_token_id`` is one slot; slots take the views in order, row by row.
        images: the soft tokens, one entry per image (see ``image_views``); an image with Pan & Scan crops fills
            one slot per view, original first.
        embed: the language model's token embedding, ``model.get_input_embeddings()``: ids ``(B, L)`` →
            ``(B, L, D)``, scaled by sqrt(D) as Gemma's embedding layer does. The soft tokens are not scaled.
        image_token_id: ``<image_soft_token>``'s id (``model.config.image_token_id``).
        pad_token_id: embedded at the slots before they are overwritten (the image token may lie outside the
            embedding table, as transformers allows).

    Raises:
        PromptError: the prompt's slots differ in number from the views given, a slot's length from its view's
            rows, or the tokens' width from the embeddings'.
    """
    ids = torch.as_tensor(np.asarray(input_ids) if isinstance(input_ids, Sequence) else input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    weight = getattr(embed, "weight", None)  # an nn.Embedding: the ids go where its table is (a GPU, say)
    if isinstance(weight, torch.Tensor):
        ids = ids.to(weight.device)
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise OptionError(f"input_ids must be integer token ids, (L,) or (B, L), got {ids.dtype} {tuple(ids.shape)}")
    per_image = image_views(images)
    views = [view for image in per_image for view in image]
    is_image = ids == image_token_id  # (B, L)
    lengths = slot_lengths(is_image)
    if len(lengths) != len(views):
        raise PromptError(
            f"the prompt has {len(lengths)} image slots (runs of token {image_token_id}), but the images give "
            f"{len(views)} ({len(per_image)} images, {len(views) - len(per_image)} Pan & Scan crops): write the "
            "prompt with expand_prompt for these images")
    for i, (length, view) in enumerate(zip(lengths, views, strict=True)):
        if length != view.shape[0]:
            raise PromptError(f"image slot {i} holds {length} tokens, but its view has {view.shape[0]} soft tokens")
    embeds = embed(ids.masked_fill(is_image, pad_token_id))  # (B, L, D)
    if views and views[0].shape[-1] != embeds.shape[-1]:
        raise PromptError(f"the soft tokens are {views[0].shape[-1]} wide, the language model's embeddings "
                          f"{embeds.shape[-1]}: encode with the vision model of this checkpoint")
    if views:
        tokens = torch.cat(views).to(embeds.device, embeds.dtype)  # (slots' total length, D)
        # Row-major order fills the slots one after the other, as the model's masked_scatter does.
        embeds = embeds.masked_scatter(is_image[..., None].to(embeds.device), tokens)
    return SplicedPrompt(inputs_embeds=embeds, token_type_ids=is_image.long())


def slot_lengths(is_image: torch.Tensor) -> list[int]:
    """``(B, L)`` bool → the length of each run of True, row by row: the image slots, in prompt order."""
    edges = F.pad(is_image.int(), (1, 1)).diff(dim=1)  # (B, L + 1): +1 where a run starts, -1 one past its end
    starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()  # (R, 2) each, row-major
    return (ends[:, 1] - starts[:, 1]).tolist()


@torch.no_grad()
def greedy_generate(model: Any, prompt: SplicedPrompt, max_new_tokens: int, *,
                    eos_token_id: int | Sequence[int] | None = None) -> torch.Tensor:
    """Greedy decoding from a spliced prompt: one forward over the prompt, then one per new token with the KV cache.

    It makes the calls ``model.generate(input_ids=..., pixel_values=..., do_sample=False)`` makes: the prompt with
    its ``token_type_ids`` first, then each new token alone (no token types: the mask is plain causal after the
    prompt), the argmax of the last logits each time.

    Args:
        model: a transformers ``Gemma3ForConditionalGeneration`` (or anything called the same way).
        prompt: ``splice_images``' result for one prompt (batch 1).
        max_new_tokens: tokens to generate at most.
        eos_token_id: stop after generating this id (or any of these); ``None`` generates ``max_new_tokens``.

    Returns:
        ``(1, n)`` int64: the new tokens, ``n <= max_new_tokens``.
    """
    if prompt.inputs_embeds.shape[0] != 1:
        raise OptionError(f"greedy_generate takes one prompt (batch 1), got a batch of {prompt.inputs_embeds.shape[0]}")
    if max_new_tokens < 1:
        raise OptionError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    stop = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    params = inspect.signature(model.forward).parameters
    cache_name = "cache" if "cache" in params else "past_key_values"  # transformers 5.x names it cache
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    out = model(**prompt.kwargs(), use_cache=True, **keep_last)
    new: list[torch.Tensor] = []
    while True:
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        new.append(token)
        if len(new) == max_new_tokens or token.item() in stop:
            return torch.cat(new, dim=1)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        out = model(input_ids=token, use_cache=True, **{cache_name: cache}, **keep_last)
