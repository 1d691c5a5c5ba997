"""`freshpool import nodepool`: a Nodepool config (nodepool.yaml) as a freshpool one.

What maps: labels (min-ready, max-ready-age); OpenStack and AWS providers, one
freshpool provider per pool (max-servers, max-cores, max-ram, rate, boot-timeout,
networks, flavors by name or min-ram, cloud images, boot from volume, metadata,
subnets, security groups, instance types, spot, tags); diskimages as image
pipelines (Debian releases, packages, environment, rebuild-age, parents).

What does not is kept as a TODO naming the nodepool.yaml line it came from, at the
top of the output: elements with no freshpool equivalent, drivers freshpool lacks,
key names (freshpool gives each node its own key), and images Nodepool built and
uploaded itself (freshpool does not upload builds to clouds yet).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from io import StringIO
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from freshpool.config.base import NAME_PATTERN

# diskimage-builder elements that only make a bootable cloud disk, which freshpool's
# own image build (debootstrap, then its drivers) does without.
_NOT_NEEDED = {"vm", "simple-init", "growroot", "block-device-mbr", "block-device-efi",
               "block-device-gpt", "bootloader", "cloud-init-datasources", "dhcp-all-interfaces",
               "openssh-server", "initialize-urandom", "nodepool-base", "infra-package-needs",
               "disable-nouveau", "enable-serial-console", "pip-and-virtualenv"}  # fmt: skip
_DEBIAN_BASES = {"debian", "debian-minimal"}
_DEBIAN_RELEASES = {"bullseye", "bookworm", "trixie", "sid"}


@dataclass
class Imported:
    config: dict[str, Any]
    todos: list[str] = field(default_factory=list)
    # Each label's image in Nodepool (its cloud-image or diskimage), from its pools.
    sources: dict[str, str] = field(default_factory=dict)

    def todo(self, node: Any, key: str | None, what: str) -> None:
        self.todos.append(f"nodepool.yaml:{_line(node, key)}: {what}")

    def text(self) -> str:
        out = StringIO()
        yaml = YAML()
        yaml.default_flow_style = False
        yaml.dump(self.config, out)
        head = "# Imported from nodepool.yaml by `freshpool import nodepool`.\n"
        if self.todos:
            head += "# TODO: what did not map, with the nodepool.yaml line it came from:\n"
            ordered = sorted(self.todos, key=lambda t: int(t.split(":")[1]))
            head += "".join(f"#   {t}\n" for t in ordered)
        return head + out.getvalue()


def convert(text: str) -> Imported:
    """The freshpool config for the Nodepool config `text`."""
    tree = YAML().load(text) or CommentedMap()
    if not isinstance(tree, dict):
        kind = type(tree).__name__
        raise ValueError(f"its top level is a {kind}, not the mapping of sections (labels, "
                         "providers, diskimages) a Nodepool config is")  # fmt: skip
    result = Imported({"providers": [], "labels": [], "images": []})
    images = _diskimages(tree.get("diskimages") or [], result)
    cloud_images: dict[str, Any] = {}
    for provider in tree.get("providers") or []:
        _provider(provider, result, cloud_images)
    for name in sorted(set(cloud_images) - images):
        # Every label names a freshpool image; a cloud's own image stands for none.
        result.config["images"].append({"name": _name(name)})
        what = f"image {_name(name)}: a placeholder pipeline for cloud image {name}, which"
        result.todo(cloud_images[name], None, f"{what} the cloud providers boot instead")
    for label in tree.get("labels") or []:
        _label(label, result, images | set(cloud_images))
    return result


def _label(label: Any, result: Imported, images: set[str]) -> None:
    name = label["name"]
    source = result.sources.get(name)
    out: dict[str, Any] = {"name": _name(name), "image": _name(source or name),
                           "min-ready": int(label.get("min-ready", 0))}  # fmt: skip
    if "max-ready-age" in label:
        out["max-ready-age"] = int(label["max-ready-age"])
    if source is None:
        result.todo(label, None, f"label {name}: no provider pool serves it")
        if name not in images:
            result.config["images"].append({"name": _name(name)})
    result.config["labels"].append(out)


def _provider(provider: Any, result: Imported, cloud_images: dict[str, Any]) -> None:
    driver = provider.get("driver", "openstack")
    if driver not in ("openstack", "aws"):
        what = f"provider {provider['name']}: freshpool has no {driver} driver"
        result.todo(provider, None, what)
        return
    pools = provider.get("pools") or []
    named_images = {i["name"]: i for i in provider.get("cloud-images") or []}
    for pool in pools:
        name = provider["name"] if len(pools) == 1 else f"{provider['name']}-{pool['name']}"
        out: dict[str, Any] = {"name": _name(name), "driver": driver,
                               "max-nodes": int(pool.get("max-servers", 20))}  # fmt: skip
        if "rate" in provider:  # Nodepool's: seconds between calls; freshpool's: calls/s
            out["rate"] = round(1.0 / max(float(provider["rate"]), 0.001), 3)
        if "boot-timeout" in provider:
            out["boot-timeout"] = float(provider["boot-timeout"])
        for key in ("launch-timeout", "launch-retries"):
            if key in provider:
                result.todo(provider, key, f"provider {name}: {key} has no freshpool key (a "
                            "launch is bounded by boot-timeout, retried with backoff)")  # fmt: skip
        labels = [lab["name"] for lab in pool.get("labels") or []]
        out["labels"] = [_name(x) for x in labels]
        settings = (_openstack if driver == "openstack" else _aws)(
            provider, pool, named_images, result, name)  # fmt: skip
        out[driver] = settings
        for lab in pool.get("labels") or []:
            source = lab.get("cloud-image") or lab.get("diskimage") or lab["name"]
            result.sources.setdefault(lab["name"], str(source))
            if lab.get("cloud-image"):
                cloud_images.setdefault(lab["cloud-image"], named_images.get(lab["cloud-image"]))
        result.config["providers"].append(out)


def _openstack(provider: Any, pool: Any, images: dict[str, Any], result: Imported,
               name: str) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"cloud": provider.get("cloud", provider["name"])}
    if provider.get("region-name"):
        out["region"] = provider["region-name"]
    for key in ("max-cores", "max-ram"):
        if key in pool:
            out[key] = int(pool[key])
    if pool.get("networks"):
        out["networks"] = [str(n) for n in pool["networks"]]
    flavors: dict[str, Any] = {}
    glance: dict[str, str] = {}
    for lab in pool.get("labels") or []:
        label = _name(lab["name"])
        flavors[label] = ({"name": lab["flavor-name"]} if "flavor-name" in lab
                          else {"min-ram": int(lab.get("min-ram", 2048))})  # fmt: skip
        glance[label] = _image_name(lab, images, result, name)
        if lab.get("boot-from-volume"):
            out["boot-from-volume"] = True
            out["volume-size"] = int(lab.get("volume-size", 50))
        if lab.get("key-name"):
            result.todo(lab, "key-name", f"provider {name} label {lab['name']}: key-name "
                        "is not used; freshpool gives each node a key of its own")  # fmt: skip
        if lab.get("instance-properties"):
            out.setdefault("metadata", {}).update(
                {str(k): str(v) for k, v in lab["instance-properties"].items()}
            )
    first = next(iter(flavors.values()), {"min-ram": 2048})
    out["flavor"], out["flavors"] = dict(first), flavors
    volumes = {bool(lab.get("boot-from-volume")) for lab in pool.get("labels") or []}
    if len(volumes) > 1:
        result.todo(pool, None, f"provider {name}: only some labels boot from a volume; "
                    "freshpool's setting is per provider (split the pool for both)")  # fmt: skip
    out["images"] = glance
    out["image"] = next(iter(glance.values()), "TODO")
    return out


def _aws(provider: Any, pool: Any, images: dict[str, Any], result: Imported,
         name: str) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"region": provider.get("region-name", "us-east-1")}
    if pool.get("subnet-id"):
        out["subnet-id"] = pool["subnet-id"]
    if pool.get("security-group-id"):
        out["security-group-ids"] = [pool["security-group-id"]]
    if pool.get("public-ip-address"):
        out["address"] = "public"
    amis: dict[str, str] = {}
    types: dict[str, str] = {}
    for lab in pool.get("labels") or []:
        label = _name(lab["name"])
        image = images.get(lab.get("cloud-image", ""), {})
        if image.get("image-id"):
            amis[label] = image["image-id"]
        else:
            result.todo(lab, None, f"provider {name} label {lab['name']}: no AMI id "
                        "(a diskimage or an image filter): give amis." + label)  # fmt: skip
            amis[label] = "ami-00000000"
        if lab.get("instance-type"):
            types[label] = lab["instance-type"]
        if lab.get("use-spot"):
            out["spot"] = True
        if lab.get("volume-size"):
            out["volume-size"] = int(lab["volume-size"])
        if lab.get("tags"):
            out.setdefault("tags", {}).update({str(k): str(v) for k, v in lab["tags"].items()})
        if lab.get("key-name"):
            result.todo(lab, "key-name", f"provider {name} label {lab['name']}: key-name "
                        "is not used; freshpool gives each node a key of its own")  # fmt: skip
    out["amis"], out["instance-types"] = amis, types
    return out


def _image_name(lab: Any, images: dict[str, Any], result: Imported, provider: str) -> str:
    if lab.get("cloud-image"):
        image = images.get(lab["cloud-image"], {})
        return str(image.get("image-name") or image.get("image-id") or lab["cloud-image"])
    result.todo(lab, "diskimage", f"provider {provider} label {lab['name']}: diskimage "
                f"{lab.get('diskimage')} was built and uploaded by Nodepool; freshpool does "
                "not upload builds to clouds yet: upload it and name it here")  # fmt: skip
    return str(lab.get("diskimage") or lab["name"])


def _diskimages(entries: list[Any], result: Imported) -> set[str]:
    names = set()
    for image in entries:
        if image.get("abstract"):
            continue
        names.add(image["name"])
        out: dict[str, Any] = {"name": _name(image["name"])}
        elements = [str(e) for e in image.get("elements") or []]
        release = str(image.get("release", ""))
        if _DEBIAN_BASES & set(elements) or release in _DEBIAN_RELEASES:
            out["suite"] = release or "bookworm"
        elif elements or release:
            result.todo(image, "elements", f"diskimage {image['name']}: freshpool builds Debian "
                        f"images only (release {release or '?'}); made a bookworm one")  # fmt: skip
        env = {str(k): str(v) for k, v in (image.get("env-vars") or {}).items()}
        packages = env.pop("DIB_PACKAGES", "").split()
        if packages:
            out["packages"] = packages
        if env:
            out["env"] = env
        if image.get("rebuild-age"):
            out["rebuild-age"] = int(image["rebuild-age"])
        if image.get("parent"):
            result.todo(image, "parent", f"diskimage {image['name']}: parent "
                        f"{image['parent']}'s settings are not merged in")  # fmt: skip
        unmapped = [e for e in elements if e not in _NOT_NEEDED | _DEBIAN_BASES]
        if unmapped:
            result.todo(image, "elements", f"diskimage {image['name']}: elements "
                        f"{', '.join(unmapped)}: write them as steps")  # fmt: skip
        result.config["images"].append(out)
    return names


def _name(text: str) -> str:
    """A freshpool name (lower case, digits, dashes, at most 31)."""
    name = re.sub(r"[^a-z0-9-]+", "-", str(text).lower()).strip("-")[:31] or "x"
    assert re.match(NAME_PATTERN, name), name
    return name


def _line(node: Any, key: str | None) -> int:
    lc = getattr(node, "lc", None)
    if lc is None:
        return 0
    if key is not None and key in node:
        return int(lc.key(key)[0]) + 1
    return int(lc.line) + 1
