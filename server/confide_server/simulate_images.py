"""Image jobs for ``confide-server simulate``: SqueezeNet-class CNNs on the lesion benchmark.

``--data lesions --model squeezenet`` (or ``small_cnn``) builds the offline lesion-detection
task of :mod:`confide.data.lesions` (real scans shipped by pydicom and scikit-image, with
*synthetic* lesions), splits whole patients across the sites (IID or Dirichlet label skew),
writes each site's images as PNG files with a ``path,label,patient_id`` CSV (the format a
hospital points ``confide client --data`` at), and an initial torch model whose manifest
names the architecture, input shape and class names, so each site builds the same model
from the manifest alone.

The central baseline trains the same architecture on the pooled training split with the
same optimiser settings (no DP), for the comparison the demo prints.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from confide.errors import ConfigError
from confide.protocol.manifest import encode_tensors

__all__ = ["IMAGE_MODELS", "ImageJob", "central_image_baseline", "write_image_job_data"]

#: ``--model`` names of image jobs and the registered torch architecture each builds.
IMAGE_MODELS = {"squeezenet": "squeezenet1_1", "small_cnn": "small_cnn"}


@dataclass(frozen=True)
class ImageJob:
    """What :func:`write_image_job_data` wrote."""

    site_train: list[Path]
    site_test: list[Path]
    train_csv: Path
    test_csv: Path
    manifest_path: Path
    weights_path: Path


def _write_subset(src: Path, rows: list[list[str]], index: np.ndarray, dst: Path) -> None:
    """Write a site's labels CSV: rows of the pooled CSV, paths relative to ``dst``'s folder."""
    rel = Path(os.path.relpath(src.parent, dst.parent))
    with dst.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id"])
        for i in index:
            path, label, pid = rows[int(i)][:3]
            w.writerow([(rel / path).as_posix(), label, pid])


def write_image_job_data(
    work: Path,
    *,
    model: str,
    sites: int,
    image_size: int,
    patients_per_site: int,
    tiles_per_patient: int,
    partition: str,
    alpha: float,
    seed: int,
) -> ImageJob:
    """Generate the lesion task, split it by patient into sites, write the initial model.

    Parameters
    ----------
    work : Path
        Job folder (created by the caller).
    model : {"squeezenet", "small_cnn"}
        The architecture.
    sites : int
        Number of hospitals.
    image_size : int
        Tile side in pixels (64 for the Dopamine-style run).
    patients_per_site : int
        Pseudo-patients per site in the training split (the test split has a quarter).
    tiles_per_patient : int
        Tiles (images) per patient.
    partition : {"iid", "dirichlet"}
        How patients are spread over the sites.
    alpha : float
        Dirichlet concentration for ``partition="dirichlet"``.
    seed : int
        Seeds the data, the split and the initial weights (no secret).

    Returns
    -------
    ImageJob
        The written files.
    """
    if model not in IMAGE_MODELS:
        raise ConfigError(f"image models are {sorted(IMAGE_MODELS)}, got {model!r}")
    try:
        from confide.data.images import ImageDataset, ImageTransform, split_by_patient
        from confide.data.lesions import CLASSES, write_lesion_folder
        from confide.training.torch_engine import TorchTrainer
        from confide.training.torch_models import build_model
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"image jobs need the torch and lesions extras ({exc.name} is missing): "
            'pip install "confide[torch,lesions]"'
        ) from exc
    data = work / "data"
    train_csv = write_lesion_folder(
        data / "train", sites * patients_per_site, tiles_per_patient, image_size, seed
    )
    test_csv = write_lesion_folder(
        data / "test",
        max(sites, sites * patients_per_site // 4),
        tiles_per_patient,
        image_size,
        seed + 1,
    )
    transform = ImageTransform(size=(image_size, image_size), channels=3)
    pooled = {
        name: ImageDataset.from_csv(path, classes=list(CLASSES), transform=transform)
        for name, path in (("train", train_csv), ("test", test_csv))
    }
    site_dir = work / "sites"
    site_dir.mkdir(exist_ok=True)
    out: dict[str, list[Path]] = {"train": [], "test": []}
    for name, path in (("train", train_csv), ("test", test_csv)):
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))[1:]
        parts = split_by_patient(
            pooled[name],
            sites,
            alpha if (partition == "dirichlet" and name == "train") else None,
            seed=seed + (0 if name == "train" else 1),
        )
        for k, index in enumerate(parts, start=1):
            dst = site_dir / f"site-{k}-{name}.csv"
            _write_subset(path, rows, index, dst)
            out[name].append(dst)
    spec: dict[str, Any] = {
        "engine": "torch",
        "arch": IMAGE_MODELS[model],
        "num_classes": len(CLASSES),
        "input_shape": [3, image_size, image_size],
        "classes": list(CLASSES),
    }
    if model == "squeezenet":
        # Dropout off: DP-SGD's per-sample gradients and the noise already regularise, and a
        # deterministic forward pass keeps per-sample gradients exact under vmap. No ReLU
        # after the final convolution: trained from scratch on two classes, the reference's
        # dies (every logit 0, loss stuck at log 2); same parameters and names.
        spec["options"] = {"dropout": 0.0, "final_relu": False}
    import torch

    torch.manual_seed(seed)
    trainer = TorchTrainer(build_model(spec), tuple(spec["input_shape"]), len(CLASSES), spec=spec)
    manifest_path, weights_path = work / "model.json", work / "init.safetensors"
    trainer.manifest.save(manifest_path)
    weights_path.write_bytes(encode_tensors(trainer.manifest, trainer.get_weights()))
    return ImageJob(out["train"], out["test"], train_csv, test_csv, manifest_path, weights_path)


def central_image_baseline(
    job: ImageJob, *, epochs: int, batch_size: int, learning_rate: float, seed: int
) -> float:
    """Accuracy of the same model trained centrally (pooled training split, no DP).

    Parameters
    ----------
    job : ImageJob
        The written job.
    epochs, batch_size, learning_rate : int, int, float
        Plain SGD settings (for the comparison, the federation's total epochs).
    seed : int
        Batch-order seed.

    Returns
    -------
    float
        Test accuracy.
    """
    from confide.data.images import ImageDataset, ImageTransform
    from confide.protocol.manifest import Manifest, decode_tensors
    from confide.training import TrainConfig
    from confide.training.torch_engine import TorchTrainer

    manifest = Manifest.load(job.manifest_path)
    weights, _ = decode_tensors(manifest, job.weights_path.read_bytes())
    trainer = TorchTrainer.from_manifest(manifest, weights)
    c, h, w = manifest.spec["input_shape"]
    transform = ImageTransform(size=(h, w), channels=c)
    classes = list(manifest.spec["classes"])
    train = ImageDataset.from_csv(job.train_csv, classes=classes, transform=transform)
    test = ImageDataset.from_csv(job.test_csv, classes=classes, transform=transform)
    trainer.fit(train, TrainConfig(epochs, batch_size, learning_rate), seed)
    return float(trainer.evaluate(test)["accuracy"])
