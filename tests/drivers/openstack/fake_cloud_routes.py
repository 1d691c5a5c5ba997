"""The fake cloud's HTTP routes (fake_cloud.py says what is emulated)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from tests.drivers.openstack.fake_cloud_model import (
    USER_ID,
    ApiError,
    compute_version,
    generate_keypair,
    identity_version,
    image_doc,
    image_versions,
    md5_fingerprint,
    network_versions,
    neutron_match,
    new_id,
    next_href,
    now_iso,
    paginate,
    render_flavor,
    render_limits,
    render_server,
)

if TYPE_CHECKING:
    from tests.drivers.openstack.fake_cloud import FakeCloud

COMPUTE = "/compute/v2.1"
KEYPAIR_NAME = re.compile(r"[a-zA-Z0-9 _.@-]{1,255}")


def add(app: FastAPI, fake: FakeCloud) -> None:
    _add_discovery(app, fake)
    _add_servers(app, fake)
    _add_flavors(app, fake)
    _add_keypairs(app, fake)
    _add_network(app, fake)
    _add_images(app, fake)


def _get_both(app: FastAPI, path: str, handler: Callable[[], Response]) -> None:
    """A discovery document, with and without the trailing slash (no redirects)."""
    app.add_api_route(path, handler, methods=["GET"])
    app.add_api_route(path + "/", handler, methods=["GET"])


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "Malformed request body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Malformed request body")
    return body


def _version(request: Request) -> tuple[int, int]:
    version: tuple[int, int] = request.state.version
    return version


def _add_discovery(app: FastAPI, fake: FakeCloud) -> None:
    def identity() -> Response:
        return JSONResponse({"versions": {"values": [identity_version(fake.url)]}}, 300)

    _get_both(app, "/identity", identity)
    _get_both(app, "/identity/v3", lambda: JSONResponse({"version": identity_version(fake.url)}))
    _get_both(app, "/compute", lambda: JSONResponse({"versions": [compute_version(fake.url)]}))
    _get_both(app, COMPUTE, lambda: JSONResponse({"version": compute_version(fake.url)}))
    _get_both(app, "/image", lambda: JSONResponse(image_versions(fake.url), 300))
    _get_both(app, "/network", lambda: JSONResponse(network_versions(fake.url)))

    @app.get("/network/v2.0/")
    @app.get("/network/v2.0")
    def network_resources() -> dict[str, Any]:
        return {"resources": [
            {"name": name, "collection": f"{name}s", "links": [
                {"rel": "self", "href": f"{fake.url}/network/v2.0/{name}s"}]}
            for name in ("network", "subnet", "port")]}  # fmt: skip

    @app.post("/identity/v3/auth/tokens")
    async def tokens(request: Request) -> Response:
        token, body = fake.issue_token(await _json(request))
        return JSONResponse(body, 201, headers={"X-Subject-Token": token})


# ------------------------------------------------------------------ Nova


def _server_page(fake: FakeCloud, request: Request, detail: bool) -> dict[str, Any]:
    params = dict(request.query_params)
    version = _version(request)
    with fake.lock:
        docs = list(reversed(fake.servers.values()))
        if "name" in params:
            try:
                pattern = re.compile(params["name"])
            except re.error:
                raise ApiError(400, f"Invalid filter name: {params['name']}") from None
            docs = [d for d in docs if pattern.search(d["name"])]
        if "status" in params:
            docs = [d for d in docs if d["status"] == params["status"].upper()]
        page = paginate(docs, params.get("limit"), params.get("marker"))
        servers = [render_server(d, version, fake.url) if detail
                   else {"id": d["id"], "name": d["name"], "links": d["links"]}
                   for d in page]  # fmt: skip
    body: dict[str, Any] = {"servers": servers}
    href = next_href(f"{fake.url}{request.url.path}", params, page)
    if href:
        body["servers_links"] = [{"rel": "next", "href": href}]
    return body


def _add_servers(app: FastAPI, fake: FakeCloud) -> None:
    @app.get(f"{COMPUTE}/servers")
    def servers(request: Request) -> dict[str, Any]:
        return _server_page(fake, request, detail=False)

    @app.get(f"{COMPUTE}/servers/detail")
    def servers_detail(request: Request) -> dict[str, Any]:
        return _server_page(fake, request, detail=True)

    @app.post(f"{COMPUTE}/servers")
    async def create_server(request: Request) -> Response:
        spec = (await _json(request)).get("server")
        if not isinstance(spec, dict):
            raise ApiError(400, "Invalid input for field/attribute server.")
        with fake.lock:
            doc = fake.create_server(spec, _version(request))
        body = {"id": doc["id"], "links": doc["links"], "OS-DCF:diskConfig": "MANUAL",
                "security_groups": [{"name": "default"}],
                "adminPass": doc["_admin_pass"]}  # fmt: skip
        location = doc["links"][0]["href"]
        return JSONResponse({"server": body}, 202, headers={"Location": location})

    @app.get(f"{COMPUTE}/servers/{{server_id}}")
    def show_server(request: Request, server_id: str) -> dict[str, Any]:
        with fake.lock:
            return {"server": render_server(fake.server(server_id), _version(request), fake.url)}

    @app.delete(f"{COMPUTE}/servers/{{server_id}}")
    def delete_server(server_id: str) -> Response:
        with fake.lock:
            fake.delete_server(server_id)
        return Response(status_code=204)

    @app.post(f"{COMPUTE}/servers/{{server_id}}/action")
    async def server_action(request: Request, server_id: str) -> dict[str, Any]:
        body = await _json(request)
        if "os-getConsoleOutput" not in body:
            with fake.lock:
                fake.server(server_id)
            raise ApiError(400, f"There is no such action: {', '.join(body) or '(none)'}")
        options = body["os-getConsoleOutput"] or {}
        with fake.lock:
            return {"output": fake.console_output(server_id, options.get("length"))}

    @app.get(f"{COMPUTE}/limits")
    def limits(request: Request) -> dict[str, Any]:
        with fake.lock:
            return render_limits(fake.quotas(), fake.usage(), _version(request))


def _flavor_page(fake: FakeCloud, request: Request, detail: bool) -> dict[str, Any]:
    params = dict(request.query_params)
    version = _version(request)
    with fake.lock:
        flavors = sorted(fake.flavors.values(), key=lambda f: str(f["id"]))
        if params.get("minRam", "").isdigit():
            flavors = [f for f in flavors if f["ram"] >= int(params["minRam"])]
        if params.get("minDisk", "").isdigit():
            flavors = [f for f in flavors if f["disk"] >= int(params["minDisk"])]
        page = paginate(flavors, params.get("limit"), params.get("marker"))
        docs = [render_flavor(f, version, fake.url) for f in page]
    if not detail:
        keep = {"id", "name", "links", "description"}
        docs = [{k: v for k, v in doc.items() if k in keep} for doc in docs]
    body: dict[str, Any] = {"flavors": docs}
    href = next_href(f"{fake.url}{request.url.path}", params, page)
    if href:
        body["flavors_links"] = [{"rel": "next", "href": href}]
    return body


def _add_flavors(app: FastAPI, fake: FakeCloud) -> None:
    @app.get(f"{COMPUTE}/flavors")
    def flavors(request: Request) -> dict[str, Any]:
        return _flavor_page(fake, request, detail=False)

    @app.get(f"{COMPUTE}/flavors/detail")
    def flavors_detail(request: Request) -> dict[str, Any]:
        return _flavor_page(fake, request, detail=True)

    def flavor(flavor_id: str) -> dict[str, Any]:
        with fake.lock:
            found = fake.flavors.get(flavor_id)
        if found is None:
            raise ApiError(404, f"Flavor {flavor_id} could not be found.")
        return found

    @app.get(f"{COMPUTE}/flavors/{{flavor_id}}")
    def show_flavor(request: Request, flavor_id: str) -> dict[str, Any]:
        return {"flavor": render_flavor(flavor(flavor_id), _version(request), fake.url)}

    @app.get(f"{COMPUTE}/flavors/{{flavor_id}}/os-extra_specs")
    def extra_specs(flavor_id: str) -> dict[str, Any]:
        return {"extra_specs": dict(flavor(flavor_id)["extra_specs"])}


def _keypair_view(keypair: dict[str, Any], version: tuple[int, int]) -> dict[str, Any]:
    view = {k: keypair[k] for k in ("name", "public_key", "fingerprint")}
    if version >= (2, 2):
        view["type"] = keypair["type"]
    return view


def _new_keypair(spec: dict[str, Any], version: tuple[int, int]) -> dict[str, Any]:
    name = spec.get("name")
    if not isinstance(name, str) or not KEYPAIR_NAME.fullmatch(name) or not name.strip():
        raise ApiError(400, "Keypair data is invalid: Keypair name contains unsafe characters")
    keypair = {"name": name, "type": spec.get("type", "ssh") if version >= (2, 2) else "ssh",
               "user_id": USER_ID, "created_at": now_iso(), "updated_at": None,
               "deleted": False, "deleted_at": None}  # fmt: skip
    public_key = spec.get("public_key")
    if public_key is None:
        keypair["public_key"], keypair["private_key"] = generate_keypair()
    else:
        keypair["public_key"] = str(public_key).strip()
    try:
        keypair["fingerprint"] = md5_fingerprint(str(keypair["public_key"]))
    except ValueError:
        raise ApiError(400, "Keypair data is invalid: failed to generate fingerprint") from None
    return keypair


def _add_keypairs(app: FastAPI, fake: FakeCloud) -> None:
    @app.get(f"{COMPUTE}/os-keypairs")
    def keypairs(request: Request) -> dict[str, Any]:
        params, version = dict(request.query_params), _version(request)
        with fake.lock:
            found = sorted(fake.keypairs.values(), key=lambda k: str(k["name"]))
        if version >= (2, 35):
            found = paginate(found, params.get("limit"), params.get("marker"), key="name")
        body: dict[str, Any] = {"keypairs": [{"keypair": _keypair_view(k, version)}
                                             for k in found]}  # fmt: skip
        href = next_href(f"{fake.url}{request.url.path}", params, found, key="name")
        if href and version >= (2, 35):
            body["keypairs_links"] = [{"rel": "next", "href": href}]
        return body

    @app.post(f"{COMPUTE}/os-keypairs")
    async def create_keypair(request: Request) -> Response:
        spec = (await _json(request)).get("keypair")
        if not isinstance(spec, dict):
            raise ApiError(400, "Invalid input for field/attribute keypair.")
        version = _version(request)
        keypair = _new_keypair(spec, version)
        with fake.lock:
            if keypair["name"] in fake.keypairs:
                raise ApiError(409, f"Key pair '{keypair['name']}' already exists.")
            keypair["id"] = len(fake.keypairs) + 1
            fake.keypairs[keypair["name"]] = keypair
        body = {**_keypair_view(keypair, version), "user_id": USER_ID}
        if "private_key" in keypair:
            body["private_key"] = keypair.pop("private_key")
        return JSONResponse({"keypair": body}, 201 if version >= (2, 2) else 200)

    def keypair(name: str) -> dict[str, Any]:
        found = fake.keypairs.get(name)
        if found is None:
            raise ApiError(404, f"Keypair {name} not found for user {USER_ID}")
        return found

    @app.get(f"{COMPUTE}/os-keypairs/{{name}}")
    def show_keypair(request: Request, name: str) -> dict[str, Any]:
        with fake.lock:
            found = keypair(name)
        fields = ("user_id", "id", "created_at", "updated_at", "deleted", "deleted_at")
        return {"keypair": {**_keypair_view(found, _version(request)),
                            **{k: found[k] for k in fields}}}  # fmt: skip

    @app.delete(f"{COMPUTE}/os-keypairs/{{name}}")
    def delete_keypair(request: Request, name: str) -> Response:
        with fake.lock:
            del fake.keypairs[keypair(name)["name"]]
        return Response(status_code=204 if _version(request) >= (2, 2) else 202)


# --------------------------------------------------------------- Neutron

NEUTRON_PARAMS = {"limit", "marker", "fields", "sort_key", "sort_dir", "page_reverse"}


def _add_network(app: FastAPI, fake: FakeCloud) -> None:
    stores = {"networks": ("Network", fake.networks), "subnets": ("Subnet", fake.subnets),
              "ports": ("Port", fake.ports)}  # fmt: skip

    def select(doc: dict[str, Any], fields: list[str]) -> dict[str, Any]:
        return {k: v for k, v in doc.items() if k in fields} if fields else dict(doc)

    def listing(collection: str) -> Callable[[Request], dict[str, Any]]:
        def handler(request: Request) -> dict[str, Any]:
            params = dict(request.query_params)
            filters: dict[str, list[str]] = {}
            for key, value in request.query_params.multi_items():
                if key not in NEUTRON_PARAMS:
                    filters.setdefault(key, []).append(value)
            fields = request.query_params.getlist("fields")
            with fake.lock:
                found = [d for d in stores[collection][1].values() if neutron_match(d, filters)]
                page = paginate(found, params.get("limit"), params.get("marker"))
                body: dict[str, Any] = {collection: [select(d, fields) for d in page]}
            href = next_href(f"{fake.url}{request.url.path}", params, page)
            if href:
                body[f"{collection}_links"] = [{"rel": "next", "href": href}]
            return body

        return handler

    def showing(collection: str) -> Callable[[Request, str], dict[str, Any]]:
        kind, store = stores[collection]

        def handler(request: Request, item_id: str) -> dict[str, Any]:
            with fake.lock:
                doc = store.get(item_id)
                if doc is None:
                    raise ApiError(404, f"{kind} {item_id} could not be found.",
                                   f"{kind}NotFound")  # fmt: skip
                return {kind.lower(): select(doc, request.query_params.getlist("fields"))}

        return handler

    for collection in stores:
        app.add_api_route(f"/network/v2.0/{collection}", listing(collection), methods=["GET"])
        app.add_api_route(f"/network/v2.0/{collection}/{{item_id}}", showing(collection),
                          methods=["GET"])  # fmt: skip


# ---------------------------------------------------------------- Glance

IMAGES = "/image/v2/images"
READ_ONLY_IMAGE = {"checksum", "created_at", "direct_url", "file", "os_hash_algo",
                   "os_hash_value", "schema", "self", "size", "status", "updated_at",
                   "virtual_size", "locations"}  # fmt: skip
DISK_FORMATS = {"ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop"}


def glance_create(fake: FakeCloud, spec: dict[str, Any]) -> dict[str, Any]:
    read_only = sorted(READ_ONLY_IMAGE & spec.keys())
    if read_only:
        raise ApiError(403, f"Attribute '{read_only[0]}' is read-only.")
    if spec.get("disk_format") not in (None, *DISK_FORMATS):
        raise ApiError(400, f"Invalid value '{spec['disk_format']}' for parameter "
                            "'disk_format'")  # fmt: skip
    image_id = str(spec.get("id") or new_id())
    if image_id in fake.images:
        raise ApiError(409, f"Image with identifier {image_id} already exists!")
    image = fake.images[image_id] = image_doc(spec, image_id)
    return image


def glance_image(fake: FakeCloud, image_id: str) -> dict[str, Any]:
    image = fake.images.get(image_id)
    if image is None:
        raise ApiError(404, f"No image found with ID {image_id}")
    return image


def glance_upload(fake: FakeCloud, image_id: str, data: bytes) -> dict[str, Any]:
    image = glance_image(fake, image_id)
    if image["status"] != "queued":
        raise ApiError(409, f"Image status transition from {image['status']} to saving is "
                            "not allowed")  # fmt: skip
    if fake.corrupt_uploads and data:
        data = bytes([data[0] ^ 0xFF]) + data[1:]
    fake.image_data[image_id] = data
    image.update({"status": "active", "size": len(data), "updated_at": now_iso(),
                  "checksum": hashlib.md5(data).hexdigest(), "os_hash_algo": "sha512",
                  "os_hash_value": hashlib.sha512(data).hexdigest()})  # fmt: skip
    return image


def glance_delete(fake: FakeCloud, image_id: str) -> None:
    image = fake.images.get(image_id)
    if image is None:
        raise ApiError(404, f"Failed to find image {image_id} to delete")
    if image["protected"]:
        raise ApiError(403, f"Image {image_id} is protected and cannot be deleted.")
    del fake.images[image_id]
    fake.image_data.pop(image_id, None)


def _image_page(fake: FakeCloud, request: Request) -> dict[str, Any]:
    params = dict(request.query_params)
    with fake.lock:
        found = [dict(image) for image in reversed(fake.images.values())
                 if all(str(image.get(k)) == params[k] for k in ("name", "status", "visibility")
                        if k in params)]  # fmt: skip
    limit = params.get("limit", "25")
    page = paginate(found, limit, params.get("marker"), default=25)
    body: dict[str, Any] = {"images": page, "first": "/v2/images", "schema": "/v2/schemas/images"}
    if page and limit.isdigit() and len(page) == int(limit):
        query = {k: v for k, v in params.items() if k != "marker"}
        body["next"] = "/v2/images?" + urlencode({**query, "marker": page[-1]["id"]})
    return body


def _add_images(app: FastAPI, fake: FakeCloud) -> None:
    @app.get(IMAGES)
    def images(request: Request) -> dict[str, Any]:
        return _image_page(fake, request)

    @app.post(IMAGES)
    async def create_image(request: Request) -> Response:
        spec = await _json(request)
        with fake.lock:
            image = dict(glance_create(fake, spec))
        return JSONResponse(image, 201, headers={"Location": f"{fake.url}/image{image['self']}"})

    @app.get(f"{IMAGES}/{{image_id}}")
    def show_image(image_id: str) -> dict[str, Any]:
        with fake.lock:
            return dict(glance_image(fake, image_id))

    @app.put(f"{IMAGES}/{{image_id}}/file")
    async def upload(request: Request, image_id: str) -> Response:
        data = await request.body()
        with fake.lock:
            glance_upload(fake, image_id, data)
        return Response(status_code=204)

    @app.get(f"{IMAGES}/{{image_id}}/file")
    def download(image_id: str) -> Response:
        with fake.lock:
            image = glance_image(fake, image_id)
            data = fake.image_data.get(image_id)
        if data is None:
            return Response(status_code=204)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-MD5": str(image["checksum"])})  # fmt: skip

    @app.delete(f"{IMAGES}/{{image_id}}")
    def delete_image(image_id: str) -> Response:
        with fake.lock:
            glance_delete(fake, image_id)
        return Response(status_code=204)
