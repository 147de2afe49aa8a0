"""PyQGIS side of TilePrompt: lifecycle, UI and the client of the local backend. Pure PyQGIS only."""
