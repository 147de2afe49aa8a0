"""Few-shot examples: which tiles the analyst says belong to which class, read from a file, kept with the run.

An examples file is one of:

- **a TilePrompt result** (a GeoPackage with the ``tileprompt_runs`` table and layer ``tiles``): a tile is an
  example when its ``example`` field is set (the dock's "set class of selected tiles") or when its ``class`` was
  edited (it differs from the class its ``s_<class>`` scores give, which is how the run wrote it). The examples
  the run itself was corrected with (stored in its run row, with their embeddings) come along, so corrections
  accumulate and a corrected result can be re-applied to another scene of the same model.
- **any other polygon layer** (GeoPackage, GeoJSON, Shapefile ...) with a ``class`` (or ``example``) field: each
  polygon marks the tiles under it - chosen like an area of interest chooses tiles - as that class.

Examples name a class by its name or one of its synonyms (case-insensitive); a name no prompt has is a new class.
The run row stores every example (raster, tile id, class, where it came from) and its float16 embedding.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .prompts import MAX_PHRASE_CHARS, PromptClass

#: The result layer's column an analyst (or the dock) fills with a tile's true class.
EXAMPLE_FIELD = "example"
RESULT_LAYER = "tiles"
RUNS_TABLE = "tileprompt_runs"
#: More examples than this is not few-shot any more (and would bloat the run row).
MAX_EXAMPLES = 10_000


@dataclass
class Example:
    cls: str  # the class as the file names it
    raster: str  # resolved path of the raster the tile belongs to
    tile: int  # tile id on that raster's grid
    source: str  # "edit" (class changed), "example" (example field), "polygon", "stored" (an earlier correction)
    tile_px: int | None = None  # the grid the tile id refers to
    stride: int | None = None
    vector: np.ndarray | None = None  # float16 embedding when the file stores it

    def on_grid(self, raster: str, tile_px: int, stride: int) -> bool:
        """Whether this example is a tile of ``raster`` on the grid (tile_px, stride)."""
        return self.raster == raster and self.tile_px == tile_px and self.stride == stride


@dataclass
class ExampleSet:
    path: str
    examples: list[Example] = field(default_factory=list)
    model: dict | None = None  # model id, card hash, weights hash of the stored vectors
    index: str | None = None  # the embeddings index of the run the examples came from

    def __len__(self) -> int:
        return len(self.examples)


# --- reading -----------------------------------------------------------------------------------------------------

def read_examples(path: str | Path, info=None, tile_px: int | None = None, stride: int | None = None) -> ExampleSet:
    """Examples from a result GeoPackage or a polygon layer with a ``class`` field (see the module docstring).

    Polygon layers need the raster being classified (``info``: a RasterInfo) and its grid (``tile_px``,
    ``stride``). Bad files are a ValueError naming the problem; a file without any example too.
    """
    import pyogrio

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"examples file not found: {path}")
    try:
        layers = [str(name) for name, _kind in pyogrio.list_layers(path)]
    except Exception as e:  # noqa: BLE001 - pyogrio raises DataSourceError and friends
        raise ValueError(f"examples file {path.name} cannot be read as a vector file ({_reason(e)})") from None
    if RUNS_TABLE in layers and RESULT_LAYER in layers:
        found = _from_result(path)
    else:
        found = _from_polygons(path, layers, info, tile_px, stride)
    if not found.examples:
        raise ValueError(f"examples file {path.name} holds no examples: set the class of some tiles (the "
                         f"'{EXAMPLE_FIELD}' field, or edit 'class'), or give polygons with a 'class' field")
    if len(found.examples) > MAX_EXAMPLES:
        raise ValueError(f"examples file {path.name} holds {len(found.examples)} examples (at most {MAX_EXAMPLES})")
    for e in found.examples:
        check_class_name(e.cls)
    return found


def _reason(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def check_class_name(name: str) -> None:
    if not name or not any(ch.isalnum() for ch in name):
        raise ValueError(f"example class {name!r} has no letters or digits")
    if len(name) > MAX_PHRASE_CHARS:
        raise ValueError(f"example class is too long ({len(name)} characters, at most {MAX_PHRASE_CHARS})")


def _from_result(path: Path) -> ExampleSet:
    from pyogrio.raw import read

    from ..outputs import read_run_table

    runs = read_run_table(path)
    if not runs:
        raise ValueError(f"examples file {path.name}: its {RUNS_TABLE} table is empty")
    run = runs[-1]
    raster = str(run.get("raster") or "")
    tile_px, stride = _int(run.get("tile_px")), _int(run.get("stride"))
    found = ExampleSet(str(path), model=run.get("examples_model") or _run_model(run), index=run.get("embeddings_index"))
    stored = decode_vectors(run.get("examples_embeddings"))
    for i, e in enumerate(run.get("examples") or []):
        vec = stored[i] if stored is not None and i < len(stored) else None
        found.examples.append(Example(str(e["class"]), str(e["raster"]), int(e["tile"]), "stored",
                                      _int(e.get("tile_px")) or tile_px, _int(e.get("stride")) or stride, vec))
    columns = [c["column"] for c in run.get("prompts") or [] if c.get("column")]
    names = [c["class"] for c in run.get("prompts") or [] if c.get("column")]
    try:
        meta, _fids, _geom, values = read(path, layer=RESULT_LAYER, read_geometry=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"examples file {path.name}: layer {RESULT_LAYER} cannot be read ({_reason(e)})") from None
    data = dict(zip(meta["fields"], values))
    if "id" not in data or "class" not in data:
        raise ValueError(f"examples file {path.name}: layer {RESULT_LAYER} lacks the 'id' and 'class' fields")
    ids = np.asarray(data["id"], dtype=np.int64)
    edited: dict[int, tuple[str, str]] = {}
    if columns and all(c in data for c in columns) and len(ids):
        scores = np.stack([np.asarray(data[c], dtype=np.float64) for c in columns], axis=1)
        written = np.asarray(names, dtype=object)[np.argmax(np.nan_to_num(scores, nan=-np.inf), axis=1)]
        for i in np.flatnonzero(_text(data["class"]) != written):
            if _text(data["class"])[i]:
                edited[int(ids[i])] = (_text(data["class"])[i], "edit")
    if EXAMPLE_FIELD in data:
        for i in np.flatnonzero(_text(data[EXAMPLE_FIELD]) != ""):
            edited[int(ids[i])] = (_text(data[EXAMPLE_FIELD])[i], "example")
    # the result marks the examples it was corrected with (`example`): those stay as stored, with their
    # embeddings; a tile labelled anew overrides what the earlier correction stored for it
    stored_here = {e.tile: e for e in found.examples if e.on_grid(raster, tile_px, stride)}
    edited = {t: v for t, v in edited.items()
              if t not in stored_here or v[0].casefold() != stored_here[t].cls.casefold()}
    found.examples = [e for e in found.examples if not (e.on_grid(raster, tile_px, stride) and e.tile in edited)]
    found.examples += [Example(cls, raster, tile, source, tile_px, stride)
                       for tile, (cls, source) in sorted(edited.items())]
    return found


def _run_model(run: dict) -> dict | None:
    if not run.get("model"):
        return None
    return {"model": run.get("model"), "card_hash": run.get("model_card_hash"), "weights_hash": None}


def _text(values) -> np.ndarray:
    return np.array(["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip() for v in values],
                    dtype=object)


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _from_polygons(path: Path, layers: list[str], info, tile_px: int | None, stride: int | None) -> ExampleSet:
    from pyogrio.raw import read
    from shapely import from_wkb

    from ..tiling import make_grid

    if info is None or tile_px is None:
        raise ValueError(f"examples file {path.name} is not a TilePrompt result: its polygons need the raster "
                         "being classified")
    found = ExampleSet(str(path))
    stride = stride or tile_px
    raster = str(Path(info.path).resolve())
    labelled: dict[int, str] = {}
    for layer in layers:
        try:
            meta, _fids, geoms, values = read(path, layer=layer)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"examples file {path.name}: layer {layer} cannot be read ({_reason(e)})") from None
        data = dict(zip(meta["fields"], values))
        label = next((data[k] for k in ("class", EXAMPLE_FIELD) if k in data), None)
        if label is None or geoms is None:
            continue
        crs = meta.get("crs")
        for n, (wkb, name) in enumerate(zip(geoms, _text(label))):
            if not name or wkb is None:
                continue
            try:
                grid = make_grid(info, tile_px, stride, aoi=from_wkb(wkb), aoi_crs=crs)
            except ValueError as e:
                raise ValueError(f"examples file {path.name}, layer {layer}, feature {n + 1}: "
                                 + str(e).replace("area of interest", "example polygon")) from None
            for t in grid.tiles:
                labelled[t.id] = name
    found.examples = [Example(cls, raster, tile, "polygon", tile_px, stride) for tile, cls in sorted(labelled.items())]
    if not found.examples and not any(k in ("class", EXAMPLE_FIELD) for layer in layers
                                      for k in _field_names(path, layer)):
        raise ValueError(f"examples file {path.name} has no 'class' field: give each example polygon its class")
    return found


def _field_names(path: Path, layer: str) -> list[str]:
    import pyogrio

    try:
        return [str(f) for f in pyogrio.read_info(path, layer=layer)["fields"]]
    except Exception:  # noqa: BLE001
        return []


# --- classes -----------------------------------------------------------------------------------------------------

def resolve_classes(classes: list[PromptClass], examples: ExampleSet) -> tuple[list[PromptClass], np.ndarray]:
    """Class index of every example, matching names and synonyms case-insensitively; unknown names become new
    classes appended to ``classes`` (with no phrases: they have no text embedding)."""
    from .prompts import MAX_CLASSES, _unique_column

    by_phrase: dict[str, int] = {}
    for i, c in enumerate(classes):
        for p in c.phrases:
            by_phrase.setdefault(p.casefold(), i)
    out = list(classes)
    columns = {c.column for c in classes}
    labels = []
    for e in examples.examples:
        key = e.cls.casefold()
        if key not in by_phrase:
            by_phrase[key] = len(out)
            out.append(PromptClass(name=e.cls, phrases=(), column=_unique_column(e.cls, columns)))
        labels.append(by_phrase[key])
    if len(out) > MAX_CLASSES:
        raise ValueError(f"too many classes with the examples' new ones ({len(out)}, at most {MAX_CLASSES})")
    return out, np.asarray(labels, dtype=np.int64)


# --- storing -----------------------------------------------------------------------------------------------------

def encode_vectors(vectors: np.ndarray) -> dict:
    """(n, D) embeddings as JSON-ready float16 base64 (what the run row stores)."""
    v = np.ascontiguousarray(vectors, dtype="<f2")
    return {"dtype": "float16", "shape": list(v.shape), "data": base64.b64encode(v.tobytes()).decode("ascii")}


def decode_vectors(stored: dict | None) -> np.ndarray | None:
    if not stored:
        return None
    try:
        shape = tuple(int(s) for s in stored["shape"])
        v = np.frombuffer(base64.b64decode(stored["data"]), dtype="<f2")
        return v.reshape(shape)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"the stored examples' embeddings are damaged ({e})") from None


# --- embeddings --------------------------------------------------------------------------------------------------

def model_stamp(card) -> dict:
    """What the examples' embeddings depend on: model id, card hash, weights hash."""
    from ..index.store import weights_hash

    return {"model": card.id, "card_hash": card.card_hash(), "weights_hash": weights_hash(card)}


def check_model(found: ExampleSet, card) -> None:
    """Stored example embeddings must come from this model (card and weights): checked before any work."""
    if not any(e.vector is not None for e in found.examples):
        return
    stamp, given = model_stamp(card), found.model or {}
    if given.get("card_hash") != stamp["card_hash"] or given.get("weights_hash") not in (None, stamp["weights_hash"]):
        raise ValueError(f"the examples in {Path(found.path).name} were made with model {given.get('model')!r} "
                         f"(card {given.get('card_hash')}); this run uses {card.id!r} (card {stamp['card_hash']}): "
                         "examples carry over only between scenes of the same model")


def example_vectors(found: ExampleSet, card, raster: str, tile_px: int, stride: int, positions: dict[int, int],
                    embeddings: np.ndarray) -> np.ndarray:
    """(n, D) float16 embedding of every example, in order.

    Stored vectors are used as they are (their model must be this one); tiles of the raster being classified
    on this grid come from this run's embeddings (``positions``: tile id -> row of ``embeddings``); tiles of
    another raster come from the embeddings index of the run that named them.
    """
    check_model(found, card)
    dim = int(card.embed_dim)
    out = np.zeros((len(found.examples), dim), dtype=np.float16)
    missing: list[int] = []
    elsewhere: dict[tuple, list[int]] = {}
    for i, e in enumerate(found.examples):
        if e.vector is not None:
            if len(e.vector) != dim:
                raise ValueError(f"the examples in {Path(found.path).name} have {len(e.vector)}-d embeddings; "
                                 f"model {card.id!r} makes {dim}-d ones")
            out[i] = e.vector
        elif e.on_grid(raster, tile_px, stride):
            if e.tile not in positions:
                missing.append(e.tile)
            else:
                out[i] = embeddings[positions[e.tile]]
        else:
            elsewhere.setdefault((e.raster, e.tile_px, e.stride), []).append(i)
    if missing:
        shown = ", ".join(map(str, sorted(missing)[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"example tile(s) {shown} of {Path(found.path).name} are not among the tiles classified "
                         "(outside the area of interest, or nodata)")
    for (other, other_tile, other_stride), rows in elsewhere.items():
        out[rows] = _indexed_vectors(found, card, other, other_tile, other_stride,
                                     [found.examples[i].tile for i in rows])
    return out


def _indexed_vectors(found: ExampleSet, card, raster: str, tile_px: int | None, stride: int | None,
                     tiles: list[int]) -> np.ndarray:
    """Embeddings of tiles of another raster or grid, from the index of the run the examples file came from."""
    from ..index.store import IndexStore, model_key

    name = Path(found.path).name
    where = f"the examples in {name} are tiles of {raster} (tile {tile_px} px, stride {stride} px), whose embeddings"
    if not found.index or tile_px is None:
        raise ValueError(f"{where} were not kept: classify that raster with these examples first, then use the "
                         "result it writes as the examples file")
    mk = model_key(card, tile_px, stride or tile_px)
    try:
        store = IndexStore.open(found.index)
        if mk is None:
            raise ValueError(f"model {card.id!r} has no weights on disk")
        store.check_model(mk)
        scene = store.find_scene(raster)
        ids = store.tile_ids(scene)
        emb = store.embeddings(scene)
    except ValueError as e:
        raise ValueError(f"{where} are not available in index {found.index} ({e})") from None
    pos = {int(t): i for i, t in enumerate(ids)}
    absent = [t for t in tiles if t not in pos]
    if absent:
        raise ValueError(f"{where} are not all in index {found.index}: tile(s) {', '.join(map(str, absent[:10]))}")
    return np.asarray(emb[[pos[t] for t in tiles]], dtype=np.float16)
