"""Upload a finished model folder to the Hugging Face Hub (`whistle export-ct2 --push-to-hub REPO`).

`check_push` says before any work whether a push can succeed: a valid repository id, the hub not
switched off (HF_HUB_OFFLINE), a token (given, HF_TOKEN or `hf auth login`), and one request to the
hub that the token answers (no retries). `push_to_hub` then creates the repository if needed and
uploads the folder in one commit. A failed push keeps the folder on disk and says how to push it later.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from whistle_pipeline.errors import WhistleError


class PushError(WhistleError):
    """A push to the Hugging Face Hub that cannot start or failed."""


def check_push(repo_id: str, token: str | None = None) -> list[str]:
    """What keeps `repo_id` from receiving a push now: every problem, each naming the repository and the fix."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        return [f"--push-to-hub {repo_id!r} is not a hub repository id ({err}); give owner/name"]
    if "/" not in repo_id:
        return [f"--push-to-hub {repo_id!r} has no owner: give owner/name (your user name or an organisation)"]
    if hub_constants.HF_HUB_OFFLINE:
        return [
            f"cannot push to {repo_id}: the hub is offline (HF_HUB_OFFLINE is set); unset it on a machine with "
            "a network, or export without --push-to-hub and upload the folder later (`hf upload`)"
        ]
    token = token or huggingface_hub.get_token()
    if not token:
        return [f"cannot push to {repo_id}: no hub token; log in with `hf auth login`, set HF_TOKEN, or pass --token"]
    try:
        huggingface_hub.HfApi().whoami(token=token)  # one request: the hub is reachable and knows the token
    except HfHubHTTPError as err:
        return [f"cannot push to {repo_id}: the hub refused the token ({err}); log in again with `hf auth login`"]
    except Exception as err:  # noqa: BLE001 — httpx and OS errors of an unreachable hub, in many types
        return [
            f"cannot push to {repo_id}: the hub at {hub_constants.ENDPOINT} cannot be reached "
            f"({type(err).__name__}: {err}); connect, or export without --push-to-hub and upload the folder "
            "later (`hf upload`)"
        ]
    return []


def push_to_hub(
    folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None, token: str | None = None
) -> str:
    """Create `repo_id` (a model repository; kept if it exists) and upload `folder` in one commit; the commit URL.

    `revision` is a branch, created from main when missing. The folder is never changed or removed.
    """
    problems = check_push(repo_id, token)
    if problems:
        raise PushError("\n".join(problems))
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=f"Upload {Path(folder).name} with whistle",
        )
    except Exception as err:  # noqa: BLE001 — hub, httpx and OS errors, all reported the same way
        raise PushError(
            f"pushing {folder} to {repo_id} failed ({type(err).__name__}: {err}); the folder is kept: "
            f"push it later with `hf upload {repo_id} {folder}`"
        ) from err
    return commit.commit_url
