"""checkpoint.py on its own: manifests (sizes, opt-in sha256), resume discovery and pruning, state shards."""
from __future__ import annotations

import json

import torch

import checkpoint as ck


def test_manifest_sizes_always_sha256_with_checksum(tmp_path):
    """Without --checksum a save records sizes only (a truncated file is caught, same-size damage is not); with
    it the sha256 of every file is recorded and checked."""
    for checksum in (False, True):
        tmp = ck.begin(tmp_path, "c")
        (tmp / "x.bin").write_bytes(b"\1" * 100)
        final = ck.commit(tmp_path, tmp, "c", checksum)
        info = json.loads((final / ck.MANIFEST).read_text())["files"]["x.bin"]
        assert info["size"] == 100 and ("sha256" in info) == checksum
        (final / "x.bin").write_bytes(b"\0" * 100)
        assert (ck.verify(final) is None) != checksum
        (final / "x.bin").write_bytes(b"\0" * 99)
        assert "size 99 != 100" in ck.verify(final)


def test_resume_discovery_skips_corrupt_and_prunes(tmp_path):
    for step in (1, 2, 3):
        tmp = ck.begin(tmp_path, ck.checkpoint_name(step))
        (tmp / "x.bin").write_bytes(bytes([step]) * 100)
        ck.commit(tmp_path, tmp, ck.checkpoint_name(step), checksum=True)
    assert (tmp_path / ck.LATEST).read_text().strip() == "checkpoint-000003"
    (tmp_path / "checkpoint-000003" / "x.bin").write_bytes(b"\0" * 100)  # same size, other content
    (tmp_path / ".tmp-checkpoint-000004").mkdir()
    path, notes = ck.find_resumable(tmp_path)
    assert path.name == "checkpoint-000002"
    assert any("checkpoint-000003" in n and "sha256" in n for n in notes)
    assert any(".tmp-checkpoint-000004" in n for n in notes)
    ck.set_best(tmp_path, "checkpoint-000001")
    assert ck.prune(tmp_path, 1, {"checkpoint-000003", ck.best_target(tmp_path)}) == ["checkpoint-000002"]
    assert (tmp_path / ck.BEST / "x.bin").read_bytes() == bytes([1]) * 100


def test_state_shards_rechunk_across_world_sizes(tmp_path):
    full = torch.arange(35, dtype=torch.float32).reshape(7, 5)
    for r, chunk in enumerate(torch.chunk(full, 3)):
        ck.save_state_shard(tmp_path, {"w": chunk, "step": torch.tensor(4.0), f"rng.torch.rank{r}": torch.tensor([r])},
                            {"w"}, {"w": [7, 5]}, r, 3)
    same, saved = ck.load_state_shard(tmp_path, 1, 3)
    assert saved == 3 and torch.equal(same["w"], torch.chunk(full, 3)[1]) and same["rng.torch.rank1"].item() == 1
    for world in (1, 2):
        parts = [ck.load_state_shard(tmp_path, r, world)[0] for r in range(world)]
        assert torch.equal(torch.cat([p["w"] for p in parts]), full)
        assert all(p["step"].item() == 4.0 and not any(k.startswith("rng.") for k in p) for p in parts)
