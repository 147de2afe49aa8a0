"""``tileprompt prepare-data SOURCE INPUT... --out DIR``: write a dataset as webdataset shards with a manifest.

Sources:
  bigearthnet  a BigEarthNet-S2 v1 folder of patch folders, or a v2 (reBEN) folder with metadata.parquet;
               --nomenclature 19 (default, the paper's patching task), 43 or 5; splits from v2's metadata or
               --splits-dir (the official train/val/test CSVs), else by a hash of the patch name
  folders      class folders ROOT/<class>/<image> (EuroSAT MS tifs with B8A last are re-ordered; EuroSAT RGB
               JPEGs; any such layout); EuroSAT's ten folders get CLIP_benchmark's class names and templates
  rasters      your own rasters (GeoTIFF/COG, band folders, SAFE IMG_DATA) cut into tiles; with --labels
               POLYGONS --field NAME each tile gets the majority class under the polygons (and its coverage),
               split spatially in blocks of tiles; without --labels the tiles are unlabelled (alignment data);
               --captions templated adds captions made from the label names and their shares of each tile
               (templated, not written by people: the manifest says so) for HarMA / RDB retrieval training
  captions     an image-text retrieval set: RSICD / RSITMD caption files (rsitmd_train.json, rsitmd_val.json,
               rsitmd_test.json, or one dataset_rsitmd.json) and --images DIR; classes from file-name prefixes

The output folder is the CLIP_benchmark layout the Mind the Modality Gap code reads (classnames.txt,
zeroshot_classification_templates.txt, train/val/test with nshards.txt, nsamples.txt and N.tar shards) plus
manifest.json: counts per class and split, bands, levels, tile sizes, and where the data came from.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from .command import parser_for, run_command
from .data.folders import EUROSAT_TEMPLATES
from .data.shards import DEFAULT_SAMPLES_PER_SHARD, DatasetWriter, check_dataset_output
from .data.splits import hash_split, parse_fractions

SOURCES = ("bigearthnet", "folders", "rasters", "captions")
RASTER_TEMPLATES = ["a satellite photo of {c}.", "a satellite image of {c}.", "satellite imagery of {c}.",
                    "a centered satellite photo of {c}.", "an aerial view of {c}."]


def build_parser(prog: str = "tileprompt prepare-data") -> argparse.ArgumentParser:
    p = parser_for(prog, __doc__.split("\n", 2)[2])
    p.add_argument("source", choices=SOURCES, help="what INPUT is")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="dataset folder(s) or raster(s)")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset written by prepare-data at --out")
    p.add_argument("--limit", type=int, help="write at most N samples (smoke runs)")
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD,
                   help=f"samples per .tar shard (default: {DEFAULT_SAMPLES_PER_SHARD})")
    p.add_argument("--split-fractions", default="0.7,0.15,0.15",
                   help="train,val,test shares where the source has no split (default: 0.7,0.15,0.15)")
    p.add_argument("--seed", type=int, default=0, help="seed of random and spatial splits (default: 0)")
    p.add_argument("--templates", help="prompt templates file for the dataset (default: the source's; "
                                       "EuroSAT/BigEarthNet: CLIP_benchmark's EuroSAT templates)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    b = p.add_argument_group("bigearthnet")
    b.add_argument("--nomenclature", default="19", choices=["19", "43", "5"],
                   help="BigEarthNet classes: 19 (default; the paper's patching task), 43 (CLC level 3), "
                        "5 (CLC level 1)")
    b.add_argument("--splits-dir", help="folder with train.csv, val.csv, test.csv (one patch name per line; "
                                        "bigearthnet v1, folders)")
    b.add_argument("--exclude", help="file listing patches to leave out (e.g. snowy or cloudy ones)")
    r = p.add_argument_group("rasters")
    r.add_argument("--labels", help="polygons with class labels (GeoPackage, shapefile, GeoJSON ...)")
    r.add_argument("--field", help="the attribute of --labels holding the class")
    r.add_argument("--layer", help="layer of --labels (default: the first)")
    r.add_argument("--classes", help="classes to keep, in label order, separated by ';' (default: every value "
                                     "of --field, sorted)")
    r.add_argument("--tile", type=int, default=64, help="tile size in pixels (default: 64)")
    r.add_argument("--stride", type=int, help="pixels between tiles (default: the tile size)")
    r.add_argument("--min-coverage", type=float, default=0.5,
                   help="share of a tile its majority class must cover to label it (default: 0.5)")
    r.add_argument("--multi-label-threshold", type=float,
                   help="multi-label task: every class covering at least this share of a tile")
    r.add_argument("--keep-unlabelled", action="store_true", help="keep tiles without a label, unlabelled")
    r.add_argument("--block", type=int, default=4,
                   help="spatial split: blocks of N x N tiles go to one split together (default: 4)")
    r.add_argument("--captions", choices=["templated"],
                   help="templated: give each labelled tile captions made from its classes' shares (retrieval "
                        "training data; tiles without a class share of at least 5 %% are left out)")
    r.add_argument("--band-map", help="comma-separated band names of a multiband file, in file order")
    r.add_argument("--level", choices=["L1C", "L2A"], help="processing level when it cannot be detected")
    c = p.add_argument_group("captions")
    c.add_argument("--images", help="folder of the images the caption files name")
    c.add_argument("--name", help="what the captions are (default: the caption files' name before the split, e.g. "
                                  "rsitmd)")
    return p


def _with_hash_split(items: Iterator, fractions, seed: int) -> Iterator:
    """Give samples the source did not split a split from a hash of their key (streaming; nothing held)."""
    for split, sample in items:
        yield (split or hash_split(sample.key, fractions, seed)), sample


def prepare(args: argparse.Namespace) -> dict:
    """Run the command; returns the manifest written."""
    out = Path(args.out).expanduser()
    check_dataset_output(out, args.overwrite, args.inputs + [args.labels, args.splits_dir,
                                                             args.exclude, args.templates])  # before reading
    fractions = parse_fractions(args.split_fractions)
    for name in ("limit", "samples_per_shard", "tile", "block"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.source != "rasters" and (args.labels or args.field or args.captions):
        raise ValueError("--labels, --field and --captions apply to the rasters source")
    if args.source != "captions" and args.images:
        raise ValueError("--images applies to the captions source")
    info = {"source": {"kind": args.source, "inputs": [str(Path(i).expanduser().resolve()) for i in args.inputs]}}

    if args.source == "bigearthnet":
        from .data.bigearthnet import classes_of, iter_bigearthnet

        classes, task, templates = classes_of(args.nomenclature), "multi-label", EUROSAT_TEMPLATES
        info["source"]["nomenclature"] = args.nomenclature

        def gen():
            for root in args.inputs:
                yield from iter_bigearthnet(root, args.nomenclature, args.splits_dir, args.exclude)
        items = _with_hash_split(_limited(gen(), args.limit), fractions, args.seed)
    elif args.source == "folders":
        from .data.folders import EUROSAT_CLASSNAMES, class_folders, class_names, iter_class_folders

        if len(args.inputs) != 1:
            raise ValueError("the folders source takes one dataset folder")
        classes = class_names(class_folders(Path(args.inputs[0])))
        task = "multi-class"
        templates = EUROSAT_TEMPLATES if classes == EUROSAT_CLASSNAMES else ["a satellite photo of {c}."]
        named = _split_file_names(args.splits_dir)
        items = ((named.get(Path(s.meta["file"]).stem) if named else None, s)
                 for s in _limited(iter_class_folders(args.inputs[0]), args.limit))
        if named:  # official split files: files they do not list are left out
            items = ((split, s) for split, s in items if split is not None)
        items = _with_hash_split(items, fractions, args.seed)
    elif args.source == "captions":
        items, classes, task, info["captions"] = _caption_items(args)
        templates = RASTER_TEMPLATES
    else:
        items, classes, task = _raster_items(args, fractions)
        templates = RASTER_TEMPLATES
        if args.captions:
            info["captions"] = {"source": "templated", "templated": True,
                                "how": "label names and their shares of the tile under the polygons, put into "
                                       "fixed sentence patterns (training.data.captions.PATTERNS)"}
            items = _with_templated_captions(items)
    if args.templates:
        from ..engine.prompts import load_templates

        templates = [t.replace("{}", "{c}") for t in load_templates(args.templates)]

    bar = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(unit="sample", desc="prepare-data", file=sys.stderr, dynamic_ncols=True)
    with DatasetWriter(out, classes, templates, task, args.samples_per_shard, args.overwrite, info) as writer:
        for split, sample in items:
            writer.add(split, sample)
            if bar is not None:
                bar.update()
        manifest = writer.close()
    if bar is not None:
        bar.close()
    return manifest


def _limited(it: Iterator, limit: int | None) -> Iterator:
    for n, item in enumerate(it):
        if limit is not None and n >= limit:
            return
        yield item


def _split_file_names(splits_dir: str | None) -> dict[str, str]:
    if not splits_dir:
        return {}
    from .data.bigearthnet import _read_split_files

    return _read_split_files(Path(splits_dir))


def _raster_items(args: argparse.Namespace, fractions) -> tuple[Iterator, list[str], str]:
    from .data.rasters import class_list, iter_raster_tiles, read_polygons

    if bool(args.labels) != bool(args.field):
        raise ValueError("--labels and --field go together (the polygons and the attribute holding the class)")
    if args.captions and not args.labels:
        raise ValueError("--captions templated makes captions from labels: give --labels and --field")
    polygons = read_polygons(args.labels, args.field, args.layer) if args.labels else None
    classes = class_list(polygons, args.classes.split(";") if args.classes else None) if polygons else []
    task = "none" if polygons is None else ("multi-label" if args.multi_label_threshold else "multi-class")
    items = iter_raster_tiles(
        args.inputs, args.tile, polygons=polygons, classes=classes, stride=args.stride,
        min_coverage=args.min_coverage, multi_label_threshold=args.multi_label_threshold,
        keep_unlabelled=args.keep_unlabelled, block=args.block, fractions=fractions, seed=args.seed,
        band_map=args.band_map.split(",") if args.band_map else None, level=args.level, limit=args.limit)
    return items, classes, task


def _caption_items(args: argparse.Namespace) -> tuple[Iterator, list[str], str, dict]:
    from .data.captions import caption_classes, iter_captioned_images, read_caption_files

    if not args.images:
        raise ValueError("the captions source needs --images DIR (the folder of the images the files name)")
    splits = read_caption_files(args.inputs)
    classes = caption_classes(splits)
    name = args.name or Path(args.inputs[0]).stem.split("_")[0].lower()
    info = {"source": name, "templated": False, "files": [Path(f).name for f in args.inputs],
            "per_split": {s: {"images": len(v), "captions": sum(len(c) for c in v.values())}
                          for s, v in splits.items()}}
    items = iter_captioned_images(splits, args.images, classes, name, args.limit)
    return items, classes, "multi-class" if classes else "none", info


def _with_templated_captions(items: Iterator) -> Iterator:
    from .data.captions import templated_captions

    for split, sample in items:
        captions = templated_captions(sample.meta.get("shares", {}))
        if captions:
            sample.meta["captions"] = captions
            yield split, sample


def _summary(manifest: dict) -> None:
    print(f"wrote {manifest['name']}: task {manifest['task']}, {len(manifest['classes'])} classes")
    for split, c in manifest["splits"].items():
        top = ", ".join(f"{k} {v}" for k, v in sorted(c["per_class"].items(), key=lambda kv: -kv[1])[:6] if v)
        print(f"  {split:5s} {c['samples']:7d} samples in {c['shards']} shard(s)"
              + (f"; {c['unlabelled']} unlabelled" if c["unlabelled"] else "") + (f"; {top}" if top else ""))


def main(argv: Sequence[str] | None = None, prog: str = "tileprompt prepare-data") -> int:
    return run_command(build_parser(prog), argv, lambda args: _summary(prepare(args)))


if __name__ == "__main__":
    sys.exit(main(prog="python -m tileprompt_backend.training.prepare"))
