"""digit-numbers: two-digit numbers from real handwritten digits, with held-out images and numbers."""
import pickle

import numpy as np
import pytest
import yaml

from compt.config import load_chain
from compt.data import DataConfig, Example, build_dataset
from compt.data.numbers import CLASSNAMES, held_out_numbers, number_word

CFG = DataConfig(kind="digit-numbers")


@pytest.fixture(scope="module")
def splits():
    return build_dataset(CFG, "train"), build_dataset(CFG, "val")


def numbers(ds) -> np.ndarray:
    return ds.items[:, 0]


def test_number_words():
    assert [number_word(n) for n in (10, 13, 19, 20, 42, 70, 99)] == [
        "ten", "thirteen", "nineteen", "twenty", "forty-two", "seventy", "ninety-nine"]
    assert len(CLASSNAMES) == len(set(CLASSNAMES)) == 90
    with pytest.raises(ValueError):
        number_word(100)


def test_sizes_and_classes(splits):
    train, val = splits
    assert (len(train), len(val)) == (81 * 100, 90 * 10)
    assert train.classnames == val.classnames == CLASSNAMES
    assert sorted({val[i].label for i in range(len(val))}) == list(range(90))
    assert all("{}" in t for t in val.templates)


def test_validation_uses_only_unseen_digit_images(splits):
    train, val = splits
    assert len(train.pool) + len(val.pool) == 1797
    assert len(val.pool) == pytest.approx(0.2 * 1797, abs=2)
    seen = {img.tobytes() for img in train.pool}  # sklearn's 1,797 digit images are all distinct
    assert not seen & {img.tobytes() for img in val.pool}
    for ds in splits:  # every sample draws from its own split's pool
        assert ds.items[:, 1:3].min() >= 0 and ds.items[:, 1:3].max() < len(ds.pool)


def test_held_out_numbers_appear_only_in_validation(splits):
    train, val = splits
    held = held_out_numbers(CFG.split_seed)
    assert len(held) == 9 and sorted(n // 10 for n in held) == list(range(1, 10))
    assert len({n % 10 for n in held}) == 9  # nine different units digits
    assert not set(held) & set(numbers(train).tolist())
    assert set(held) <= set(numbers(val).tolist())
    train_numbers = set(numbers(train).tolist())
    for n in held:  # both digits are still taught, in other numbers, in the same position
        assert any(m // 10 == n // 10 for m in train_numbers) and any(m % 10 == n % 10 for m in train_numbers)
    assert held_out_numbers(1) != held


def test_examples_show_and_name_the_number(splits):
    train, val = splits
    for ds in splits:
        for i in range(0, len(ds), 97):
            ex = ds[i]
            assert isinstance(ex, Example) and ex.image.mode == "RGB" and ex.image.size == (32, 32)
            number = int(ds.items[i, 0])
            assert ex.label == number - 10
            assert ds.classnames[ex.label] in ex.caption or str(number) in ex.caption
            pixels = np.asarray(ex.image.convert("L"))
            assert pixels[:, :16].max() > 100 and pixels[:, 16:].max() > 100  # ink in both halves
    captions = {train[i].caption.replace(train.classnames[train[i].label], "{w}").replace(
        str(int(train.items[i, 0])), "{n}") for i in range(300)}
    assert len(captions) >= 5  # several caption templates in use in training
    # validation: one caption per number, so every distinct caption names exactly one class
    assert {val[i].caption for i in range(len(val))} == {
        f"an image of the handwritten number {w} ({n})." for n, w in zip(range(10, 100), CLASSNAMES)}
    assert build_dataset(DataConfig(kind="digit-numbers", render_size=48), "val")[0].image.size == (48, 48)


def test_deterministic_and_picklable(splits):
    train, _ = splits
    again = build_dataset(CFG, "train")
    assert np.array_equal(train.items, again.items)
    assert train[5].image.tobytes() == again[5].image.tobytes() and train[5][1:] == again[5][1:]
    assert not np.array_equal(train.items, build_dataset(DataConfig(kind="digit-numbers", split_seed=1),
                                                         "train").items)
    copy = pickle.loads(pickle.dumps(train))  # loader workers receive a pickled copy
    assert copy[11].image.tobytes() == train[11].image.tobytes()


def test_a_chain_config_selects_it_without_paths(tmp_path):
    assert DataConfig(kind="digit-numbers").problems() == []
    model = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
             "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump({"name": "n", "data": {"kind": "digit-numbers"},
                                    "stages": [{"name": "a", "model": model, "budget": {"steps": 1}}]}))
    assert load_chain(str(path)).data.kind == "digit-numbers"
