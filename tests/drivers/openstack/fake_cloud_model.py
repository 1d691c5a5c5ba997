"""The fake cloud's documents: version discovery, the catalog, Nova's, Neutron's and
Glance's resource bodies and error bodies, SSH keys and the console log
(fake_cloud.py says what is emulated)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

REGION = "RegionOne"
DOMAIN = {"id": "default", "name": "Default"}
PROJECT_ID = "8d2c5c1b6e8a4c0f9b3e1f7a2d4c6b80"
USER_ID = "3f9a1c7e5b2d4a6c8e0f1a3b5c7d9e10"
MIN_VERSION = (2, 1)
MAX_VERSION = (2, 79)
NO_VALID_HOST = "No valid host was found. There are not enough hosts available."
# Nova's default quotas (nova.conf [quota]), -1 meaning unlimited.
DEFAULT_QUOTAS = {"instances": 10, "cores": 20, "ram": 51200}
# Devstack's flavors: (id, name, vcpus, ram MiB, disk GiB).
DEFAULT_FLAVORS = [
    ("1", "m1.tiny", 1, 512, 1),
    ("2", "m1.small", 1, 2048, 20),
    ("3", "m1.medium", 2, 4096, 40),
    ("4", "m1.large", 4, 8192, 80),
    ("5", "m1.xlarge", 8, 16384, 160),
]


class ApiError(Exception):
    """An error answer; the exception handler words it the way the service does."""

    def __init__(self, status: int, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_id() -> str:
    return str(uuid.uuid4())


# ------------------------------------------------------------------ errors

NOVA_ERROR_KEYS = {400: "badRequest", 401: "unauthorized", 403: "forbidden", 404: "itemNotFound",
                   406: "notAcceptable", 409: "conflictingRequest", 413: "overLimit"}  # fmt: skip
TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
          406: "Not Acceptable", 409: "Conflict", 413: "Request Entity Too Large"}  # fmt: skip


def error_body(path: str, error: ApiError) -> dict[str, Any]:
    """The error document of the service that owns `path`."""
    status, message = error.status, error.message
    title = TITLES.get(status, "Error")
    if path.startswith("/compute"):
        key = NOVA_ERROR_KEYS.get(status, "computeFault")
        return {key: {"code": status, "message": message}}
    if path.startswith("/network"):
        return {"NeutronError": {"type": error.kind or "HTTPError", "message": message,
                                 "detail": ""}}  # fmt: skip
    if path.startswith("/image"):
        return {"code": f"{status} {title}", "title": title, "message": message}
    return {"error": {"code": status, "title": title, "message": message}}


# -------------------------------------------------------- version discovery


def identity_version(base: str) -> dict[str, Any]:
    return {"id": "v3.14", "status": "stable", "updated": "2020-04-07T00:00:00Z",
            "links": [{"rel": "self", "href": f"{base}/identity/v3/"}],
            "media-types": [{"base": "application/json",
                             "type": "application/vnd.openstack.identity-v3+json"}]}  # fmt: skip


def version_text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def compute_version(base: str) -> dict[str, Any]:
    media = "application/vnd.openstack.compute+json;version=2.1"
    return {"id": "v2.1", "status": "CURRENT", "updated": "2013-07-23T11:33:21Z",
            "version": version_text(MAX_VERSION), "min_version": version_text(MIN_VERSION),
            "links": [{"rel": "self", "href": f"{base}/compute/v2.1/"}],
            "media-types": [{"base": "application/json", "type": media}]}  # fmt: skip


def image_versions(base: str) -> dict[str, Any]:
    """Glance 2.0 to 2.9; as Glance does, all of them at the same /v2/ address."""
    versions = [{"id": f"v2.{minor}", "status": "CURRENT" if minor == 9 else "SUPPORTED",
                 "links": [{"rel": "self", "href": f"{base}/image/v2/"}]}
                for minor in range(9, -1, -1)]  # fmt: skip
    return {"versions": versions}


def network_versions(base: str) -> dict[str, Any]:
    self_link = {"rel": "self", "href": f"{base}/network/v2.0/"}
    return {"versions": [{"id": "v2.0", "status": "CURRENT", "links": [self_link]}]}


def catalog(base: str) -> list[dict[str, Any]]:
    services = [("identity", "keystone", f"{base}/identity"),
                ("compute", "nova", f"{base}/compute/v2.1"),
                ("image", "glance", f"{base}/image"),
                ("network", "neutron", f"{base}/network")]  # fmt: skip
    return [{"id": uuid.uuid5(uuid.NAMESPACE_URL, url).hex, "type": kind, "name": name,
             "endpoints": [{"id": uuid.uuid5(uuid.NAMESPACE_URL, url + interface).hex,
                            "interface": interface, "region": REGION, "region_id": REGION,
                            "url": url} for interface in ("public", "internal")]}
            for kind, name, url in services]  # fmt: skip


# ------------------------------------------------------------- microversions


def requested_version(headers: Mapping[str, str]) -> str | None:
    """The compute microversion a request asks for, from either of Nova's headers."""
    for part in headers.get("openstack-api-version", "").split(","):
        service, _, version = part.strip().partition(" ")
        if service.lower() == "compute" and version.strip():
            return version.strip()
    legacy = headers.get("x-openstack-nova-api-version", "").strip()
    return legacy or None


def negotiate(requested: str | None) -> tuple[int, int]:
    """The microversion to answer with; ApiError 400/406 as Nova words them."""
    if requested is None:
        return MIN_VERSION
    if requested.lower() == "latest":
        return MAX_VERSION
    match = re.fullmatch(r"(\d+)\.(\d+)", requested)
    if match is None:
        raise ApiError(400, f"API Version String {requested} is of invalid format. "
                            "Must be of format MajorNum.MinorNum.")  # fmt: skip
    version = (int(match[1]), int(match[2]))
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise ApiError(406, f"Version {requested} is not supported by the API. Minimum is "
                            f"{version_text(MIN_VERSION)} and maximum is "
                            f"{version_text(MAX_VERSION)}.")  # fmt: skip
    return version


# ------------------------------------------------------------------- paging


def paginate(items: list[dict[str, Any]], limit: str | None, marker: str | None,
             default: int = 1000, key: str = "id") -> list[dict[str, Any]]:  # fmt: skip
    """The page after `marker` of at most `limit` items (Nova's and Glance's rules)."""
    if marker:
        index = next((i for i, item in enumerate(items) if item[key] == marker), None)
        if index is None:
            raise ApiError(400, f"marker [{marker}] not found", "MarkerNotFound")
        items = items[index + 1 :]
    count = default
    if limit is not None:
        if not limit.isdigit():
            raise ApiError(400, "limit param must be an integer", "BadRequest")
        count = min(int(limit), 1000)
    return items[:count]


def next_href(url: str, params: Mapping[str, str], page: list[dict[str, Any]],
              key: str = "id") -> str | None:  # fmt: skip
    """The next page's address, given when a page is as long as its limit (as Nova does)."""
    limit = params.get("limit")
    if not page or limit is None or not limit.isdigit() or len(page) != int(limit):
        return None
    query = {k: v for k, v in params.items() if k != "marker"}
    query["marker"] = str(page[-1][key])
    return f"{url}?{urlencode(query)}"


# ---------------------------------------------------------------------- Nova

SINCE = {"locked": (2, 9), "description": (2, 19), "tags": (2, 26),
         "trusted_image_certificates": (2, 63), "server_groups": (2, 71),
         "locked_reason": (2, 73)}  # fmt: skip


def render_server(doc: dict[str, Any], version: tuple[int, int], base: str) -> dict[str, Any]:
    """A server as Nova shows it at `version` (the stored doc is the newest form)."""
    out = {k: v for k, v in doc.items() if not k.startswith("_")}
    for key, since in SINCE.items():
        if version < since:
            out.pop(key, None)
    if version < (2, 47):
        flavor_id = doc["_flavor_id"]
        out["flavor"] = {"id": flavor_id, "links": [
            {"rel": "bookmark", "href": f"{base}/compute/flavors/{flavor_id}"}]}  # fmt: skip
    copied: dict[str, Any] = _copy(out)
    return copied


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def links(base: str, kind: str, ident: str) -> list[dict[str, str]]:
    return [{"rel": "self", "href": f"{base}/compute/v2.1/{kind}/{ident}"},
            {"rel": "bookmark", "href": f"{base}/compute/{kind}/{ident}"}]  # fmt: skip


def embedded_flavor(flavor: dict[str, Any]) -> dict[str, Any]:
    """The flavor inside a server from microversion 2.47 on."""
    return {"vcpus": flavor["vcpus"], "ram": flavor["ram"], "disk": flavor["disk"],
            "ephemeral": flavor["ephemeral"], "swap": flavor["swap"],
            "original_name": flavor["name"],
            "extra_specs": dict(flavor["extra_specs"])}  # fmt: skip


def render_flavor(flavor: dict[str, Any], version: tuple[int, int], base: str) -> dict[str, Any]:
    swap: int | str = flavor["swap"] if flavor["swap"] or version >= (2, 75) else ""
    out: dict[str, Any] = {
        "id": flavor["id"], "name": flavor["name"], "vcpus": flavor["vcpus"],
        "ram": flavor["ram"], "disk": flavor["disk"], "swap": swap,
        "OS-FLV-EXT-DATA:ephemeral": flavor["ephemeral"], "OS-FLV-DISABLED:disabled": False,
        "os-flavor-access:is_public": True, "rxtx_factor": 1.0,
        "links": links(base, "flavors", flavor["id"]),
    }  # fmt: skip
    if version >= (2, 55):
        out["description"] = flavor.get("description")
    if version >= (2, 61):
        out["extra_specs"] = dict(flavor["extra_specs"])
    return out


def render_limits(quotas: Mapping[str, int], used: Mapping[str, int],
                  version: tuple[int, int]) -> dict[str, Any]:  # fmt: skip
    """`GET /limits` with the fields each microversion range has."""
    absolute: dict[str, int] = {
        "maxTotalInstances": quotas["instances"], "maxTotalCores": quotas["cores"],
        "maxTotalRAMSize": quotas["ram"], "maxServerMeta": 128, "maxTotalKeypairs": 100,
        "maxServerGroups": 10, "maxServerGroupMembers": 10,
        "totalInstancesUsed": used["instances"], "totalCoresUsed": used["cores"],
        "totalRAMUsed": used["ram"], "totalServerGroupsUsed": 0,
    }  # fmt: skip
    if version < (2, 57):
        absolute.update(maxPersonality=5, maxPersonalitySize=10240)
    if version < (2, 39):
        absolute["maxImageMeta"] = 128
    if version < (2, 36):
        absolute.update(maxSecurityGroups=10, maxSecurityGroupRules=20, maxTotalFloatingIps=10,
                        totalFloatingIpsUsed=0, totalSecurityGroupsUsed=0)  # fmt: skip
    return {"limits": {"absolute": absolute, "rate": []}}


def quota_message(overs: list[str], requested: Mapping[str, int], used: Mapping[str, int],
                  quotas: Mapping[str, int]) -> str:  # fmt: skip
    """nova.exception.TooManyInstances' words, numbers given for the first resource over."""
    first = overs[0]
    return (f"Quota exceeded for {', '.join(overs)}: Requested {requested[first]}, but already "
            f"used {used[first]} of {quotas[first]} {first}")  # fmt: skip


def hostname(name: str) -> str:
    """Nova's sanitising of a display name into a hostname."""
    host = re.sub(r"[^a-z0-9.-]+", "-", name.lower().replace("_", "-")).strip("-.")
    return host[:63] or "server"


# ---------------------------------------------------------------- SSH keys


def _openssh(key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode()  # fmt: skip


def make_host_keys() -> list[str]:
    """A server's SSH host public keys (ECDSA and Ed25519), without comments."""
    ecdsa = ec.generate_private_key(ec.SECP256R1()).public_key()
    return [_openssh(ecdsa), _openssh(ed25519.Ed25519PrivateKey.generate().public_key())]


def _key_blob(public_key: str) -> tuple[str, bytes]:
    parts = public_key.strip().split()
    if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-")):
        raise ValueError("not an OpenSSH public key")
    try:
        return parts[0], base64.b64decode(parts[1], validate=True)
    except binascii.Error as e:
        raise ValueError("not base64") from e


def md5_fingerprint(public_key: str) -> str:
    """Nova's keypair fingerprint: MD5 of the key blob, colon-separated hex."""
    digest = hashlib.md5(_key_blob(public_key)[1]).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def sha256_fingerprint(public_key: str) -> str:
    digest = hashlib.sha256(_key_blob(public_key)[1]).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def generate_keypair() -> tuple[str, str]:
    """A keypair Nova generates when given no public key: (public, private PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption()).decode()  # fmt: skip
    return _openssh(key.public_key()) + " Generated-by-Nova", private


def console_log(host: str, host_keys: list[str], keys_printed: bool, config_drive: bool) -> str:
    """A boot log ending with cloud-init's host key blocks once they are printed."""
    lines = ["[    0.000000] Linux version 6.1.0-18-cloud-amd64 (debian-kernel@lists.debian.org)",
             "[    0.000000] Command line: BOOT_IMAGE=/boot/vmlinuz root=LABEL=cloudimg-rootfs",
             "[    2.113214] EXT4-fs (vda1): mounted filesystem with ordered data mode.",
             f"Cloud-init v. 23.1.1 running 'init' at {now_iso()}. Up 4.21 seconds.",
             "ci-info: ++++++++++++++++++++++Net device info+++++++++++++++++++++++"]  # fmt: skip
    if not keys_printed:
        return "\n".join(lines) + "\n"
    kinds = {"ecdsa-sha2-nistp256": (256, "ECDSA"), "ssh-ed25519": (256, "ED25519")}
    rule = "ec2: " + "#" * 61
    lines += [rule, "ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----"]
    for key in host_keys:
        bits, kind = kinds.get(key.split()[0], (0, "UNKNOWN"))
        lines.append(f"ec2: {bits} {sha256_fingerprint(key)} root@{host} ({kind})")
    lines += ["ec2: -----END SSH HOST KEY FINGERPRINTS-----", rule,
              "-----BEGIN SSH HOST KEY KEYS-----", *[f"{key} root@{host}" for key in host_keys],
              "-----END SSH HOST KEY KEYS-----",
              f"Cloud-init v. 23.1.1 finished at {now_iso()}. Datasource DataSource"
              f"{'ConfigDrive' if config_drive else 'OpenStackLocal'}."
              "  Up 9.87 seconds"]  # fmt: skip
    return "\n".join(lines) + "\n"


def tail(text: str, length: Any) -> str:
    """The last `length` lines, as os-getConsoleOutput gives them (-1 or none: all)."""
    if length is None or str(length) == "-1":
        return text
    if not str(length).isdigit():
        raise ApiError(400, f"Invalid input for field/attribute length. Value: {length}.")
    lines = text.splitlines(keepends=True)
    return "".join(lines[len(lines) - int(length) :]) if int(length) else ""


def decode_user_data(value: Any) -> bytes | None:
    if value is None:
        return None
    try:
        if not isinstance(value, str) or len(value) > 65535:
            raise ValueError
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise ApiError(400, "Invalid input for field/attribute user_data. Value: "
                            f"{str(value)[:40]}. It is not a 'base64'") from None  # fmt: skip


# ------------------------------------------------------------------- Neutron


def subnet_pool(cidr: str) -> tuple[str, list[str]]:
    """A subnet's gateway and the addresses ports get, lowest first."""
    hosts = [str(ip) for ip in ipaddress.ip_network(cidr).hosts()]
    return hosts[0], hosts[1:]


def neutron_match(doc: Mapping[str, Any], filters: Mapping[str, list[str]]) -> bool:
    """Neutron's list filters: each attribute equal to one of the values given."""
    for key, wanted in filters.items():
        value = doc.get(key)
        if isinstance(value, (list, dict)):
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if text not in [w.lower() if isinstance(value, bool) else w for w in wanted]:
            return False
    return True


# ----------------------------------------------------------- resource bodies


def _stamps() -> dict[str, Any]:
    stamp = now_iso()
    return {"tenant_id": PROJECT_ID, "project_id": PROJECT_ID, "created_at": stamp,
            "updated_at": stamp, "revision_number": 1, "description": "", "tags": []}  # fmt: skip


def network_docs(name: str, cidr: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Neutron network and its one IPv4 subnet."""
    network_id, subnet_id = new_id(), new_id()
    gateway, pool = subnet_pool(cidr)
    network = {"id": network_id, "name": name, "status": "ACTIVE", "subnets": [subnet_id],
               "admin_state_up": True, "shared": False, "mtu": 1450,
               "router:external": False, "port_security_enabled": True,
               "availability_zones": ["nova"], "is_default": False, **_stamps()}  # fmt: skip
    subnet = {"id": subnet_id, "name": f"{name}-subnet", "network_id": network_id,
              "ip_version": 4, "cidr": cidr, "gateway_ip": gateway, "enable_dhcp": True,
              "allocation_pools": [{"start": pool[0], "end": pool[-1]}],
              "dns_nameservers": [], "host_routes": [], "subnetpool_id": None,
              **_stamps()}  # fmt: skip
    return network, subnet


def port_doc(network_id: str, subnet_id: str, address: str, server_id: str) -> dict[str, Any]:
    mac = "fa:16:3e:" + ":".join(f"{b:02x}" for b in uuid.uuid4().bytes[:3])
    return {"id": new_id(), "name": "", "network_id": network_id, "mac_address": mac,
            "fixed_ips": [{"subnet_id": subnet_id, "ip_address": address}],
            "device_id": server_id, "device_owner": "compute:nova", "status": "DOWN",
            "admin_state_up": True, "security_groups": [], "binding:vnic_type": "normal",
            **_stamps()}  # fmt: skip


def server_doc(base: str, spec: Mapping[str, Any], flavor: dict[str, Any],
               image: dict[str, Any], volumes: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """A new server in BUILD, in the newest microversion's form, plus the fake's own keys."""
    server_id, stamp = new_id(), now_iso()
    bookmark = {"rel": "bookmark", "href": f"{base}/compute/images/{image['id']}"}
    image_ref = "" if volumes else {"id": image["id"], "links": [bookmark]}
    drive = spec.get("config_drive") in (True, "True", "true", "1", 1)
    return {
        "id": server_id, "name": spec["name"], "status": "BUILD", "tenant_id": PROJECT_ID,
        "user_id": USER_ID, "hostId": "", "image": image_ref,
        "flavor": embedded_flavor(flavor), "created": stamp, "updated": stamp,
        "addresses": {}, "accessIPv4": "", "accessIPv6": "",
        "links": links(base, "servers", server_id), "OS-DCF:diskConfig": "MANUAL",
        "progress": 0, "OS-EXT-STS:task_state": "scheduling",
        "OS-EXT-STS:vm_state": "building", "OS-EXT-STS:power_state": 0,
        "OS-EXT-AZ:availability_zone": "", "OS-SRV-USG:launched_at": None,
        "OS-SRV-USG:terminated_at": None, "security_groups": [{"name": "default"}],
        "os-extended-volumes:volumes_attached": volumes, "locked": False,
        "locked_reason": None, "description": spec.get("description"), "tags": [],
        "trusted_image_certificates": None, "server_groups": [],
        "config_drive": "True" if drive else "", "metadata": {}, "key_name": None,
        "_flavor_id": flavor["id"], "_host_keys": make_host_keys(), "_ports": [],
        "_fault": None, "_spawn_at": 0.0, "_ready_at": 0.0, "_active_at": None,
        "_gone_at": None, "_admin_pass": uuid.uuid4().hex[:12], "_user_data": None,
    }  # fmt: skip


def image_doc(spec: Mapping[str, Any], image_id: str) -> dict[str, Any]:
    """A new, queued Glance image: its defaults, then what was asked for."""
    stamp = now_iso()
    return {"name": None, "disk_format": None, "container_format": None,
            "visibility": "shared", "protected": False, "os_hidden": False, "tags": [],
            "min_disk": 0, "min_ram": 0, **spec, "id": image_id, "status": "queued",
            "checksum": None, "os_hash_algo": None, "os_hash_value": None, "size": None,
            "virtual_size": None, "owner": PROJECT_ID, "created_at": stamp,
            "updated_at": stamp, "self": f"/v2/images/{image_id}",
            "file": f"/v2/images/{image_id}/file", "schema": "/v2/schemas/image"}  # fmt: skip


def token_doc(base: str, username: str, project_name: str) -> dict[str, Any]:
    """Keystone's project-scoped token body, valid an hour."""
    issued = datetime.now(UTC)
    expires = datetime.fromtimestamp(issued.timestamp() + 3600, UTC)

    def iso(moment: datetime) -> str:
        return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")

    return {"token": {
        "methods": ["password"], "audit_ids": [uuid.uuid4().hex[:22]],
        "issued_at": iso(issued), "expires_at": iso(expires), "is_domain": False,
        "user": {"id": USER_ID, "name": username, "domain": DOMAIN,
                 "password_expires_at": None},
        "project": {"id": PROJECT_ID, "name": project_name, "domain": DOMAIN},
        "roles": [{"id": "9fe2ff9ee4384b1894a90878d3e92bab", "name": "member"},
                  {"id": "4a8b9b1e2b6f4d6b8c1d2e3f4a5b6c7d", "name": "reader"}],
        "catalog": catalog(base),
    }}  # fmt: skip
