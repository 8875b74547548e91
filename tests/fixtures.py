"""Tiny dataset trees in each real ReID dataset's on-disk layout, for the builder tests.

Every writer takes a root folder, writes a handful of 8x16 images (each one constant colour, derived from its
path) plus the dataset's annotation files, and returns what a correct build must hold:
{split: {file_name: Expect}}, file_name being the path relative to the root.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (8, 16)  # PIL (width, height): images read back as [16, 8, 3]


@dataclasses.dataclass
class Expect:
    pid: int
    camid: int = -1
    captions: list[str] = dataclasses.field(default_factory=list)
    sources: list[str] = dataclasses.field(default_factory=list)
    colour: tuple[int, int, int] = (0, 0, 0)


def colour(name: str) -> tuple[int, int, int]:
    """A distinct mid-range colour per file (mid-range: JPEG round trips it within a few levels)."""
    return tuple(32 + b % 192 for b in hashlib.md5(name.encode()).digest()[:3])


def image(root: Path, rel: str) -> tuple[int, int, int]:
    """Writes a constant-colour image at root/rel (JPEG or PNG by suffix); returns its colour."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = colour(rel)
    if path.suffix == ".png":
        Image.new("RGB", SIZE, rgb).save(path)
    else:
        Image.new("RGB", SIZE, rgb).save(path, format="JPEG", quality=95, subsampling=0)
    return rgb


# ------------------------------------------------------------------------------------------- Market-style
FOLDER_SPLIT = {"bounding_box_train": "train", "query": "query", "bounding_box_test": "gallery"}

MARKET = {  # name -> (pid, camid) kept, or None when the protocol drops it
    "bounding_box_train": {"0002_c1s1_000451_03.jpg": (2, 0), "0002_c3s1_000551_01.jpg": (2, 2),
                           "0007_c2s1_000001_00.jpg": (7, 1), "-1_c1s1_000401_03.jpg": None,
                           "0000_c1s1_000151_01.jpg": None},
    "query": {"0002_c6s1_000451_03.jpg": (2, 5), "0007_c5s1_001051_00.jpg": (7, 4), "-1_c2s1_000401_03.jpg": None},
    "bounding_box_test": {"0002_c2s1_000301_02.jpg": (2, 1), "0007_c4s1_000101_01.jpg": (7, 3),
                          "0000_c1s1_000151_01.jpg": (0, 0), "-1_c3s1_000401_03.jpg": None},
}
DUKE = {
    "bounding_box_train": {"0001_c2_f0046182.jpg": (1, 1), "0001_c8_f0000001.jpg": (1, 7),
                           "0005_c1_f0001234.jpg": (5, 0)},
    "query": {"0005_c2_f0046985.jpg": (5, 1)},
    "bounding_box_test": {"0005_c3_f0046000.jpg": (5, 2), "0002_c1_f0044158.jpg": (2, 0)},
}
OCCLUDED_DUKE = {
    "bounding_box_train": {"0001_c1_f0046182.jpg": (1, 0), "0003_c7_f0012345.jpg": (3, 6)},
    "query": {"0004_c2_f0046985.jpg": (4, 1), "0004_c1_f0046986.jpg": (4, 0)},
    "bounding_box_test": {"0004_c5_f0040000.jpg": (4, 4)},
}
CUHK03 = {
    "detected": {"bounding_box_train": {"0001_c1_1.png": (1, 0), "0001_c2_2.png": (1, 1)},
                 "query": {"0003_c1_1.png": (3, 0)},
                 "bounding_box_test": {"0003_c2_1.png": (3, 1), "0004_c2_3.png": (4, 1)}},
    "labeled": {"bounding_box_train": {"0001_c1_1.png": (1, 0), "0001_c2_2.png": (1, 1), "0002_c1_1.png": (2, 0)},
                "query": {"0003_c2_1.png": (3, 1)},
                "bounding_box_test": {"0003_c1_4.png": (3, 0)}},
}


def market_style(root: Path, folders: dict, prefix: str = "") -> dict[str, dict[str, Expect]]:
    """Writes {folder: {name: (pid, camid) | None}} under root/prefix; Thumbs.db files are ignored noise."""
    expected = {split: {} for split in FOLDER_SPLIT.values()}
    for folder, names in folders.items():
        (root / prefix / folder).mkdir(parents=True, exist_ok=True)
        (root / prefix / folder / "Thumbs.db").write_bytes(b"not an image")
        for name, kept in names.items():
            rel = f"{prefix}{folder}/{name}"
            rgb = image(root, rel)
            if kept:
                expected[FOLDER_SPLIT[folder]][rel] = Expect(pid=kept[0], camid=kept[1], colour=rgb)
    return expected


def market1501(root: Path):
    return market_style(root, MARKET)


def dukemtmc_reid(root: Path):
    return market_style(root, DUKE)


def occluded_duke(root: Path):
    return market_style(root, OCCLUDED_DUKE)


def cuhk03_np(root: Path, config: str = "detected"):
    """Writes both box types (the real zip holds both); returns the expectation for `config`."""
    out = {cfg: market_style(root, folders, prefix=f"{cfg}/") for cfg, folders in CUHK03.items()}
    return out[config]


# ----------------------------------------------------------------------------------------------- MSMT17
MSMT17 = {  # list file -> [(path under train/ or test/, pid, camid)]
    "list_train.txt": [("0000/0000_000_01_0303morning_0015_0.jpg", 0, 0),
                       ("0001/0001_003_15_0303afternoon_0021_1.jpg", 1, 14)],
    "list_val.txt": [("0002/0002_001_07_0303noon_0003_0.jpg", 2, 6)],
    "list_query.txt": [("0000/0000_000_03_0303morning_0008_0.jpg", 0, 2)],
    "list_gallery.txt": [("0000/0000_002_05_0304morning_0100_1.jpg", 0, 4),
                         ("0001/0001_000_02_0303morning_0001_0.jpg", 1, 1)],
}
MSMT17_SPLIT = {"list_train.txt": ("train", "train"), "list_val.txt": ("train", "train"),
                "list_query.txt": ("test", "query"), "list_gallery.txt": ("test", "gallery")}


def msmt17(root: Path):
    expected = {"train": {}, "query": {}, "gallery": {}}
    for list_name, rows in MSMT17.items():
        folder, split = MSMT17_SPLIT[list_name]
        lines = []
        for path, pid, camid in rows:
            rgb = image(root, f"{folder}/{path}")
            expected[split][f"{folder}/{path}"] = Expect(pid=pid, camid=camid, colour=rgb)
            lines.append(f"{path} {pid}\n")
        (root / list_name).write_text("".join(lines))
    return expected


# ------------------------------------------------------------------------------------ text-to-image (JSON)
# Captions verbatim: unicode, punctuation, quotes, newlines and emoji must come back byte for byte.
CAPTIONS = ["A woman in a red coat, carrying a black bag; she wears boots.",
            "Elle porte une écharpe — très jolie ! « bleu » 😀",
            'He has "short" hair\nand a grey T-shirt (v-neck) & jeans...',
            "这个人穿着白色衬衫和黑色裤子。",
            "  leading and trailing spaces  ",
            "A man in a yellow jacket.",
            "The same man, seen from behind."]

CUHK_PEDES = [  # (split, file_path, id, captions); the first image appears in two entries: merged
    ("train", "CUHK01/0001001.png", 1, CAPTIONS[0:2]),
    ("train", "CUHK03/2_1.jpg", 2, CAPTIONS[2:3]),
    ("train", "CUHK01/0001001.png", 1, CAPTIONS[3:4]),
    ("val", "Market/0003_c1s1_000151_01.jpg", 11004, CAPTIONS[4:6]),
    ("test", "test_query/p5_s7.jpg", 12004, CAPTIONS[5:7]),
    ("test", "train_query/p6_s8.jpg", 12004, CAPTIONS[1:2]),
]
ICFG_PEDES = [
    ("train", "train/0001/0001_000_01_0303morning_0008_0.jpg", 1, CAPTIONS[0:1]),
    ("train", "train/0002/0002_001_05_0303noon_0010_1.jpg", 2, CAPTIONS[1:2]),
    ("train", "train/0001/0001_000_01_0303morning_0008_0.jpg", 1, CAPTIONS[6:7]),
    ("test", "test/3001/3001_000_02_0303morning_0001_0.jpg", 3001, CAPTIONS[2:4]),
]
RSTP_REID = [
    ("train", "0000_c14_0031.jpg", 0, CAPTIONS[0:2]),
    ("train", "0001_c3_0008.jpg", 1, CAPTIONS[2:4]),
    ("val", "3701_c1_0001.jpg", 3701, CAPTIONS[4:6]),
    ("test", "3901_c7_0012.jpg", 3901, CAPTIONS[5:7]),
    ("test", "3901_c7_0012.jpg", 3901, CAPTIONS[3:4]),
]


def caption_json(root: Path, annotations: str, path_key: str, rows, extra_fields=True):
    entries, expected = [], {}
    for split, file_path, pid, captions in rows:
        entry = {"split": split, "captions": list(captions), path_key: file_path, "id": pid}
        if extra_fields:
            entry["processed_tokens"] = [c.lower().split() for c in captions]
        entries.append(entry)
        file_name = f"imgs/{file_path}"
        if file_name not in expected.setdefault(split, {}):
            expected[split][file_name] = Expect(pid=pid, colour=image(root, file_name))
        expected[split][file_name].captions.extend(captions)
    (root / annotations).write_text(json.dumps(entries, ensure_ascii=False, indent=1), encoding="utf-8")
    return expected


def cuhk_pedes(root: Path):
    return caption_json(root, "reid_raw.json", "file_path", CUHK_PEDES)


def icfg_pedes(root: Path):
    return caption_json(root, "ICFG-PEDES.json", "file_path", ICFG_PEDES)


def rstp_reid(root: Path):
    return caption_json(root, "data_captions.json", "img_path", RSTP_REID, extra_fields=False)


# -------------------------------------------------------------------------------------------- LUPerson-MLLM
LUPERSON_IMAGES = ["00/a.jpg", "00/b.jpg", "01/c.jpg", "01/d.jpg", "01/e.jpg", "z.jpg"]  # sorted: pid = index
LUPERSON_NO_CAPTION = ["images/01/e.jpg"]
LUPERSON_LEAK = "A person wearing <upper clothing>."  # z.jpg's only caption: no static caption replaces it


def luperson_mllm(root: Path):
    colours = {rel: image(root, f"images/{rel}") for rel in LUPERSON_IMAGES}
    (root / "captions").mkdir()
    files = {  # files are read in name order: gemini_template.json, ours.jsonl, qwen_static.json
        "qwen_static.json": {"00/a.jpg": CAPTIONS[0], "01/c.jpg": CAPTIONS[1], "images/00/b.jpg": CAPTIONS[3],
                             "/their/machine/LUPerson-MLLM/d.jpg": CAPTIONS[5],  # matched by its unique name
                             "not/here.jpg": "an image that is not under images/ is ignored"},
        "gemini_template.json": {"00/a.jpg": CAPTIONS[2], "01/d.jpg": "A man in a [clothing description].",
                                 "z.jpg": LUPERSON_LEAK},
    }
    for name, content in files.items():
        (root / "captions" / name).write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    lines = [{"image": "01/d.jpg", "caption": CAPTIONS[4], "source": "ours_template", "template_id": 7},
             {"image": "00/a.jpg", "caption": CAPTIONS[6], "source": "ours_static"}]
    (root / "captions" / "ours.jsonl").write_text(
        "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    (root / "captions" / "README.txt").write_text("other files are ignored")

    captions = {  # per image, in file-name order
        "00/a.jpg": [(CAPTIONS[2], "gemini_template"), (CAPTIONS[6], "ours_static"), (CAPTIONS[0], "qwen_static")],
        "00/b.jpg": [(CAPTIONS[3], "qwen_static")],
        "01/c.jpg": [(CAPTIONS[1], "qwen_static")],
        # the leaked gemini caption is replaced by d's only static caption, in its place
        "01/d.jpg": [(CAPTIONS[5], "gemini_template"), (CAPTIONS[4], "ours_template"), (CAPTIONS[5], "qwen_static")],
        "z.jpg": [(LUPERSON_LEAK, "gemini_template")],  # kept: z has no static caption (as the authors' loader)
    }
    return {"train": {f"images/{rel}": Expect(pid=LUPERSON_IMAGES.index(rel), captions=[c for c, _ in caps],
                                              sources=[s for _, s in caps], colour=colours[rel])
                      for rel, caps in captions.items()}}


WRITERS = {"market1501": market1501, "dukemtmc_reid": dukemtmc_reid, "occluded_duke": occluded_duke,
           "cuhk03_np": cuhk03_np, "msmt17": msmt17, "cuhk_pedes": cuhk_pedes, "icfg_pedes": icfg_pedes,
           "rstp_reid": rstp_reid, "luperson_mllm": luperson_mllm}


# ---------------------------------------------------------------------------------- images not in 8-bit RGB
# mode -> suffix. What a PIL-based ReID loader reads from each is `Image.open(p).convert('RGB')`.
ODD_MODES = {"CMYK": ".jpg", "L": ".jpg", "RGBA": ".png", "LA": ".png", "P": ".png", "I;16": ".png"}


def odd_image(root: Path, rel: str, mode: str):
    """Writes a non-constant 8x16 image of `mode` at root/rel; returns the uint8 [16, 8, 3] RGB a loader must read,
    worked out from the written values (not by PIL's convert): alpha dropped, grey replicated, palette looked up;
    for CMYK, (255 - C) * (255 - K) / 255 per channel of the decoded JPEG (exact to +-1 rounding)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(int.from_bytes(hashlib.md5(rel.encode()).digest()[:4], "little"))
    h, w = SIZE[1], SIZE[0]
    if mode == "P":
        palette = rng.integers(0, 256, (4, 3), dtype=np.uint8)
        index = rng.integers(0, 4, (h, w), dtype=np.uint8)
        img = Image.fromarray(index, "P")
        img.putpalette(palette.reshape(-1).tolist())
        img.save(path)
        return palette[index]
    if mode == "I;16":  # 16 bits per pixel; values kept <= 255 so that no scaling convention is involved
        grey = rng.integers(0, 256, (h, w)).astype(np.uint16)
        Image.frombytes("I;16", SIZE, grey.astype("<u2").tobytes()).save(path)
        return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
    channels = {"CMYK": 4, "L": 1, "RGBA": 4, "LA": 2}[mode]
    values = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    if mode == "CMYK":  # smooth, so that JPEG keeps it close; the expectation comes from the decoded file
        values = np.broadcast_to(values.mean(axis=(0, 1), dtype=np.float64).astype(np.uint8), values.shape).copy()
        values[:, :, 0] = np.linspace(0, 200, w, dtype=np.uint8)[None, :]
    img = Image.frombytes(mode, SIZE, values.tobytes())
    if path.suffix == ".jpg":
        img.save(path, format="JPEG", quality=95)
    else:
        img.save(path)
    if mode == "CMYK":
        with Image.open(path) as back:
            cmyk = np.asarray(back, np.float64)
        return np.round((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255).astype(np.uint8)
    if mode == "L":
        with Image.open(path) as back:  # JPEG: the expectation is the decoded grey, replicated
            values = np.asarray(back)[..., None]
    return np.repeat(values[..., :1], 3, axis=-1) if channels <= 2 else values[..., :3]
