"""Defaults shared by the light layers (server, CLI) and the models package, importable without torch."""

#: The card used when neither a model nor a raster says which (a layer's default comes from models.choose_model).
DEFAULT_MODEL = "clip-vit-b32-openai"
