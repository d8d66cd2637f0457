"""The reproduction's data as its sources publish it, drawn small, and a local HTTP server that serves it.

COCO's zips and Karpathy's split file, nocaps' captions file with its images at their URLs, Conceptual
Captions' two TSVs with a vanished URL each: images of one coloured shape, captions naming it. The
server records each request and can cut a file off halfway, as a dropped connection does.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import shutil
import threading
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 214)}
SHAPES = ("circle", "square")



def draw(path: Path, k: int) -> list[str]:
    """An image of one coloured shape, and two captions naming it."""
    colour, shape = list(COLOURS)[k % 3], SHAPES[k // 3 % 2]
    image = Image.new("RGB", (48, 40), (245, 245, 240))
    box = (10, 8, 38, 32)
    (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return [f"a {colour} {shape}.", f"a {shape} that is {colour}."]


def zip_folder(folder: Path, archive: Path) -> None:
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            z.write(path, path.relative_to(folder.parent))


def publish_coco(site: Path) -> None:
    """COCO's train2014.zip and val2014.zip, and Karpathy's caption_datasets.zip (with other files beside
    dataset_coco.json)."""
    work, images = site / "work", []
    for k, split in enumerate(["train"] * 10 + ["restval"] * 2 + ["val"] * 4 + ["test"] * 4):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        name = f"COCO_{folder}_{k + 1:012d}.jpg"
        captions = draw(work / folder / name, k)
        images.append({"filepath": folder, "filename": name, "cocoid": k + 1, "split": split,
                       "sentences": [{"raw": c, "sentid": 2 * k + j} for j, c in enumerate(captions)]})
    (site / "coco").mkdir(parents=True)
    for folder in ("train2014", "val2014"):
        zip_folder(work / folder, site / "coco" / f"{folder}.zip")
    (work / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    (work / "dataset_flickr8k.json").write_text("{}")
    with zipfile.ZipFile(site / "coco" / "caption_datasets.zip", "w") as z:
        for name in ("dataset_coco.json", "dataset_flickr8k.json"):
            z.write(work / name, name)
    shutil.rmtree(work)


def publish_nocaps(site: Path, base: str) -> None:
    """nocaps_val_4500_captions.json: COCO format, a domain per image, ten references each, images by coco_url."""
    domains = ["in-domain", "near-domain", "out-domain"]
    images, annotations = [], []
    for k in range(6):
        name = f"{k:016x}.jpg"
        captions = draw(site / "nocaps" / "val" / name, k)
        images.append({"id": k, "file_name": name, "open_images_id": f"{k:016x}", "domain": domains[k % 3],
                       "coco_url": f"{base}/nocaps/val/{name}", "height": 40, "width": 48})
        annotations += [{"image_id": k, "caption": captions[j % 2], "id": 10 * k + j} for j in range(10)]
    (site / "nocaps" / "nocaps_val_4500_captions.json").write_text(json.dumps({"images": images,
                                                                               "annotations": annotations}))


def publish_conceptual(site: Path, base: str) -> None:
    """Google's two TSVs (caption TAB url, no header); the images at their URLs, the last of each split vanished."""
    for split, tsv, n in (("train", "Train_GCC-training.tsv", 12), ("val", "Validation_GCC-1.1.0-Validation.tsv", 5)):
        lines = []
        for row in range(n):
            path = site / "cc" / split / f"{row:08d}.jpg"
            caption = draw(path, row + (0 if split == "train" else 1))[0]
            if row == n - 1:
                path.unlink()  # a URL that no longer answers
            lines.append(f"{caption}\t{base}/cc/{split}/{row:08d}.jpg")
        (site / "cc" / tsv).write_text("\n".join(lines) + "\n")


class Site(http.server.SimpleHTTPRequestHandler):
    """Serves the site's folder, records each request, and cuts the paths in ``broken`` off halfway."""

    requests: list[str]
    broken: set[str]

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.path in self.broken:
            data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def serve(folder: Path):
    """A local HTTP server for ``folder``: yields its base URL, the requests it answered and the broken paths."""
    requests, broken = [], set()
    handler = functools.partial(type("Handler", (Site,), {"requests": requests, "broken": broken}),
                                directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests, broken
    finally:
        server.shutdown()
        server.server_close()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


