"""Reading a config file: YAML in, a validated Config out, every error with file, line and key."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from freshpool.config.models import Config
from freshpool.core.errors import BadInput

DEFAULT_CONFIG_PATH = Path("freshpool.yaml")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path or '(top level)'}: {self.message}"


class ConfigError(BadInput):
    """Every problem found in a configuration file, each with file, line and key path."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def default_text() -> str:
    return resources.files("freshpool.config").joinpath("default.yaml").read_text()


def resolve_path(path: Path | None) -> tuple[str, str]:
    """Return (source name, text): the given file, ./freshpool.yaml, or the embedded default."""
    if path is None:
        env = os.environ.get("FRESHPOOL_CONFIG")
        path = Path(env) if env else None
    if path is None:
        if DEFAULT_CONFIG_PATH.exists():
            path = DEFAULT_CONFIG_PATH
        else:
            return "<embedded default>", default_text()
    try:
        return str(path), path.read_text()
    except OSError as exc:
        raise ConfigError(
            [ConfigProblem(str(path), None, "", f"cannot read: {exc.strerror}")]
        ) from None


def load(path: Path | None = None) -> Config:
    source, text = resolve_path(path)
    return parse(text, source)


def parse(text: str, source: str = "<string>") -> Config:
    config, tree = parse_model(text, source, Config)
    problems = config.cross_check()
    if problems:
        raise ConfigError(
            [
                ConfigProblem(source, _line_of(tree, list(loc)), _dotted(list(loc)), message)
                for loc, message in problems
            ]
        )
    return config


def parse_model(text: str, source: str, model: type[M]) -> tuple[M, Any]:
    """`text` (YAML) validated as `model`, and its YAML tree (for `line_of`); a
    ConfigError naming the file, line and key of each problem otherwise."""
    try:
        tree = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            [ConfigProblem(source, line, "", f"not valid YAML: {exc.problem}")]
        ) from None
    if not isinstance(tree, dict):
        raise ConfigError([ConfigProblem(source, 1, "", "expected a mapping of settings")])
    try:
        return model.model_validate(_plain(tree)), tree
    except ValidationError as exc:
        raise ConfigError([_problem(source, tree, err) for err in exc.errors()]) from None


def load_model(path: Path, model: type[M]) -> tuple[M, Any]:
    """The settings file at `path` (an integration's, say) validated as `model`."""
    source, text = resolve_path(path)
    return parse_model(text, source, model)


def line_of(tree: Any, loc: list[Any]) -> int | None:
    """The 1-based line of the deepest key in `loc` that exists in the YAML tree."""
    return _line_of(tree, loc)


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _problem(source: str, tree: Any, err: Any) -> ConfigProblem:
    loc = [part for part in err["loc"] if not (isinstance(part, str) and "[" in part)]
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "missing":
        message = "required key is missing"
    elif "input" in err and err["type"] not in ("value_error",):
        message = f"{message} (got {err['input']!r})"
    return ConfigProblem(source, _line_of(tree, loc), _dotted(loc), message)


def _dotted(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_of(tree: Any, loc: list[Any]) -> int | None:
    """The 1-based line of the deepest key in `loc` that exists in the YAML tree."""
    line = None
    node = tree
    for part in loc:
        if isinstance(node, CommentedMap) and part in node:
            line = node.lc.key(part)[0] + 1
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
            line = node.lc.item(part)[0] + 1
            node = node[part]
        else:
            break
    if line is None and isinstance(tree, CommentedMap):
        line = tree.lc.line + 1
    return line
