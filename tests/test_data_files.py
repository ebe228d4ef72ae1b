"""Files as users have them: byte-order marks, compressed and damaged files, evaluation splits."""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import lzma

import pytest

from alignkit.config import DataConfig
from alignkit.data import DataError, load_dataset_records, read_rows
from alignkit.train.common import eval_source, prepare_data

ROWS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()


@pytest.mark.parametrize(
    "name, content",
    [
        ("d.jsonl", JSONL),
        ("d.json", json.dumps(ROWS).encode()),
        ("d.csv", b"prompt,completion\r\n" + b"".join(f"{r['prompt']},{r['completion']}\r\n".encode() for r in ROWS)),
        ("d.jsonl.gz", None),
    ],
)
def test_a_utf8_byte_order_mark_is_accepted_in_every_format(tmp_path, name, content):
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(codecs.BOM_UTF8 + JSONL))
    else:
        path.write_bytes(codecs.BOM_UTF8 + content)
    assert [row for _, row in read_rows(path)] == ROWS  # the first field name is 'prompt', not '\ufeffprompt'
    train, _, report = load_dataset_records(path, shuffle=False)
    assert report.format == "sft" and len(train) == 3


def test_utf16_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(codecs.BOM_UTF16_LE + JSONL.decode().encode("utf-16-le"))
    with pytest.raises(DataError, match=r"d\.jsonl: the file is UTF-16 text.*iconv -f utf-16"):
        list(read_rows(path))


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)])
def test_compressed_files_are_read_and_damaged_ones_are_named(tmp_path, suffix, compress):
    good = tmp_path / f"d.jsonl{suffix}"
    good.write_bytes(compress(JSONL))
    assert [row for _, row in read_rows(good)] == ROWS
    for damaged in (compress(JSONL)[:-8], b"not an archive at all"):
        bad = tmp_path / f"bad.jsonl{suffix}"
        bad.write_bytes(damaged)
        with pytest.raises(DataError, match=rf"bad\.jsonl\{suffix}: not a readable \{suffix} archive.*damaged or incomplete"):
            list(read_rows(bad))


def test_damaged_saved_dataset_is_named(tmp_path):
    import datasets

    path = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    for arrow in path.glob("*.arrow"):
        arrow.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"saved: a data set saved with save_to_disk that cannot be read"):
        list(read_rows(path))


@pytest.fixture
def dataset_dict(tmp_path):
    import datasets

    train = [{"prompt": f"train {i}", "chosen": "good", "rejected": "bad"} for i in range(6)]
    test = [{"prompt": f"test {i}", "chosen": "good", "rejected": "bad"} for i in range(3)]
    path = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}).save_to_disk(str(path))
    return path


def test_eval_split_evaluates_on_the_test_split(dataset_dict, tiny_tokenizer, capsys):
    data = DataConfig(path=str(dataset_dict), eval_split="test")
    prepared = prepare_data(data, tiny_tokenizer, 0, expect=("PreferencePair",), name="rm")
    assert sorted(r.prompt[0]["content"] for r in prepared.eval_records) == [f"test {i}" for i in range(3)]
    assert sorted(r.prompt[0]["content"] for r in prepared.train_records) == [f"train {i}" for i in range(6)]
    assert len(prepared.eval) == 3 and f"eval data ({dataset_dict} split test)" in capsys.readouterr().out


def test_eval_split_refuses_what_would_evaluate_on_training_rows(dataset_dict, tmp_path):
    file = tmp_path / "pairs.jsonl"
    file.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs\.jsonl is a file, which has no splits: give the evaluation file as data.eval_path"):
        eval_source(DataConfig(path=str(file), eval_split="test"))
    with pytest.raises(ValueError, match=r"is the training split"):
        eval_source(DataConfig(path=str(dataset_dict), eval_split="train"))
    with pytest.raises(ValueError, match=r"give only one"):
        eval_source(DataConfig(path=str(dataset_dict), eval_split="test", eval_fraction=0.1))
    with pytest.raises(DataError, match=r"no split 'validation'; the data set has splits \['test', 'train'\]"):
        prepare_data(DataConfig(path=str(dataset_dict), eval_split="validation"), None, 0, ("PreferencePair",), "rm")
    # An eval file of its own is read at data.split, as before; eval_split picks a split of it.
    assert eval_source(DataConfig(path=str(file), eval_path=str(dataset_dict))) == (str(dataset_dict), "train")
    assert eval_source(DataConfig(path=str(file), eval_path=str(dataset_dict), eval_split="test")) == (str(dataset_dict), "test")


def test_eval_rm_reads_the_eval_split(dataset_dict, tiny_dir, tmp_path):
    from alignkit.cli import main
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_scalar_head_model, load_tokenizer, save_model

    rm = save_model(load_scalar_head_model(ModelConfig(path=str(tiny_dir))), load_tokenizer(str(tiny_dir)), tmp_path / "rm")
    out = tmp_path / "m.json"
    assert main(["eval-rm", f"model.path={rm}", f"data.path={dataset_dict}", "data.eval_split=test", f"output={out}"]) == 0
    assert json.loads(out.read_text())["n_pairs"] == 3
