"""QGIS's proxy settings (Settings > Options > Network) as the variables uv and other command-line tools read.

QGIS's own downloads (the uv wheel) go through QgsNetworkAccessManager and use the proxy by themselves; uv runs as
a child process and needs ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY``/``NO_PROXY``. With "Use system proxy"
(DefaultProxy) the environment QGIS started with already holds the system's variables, so nothing is added.
A proxy whose credentials live in QGIS's authentication database (authcfg) cannot be passed on: its user and
password must be typed into the proxy settings. Credentials are never written to the log (:func:`redact`).
"""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit

PROXY_SCHEMES = {"HttpProxy": "http", "HttpCachingProxy": "http", "Socks5Proxy": "socks5"}


def proxy_environment(enabled: bool, kind: str, host: str, port: int | str, user: str = "", password: str = "",
                      excluded: list[str] | tuple[str, ...] = ()) -> dict:
    """The variables for a QGIS proxy configuration (its QgsSettings values ``proxy/...``)."""
    scheme = PROXY_SCHEMES.get(kind)
    if not enabled or scheme is None or not host:
        return {}
    auth = ""
    if user:
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "") + "@"
    url = f"{scheme}://{auth}{host}" + (f":{int(port)}" if str(port).strip() not in ("", "0") else "")
    env = {"ALL_PROXY": url} if scheme == "socks5" else {"HTTP_PROXY": url, "HTTPS_PROXY": url}
    # QGIS lists URL prefixes; NO_PROXY matches host names (a path would never match)
    hosts = [(urlsplit(e.strip()).hostname or "") if "://" in e else e.strip().strip("/") for e in excluded if e]
    hosts = [h for h in hosts if h]
    if hosts:
        env["NO_PROXY"] = ",".join(hosts)
    return env


def qgis_proxy_environment() -> dict:
    """:func:`proxy_environment` of the current QGIS settings."""
    from qgis.core import QgsSettings

    settings = QgsSettings()
    excluded = settings.value("proxy/noProxyUrls", []) or []
    if isinstance(excluded, str):
        excluded = [excluded]
    return proxy_environment(settings.value("proxy/proxyEnabled", False, type=bool),
                             str(settings.value("proxy/proxyType", "") or ""),
                             str(settings.value("proxy/proxyHost", "") or ""),
                             str(settings.value("proxy/proxyPort", "") or ""),
                             str(settings.value("proxy/proxyUser", "") or ""),
                             str(settings.value("proxy/proxyPassword", "") or ""), list(excluded))


def redact(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://***@host`` (log lines, diagnostics)."""
    return re.sub(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s]+@", r"\1***@", text)
