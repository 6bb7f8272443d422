"""A model named by its Hugging Face hub id, found in the local Hugging Face cache.

The student job reads every model file from a local directory (softcache.student checks each one
there), so a hub id is turned into one first: the cached snapshot of its main revision, as
``hf download`` or an earlier ``from_pretrained`` left it (``HF_HOME``, ``HF_HUB_CACHE``). The cache is
tried first and the hub only when the model is not in it, so a model that is there never changes
under a run, online or not; with ``HF_HUB_OFFLINE=1`` the hub is never asked. huggingface_hub reads
those variables; this module does not.

Only what a student needs is downloaded: config, safetensors weights, tokenizer files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from softcache.errors import SoftcacheError, one_line

# What a student needs from a repository: its config, safetensors weights (and their index), the tokenizer.
STUDENT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
# An id as the hub spells one: "name" or "org/name", of letters, digits and - _ . (huggingface_hub's rule).
_HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


@dataclass(frozen=True)
class HubModel:
    """A hub model's files on this machine."""

    repo_id: str
    directory: Path
    """The cached snapshot: config.json, weights and tokenizer files."""
    revision: str
    """The snapshot's commit."""


def looks_like_hub_id(spec: str) -> bool:
    """Whether ``spec`` (not a path on this machine) could name a hub model: ``org/name`` or ``name``,
    not a config file's name and not a path with several parts."""
    return bool(_HUB_ID.match(spec)) and not spec.endswith((".json", ".yaml", ".yml")) and ".." not in spec \
        and "--" not in spec and not spec.startswith((".", "-"))


def find_hub_model(repo_id: str, flag: str) -> HubModel:
    """``repo_id``'s main revision from the local Hugging Face cache, or downloaded into it when it is not
    there and the hub may be asked. Raises :class:`SoftcacheError` naming ``flag`` when neither works."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f"{flag} {repo_id}"
    cache = constants.HF_HUB_CACHE
    try:
        directory = snapshot_download(repo_id, local_files_only=True)
    except LocalEntryNotFoundError:
        directory = None
    except Exception as err:  # a cache entry that is not what huggingface_hub wrote raises many types
        raise SoftcacheError(f"{where}: its entry in the Hugging Face cache {cache} is damaged ({one_line(err)}); "
                             f"remove it (hf cache rm {repo_id}) and download it again") from err
    if directory is None:
        if constants.HF_HUB_OFFLINE:
            raise SoftcacheError(f"{where} is not a file or directory, nor a model in the Hugging Face cache {cache}, "
                                 f"and HF_HUB_OFFLINE is set: download it where the hub can be reached (hf download "
                                 f"{repo_id}) into that cache (HF_HOME), or give a model directory or config.json")
        try:
            directory = snapshot_download(repo_id, allow_patterns=STUDENT_FILES)
        except (RepositoryNotFoundError, GatedRepoError) as err:
            raise SoftcacheError(f"{where} is not a file or directory, and the Hugging Face hub has no model by that "
                                 "name that it will give (private or gated ones need hf auth login)") from err
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
            raise SoftcacheError(f"{where} is not a file or directory, nor a model in the Hugging Face cache {cache}, "
                                 f"and the hub could not be reached ({one_line(err)}); give a model directory or "
                                 "config.json, or download it first (hf download)") from err
    directory = Path(directory)
    return HubModel(repo_id, directory, directory.name)
