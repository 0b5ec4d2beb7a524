"""A finished tokenizer run as a prior's data: :func:`find_tokenizer` checks the folder (DONE, a
tokenizer task, its name its run id), :func:`load_tokenizer` rebuilds the model from config.json and
checkpoint.pt (``weights_only``), and :func:`cached_tokens` encodes its train and validation splits
once into ``<results>/<prior name>/_token_cache/<tokenizer run id>/tokens.pt`` (integers only, written
atomically under a file lock, so the priors of a sweep over one tokenizer encode it once).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from common.run_state import finished, read_object
from experiments.config import Config, ConfigError
from experiments.files import atomic_write
from experiments.run_dir import RunDir
from experiments.tasks import get_task

CACHE = "_token_cache"  # beside the run folders: a name with _ is never read as a run
TOKENIZER_TASKS = ("images",)  # tasks whose splits the cache knows how to read
ENCODE_BATCH = 256
# Training images encoded at most (evenly spread over the split), and never more than a run draws
# (steps x batch): the shipped 32-px crops number 120,860, which a tiny tokenizer takes minutes to
# encode on a CPU, while 2,000 steps of 32 draw 64,000.
MAX_TRAIN_IMAGES = 32768


def find_tokenizer(raw: str, results_root: Path | None) -> Path:
    """The folder ``data.tokenizer_run=raw`` names, checked; ConfigError (one line) otherwise.

    A relative path is looked up under ``results_root`` (the folder that holds the prior's own
    ``<name>/`` folder), then under the working directory."""
    given = Path(raw).expanduser()
    candidates = [given] if given.is_absolute() else [
        *([results_root / given] if results_root is not None else []), Path.cwd() / given]
    folder = next((c for c in candidates if c.is_dir()), None)
    where = " or ".join(str(c) for c in candidates)
    if folder is None:
        raise ConfigError(f"data.tokenizer_run={raw!r}: no such folder ({where}); give the folder of a "
                          f"finished tokenizer run, e.g. images/<run_id>")
    state, reason = finished(folder)
    if state != "done":
        raise ConfigError(f"data.tokenizer_run={raw!r}: {folder} is not a finished run ({state}"
                          f"{': ' + reason if reason else ''}); train it to the end first")
    config, _ = read_object(folder / "config.json")
    task = str(config.get("task"))
    if task not in TOKENIZER_TASKS:
        raise ConfigError(f"data.tokenizer_run={raw!r}: {folder} is a run of task {task!r}, not a tokenizer the "
                          f"prior can read (one of {list(TOKENIZER_TASKS)})")
    if config.get("run_id") != folder.resolve().name:
        raise ConfigError(f"data.tokenizer_run={raw!r}: the folder's name {folder.resolve().name!r} is not its run "
                          f"id {config.get('run_id')!r}; the prior's run id takes the tokenizer's from the name: "
                          f"link or rename the folder to {config.get('run_id')}")
    quantizer = config.get("quantizer") or {}
    if int(quantizer.get("num_codebooks", 1)) != 1:
        raise ConfigError(f"data.tokenizer_run={raw!r}: the tokenizer has {quantizer.get('num_codebooks')} codebooks; "
                          f"the prior models one code per token (num_codebooks=1)")
    return folder.resolve()


class Tokenizer(NamedTuple):
    run_id: str
    config: Config  # resolved
    model: nn.Module  # in eval mode, on the CPU


def load_tokenizer(folder: Path | str) -> Tokenizer:
    """The finished tokenizer in ``folder`` (checked by :func:`find_tokenizer` first)."""
    folder = Path(folder)
    raw, err = read_object(folder / "config.json")
    if raw is None:
        raise ConfigError(f"{folder}: {err}")
    config = Config.from_dict(raw).resolved()
    model = get_task(config.task).build_model(config)
    checkpoint = RunDir(folder).load_checkpoint(raw["run_id"])  # weights_only
    if checkpoint is None:
        raise ConfigError(f"{folder} has no checkpoint.pt: the prior needs the tokenizer's weights")
    model.load_state_dict(checkpoint["model"])
    return Tokenizer(raw["run_id"], config, model.eval())


def image_splits(config: Config, max_train: int | None = None) -> tuple[Iterator[Tensor], Iterator[Tensor]]:
    """(train, validation) batches of the images task's model input, in a fixed order: at most
    ``max_train`` (default MAX_TRAIN_IMAGES) training crops, evenly spread (one per file from a
    folder), and the validation set as the tokenizer's validation reads it."""
    from experiments.image_folder import collate, even_subset
    from experiments.tasks.images import ShippedImages, build_dataset, to_model_input

    dataset = build_dataset(config)
    max_train = MAX_TRAIN_IMAGES if max_train is None else max_train
    if isinstance(dataset, ShippedImages):
        chosen = torch.tensor(even_subset(len(dataset.train), max_train))

        def train() -> Iterator[Tensor]:
            for i in range(0, len(chosen), ENCODE_BATCH):
                yield to_model_input(dataset.train[chosen[i:i + ENCODE_BATCH]])

        def val() -> Iterator[Tensor]:
            v = dataset.val
            for i in range(0, len(v), ENCODE_BATCH):
                yield v[i:i + ENCODE_BATCH]
        return train(), val()

    def loaded(ds: Any) -> Iterator[Tensor]:
        for crops, _ in DataLoader(ds, batch_size=ENCODE_BATCH, collate_fn=collate):
            if len(crops):
                yield dataset.to_model_input(crops)

    files = even_subset(len(dataset.train_set), max_train)

    class Seeded(torch.utils.data.Dataset):  # one crop per training file, its seed the file's index
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int) -> Any:
            return dataset.train_set[(files[i], files[i])]

    return loaded(Seeded()), loaded(dataset.val_set)


@torch.no_grad()
def encode_split(model: nn.Module, batches: Iterator[Tensor]) -> Tensor:
    """(N, L) int32 codes, raster order (rows of the token grid, top to bottom)."""
    out = [model(x).indices.reshape(x.shape[0], -1).to(torch.int32) for x in batches]
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.int32)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_cache(path: Path, run_id: str) -> dict[str, Any] | None:
    """The cache file's tokens, or None if it is missing or not the tokenizer's (then it is rewritten)."""
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: encode again
        return None
    ok = isinstance(data, dict) and data.get("tokenizer_run_id") == run_id and all(
        isinstance(data.get(k), Tensor) for k in ("train", "val", "grid"))
    return data if ok else None


def train_images_for(config: Config) -> int:
    """Training images a prior of ``config`` encodes: at most what it draws, at most MAX_TRAIN_IMAGES."""
    return min(MAX_TRAIN_IMAGES, config.schedule.steps * config.data.batch_size)


def cache_path(cache_root: Path, run_id: str, max_train: int) -> Path:
    return cache_root / CACHE / run_id / f"tokens-{max_train}.pt"


def cached_tokens(folder: Path, cache_root: Path, max_train: int, log: Any = print) -> dict[str, Any]:
    """``{"train": (N, L) int64, "val": (M, L) int64, "grid": (h, w), "codebook_size": K, "tokenizer_run_id"}``
    of the tokenizer in ``folder`` (at most ``max_train`` training images), encoded on the CPU the
    first time any prior asks for it."""
    run_id = folder.name
    path = cache_path(cache_root, run_id, max_train)
    with _locked(path.with_suffix(".lock")):
        data = read_cache(path, run_id)
        if data is None:
            log(f"encoding the splits of tokenizer {run_id} into {path} (once for every prior on it)")
            # building the tokenizer draws its initial weights, its forward may draw (LFQ's token subsets):
            # from a copy of the RNG, so that a prior starts alike whether it encoded the codes or read them
            with torch.random.fork_rng(devices=[]):
                tokenizer = load_tokenizer(folder)
                train_batches, val_batches = image_splits(tokenizer.config, max_train)
                train, val = encode_split(tokenizer.model, train_batches), encode_split(tokenizer.model, val_batches)
                probe = tokenizer.model(next(image_splits(tokenizer.config, 0)[1])[:1]).indices
            data = {"train": train, "val": val, "grid": torch.tensor(probe.shape[1:3] if probe.ndim >= 3 else
                                                                    (1, probe.shape[-1])),
                    "codebook_size": int(tokenizer.model.quantizer.codebook_size), "tokenizer_run_id": run_id}
            atomic_write(path, lambda f: torch.save(data, f), mode="wb")
    return {**data, "train": data["train"].long(), "val": data["val"].long()}


def cache_root_of(run_dir: Path | str | None) -> Path | None:
    """Where a prior in ``run_dir`` (``<results>/<name>/<run_id>``) keeps its token cache: ``<results>/<name>``."""
    return None if run_dir is None else Path(os.fspath(run_dir)).parent
