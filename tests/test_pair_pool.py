"""Real-ESRGAN training-pair pool (sr_lab/data/pair_pool.py) and its place in SRDataModule."""
from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import compose_train
from sr_lab.config.validation import ConfigError, validate_config
from sr_lab.data import SRDataModule
from sr_lab.data.pair_pool import PairPool
from sr_lab.degradation import BicubicDegradation
from sr_lab.utils.seeding import make_generator

B = 2


def _batch(k: int, b: int = B) -> dict:
    """Batch k: pair i carries its index in every pixel of hr and lr (so pairs must stay pairs)."""
    idx = torch.arange(k * b, (k + 1) * b)
    v = idx.float().view(b, 1, 1, 1)
    return {"hr": v.expand(b, 3, 8, 8).clone(), "lr": (v + 0.5).expand(b, 3, 2, 2).clone(), "index": idx}


def _run(pool: PairPool, ks, seed: int = 0) -> list[dict]:
    return [pool(_batch(k), make_generator(seed, "pair_pool", k)) for k in ks]


def _pool_indices(pool: PairPool) -> list[int]:
    return pool.tensors["index"][:pool.filled].tolist()


def test_output_is_a_permutation_of_seen_pairs():
    """While it fills, a batch is stored and also used unchanged (BasicSR); once full, what comes out plus
    what the pool holds is exactly what went in, each pair once, and pairs stay pairs."""
    pool, seen, out = PairPool(6, B), [], []
    for k in range(12):
        batch = _batch(k)
        seen += batch["index"].tolist()
        res = pool(batch, make_generator(0, "pair_pool", k))
        assert torch.equal(res["hr"][:, 0, 0, 0], res["index"].float())  # hr and lr of one input pair
        assert torch.equal(res["lr"][:, 0, 0, 0], res["index"].float() + 0.5)
        if k < 3:
            assert res is batch and _pool_indices(pool) == seen
            continue
        got = res["index"].tolist()
        assert set(got) <= set(seen)
        out += got
        assert Counter(out + _pool_indices(pool)) == Counter(seen)
    assert len(set(out)) == len(out) == 18
    assert any(max(out[i:i + B]) - min(out[i:i + B]) >= B for i in range(0, 18, B))  # batches get mixed


def test_deterministic_under_the_seed():
    a, b, c = (_run(PairPool(8, B), range(10), seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x["index"], y["index"]) and torch.equal(x["hr"], y["hr"]) for x, y in zip(a, b))
    assert any(not torch.equal(x["index"], z["index"]) for x, z in zip(a, c))


@pytest.mark.parametrize("cut", [2, 3, 7])  # while filling, the batch that fills it, and when full
def test_state_round_trips(cut):
    full = _run(PairPool(6, B), range(12))
    first = PairPool(6, B)
    _run(first, range(cut))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # as in a checkpoint
    buf.seek(0)
    resumed = PairPool(6, B)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    rest = [resumed(_batch(k), make_generator(0, "pair_pool", k)) for k in range(cut, 12)]
    for x, y in zip(full[cut:], rest):
        assert all(torch.equal(x[key], y[key]) for key in ("hr", "lr", "index"))
    with pytest.raises(ValueError, match="size 8"):
        PairPool(8, B).load_state_dict(first.state_dict())


def test_size_must_be_a_multiple_of_the_batch():
    with pytest.raises(ValueError, match="multiple of data.batch_size=4"):
        PairPool(6, 4)
    with pytest.raises(ValueError, match="pair_pool_size"):
        SRDataModule(batch_size=4, pair_pool_size=6)
    cfg = compose_train(["data.batch_size=8", "train.total_batch_size=8", "data.pair_pool_size=180"],
                        "/tmp/unused")
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    msg = str(err.value)
    assert msg.startswith("data.pair_pool_size=180 ") and "176 or 184" in msg and "\n" not in msg
    cfg = compose_train(["data.pair_pool_size=-1"], "/tmp/unused")
    with pytest.raises(ConfigError, match=r"data.pair_pool_size=-1 must be an integer >= 0"):
        validate_config(cfg)


# ---------------------------------------------------------------- in the data module
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hr")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _dm(folder, **kw):
    args = dict(hr_dirs=str(folder), crop_size=32, batch_size=B, samples_per_epoch=4, crop_multiple=8,
                degradation=BicubicDegradation(scale=4))
    return SRDataModule(**{**args, **kw})


def _batches(dm, k):
    loader, out = dm.train_dataloader(), []
    while len(out) < k:
        for b in loader:
            out.append(dm.on_after_batch_transfer(b, 0))
            if len(out) == k:
                break
    return out


def test_off_leaves_batches_unchanged(folder):
    plain, off = _dm(folder), _dm(folder, pair_pool_size=0)
    for x, y in zip(_batches(plain, 4), _batches(off, 4)):
        assert x.keys() == y.keys() == {"hr", "lr", "index"}
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert off.state_dict() == {"consumed_samples": 8} and off.pair_pool is None


def test_datamodule_pool_resumes_exactly(folder):
    pooled = _dm(folder, pair_pool_size=4)
    full = _batches(pooled, 7)
    plain = _batches(_dm(folder), 7)
    assert all(torch.equal(a["hr"], b["hr"]) for a, b in zip(full[:2], plain[:2]))  # filling
    assert any(not torch.equal(a["index"], b["index"]) for a, b in zip(full[2:], plain[2:]))  # swapped
    first = _dm(folder, pair_pool_size=4)
    _batches(first, 3)
    state = first.state_dict()
    assert state["consumed_samples"] == 6 and state["pair_pool"]["world_size"] == 1
    assert first.train_dataloader().state_dict() == {"consumed_samples": 6}  # the pool is not written twice
    resumed = _dm(folder, pair_pool_size=4)
    resumed.load_state_dict(state)
    for a, b in zip(full[3:], _batches(resumed, 4)):
        assert all(torch.equal(a[k], b[k]) for k in ("hr", "lr", "index"))
    # a checkpoint without a pool (written with the pool off): the counter resumes, the pool starts empty
    fresh = _dm(folder, pair_pool_size=4)
    fresh.load_state_dict({"consumed_samples": 6})
    assert fresh.consumed_samples == 6 and fresh.pair_pool.filled == 0


@pytest.mark.slow  # two short training runs (~30-70 s on 2 cores)
def test_training_with_the_pool_resumes_to_the_same_weights(tmp_path):
    """sr-train with data.pair_pool_size: a run resumed from a mid-run checkpoint (pool full, in the
    checkpoint) ends with exactly the weights of an uninterrupted one."""
    from helpers import FAST
    from sr_lab.train import run

    base = [*FAST, "experiment=ccsr_stage1", "optim.mode=combined", "train.iterations=6", "data.crop_size=32",
            "data.pair_pool_size=4", "train.export_weights=false"]
    run(compose_train([*base, "train.ckpt_every=3"], tmp_path / "full"))
    mid = tmp_path / "full" / "checkpoints" / "step0000003.ckpt"
    ckpt = torch.load(mid, map_location="cpu", weights_only=False)
    pool = ckpt["SRDataModule"]["pair_pool"]["ranks"][0]
    assert pool["filled"] == 4 and pool["tensors"]["hr"].shape == (4, 3, 32, 32)
    assert "pair_pool" not in str(ckpt["loops"]["fit_loop"].get("combined_loader"))
    run(compose_train([*base, f"ckpt_path={mid}"], tmp_path / "resumed"))
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
            for d in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ddp_worker(rank: int, folder: str, port: int, out: str) -> None:
    from types import SimpleNamespace

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        dm = _dm(folder, pair_pool_size=4, samples_per_epoch=8)
        dm.trainer = SimpleNamespace(training=True, world_size=2, global_rank=rank)
        _batches(dm, 3)
        state = dm.state_dict()  # collective: every rank's pool
        if rank == 0:
            torch.save(state, out)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_state_holds_every_rank_pool(folder, tmp_path):
    """Under DDP the checkpoint (rank 0's) carries each rank's pool; a rank restores its own."""
    import socket
    from types import SimpleNamespace

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "state.pt"
    torch.multiprocessing.spawn(_ddp_worker, args=(str(folder), port, str(out)), nprocs=2, join=True)
    state = torch.load(out, weights_only=True)
    pools = state["pair_pool"]["ranks"]
    assert state["pair_pool"]["world_size"] == 2 and [p["filled"] for p in pools] == [4, 4]
    assert pools[0]["tensors"]["index"].tolist() != pools[1]["tensors"]["index"].tolist()
    for rank in (0, 1):
        dm = _dm(folder, pair_pool_size=4, samples_per_epoch=8)
        dm.trainer = SimpleNamespace(training=True, world_size=2, global_rank=rank)
        dm.load_state_dict(state)
        assert torch.equal(dm.pair_pool.tensors["index"], pools[rank]["tensors"]["index"])


def test_resume_with_another_pool_size_starts_empty(folder, caplog):
    first = _dm(folder, pair_pool_size=4)
    _batches(first, 3)
    other = _dm(folder, pair_pool_size=6)
    with caplog.at_level("WARNING"):
        other.load_state_dict(first.state_dict())
    assert other.consumed_samples == 6 and other.pair_pool.filled == 0
    assert "holds 4 pairs in batches of 2" in caplog.text and "starts empty" in caplog.text
