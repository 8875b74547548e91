"""`python -m reid_jax.search index | query | serve`: person search over your own images (docs/search.md).

    python -m reid_jax.search index --model PATH --images DIR --index OUT [--camids FILE]
    python -m reid_jax.search query --index OUT (--text "..." | --image q.jpg [--camid C]) [--top K] [--json]
                                    [--sheet result.png] [--backend jax|faiss] [--model PATH]
    python -m reid_jax.search serve --index OUT [--host 127.0.0.1 --port 8000]
    python -m reid_jax.search images --dataset NAME[/CONFIG] --split S --data_dir D --out DIR [--limit N]

`images` writes a built dataset's split as image files (with camids.csv), to try search without photos of one's own.
`index` encodes only what changed since the last run (new or modified files; removed ones are dropped) and may be
killed at any time: rerun it. `query` prints `rank score path` lines, or JSON lines with --json.
"""

from __future__ import annotations

import argparse
import json
import sys

from reid_jax.errors import EXIT_USAGE, UserError, expand_path, report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reid_jax.search", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    idx = sub.add_parser("index", help="encode a folder of images into an index (incremental, resumable)")
    idx.add_argument("--model", required=True, help="a reid-jax run, a converted CLIP, a CLIP or an authors' "
                     "checkpoint (anything reid_jax.inference.Encoder.load reads)")
    idx.add_argument("--images", required=True, help="folder of gallery images (jpg/jpeg/png/bmp/webp, recursive)")
    idx.add_argument("--index", required=True, help="output folder (created; updated when it exists)")
    idx.add_argument("--camids", help="camera ids: JSON {relative path: id} or `path,id` lines (SIE models)")
    idx.add_argument("--batch", type=int, default=64, help="images per device step")
    idx.add_argument("--workers", type=int, default=0, help="decoding threads (0 = one per core)")
    idx.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                     help="compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")

    q = sub.add_parser("query", help="rank the indexed images for a sentence or an image")
    q.add_argument("--index", required=True)
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a description of the person")
    what.add_argument("--image", help="a photo of the person")
    q.add_argument("--camid", type=int, help="the query image's camera id (models with a camera embedding)")
    q.add_argument("--top", type=int, default=10)
    q.add_argument("--json", action="store_true", help="JSON lines {rank, score, path, file}")
    q.add_argument("--sheet", help="also draw the query and its top K into this PNG")
    q.add_argument("--backend", default="jax", choices=("jax", "faiss"))
    q.add_argument("--model", help="the index's model at another path (it must be the same model)")

    s = sub.add_parser("serve", help="a local search page over the index")
    s.add_argument("--index", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)

    im = sub.add_parser("images", help="write a built dataset's split as image files (to try search)")
    im.add_argument("--dataset", required=True, help="NAME or NAME/CONFIG, e.g. synthetic_pedestrians/demo")
    im.add_argument("--split", default="test")
    im.add_argument("--data_dir", required=True)
    im.add_argument("--out", required=True)
    im.add_argument("--limit", type=int, default=None, help="the first N images only")
    return parser


def _images(args) -> int:
    from reid_jax.search import images

    name, _, config = args.dataset.partition("/")
    n = images.write_split(name, args.split, args.data_dir, args.out, config or None, args.limit)
    print(f"{n} images of {args.dataset} split {args.split!r} in {args.out} (camera ids: {args.out}/camids.csv)")
    return 0


def _index(args) -> int:
    from reid_jax.search import index

    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: expected a positive number of images per step")
    cfg = index.BuildConfig(batch=args.batch, workers=args.workers, dtype=args.dtype)
    summary = index.build(args.model, args.images, args.index, args.camids, cfg)
    print(json.dumps(summary))
    return 0


def _query(args) -> int:
    from reid_jax.search import index

    if args.top < 1:
        raise UserError(f"--top {args.top}: expected a positive number of results")
    idx = index.Index.open(args.index, model=args.model)
    hits = idx.query(text=args.text, image=expand_path(args.image), camid=args.camid, top=args.top,
                     backend=args.backend)
    for h in hits:
        if args.json:
            print(json.dumps({"rank": h.rank, "score": round(h.score, 6), "path": h.path,
                              "file": str(idx.root / h.path)}))
        else:
            print(f"{h.rank:4d}  {h.score:.4f}  {h.path}")
    if args.sheet:
        _sheet(idx, hits, args)
    return 0


def _sheet(idx, hits, args) -> None:
    from PIL import Image

    from reid_jax.eval import sheet
    from reid_jax.search import images

    query = args.text if args.text is not None else Image.fromarray(images.load(expand_path(args.image)))
    row = sheet.Row(query, [sheet.Hit(Image.open(idx.root / h.path), h.score, h.rank, None, h.path)
                               for h in hits])
    sheet.save_sheet(expand_path(args.sheet), [row], title=f"{idx.out}: {len(idx)} images, model {idx.kind}")


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if e.code in (0, None) else EXIT_USAGE
    try:
        if args.command == "serve":
            from reid_jax.search import serve

            return serve.main(args.index, args.host, args.port)
        return {"index": _index, "query": _query, "images": _images}[args.command](args)
    except UserError as e:
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
