"""Translatable UI strings: every user-facing text goes through :func:`tr` (context ``TilePrompt``).

Translations are Qt ``.qm`` files in ``i18n/tileprompt_<locale>.qm`` (made with pylupdate5/lrelease from the
``.ts`` files); :class:`Translator` installs the one matching QGIS's locale, if any, and removes it on unload.
"""

from pathlib import Path

from qgis.core import QgsSettings
from qgis.PyQt.QtCore import QCoreApplication, QLocale, QTranslator

CONTEXT = "TilePrompt"
I18N_DIR = Path(__file__).resolve().parent.parent / "i18n"


def tr(text: str) -> str:
    return QCoreApplication.translate(CONTEXT, text)


class Translator:
    """Installs ``i18n/tileprompt_<locale>.qm`` for QGIS's UI locale; a no-op when there is none."""

    def __init__(self):
        self._translator = None

    def install(self) -> bool:
        locale = QgsSettings().value("locale/userLocale", QLocale().name()) or ""
        for name in (str(locale), str(locale)[:2]):
            qm = I18N_DIR / f"tileprompt_{name}.qm"
            if name and qm.is_file():
                translator = QTranslator()
                if translator.load(str(qm)):
                    QCoreApplication.installTranslator(translator)
                    self._translator = translator
                    return True
        return False

    def remove(self):
        if self._translator is not None:
            QCoreApplication.removeTranslator(self._translator)
            self._translator = None
