"""Publishing an ``hsface build`` folder as a Hub dataset repository.

The upload is ``HfApi.upload_folder``: with ``hf_xet`` (a dependency of huggingface_hub) it is
huggingface_hub's streamed upload, which commits a large folder in several batches, shows a live
progress display and resumes when the same call is re-run (committed files are skipped, uploaded
chunks deduplicated). It is also the one call that can open a pull request (``create_pr``), so one
code path serves every option. The client is injectable (``api=``) so tests record the calls.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# What a dataset repository holds: the card and everything it links or describes. Patterns are
# matched by huggingface_hub's own filter (fnmatch on the path relative to the folder).
ALLOW_PATTERNS = [
    "README.md",
    "*/train-*.parquet",
    "*/generation.json",
    "*/identities.safetensors",
    "*/manifest.json",
    "*/sample_grid.png",
    "*/analysis/*.png",  # plots and grid of `hsface analyze`, linked from the card
    "*/analysis/report.json",
    "*/analysis/summary.md",
]
# Build bookkeeping stays local: hidden files and folders at any depth (.manifest/, .incomplete/,
# .cache/, markers, locks) and temporary files.
IGNORE_PATTERNS = [".*", "*/.*", "*.tmp", "*.tmp.*"]


@dataclass
class UploadPlan:
    """The files ``push_dataset`` sends, as paths inside the repository."""

    folder: Path
    files: list[str]
    total_bytes: int

    @property
    def total_size(self) -> str:
        return _human_size(self.total_bytes)

    def summary(self, limit: int = 12) -> str:
        lines = [f"{len(self.files)} files, {self.total_size} from {self.folder}:"]
        for name in self.files[:limit]:
            lines.append(f"  {name}  ({_human_size((self.folder / name).stat().st_size)})")
        if len(self.files) > limit:
            lines.append(f"  ... and {len(self.files) - limit} more")
        return "\n".join(lines)


def _human_size(num_bytes: int) -> str:
    from tqdm import tqdm

    return tqdm.format_sizeof(num_bytes, "B", 1000)


def upload_plan(out_dir: str | Path) -> UploadPlan:
    """What ``push_dataset`` would upload from ``out_dir``, selected exactly as ``upload_folder`` selects it."""
    from huggingface_hub.utils import filter_repo_objects

    from vec2face_model.errors import InvalidInputError

    folder = Path(out_dir)
    if not folder.is_dir():
        raise InvalidInputError(f"{folder}: no such folder; pass the --out folder of `hsface build`")
    relative = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = list(filter_repo_objects(relative, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
    if "README.md" not in files or not any(f.endswith(".parquet") for f in files):
        raise InvalidInputError(f"{folder} holds no built HSFace config (README.md + parquet shards); run `hsface build` first")
    return UploadPlan(folder, files, sum((folder / f).stat().st_size for f in files))


def _client(api):
    if api is not None:
        return api
    from huggingface_hub import HfApi

    return HfApi()


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the Hub cannot be used right now", not a bug in hsface."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    # HfHubHTTPError derives from the HTTP client's own HTTPError (httpx), the base of its
    # connection and timeout errors; naming it this way does not tie hsface to that client.
    client_http_error = next(c for c in HfHubHTTPError.__mro__[1:] if c.__name__ == "HTTPError")
    return (client_http_error, ConnectionError, TimeoutError, LocalTokenNotFoundError)


def _advice(err: BaseException, repo_id: str) -> str:
    from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set; run the command again without it"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, LocalTokenNotFoundError) or status == 401:
        return "log in with `hf auth login` (a token with write access) and run the command again"
    if status == 403:
        return f"your token cannot write to {repo_id}; use a token with write access to it, or another repo id"
    if status == 404:
        return f"check that the namespace of {repo_id} exists and that your token can write to it"
    if status is not None and status < 500:
        return "the Hub refused the request for the reason above; fix it and run the command again"
    if status is not None:
        return "the Hub had a server error; run the same command again later; files already committed are skipped"
    return "check the network connection (and HF_ENDPOINT if set) and run the same command again; files already committed are skipped"


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextmanager
def _progress_bars(enabled: bool):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def push_dataset(
    out_dir: str | Path,
    repo_id: str,
    *,
    api=None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    commit_message: str = "Upload HSFace (hsface push)",
):
    """Upload a built folder to the dataset repository ``repo_id``; returns the ``CommitInfo``
    (or, with ``dry_run``, the :class:`UploadPlan` without touching the network).

    The repository is created if missing (``private`` applies only then). ``revision`` is a branch,
    created from ``main`` if missing. ``create_pr`` opens a pull request against the default
    branch instead of committing to it. An interrupted push resumes when run again.
    """
    from vec2face_model.errors import HubUnreachableError, InvalidInputError

    plan = upload_plan(out_dir)
    if create_pr and revision:
        raise InvalidInputError("a pull request is always opened against the default branch: use --create-pr or --revision, not both")
    if dry_run:
        return plan
    api = _client(api)
    step = "create the repository"
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision:
            step = f"create the branch {revision!r}"
            api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
        step = "upload"
        with _progress_bars(progress):
            return api.upload_folder(
                repo_id=repo_id, repo_type="dataset", folder_path=str(plan.folder), allow_patterns=list(ALLOW_PATTERNS),
                ignore_patterns=list(IGNORE_PATTERNS), revision=revision, create_pr=create_pr, commit_message=commit_message,
            )
    except _hub_errors() as err:
        raise HubUnreachableError(
            f"push of {plan.folder} to datasets/{repo_id} failed ({step}: {_one_line(err)}); {_advice(err, repo_id)}"
        ) from err


def push_pipeline(pipe, repo_id: str, *, private: bool = False, **kwargs):
    """Deprecated: call ``pipe.push_to_hub(repo_id, ...)`` (diffusers' own upload, with a model card)."""
    warnings.warn("builder.hub.push_pipeline is deprecated; call pipe.push_to_hub(repo_id) instead", FutureWarning, stacklevel=2)
    return pipe.push_to_hub(repo_id, private=private, **kwargs)
