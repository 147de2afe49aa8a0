"""The ``tileprompt`` command: classify rasters, index and search tiles, manage model cards, serve.

Every error is one line on stderr (``tileprompt: error: ...``) and a non-zero exit code; warnings are lines
``tileprompt: warning: ...``. Numbers are checked by argparse with the functions of ``validation`` (the HTTP
schemas use the same ones), and paths and outputs by :func:`precheck`, all before the ML stack is imported,
so a typo is answered in well under a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from . import __version__, validation

#: Runner backends (models.runners.BACKENDS; repeated here so `tileprompt --help` starts without torch).
RUNNERS = ("auto", "torch", "torch-bf16", "onnx", "onnx-int8", "openvino")
EXIT_ERROR = 2
EXIT_CANCELLED = 130
#: Commands with their own parsers (``python -m tileprompt_backend.training.<module>`` under torchrun too).
DELEGATED = {
    "prepare-data": ("tileprompt_backend.training.prepare",
                     "write a training dataset (BigEarthNet, class folders, your rasters + polygons) as shards"),
    "train": ("tileprompt_backend.training.command",
              "train models: patch (PAINT), align (Mind the Modality Gap), harma, rdb (retrieval adapters); "
              "`tileprompt train --help`"),
    "evaluate": ("tileprompt_backend.training.evaluate",
                 "zero-shot mAP/accuracy, RGB<->MS Recall@K and image<->text Recall@K of cards on a shard dataset"),
}


def _checked(check):
    """An argparse ``type`` from a validation function: its ValueError becomes argparse's one-line error."""
    def parse(text: str):
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = check.__name__
    return parse


def _add_output_arguments(p: argparse.ArgumentParser, layer_what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that TilePrompt did not write (inputs are never replaced)")
    p.add_argument("--layer", metavar="NAME", type=_checked(validation.layer),
                   help=f"add the {layer_what} as layer NAME of an existing result GeoPackage TilePrompt wrote, "
                        "instead of replacing the file")


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (``tileprompt: error: ...``, exit 2) instead of a usage block."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"tileprompt: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tileprompt", description="Classify and search raster tiles with text prompts.")
    p.add_argument("--version", action="version", version=f"tileprompt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("classify", help="classify every tile of a raster against class prompts",
                       description="Classify every tile of RASTER against class prompts; write a GeoPackage.")
    c.add_argument("raster", help="GeoTIFF/COG, a folder of per-band files, or a SAFE IMG_DATA folder")
    c.add_argument("--prompts", required=True,
                   help='classes separated by ";", synonyms after "|": "forest | woodland; water; farmland"')
    c.add_argument("--templates", help="templates file, one per line with {} for the class (default: the card's)")
    _add_encoder_arguments(c, band_map_help="comma-separated band names of a multiband file, in file order")
    c.add_argument("--aoi", help="area of interest as WKT or GeoJSON (text or a file path)")
    c.add_argument("--aoi-crs", default=None, help="CRS of --aoi, e.g. EPSG:4326 (default: the raster's CRS)")
    c.add_argument("--multi-label", action="store_true", help="one sigmoid per class instead of a softmax")
    c.add_argument("--threshold", type=_checked(validation.threshold), default=0.5,
                   help="multi-label threshold (default: 0.5)")
    c.add_argument("--out", required=True, help="output GeoPackage (.gpkg)")
    _add_output_arguments(c, "tiles")
    c.add_argument("--class-map", metavar="TIF", help="also write a class-map GeoTIFF: one pixel per tile, class "
                                                      "index and score bands, colours as the GeoPackage's (QML)")
    c.add_argument("--index", help="embedding index to reuse and fill (default: the cache's, per model + tile)")
    c.add_argument("--no-cache", action="store_true", help="neither reuse nor store tile and prompt embeddings")
    c.add_argument("--examples", metavar="FILE",
                   help="few-shot correction: a result GeoPackage whose tiles you re-classed ('example' or 'class' "
                        "edited), or polygons with a 'class' field (see docs/corrections.md)")
    c.add_argument("--context", action="store_true",
                   help="context-aware zero-shot: refine each tile with the layer's similar neighbours and the "
                        "layer's class structure (transductive; single-label; costs extra time, reported)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_classify)

    i = sub.add_parser("index", help="embed every tile of rasters once, into an index for search and reuse",
                       description="Embed every tile of RASTER... into an index folder (see docs/index.md); "
                                   "scenes already there are reused. Under torchrun, ranks share the scenes.")
    _add_index_arguments(i)
    i.set_defaults(func=cmd_index)

    q = sub.add_parser("search", help="find tiles like a geometry, like tiles, or like a description",
                       description="Rank the tiles of INDEX by cosine similarity to a query; write the top k "
                                   "as layer 'similar' of a GeoPackage (and optionally a heat map).")
    q.add_argument("index", metavar="INDEX", help="index folder (printed by `tileprompt index`)")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--like", action="append", metavar="WKT",
                      help="query geometry as WKT or GeoJSON (text or a file path); repeat for several")
    what.add_argument("--tile-ids", metavar="ID,ID", help="query tiles by id, comma-separated")
    what.add_argument("--text", help='a description, e.g. "river with sand banks" (synonyms after "|")')
    q.add_argument("--like-crs", help="CRS of --like, e.g. EPSG:4326 (default: the scene's CRS)")
    q.add_argument("--scene", metavar="RASTER",
                   help="the scene --like/--tile-ids refer to and the heat map covers (needed when the index "
                        "holds several)")
    q.add_argument("--query-model", metavar="CARD",
                   help="cross-modal search: embed the --like region of --scene (any raster, e.g. an RGB "
                        "orthophoto) with this card, which must share the index card's embedding space")
    q.add_argument("--query-tile", type=_checked(validation.tile_px), metavar="PX",
                   help="tile size on --scene for --query-model (default: the index tiles' ground size)")
    q.add_argument("-k", type=_checked(validation.k), default=50, help="number of results (default: 50)")
    q.add_argument("--fuse", choices=["mean", "max"], default="mean",
                   help="mean: one query from the mean of the query tiles; max: each tile queries, best kept")
    q.add_argument("--out", required=True, help="output GeoPackage (.gpkg)")
    q.add_argument("--heatmap", help="also write a float32 GeoTIFF of similarity on the scene's grid")
    _add_output_arguments(q, "hits")
    q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    q.add_argument("--quiet", action="store_true", help="print nothing but errors and warnings")
    q.set_defaults(func=cmd_search)

    d = sub.add_parser("change", help="what changed between two dates: tiles ranked by embedding change",
                       description="Index BEFORE and AFTER (two dates of the same place; grids may differ in CRS or "
                                   "offset), pair their tiles by footprint and rank them by 1 - cosine, or by the "
                                   "increase of a class ('--became flooded'). Writes layer 'change' (see "
                                   "docs/change.md) and optionally a heat map.")
    d.add_argument("before", metavar="BEFORE", help="the earlier raster (GeoTIFF/COG, band-file folder, IMG_DATA)")
    d.add_argument("after", metavar="AFTER", help="the later raster; the change layer is on its grid")
    _add_encoder_arguments(d, band_map_help="comma-separated band names of both multiband files, in file order")
    d.add_argument("--index", help="index folder (default: the cache's index for model + tile + stride)")
    d.add_argument("--prompts", help='classes for class_before/class_after, e.g. "water; forest; farmland"')
    d.add_argument("--became", metavar="CLASS",
                   help='rank by the increase of this class\'s probability, e.g. "flooded field" (added to the '
                        "prompts when missing)")
    d.add_argument("--templates", help="templates file for the prompts (default: the card's)")
    d.add_argument("-k", type=_checked(validation.k),
                   help="write only the k highest-ranked tiles (default: every paired tile)")
    d.add_argument("--out", required=True, help="output GeoPackage (.gpkg)")
    d.add_argument("--heatmap", help="also write a float32 GeoTIFF of the score on the after scene's grid")
    _add_output_arguments(d, "change layer")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_change)

    m = sub.add_parser("models", help="list, fetch, import and export model cards")
    msub = m.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ml = msub.add_parser("list", help="list the model cards found, with licence and download state")
    ml.add_argument("pattern", nargs="?", default="*")
    ml.add_argument("--json", action="store_true", help="print the cards as JSON")
    ml.set_defaults(func=cmd_models_list)
    mt = msub.add_parser("tiny", help="write an untrained tiny model card (tests, demos)")
    mt.add_argument("family", choices=["clip", "aligned-s2"])
    mt.add_argument("--out", required=True, help="directory to write the card into")
    mt.set_defaults(func=cmd_models_tiny)
    mf = msub.add_parser("fetch", help="download the real weights of a model (needs internet)",
                         description="Download a model's weights (Hugging Face files into its cache; other URLs "
                                     "resume an interrupted download), check them and convert them to safetensors. "
                                     "HF_HUB_OFFLINE=1: caches only; HF_ENDPOINT: a mirror; HF_TOKEN: gated files; "
                                     "https_proxy/no_proxy: a proxy.")
    mf.add_argument("name", help="model id or model directory")
    mf.add_argument("--quiet", action="store_true", help="no progress bar")
    mf.set_defaults(func=cmd_models_fetch)
    me = msub.add_parser("export", help="copy a downloaded model (card and all its weights) to a folder",
                         description="Write ID with every weight file it needs to DIR/ID, with a listing of sha256 "
                                     "digests, for `tileprompt models import DIR/ID` on a machine without internet.")
    me.add_argument("name", metavar="ID", help="model id or model directory")
    me.add_argument("out", metavar="DIR", help="existing folder to write ID/ into")
    me.set_defaults(func=cmd_models_export)
    mi = msub.add_parser("import", help="add a model from an export folder, or from a local checkpoint file",
                         description="SOURCE is a folder written by `tileprompt models export`, or the name of a "
                                     "checkpoint importer followed by a local FILE in that publisher's layout "
                                     "(every downloadable bundled card is one: `models import remoteclip-vit-b32 "
                                     "RemoteCLIP-ViT-B-32.pt`). `--list` shows the importers.")
    mi.add_argument("source", metavar="SOURCE", nargs="?", help="export folder, or importer name")
    mi.add_argument("file", metavar="FILE", nargs="?", help="checkpoint file (with an importer name)")
    mi.add_argument("--replace", action="store_true", help="replace a model of the same id in the models folder")
    mi.add_argument("--list", action="store_true", help="list the checkpoint importers")
    mi.set_defaults(func=cmd_models_import)

    # Training commands parse their own options (tileprompt_backend.training.command); listed here for --help.
    for name, (_, text) in DELEGATED.items():
        d = sub.add_parser(name, help=text, add_help=False)
        d.add_argument("args", nargs=argparse.REMAINDER)

    s = sub.add_parser("serve", help="run the local HTTP service the QGIS plugin talks to",
                       description="Serve the /v1 API on the loopback interface with a fresh bearer token; the "
                                   "state file tells clients the port and token. See docs/service.md.")
    s.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default: 127.0.0.1; "
                                                       "other interfaces are refused)")
    s.add_argument("--port", type=int, default=0,
                   help="TCP port (default: 0 = a free one, written to the state file)")
    s.add_argument("--state-file", help="where to write host, port, token and pid (mode 0600; default: "
                                        "<TILEPROMPT_HOME>/server.json)")
    s.add_argument("--log-file", help="rotating log file (default: <TILEPROMPT_HOME>/logs/server.log)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.set_defaults(func=cmd_serve)
    return p


def _add_encoder_arguments(p: argparse.ArgumentParser, band_map_help: str) -> None:
    """Model, tile grid, band reading and runner options: the same for classify and index."""
    p.add_argument("--model", help="model id or model directory (default: the best card for the raster: the "
                                   "multispectral one for a Sentinel-2 product that has its bands, else RGB)")
    p.add_argument("--tile", type=_checked(validation.tile_px), help="tile size in pixels (default: the model card's)")
    p.add_argument("--stride", type=_checked(validation.stride),
                   help="distance between tiles in pixels (default: the tile size)")
    p.add_argument("--band-map", type=_checked(validation.band_map),
                   help=band_map_help + '; "-" skips a band; names repeat in a stack of several dates '
                                        "(B04,B03,B02,B08,B04,B03,B02,B08 is two dates)")
    p.add_argument("--date", type=_checked(validation.date), metavar="N",
                   help="the date to read from a multi-date band map (1 = first)")
    p.add_argument("--level", choices=["L1C", "L2A"], help="processing level when it cannot be detected")
    p.add_argument("--offset", default="auto", type=_checked(validation.offset), metavar="auto|none|N",
                   help="Sentinel-2 processing-baseline offset to subtract (baseline 04.00+, 2022 on): auto = from "
                        "the product's metadata XML or _Nxxxx_ name (default), none, or N DN for every band")
    p.add_argument("--pixel-space", action="store_true",
                   help="accept a raster without georeference: tiles in pixel coordinates (x = column, y = -row, "
                        "as QGIS draws it), without a CRS")
    p.add_argument("--batch-size", type=_checked(validation.batch_size), default=32)
    p.add_argument("--runner", default="auto", choices=list(RUNNERS))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _add_index_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tileprompt index`` (also ``python -m tileprompt_backend.index.build`` under torchrun)."""
    p.add_argument("rasters", nargs="*", metavar="RASTER",
                   help="GeoTIFF/COG, folder of per-band files or SAFE IMG_DATA folder (any number)")
    p.add_argument("--scene-list", help="a text file with one raster per line (for archives; added to RASTER...)")
    _add_encoder_arguments(p, band_map_help="comma-separated band names of multiband files, in file order (all rasters)")
    p.add_argument("--index", help="index folder (default: the cache's index for model + tile + stride)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _read_aoi(value: str | None) -> str | None:
    """--aoi takes WKT/GeoJSON text or the path of a file holding it."""
    if value and len(value) < 4096 and not value.lstrip().startswith(("{", "POLYGON", "MULTIPOLYGON")):
        path = Path(value).expanduser()
        if path.is_file():
            return path.read_text()
    return value


def precheck(args: argparse.Namespace) -> None:
    """Check the paths and outputs of a command before it imports the ML stack (the engine checks again)."""
    from .outputs import guard_gpkg_and_heatmap, guard_output
    from .paths import templates_path

    command = args.command
    if getattr(args, "date", None) is not None or getattr(args, "band_map", None) is not None:
        validation.select_date(args.band_map, args.date)
    if command == "classify":
        validation.context(args.context, args.multi_label)
        raster = validation.existing_path(args.raster, "raster")
        inputs = [raster, templates_path(args.templates) if args.templates else None,
                  validation.examples(args.examples)]
        guard_output(args.out, inputs, args.overwrite, layer=args.layer, input_dirs=[args.index])
    elif command == "index":
        for raster in args.rasters:
            validation.existing_path(raster, "raster")
        if args.scene_list:
            validation.existing_path(args.scene_list, "scene list")
    elif command == "search":
        index = validation.existing_path(args.index, "index")
        from .index.store import IndexStore, guard_search_outputs  # numpy and SQLite, not the ML stack

        query_raster = validation.existing_path(args.scene, "raster") if args.query_model and args.scene else None
        guard_search_outputs(IndexStore.open(index), args.out, args.heatmap, args.overwrite, args.layer,
                             query_raster=query_raster)
    elif command == "change":
        rasters = [validation.existing_path(r, "raster") for r in (args.before, args.after)]
        inputs = [*rasters, templates_path(args.templates) if args.templates else None]
        guard_gpkg_and_heatmap(args.out, args.heatmap, inputs, args.overwrite, args.layer, input_dirs=[args.index])


def _warn(warnings: Sequence[str]) -> None:
    for text in warnings:
        print(f"tileprompt: warning: {text}", file=sys.stderr)


def cmd_classify(args: argparse.Namespace) -> int:
    precheck(args)
    from .bars import StageBars, tile_bar
    from .engine import classify
    from .models import download_hooks

    progress, close = tile_bar("classify", args.quiet)
    bars = StageBars(args.quiet)
    try:
        with download_hooks(progress=bars):  # a model not downloaded yet: bars for its download first
            result = classify(
                args.raster, args.prompts, args.out, model=args.model, templates=args.templates, tile_px=args.tile,
                stride=args.stride, aoi=_read_aoi(args.aoi), aoi_crs=args.aoi_crs, multi_label=args.multi_label,
                threshold=args.threshold, band_map=args.band_map, level=args.level, offset=args.offset,
                batch_size=args.batch_size, runner=args.runner, device=args.device, progress=progress,
                index=args.index, cache=not args.no_cache, date=args.date, overwrite=args.overwrite,
                layer=args.layer, pixel_space=args.pixel_space, class_map=args.class_map,
                examples=args.examples, context=args.context)
    finally:
        bars.close()
        close()
    _warn(result.warnings)
    skipped = []
    if result.skipped_outside:
        skipped.append(f"{result.skipped_outside} outside the area")
    if result.skipped_nodata:
        skipped.append(f"{result.skipped_nodata} nodata")
    if result.model_reason:
        print(f"model {result.model_reason}")
    print(f"{result.tiles} tiles classified in {result.seconds:.1f} s ({result.tiles_per_second:.1f} tiles/s, "
          f"runner {result.runner})" + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    width = max(len(name) for name in result.counts)
    for name, n in sorted(result.counts.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<{width}}  {n:6d}  {100.0 * n / max(result.tiles, 1):5.1f} %")
    if result.correction:
        c = result.correction
        per_class = ", ".join(f"{name} {n}" for name, n in c["per_class"].items())
        new = f"; new classes: {', '.join(c['new_classes'])}" if c["new_classes"] else ""
        print(f"corrected with {c['examples']} examples ({per_class}){new}; {c['method']} fitted in "
              f"{c['seconds']:.3f} s")
    if result.transductive:
        t = result.transductive
        print(f"context-aware: {t['changed']} tiles changed class, {t['seconds']:.3f} s")
    print(f"wrote {result.out}" + (f" and {result.class_map}" if result.class_map else ""))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    precheck(args)
    from .index.build import run

    return run(args)


def _tile_ids(value: str) -> list[int]:
    try:
        ids = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"--tile-ids takes integers separated by commas, got {value!r}") from None
    if not ids:
        raise ValueError("--tile-ids is empty")
    return ids


def cmd_search(args: argparse.Namespace) -> int:
    tile_ids = _tile_ids(args.tile_ids) if args.tile_ids else None
    if args.text is not None:
        validation.text(args.text)
    precheck(args)
    from .index import search

    result = search(args.index, like=[_read_aoi(v) for v in args.like] if args.like else None,
                    like_crs=args.like_crs, tile_ids=tile_ids, scene=args.scene, text=args.text, fuse=args.fuse,
                    k=args.k, out=args.out, heatmap=args.heatmap, device=args.device, overwrite=args.overwrite,
                    layer=args.layer, query_model=args.query_model, query_tile=args.query_tile)
    _warn(result.warnings)
    if args.quiet:
        return 0
    query = f"{len(result.query_tiles)} query tile(s)" if result.query_tiles else "the text"
    print(f"{result.hits} similar tiles to {query} in {result.seconds:.2f} s ({result.search_method})")
    print(f"wrote {result.out}" + (f" and {result.heatmap}" if result.heatmap else ""))
    return 0


def cmd_change(args: argparse.Namespace) -> int:
    precheck(args)
    from .bars import StageBars, tile_bar
    from .index import change_search
    from .models import download_hooks

    rasters = [{"raster": r, "band_map": args.band_map, "date": args.date, "level": args.level, "offset": args.offset}
               for r in (args.before, args.after)]
    progress, close = tile_bar("index", args.quiet)
    bars = StageBars(args.quiet)
    try:
        with download_hooks(progress=bars):  # a model not downloaded yet: bars for its download first
            result = change_search(rasters[0], rasters[1], out=args.out, heatmap=args.heatmap, model=args.model,
                                   tile_px=args.tile, stride=args.stride, index=args.index, prompts=args.prompts,
                                   became=args.became, templates=args.templates, k=args.k, device=args.device,
                                   runner=args.runner, batch_size=args.batch_size, progress=progress,
                                   overwrite=args.overwrite, layer=args.layer, pixel_space=args.pixel_space)
    finally:
        bars.close()
        close()
    if result.model_reason:
        print(f"model {result.model_reason}")
    by = f"became {result.became}" if result.became else "embedding change (1 - cosine)"
    unpaired = f"; {result.unpaired} tiles without the other date under them" if result.unpaired else ""
    print(f"{result.pairs} tiles ranked by {by} in {result.seconds:.1f} s ({result.computed} tiles encoded){unpaired}")
    print(f"wrote {result.out}" + (f" and {result.heatmap}" if result.heatmap else ""))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from .models import list_models
    from .models.downloads import weights_state

    cards = list_models(args.pattern)
    if args.json:
        print(json.dumps([dict(c.to_json(), path=str(c.path), weights=weights_state(c).describe())
                          for c in cards], indent=2))
        return 0
    if not cards:
        print(f"no model cards match {args.pattern!r}")
        return 0
    rows = [(c.id, c.family, _input_text(c), weights_state(c).describe(), "trained" if c.trained else "UNTRAINED",
             c.license.split(" (")[0]) for c in cards]
    head = ("ID", "FAMILY", "INPUT", "WEIGHTS", "TRAINED", "LICENCE")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head) - 1)]
    for row, card in zip([head] + rows, [None] + cards):
        print("  ".join(f"{v:<{w}}" for v, w in zip(row, widths)) + "  " + row[-1])
        if card is not None:
            print(f"    {card.description or card.title}")
    return 0


def _input_text(card) -> str:
    inp = card.input
    if inp.modality == "rgb":
        return "RGB"
    bands = inp.bands
    return f"S2 {inp.level} {len(bands)} bands ({bands[0]}..{bands[-1]})"


def cmd_models_tiny(args: argparse.Namespace) -> int:
    from .models import write_tiny

    card = write_tiny(args.family, Path(args.out))
    print(f"wrote untrained tiny {args.family} card {card.id!r} to {card.path}")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from .bars import StageBars
    from .models import download_hooks, fetch, resolve_card
    from .models.downloads import weights_state

    card = resolve_card(args.name)
    state = weights_state(card)
    url = card.provenance.get("license_url")
    print(f"{card.id}: {card.title}\n  licence: {card.license}" + (f" - {url}" if url else "") +
          f"\n  weights: {state.describe()}", file=sys.stderr)
    bars = StageBars(args.quiet)
    try:
        with download_hooks(progress=bars):
            card = fetch(card.path)
    except KeyboardInterrupt:
        bars.close()  # before the message, so it is not drawn over
        print("tileprompt: download interrupted; run the same command to continue where it stopped",
              file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        bars.close()
    print(f"fetched {card.id!r} into {card.path}")
    return 0


def cmd_models_export(args: argparse.Namespace) -> int:
    from .models import export_model

    with _checking_bar():
        out = export_model(args.name, Path(args.out))
    print(f"exported to {out} (import it with `tileprompt models import {out}`)")
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    from .models import import_checkpoint, import_model, list_importers

    if args.list:
        for importer in list_importers():
            print(f"{importer.name:24s} {importer.description}")
        return 0
    if not args.source:
        raise ValueError("give an export folder, or an importer name and a checkpoint FILE (--list shows them)")
    with _checking_bar():
        if args.file is not None:
            card = import_checkpoint(args.source, Path(args.file), replace=args.replace)
        elif Path(args.source).expanduser().is_dir():
            card = import_model(Path(args.source), replace=args.replace)
        else:
            raise ValueError(f"{args.source!r} is not a folder; to import a checkpoint file give an importer name "
                             "and the FILE (`tileprompt models import --list`)")
    print(f"imported {card.id!r} into {card.path}")
    return 0


def _checking_bar():
    """Progress bars for the long steps of export/import (hashing, converting)."""
    from .bars import StageBars
    from .models import download_hooks

    return download_hooks(progress=StageBars())


def cmd_serve(args: argparse.Namespace) -> int:
    from .server.main import serve

    return serve(host=args.host, port=args.port, state_file=args.state_file, log_file=args.log_file,
                 device=args.device)


def _attach_band_maps(argv: Sequence[str]) -> list[str]:
    """``--band-map -,-,B04`` as ``--band-map=-,-,B04``: argparse would take a value starting with the skip token
    ``-`` for an option."""
    out, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--band-map" and rest and rest[0].startswith(validation.SKIP):
            arg = f"--band-map={rest.pop(0)}"
        out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import Cancelled  # an InputError's str() is its CLI wording

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:  # training commands parse their own options
        import importlib

        module = importlib.import_module(DELEGATED[argv[0]][0])
        if argv[0] == "train":
            return module.train_main(argv[1:])
        return module.main(argv[1:], prog=f"tileprompt {argv[0]}")
    try:
        args = build_parser().parse_args(_attach_band_maps(argv))
    except SystemExit as e:  # --help, --version, or a bad argument (already printed)
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError) as e:
        print(f"tileprompt: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (KeyboardInterrupt, Cancelled):
        print("tileprompt: cancelled; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    except OSError as e:
        print(f"tileprompt: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
