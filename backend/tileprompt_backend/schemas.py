"""The typed requests and answers shared by the HTTP API, the CLI and the job queue (one pydantic module).

The plugin's small client dataclasses are held to the OpenAPI schema FastAPI builds from these.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

#: Largest k a search may ask for; larger asks are a 422, not a server that allocates without bound.
MAX_K = 10_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RasterInput(_Strict):
    raster: str = Field(..., min_length=1, description="GeoTIFF/COG, folder of band files, or SAFE IMG_DATA folder")
    band_map: list[str] | None = Field(None, description="band names of a multiband file, in file order")
    level: Literal["L1C", "L2A"] | None = None


class TileParams(_Strict):
    model: str | None = Field(None, description="model id or model directory (default: the server's default)")
    tile_px: int | None = Field(None, ge=1, le=4096, description="tile size in pixels (default: the card's)")
    stride: int | None = Field(None, ge=1, le=4096, description="pixels between tiles (default: the tile size)")
    runner: Literal["auto", "torch", "torch-bf16", "onnx", "onnx-int8", "openvino"] = Field(
        "auto", description="image tower engine (auto: by device, see docs/models.md)")
    batch_size: int = Field(32, ge=1, le=1024, description="tiles per encoder batch (a cancel acts between batches)")


class ClassifyRequest(RasterInput, TileParams):
    kind: Literal["classify"] = "classify"
    prompts: str = Field(..., min_length=1, max_length=20_000,
                         description='classes separated by ";" or new lines, synonyms after "|"')
    templates: str | None = Field(None, description="templates file (default: the card's)")
    aoi: str | None = Field(None, max_length=5_000_000, description="area of interest, WKT or GeoJSON")
    aoi_crs: str | None = Field(None, description="CRS of aoi (default: the raster's)")
    multi_label: bool = False
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    out: str = Field(..., min_length=1, description="output GeoPackage path")
    index: str | None = Field(None, description="embedding index to reuse and fill (default: the cache's, "
                                                "per model + tile + stride)")
    cache: bool = Field(True, description="reuse the tile embeddings of an indexed raster and cached prompt "
                                          "embeddings; store a full grid's embeddings for the next run")


class IndexRequest(TileParams):
    kind: Literal["index"] = "index"
    rasters: list[RasterInput] = Field(..., min_length=1, max_length=10_000)
    index: str | None = Field(None, description="index directory (default: the cache, keyed by inputs)")


class SearchRequest(_Strict):
    kind: Literal["search"] = "search"
    index: str = Field(..., min_length=1, description="index directory")
    like: list[str] | None = Field(None, description="query geometries, WKT or GeoJSON")
    like_crs: str | None = Field(None, description="CRS of the query geometries (default: the raster's)")
    tile_ids: list[int] | None = Field(None, description="query tiles by id (alternative to geometries)")
    scene: str | None = Field(None, description="scene (raster path) the geometries/tile ids refer to")
    text: str | None = Field(None, max_length=2_000, description="a description to search for")
    fuse: Literal["mean", "max"] = Field("mean", description="mean of query tiles, or each tile queries (max)")
    k: int = Field(50, ge=1, le=MAX_K)
    out: str = Field(..., min_length=1, description="output GeoPackage path")
    heatmap: str | None = Field(None, description="optional float GeoTIFF of similarity on the raster grid")


JobRequest = Annotated[Union[ClassifyRequest, IndexRequest, SearchRequest], Field(discriminator="kind")]

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobStatus(BaseModel):
    id: str
    kind: Literal["classify", "index", "search"]
    state: JobState
    done: int = 0  # tiles processed
    total: int = 0  # tiles to process (0 while unknown)
    rate: float | None = None  # tiles per second
    eta_seconds: float | None = None
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
    description: str
    path: str | None = None  # the card's folder


class VectorIndexInfo(BaseModel):
    """An index loaded for search in this process, and how its vectors are searched (docs/index.md)."""

    index: str
    tiles: int
    search_method: str
    recall: float | None = Field(None, description="recall@50 against exact search, measured when tuned")
    latency_ms: float | None = Field(None, description="median single-query latency measured when tuned")
    memory_mb: float = Field(description="float16 embeddings plus the search structure, in memory")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    device: str
    torch: str
    onnx_providers: list[str]
    loaded_models: list[str]
    queue_length: int
    running_job: str | None = None
    vector_indexes: list[VectorIndexInfo] = []


class ErrorBody(BaseModel):
    detail: str
