"""Train the small CNN classifier that `fid.py --detector fmnist` uses as its feature extractor (FD_cls).

    python train_detector.py --dataset fashion_mnist --out metrics/fmnist_cnn.safetensors

Deterministic on a CPU (fixed seed, data order a pure function of the seed), a few CPU minutes. Prints the test
accuracy and the SHA-256 of the weights; the shipped weights' hash is in README.md and in `metrics/detectors.py`,
so FD_cls numbers from different machines are comparable.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm import tqdm

from modelling import build_classifier
from utils.ckpt import save_snapshot, tensors_sha256
from utils.cli import UserError, script_cli
from utils.data import MNIST_LIKE, build_dataset, make_loader, step_seed
from utils.tracking import progress


@dataclass
class Config:
    dataset: str = field(default="fashion_mnist", metadata={"choices": sorted(MNIST_LIKE)})
    data_dir: str = "data"
    download: bool = True
    out: str = "metrics/fmnist_cnn.safetensors"
    model_kwargs: dict = field(default_factory=dict, metadata={"help": "JSON, passed to the classifier"})
    batch_size: int = 128
    n_steps: int = 2000
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    log_interval: int = 250


@torch.no_grad()
def accuracy(model, dataset, device, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        imgs, labels = dataset[list(range(start, min(start + batch_size, len(dataset))))]
        correct += (model(imgs.to(device)).argmax(1).cpu() == labels).sum().item()
    model.train()
    return correct / len(dataset)


def main(cfg: Config) -> None:
    if min(cfg.n_steps, cfg.batch_size, cfg.log_interval) < 1:
        raise UserError("--n_steps, --batch_size and --log_interval must be >= 1")
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    device = accelerator.device

    # Data: 32x32 (28x28 zero-padded), the resolution of genzoo's MNIST-family generators.
    with accelerator.main_process_first():
        train_set = build_dataset(cfg.dataset, cfg.data_dir, 32, train=True, download=cfg.download)
        test_set = build_dataset(cfg.dataset, cfg.data_dir, 32, train=False, download=cfg.download)
    loader = iter(
        make_loader(train_set, cfg.batch_size, accelerator.process_index, accelerator.num_processes, cfg.seed, 0)
    )

    # Model and optimizer: AdamW with a one-cycle schedule reaches > 90 % within a few epochs.
    torch.manual_seed(cfg.seed)
    model_kwargs = dict(img_size=32, img_channels=1, n_classes=train_set.n_classes) | cfg.model_kwargs
    model = build_classifier("cnn", **model_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.n_steps)
    # The scheduler stays out of prepare(): prepared, it would step once per process per call.
    model, optimizer = accelerator.prepare(model, optimizer)

    # Loop.
    pbar = progress(range(cfg.n_steps), accelerator.is_main_process, desc="detector")
    for step in pbar:
        torch.manual_seed(step_seed(cfg.seed, accelerator.process_index, step))
        imgs, labels = next(loader)
        imgs, labels = imgs.to(device), labels.to(device)
        # Random horizontal flips: Fashion-MNIST classes are mirror-symmetric, and the flips add robustness.
        flip = torch.rand(imgs.shape[0], device=device) < 0.5
        imgs = torch.where(flip[:, None, None, None], imgs.flip(-1), imgs)
        loss = F.cross_entropy(model(imgs), labels)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        if (step + 1) % cfg.log_interval == 0:
            tqdm.write(f"step {step + 1}/{cfg.n_steps} loss {accelerator.reduce(loss.detach(), 'mean').item():.4f}")

    # Evaluate and save.
    net = accelerator.unwrap_model(model)
    test_acc, train_acc = accuracy(net, test_set, device), accuracy(net, train_set, device)
    if accelerator.is_main_process:
        out = Path(cfg.out)
        save_snapshot(
            out,
            kind="classifier",
            model_name="cnn",
            model_kwargs=model_kwargs,
            state_dict=net.state_dict(),
            config=dataclasses.asdict(cfg),
            step=cfg.n_steps,
            extra={"dataset": cfg.dataset, "test_accuracy": test_acc, "train_accuracy": train_acc},
        )
        digest = tensors_sha256(sorted(net.state_dict().items()))  # file bytes vary with the header order
        print(
            f"{cfg.dataset}: test accuracy {test_acc:.4f}, train accuracy {train_acc:.4f}; wrote {out} "
            f"(weights sha256 {digest})"
        )


cli = script_cli(__file__, __doc__, Config, main)


if __name__ == "__main__":
    cli()
