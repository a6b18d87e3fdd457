"""Fetching published weights (``pretrained=True``) through the ecosystem's own clients, into their caches.

- Hugging Face hub weights (``source="hf-hub"``): :func:`huggingface_hub.hf_hub_download`, so its cache
  (``HF_HOME``, ``HF_HUB_CACHE``), ``HF_HUB_OFFLINE=1`` (the cache only), ``HF_ENDPOINT`` (a mirror) and
  ``HF_TOKEN`` mean what they mean everywhere; the revision is ``main`` unless the caller names one.
- Release files (``source="url"``): :func:`torch.hub.download_url_to_file` (progress bar, hash check)
  into ``torch.hub``'s cache, ``$TORCH_HOME/hub/checkpoints`` (where ``torch.hub`` and timm keep the same
  files, so a file either of them fetched is reused). ``TNTVISION_WEIGHTS_MIRROR=URL`` fetches
  ``URL/<file name>`` instead of the publisher's address, for machines behind a firewall;
  ``HF_HUB_OFFLINE=1`` keeps these to the cache too.
- Weights only a person can fetch (``source="manual"``): a message with the page and how to pass the file.

Every file is read as weights before it is used. A release file is downloaded into a private folder and
moved into the cache only once it reads as weights, so the cache never holds half a download (Python's
HTTP client does not notice a connection dropped before ``Content-Length`` bytes, so the read is the
check). A cached file that does not read as weights (an HTML error page saved by a proxy, a damaged or
truncated file) is removed from the cache, and the error says what it was.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.error
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from .pretrained import PretrainedTag
from .weights import read_state_dict

__all__ = ["MIRROR_ENV", "fetch_pretrained", "release_cache_dir"]

MIRROR_ENV = "TNTVISION_WEIGHTS_MIRROR"
_BY_HAND = "or fetch the file by hand and pass its path: pretrained=PATH (the CLI's --checkpoint PATH)"

StateDict = dict[str, torch.Tensor]


def release_cache_dir() -> Path:
    """Where release files are kept: ``torch.hub``'s checkpoint cache (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def fetch_pretrained(
    tag: PretrainedTag, *, revision: str | None = None, progress: bool = True
) -> tuple[StateDict, str | None, Path]:
    """The state dict of ``tag``'s published weights, from the cache or downloaded into it.

    Returns the state dict, the training wrapper it was unwrapped from (see
    :func:`~tntvision.models.weights.read_state_dict`) and the cached file.

    Raises:
        CheckpointError: the weights cannot be fetched (no network and nothing cached, a 404, a hash that
            does not match, a tag published only for download by hand) or the file is not weights (then
            it is removed from the cache). The message names the repository or address, the offline
            setting and ``pretrained=PATH``.
        ConfigError: ``revision`` for weights that are not on the hub.
    """
    if tag.source == "manual":
        raise CheckpointError(
            f"{tag.name}: these weights have no direct link; {tag.notes or 'see ' + tag.location}. "
            f"Download the file by hand and pass its path: pretrained=PATH (the CLI's --checkpoint PATH)"
        )
    if revision is not None and tag.source != "hf-hub":
        raise ConfigError(f"{tag.name} is a release file ({tag.location}): a revision applies to hub weights")
    if tag.source == "hf-hub":
        path = _hub_file(tag, revision or "main")
        sd, wrapper = _read_or_evict(tag, path, _evict_hub_file)
        return sd, wrapper, path
    return _release_file(tag, progress=progress)


# ------------------------------------------------------------------------------------ the hub


def _hub_file(tag: PretrainedTag, revision: str) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .. import __version__

    where = f"{tag.location} ({tag.filename}, revision {revision})"
    try:
        return Path(
            hf_hub_download(
                tag.location,
                tag.filename,
                revision=revision,
                library_name="tntvision",
                library_version=__version__,
            )
        )
    except LocalEntryNotFoundError as e:  # offline, or the endpoint unreachable, and nothing cached
        why = (
            "HF_HUB_OFFLINE=1 allows the cache only"
            if constants.HF_HUB_OFFLINE
            else f"{constants.ENDPOINT} cannot be reached"
        )
        raise CheckpointError(
            f"cannot get {tag.name}: {where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"{why}; connect (HF_HUB_OFFLINE unset), set HF_ENDPOINT to a mirror, {_BY_HAND}"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"cannot get {tag.name}: {constants.ENDPOINT} has no revision {revision!r} of "
                              f"{tag.location}") from e  # fmt: skip
    except RepositoryNotFoundError as e:  # a 404, or a private / gated repository without a token
        raise CheckpointError(
            f"cannot get {tag.name}: {constants.ENDPOINT} has no repository {tag.location} (or it needs a "
            f"token: HF_TOKEN); a mirror in HF_ENDPOINT must serve it, {_BY_HAND}"
        ) from e
    except EntryNotFoundError as e:
        raise CheckpointError(f"cannot get {tag.name}: {constants.ENDPOINT} has no file {where}") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise CheckpointError(
            f"cannot get {tag.name}: {constants.ENDPOINT} answered {status or 'an error'} for {where}; "
            f"try again later, set HF_ENDPOINT to a mirror, {_BY_HAND}"
        ) from e
    except Exception as e:  # a connection dropped mid-file, a size that does not match, a full disk
        if not _is_transfer_error(e):
            raise
        raise CheckpointError(
            f"cannot get {tag.name}: downloading {where} from {constants.ENDPOINT} failed "
            f"({_first_line(e)}); nothing was kept: try again, {_BY_HAND}"
        ) from e


# The HTTP clients huggingface_hub has used (httpx, its fork httpx2, requests): their errors are transfers
# that failed, like an OSError.
_HTTP_CLIENTS = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")


def _is_transfer_error(e: BaseException) -> bool:
    return isinstance(e, OSError) or type(e).__module__.partition(".")[0] in _HTTP_CLIENTS


def _evict_hub_file(path: Path) -> None:
    """Remove a snapshot file of the Hugging Face cache and the blob it links to."""
    blob = path.resolve()
    for p in {path, blob}:
        p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ release files


def _release_file(tag: PretrainedTag, *, progress: bool) -> tuple[StateDict, str | None, Path]:
    cache = release_cache_dir()
    dst = cache / tag.filename
    if dst.is_file():
        sd, wrapper = _read_or_evict(tag, dst, lambda p: p.unlink(missing_ok=True))
        return sd, wrapper, dst
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    url = f"{mirror.rstrip('/')}/{tag.filename}" if mirror else tag.location
    if _offline():
        raise CheckpointError(
            f"cannot get {tag.name}: {tag.filename} is not in the cache ({cache}) and HF_HUB_OFFLINE=1 "
            f"forbids downloading it from {url}; unset it, set {MIRROR_ENV} to a mirror, {_BY_HAND}"
        )
    cache.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=cache, prefix=f".{tag.filename}.", suffix=".download"))
    try:
        tmp = folder / tag.filename
        _download(tag, url, tmp, progress=progress)
        try:
            sd, wrapper = read_state_dict(tmp)
        except CheckpointError as e:
            raise CheckpointError(
                f"{tag.name}: the file {url} sent is {_what_it_is(tmp, e)}; nothing was kept in the cache"
            ) from e
        os.replace(tmp, dst)  # same folder's file system: the cache has all of it or none
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return sd, wrapper, dst


def _download(tag: PretrainedTag, url: str, dst: Path, *, progress: bool) -> None:
    hint = f"set {MIRROR_ENV} to a mirror (or unset it), {_BY_HAND}"
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=tag.hash_prefix, progress=progress)
    except urllib.error.HTTPError as e:
        raise CheckpointError(f"cannot get {tag.name}: {url} answered {e.code} {e.reason}; {hint}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or _first_line(e)
        raise CheckpointError(
            f"cannot get {tag.name}: downloading {url} failed ({reason}); nothing was kept in the cache "
            f"({release_cache_dir()}); HF_HUB_OFFLINE=1 uses the cache only; {hint}"
        ) from e
    except RuntimeError as e:  # torch.hub's hash check
        if "hash" not in str(e):
            raise
        raise CheckpointError(
            f"{tag.name}: the file {url} sent is not the published one (its SHA-256 does not start with "
            f"{tag.hash_prefix}); nothing was kept in the cache"
        ) from e


# ------------------------------------------------------------------------------------ checks


def _read_or_evict(tag: PretrainedTag, path: Path, evict) -> tuple[StateDict, str | None]:
    """Read ``path`` as weights; a file that is not weights is removed from the cache and reported."""
    try:
        return read_state_dict(path)
    except CheckpointError as e:
        what = _what_it_is(path, e)
        evict(path)
        raise CheckpointError(
            f"{tag.name}: the cached file {path} was {what}; removed it from the cache: the next call "
            f"downloads it again"
        ) from e


def _what_it_is(path: Path, error: Exception) -> str:
    """Words for a file that did not read as weights: empty, an HTML page, or damaged / truncated."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        head = b""
    if not head:
        return "empty, not weights"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")) or b"<html" in text:
        return "an HTML page (an error or sign-in page saved as the file), not weights"
    return f"damaged or truncated, not readable weights ({_first_line(error)})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
