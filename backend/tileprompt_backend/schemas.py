"""The typed requests and answers shared by the HTTP API, the CLI and the job queue (one pydantic module).

The plugin's small client dataclasses are held to the OpenAPI schema FastAPI builds from these.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from . import validation


def _checked(check, **schema) -> Any:
    """A field checked by ``validation.<check>`` (the CLI's and the engine's check too); ``schema`` documents
    its bounds in the OpenAPI document."""
    return AfterValidator(check), Field(json_schema_extra=schema or None)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RasterInput(_Strict):
    raster: str = Field(..., min_length=1, description="GeoTIFF/COG, folder of band files, or SAFE IMG_DATA folder")
    band_map: Annotated[list[str] | None, AfterValidator(validation.band_map)] = Field(
        None, description='band names of a multiband file, in file order; "-" skips a band; names repeat in a '
                          "stack of several dates")
    date: Annotated[int | None, *_checked(validation.date, minimum=1, maximum=validation.MAX_DATES)] = Field(
        None, description="the date to read from a multi-date band map (1 = first)")
    level: Literal["L1C", "L2A"] | None = None
    offset: Annotated[str | float, AfterValidator(validation.offset)] = Field(
        "auto", description='Sentinel-2 processing-baseline offset to subtract: "auto" (from the product\'s metadata '
                            'or name), "none", or a number of DN (0 to 10000)')

    @model_validator(mode="after")
    def _one_date(self):
        validation.select_date(self.band_map, self.date)
        return self

    def selected_band_map(self) -> list[str] | None:
        """The band map of the chosen date (``validation.select_date``)."""
        return validation.select_date(self.band_map, self.date)


class TileParams(_Strict):
    model: str | None = Field(None, description="model id or model directory (default: the server's default)")
    tile_px: Annotated[int | None, *_checked(validation.tile_px, minimum=1, maximum=validation.MAX_TILE_PX)] = \
        Field(None, description="tile size in pixels (default: the card's)")
    stride: Annotated[int | None, *_checked(validation.stride, minimum=1, maximum=validation.MAX_TILE_PX)] = \
        Field(None, description="pixels between tiles (default: the tile size)")
    runner: Literal["auto", "torch", "torch-bf16", "onnx", "onnx-int8", "openvino"] = Field(
        "auto", description="image tower engine (auto: by device, see docs/models.md)")
    batch_size: Annotated[int, *_checked(validation.batch_size, minimum=1, maximum=validation.MAX_BATCH)] = Field(
        32, description="tiles per encoder batch (a cancel acts between batches)")


class ClassifyRequest(RasterInput, TileParams):
    kind: Literal["classify"] = "classify"
    prompts: Annotated[str, *_checked(validation.prompts, maxLength=validation.MAX_PROMPTS_CHARS)] = Field(
        ..., description='classes separated by ";" or new lines, synonyms after "|"')
    templates: str | None = Field(None, description="templates file (default: the card's)")
    aoi: str | None = Field(None, max_length=5_000_000, description="area of interest, WKT or GeoJSON")
    aoi_crs: str | None = Field(None, description="CRS of aoi (default: the raster's)")
    multi_label: bool = False
    threshold: Annotated[float, *_checked(validation.threshold, exclusiveMinimum=0, exclusiveMaximum=1)] = 0.5
    out: str = Field(..., min_length=1, description="output GeoPackage path")
    class_map: str | None = Field(None, description="also write a class-map GeoTIFF here (.tif): one pixel per "
                                                    "tile, class index and score bands, with a QML beside it")
    overwrite: bool = Field(False, description="replace an existing output that TilePrompt did not write")
    layer: Annotated[str | None, AfterValidator(validation.layer)] = Field(
        None, description="add the tiles as this new layer of an existing result GeoPackage TilePrompt wrote, "
                          "instead of replacing the file")
    pixel_space: bool = Field(False, description="classify a raster without georeference in pixel coordinates "
                                                 "(x = column, y = -row, as QGIS draws it)")
    index: str | None = Field(None, description="embedding index to reuse and fill (default: the cache's, "
                                                "per model + tile + stride)")
    cache: bool = Field(True, description="reuse the tile embeddings of an indexed raster and cached prompt "
                                          "embeddings; store a full grid's embeddings for the next run")
    examples: str | None = Field(None, description="few-shot correction: a result GeoPackage with re-classed tiles "
                                                   "('example' or 'class' edited), or polygons with a 'class' field")
    context: bool = Field(False, description="context-aware zero-shot: refine with the layer's own tiles "
                                             "(transductive, single-label; its cost is reported)")

    @model_validator(mode="after")
    def _context_single_label(self):
        validation.context(self.context, self.multi_label)
        return self


class IndexRequest(TileParams):
    kind: Literal["index"] = "index"
    rasters: list[RasterInput] = Field(..., min_length=1, max_length=10_000)
    index: str | None = Field(None, description="index directory (default: the cache, keyed by inputs)")
    pixel_space: bool = Field(False, description="index rasters without georeference in pixel coordinates")


class SearchRequest(_Strict):
    kind: Literal["search"] = "search"
    index: str = Field(..., min_length=1, description="index directory")
    like: list[str] | None = Field(None, description="query geometries, WKT or GeoJSON")
    like_crs: str | None = Field(None, description="CRS of the query geometries (default: the raster's)")
    tile_ids: list[int] | None = Field(None, description="query tiles by id (alternative to geometries)")
    scene: str | None = Field(None, description="scene (raster path) the geometries/tile ids refer to")
    text: Annotated[str | None, *_checked(validation.text, maxLength=validation.MAX_TEXT_CHARS)] = Field(
        None, description="a description to search for")
    fuse: Literal["mean", "max"] = Field("mean", description="mean of query tiles, or each tile queries (max)")
    k: Annotated[int, *_checked(validation.k, minimum=1, maximum=validation.MAX_K)] = 50
    out: str = Field(..., min_length=1, description="output GeoPackage path")
    heatmap: str | None = Field(None, description="optional float GeoTIFF of similarity on the raster grid")
    overwrite: bool = Field(False, description="replace existing outputs that TilePrompt did not write")
    layer: Annotated[str | None, AfterValidator(validation.layer)] = Field(
        None, description="add the hits as this new layer of an existing result GeoPackage TilePrompt wrote, "
                          "instead of replacing the file")
    query_model: str | None = Field(None, description="cross-modal search: the card that embeds the like region of "
                                                      "the scene raster (any raster, e.g. an RGB orthophoto); it must "
                                                      "share the index card's embedding space")
    query_tile: Annotated[int | None, *_checked(validation.tile_px, minimum=1, maximum=validation.MAX_TILE_PX)] = \
        Field(None, description="tile size on the scene raster for query_model (default: the index tiles' ground "
                                "size)")


class ChangeRequest(TileParams):
    kind: Literal["change"] = "change"
    before: RasterInput = Field(..., description="the earlier date")
    after: RasterInput = Field(..., description="the later date; the change layer and heat map are on its grid")
    index: str | None = Field(None, description="index directory (default: the cache, keyed by model + tile + stride)")
    prompts: Annotated[str | None, *_checked(validation.optional_prompts, maxLength=validation.MAX_PROMPTS_CHARS)] = \
        Field(None, description="classes for class_before / class_after")
    became: Annotated[str | None, *_checked(validation.became, maxLength=validation.MAX_BECAME_CHARS)] = Field(
        None, description='rank by the increase of this class, e.g. "flooded field" (added to the prompts when '
                          "missing)")
    templates: str | None = Field(None, description="templates file for the prompts (default: the card's)")
    k: Annotated[int | None, *_checked(validation.optional_k, minimum=1, maximum=validation.MAX_K)] = Field(
        None, description="write only the k highest-ranked tiles (default: every paired tile)")
    out: str = Field(..., min_length=1, description="output GeoPackage path (layer 'change')")
    heatmap: str | None = Field(None, description="optional float GeoTIFF of the change score on the after grid")
    overwrite: bool = Field(False, description="replace existing outputs that TilePrompt did not write")
    layer: Annotated[str | None, AfterValidator(validation.layer)] = Field(
        None, description="add the change layer under this name to an existing result GeoPackage TilePrompt wrote, "
                          "instead of replacing the file")
    pixel_space: bool = Field(False, description="index rasters without georeference in pixel coordinates")


class FetchRequest(_Strict):
    kind: Literal["fetch"] = "fetch"
    model: str = Field(..., min_length=1, description="model id (or model directory) whose weights to download")


JobRequest = Annotated[Union[ClassifyRequest, IndexRequest, SearchRequest, ChangeRequest, FetchRequest],
                       Field(discriminator="kind")]

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobStatus(BaseModel):
    id: str
    kind: Literal["classify", "index", "search", "change", "fetch"]
    state: JobState
    done: int = 0  # tiles processed
    total: int = 0  # tiles to process (0 while unknown)
    rate: float | None = None  # tiles per second
    eta_seconds: float | None = None  # of the tiles, or of the download while stage is "downloading weights"
    # what the job is doing now: "downloading weights", "checking weights", "converting weights", "loading the
    # model" (its model's weights are being fetched), then "processing tiles"; None while queued
    stage: str | None = None
    bytes_done: int = 0  # of the current download stage
    bytes_total: int | None = None  # None while unknown
    created: str
    started: str | None = None
    finished: str | None = None
    result: dict[str, Any] | None = None  # paths written and a summary, when succeeded
    error: str | None = None  # one line, when failed
    cancel_requested: bool = False  # DELETE was called (or the service is stopping); state follows when it stops
    request: dict[str, Any]


class ModelInfo(BaseModel):
    id: str
    title: str
    family: str
    modality: str
    bands: list[str]
    gsd_m: float
    tile_px: int
    image_size: int
    embed_dim: int
    trained: bool
    description: str  # one line: modality, bands, GSD, tile, untrained warning
    summary: str = ""  # one line: what the model is and is good at
    license: str = "unknown"
    license_url: str | None = None
    downloaded: bool = True  # every weight file is on this machine
    weights: str = "downloaded"  # "downloaded", "605 MB to download", "to download (size unknown)"
    download_bytes: int | None = None  # still to download (None when unknown)
    downloadable: bool = False  # POST /v1/models/{id}/fetch can get what is missing
    path: str | None = None  # the card's folder
    space: str | None = None  # embedding space (cards of one space can query each other); None: weights not here yet


class VectorIndexInfo(BaseModel):
    """An index loaded for search in this process, and how its vectors are searched (docs/index.md)."""

    index: str
    tiles: int
    search_method: str
    recall: float | None = Field(None, description="recall@50 against exact search, measured when tuned")
    latency_ms: float | None = Field(None, description="median single-query latency measured when tuned")
    memory_mb: float = Field(description="float16 embeddings plus the search structure, in memory")


class ModelChoiceInfo(BaseModel):
    model: str  # the card chosen for the raster
    reason: str  # why, in one line


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    device: str
    device_name: str = Field("", description="the GPU's name when the device is cuda, else the CPU model")
    default_model: str = Field("", description="the card used when neither a model nor a raster says which")
    torch: str
    onnx_providers: list[str]
    loaded_models: list[str]
    queue_length: int
    running_job: str | None = None
    vector_indexes: list[VectorIndexInfo] = []


class ErrorBody(BaseModel):
    detail: str
    code: str | None = None  # a stable name for errors a client phrases itself (band_map, output_exists ...)
    fixes: dict[str, str] | None = None  # the remedy in each interface's words (cli, http, dock, processing)
