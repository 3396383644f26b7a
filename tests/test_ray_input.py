"""The Ray Data input pipeline: per-epoch file shuffle, augmentation, resource plan."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import DataConfig, DecodeAt, ScalingConfig, SyntheticConfig
from orchestrator.data.images import CorruptImageError, decode_jpeg, encode_jpeg
from orchestrator.data.prepare import SyntheticDatasets, write_synthetic
from orchestrator.data.ray_input import (
    DecodePlan,
    TimedBatches,
    augment_decoded,
    augment_draws,
    configured_plan,
    decode_augmented,
    decode_plan,
    decoded_ahead,
    training_dataset,
)


def face_jpegs(count: int, size: int) -> tuple[list[bytes], np.ndarray]:
    """Real JPEGs of asymmetric images and their plain RGB decodes (the reference)."""
    rng = np.random.default_rng(7)
    jpegs, plain = [], []
    for _ in range(count):
        image = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        image[:, : size // 3] //= 4  # a dark left third: a mirror is never the identity
        jpegs.append(encode_jpeg(image, 90))
        plain.append(decode_jpeg(jpegs[-1], "test"))
    return jpegs, np.stack(plain)


def windows(image: np.ndarray, pad: int) -> list[np.ndarray]:
    """Every crop of ``image`` zero-padded by ``pad``, at all offsets."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    return [
        padded[top : top + height, left : left + width]
        for top in range(2 * pad + 1)
        for left in range(2 * pad + 1)
    ]


def test_flip_gives_the_exact_mirror_or_the_plain_decode_and_both_happen() -> None:
    jpegs, plain = face_jpegs(64, 16)
    ids = list(range(64))
    draws = augment_draws(ids, key=(1, 0), flip=True, crop_pad=0)
    out = decode_augmented(jpegs, ids, size=16, draws=draws, dataset="d")
    mirrored = [bool(np.array_equal(o, p[:, ::-1])) for o, p in zip(out, plain, strict=True)]
    kept = [bool(np.array_equal(o, p)) for o, p in zip(out, plain, strict=True)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))
    assert 10 < sum(mirrored) < 54  # p = 0.5 over 64 images
    assert mirrored == draws.mirrored.tolist()
    again = decode_augmented(
        jpegs,
        ids,
        size=16,
        draws=augment_draws(ids, key=(1, 0), flip=True, crop_pad=0),
        dataset="d",
    )
    assert np.array_equal(out, again)  # the draws decide, nothing else
    # The pool decodes, the worker augments the decoded pixels: the same images.
    plain_copy = plain.copy()
    np.testing.assert_array_equal(augment_decoded(plain_copy, draws), out)


def test_crop_is_a_shifted_window_of_the_zero_padded_image_and_composes_with_flip() -> None:
    jpegs, plain = face_jpegs(24, 8)
    pad = 2
    for flip in (False, True):
        ids = [f"face-{i}" for i in range(24)]
        draws = augment_draws(ids, key=(3, 1), flip=flip, crop_pad=pad)
        out = decode_augmented(jpegs, ids, size=8, draws=draws, dataset="d")
        np.testing.assert_array_equal(augment_decoded(plain.copy(), draws), out)
        offsets = set()
        for i in range(len(jpegs)):
            candidates = windows(plain[i], pad) + (windows(plain[i][:, ::-1], pad) if flip else [])
            matches = [k for k, w in enumerate(candidates) if np.array_equal(out[i], w)]
            assert matches, f"image {i} is not a window of its padded (mirrored) decode"
            offsets.update(matches)
        assert len(offsets) > 3  # the offsets vary


def test_a_corrupt_jpeg_is_named_by_dataset_and_image_id() -> None:
    jpegs, _ = face_jpegs(3, 8)
    jpegs[1] = jpegs[1][:20]
    with pytest.raises(CorruptImageError, match="dataset s3://b/d, image_id img-1"):
        ids = ["img-0", "img-1", "img-2"]
        draws = augment_draws(ids, key=(0, 0), flip=True, crop_pad=1)
        decode_augmented(jpegs, ids, size=8, draws=draws, dataset="s3://b/d")


def test_decode_plan_leaves_room_for_reads() -> None:
    data = DataConfig()
    # 2 CPUs, two 0.5-CPU workers: 1 CPU left, one 0.5 slot for reads, one actor.
    assert decode_plan(data, ScalingConfig(2, 0.5), 2.0) == DecodePlan(1, 0.5)
    # 16 CPUs, four 2-CPU workers: 8 left -> 7.5 for actors of 0.5 = 15.
    assert decode_plan(data, ScalingConfig(4, 2.0), 16.0) == DecodePlan(15, 0.5)
    # Nothing left still gets one actor; an explicit count wins.
    assert decode_plan(data, ScalingConfig(4, 1.0), 4.0).actors == 1
    explicit = DataConfig(decode_actors=3, decode_cpus=1.0)
    assert decode_plan(explicit, ScalingConfig(2, 0.5), 64.0) == DecodePlan(3, 1.0)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDatasets:
    out = tmp_path_factory.mktemp("shards")
    config = SyntheticConfig(
        out=str(out),
        num_identities=6,
        eval_identities=20,
        images_per_identity=2,
        shard_bytes=1,
        pairs_per_fold=2,  # 2 identities of 2 images per fold: 2 distinct positives
    )
    return write_synthetic(config)  # one image per shard


def epoch_orders(uri: str, seed: int, epochs: int) -> list[list[str]]:
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # row order = the shuffled file order
    try:
        ds = training_dataset(DataConfig(train=uri, flip=False), DecodePlan(1, 0.5), seed)
        return [
            [str(i) for batch in ds.iter_batches(batch_size=None) for i in batch["image_id"]]
            for _ in range(epochs)
        ]
    finally:
        context.execution_options.preserve_order = False


@pytest.mark.usefixtures("ray_cluster")
def test_file_order_changes_every_epoch_and_is_reproducible_from_the_seed(
    many_shards: SyntheticDatasets,
) -> None:
    uri = many_shards.train_uri
    assert len(many_shards.train.files) == 12
    first = epoch_orders(uri, seed=5, epochs=2)
    assert sorted(first[0]) == sorted(first[1]) and len(set(first[0])) == 12  # all, once
    assert first[0] != first[1]  # a new order in the next epoch
    assert epoch_orders(uri, seed=5, epochs=2) == first  # same seed, same epochs
    assert epoch_orders(uri, seed=6, epochs=1)[0] != first[0]


def test_paths_in_the_plan_come_from_dataset_json(tmp_path: Path) -> None:
    from orchestrator.data.ray_input import shard_uris

    data = write_synthetic(SyntheticConfig(out=str(tmp_path), num_identities=2, eval_identities=20))
    # pairs.parquet sits beside the shards of the eval set; only the shards are read.
    assert [Path(u).name for u in shard_uris(data.eval_uri)] == [f.name for f in data.eval.files]
    assert (Path(data.eval_uri) / "pairs.parquet").exists()


def test_timed_batches_measure_the_wait_and_hold_the_rate() -> None:
    """The wait counted is the time spent inside ``next`` (a slow source: most of it; a
    ready one: little), the first batch's apart; a throttle holds the rows per second."""

    def source(delay: float) -> Iterator[dict[str, np.ndarray]]:
        for _ in range(6):
            time.sleep(delay)
            yield {"label": np.zeros(4)}

    def consume(timed: TimedBatches, work: float) -> float:
        started = time.monotonic()
        for _ in timed:
            time.sleep(work)
        return time.monotonic() - started

    slow, ready = TimedBatches(source(0.05)), TimedBatches(source(0.0))
    slow_total, ready_total = consume(slow, 0.0), consume(ready, 0.02)
    assert slow.count == ready.count == 6 and slow.rows == 24
    assert slow.waited / slow_total > 0.5 > ready.waited / ready_total
    assert 0.0 < slow.first_wait < slow.waited
    # After the first batch, 20 more rows at 80 rows/s: the holds stretch the pass to at
    # least 0.25 s (a lower bound that sleeping guarantees, not a speed), and with a
    # consumer that does nothing, that time is counted as waiting.
    held = TimedBatches(source(0.0), max_rows_per_s=80.0)
    held_total = consume(held, 0.0)
    assert held_total >= 20 / 80.0
    assert (held.waited - held.first_wait) / held_total > 0.5


def jpeg_batches(jpegs: list[bytes], sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """Batches of JPEG bytes as a Train worker's shard hands them out (object arrays)."""
    batches, start = [], 0
    for size in sizes:
        chunk = np.empty(size, dtype=object)
        chunk[:] = jpegs[start : start + size]
        ids = np.asarray([f"img{i}" for i in range(start, start + size)])
        batches.append({"image": chunk, "label": np.arange(start, start + size), "image_id": ids})
        start += size
    return batches


def test_workers_decode_in_order_one_batch_ahead() -> None:
    """``data.decode: worker``: every image decoded as decode_jpeg decodes it, labels and ids
    kept in order over uneven batches (one shorter than the thread count), and the next
    batch already taken from the source when the current one is handed out."""
    jpegs, plain = face_jpegs(23, 16)
    data = DataConfig(image_size=16, flip=False, decode=DecodeAt.WORKER, decode_threads=3)
    taken = 0

    def source() -> Iterator[dict[str, np.ndarray]]:
        nonlocal taken
        for batch in jpeg_batches(jpegs, [8, 8, 5, 2]):
            taken += 1
            yield batch

    got, taken_when_handed = [], []
    for batch in decoded_ahead(source(), data, key=(0, 0)):
        taken_when_handed.append(taken)
        got.append(batch)
    assert taken_when_handed == [2, 3, 4, 4]  # one ahead, until the source ran out
    assert [len(b["label"]) for b in got] == [8, 8, 5, 2]
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in got]), plain)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in got]), np.arange(23))
    assert got[2]["image_id"].tolist() == [f"img{i}" for i in range(16, 21)]
    assert got[0]["image"].dtype == np.uint8 and got[0]["label"].dtype == np.int64


def test_workers_augment_reproducibly_and_name_a_corrupt_image() -> None:
    jpegs, plain = face_jpegs(32, 16)
    data = DataConfig(image_size=16, flip=True, decode=DecodeAt.WORKER, decode_threads=4)

    def decoded(key: tuple[int, ...], sizes: list[int]) -> np.ndarray:
        batches = decoded_ahead(iter(jpeg_batches(jpegs, sizes)), data, key=key)
        return np.concatenate([b["image"] for b in batches])

    first = decoded((0, 1), [16, 16])
    mirrored = [bool(np.array_equal(o, p[:, ::-1])) for o, p in zip(first, plain, strict=True)]
    kept = [bool(np.array_equal(o, p)) for o, p in zip(first, plain, strict=True)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))  # one or the other
    assert 0 < sum(mirrored) < 32
    # Same seed and epoch, same images, however the images are batched and threaded.
    np.testing.assert_array_equal(decoded((0, 1), [16, 16]), first)
    np.testing.assert_array_equal(decoded((0, 1), [5, 20, 7]), first)
    assert not np.array_equal(decoded((0, 2), [16, 16]), first)  # another epoch, other draws
    assert not np.array_equal(decoded((1, 1), [16, 16]), first)  # another seed, other draws

    broken = list(jpegs)
    broken[19] = b"not a jpeg"
    batches = decoded_ahead(iter(jpeg_batches(broken, [16, 16])), data, key=(0, 0))
    with pytest.raises(CorruptImageError, match=r"dataset .*, image_id img19"):
        list(batches)


def test_worker_decoding_reserves_only_the_read_slot() -> None:
    worker = DataConfig(decode=DecodeAt.WORKER, decode_actors=3, decode_cpus=0.5)
    assert configured_plan(worker) == DecodePlan(0, 0.5)
    assert configured_plan(worker).cpus == 0.5  # the Parquet reads
    assert decode_plan(worker, ScalingConfig(2, 0.5), 16.0) == DecodePlan(0, 0.5)
    assert configured_plan(DataConfig(decode_actors=3, decode_cpus=0.5)).cpus == 2.0


def test_augment_draws_are_a_function_of_seed_epoch_and_image_id() -> None:
    ids = [f"person{i // 10}/{i % 10}.jpg" for i in range(4000)]
    draws = augment_draws(ids, key=(7, 3), flip=True, crop_pad=4)
    # Order-free: a permuted batch draws the same per image.
    order = np.random.default_rng(0).permutation(len(ids))
    permuted = augment_draws([ids[i] for i in order], key=(7, 3), flip=True, crop_pad=4)
    np.testing.assert_array_equal(permuted.mirrored, draws.mirrored[order])
    np.testing.assert_array_equal(permuted.shifts, draws.shifts[order])
    # Fair: p = 0.5 mirrors (4000 draws: 5 sigma is +-0.04); every offset in [-4, 4] used,
    # each near 1/9.
    assert abs(draws.mirrored.mean() - 0.5) < 0.04
    for axis in (0, 1):
        counts = np.bincount(draws.shifts[:, axis] + 4, minlength=9)
        assert len(counts) == 9 and counts.min() > 0.7 * 4000 / 9, counts
    # Another epoch: about half the mirrors change.
    other = augment_draws(ids, key=(7, 4), flip=True, crop_pad=4)
    assert 0.4 < (other.mirrored != draws.mirrored).mean() < 0.6
    off = augment_draws(ids, key=(7, 3), flip=False, crop_pad=0)
    assert not off.mirrored.any() and not off.shifts.any()
