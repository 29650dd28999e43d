"""compt.data: every dataset kind built the way a user's config builds it."""
import csv
import io
import pickle
import re
import tarfile

import pytest
from PIL import Image
from pydantic import ValidationError

from compt.data import DataConfig, Example, ImageTextDataset, build_dataset

COLORS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "owl": (0, 0, 255)}


def solid(name: str, size: int = 12, mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", (size, size), COLORS[name])
    return image.convert(mode)


def assert_color(image: Image.Image, name: str):
    assert image.mode == "RGB"
    r, g, b = image.getpixel((image.width // 2, image.height // 2))
    want = COLORS[name]
    assert all(abs(x - y) <= 8 for x, y in zip((r, g, b), want)), ((r, g, b), want)


# --- digits -----------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return build_dataset(DataConfig(), "train"), build_dataset(DataConfig(), "val")


def test_digits_sizes_and_split(digits):
    train, val = digits
    assert isinstance(train, ImageTextDataset)
    assert len(train) + len(val) == 1797
    assert len(val) == pytest.approx(0.2 * 1797, abs=2)
    assert sorted({val[i].label for i in range(len(val))}) == list(range(10))


def test_digits_split_is_deterministic(digits):
    train, _ = digits
    again = build_dataset(DataConfig(), "train")
    assert [train[i][1:] for i in range(len(train))] == [again[i][1:] for i in range(len(again))]
    assert train[7].image.tobytes() == again[7].image.tobytes()
    other_seed = build_dataset(DataConfig(split_seed=1), "train")
    assert [train[i].label for i in range(50)] != [other_seed[i].label for i in range(50)]


def test_digits_examples(digits):
    train, val = digits
    ex = train[0]
    assert isinstance(ex, Example)
    assert ex.image.mode == "RGB" and ex.image.size == (32, 32)
    assert build_dataset(DataConfig(render_size=48), "val")[0].image.size == (48, 48)
    assert train.classnames[ex.label] in ex.caption
    for i in range(0, len(val), 37):
        assert val.classnames[val[i].label] in val[i].caption
    assert len({train[i].caption.replace(train.classnames[train[i].label], "{}")
                for i in range(200)}) >= 4  # several caption templates in use
    assert train.classnames == ["zero", "one", "two", "three", "four",
                                "five", "six", "seven", "eight", "nine"]
    assert train.templates and all("{}" in t for t in train.templates)
    # the digit carries signal: ink pixels differ from background
    assert len(set(ex.image.convert("L").tobytes())) > 2


# --- csv --------------------------------------------------------------------

def test_csv_relative_paths_and_labels(tmp_path):
    (tmp_path / "img").mkdir()
    rows = [("img/a.png", "a red cat", 0, "cat"), ("img/b.jpg", "a green dog", 1, "dog"),
            (str(tmp_path / "img" / "c.png"), "a blue owl", 2, "owl")]  # one absolute path
    for (path, _, _, name), mode in zip(rows, ("RGB", "RGB", "P")):  # a palette image too
        solid(name, mode=mode).save(tmp_path / path)
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title", "label"])
        w.writerows(r[:3] for r in rows)
    cfg = DataConfig(kind="csv", train=str(tmp_path / "train.csv"), val=str(tmp_path / "train.csv"),
                     classnames=["cat", "dog", "owl"])
    ds = build_dataset(cfg, "train")
    assert len(ds) == 3 and ds.classnames == ["cat", "dog", "owl"]
    assert "{}" in ds.templates[0]
    for i, (_, caption, label, name) in enumerate(rows):
        ex = ds[i]
        assert (ex.caption, ex.label) == (caption, label)
        assert_color(ex.image, name)


def test_csv_without_label_column_and_custom_keys(tmp_path):
    solid("dog").save(tmp_path / "d.png")
    (tmp_path / "x.csv").write_text("img,text\nd.png,a dog\n")
    cfg = DataConfig(kind="csv", train=str(tmp_path / "x.csv"), val=str(tmp_path / "x.csv"),
                     csv_separator=",", image_key="img", caption_key="text")
    ex = build_dataset(cfg, "val")[0]
    assert ex.caption == "a dog" and ex.label == -1
    with pytest.raises(ValueError, match="data.caption_key"):
        build_dataset(cfg.model_copy(update={"caption_key": "title"}), "val")


# --- webdataset -------------------------------------------------------------

def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, name, caption, label in samples:
            buf = io.BytesIO()
            solid(name).save(buf, format="PNG")
            fields = {"png": buf.getvalue(), "txt": caption.encode()}
            if label is not None:
                fields["cls"] = str(label).encode()
            fields["json"] = b"{}"
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_two_shards(tmp_path):
    write_shard(tmp_path / "shard-000.tar", [("s/000", "cat", "a cat", 0), ("s/001", "dog", "a dog", 1)])
    write_shard(tmp_path / "shard-001.tar", [("s/002", "owl", "an owl", None)])
    expected = [("cat", "a cat", 0), ("dog", "a dog", 1), ("owl", "an owl", -1)]
    for spec in (str(tmp_path / "shard-{000..001}.tar"), str(tmp_path)):
        ds = build_dataset(DataConfig(kind="webdataset", train=spec, val=spec), "train")
        assert len(ds) == 3 and ds.classnames is None
        # random access, out of order
        for i in (2, 0, 1):
            name, caption, label = expected[i]
            ex = ds[i]
            assert (ex.caption, ex.label) == (caption, label)
            assert_color(ex.image, name)
    # loader workers receive the dataset by pickle
    assert pickle.loads(pickle.dumps(ds))[1].caption == "a dog"
    single = build_dataset(DataConfig(kind="webdataset", train=str(tmp_path / "shard-001.tar"),
                                      val=str(tmp_path / "shard-001.tar")), "val")
    assert len(single) == 1 and single[0].caption == "an owl"


def test_webdataset_remote_specs_stream_and_unreadable_schemes_say_how():
    """Remote specs used to be rejected; now they stream (tests/test_streaming.py), s3:// says how to read it."""
    cfg = DataConfig(kind="webdataset", train="https://host/shard-{000..009}.tar", val="s3://b/x.tar")
    assert cfg.streams()
    problems = cfg.problems()
    assert len(problems) == 1 and problems[0].startswith("data.val:") and "pipe:aws s3 cp" in problems[0]
    with pytest.raises(ValueError, match="pipe:aws s3 cp"):
        build_dataset(cfg, "train")
    train = build_dataset(cfg.model_copy(update={"val": "pipe:cat x.tar"}), "train")  # reads nothing yet
    assert train.urls == [f"https://host/shard-{i:03d}.tar" for i in range(10)]
    assert DataConfig(kind="webdataset", train="ftp2://h/x.tar", val="pipe:cat x.tar").problems()[0].startswith(
        "data.train: 'ftp2://h/x.tar': unknown scheme 'ftp2:'")


def _damaged_shard(path, how: str) -> tuple[int, list[str]]:
    """An 8-sample shard damaged as ``how`` says: (byte offset of the damage, captions that survive)."""
    names = ["cat", "dog", "owl"] * 3
    write_shard(path, [(f"s/{i:03d}", names[i], f"caption {i}", i % 3) for i in range(8)])
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar}
    png, txt = members["s/005.png"], members["s/005.txt"]
    if how == "truncated_in_data":  # cut inside the image of sample 5
        data, at, kept = data[: png.offset_data + 20], png.offset, range(5)
    elif how == "truncated_in_header":  # cut inside the caption's header of sample 5
        data, at, kept = data[: txt.offset + 100], txt.offset, range(5)
    elif how == "garbage":  # sample 5's caption header overwritten: the rest of the shard must still be read
        data = data[: txt.offset] + bytes(range(7, 207)) * 3 + data[txt.offset + 600:]
        at, kept = txt.offset, [0, 1, 2, 3, 4, 6, 7]
    else:  # truncated at a member boundary: no end-of-archive marker
        data, at, kept = data[: txt.offset], len(data[: txt.offset]), range(5)
    path.write_bytes(data)
    return at, [f"caption {i}" for i in kept]


@pytest.mark.parametrize("how", ["truncated_in_data", "truncated_in_header", "garbage", "no_end_marker"])
def test_webdataset_damage_is_a_bad_sample_named_by_shard_and_offset(tmp_path, how):
    """A damaged shard used to raise a bare tarfile.ReadError (truncated data) or silently lose the rest of
    the shard (truncated header, garbage). Now every readable sample is kept and the damage is one bad
    sample: reading it raises, and describe() names the shard and the byte, as for an unreadable image."""
    write_shard(tmp_path / "shard-000.tar", [("a/000", "cat", "good shard", 0)])
    at, kept = _damaged_shard(tmp_path / "shard-001.tar", how)
    ds = build_dataset(DataConfig(kind="webdataset", train=str(tmp_path / "shard-{000..001}.tar"),
                                  val=str(tmp_path)), "train")
    good, bad = [], []
    for i in range(len(ds)):
        try:
            good.append(ds[i].caption)
        except Exception as e:  # noqa: BLE001 - what the loader catches and counts
            bad.append((ds.describe(i), str(e)))
    assert good == ["good shard", *kept]
    assert len(bad) == 1, bad
    where, why = bad[0]
    assert where == f"{tmp_path / 'shard-001.tar'} (byte {at})", bad
    assert ("truncated" if how != "garbage" else "unreadable data") in why, why
    assert pickle.loads(pickle.dumps(ds)).describe(len(ds) - 1) == ds.describe(len(ds) - 1)


def test_webdataset_file_that_is_no_tar_is_still_a_config_error(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"\x1f\x8b" + bytes(range(256)) * 8)  # gzip magic, no tar header anywhere
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        build_dataset(DataConfig(kind="webdataset", train=str(tmp_path / "x.tar"), val=str(tmp_path)), "train")


def test_csv_bad_rows_are_bad_samples_named_by_row(tmp_path):
    """One non-UTF-8 byte, one caption over 131072 characters or one unparsable row used to kill the
    whole dataset with a traceback naming no row; now each is one bad sample naming its row."""
    from compt.data.csv import FIELD_LIMIT, MAX_CAPTION_CHARS

    solid("cat").save(tmp_path / "a.png")
    lines = [b"filepath\ttitle\tlabel", b"a.png\ta cat\t0",
             "a.png\tcaf\u00e9 cat\t0".encode("latin-1"),  # row 3: a latin-1 byte
             b"a.png\t" + b"x" * (MAX_CAPTION_CHARS + 1) + b"\t0",  # row 4: over-long caption
             b"a.png",  # row 5: no caption field
             b"a.png\t" + b"y" * (FIELD_LIMIT + 1) + b"\t0",  # row 6: beyond even the raised csv limit
             b"", b"a.png\tthe last cat"]  # a blank line, then row 8 without its (optional) label
    (tmp_path / "t.csv").write_bytes(b"\n".join(lines) + b"\n")
    ds = build_dataset(DataConfig(kind="csv", train=str(tmp_path / "t.csv"), val=str(tmp_path / "t.csv")), "train")
    assert len(ds) == 6
    assert (ds[0].caption, ds[0].label) == ("a cat", 0) and (ds[5].caption, ds[5].label) == ("the last cat", -1)
    assert ds.describe(5) == f"{tmp_path / 'a.png'} ({tmp_path / 't.csv'} row 8)"
    for i, row, why in [(1, 3, "not valid UTF-8"), (2, 4, f"over the {MAX_CAPTION_CHARS} allowed"),
                        (3, 5, "1 field(s)"), (4, 6, "unparsable")]:
        with pytest.raises(ValueError, match=re.escape(why)):
            ds[i]
        assert ds.describe(i) == f"{tmp_path / 't.csv'} row {row}"
    assert pickle.loads(pickle.dumps(ds)).describe(4) == ds.describe(4)


def test_csv_unbalanced_quote_is_one_bad_row_not_the_rest_of_the_file(tmp_path):
    """A caption opening with an unbalanced quote made one field of every row after it (up to the next
    quote): 1049 of 1280 rows lost, none counted. Now that row is a bad sample and the rows it had
    swallowed are rows again; a caption with real line breaks inside quotes still parses as one row."""
    solid("cat").save(tmp_path / "a.png")
    rows = ["filepath\ttitle\tlabel", "a.png\tcat 0\t0", 'a.png\t"cat 1 opens a quote\t1']
    rows += [f"a.png\tcat {i}\t{i}" for i in range(2, 9)]
    rows += ['a.png\t"a caption on\ntwo lines"\t9', 'a.png\tcat "10" closes\t10', "a.png\tcat 11\t11"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    ds = build_dataset(DataConfig(kind="csv", train=str(tmp_path / "t.csv"), val=str(tmp_path / "t.csv")), "train")
    assert len(ds) == 12
    with pytest.raises(ValueError, match="unbalanced quote: a field runs over lines 3-"):
        ds[1]
    assert ds.describe(1) == f"{tmp_path / 't.csv'} row 3"
    assert [ds[i].label for i in range(2, 10)] == list(range(2, 10))
    assert ds[9].caption == "a caption on\ntwo lines"
    assert ds.describe(10) == f"{tmp_path / 'a.png'} ({tmp_path / 't.csv'} row 13)"
    assert (ds[11].caption, ds[11].label) == ("cat 11", 11)


def _digit_shards(root, counts: dict[str, int]) -> dict[str, list[tarfile.TarInfo]]:
    """Webdataset shards of real handwritten digits (png, txt, cls): name -> its members."""
    from sklearn.datasets import load_digits

    digits, i, members = load_digits(), 0, {}
    for name, n in counts.items():
        with tarfile.open(root / name, "w") as tar:
            for _ in range(n):
                buf = io.BytesIO()
                Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).convert("RGB").resize((16, 16)) \
                    .save(buf, format="PNG")
                label = int(digits.target[i])
                for ext, data in (("png", buf.getvalue()), ("txt", f"a handwritten digit {label}".encode()),
                                  ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
        with tarfile.open(root / name) as tar:
            members[name] = tar.getmembers()
    return members


def test_damaged_shards_go_through_the_bad_sample_counter_and_its_threshold(tmp_path, chain_dict):
    """Through the launcher: garbage in the middle of a shard and a shard truncated inside member data
    used to be a silent loss and a tarfile.ReadError; now both are bad samples, counted per stage and
    named by shard and byte, and data.max_bad_fraction (default 1%) stops the stage."""
    import json
    import subprocess
    import sys

    from conftest import DS, REPO, tiny_model, write_chain

    data = tmp_path / "shards"
    data.mkdir()
    members = _digit_shards(data, {"train-000.tar": 40, "train-001.tar": 40, "val-000.tar": 30})
    shard = data / "train-001.tar"
    raw = shard.read_bytes()
    garbage_at = members["train-001.tar"][3 * 10 + 1].offset  # sample 10's caption header
    cut_in = members["train-001.tar"][3 * 30]  # sample 30's image
    raw = raw[: garbage_at] + bytes(range(7, 207)) * 3 + raw[garbage_at + 600: cut_in.offset_data + 30]
    shard.write_bytes(raw)
    chain_dict["stages"] = chain_dict["stages"][:1]
    chain_dict["stages"][0].update(model=tiny_model(32, 1), budget={"steps": 4})
    chain_dict["data"] = {"kind": "webdataset", "train": str(data / "train-{000..001}.tar"),
                          "val": str(data / "val-000.tar"), "classnames": [str(d) for d in range(10)]}
    chain = write_chain(tmp_path / "chain.yaml", chain_dict)
    proc = subprocess.run([sys.executable, "launch/chain.py", "--chain", str(chain), "--ds_config", DS,
                           "--output", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "samples drawn so far were unreadable" in proc.stderr and "above data.max_bad_fraction" in proc.stderr
    assert f"{shard} (byte {garbage_at}): ValueError: unreadable data" in proc.stderr
    assert f"{shard} (byte {cut_in.offset}): ValueError: member {cut_in.name} is truncated" in proc.stderr
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"][0]
    assert entry["status"] == "failed" and "max_bad_fraction" in entry["error"]


# --- hf ---------------------------------------------------------------------

def test_hf_saved_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    names = ["cat", "dog", "owl"]
    table = datasets.Dataset.from_dict(
        {"image": [solid(n) for n in names], "caption": [f"a {n}" for n in names],
         "label": [0, 1, 2]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=names)}),
    )
    table.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": table, "validation": table.select([2, 0])}).save_to_disk(
        str(tmp_path / "dict"))

    single = build_dataset(DataConfig(kind="hf", train=str(tmp_path / "single"),
                                      val=str(tmp_path / "single")), "train")
    assert len(single) == 3 and single.classnames == names  # taken from the ClassLabel
    for i, n in enumerate(names):
        assert (single[i].caption, single[i].label) == (f"a {n}", i)
        assert_color(single[i].image, n)

    cfg = DataConfig(kind="hf", train=str(tmp_path / "dict"), val=str(tmp_path / "dict"))
    val = build_dataset(cfg, "val")
    assert [val[i].caption for i in range(len(val))] == ["a owl", "a cat"]
    assert_color(val[0].image, "owl")
    assert len(build_dataset(cfg, "train")) == 3
    with pytest.raises(ValueError, match="data.hf_split_val"):
        build_dataset(cfg.model_copy(update={"hf_split_val": "test"}), "val")


def test_hf_without_label_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"image": [solid("dog")], "caption": ["a dog"]}).save_to_disk(
        str(tmp_path / "d"))
    ds = build_dataset(DataConfig(kind="hf", train=str(tmp_path / "d"), val=str(tmp_path / "d"),
                                  classnames=["dog"]), "train")
    assert ds[0].label == -1 and ds[0].caption == "a dog" and ds.classnames == ["dog"]
    assert_color(ds[0].image, "dog")


def test_hf_bad_rows_are_named_by_dataset_and_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"image": [solid("dog"), None], "caption": ["a dog", "no image"]}).save_to_disk(
        str(tmp_path / "d"))
    ds = build_dataset(DataConfig(kind="hf", train=str(tmp_path / "d"), val=str(tmp_path / "d")), "train")
    with pytest.raises(Exception):
        ds[1]
    assert ds.describe(1) == f"{tmp_path / 'd'} row 1"


# --- config -----------------------------------------------------------------

def test_problems_reports_every_problem_with_its_field(tmp_path):
    cfg = DataConfig(kind="csv", train=str(tmp_path / "missing.csv"), val_fraction=1.5,
                     classnames=[])
    problems = cfg.problems()
    assert any(p.startswith("data.train:") and "missing.csv" in p and "does not exist" in p
               for p in problems)
    assert any(p.startswith("data.val:") and "missing" in p for p in problems)
    assert any(p.startswith("data.val_fraction:") for p in problems)
    assert any(p.startswith("data.classnames:") for p in problems)
    assert len(problems) == 4
    with pytest.raises(ValueError, match="data.val_fraction"):
        build_dataset(cfg, "train")


def test_problems_webdataset_pattern_matching_nothing(tmp_path):
    cfg = DataConfig(kind="webdataset", train=str(tmp_path / "shard-{000..002}.tar"),
                     val=str(tmp_path))
    problems = cfg.problems()
    assert len(problems) == 2
    assert problems[0].startswith("data.train:") and "do not exist" in problems[0]
    assert problems[1].startswith("data.val:") and "matches no .tar" in problems[1]


def test_digits_config_without_paths_is_valid():
    assert DataConfig().problems() == []
    assert DataConfig(kind="digits", val_fraction=0.5).problems() == []


def test_unknown_fields_are_rejected():
    with pytest.raises(ValidationError, match="image_column"):
        DataConfig(kind="csv", image_column="filepath")
    with pytest.raises(ValidationError):
        DataConfig(kind="parquet")


def test_bad_split_name():
    with pytest.raises(ValueError, match="split"):
        build_dataset(DataConfig(), "test")
