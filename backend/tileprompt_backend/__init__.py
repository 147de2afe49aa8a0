"""TilePrompt backend: read Sentinel-2 / RGB rasters, tile them, encode tiles with CLIP-aligned
encoders and score them against text prompts."""

__version__ = "0.1.0"
