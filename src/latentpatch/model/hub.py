"""Model-hub names: ``ORG/NAME[@REV]`` resolved to a local directory through ``huggingface_hub``.

A name is looked up in the local hub cache first (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``; read at call time), without any network access; only a name that
is not cached is downloaded, and never when ``HF_HUB_OFFLINE=1``. Every failure is one
:class:`LatentPatchError` line naming the repository and the fix (docs/checkpoints.md).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from latentpatch.errors import LatentPatchError

log = logging.getLogger("latentpatch.model.hub")

#: ``ORG/NAME`` with an optional ``@REV``; hub repository names allow letters, digits, ``-_.``
HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
#: the files of a base model that loading needs (its config and tokenizer, never its weights)
BASE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)
#: seconds a connected machine waits for the hub before giving up on a name
TIMEOUT_S = 10.0


def split_hub_name(text: str) -> tuple[str, str | None] | None:
    """``"ORG/NAME@REV"`` -> ``("ORG/NAME", "REV")``; None when ``text`` is not a hub name.

    >>> split_hub_name("zen-E/CODI-gpt2@main"), split_hub_name("gpt2"), split_hub_name("./a/b")
    (('zen-E/CODI-gpt2', 'main'), None, None)
    """
    m = HUB_NAME.match(text)
    return (m.group("repo"), m.group("rev")) if m else None


def hub_cache_dir() -> Path:
    """The hub cache directory the environment names now (``HF_HUB_CACHE`` / ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or transformers' ``TRANSFORMERS_OFFLINE``) is set to a true value now."""
    values = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in values)


def download_fix(repo: str) -> str:
    """The one fix for a repository that is not here: download it where there is a network."""
    return f"run `hf download {repo}` on a connected machine, then point HF_HOME at that cache"


def resolve_repo(
    repo: str,
    revision: str | None = None,
    *,
    what: str,
    allow_patterns: Sequence[str] | None = None,
) -> Path:
    """The local snapshot directory of hub repository ``repo`` at ``revision`` (default main).

    ``what`` names the option in errors (``--model codi:ORG/NAME``, ``--base ORG/NAME``).
    ``allow_patterns`` limits a download to those files (a base model's config and tokenizer).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    cache = hub_cache_dir()
    patterns = list(allow_patterns) if allow_patterns else None

    def snapshot(offline: bool) -> Path:
        return Path(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=str(cache),
                allow_patterns=patterns,
                local_files_only=offline,
                etag_timeout=TIMEOUT_S,
            )
        )

    try:  # the cache first, with no network access at all
        return snapshot(True)
    except Exception:  # not cached (LocalEntryNotFoundError and its kin)
        pass
    at = f"@{revision}" if revision else ""
    if hub_offline():
        raise LatentPatchError(
            f"{what}: {repo}{at} is not in the hub cache {cache} and HF_HUB_OFFLINE is set; fix: {download_fix(repo)}"
        )
    log.info("%s: downloading %s%s into %s", what, repo, at, cache)
    try:
        return snapshot(False)
    except GatedRepoError:
        raise LatentPatchError(
            f"{what}: {repo} is a gated repository; fix: accept its licence on huggingface.co, run "
            f"`hf auth login`, then `hf download {repo}`"
        ) from None
    except RevisionNotFoundError:
        raise LatentPatchError(f"{what}: {repo} has no revision {revision!r}; fix: check the @REV") from None
    except RepositoryNotFoundError:
        raise LatentPatchError(
            f"{what}: no hub repository {repo} (and no such local path); fix: check the name, or "
            "`hf auth login` for a private repository"
        ) from None
    except Exception as err:  # no network, proxy, timeout, ...
        raise LatentPatchError(
            f"{what}: cannot reach the hub for {repo}{at} ({type(err).__name__}) and it is not in the cache "
            f"{cache}; fix: {download_fix(repo)}"
        ) from None
