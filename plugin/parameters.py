"""What the dock hands to the plugin: one typed, frozen object per run, made of ids, paths and strings only.

No QGIS object crosses this boundary (a layer is named by its id), so the dock is tested by setting widgets and
comparing the object it emits, and the plugin builds the backend's JSON request from it (``*_request``). The
request fields are those of ``backend/tileprompt_backend/schemas.py`` (ClassifyRequest, IndexRequest,
SearchRequest, ChangeRequest); a test holds the two together.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum


class AreaMode(str, Enum):
    WHOLE_LAYER = "layer"
    MAP_EXTENT = "extent"
    DRAWN = "drawn"
    SELECTED = "selected"


class InputKind(str, Enum):
    FILE = "file"  # a file the backend opens by path (GeoTIFF, JP2, VRT ...)
    PRODUCT_FOLDER = "folder"  # a folder of per-band files (SAFE IMG_DATA, BigEarthNet patch ...)
    EXPORT = "export"  # not readable by path (WMS/XYZ, memory, virtual): exported to a GeoTIFF before the job


class Fuse(str, Enum):
    MEAN = "mean"  # the mean embedding of the query tiles is the query
    MAX = "max"  # every query tile queries; a tile's similarity is its best match


@dataclass(frozen=True)
class Extent:
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    crs: str  # authid or WKT

    def to_wkt(self) -> str:
        x0, y0, x1, y1 = self.xmin, self.ymin, self.xmax, self.ymax
        return f"POLYGON (({x0!r} {y0!r}, {x1!r} {y0!r}, {x1!r} {y1!r}, {x0!r} {y1!r}, {x0!r} {y0!r}))"


#: What the offset option takes (backend: validation.offset, the same rule and limit; a test holds them together).
OFFSET_MODES = ("auto", "none")
MAX_OFFSET_DN = 10000.0


def parse_offset(text) -> str | float:
    """The Sentinel-2 baseline-offset option: "auto" (empty too), "none" or a number of DN in 0..10000."""
    value = str(text if text is not None else "").strip().lower() or "auto"
    if value in OFFSET_MODES:
        return value
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"offset must be 'auto', 'none' or a number of DN (e.g. 1000), got {text!r}") from None
    if not 0 <= number <= MAX_OFFSET_DN:
        raise ValueError(f"offset must be 'auto', 'none' or a number of DN between 0 and {MAX_OFFSET_DN:g}, "
                         f"got {text!r}")
    return number


@dataclass(frozen=True)
class RasterInput:
    """The layer a job reads, and how the backend gets at its pixels."""

    layer_id: str
    layer_name: str
    kind: InputKind
    path: str = ""  # file or folder; "" for EXPORT until exported
    band_map: tuple[str, ...] | None = None  # band names in file order (multiband files only); "-" skips a band
    level: str | None = None  # "L1C" / "L2A" when the user says so; None = detected by the backend
    export_extent: Extent | None = None  # EXPORT only: the part of the layer to export
    date: int | None = None  # which date of a multi-date band map (names repeated per date) to read
    offset: str | float = "auto"  # Sentinel-2 baseline offset: "auto" (from the product), "none" or DN

    def with_path(self, path: str, band_map: tuple[str, ...] | None = None) -> RasterInput:
        """The same input, now readable by path (after an export)."""
        return RasterInput(self.layer_id, self.layer_name, InputKind.FILE, path,
                           band_map if band_map is not None else self.band_map, self.level, None, self.date,
                           self.offset)

    def request_fields(self) -> dict:
        if self.kind is InputKind.EXPORT:
            raise ValueError(f"layer {self.layer_name!r} must be exported before a job can read it")
        fields = {"raster": self.path}
        if self.band_map and self.kind is InputKind.FILE:
            fields["band_map"] = list(self.band_map)
            if self.date:
                fields["date"] = self.date
        if self.level:
            fields["level"] = self.level
        if self.offset != "auto":
            fields["offset"] = self.offset
        return fields


@dataclass(frozen=True)
class Area:
    mode: AreaMode = AreaMode.WHOLE_LAYER
    wkt: str | None = None  # None for the whole layer
    crs: str | None = None  # CRS of wkt (authid or WKT)


def _tile_fields(model: str | None, tile_px: int | None, overlap_px: int, model_tile_px: int | None) -> dict:
    fields: dict = {}
    if model:
        fields["model"] = model
    tile = tile_px or model_tile_px
    if tile_px:
        fields["tile_px"] = tile_px
    if overlap_px:
        if not tile:
            raise ValueError("an overlap needs a tile size: choose one, or a model whose card gives one")
        if overlap_px >= tile:
            raise ValueError(f"overlap ({overlap_px} px) must be smaller than the tile ({tile} px)")
        fields["tile_px"] = tile
        fields["stride"] = tile - overlap_px
    return fields


@dataclass(frozen=True)
class ClassifyParameters:
    raster: RasterInput
    prompts: str  # one class per line, synonyms after "|", no comments (prompts.prompts_to_request)
    model: str | None = None  # None = the best model for the layer, as the backend chooses it
    prompt_set: str = ""  # the saved set the prompts came from, if any ("bundled:land-cover")
    templates: str | None = None  # templates file; None = the model card's
    area: Area = field(default_factory=Area)
    tile_px: int | None = None  # None = the model card's
    overlap_px: int = 0
    multi_label: bool = False
    threshold: float = 0.5
    output: str | None = None  # GeoPackage path; None = a new file in the plugin's cache
    centre_cells: bool = True  # with an overlap, draw each tile's centre cell (display only)
    class_map: bool = False  # also write the class-map GeoTIFF beside the GeoPackage
    overwrite: bool = False  # the user agreed to replace an output TilePrompt did not write
    pixel_space: bool = False  # the user agreed to classify a raster without georeference in pixel coordinates
    context: bool = False  # context-aware zero-shot (transductive refinement, single-label)
    examples: str | None = None  # few-shot correction: a result GeoPackage with re-classed tiles, or class polygons

    def classify_request(self, out: str, model_tile_px: int | None = None, class_map: str | None = None) -> dict:
        request = {"kind": "classify", **self.raster.request_fields(), "prompts": self.prompts, "out": out}
        if class_map:
            request["class_map"] = class_map
        if self.overwrite:
            request["overwrite"] = True
        if self.pixel_space:
            request["pixel_space"] = True
        request.update(_tile_fields(self.model, self.tile_px, self.overlap_px, model_tile_px))
        if self.templates:
            request["templates"] = self.templates
        if self.area.wkt:
            request["aoi"] = self.area.wkt
            if self.area.crs:
                request["aoi_crs"] = self.area.crs
        if self.multi_label:
            request["multi_label"] = True
            request["threshold"] = self.threshold
        if self.context:
            request["context"] = True
        if self.examples:
            request["examples"] = self.examples
        return request

    def to_state(self) -> dict:
        """What the project remembers of this run (dock state), JSON-able."""
        return json.loads(json.dumps(asdict(self), default=lambda v: v.value if isinstance(v, Enum) else str(v)))


@dataclass(frozen=True)
class Query:
    """Geometries (WKT in ``crs``) to find tiles like, or a text to find tiles matching it."""

    wkts: tuple[str, ...] = ()
    crs: str | None = None
    text: str | None = None

    @property
    def is_text(self) -> bool:
        return bool(self.text)


@dataclass(frozen=True)
class CrossModal:
    """Query tiles taken from another raster and embedded by another model of the searched model's embedding space
    (an RGB orthophoto region -> the Sentinel-2 tiles like it, and back)."""

    raster: RasterInput
    model: str


@dataclass(frozen=True)
class SearchParameters:
    raster: RasterInput
    query: Query
    model: str | None = None
    tile_px: int | None = None
    overlap_px: int = 0
    k: int = 20
    fuse: Fuse = Fuse.MEAN
    heatmap: bool = True
    overwrite: bool = False  # replace outputs TilePrompt did not write (Processing's OVERWRITE)
    cross: CrossModal | None = None  # geometry queries only

    def index_request(self, index_dir: str | None = None, model_tile_px: int | None = None) -> dict:
        """Index the raster (None: into the backend's cache, keyed by model, tile and stride - the same index a
        classification of this raster fills, so embeddings are computed once)."""
        request = {"kind": "index", "rasters": [self.raster.request_fields()]}
        if index_dir:
            request["index"] = index_dir
        request.update(_tile_fields(self.model, self.tile_px, self.overlap_px, model_tile_px))
        return request

    def search_request(self, index_dir: str, out: str, heatmap: str | None = None) -> dict:
        request = {"kind": "search", "index": index_dir, "k": int(self.k), "out": out,
                   "scene": self.raster.path}
        if self.query.is_text:
            request["text"] = self.query.text
        else:
            if not self.query.wkts:
                raise ValueError("draw a rectangle or polygon, or select features, to search tiles like it")
            request["like"] = list(self.query.wkts)
            if self.query.crs:
                request["like_crs"] = self.query.crs
            request["fuse"] = self.fuse.value
            if self.cross is not None:  # the geometries lie on the query raster, embedded by its model
                request["scene"] = self.cross.raster.path
                request["query_model"] = self.cross.model
        if heatmap:
            request["heatmap"] = heatmap
        if self.overwrite:
            request["overwrite"] = True
        return request


@dataclass(frozen=True)
class ChangeParameters:
    """What changed between two dates: both layers are indexed with one model and grid, then compared."""

    before: RasterInput
    after: RasterInput
    model: str | None = None
    tile_px: int | None = None
    overlap_px: int = 0
    prompts: str | None = None  # classes for class_before / class_after (one per line, synonyms after |)
    became: str | None = None  # rank by the increase of this class ("flooded")
    heatmap: bool = True
    overwrite: bool = False  # replace outputs TilePrompt did not write (Processing's OVERWRITE)

    def change_request(self, out: str, heatmap: str | None = None, model_tile_px: int | None = None) -> dict:
        request = {"kind": "change", "before": self.before.request_fields(), "after": self.after.request_fields(),
                   "out": out}
        request.update(_tile_fields(self.model, self.tile_px, self.overlap_px, model_tile_px))
        if self.prompts:
            request["prompts"] = self.prompts
        if self.became:
            request["became"] = self.became
        if heatmap:
            request["heatmap"] = heatmap
        if self.overwrite:
            request["overwrite"] = True
        return request


@dataclass(frozen=True)
class CorrectParameters:
    """Re-classify a TilePrompt result with the tiles whose class the analyst set (its ``example`` field)."""

    layer_id: str
    layer_name: str
    result: str  # the result GeoPackage: its run says raster, model, prompts and grid; its tiles are the examples
    context: bool = False


def correction_request(run: dict, examples: str, out: str, context: bool = False) -> dict:
    """The classify request that redoes ``run`` (a result's ``tileprompt_runs`` row) with ``examples``.

    Classes the run only knew from earlier examples (no phrases) are not prompts: the stored examples in the
    result bring them back."""
    raster = run.get("raster")
    prompts = [c for c in run.get("prompts") or [] if isinstance(c, dict) and c.get("phrases")]
    if not raster or not prompts or not run.get("tile_px"):
        raise ValueError("this layer is not a TilePrompt classification (its run table names no raster, prompts "
                         "or tile size)")
    request = {"kind": "classify", "raster": raster, "prompts": "\n".join(" | ".join(c["phrases"]) for c in prompts),
               "out": out, "examples": examples, "tile_px": int(run["tile_px"])}
    if run.get("stride") and int(run["stride"]) != int(run["tile_px"]):
        request["stride"] = int(run["stride"])
    for key in ("band_map", "level", "model", "aoi", "aoi_crs", "pixel_space"):
        if run.get(key):
            request[key] = run[key]
    offset = run.get("offset")  # what the run asked for ("auto" again finds what it found)
    if isinstance(offset, dict) and offset.get("mode") not in (None, "auto"):
        request["offset"] = parse_offset(offset["mode"])
    source = str(run.get("templates_source") or "")
    if source.startswith("/"):  # a templates file the user chose (the card's own are relative to resources)
        request["templates"] = source
    if run.get("mode") == "multi-label":
        request["multi_label"] = True
        request["threshold"] = float(run.get("threshold") or 0.5)
    elif context:
        request["context"] = True
    return request
