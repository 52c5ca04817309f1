"""losses/lpips.py on random VGG16 weights: the torchvision -> lpips key mapping, the distance's contract (shape,
zero on equal inputs, grey inputs, gradients, fp32 under autocast, frozen) and the one-line errors."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from losses.lpips import VGG16_FILE, VGG16_URL, load_lpips
from utils.cli import UserError

# Conv layers of torchvision's vgg16 `features` and the lpips slice each one lands in, written out by hand so the
# test does not share the loader's rule: one per slice boundary at least.
CONVS = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 14: 3, 17: 4, 21: 4, 24: 5, 28: 5}


@pytest.fixture(scope="module")
def random_vgg(tmp_path_factory):
    """A random torchvision vgg16 state dict, saved the way the real file is, and its `features` module."""
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)  # kaiming-normal convs: features neither 0 nor inf
    # LPIPS reads only `features`; keep one classifier tensor (an extra key must be ignored) but not the 400 MB rest.
    state = {k: v for k, v in vgg.state_dict().items() if k.startswith("features.") or k == "classifier.6.bias"}
    path = tmp_path_factory.mktemp("hub") / VGG16_FILE
    torch.save(state, path)
    return path, vgg.features.eval()


@pytest.fixture(scope="module")
def distance(random_vgg):
    return load_lpips(str(random_vgg[0]), verify=False, resize=48)


def images(n: int = 2, c: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_backbone_and_heads_are_loaded(random_vgg, distance):
    import lpips

    path, features = random_vgg
    saved = torch.load(path, weights_only=True)
    backbone = distance.net.net.state_dict()
    for i, k in CONVS.items():
        for p in ("weight", "bias"):
            assert torch.equal(backbone[f"slice{k}.{i}.{p}"], saved[f"features.{i}.{p}"]), (i, p)
    # The whole trunk: lpips's relu5_3 is torchvision's features[:30].
    x = images()
    with torch.no_grad():
        assert torch.allclose(distance.net.net(x).relu5_3, features[:30](x), atol=1e-5)
    # The linear heads are the ones in the wheel (lpips loads them with strict=False, so check).
    wheel_heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    heads = torch.load(wheel_heads, map_location="cpu", weights_only=True)  # saved from CUDA tensors
    for i in range(5):
        assert torch.equal(distance.net.lins[i].model[1].weight, heads[f"lin{i}.model.1.weight"])


def test_distance_contract(distance):
    x, y = images(seed=1), images(seed=2)
    assert torch.equal(distance(x, x), torch.zeros(2))
    d = distance(x, y)
    assert d.shape == (2,) and d.dtype == torch.float32 and (d > 0).all()
    # Inputs smaller than `resize` are upsampled bilinearly before the network.
    up = lambda t: F.interpolate(t, size=(48, 48), mode="bilinear", align_corners=False)  # noqa: E731
    assert torch.allclose(d, distance.net(up(x), up(y)).flatten(), rtol=1e-5)
    # Grey images are repeated to RGB.
    g, h = images(c=1, seed=3), images(c=1, seed=4)
    assert torch.allclose(distance(g, h), distance(g.repeat(1, 3, 1, 1), h.repeat(1, 3, 1, 1)))
    # Gradients reach the input, not the frozen network.
    x.requires_grad_(True)
    distance(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in distance.parameters())
    # fp32 under autocast, bit for bit.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d_amp = distance(x.detach(), y)
    assert d_amp.dtype == torch.float32 and torch.equal(d_amp, d)


def test_stays_in_eval_mode(distance):
    parent = torch.nn.ModuleDict({"lpips": distance, "student": torch.nn.Linear(2, 2)})
    parent.train()
    assert parent["student"].training
    assert not any(m.training for m in distance.modules())
    x, y = images(seed=5), images(seed=6)
    assert torch.equal(distance(x, y), distance(x, y))  # the heads' dropout is off


def test_weights_location_and_hash(random_vgg, tmp_path, monkeypatch):
    path, _ = random_vgg
    with pytest.raises(UserError, match="SHA-256 .* is not torchvision's VGG16"):
        load_lpips(str(path))  # random weights: no silent substitute
    with pytest.raises(UserError, match=f"--lpips_weights .*{VGG16_FILE}"):
        load_lpips(str(tmp_path / "missing.pth"))
    # No flag: the torch hub cache, and an error saying where to put the file.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    default = tmp_path / "hub" / "checkpoints" / VGG16_FILE
    with pytest.raises(UserError) as err:
        load_lpips()
    message = str(err.value)
    assert "\n" not in message
    for fragment in (VGG16_FILE, "397923af", VGG16_URL, "--lpips_weights", str(default), "pseudo_huber"):
        assert fragment in message, fragment
    default.parent.mkdir(parents=True)
    default.symlink_to(path)
    assert load_lpips(None, verify=False, resize=None) is not None  # found in the hub cache


@pytest.mark.parametrize("content", ["list", "garbage", "missing_key", "wrong_shape"])
def test_refuses_what_is_not_a_vgg16_state_dict(random_vgg, tmp_path, content):
    bad = tmp_path / VGG16_FILE
    state = torch.load(random_vgg[0], weights_only=True)
    if content == "list":
        torch.save([1, 2, 3], bad)
    elif content == "garbage":
        bad.write_bytes(b"not a checkpoint" * 8)
    elif content == "missing_key":
        del state["features.28.weight"]
        torch.save(state, bad)
    else:
        state["features.10.weight"] = state["features.10.weight"][:, :64]
        torch.save(state, bad)
    with pytest.raises(UserError, match="not a torchvision VGG16 state dict") as err:
        load_lpips(str(bad), verify=False)
    assert "\n" not in str(err.value)


def test_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # `import lpips` now raises ImportError
    with pytest.raises(UserError, match="pip install lpips"):
        load_lpips()
