"""Llama 3.2 checkpoints where users already keep them: the Hugging Face cache.

`--model 3b` with no --checkpoint takes its published repo's snapshot from the local cache
(meta-llama/Llama-3.2-3B-Instruct, else the base model); `--hf-repo ID[@revision]` takes that
repo's snapshot from the cache, else downloads it. huggingface_hub does the finding and the
fetching: it places the cache (HF_HOME, HF_HUB_CACHE), honours HF_HUB_OFFLINE and sends the token
(HF_TOKEN, `hf auth login`). Only a complete snapshot counts: config.json, every safetensors
shard and tokenizer.json (the Hugging Face layout at the repo's root; Meta's original/ is left out).

Low in the import layers (aot.errors only); huggingface_hub is imported where it is used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from aot.errors import CheckpointError, ConfigError

# The published repos of each --model, the Instruct first (what apps ship).
PUBLISHED: dict[str, tuple[str, ...]] = {
    "1b": ("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-1B"),
    "3b": ("meta-llama/Llama-3.2-3B-Instruct", "meta-llama/Llama-3.2-3B"),
    "11b-vision": ("meta-llama/Llama-3.2-11B-Vision-Instruct", "meta-llama/Llama-3.2-11B-Vision"),
    "90b-vision": ("meta-llama/Llama-3.2-90B-Vision-Instruct", "meta-llama/Llama-3.2-90B-Vision"),
}

# What a build reads from a repo (and what the bundle records of its licence); not original/*.pth.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "LICENSE*", "USE_POLICY.md"]
IGNORE_PATTERNS = ["original/*"]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class Snapshot:
    """One repo's files at one commit, in the local cache."""

    repo_id: str
    revision: str  # the commit sha
    path: Path  # HF_HUB_CACHE/models--ORG--NAME/snapshots/<revision>
    source: str  # "hf-cache" (found there) or "hf-download" (fetched by this build)

    def record(self) -> dict:
        """What bundle.json's checkpoint record says of where the files came from."""
        return {"source": self.source, "hf_repo": self.repo_id, "revision": self.revision}


def parse_repo(value: str) -> tuple[str, str | None]:
    """"ID[@revision]" as (ID, revision or None: the default branch)."""
    repo_id, at, revision = str(value).strip().partition("@")
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id or (at and not revision.strip()):
        raise ConfigError(f"--hf-repo takes ORG/NAME[@REVISION] (e.g. meta-llama/Llama-3.2-1B-Instruct@main), "
                          f"not '{value}'")
    return repo_id, revision.strip() or None


def repo_errors(value: str) -> list[str]:
    try:
        parse_repo(value)
    except ConfigError as e:
        return [str(e)]
    return []


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def missing_files(path: Path) -> list[str]:
    """The files a build needs that the snapshot at `path` lacks (a cached file whose blob is gone
    counts as missing)."""
    missing = [name for name in ("config.json", "tokenizer.json") if not (path / name).is_file()]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return missing + [f"{index.name} (unreadable)"]
        missing += [s for s in shards if not (path / s).is_file()]
    elif not any(p.is_file() for p in path.glob("*.safetensors")):
        missing.append("model.safetensors (or model.safetensors.index.json and its shards)")
    return missing


def lookup(repo_id: str, revision: str | None = None) -> tuple[Path | None, list[str]]:
    """The cached snapshot of `repo_id` at `revision` (a commit, or the commit its ref names) and
    the files it lacks; (None, []) when the cache holds none. Never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id, revision=revision, local_files_only=True,
                                 allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    except IncompleteSnapshotError as e:  # its tree listing names a file it lacks: judge by ours
        path = e.snapshot_path
    except LocalEntryNotFoundError:
        return None, []
    except ValueError:  # huggingface_hub's own check of the repo id
        return None, []
    path = Path(path)
    return path, missing_files(path)


def cached(repo_id: str, revision: str | None = None) -> Snapshot | None:
    """The complete cached snapshot of `repo_id` at `revision`, or None."""
    path, missing = lookup(repo_id, revision)
    return None if path is None or missing else Snapshot(repo_id, path.name, path, "hf-cache")


def cached_path(hf_repo: str | None) -> Path | None:
    """The cached snapshot folder of an --hf-repo value, complete or not; None for none (or a
    malformed value). For reading its config.json before a build."""
    if hf_repo is None or repo_errors(hf_repo):
        return None
    return lookup(*parse_repo(hf_repo))[0]


def locate(model: str | None, hf_repo: str | None, fetch: bool = True) -> Snapshot:
    """The snapshot a build without --checkpoint reads: --hf-repo's (cached, else downloaded when
    `fetch`), or --model's published repo from the cache."""
    if hf_repo is not None:
        repo_id, revision = parse_repo(hf_repo)
        snapshot = cached(repo_id, revision)
        if snapshot is not None:
            return snapshot
        if not fetch:
            raise CheckpointError(f"--hf-repo {hf_repo}: not in the Hugging Face cache ({cache_dir()}); "
                                  "`aot build` downloads it")
        return download(repo_id, revision)
    return published(model)


def published(model: str) -> Snapshot:
    """--model's published checkpoint from the cache: the first complete one of its repos."""
    repos = PUBLISHED.get(model)
    if not repos:
        raise ConfigError(f"--model {model} has no published checkpoint; give --checkpoint DIR or --random-weights")
    incomplete = []
    for repo_id in repos:
        path, missing = lookup(repo_id)
        if path is not None and not missing:
            return Snapshot(repo_id, path.name, path, "hf-cache")
        if path is not None:
            incomplete.append((repo_id, path, missing))
    if incomplete:
        repo_id, path, missing = incomplete[0]
        raise CheckpointError(f"--model {model}: the Hugging Face cache's {repo_id} (snapshot {path.name[:12]}) "
                              f"lacks {', '.join(missing[:3])}; complete it with `hf download {repo_id}` "
                              f"(or build with --hf-repo {repo_id})")
    raise CheckpointError(f"--model {model}: {' or '.join(repos)} is not in the Hugging Face cache ({cache_dir()}); "
                          f"download it with `hf download {repos[0]}` (or build with --hf-repo {repos[0]}), "
                          "or give --checkpoint DIR")


def download(repo_id: str, revision: str | None = None) -> Snapshot:
    """Fetch the files a build reads into the cache (huggingface_hub's snapshot_download, the token
    from HF_TOKEN or `hf auth login`). Every failure is one CheckpointError line."""
    import httpx2
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    spec = repo_id + (f"@{revision}" if revision else "")
    where = f"--hf-repo {spec}: not in the Hugging Face cache ({cache_dir()})"
    page = f"{constants.ENDPOINT}/{repo_id}"
    if constants.is_offline_mode():
        raise CheckpointError(f"{where} and HF_HUB_OFFLINE is set; unset it to download, or run "
                              f"`hf download {repo_id}` where the Hub can be reached")
    try:
        # First a call with a timeout (snapshot_download's own first call has none): an unreachable
        # Hub fails here in seconds rather than after the operating system gives up connecting.
        HfApi().model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                      ignore_patterns=IGNORE_PATTERNS, etag_timeout=constants.HF_HUB_ETAG_TIMEOUT))
    except GatedRepoError:
        raise CheckpointError(f"--hf-repo {spec}: the repo is gated; accept its licence at {page} with your "
                              "Hugging Face account, then log in with `hf auth login` (or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"--hf-repo {spec}: {repo_id} has no revision '{revision}' on the Hub") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"--hf-repo {spec}: no model repo {repo_id} on the Hub ({constants.ENDPOINT}); "
                              "check the name, or log in (`hf auth login`, HF_TOKEN) if it is private") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, httpx2.TransportError) as e:
        raise CheckpointError(f"{where} and the Hub ({constants.ENDPOINT}) cannot be reached "
                              f"({type(e).__name__}); connect and retry, or copy a cache holding it "
                              "and set HF_HUB_CACHE") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        hint = ("; check the token (`hf auth login`, HF_TOKEN) and that you accepted the licence at " + page
                if status in (401, 403) else "")
        raise CheckpointError(f"--hf-repo {spec}: the Hub answered {status} ({_first_line(e)}){hint}") from None
    except OSError as e:
        raise CheckpointError(f"--hf-repo {spec}: downloading into {cache_dir()} failed: {e}") from None
    missing = missing_files(path)
    if missing:
        raise CheckpointError(f"--hf-repo {spec}: the repo lacks {', '.join(missing[:3])}; aot builds Hugging Face "
                              "Llama 3.2 repos (config.json, *.safetensors, tokenizer.json)")
    return Snapshot(repo_id, path.name, path, "hf-download")


def cached_published() -> list[dict]:
    """Each published repo's state in the cache (`aot doctor`): complete, incomplete or absent."""
    rows = []
    for model, repos in PUBLISHED.items():
        for repo_id in repos:
            path, missing = lookup(repo_id)
            rows.append({"model": model, "hf_repo": repo_id, "revision": path.name if path else None,
                         "path": str(path) if path else None, "missing": missing,
                         "state": "absent" if path is None else "incomplete" if missing else "complete"})
    return rows


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
