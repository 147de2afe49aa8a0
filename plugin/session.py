"""The plugin's view of the backend: the current connection, its health and models.

Shared by the dock (through the plugin) and the Processing algorithms. Health and model list are fetched
asynchronously (AsyncClient) on connect and refreshed by a timer; Processing, which runs without the dock,
falls back to the state file of a backend started elsewhere (``resolve_connection``).
"""

from __future__ import annotations

from qgis.PyQt.QtCore import QObject, QTimer, pyqtSignal

from .client import AsyncClient, BackendClient, BackendUnavailable, Connection
from .i18n import tr
from .settings import Key, Settings

HEALTH_INTERVAL_MS = 5000


class BackendSession(QObject):
    """Connection state; signals ``changed()`` whenever connection, health or models change."""

    changed = pyqtSignal()
    lost = pyqtSignal(str, bool)  # the backend stopped answering (message, whether it only did not answer in time)

    def __init__(self, settings: Settings | None = None, parent=None):
        super().__init__(parent)
        self.settings = settings or Settings()
        self.connection: Connection | None = None
        self.health: dict | None = None
        self.models: list[dict] = []
        self.error: str = ""
        self._async: AsyncClient | None = None
        self._models_pending = False
        self._timer = QTimer(self)
        self._timer.setInterval(HEALTH_INTERVAL_MS)
        self._timer.timeout.connect(self.refresh_health)

    @property
    def connected(self) -> bool:
        return self.connection is not None and self.health is not None

    def timeout(self) -> float:
        return float(self.settings.get(Key.REQUEST_TIMEOUT_S))

    def connect_to(self, connection: Connection, on_result=None) -> None:
        """Use ``connection``; ``on_result(error or None)`` after the first health check."""
        self.disconnect()
        self.connection = connection
        self._async = AsyncClient(connection, self.timeout(), self)

        def first_health(data, error):
            self._on_health(data, error)
            if on_result is not None:
                on_result(error)

        # Checked every few seconds from now on, answered or not: a backend too busy to answer the first check
        # in time (a loaded machine) turns up when it answers.
        self._timer.start()
        self._async.health(first_health)

    def disconnect(self) -> None:
        self._timer.stop()
        if self._async is not None:
            self._async.abort_all()
            self._async.deleteLater()
            self._async = None
        had = self.connection is not None
        self.connection, self.health, self.models, self.error = None, None, [], ""
        self._models_pending = False
        if had:
            self.changed.emit()

    def refresh_health(self) -> None:
        if self._async is not None:
            self._async.health(self._on_health)

    def _on_health(self, data, error) -> None:
        was_up = self.health is not None
        if error is None and isinstance(data, dict):
            self.health, self.error = data, ""
            if (not was_up or not self.models) and not self._models_pending:
                self.refresh_models()  # up again, or the first list timed out (a backend still importing): ask
        else:
            self.health, self.error = None, str(error)
            if was_up:
                # Said once; polling goes on, so a backend that was only too busy to answer in time (a heavy job
                # on a loaded machine) shows as up again when it answers.
                self.lost.emit(self.error, bool(getattr(error, "timed_out", False)))
        self.changed.emit()

    def refresh_models(self, on_result=None) -> None:
        if self._async is None:
            return
        self._models_pending = True

        def done(data, error):
            self._models_pending = False
            if error is None and isinstance(data, list):
                self.models = [m for m in data if isinstance(m, dict)]
                self.changed.emit()
            if on_result is not None:
                on_result(error)

        self._async.models(done)

    def default_model(self, raster_fields: dict, on_result) -> None:
        """Ask which model the backend picks for a raster: ``on_result(choice dict or None, error or None)``."""
        if self._async is None:
            on_result(None, None)
            return
        self._async.default_model(raster_fields, on_result)

    def model_info(self, model_id: str | None) -> dict:
        if model_id:
            for model in self.models:
                if model.get("id") == model_id:
                    return model
            return {}
        default = (self.health or {}).get("default_model")
        return self.model_info(default) if default else (self.models[0] if len(self.models) == 1 else {})

    def resolve_connection(self) -> Connection:
        """The dock's connection, else the state file of a backend started elsewhere (Processing, scripts)."""
        if self.connection is not None:
            return self.connection
        connection = Connection.from_state_file(self.settings.state_file())
        if connection.process_alive() is False:
            raise BackendUnavailable(tr("The backend recorded in {path} (pid {pid}) is no longer running. Start it "
                                        "from the TilePrompt dock.").format(path=connection.state_file,
                                                                            pid=connection.pid))
        return connection

    def client(self) -> BackendClient:
        return BackendClient(self.resolve_connection(), self.timeout())

    def describe(self) -> str:
        if self.connection is None:
            return tr("Not connected")
        if self.health is None:
            return tr("{address}: not answering ({error})").format(address=self.connection.address,
                                                                  error=self.error or tr("checking"))
        h = self.health
        return tr("backend {version} · device {device} · {address}").format(
            version=h.get("version", "?"), device=h.get("device", "?"), address=self.connection.address)
