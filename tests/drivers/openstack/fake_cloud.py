"""A fake OpenStack cloud for testing an `openstack` driver with the real openstacksdk:
one HTTP server on loopback that answers, with state, the calls openstacksdk makes.

Emulated, in the shapes and with the wording of the OpenStack API reference and of
openstacksdk's own fixtures:

- Version discovery for every service (Keystone's 300 document, Nova's version
  documents, Glance's and Neutron's version lists); the catalog points each service at
  its own path prefix on this server: /identity, /compute/v2.1, /image, /network.
- Identity v3: password authentication scoped to the one project (`POST
  /identity/v3/auth/tokens`, the token in `X-Subject-Token`, a catalog with compute,
  image, network and identity); 401 for a wrong user, password or project, and for any
  other call without a token it issued.
- Compute v2.1 with microversions 2.1 to 2.79 (`OpenStack-API-Version` and
  `X-OpenStack-Nova-API-Version`, echoed back; 400/406 for a bad or unsupported one):
  bodies change with the version where openstacksdk can tell (the flavor embedded in a
  server from 2.47, `networks` required from 2.37, flavor `description`/`extra_specs`,
  the `limits` fields removed in 2.36/2.39/2.57). Servers: create (imageRef, or
  block_device_mapping_v2 with an image source as boot-from-volume; flavorRef;
  networks [{uuid}], "auto" or "none"; key_name; metadata; base64 user_data;
  config_drive), `/servers` and `/servers/detail` (filters name as a regex, status;
  newest first; limit/marker paging with `servers_links`), show, delete, the
  `os-getConsoleOutput` action (409 unless ACTIVE; cloud-init's host key blocks, with
  ECDSA and Ed25519 keys made per server). BUILD turns ACTIVE (or ERROR with a `fault`)
  after `build_delay`, the port going ACTIVE and `addresses` filled. Flavors (list,
  detail, show, os-extra_specs), keypairs (create with or without a public key, list,
  show, delete), `limits` counted from the servers that exist (ERROR and deleting ones
  included, as Nova counts them), quota refusals worded as nova.exception.TooManyInstances
  (`{"forbidden": {"message": "Quota exceeded for instances: ...", "code": 403}}`).
- Network v2.0: networks, subnets and ports (list with attribute filters, show); a port
  per server per network, addresses given from the subnet's pool.
- Image v2: list (newest first, 25 a page, Glance's `next`), show, create (queued; the
  read-only attributes refused), `PUT .../file` (active, with `size`, md5 `checksum`
  and sha512 `os_hash_value` over the bytes), download, delete (403 if protected).
- Errors in each service's own body: Nova's `{"itemNotFound": {...}}`, Neutron's
  `NeutronError`, Glance's and Keystone's.

Not emulated: other Keystone calls (catalog listing, token validation or revocation,
application credentials, domains), token expiry (a token is good until `tokens` is
cleared), policy (one project whose user sees everything, admin-only fields left out),
server actions other than console output (reboot, stop, resize, rebuild...), min/max
count and reservation ids, networks given by port or fixed_ip, server list filters
other than name and status (and sort keys), server groups, security groups, floating
IPs, volumes and the block-storage service (a boot volume is only an id in
`os-extended-volumes:volumes_attached`), Neutron writes, Glance PATCH, image import and
tasks, rate limits, the other OpenStack services. Time moves lazily: `advance()` runs at
the start of every request.

Fault injection: `build_delay`, `fail_next_builds` (and `build_fault`, its message),
`max_instances`/`max_cores`/`max_ram` (-1 for unlimited), `delete_delay` (the server
stays listed with task_state deleting), `host_keys_delay` (the keys reach the console
that long after ACTIVE), `vanish(server_id)`, `fail_next_requests` (answered 503, any
service), `down` (every call 503), clearing `tokens` (openstacksdk authenticates again).
`calls` counts every request, refused ones included, by route, e.g.
"GET /compute/v2.1/servers/{server_id}"; `requests` lists "METHOD /path" in order.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.routing import Match

from tests.drivers.openstack import fake_cloud_model as model
from tests.drivers.openstack import fake_cloud_routes
from tests.drivers.openstack.fake_cloud_model import ApiError
from tests.drivers.openstack.machines import Hypervisor, booted

# Answered without a token: version discovery and authentication itself.
OPEN_PATHS = {"", "/identity", "/identity/v3", "/identity/v3/auth/tokens", "/compute",
              "/compute/v2.1", "/image", "/network"}  # fmt: skip
UNAUTHORIZED = "The request you have made requires authentication."


class FakeCloud:
    def __init__(self, username: str = "freshpool", password: str = "s3cret",
                 project_name: str = "ci") -> None:  # fmt: skip
        self.username, self.password, self.project_name = username, password, project_name
        self.lock = threading.RLock()
        # Fault injection (plain attributes, read on every request).
        self.build_delay = 0.5
        self.delete_delay = 0.0
        self.host_keys_delay = 0.0
        self.fail_next_builds = 0
        self.build_fault = model.NO_VALID_HOST
        self.max_instances = model.DEFAULT_QUOTAS["instances"]
        self.max_cores = model.DEFAULT_QUOTAS["cores"]
        self.max_ram = model.DEFAULT_QUOTAS["ram"]
        self.fail_next_requests = 0
        self.down = False
        # Glance keeps a damaged copy of what is uploaded (a bad store), its checksums
        # those of what it kept.
        self.corrupt_uploads = False
        # Real machines behind the servers (machines.LocalMachines); None: none boots.
        self.hypervisor: Hypervisor | None = None
        # State, as the APIs show it; keys starting with "_" are the fake's own.
        self.servers: dict[str, dict[str, Any]] = {}
        self.flavors: dict[str, dict[str, Any]] = {}
        self.keypairs: dict[str, dict[str, Any]] = {}
        self.images: dict[str, dict[str, Any]] = {}
        self.image_data: dict[str, bytes] = {}
        self.networks: dict[str, dict[str, Any]] = {}
        self.subnets: dict[str, dict[str, Any]] = {}
        self.ports: dict[str, dict[str, Any]] = {}
        self.tokens: set[str] = set()
        self.calls: Counter[str] = Counter()
        self.requests: list[str] = []
        self.url = ""
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()
        for flavor_id, name, vcpus, ram, disk in model.DEFAULT_FLAVORS:
            self.add_flavor(name, vcpus, ram, disk, flavor_id=flavor_id)
        self.add_network("private", "10.0.0.0/24")
        self.add_image("debian-12-generic-amd64", b"QFI\xfb" + b"\0" * 508)

    # ------------------------------------------------------------ for tests

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in a daemon thread; the base URL (port 0: a free port)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off")
        self._uvicorn = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                        daemon=True, name="fake-cloud")  # fmt: skip
        self._thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake cloud did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        if self._uvicorn is not None and self._thread is not None:
            self._uvicorn.should_exit = True
            self._thread.join(10)

    def clouds_yaml(self, path: str | Path, cloud: str = "fake",
                    password: str | None = None) -> Path:  # fmt: skip
        """Add `cloud` to a clouds.yaml (written as JSON, which YAML reads)."""
        path = Path(path)
        clouds: dict[str, Any] = {"clouds": {}}
        if path.exists():
            clouds = json.loads(path.read_text())
        domain = model.DOMAIN["name"]
        clouds["clouds"][cloud] = {
            "auth": {"auth_url": f"{self.url}/identity", "username": self.username,
                     "password": self.password if password is None else password,
                     "project_name": self.project_name, "user_domain_name": domain,
                     "project_domain_name": domain},
            "region_name": model.REGION, "identity_api_version": 3, "interface": "public",
        }  # fmt: skip
        path.write_text(json.dumps(clouds, indent=2) + "\n")
        return path

    def add_flavor(self, name: str, vcpus: int, ram: int, disk: int,
                   flavor_id: str | None = None, **extra_specs: str) -> dict[str, Any]:  # fmt: skip
        flavor: dict[str, Any] = {
            "id": flavor_id or model.new_id(), "name": name, "vcpus": vcpus, "ram": ram,
            "disk": disk, "ephemeral": 0, "swap": 0, "description": None,
            "extra_specs": extra_specs,
        }  # fmt: skip
        with self.lock:
            self.flavors[flavor["id"]] = flavor
        return flavor

    def add_network(self, name: str, cidr: str) -> dict[str, Any]:
        """A network with one IPv4 subnet whose pool ports take addresses from."""
        network, subnet = model.network_docs(name, cidr)
        with self.lock:
            self.networks[network["id"]], self.subnets[subnet["id"]] = network, subnet
        return network

    def add_image(self, name: str, data: bytes, **attrs: Any) -> dict[str, Any]:
        """An active image, as if created and uploaded."""
        spec = {"name": name, "disk_format": "qcow2", "container_format": "bare", **attrs}
        with self.lock:
            image = fake_cloud_routes.glance_create(self, spec)
            return fake_cloud_routes.glance_upload(self, image["id"], data)

    def vanish(self, server_id: str) -> None:
        """The server is gone, with no delete asked for (the cloud lost it)."""
        with self.lock:
            self._remove_server(server_id)

    def host_keys(self, server_id: str) -> list[str]:
        """The public host keys the server's console shows ("TYPE BASE64" each)."""
        with self.lock:
            return list(self.servers[server_id]["_host_keys"])

    def user_data(self, server_id: str) -> bytes | None:
        """The server's user data, decoded."""
        with self.lock:
            data: bytes | None = self.servers[server_id]["_user_data"]
            return data

    def quotas(self) -> dict[str, int]:
        return {"instances": self.max_instances, "cores": self.max_cores, "ram": self.max_ram}

    def usage(self) -> dict[str, int]:
        with self.lock:
            flavors = [doc["flavor"] for doc in self.servers.values()]
        return {"instances": len(flavors), "cores": sum(f["vcpus"] for f in flavors),
                "ram": sum(f["ram"] for f in flavors)}  # fmt: skip

    # -------------------------------------------------------------- HTTP

    def _build_app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        app.add_middleware(BaseHTTPMiddleware, dispatch=self._guard)
        app.add_exception_handler(ApiError, self._api_error)
        fake_cloud_routes.add(app, self)
        return app

    async def _api_error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, ApiError)
        return self._error(request.url.path, error)

    def _error(self, path: str, error: ApiError) -> Response:
        headers = {}
        if error.status == 401:
            headers["WWW-Authenticate"] = f'Keystone uri="{self.url}/identity"'
        return JSONResponse(model.error_body(path, error), error.status, headers=headers)

    def _route(self, request: Request) -> str:
        for route in self.app.router.routes:
            if isinstance(route, APIRoute) and route.matches(request.scope)[0] is Match.FULL:
                return f"{request.method} {route.path}"
        return f"{request.method} {request.url.path}"

    async def _guard(self, request: Request,
                     call_next: Callable[[Request], Awaitable[Response]]) -> Response:  # fmt: skip
        """Counting, injected failures, tokens and microversions, for every call."""
        with self.lock:
            self.calls[self._route(request)] += 1
            self.requests.append(f"{request.method} {request.url.path}")
            refused = self.down or self.fail_next_requests > 0
            if refused and not self.down:
                self.fail_next_requests -= 1
            authorized = request.headers.get("x-auth-token", "") in self.tokens
            self.advance()
        response = await self._answer(request, call_next, refused, authorized)
        response.headers["X-OpenStack-Request-ID"] = f"req-{model.new_id()}"
        version = getattr(request.state, "version", None)
        if version is not None:
            text = model.version_text(version)
            response.headers["OpenStack-API-Version"] = f"compute {text}"
            response.headers["X-OpenStack-Nova-API-Version"] = text
            response.headers["Vary"] = "OpenStack-API-Version, X-OpenStack-Nova-API-Version"
        return response

    async def _answer(self, request: Request, call_next: Callable[[Request], Awaitable[Response]],
                      refused: bool, authorized: bool) -> Response:  # fmt: skip
        path = request.url.path
        if refused:
            return PlainTextResponse("503 Service Unavailable\n\nNo server is available to "
                                     "handle this request.\n", 503)  # fmt: skip
        if path.rstrip("/") not in OPEN_PATHS and not authorized:
            return self._error(path, ApiError(401, UNAUTHORIZED))
        if path.startswith("/compute/v2.1/") and path != "/compute/v2.1/":
            try:
                request.state.version = model.negotiate(model.requested_version(request.headers))
            except ApiError as error:
                request.state.version = model.MIN_VERSION
                return self._error(path, error)
        return await call_next(request)

    # ---------------------------------------------------------- Keystone

    def issue_token(self, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """A project-scoped token for the right password, with the catalog."""
        auth = body.get("auth") or {}
        identity = auth.get("identity") or {}
        user = (identity.get("password") or {}).get("user") or {}
        project = (auth.get("scope") or {}).get("project") or {}
        if "password" not in identity.get("methods", []) or not isinstance(user, dict):
            raise ApiError(401, UNAUTHORIZED)
        domain = user.get("domain") or {}
        right_user = user.get("id") == model.USER_ID or (
            user.get("name") == self.username and model.DOMAIN["name"] in domain.values()
        )
        right_password = hmac.compare_digest(str(user.get("password", "")), self.password)
        right_project = project.get("id") == model.PROJECT_ID or (
            project.get("name") == self.project_name
        )
        if not (right_user and right_password and right_project):
            raise ApiError(401, UNAUTHORIZED)
        token = "gAAAAAB" + secrets.token_urlsafe(96)
        with self.lock:
            self.tokens.add(token)
        return token, model.token_doc(self.url, self.username, self.project_name)

    # -------------------------------------------------------------- Nova

    def create_server(self, spec: dict[str, Any], version: tuple[int, int]) -> dict[str, Any]:
        """`POST /servers`: checked as Nova checks it, then a BUILD server and its ports."""
        name = spec.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 255:
            raise ApiError(400, f"Invalid input for field/attribute name. Value: {name!r}.")
        user_data = model.decode_user_data(spec.get("user_data"))
        metadata = spec.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 255
            for k, v in metadata.items()
        ):
            raise ApiError(400, "Invalid input for field/attribute metadata.")
        networks = self._requested_networks(spec.get("networks"), version)
        flavor = self.flavors.get(str(spec.get("flavorRef", "")).rsplit("/", 1)[-1])
        if flavor is None:
            raise ApiError(400, f"Flavor {spec.get('flavorRef')} could not be found.")
        image, volumes = self._boot_source(spec, flavor)
        key_name = spec.get("key_name")
        if key_name is not None and key_name not in self.keypairs:
            raise ApiError(400, "Invalid key_name provided.")
        self._check_quota(flavor)
        doc = model.server_doc(self.url, spec, flavor, image, volumes)
        now = time.monotonic()
        doc.update(metadata=dict(metadata), key_name=key_name, _user_data=user_data,
                   _spawn_at=now + self.build_delay / 2,
                   _ready_at=now + self.build_delay)  # fmt: skip
        if self.fail_next_builds > 0:
            self.fail_next_builds -= 1
            doc["_fault"] = self.build_fault
        for network in networks:
            port = self._new_port(network, doc["id"])
            if port is None:
                doc["_fault"] = (f"Build of instance {doc['id']} aborted: No more IP addresses "
                                 f"available on network {network['id']}.")  # fmt: skip
                break
            doc["_ports"].append(port["id"])
        self.servers[doc["id"]] = doc
        return doc

    def _boot_source(self, spec: dict[str, Any], flavor: dict[str, Any],
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
        """The image booted (by imageRef or as a boot volume's source) and the volumes."""
        mappings = spec.get("block_device_mapping_v2") or []
        boot = next((m for m in mappings if str(m.get("boot_index")) == "0"), None)
        image_ref = str(spec.get("imageRef") or "").rsplit("/", 1)[-1]
        if boot is not None:
            if boot.get("source_type") != "image" or boot.get("destination_type") != "volume":
                raise ApiError(400, "Block Device Mapping is Invalid: only an image source "
                                    "with a volume destination is emulated.")  # fmt: skip
            image_ref = str(boot.get("uuid", ""))
        elif not image_ref:
            raise ApiError(400, "Block Device Mapping is Invalid: Boot sequence for the "
                                "instance and image/block device mapping combination is "
                                "not valid.")  # fmt: skip
        image = self.images.get(image_ref)
        if image is None:
            raise ApiError(400, f"Image {image_ref} could not be found.")
        if image["status"] != "active":
            raise ApiError(400, f"Image {image_ref} is not active.")
        for key, kind in (("kernel_id", "aki"), ("ramdisk_id", "ari")):
            part = self.images.get(str(image.get(key))) if image.get(key) else None
            if image.get(key) and (part is None or part["disk_format"] != kind
                                   or part["status"] != "active"):  # fmt: skip
                raise ApiError(400, f"Image {image_ref}'s {key} {image[key]} is not an active"
                                    f" {kind} image.")  # fmt: skip
        if boot is None and flavor["disk"] and image["min_disk"] > flavor["disk"]:
            raise ApiError(400, "Flavor's disk is too small for requested image.")
        if image["min_ram"] > flavor["ram"]:
            raise ApiError(400, "Flavor's memory is too small for requested image.")
        if boot is None:
            return image, []
        keep = bool(boot.get("delete_on_termination"))
        return image, [{"id": model.new_id(), "delete_on_termination": keep}]

    def _requested_networks(self, value: Any, version: tuple[int, int]) -> list[dict[str, Any]]:
        if value is None:
            if version >= (2, 37):
                raise ApiError(400, "Invalid input for field/attribute server. Value: "
                                    "'networks' is a required property")  # fmt: skip
            value = "auto"
        if value == "none":
            return []
        if value == "auto":
            if len(self.networks) > 1:
                raise ApiError(409, "Multiple possible networks found, use a Network ID to "
                                    "be more specific.")  # fmt: skip
            return list(self.networks.values())
        if not isinstance(value, list) or not all(isinstance(n, dict) for n in value):
            raise ApiError(400, "Invalid input for field/attribute networks.")
        networks = []
        for requested in value:
            if "uuid" not in requested:
                raise ApiError(400, "Only networks given by uuid are emulated.")
            network = self.networks.get(str(requested["uuid"]))
            if network is None:
                raise ApiError(400, f"Network {requested['uuid']} could not be found.")
            networks.append(network)
        return networks

    def _check_quota(self, flavor: dict[str, Any]) -> None:
        quotas, used = self.quotas(), self.usage()
        asked = {"instances": 1, "cores": flavor["vcpus"], "ram": flavor["ram"]}
        overs = [name for name in sorted(asked)
                 if 0 <= quotas[name] < used[name] + asked[name]]  # fmt: skip
        if overs:
            raise ApiError(403, model.quota_message(overs, asked, used, quotas))

    def _new_port(self, network: dict[str, Any], server_id: str) -> dict[str, Any] | None:
        subnet = self.subnets[network["subnets"][0]]
        taken = {ip["ip_address"] for port in self.ports.values() for ip in port["fixed_ips"]}
        _, pool = model.subnet_pool(subnet["cidr"])
        address = next((ip for ip in pool if ip not in taken), None)
        if address is None:
            return None
        port = model.port_doc(network["id"], subnet["id"], address, server_id)
        self.ports[port["id"]] = port
        return port

    def advance(self) -> None:
        """Move servers along now: BUILD to ACTIVE or ERROR, deleting to gone (every
        request does this first; call it, holding `lock`, before reading `servers`)."""
        now = time.monotonic()
        for server_id, doc in list(self.servers.items()):
            if doc["_gone_at"] is not None:
                if now >= doc["_gone_at"]:
                    self._remove_server(server_id)
            elif doc["status"] == "BUILD" and now >= doc["_ready_at"]:
                self._finish_build(doc, now)
            elif doc["status"] == "BUILD" and now >= doc["_spawn_at"]:
                doc["OS-EXT-STS:task_state"] = "spawning"

    def _finish_build(self, doc: dict[str, Any], now: float) -> None:
        doc.update({"updated": model.now_iso(), "OS-EXT-STS:task_state": None})
        if doc["_fault"]:
            fault = {"code": 500, "created": model.now_iso(), "message": doc["_fault"]}
            doc.update({"status": "ERROR", "OS-EXT-STS:vm_state": "error", "fault": fault})
            for port_id in doc["_ports"]:
                self.ports.pop(port_id, None)
            doc["_ports"] = []
            return
        host_id = hashlib.sha224(f"{model.PROJECT_ID}compute-1".encode()).hexdigest()
        launched = datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="microseconds")
        if self.hypervisor is not None and not booted(self.hypervisor, doc, self.ports):
            return
        doc.update({"status": "ACTIVE", "OS-EXT-STS:vm_state": "active", "hostId": host_id,
                    "OS-EXT-STS:power_state": 1, "OS-SRV-USG:launched_at": launched,
                    "OS-EXT-AZ:availability_zone": "nova", "_active_at": now})  # fmt: skip
        addresses: dict[str, list[dict[str, Any]]] = {}
        for port_id in doc["_ports"]:
            port = self.ports[port_id]
            port["status"] = "ACTIVE"
            network = self.networks[port["network_id"]]
            addresses.setdefault(network["name"], []).extend(
                {"version": 4, "addr": ip["ip_address"], "OS-EXT-IPS:type": "fixed",
                 "OS-EXT-IPS-MAC:mac_addr": port["mac_address"]}
                for ip in port["fixed_ips"])  # fmt: skip
        doc["addresses"] = addresses

    def _remove_server(self, server_id: str) -> None:
        if self.hypervisor is not None:
            self.hypervisor.destroy(server_id)
        doc = self.servers.pop(server_id, None)
        for port_id in doc["_ports"] if doc else []:
            self.ports.pop(port_id, None)

    def server(self, server_id: str) -> dict[str, Any]:
        doc = self.servers.get(server_id)
        if doc is None:
            raise ApiError(404, f"Instance {server_id} could not be found.")
        return doc

    def delete_server(self, server_id: str) -> None:
        doc = self.server(server_id)
        if self.delete_delay <= 0:
            self._remove_server(server_id)
        elif doc["_gone_at"] is None:
            doc.update({"OS-EXT-STS:task_state": "deleting", "updated": model.now_iso(),
                        "_gone_at": time.monotonic() + self.delete_delay})  # fmt: skip

    def console_output(self, server_id: str, length: Any) -> str:
        doc = self.server(server_id)
        state = doc["OS-EXT-STS:vm_state"]
        if state not in ("active", "stopped"):
            raise ApiError(409, f"Cannot 'get_console_output' instance {server_id} while it "
                                f"is in vm_state {state}")  # fmt: skip
        printed = time.monotonic() >= doc["_active_at"] + self.host_keys_delay
        text = model.console_log(model.hostname(doc["name"]), doc["_host_keys"], printed,
                                 doc["config_drive"] == "True")  # fmt: skip
        return model.tail(text, length)
