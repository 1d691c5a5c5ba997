"""The configuration file: pydantic models (models.py, images.py) and the YAML loader
whose errors name file, line and key (loader.py)."""

from freshpool.config.base import NAME_PATTERN, Name, Seconds
from freshpool.config.images import BASE_FIELDS, Image, ImageFile, Step
from freshpool.config.loader import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ConfigProblem,
    default_text,
    load,
    parse,
    resolve_path,
)
from freshpool.config.models import (
    Config,
    Label,
    LocalNetwork,
    NodeLimits,
    Provider,
    QemuSettings,
    SimSettings,
    VmSize,
)
from freshpool.config.service import Api, ApiTls, Statsd, Tenant
from freshpool.core.errors import UnknownName

__all__ = [
    "BASE_FIELDS",
    "DEFAULT_CONFIG_PATH",
    "NAME_PATTERN",
    "Api",
    "ApiTls",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "Image",
    "ImageFile",
    "Label",
    "LocalNetwork",
    "Name",
    "NodeLimits",
    "Provider",
    "QemuSettings",
    "Seconds",
    "SimSettings",
    "Statsd",
    "Step",
    "Tenant",
    "UnknownName",
    "VmSize",
    "default_text",
    "load",
    "parse",
    "resolve_path",
]
