"""The part of an image definition that its debootstrap base is made from."""

from __future__ import annotations

import hashlib
import json

from freshpool.config import Image

# The rest of an image definition (steps, files, ...) is layered on top by the step
# pipeline. Wider than config.BASE_FIELDS (the keys an image with a parent may not
# set): the base builder also makes the apt pre-fetch, and names its log by the image.
DEBOOTSTRAP_FIELDS = ("name", "suite", "mirror", "variant", "packages", "prefetch")


def base_image(image: Image) -> Image:
    """`image` cut down to its debootstrap base: suite, mirror, variant, packages, pre-fetch."""
    return Image(**{name: getattr(image, name) for name in DEBOOTSTRAP_FIELDS})


def content_key(image: Image) -> str:
    """The sha256 of the base definition: equal definitions give equal keys."""
    dumped = image.model_dump(mode="json")
    base = {name: dumped[name] for name in DEBOOTSTRAP_FIELDS}
    definition = json.dumps(base, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(definition.encode()).hexdigest()
