"""Where the service is and how to authenticate: from arguments, a conductor
configuration, or the environment.

Precedence, first found wins:

* URL: the ``url`` argument; the configuration's ``network.bind_address`` /
  ``network.api_port`` (when the configuration has a ``network`` section); ``CONDUCTOR_URL``;
  ``http://127.0.0.1:8081``.
* Token: the ``token`` argument; ``CONDUCTOR_TOKEN``; when the configuration says
  ``security.api_key_required``, the key file it names (``security.api_key_file``, else
  ``<storage.base_path>/config/api-key``), if readable.

A configuration is what ``conductor serve`` reads (``config/standalone-isolated.yaml``):
a dict, or the path of the YAML file.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

__all__ = ["DEFAULT_URL", "ConfigLike", "Settings", "load_config", "resolve"]

DEFAULT_URL = "http://127.0.0.1:8081"

#: A conductor configuration: a mapping, or the path of a YAML file.
ConfigLike = Union[Mapping[str, Any], str, "os.PathLike[str]", None]


@dataclass(frozen=True)
class Settings:
    url: str
    token: Optional[str]


def load_config(config: ConfigLike) -> Mapping[str, Any]:
    """The configuration as a mapping (reads and parses a YAML path)."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return config
    import yaml  # only needed for files

    text = Path(os.fspath(config)).expanduser().read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{config}: a conductor configuration must be a YAML mapping")
    return data


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = config.get(name)
    return value if isinstance(value, Mapping) else {}


def _url_from_config(config: Mapping[str, Any]) -> Optional[str]:
    network = _section(config, "network")
    if "api_port" not in network and "bind_address" not in network:
        return None
    host = str(network.get("bind_address") or "127.0.0.1")
    port = int(network.get("api_port") or 8081)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"
    if ip.is_unspecified:  # listening on all interfaces: talk to it on loopback
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return f"http://[{ip}]:{port}" if ip.version == 6 else f"http://{ip}:{port}"


def _expand(path: str) -> Path:
    return Path(os.path.expanduser(path))


def _token_from_config(config: Mapping[str, Any]) -> Optional[str]:
    security = _section(config, "security")
    if not security.get("api_key_required"):
        return None
    key_file = security.get("api_key_file")
    if key_file:
        path = _expand(str(key_file))
    else:
        base = _section(config, "storage").get("base_path") or "~/.claude-conductor"
        path = _expand(str(base)) / "config" / "api-key"
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def resolve(
    url: Optional[str] = None,
    token: Optional[str] = None,
    config: ConfigLike = None,
) -> Settings:
    """The service URL and token per the precedence in the module documentation."""
    data = load_config(config)
    resolved_url = url or _url_from_config(data) or os.environ.get("CONDUCTOR_URL") or DEFAULT_URL
    resolved_token = token or os.environ.get("CONDUCTOR_TOKEN") or _token_from_config(data)
    return Settings(url=resolved_url.rstrip("/"), token=resolved_token)
