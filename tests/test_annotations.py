"""Annotation files: every layout read once, alike for extraction and references, and what a file gets wrong
refused in one line naming the file and the entry (or dropped and said, for empty captions)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clipcap.annotations import load_annotations, load_references, read_annotations
from clipcap.cli.evaluate import main as evaluate
from clipcap.cli.parse_captions import main as parse_captions
from clipcap.files import ClipCapError
from clipcap.sources import caption_shards, coco_format_shards, coco_images


def karpathy_entry(image_id, captions, split="test", id_key="cocoid") -> dict:
    return {id_key: image_id, "split": split, "filepath": "val2014", "filename": f"{image_id}.jpg",
            "sentences": [{"raw": c, "sentid": j} for j, c in enumerate(captions)]}


def coco_format(images: dict, domain: str | None = None) -> dict:
    """A COCO-format captions file: images ``{id: captions}``, each with a file name (and a domain)."""
    return {"images": [{"id": i, "file_name": f"{i}.jpg", **({"domain": domain} if domain else {})} for i in images],
            "annotations": [{"image_id": i, "caption": c, "id": 10 * k + j}
                            for k, (i, captions) in enumerate(images.items()) for j, c in enumerate(captions)]}


def write(path: Path, content) -> Path:
    """A file of ``content``: JSON for dicts and lists, text for strings, as is for bytes."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def extracted(shards) -> dict:
    """Image id -> captions of the images the shards would encode (their files are there)."""
    return {item.image_id: item.captions for shard in shards for item in shard.list_items()[0]}


# The same two images in every layout, one caption of the first whitespace only: (file, split, its image ids).
IMAGES = {"a.jpg": ["a dog on a bench.", "   "], "b.jpg": ["a cat on a mat."]}
LAYOUTS = {
    "karpathy_coco": ("dataset_coco.json", "test", {"images": [karpathy_entry(1, IMAGES["a.jpg"]),
                                                               karpathy_entry(2, IMAGES["b.jpg"])]}),
    "karpathy_flickr": ("dataset_flickr30k.json", "test",
                        {"images": [karpathy_entry(1, IMAGES["a.jpg"], id_key="imgid"),
                                    karpathy_entry(2, IMAGES["b.jpg"], id_key="imgid")], "dataset": "flickr30k"}),
    "coco_format": ("captions_val2014.json", None, coco_format({1: IMAGES["a.jpg"], 2: IMAGES["b.jpg"]})),
    "caption_list": ("train_caption.json", None, [{"image_id": i, "caption": c}
                                                  for i, name in ((1, "a.jpg"), (2, "b.jpg")) for c in IMAGES[name]]),
    "csv": ("captions.csv", None, "file_name,text\n" + "".join(f"{n},{c}\n" for n, cs in IMAGES.items() for c in cs)),
    "jsonl": ("captions.jsonl", None,
              "".join(json.dumps({"file_name": n, "text": cs}) + "\n" for n, cs in IMAGES.items())),
    "tsv": ("captions.tsv", None, "".join(f"{n}\t{c}\n" for n, cs in IMAGES.items() for c in cs)),
    "conceptual_tsv": ("Validation_GCC-1.1.0-Validation.tsv", None,
                       "".join(f"{c}\thttp://example.com/{k}.jpg\n" for k, c in enumerate(["a dog on a bench.", "   ",
                                                                                           "a cat on a mat."]))),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_is_told_apart_and_drops_empty_captions_saying_so(layout, tmp_path, capsys):
    name, split, content = LAYOUTS[layout]
    path = write(tmp_path / name, content)
    ids = {"csv": ["a.jpg", "b.jpg"], "jsonl": ["a.jpg", "b.jpg"], "tsv": ["a.jpg", "b.jpg"],
           "conceptual_tsv": [0, 2]}.get(layout, [1, 2])
    expected = {ids[0]: ["a dog on a bench."], ids[1]: ["a cat on a mat."]}
    assert load_references(path, split) == expected
    assert capsys.readouterr().out == f"{path}: dropped 1 empty captions\n"
    # Extraction reads the same captions under the same ids, and says the same.
    for image in ("1.jpg", "2.jpg", "a.jpg", "b.jpg", "val2014/1.jpg", "val2014/2.jpg"):
        (tmp_path / image).parent.mkdir(exist_ok=True)
        (tmp_path / image).write_bytes(b"")
    if layout in ("karpathy_coco", "caption_list"):
        images = coco_images(path, split or "train")
        assert {image.image_id: image.captions for image in images} == expected
    elif layout == "coco_format":
        assert extracted(coco_format_shards(path, tmp_path)) == expected
    elif layout != "conceptual_tsv":
        assert extracted(caption_shards(path, split=split)) == expected
    if layout != "conceptual_tsv":
        assert capsys.readouterr().out == f"{path}: dropped 1 empty captions\n"
    assert read_annotations(path).layout == layout


def test_nocaps_domains_and_files_come_with_the_references(tmp_path):
    path = write(tmp_path / "nocaps_val_4500_captions.json",
                 coco_format({7: ["a kangaroo."], 3: ["a bus."]}, "near-domain"))
    references, images = load_annotations(path)
    assert list(references) == [7, 3] and images == {7: {"file": "7.jpg", "domain": "near-domain"},
                                                     3: {"file": "3.jpg", "domain": "near-domain"}}
    # Ids written as digit strings are the same images ("000012" is 12), as in the original's files.
    path = write(tmp_path / "test_caption.json",
                 [{"image_id": "000012", "caption": "a"}, {"image_id": 12, "caption": "b"}])
    assert load_references(path) == {12: ["a", "b"]}


# --------------------------------------------------------------------------- what a file gets wrong


@pytest.mark.parametrize("id_key", ["cocoid", "imgid"])
def test_an_image_listed_twice_is_refused(tmp_path, id_key):
    """Karpathy's files and COCO's 'images' list each image once: a second entry would silently merge
    or re-point it (here even from another split, and by an id written as a digit string)."""
    path = write(tmp_path / "dataset.json", {"images": [karpathy_entry(5, ["a dog."], id_key=id_key),
                                                        karpathy_entry(6, ["a cat."], id_key=id_key),
                                                        karpathy_entry("5", ["a cow."], "train", id_key)]})
    extract = (lambda: coco_images(path, "test")) if id_key == "cocoid" else \
        (lambda: caption_shards(path, split="test"))
    for read in (lambda: load_references(path, "test"), extract):
        with pytest.raises(ClipCapError, match=rf"dataset\.json: image entries 0 and 2 have the same {id_key} 5; "
                                               "each image must be listed once"):
            read()
    nocaps = coco_format({1: ["a kangaroo."]}, "near-domain")
    nocaps["images"].append({"id": 1, "file_name": "other.jpg", "domain": "out-domain"})
    path = write(tmp_path / "nocaps_val_4500_captions.json", nocaps)
    for read in (lambda: load_annotations(path), lambda: coco_format_shards(path, tmp_path)):
        with pytest.raises(ClipCapError, match=r"nocaps_val_4500_captions\.json: image entries 0 and 1 have the same "
                                               "id 1"):
            read()


@pytest.mark.parametrize("bad", [1.9, True, None, [1]])
def test_ids_that_are_neither_integers_nor_strings_are_refused_naming_the_entry(tmp_path, bad):
    value = json.dumps(bad)
    files = {
        "dataset_coco.json": ({"images": [karpathy_entry(1, ["a dog."]), karpathy_entry(bad, ["a cat."])]},
                              "test", f"image entry 1: cocoid {value}"),
        "captions.json": ({"images": [{"id": 1, "file_name": "1.jpg"}, {"id": bad, "file_name": "2.jpg"}],
                           "annotations": [{"image_id": 1, "caption": "a dog.", "id": 1}]}, None,
                          f"image entry 1: id {value}"),
        "train_caption.json": ([{"image_id": 1, "caption": "a dog."}, {"image_id": bad, "caption": "a cat."}], None,
                               f"annotation 1: image_id {value}"),
    }
    for name, (content, split, entry) in files.items():
        path = write(tmp_path / name, content)
        extract = (lambda: coco_format_shards(path, tmp_path)) if name == "captions.json" else \
            (lambda: coco_images(path, split or "train"))
        for read in (lambda: load_references(path, split), extract):
            with pytest.raises(ClipCapError) as error:
                read()
            assert str(error.value) == f"{path}: {entry} is neither an integer nor a string"


def test_a_caption_that_is_not_a_string_is_refused_naming_the_entry(tmp_path):
    """null must not become the caption "None", in any layout; a missing caption is no empty one either."""
    cases = [
        ("dataset_coco.json", {"images": [karpathy_entry(1, ["a dog.", None])]}, "test",
         "image entry 0 sentence 1: 'raw' is null, not a string", lambda p: coco_images(p, "test")),
        ("dataset_flickr8k.json", {"images": [karpathy_entry(1, [7], id_key="imgid")]}, "test",
         "image entry 0 sentence 0: 'raw' is 7, not a string", lambda p: caption_shards(p, split="test")),
        ("captions.json", coco_format({1: ["a dog.", None]}), None, "annotation 1: 'caption' is null, not a string",
         lambda p: coco_format_shards(p, p.parent)),
        ("train_caption.json", [{"image_id": 1, "caption": None}], None,
         "annotation 0: 'caption' is null, not a string", coco_images),
        ("captions.jsonl", '{"file_name": "a.jpg", "text": "a dog."}\n{"file_name": "a.jpg", "text": null}\n', None,
         "line 2: 'text' must be a string or a list of strings", caption_shards),
        ("more.jsonl", '{"file_name": "a.jpg", "text": "a dog."}\n{"file_name": "b.jpg"}\n', None,
         "line 2: 'text' must be a string or a list of strings", caption_shards),
    ]
    for name, content, split, problem, extract in cases:
        path = write(tmp_path / name, content)
        for read in (lambda: load_references(path, split), lambda: extract(path)):
            with pytest.raises(ClipCapError) as error:
                read()
            assert str(error.value) == f"{path}: {problem}"


def test_an_unmatched_csv_quote_is_refused_and_tsv_has_no_quoting(tmp_path):
    cases = {'file_name,text\na.jpg,"a dog\nb.jpg,a cat\nc.jpg,a cow\n':
             r"line 2: a quoted field runs on to line 4 \(unexpected end of data\); an unmatched quote\?",
             'file_name,text\na.jpg,"a dog\nb.jpg,a cat"\nc.jpg,a cow\n': r"line 2: a quoted field runs on to line 3;",
             'file_name,text\na.jpg,"a dog\nb.jpg,"a cat"\n':
             r"line 2: a quoted field runs on to line 3 \(',' expected"}
    for text, problem in cases.items():
        path = write(tmp_path / "captions.csv", text)
        for read in (load_references, caption_shards):
            with pytest.raises(ClipCapError, match=rf"^{path}: {problem}"):
                read(path)
    path = write(tmp_path / "fine.csv", 'file_name,text\na.jpg,"a dog, on a ""bench"""\n')
    assert load_references(path) == {"a.jpg": ['a dog, on a "bench"']}
    # TSV has no quoting: a quote is a character of the caption, and every row stays a row.
    path = write(tmp_path / "captions.tsv", 'a.jpg\t"a dog\nb.jpg\ta "cat"\n')
    assert load_references(path) == {"a.jpg": ['"a dog'], "b.jpg": ['a "cat"']}
    path = write(tmp_path / "Validation_GCC-1.1.0-Validation.tsv", '"a dog\thttp://x/0.jpg\na cat\thttp://x/1.jpg\n')
    assert load_references(path) == {0: ['"a dog'], 1: ["a cat"]}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".tsv"])
def test_text_that_is_not_utf8_is_refused_naming_the_line(tmp_path, suffix):
    rows = {".csv": [b"file_name,text", b"a.jpg,a dog.", b"b.jpg,%s"],
            ".jsonl": [b'{"file_name": "a.jpg", "text": "a dog."}', b"", b'{"file_name": "b.jpg", "text": "%s"}'],
            ".tsv": [b"file_name\ttext", b"a.jpg\ta dog.", b"b.jpg\t%s"]}[suffix]
    for bad in (b"caf\xe9", b"\xed\xa0\x80 a lone surrogate in UTF-8"):
        path = write(tmp_path / f"captions{suffix}", b"\n".join(rows) % bad + b"\n")
        for read in (load_references, caption_shards):
            with pytest.raises(ClipCapError,
                               match=rf"^{path}: line 3 is not UTF-8 text \(.*\); save the file as UTF-8$"):
                read(path)
    # A JSON escape can name a lone surrogate, which no file or tokenizer takes.
    path = write(tmp_path / "captions.jsonl", '{"file_name": "a.jpg", "text": "a dog."}\n'
                                              '{"file_name": "b.jpg", "text": ["a cat", "\\ud800"]}\n')
    with pytest.raises(ClipCapError, match=rf"^{path}: line 2: 'text' '\\ud800' holds a lone surrogate, not text$"):
        load_references(path)
    path = write(tmp_path / "captions.json", coco_format({1: ["a dog.", "\ud800"]}))
    with pytest.raises(ClipCapError, match=rf"^{path}: annotation 1: 'caption' '\\ud800' holds a lone surrogate"):
        load_references(path)


def test_fields_beyond_the_csv_modules_limit(tmp_path):
    """CSV refuses a field over the csv module's limit (an unclosed quote's usual sign) naming the line;
    TSV, which needs no csv module, reads it."""
    long = "a dog " * 30_000
    path = write(tmp_path / "captions.csv", f"file_name,text\na.jpg,a dog.\nb.jpg,{long}\n")
    with pytest.raises(ClipCapError, match=rf"^{path}: line 3 is not valid CSV \(field larger than field limit"):
        load_references(path)
    path = write(tmp_path / "captions.tsv", f"a.jpg\ta dog.\nb.jpg\t{long}\n")
    assert load_references(path)["b.jpg"] == [long.strip()]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["captions.jsonl", "captions.csv", "captions.tsv", "dataset_flickr30k.json",
                                  "photos/metadata.jsonl"])
def test_a_fifo_is_refused_not_waited_on(tmp_path, name):
    """Nobody writes to this FIFO: reading it would wait forever, in parse_captions.py and evaluate.py alike."""
    fifo = tmp_path / name
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    source = fifo.parent if name.startswith("photos/") else fifo
    results = write(tmp_path / "results.json", [{"image_id": "a.jpg", "caption": "a dog."}])
    for run in (lambda: parse_captions([str(source), "--out", str(tmp_path / "out.pkl")]),
                lambda: evaluate(["--results", str(results), "--annotations", str(source), "--out",
                                  str(tmp_path / "metrics.json")])):
        with pytest.raises(ClipCapError, match=rf"^{fifo}: not a regular file \(a FIFO\)$"):
            run()


def test_a_folder_is_an_image_folder_or_a_one_line_error(tmp_path):
    (tmp_path / "refs").mkdir()
    results = write(tmp_path / "results.json", [{"image_id": "a.jpg", "caption": "a dog."}])
    with pytest.raises(ClipCapError, match=r"refs: folder has no metadata\.jsonl or metadata\.csv"):
        evaluate(["--results", str(results), "--annotations", str(tmp_path / "refs"),
                  "--out", str(tmp_path / "m.json")])
    (tmp_path / "refs" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "a dog."}) + "\n")
    assert load_annotations(tmp_path / "refs") == ({"a.jpg": ["a dog."]}, {"a.jpg": {"file": "a.jpg"}})
