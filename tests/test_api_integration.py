"""The encoder as other code uses it: pickled into worker processes, its outputs trained on or changed in place,
images from any iterable, options from numpy, and an image's tokens whatever batch it came in."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import gemma3_vision as g3
from conftest import TINY_PROJECTOR, TINY_VISION, make_rgb, random_state
from format_fixtures import write_hf_folder
from gemma3_vision.checkpoints.convert import convert
from gemma3_vision.checkpoints.resolve import resolve
from gemma3_vision.errors import ConfigError, OptionError, WeightsError


def load(model, **kw) -> g3.Gemma3Vision:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", g3.RandomWeightsWarning)
        return g3.load(model, device="cpu", **kw)


IMAGES = [make_rgb(50, 70, seed=1), make_rgb(90, 40, seed=2), make_rgb(64, 64, seed=3)]


@pytest.mark.parametrize("source", ["random", "hf", "mmproj"])
def test_a_pickled_model_encodes_as_the_original(tmp_path, source):
    # What a spawned DataLoader worker or torch.multiprocessing does with a model handed to it.
    model = "random:tiny"
    if source != "random":
        model = write_hf_folder(tmp_path / "hf", random_state("tiny"), TINY_VISION, TINY_PROJECTOR)
        if source == "mmproj":
            convert(resolve(model), tmp_path / "m.gguf", "mmproj")
            model = tmp_path / "m.gguf"
    original = load(model, dtype="float32")
    copy = pickle.loads(pickle.dumps(original))
    d = (copy.encode(IMAGES) - original.encode(IMAGES)).abs().max().item()
    assert d == 0.0, f"pickled vs original: max abs diff {d:.3g} (tolerance 0)"
    name = next(iter(copy.checkpoint.tensors))
    with pytest.raises(WeightsError, match=f"{name} was read when the model loaded"):
        copy.checkpoint.tensors[name].read()


def test_outputs_are_ordinary_tensors(tiny_model):
    # inference_mode tensors refuse in-place changes and autograd outside it; a probe trained on pooled vectors
    # needs both.
    pixels = tiny_model.preprocess(IMAGES)
    tokens = tiny_model.encode_pixels(pixels)
    [result] = tiny_model.encode(IMAGES[:1], pool="mean", layers=[1])
    for t in (tokens, tiny_model.encode(IMAGES), result.embeddings, result.pooled, result.layers[1]):
        assert not t.is_inference() and not t.requires_grad
    tokens += 1
    head = torch.nn.Linear(TINY_PROJECTOR.text_hidden_size, 2)
    head(result.pooled).sum().backward()
    assert head.weight.grad is not None


def test_gradients_flow_through_the_modules(tiny_model):
    # encode_pixels computes without gradients; docs/python-api.md's route for them is the modules themselves.
    pixels = tiny_model.preprocess(IMAGES[:1]).requires_grad_()
    model = tiny_model.model
    assert model.multi_modal_projector is not None
    model.multi_modal_projector(model.vision_tower(pixels)).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_images_come_from_any_iterable(tiny_model):
    expected = tiny_model.encode(IMAGES)
    for images in (tuple(IMAGES), (im for im in IMAGES), iter(IMAGES), map(np.asarray, IMAGES)):
        d = (tiny_model.encode(images) - expected).abs().max().item()
        assert d == 0.0, f"{type(images).__name__}: max abs diff {d:.3g} (tolerance 0)"
    assert tiny_model.encode(IMAGES[0]).shape == expected[:1].shape  # one array alone is one image
    with pytest.raises(g3.ImageError, match="got Tensor"):
        tiny_model.encode(torch.zeros(2, 8, 8, 3))  # one (bad) input, not two rows


def test_an_image_files_bytes_are_one_image(tiny_model, tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(IMAGES[0]).save(path)
    data = path.read_bytes()
    expected = tiny_model.encode([path])
    assert torch.equal(tiny_model.encode(data), expected)  # not a sequence of ints
    assert torch.equal(tiny_model.encode([bytearray(data), memoryview(data)]), torch.cat([expected, expected]))


def test_no_images_give_no_rows_at_every_step(tiny_model):
    pixels = tiny_model.preprocess([])
    assert pixels.shape == (0, TINY_VISION.image_size, TINY_VISION.image_size, 3)
    assert tiny_model.encode_pixels(pixels).shape == tiny_model.encode([]).shape == (0, 16, 96)


def test_integer_options_take_numpy_integers_and_nothing_else(tiny_model):
    image = IMAGES[:1]
    expected = tiny_model.encode(image, layers=[1])[0].layers[1]
    got = tiny_model.encode(image, layers=[np.int64(1)], batch_size=np.int32(2))[0].layers[1]
    assert torch.equal(got, expected)
    assert tiny_model.encode(image, image_size=np.int64(224)).shape == (1, 64, TINY_PROJECTOR.text_hidden_size)
    np_pas = tiny_model.encode(image, pan_and_scan=True, pan_and_scan_min_crop_size=np.int64(20),
                               pan_and_scan_max_num_crops=np.int64(3), pan_and_scan_min_ratio_to_activate=np.float32(1.2))
    assert np_pas[0].crop_boxes and [r.crop_boxes for r in np_pas] == [r.crop_boxes for r in tiny_model.encode(
        image, pan_and_scan=True, pan_and_scan_min_crop_size=20, pan_and_scan_max_num_crops=3)]
    for bad in (2.5, True, "2", 0):
        with pytest.raises(OptionError, match=f"batch_size must be an integer of at least 1, got {bad!r}"):
            tiny_model.encode(image, batch_size=bad)


def test_encode_pixels_refuses_integer_pixels(tiny_model):
    pixels = tiny_model.preprocess(IMAGES[:1])
    assert torch.equal(tiny_model.encode_pixels(pixels.numpy()), tiny_model.encode_pixels(pixels))
    as_uint8 = ((pixels + 1) * 127.5).round().to(torch.uint8)  # what a caller might pass by mistake
    with pytest.raises(ConfigError, match=r"floating point in \[-1, 1\].*got torch.uint8"):
        tiny_model.encode_pixels(as_uint8)
    with pytest.raises(ConfigError, match="torch tensor or numpy array, got list"):
        tiny_model.encode_pixels([[0.0]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_images_tokens_do_not_depend_on_its_batch(tiny_model, dtype):
    model = load("random:tiny", dtype=dtype)
    alone = torch.cat([model.encode([image]) for image in IMAGES])
    together = model.encode(IMAGES, batch_size=len(IMAGES))
    d = (alone.float() - together.float()).abs().max().item()
    assert d == 0.0, f"{dtype}: alone vs in a batch of {len(IMAGES)}: max abs diff {d:.3g} (tolerance 0)"


@pytest.mark.parametrize("preset", ["tiny", "gemma3-4b"])
def test_the_projector_gives_an_image_the_same_tokens_in_any_batch(preset):
    # At full width a batch of 8 in one product and one norm differed from the images alone by 1 bf16 ulp.
    projector = load(f"random:{preset}", dtype="bfloat16").model.multi_modal_projector
    assert projector is not None
    vision = g3.PRESETS[preset][0]
    x = torch.randn(8, vision.num_patches, vision.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = torch.cat([projector(x[i:i + 1].bfloat16()) for i in range(8)])
        together = projector(x.bfloat16())
    d = (alone.float() - together.float()).abs().max().item()
    assert d == 0.0, f"{preset}: alone vs in a batch of 8: max abs diff {d:.3g} (tolerance 0)"


def test_fp16_weights_on_a_cpu_without_fp16_project_in_fp32(monkeypatch):
    monkeypatch.setattr(g3.api, "cpu_has_fast_fp16", lambda: False)
    model = load("random:tiny", dtype="float16")
    projector = model.model.multi_modal_projector
    assert projector is not None and projector.compute_dtype == torch.float32
    x = torch.randn(2, TINY_VISION.num_patches, TINY_VISION.hidden_size).half()
    with torch.no_grad():
        got = projector(x)
        projector.compute_dtype = None  # the old way: in the input's fp16
        fp16 = projector(x)
        projector.float()
        fp32 = projector(x.float()).half()
    assert got.dtype == torch.float16
    d = (got.float() - fp32.float()).abs().max().item()
    assert d == 0.0, f"fp16 weights computed in fp32 vs the fp32 projector: max abs diff {d:.3g} (tolerance 0)"
    assert not torch.equal(fp16, got)  # the check can fail: fp16 compute gives other values


def test_a_pickled_random_model_carries_its_weights_not_their_pools(tiny_model):
    # Random weights are windows of shared pools; pickled whole, random:tiny took 70 MB for 0.5 MB of weights.
    weights = sum(p.numel() * p.element_size() for p in tiny_model.model.parameters())
    size = len(pickle.dumps(tiny_model))
    assert size < 1.5 * weights, f"pickled {size:,} bytes for {weights:,} bytes of weights"


def test_a_call_that_fails_its_checks_leaves_a_generator_unread(tiny_model):
    images = iter(IMAGES)
    with pytest.raises(OptionError):
        tiny_model.encode(images, batch_size=0)
    assert len(list(images)) == len(IMAGES)


def test_awkward_in_memory_inputs_get_typed_errors_or_work(tiny_model, tmp_path):
    pixels = tiny_model.preprocess(IMAGES[:1]).numpy()
    flipped = pixels[:, :, ::-1]  # negative strides, which torch.from_numpy refuses
    assert torch.equal(tiny_model.encode_pixels(flipped), tiny_model.encode_pixels(pixels[:, :, ::-1].copy()))
    released = memoryview(b"not used")
    released.release()
    with pytest.raises(g3.ImageError, match="released memoryview"):
        tiny_model.preprocess(released)
    path = tmp_path / "a.png"
    Image.fromarray(IMAGES[0]).save(path)
    with Image.open(path) as closed:
        pass  # closed before its pixels were read
    with pytest.raises(g3.ImageError, match="closed before its pixels were read"):
        tiny_model.encode([closed])
