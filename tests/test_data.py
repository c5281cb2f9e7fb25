from pathlib import Path

import pytest
import torch
from PIL import Image

from baselines.augment import TwoViews, mocov2_augmentation
from baselines.data import BadImageError, PretrainImages, PretrainSampler, find_images


def write_images(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.effect_noise((40, 30), 50).convert("RGB").save(path)


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    write_images(tmp_path, ["train/n2/b.jpg", "train/n1/a.JPEG", "c.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    assert find_images(tmp_path) == [str(tmp_path / "c.png"), str(tmp_path / "train/n1/a.JPEG"),
                                     str(tmp_path / "train/n2/b.jpg")]


def test_list_file_paths_relative_to_a_root(tmp_path):
    write_images(tmp_path / "imgs", ["n1/a.jpg", "n2/b.jpg"])
    listing = tmp_path / "meta" / "train.txt"
    listing.parent.mkdir()
    listing.write_text("n2/b.jpg 1\nn1/a.jpg 0\n\n")
    assert find_images(listing, tmp_path / "imgs") == [str(tmp_path / "imgs/n2/b.jpg"), str(tmp_path / "imgs/n1/a.jpg")]


def test_missing_and_empty_data_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pretraining data not found: .*nowhere"):
        find_images(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no images in folder"):
        find_images(tmp_path)


def test_corrupt_image_names_the_file_or_is_skipped_and_counted(tmp_path):
    write_images(tmp_path, ["a.jpg", "c.jpg"])
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    files = find_images(tmp_path)
    two = TwoViews(mocov2_augmentation(16))
    with pytest.raises(BadImageError, match=r"cannot read image .*b.jpg"):
        PretrainImages(files, two)[(0, 1)]
    q, _k, bad = PretrainImages(files, two, skip_bad_images=True)[(0, 1)]
    assert bad == 1 and q.shape == (3, 16, 16)
    assert PretrainImages(files, two, skip_bad_images=True)[(0, 0)][2] == -1


def test_views_depend_on_seed_epoch_and_index_only(tmp_path):
    write_images(tmp_path, ["a.jpg", "b.jpg"])
    data = PretrainImages(find_images(tmp_path), TwoViews(mocov2_augmentation(16)), seed=5)
    torch.manual_seed(123)
    first = data[(2, 1)]
    torch.manual_seed(999)  # the caller's RNG state plays no part...
    again = data[(2, 1)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], data[(3, 1)][0])  # ...the epoch does
    state = torch.get_rng_state()
    data[(0, 0)]
    assert torch.equal(state, torch.get_rng_state())  # and the caller's RNG is left untouched


def test_sampler_global_batches_do_not_depend_on_the_process_count():
    single = PretrainSampler(50, global_batch=8, seed=1)
    single.set_epoch(3)
    keys = list(single)
    assert len(keys) == len(single) == 6 * 8 and len(set(keys)) == 48 and {e for e, _ in keys} == {3}
    ranks = [PretrainSampler(50, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(3)
    shares = [list(r) for r in ranks]
    for t in range(6):  # global batch t = rank 0's 4 images then rank 1's
        assert shares[0][4 * t : 4 * t + 4] + shares[1][4 * t : 4 * t + 4] == keys[8 * t : 8 * t + 8]


def test_sampler_resumes_mid_epoch_and_reshuffles_per_epoch():
    sampler = PretrainSampler(40, 8, seed=0)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.set_epoch(1, start_iteration=3)
    assert list(sampler) == full[24:] and len(sampler) == 16
    sampler.set_epoch(2)
    assert [i for _, i in sampler] != [i for _, i in full]


def test_sampler_needs_one_full_batch():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        PretrainSampler(5, 8, seed=0)


@pytest.mark.parametrize("num_images, batch", [(512, 64), (100, 8), (37, 4)])
def test_halves_order_keeps_an_images_old_key_out_of_a_queue_of_n_half_minus_b(num_images, batch):
    """Replay a FIFO queue of K = N/2 - B keys over 6 epochs: no query ever meets its own old key."""
    sampler = PretrainSampler(num_images, batch, seed=3, order="halves")
    queue_size = num_images // 2 - batch
    queue: list[int] = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        keys = [index for _, index in sampler]
        assert len(set(keys)) == len(keys) == sampler.iterations_per_epoch * batch
        for t in range(0, len(keys), batch):
            step = keys[t : t + batch]
            assert not set(step) & set(queue), (epoch, t)
            queue = (queue + step)[-queue_size:] if queue_size else []
    shuffled = PretrainSampler(num_images, batch, seed=3)
    assert shuffled.min_return_gap() == 0 and sampler.min_return_gap() == num_images // 2 - batch + 1


def test_halves_order_still_reshuffles_every_epoch():
    sampler = PretrainSampler(64, 8, seed=0, order="halves")
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        orders.append([i for _, i in sampler])
    assert orders[0] != orders[1]
    assert set(orders[0][:32]) == set(orders[1][:32])  # the same first half, in a new order
