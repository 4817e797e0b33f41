"""Safetensors shards and output dtypes in the encode job, and ``open_embeddings`` over both layouts: what the
shards hold, resuming, switching layouts, failures, float16's range, and a kill while a shard is written."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_pipeline import fake_encode, job, png, records, two_views, with_extras

import gemma3_vision as g3
from gemma3_vision.errors import DamagedOutputError, InputNotFoundError, OptionError
from gemma3_vision.jobs.output_folder import INDEX_NAME, TMP_DIR_NAME


@pytest.fixture()
def seven(tmp_path) -> Path:
    root = tmp_path / "in"
    for i in range(7):
        png(root / f"{i}.png", i)
    return root


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "shards").glob("*.safetensors"))


def same_embeddings(a: Path, b: Path) -> None:
    """Every input of folder ``a`` has the same arrays in folder ``b``, bit for bit."""
    ea, eb = g3.open_embeddings(a), g3.open_embeddings(b)
    assert len(ea) == len(eb) > 0
    for name, _ in ea:
        arrays_a, arrays_b = ea.arrays(name), eb.arrays(name)
        assert arrays_a.keys() == arrays_b.keys(), name
        for k in arrays_a:
            assert torch.equal(arrays_a[k], arrays_b[k]), f"{name} {k!r}: max abs diff " \
                f"{(arrays_a[k].float() - arrays_b[k].float()).abs().max()}"


# ------------------------------------------------------------------------------------------------------ layout

def test_shards_of_n_images_hold_what_npy_files_hold_and_records_name_shard_and_key(seven, tmp_path):
    summary = job([str(seven)], tmp_path / "sharded", shard_size=3)
    assert summary.encoded == 7
    assert len(shard_files(tmp_path / "sharded")) == 3  # 3 + 3 + 1
    recs = records(tmp_path / "sharded")
    assert [r["key"] for r in recs] == ["0", "1", "2", "0", "1", "2", "0"]
    assert len({r["shard"] for r in recs}) == 3 and all("output" not in r for r in recs)
    for r in recs:  # the record states the shard's size and time, as an .npy record states its file's
        st = os.stat(tmp_path / "sharded" / r["shard"])
        assert (r["output_bytes"], r["output_mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    with safe_open(tmp_path / "sharded" / recs[0]["shard"], framework="pt") as f:
        assert json.loads(f.metadata()["inputs"]) == [r["path"] for r in recs[:3]]  # self-describing
    assert not list((tmp_path / "sharded").rglob("*.npy"))
    job([str(seven)], tmp_path / "files")
    same_embeddings(tmp_path / "sharded", tmp_path / "files")


def test_extra_arrays_and_crops_go_into_the_shard_under_their_own_keys(seven, tmp_path):
    kw = {"encode": with_extras("layer13", "pooled"), "make_input": two_views}
    job([str(seven)], tmp_path / "sharded", shard_size=4, **kw)
    job([str(seven)], tmp_path / "files", **kw)
    r = records(tmp_path / "sharded")[5]
    assert r["keys"] == {"layer13": "1.layer13", "pooled": "1.pooled", "crop1": "1.crop1",
                         "crop1.layer13": "1.crop1.layer13", "crop1.pooled": "1.crop1.pooled"}
    same_embeddings(tmp_path / "sharded", tmp_path / "files")


def test_a_sharded_folder_resumes_and_encodes_again_only_what_changed_or_was_lost(seven, tmp_path):
    out = tmp_path / "out"
    job([str(seven)], out, shard_size=3)
    again = job([str(seven)], out, shard_size=3)
    assert (again.encoded, again.done_before) == (0, 7)
    png(seven / "2.png", 99)  # new bytes
    lost = records(out)[4]["shard"]  # images 3, 4, 5
    (out / lost).unlink()
    summary = job([str(seven)], out, shard_size=3)
    assert (summary.encoded, summary.done_before) == (4, 3)
    assert sorted(r["input"].rsplit("/", 1)[1] for r in records(out)[7:]) == ["2.png", "3.png", "4.png", "5.png"]
    fresh = tmp_path / "fresh"
    job([str(seven)], fresh)
    same_embeddings(out, fresh)


def test_switching_layouts_redoes_nothing_and_overwrite_removes_the_npy_files_it_replaced(seven, tmp_path):
    out = tmp_path / "out"
    job([str(seven)], out, encode=with_extras("pooled"))
    assert job([str(seven)], out, encode=with_extras("pooled"), shard_size=3).done_before == 7  # same values
    summary = job([str(seven)], out, encode=with_extras("pooled"), shard_size=3, overwrite=True)
    assert summary.encoded == 7
    assert not list(out.rglob("*.npy")), "the .npy files of inputs now in shards are removed"
    assert len(g3.open_embeddings(out)) == 7 and "shard" in g3.open_embeddings(out).record(str(seven / "0.png"))
    back = job([str(seven)], out, encode=with_extras("pooled"), overwrite=True)  # and back to .npy files
    assert back.encoded == 7 and len(list(out.rglob("*.npy"))) == 14
    assert "output" in g3.open_embeddings(out).record(str(seven / "0.png"))


def test_a_shard_is_removed_once_every_image_in_it_is_encoded_again_elsewhere(seven, tmp_path):
    out = tmp_path / "out"
    job([str(seven)], out, shard_size=3)
    first = shard_files(out)
    png(seven / "0.png", 50)  # one image of the first shard changes: that shard still holds two current images
    (seven / "3.png").write_bytes(b"broken now")  # one of the second fails: two current images left there
    job([str(seven)], out, shard_size=3)
    assert set(first) < set(shard_files(out))
    (seven / "6.png").write_bytes(b"broken too")  # the only image of the third shard fails: the shard goes
    job([str(seven)], out, shard_size=3)
    assert first[2] not in shard_files(out) and set(first[:2]) < set(shard_files(out))
    for _ in range(2):  # each --overwrite re-encodes everything: the folder does not grow
        job([str(seven)], out, shard_size=3, overwrite=True)
        assert len(shard_files(out)) == 2, shard_files(out)
    assert not set(first) & set(shard_files(out))
    emb = g3.open_embeddings(out)
    assert len(emb) == 5 and all(t.shape == (2, 3) for _, t in emb)
    # A fresh run over the index agrees: nothing it needs is missing.
    assert job([str(seven)], out, shard_size=3).done_before == 5


def test_failed_inputs_get_error_records_and_no_place_in_a_shard(seven, tmp_path):
    (seven / "3.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    summary = job([str(seven)], out, shard_size=3)
    assert (summary.encoded, summary.failed) == (6, 1)
    assert len(shard_files(out)) == 2
    emb = g3.open_embeddings(out)
    assert len(emb) == 6 and str(seven / "3.png") not in emb
    assert job([str(seven)], out, shard_size=3).failed_before == 1


# ------------------------------------------------------------------------------------------------ output dtypes

def test_float16_outputs_match_a_float32_run_cast_and_bfloat16_needs_shards(seven, tmp_path):
    job([str(seven)], tmp_path / "f32")
    job([str(seven)], tmp_path / "f16", out_dtype="float16")
    job([str(seven)], tmp_path / "bf16", out_dtype="bfloat16", shard_size=4)
    f32 = g3.open_embeddings(tmp_path / "f32")
    for out, dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        for name, t in g3.open_embeddings(tmp_path / out):
            assert t.dtype == dtype and torch.equal(t, f32[name].to(dtype)), name  # exactly the cast
    assert np.load(tmp_path / "f16" / "0.png.npy").dtype == np.float16
    with pytest.raises(OptionError, match="bfloat16 outputs need safetensors shards"):
        job([str(seven)], tmp_path / "bad", out_dtype="bfloat16")
    assert not (tmp_path / "bad").exists(), "refused before the folder is made"


@pytest.mark.parametrize("shard_size", [None, 3])
def test_float16_refuses_an_image_whose_output_exceeds_its_range_and_records_why(seven, tmp_path, shard_size):
    """float16's policy: an output beyond ±65504 fails its input (an error record naming the value), never
    saturates; the others are written."""
    def loud(pixels: np.ndarray) -> np.ndarray:
        out = fake_encode(pixels)
        out[pixels[:, 0, 0, 0] > 0] *= 1e6  # (B, 2, 3): images whose first pixel is bright overflow float16
        return out

    out = tmp_path / "out"
    summary = job([str(seven)], out, encode=loud, out_dtype="float16", shard_size=shard_size)
    failed = [r for r in records(out) if r["status"] == "error"]
    assert summary.failed == len(failed) and 0 < len(failed) < 7, records(out)
    assert all("beyond float16's range" in r["error"] and "--out-dtype bfloat16" in r["error"] for r in failed)
    for _, t in g3.open_embeddings(out):
        assert torch.isfinite(t).all()
    assert job([str(seven)], out, encode=loud, out_dtype="float16", shard_size=shard_size).failed_before == len(failed)


def test_the_job_key_holds_the_output_dtype_and_default_keys_are_unchanged():
    from gemma3_vision.jobs.job import EncodeOptions, job_key

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = g3.load("random:tiny", dtype="float32", device="cpu", backend="torch")
    assert job_key(encoder, EncodeOptions()) == "846cc669238797d7"  # as tests/test_preprocess.py pins it
    keys = {dtype: job_key(encoder, EncodeOptions(out_dtype=dtype)) for dtype in ("float32", "float16", "bfloat16")}
    assert len(set(keys.values())) == 3


# ------------------------------------------------------------------------------------------------ kill safety

def test_a_kill_while_a_shard_is_renamed_leaves_no_record_of_its_images_and_no_shard(seven, tmp_path, monkeypatch):
    """The shard's rename is its commit point: interrupted just before it, the job leaves the earlier shards and
    their records, nothing of this shard under shards/, and the next run encodes its images."""
    out = tmp_path / "out"
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if str(dst).endswith("-000002.safetensors"):
            raise KeyboardInterrupt  # as a Ctrl-C, or a kill, at that instant
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        job([str(seven)], out, shard_size=3)
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(shard_files(out)) == 1 and not (out / TMP_DIR_NAME).exists()
    assert [r["input"].rsplit("/", 1)[1] for r in records(out)] == ["0.png", "1.png", "2.png"]
    summary = job([str(seven)], out, shard_size=3)
    assert (summary.encoded, summary.done_before) == (4, 3)


def test_an_interrupted_job_writes_the_shard_it_has_so_far(seven, tmp_path):
    """Ctrl-C or SIGTERM between batches: the images already encoded go into a last, smaller shard."""
    out = tmp_path / "out"
    seen = []

    def stop_after_four(pixels: np.ndarray) -> np.ndarray:
        seen.append(len(pixels))
        if len(seen) == 5:
            raise KeyboardInterrupt
        return fake_encode(pixels)

    with pytest.raises(KeyboardInterrupt):
        job([str(seven)], out, shard_size=100, encode=stop_after_four)
    assert len(shard_files(out)) == 1 and len(records(out)) == 4


# ------------------------------------------------------------------------------------------------------ reader

@pytest.mark.parametrize("shard_size", [None, 3])
def test_the_reader_iterates_lazily_and_finds_an_input_by_name_or_path(seven, tmp_path, monkeypatch, shard_size):
    out = tmp_path / "out"
    (seven / "6.png").write_bytes(b"broken")
    job([str(seven)], out, shard_size=shard_size)
    emb = g3.open_embeddings(out)
    assert len(emb) == 6
    names = [name for name, _ in emb]
    assert names == [f"{seven}/{i}.png" for i in range(6)]
    monkeypatch.chdir(seven.parent)
    expected = torch.from_numpy(fake_encode(_pixels(seven / "2.png")))
    for name in (f"{seven}/2.png", "in/2.png", "./in/2.png"):
        assert torch.allclose(emb[name], expected[0], atol=0), name
    with pytest.raises(InputNotFoundError, match="6.png: no embedding in"):
        emb[f"{seven}/6.png"]  # its record is a failure
    with pytest.raises(KeyError):  # also a KeyError, as a mapping's
        emb["nope.png"]
    npy = g3.open_embeddings(out, framework="np")
    assert isinstance(npy[f"{seven}/2.png"], np.ndarray)


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image
    from test_pipeline import SMALL

    from gemma3_vision.model.preprocessing import pil_to_input

    return pil_to_input(Image.open(path).convert("RGB"), SMALL)[None]


def test_the_reader_reports_a_damaged_folder_with_typed_errors(seven, tmp_path):
    with pytest.raises(DamagedOutputError, match="cannot read index.jsonl"):
        g3.open_embeddings(tmp_path / "nothing-here")
    files, sharded = tmp_path / "files", tmp_path / "sharded"
    job([str(seven)], files)
    job([str(seven)], sharded, shard_size=3)
    (files / "1.png.npy").unlink()
    with pytest.raises(DamagedOutputError, match="1.png"):
        g3.open_embeddings(files)[f"{seven}/1.png"]
    np.save(files / "2.png.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)  # never unpickled
    with pytest.raises(DamagedOutputError, match="allow_pickle"):
        g3.open_embeddings(files)[f"{seven}/2.png"]
    shard = sharded / records(sharded)[0]["shard"]
    shard.write_bytes(shard.read_bytes()[:100])  # torn
    with pytest.raises(DamagedOutputError, match="cannot read the output"):
        g3.open_embeddings(sharded)[f"{seven}/0.png"]
    # A crafted record naming a file outside the folder is not followed: its input has no embedding.
    with open(sharded / INDEX_NAME, "a") as f:
        f.write(json.dumps({"input": "x.png", "path": "/x.png", "status": "ok", "output": "../../etc/passwd.npy",
                            "shape": [1]}) + "\n")
    assert "x.png" not in g3.open_embeddings(sharded)
