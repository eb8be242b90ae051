"""Data files that cannot be trusted (issue 12, "Also"; issue 25 item 1): bad text encodings and empty files are
refused in one line naming the file and line; image paths that leave the data folder, and image URLs, are skipped and
counted unless allowed, and nothing is fetched offline."""

import json
import logging
import os

import datasets
import numpy as np
import pandas as pd
import PIL.Image
import pytest
from proclip_train.cli import main
from proclip_train.cli.train import parse_train_args
from proclip_train.training.data import (
    PATH_OUTSIDE_DATA,
    REMOTE_IMAGE,
    image_path_inside,
    load_image_text_dataset,
)

datasets.disable_progress_bars()


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- encodings and empty files -----------------------------------------------------------------------------------------

# (file name, bytes, the line and column the error names)
UNREADABLE = {
    "jsonl-latin1-byte": ("c.jsonl", b'{"caption": "a cat"}\n{"caption": "caf\xe9 au lait"}\n', "line 2: byte 17 (0xe9)"),
    "jsonl-lone-high-surrogate": ("c.jsonl", b'{"caption": "a cat"}\n{"caption": "half \\ud83d emoji"}\n',
                                  "line 2, column 19"),
    "jsonl-lone-low-surrogate": ("c.jsonl", b'{"caption": "\\ude00 tail"}\n', "line 1, column 14"),
    "json-document-latin1-byte": ("c.json", b'[\n {"caption": "ok"},\n {"caption": "caf\xe9"}\n]\n',
                                  "line 3: byte 18 (0xe9)"),
    "csv-latin1-byte": ("c.csv", b"caption\na cat\ncaf\xe9 au lait\n", "line 3: byte 4 (0xe9)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_an_undecodable_row_refuses_the_file_in_one_line_naming_file_and_line(tmp_path, case):
    name, data, where = UNREADABLE[case]
    path = write(tmp_path / name, data)
    with pytest.raises(ValueError) as refused:
        load_image_text_dataset(str(path), caption_columns="caption", cache_dir=str(tmp_path / "hf"))
    message = str(refused.value)
    assert message.startswith(f"{path}, {where}") and "\n" not in message
    assert "Re-encode the file as UTF-8" in message or "Repair or remove the line" in message


def test_valid_surrogate_pairs_and_escaped_backslashes_load(tmp_path):
    """The refusal looks at escapes exactly: a whole pair is an emoji, and `\\\\ud800` is a backslash and text."""
    path = write(tmp_path / "c.jsonl", b'{"caption": "ok \\ud83d\\ude00"}\n{"caption": "a \\\\ud800 literal"}\n')
    dataset = load_image_text_dataset(str(path), caption_columns="caption", cache_dir=str(tmp_path / "hf"))
    assert dataset["caption"] == ["ok \U0001f600", "a \\ud800 literal"]

    # A whole JSON document goes through another reader of `datasets`, which drops a lone surrogate (the text stays
    # valid UTF-8, the half character is gone): what it does, written down.
    document = write(tmp_path / "c.json", b'[{"caption": "ok \\ud83d\\ude00"}, {"caption": "half \\ud800"}]')
    dataset = load_image_text_dataset(str(document), caption_columns="caption", cache_dir=str(tmp_path / "hf"))
    assert dataset["caption"] == ["ok \U0001f600", "half "]


@pytest.mark.parametrize(
    ("name", "data", "what"),
    [("c.jsonl", b"", "holds no rows:"), ("c.jsonl", b"\n  \n", "holds no rows:"),
     ("c.csv", b"caption\n", "holds no rows (only a header)"), ("c.json", b"[]\n", "holds no rows")],
)  # fmt: skip
def test_a_file_without_rows_is_one_line_not_stopiteration(tmp_path, name, data, what):
    path = write(tmp_path / name, data)
    with pytest.raises(ValueError, match=r"^[^\n]*$") as refused:
        load_image_text_dataset(str(path), caption_columns="caption", cache_dir=str(tmp_path / "hf"))
    assert str(path) in str(refused.value) and what in str(refused.value)


def test_the_commands_refuse_such_files_with_exit_code_2(tmp_path, tiny_proclip_dir, capsys):
    path = write(tmp_path / "c.jsonl", b'{"caption": "caf\xe9"}\n')
    with pytest.raises(SystemExit) as embed_exit:
        main(["embed", "--model", str(tiny_proclip_dir), "--data", str(path), "--no-teacher"])
    empty = write(tmp_path / "empty" / "c.jsonl", b"")
    with pytest.raises(SystemExit) as eval_exit:
        main(["eval", "--model", str(tiny_proclip_dir), "--task", "caption-retrieval", "--data", str(empty),
              "--caption-column", "caption"])  # fmt: skip
    assert embed_exit.value.code == eval_exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-3].startswith(f"proclip embed: error: {path}, line 1: byte 17 (0xe9) is not UTF-8")
    assert lines[-2].startswith(f"proclip eval: error: --data {empty} holds no rows: {empty} is empty")


# -- image paths -------------------------------------------------------------------------------------------------------


@pytest.fixture
def tables(tmp_path):
    """`data/pairs.csv` listing two images inside `data/` and four that leave it; `secret.png` lies beside `data/`."""
    data = tmp_path / "data"
    for path in (data / "img" / "a.png", data / "img" / "b.png", tmp_path / "secret.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(path)
    os.symlink(tmp_path, data / "linked")  # a link the folder's owner made: followed, as the folder's own
    rows = [
        ("img/a.png", "inside"),
        ("./img/../img/b.png", "inside, normalised"),
        ("linked/secret.png", "inside through a link"),
        ("https://example.com/c.png", "a URL"),
        ("../secret.png", "dot-dot"),
        (str(tmp_path / "secret.png"), "absolute"),
        ("img/../../secret.png", "dot-dot after a folder"),
        (f"file://{tmp_path / 'secret.png'}", "file URL"),
    ]
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(data / "pairs.csv", index=False)
    (data / "pairs.jsonl").write_text("".join(json.dumps({"image": p, "caption": c}) + "\n" for p, c in rows))
    return data


KEPT = ["inside", "inside, normalised", "inside through a link"]


@pytest.mark.parametrize("table", ["pairs.csv", "pairs.jsonl"])
def test_image_paths_leaving_the_data_folder_are_skipped_and_counted(tables, tmp_path, table, caplog, online):
    with caplog.at_level(logging.WARNING):
        dataset = load_image_text_dataset(
            str(tables / table), image_column="image", caption_columns="caption", cache_dir=str(tmp_path / "hf")
        )
    assert dataset["caption"] == KEPT
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipped")]
    assert sorted(summary) == [
        f"Skipped 2 of 8 rows ({REMOTE_IMAGE}): their image is a URL (http://, s3://, file://, local://, ...); pass "
        "--allow-remote-images to fetch them.",
        f"Skipped 3 of 8 rows ({PATH_OUTSIDE_DATA}): their image path leaves the data folder {tables} (an absolute "
        "path elsewhere, or ../); pass --allow-paths-outside-data to read them.",
    ]

    online()
    load = dict(image_column="image", caption_columns="caption", cache_dir=str(tmp_path / "hf"))
    assert len(load_image_text_dataset(str(tables / table), allow_paths_outside_data=True, **load)) == 6
    assert len(load_image_text_dataset(str(tables / table), allow_remote_images=True, **load)) == 5
    both = load_image_text_dataset(str(tables / table), allow_paths_outside_data=True, allow_remote_images=True, **load)
    assert len(both) == 8


def test_streaming_drops_them_as_it_reads(tables, tmp_path):
    dataset = load_image_text_dataset(
        str(tables / "pairs.csv"), image_column="image", caption_columns="caption", streaming=True,
        cache_dir=str(tmp_path / "hf"),
    )
    assert [row["caption"] for row in dataset] == KEPT


def test_image_path_inside():
    root = "/data/set"
    assert image_path_inside("/data/set/a.png", root) and image_path_inside("a/../b.png", root)
    assert image_path_inside(None, root)
    assert not image_path_inside("/data/settings/a.png", root)  # a sibling sharing the prefix
    assert not image_path_inside("../set2/a.png", root) and not image_path_inside("file:///etc/passwd", root)
    for url in ("s3://bucket/a.png", "local://a.png", "file:///data/set/a.png", "zip://a.png::local://b.zip"):
        assert not image_path_inside(url, root), url  # fsspec resolves these, not against root


def test_every_row_outside_is_an_error_and_the_flag_reaches_train_and_eval(tables, tmp_path, tiny_proclip_dir, capsys):
    outside = tables / "outside.csv"
    outside.write_text(f"image,caption\n../secret.png,a\n{tmp_path / 'secret.png'},b\n")
    with pytest.raises(ValueError, match="holds no rows once the 2 rows whose image path leaves the data folder"):
        load_image_text_dataset(str(outside), image_column="image", caption_columns="caption")

    args = parse_train_args(["--stage", "2", "--model", "m", "--data", "d", "--out", "o", "--allow_paths_outside_data"])
    assert args.allow_paths_outside_data is True

    command = ["eval", "--model", str(tiny_proclip_dir), "--task", "retrieval", "--data", str(outside),
               "--caption-column", "caption", "--out", str(tmp_path / "results.json")]  # fmt: skip
    with pytest.raises(SystemExit) as refused:
        main(command)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert refused.value.code == 2 and error.startswith("proclip eval: error:")
    assert "--allow-paths-outside-data" in error
    main([*command, "--allow-paths-outside-data"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["data"]["num_rows"] == 2

