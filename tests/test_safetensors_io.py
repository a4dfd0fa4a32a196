"""The safetensors I/O module against independent readers and writers: ``safetensors``'
own ``load_file``, ``transformers``' ``save_pretrained`` / ``from_pretrained``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from griffin_export.errors import ModelLoadError, UsageError
from griffin_export.storage import atomic
from griffin_export.storage.safetensors_io import (
    INDEX_NAME,
    SafetensorsReader,
    ShardWriter,
    list_shards,
    parse_size,
    save_file,
)

from tiny import tiny_model


def _write_like_save_pretrained(model: torch.nn.Module, directory: Path, max_bytes: int) -> None:
    state = model.state_dict()
    layout = [(key, tuple(t.shape), t.dtype) for key, t in state.items()]
    writer = ShardWriter(directory, layout, max_bytes, sum(t.numel() for t in state.values()))
    for key in reversed(list(state)):  # handed over out of order: written in plan order
        writer.put(key, state[key])
    writer.close()


def test_shards_match_save_pretrained_and_load_everywhere(tmp_path: Path) -> None:
    """Shards cut by our writer carry the same file names and index json as
    ``save_pretrained`` for the same state dict and max shard size, load with
    ``safetensors.torch.load_file`` and with ``from_pretrained`` to the same tensors.
    Catches: a different split or naming (model-00001-of-0000n), an index with other
    metadata, wrong data offsets or padding in a header (load_file rejects or misreads)."""
    model = tiny_model("llama", tie_word_embeddings=False)
    reference, ours = tmp_path / "reference", tmp_path / "ours"
    model.save_pretrained(reference, max_shard_size="20KB")
    ours.mkdir()
    _write_like_save_pretrained(model, ours, 20_000)
    names = sorted(p.name for p in reference.glob("*.safetensors"))
    assert len(names) > 2
    assert sorted(p.name for p in ours.glob("*.safetensors")) == names
    assert json.loads((ours / INDEX_NAME).read_text()) == json.loads(
        (reference / INDEX_NAME).read_text()
    )
    for name in names:
        theirs, mine = load_file(str(reference / name)), load_file(str(ours / name))
        assert list(mine) == list(theirs) or sorted(mine) == sorted(theirs)
        for key, value in theirs.items():
            assert torch.equal(mine[key], value), key
    (ours / "config.json").write_text((reference / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(ours)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_subset_reads_equal_slicing_the_full_tensor(tmp_path: Path) -> None:
    """Rows, columns and flat element ranges read through ``get_slice`` equal slicing the
    tensor ``load_file`` loads whole. Catches an off-by-one in the row range, indices not
    shifted by the range start, or a flat range mapped to the wrong rows."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(37, 11, generator=g).to(torch.bfloat16)
    save_file({"w": full, "b": torch.randn(37, generator=g)}, tmp_path / "model.safetensors", {})
    whole = load_file(str(tmp_path / "model.safetensors"))
    index = torch.tensor([3, 4, 9, 20, 36])
    with SafetensorsReader.open(tmp_path) as tensors:
        assert torch.equal(tensors.select("w", index, 0), whole["w"][index])
        assert torch.equal(
            tensors.select("w", torch.tensor([1, 7, 10]), 1), whole["w"][:, [1, 7, 10]]
        )
        assert torch.equal(tensors.select("b", index, 0), whole["b"][index])
        for start, stop in [(0, 5), (10, 30), (200, 407), (406, 407)]:
            assert torch.equal(tensors.flat("w", start, stop), whole["w"].reshape(-1)[start:stop])
        assert tensors.shape("w") == (37, 11) and tensors.dtype_code("w") == "BF16"


def test_reader_reads_only_the_bytes_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``get``, ``flat`` and ``chunks`` read exactly the bytes of what they return (counted at
    ``os.preadv``), and ``get``/``map``/``chunks`` give ``load_file``'s values. Catches a
    reader that loads a whole tensor (or file) to return a range of it, or a wrong offset."""
    g = torch.Generator().manual_seed(1)
    state = {"a": torch.randn(64, 8, generator=g), "b": torch.randn(5, 3, generator=g)}
    save_file(state, tmp_path / "model.safetensors", {"format": "pt"})
    whole = load_file(str(tmp_path / "model.safetensors"))
    read: list[int] = []
    real = os.preadv

    def counting(fd: int, buffers: list[memoryview], offset: int) -> int:
        n = real(fd, buffers, offset)
        read.append(n)
        return n

    monkeypatch.setattr(os, "preadv", counting)
    with SafetensorsReader.open(tmp_path) as reader:
        assert torch.equal(reader.get("b"), whole["b"]) and sum(read) == 5 * 3 * 4
        read.clear()
        assert torch.equal(reader.flat("a", 100, 110), whole["a"].reshape(-1)[100:110])
        assert sum(read) == 10 * 4
        read.clear()
        pieces = b"".join(bytes(piece) for piece in reader.chunks("a", chunk_bytes=100).read())
        assert pieces == whole["a"].numpy().tobytes() and sum(read) == 64 * 8 * 4
        assert torch.equal(reader.map("a"), whole["a"]) and reader.mapped_bytes >= 64 * 8 * 4
        assert reader.metadata(tmp_path / "model.safetensors") == {"format": "pt"}


def test_reader_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    """A truncated file fails when opened (safetensors' own check); a dtype griffin does not
    read is listed with its code but refused, naming it, when its values are asked for; a
    directory without weights is refused by ``open``. Catches a reader that opens truncated
    files and fails later with an obscure read error, or reads F8 bytes as something else."""
    save_file({"w": torch.ones(4, 4)}, tmp_path / "model.safetensors", {})
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(SafetensorError, match="not fully covered"):
        SafetensorsReader.open(tmp_path)
    header = json.dumps({"f8": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})
    header += " " * (-len(header) % 8)
    raw = len(header).to_bytes(8, "little") + header.encode() + b"\x00\x00"
    (tmp_path / "model.safetensors").write_bytes(raw)
    with SafetensorsReader.open(tmp_path) as reader:
        assert reader.keys() == ["f8"] and reader.dtype_code("f8") == "F8_E4M3"
        with pytest.raises(ModelLoadError, match="F8_E4M3"):
            reader.get("f8")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no safetensors weights"):
        SafetensorsReader.open(tmp_path)


def test_save_file_bytes_do_not_depend_on_insertion_order(tmp_path: Path) -> None:
    """Two writes of the same tensors and metadata, inserted in different orders, give the
    same bytes, and ``load_file`` reads them back. Catches a header written in dict order
    (``safetensors.torch.save_file`` writes metadata in a random order)."""
    a = {"x": torch.arange(6).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    b = {"a": a["a"], "x": a["x"]}
    save_file(a, tmp_path / "a.safetensors", {"format": "pt", "d_ff": "3"})
    save_file(b, tmp_path / "b.safetensors", {"format": "pt", "d_ff": "3"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    back = load_file(str(tmp_path / "a.safetensors"))
    assert torch.equal(back["x"], a["x"]) and torch.equal(back["a"], a["a"])
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "d_ff": "3"}


def test_list_shards(tmp_path: Path) -> None:
    """The index's shards, the missing ones named; an unreadable index refused in one line;
    a directory without weights lists none. Catches globbing every *.safetensors (the
    experts file of an export is not a weight file)."""
    (tmp_path / "griffin_experts.safetensors").write_bytes(b"")
    assert list_shards(tmp_path).files == []
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    shards = list_shards(tmp_path)
    assert [p.name for p in shards.files] == ["model-00001-of-00002.safetensors"]
    assert shards.missing == ["model-00002-of-00002.safetensors"]
    (tmp_path / INDEX_NAME).write_text("{not json")
    with pytest.raises(ModelLoadError, match="malformed"):
        list_shards(tmp_path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), (" 1.5 kb", 1500), (10, 10)],
)
def test_parse_size(text: str | int, expected: int) -> None:
    """Units as save_pretrained reads them (KB = 1000 bytes, KiB = 1024). Catches binary
    units used for GB (shards 7% larger than save_pretrained's)."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["5 parsecs", "", "GB", "-1GB", 0])
def test_parse_size_refuses_nonsense(text: str | int) -> None:
    """A size that is not one is refused naming the value. Catches falling back to a default."""
    with pytest.raises(UsageError, match="max-shard-size"):
        parse_size(text)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name descriptors")
def test_atomic_directory_fsyncs_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file written, the temporary directory and its parent are fsynced before the
    rename that publishes the export, and the parent again after it. Catches a commit that
    renames without syncing (a crash then leaves the name pointing at empty files)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_commit = os.fsync, atomic._commit

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def commit(tmp: Path, target: Path) -> None:
        events.append(("rename", str(tmp)))
        real_commit(tmp, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(atomic, "_commit", commit)
    target = tmp_path / "out"
    with atomic.atomic_directory(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub" / "b.bin").write_bytes(b"b")
        written = {str(tmp / "a.bin"), str(tmp / "sub" / "b.bin"), str(tmp / "sub"), str(tmp)}
    rename = events.index(("rename", str(tmp)))
    before = {path for kind, path in events[:rename] if kind == "fsync"}
    assert written <= before
    assert str(tmp_path) in before
    assert ("fsync", str(tmp_path)) in events[rename + 1 :]
    assert (target / "sub" / "b.bin").read_bytes() == b"b"
