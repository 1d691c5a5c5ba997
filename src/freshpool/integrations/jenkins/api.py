"""What `freshpool jenkins serve` asks of Jenkins, through python-jenkins.

python-jenkins keeps the session, the basic auth with the API token and the CSRF
crumb; every call here goes through the CI-server guard (the one backoff, Retry-After,
health). Its convenience methods that answer "does not exist" for any error (a 500,
a refused token) are not used where the answer decides a deletion: existence is
read with the status kept, so a Jenkins that fails is never taken for one that said no.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

import jenkins
import requests

from freshpool.integrations.ciserver import CiServer, CiServerError
from freshpool.integrations.jenkins.config import JenkinsSettings

INTEGRATION = "jenkins"
T = TypeVar("T")
_STATUS = re.compile(r"\[(\d{3})\]")
# The fields of an agent this integration reads, so Jenkins does not build the rest.
_COMPUTER_TREE = (
    "displayName,offline,temporarilyOffline,idle,numExecutors,assignedLabels[name],"
    "executors[currentExecutable[url,number,timestamp,queueId]]"
)


def _status(exc: Exception) -> int | None:
    """The HTTP status python-jenkins raised for, None when Jenkins was not reached."""
    if isinstance(exc, jenkins.NotFoundException):
        return 404
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return int(exc.response.status_code)
    if isinstance(exc, jenkins.JenkinsException):
        found = _STATUS.search(str(exc))
        return int(found.group(1)) if found else None
    return None


def parse_secret(text: str) -> str:
    """The agent's secret from `jenkins-agent.jnlp`: the first argument of the
    application it describes."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise CiServerError(f"jenkins-agent.jnlp is not XML: {exc}", 200) from None
    first = root.find("./application-desc/argument")
    if first is None or not (first.text or "").strip():
        raise CiServerError("jenkins-agent.jnlp carries no secret", 200)
    return (first.text or "").strip()


def relabelled(config_xml: str, label: str) -> str:
    """An agent's config.xml with its labels replaced by `label`."""
    root = ET.fromstring(config_xml)
    element = root.find("label")
    if element is None:
        element = ET.SubElement(root, "label")
    element.text = label
    return ET.tostring(root, encoding="unicode")


class JenkinsApi:
    def __init__(self, settings: JenkinsSettings) -> None:
        self.settings = settings
        self.server = CiServer(INTEGRATION, settings.url)
        self.client = jenkins.Jenkins(
            settings.url, username=settings.user, password=settings.resolved_token(),
            timeout=settings.timeout,
        )  # fmt: skip
        self.client._session.verify = (
            str(settings.verify) if not isinstance(settings.verify, bool) else settings.verify
        )

    def _guard(self, what: str, call: Callable[[], T]) -> T:
        def attempt() -> T:
            try:
                return call()
            except (jenkins.JenkinsException, requests.RequestException) as exc:
                status = _status(exc)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CiServerError(f"{what}: {first}", status) from None

        return self.server.guarded(attempt)

    def _request(self, method: str, path: str, ok_missing: bool = False,
                 **kwargs: Any) -> requests.Response | None:  # fmt: skip
        url = self.settings.url + path

        def call() -> requests.Response | None:
            try:
                response: requests.Response = self.client.jenkins_request(
                    requests.Request(method, url, **kwargs)
                )
                return response
            except jenkins.NotFoundException:
                if ok_missing:
                    return None
                raise

        return self._guard(f"{method} {path}", call)

    def _json(self, path: str) -> Any:
        response = self._request("GET", path)
        assert response is not None
        return response.json()

    # ------------------------------------------------------------- server

    def check(self) -> tuple[str, str]:
        """(version, user) once Jenkins accepts the token; CiServerError otherwise."""
        me = self._json("me/api/json")
        version = self._guard("GET /", self.client.get_version)
        return str(version), str(me.get("id") or me.get("fullName") or "")

    def queue(self) -> list[dict[str, Any]]:
        return list(self._json("queue/api/json?depth=0").get("items") or [])

    def computers(self) -> list[dict[str, Any]]:
        tree = quote(f"computer[{_COMPUTER_TREE}]", safe="[],")
        return list(self._json(f"computer/api/json?tree={tree}").get("computer") or [])

    # -------------------------------------------------------------- agents

    @staticmethod
    def _path(name: str) -> str:
        return f"computer/{quote(name, safe='')}/"

    def create_agent(self, name: str, label: str, description: str, remote_fs: str) -> None:
        """An inbound (WebSocket) agent with one executor, taking only builds that ask
        for its label. Names are never reused, so one found existing on a retry is the
        one an earlier try made."""

        def create() -> None:
            try:
                self.client.create_node(
                    name, numExecutors=1, nodeDescription=description, remoteFS=remote_fs,
                    labels=label, exclusive=True, launcher=jenkins.LAUNCHER_JNLP,
                    launcher_params={"webSocket": True},
                )  # fmt: skip
            except jenkins.JenkinsException as exc:
                if "already exists" not in str(exc):
                    raise

        self._guard(f"create agent {name}", create)
        if self.computer(name) is None:
            raise CiServerError(f"create agent {name}: Jenkins does not list it", 200)

    def secret(self, name: str) -> str:
        response = self._request("GET", self._path(name) + "jenkins-agent.jnlp")
        assert response is not None
        return parse_secret(response.text)

    def computer(self, name: str) -> dict[str, Any] | None:
        """The agent as Jenkins sees it, None when Jenkins says there is none (404)."""
        tree = quote(_COMPUTER_TREE, safe="[],")
        response = self._request("GET", self._path(name) + f"api/json?tree={tree}",
                                 ok_missing=True)  # fmt: skip
        return None if response is None else dict(response.json())

    def take_out(self, name: str, label: str) -> None:
        """Give the agent no more builds: temporarily offline first (one call, at once),
        then relabelled `<label>-used` as the seed did; a running build goes on."""
        info = self.computer(name)
        if info is None:
            return
        if not info.get("temporarilyOffline"):
            message = quote("freshpool: ran its one build", safe="")
            self._request("POST", self._path(name) + f"toggleOffline?offlineMessage={message}",
                          ok_missing=True)  # fmt: skip
        config = self._request("GET", self._path(name) + "config.xml", ok_missing=True)
        if config is None:
            return
        body = relabelled(config.text, f"{label}-used").encode()
        self._request("POST", self._path(name) + "config.xml", ok_missing=True, data=body,
                      headers={"Content-Type": "text/xml; charset=utf-8"})  # fmt: skip

    def delete_agent(self, name: str) -> None:
        """Delete the agent and confirm Jenkins no longer lists it."""
        self._request("POST", self._path(name) + "doDelete", ok_missing=True)
        if self.computer(name) is not None:
            raise CiServerError(f"delete agent {name}: Jenkins still lists it", 200)

    # -------------------------------------------------------------- builds

    def build(self, url: str) -> dict[str, Any] | None:
        path = self._relative(url) + "api/json?tree=result,building,timestamp,queueId"
        response = self._request("GET", path, ok_missing=True)
        return None if response is None else dict(response.json())

    def stop_build(self, url: str) -> None:
        self._request("POST", self._relative(url) + "stop", ok_missing=True)

    def _relative(self, url: str) -> str:
        """A build's URL as Jenkins gives it, relative to the configured base (Jenkins
        may name itself by another host than the one this process uses)."""
        found = re.search(r"(job/.+)$", url)
        if not found:
            raise CiServerError(f"not a build URL: {url!r}", 200)
        return found.group(1).rstrip("/") + "/"


def queued_label(item: dict[str, Any]) -> str | None:
    """The label a queued build waits for, from Jenkins' reason (`why`): "Waiting for
    next available executor on 'linux'", "There are no nodes with the label 'linux'",
    "All nodes of label 'linux' are offline" (Jenkins quotes with U+2018 and U+2019).
    Builds blocked for other reasons (an earlier build of the job still running) are
    not waiting for an agent."""
    if item.get("blocked") or not item.get("buildable", True):
        return None
    why = str(item.get("why") or "")
    found = re.search("(?:on|label) [\u2018'](.+?)[\u2019']", why)
    return found.group(1) if found else None
