"""Teacher acquisition from a local file, a URL (real local HTTP server, file://) and RobustBench."""
from __future__ import annotations

import functools
import sys
import threading
import types
from collections import OrderedDict
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from torch import nn

from mixacm.checkpoint import load_model_file, model_spec, save_model_file
from mixacm.config import ConfigError, teacher_source
from mixacm.models import build_model
from mixacm.teachers import TeacherError, acquire_teacher
from mixacm.utils import sha256_file

X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    # Non-default BN statistics, so a model that silently kept its init would give other outputs.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture
def foreign_file(tmp_path, net) -> Path:
    """A checkpoint as published elsewhere: weights under "state_dict" (no normalisation), scalars beside."""
    weights = {k: v for k, v in net.state_dict().items() if k not in ("mean", "std")}
    path = tmp_path / "src" / "teacher.pth"
    path.parent.mkdir()
    torch.save({"state_dict": weights, "test_acc": 0.5}, path)
    return path


@pytest.fixture
def server(foreign_file):
    """A real HTTP server on 127.0.0.1 serving the folder of ``foreign_file``."""
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(foreign_file.parent)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def outputs(path: Path) -> torch.Tensor:
    model, _ = load_model_file(path)
    with torch.no_grad():
        return model(X)


def expected(net) -> torch.Tensor:
    with torch.no_grad():
        return net(X)


# ----------------------------------------------------------------------------- local files


def test_local_foreign_file_becomes_a_model_file_with_the_same_outputs(tmp_path, net, foreign_file):
    out = acquire_teacher({"path": str(foreign_file), "arch": "tiny", "sha256": sha256_file(foreign_file)},
                          tmp_path / "out" / "teacher.pt")
    assert torch.allclose(outputs(out), expected(net), atol=1e-6)
    meta = load_model_file(out)[1]["meta"]
    assert meta["published"] == {"test_acc": 0.5}
    assert meta["source_sha256"] == sha256_file(foreign_file)
    assert meta["teacher_source"]["arch"] == "tiny" and meta["role"] == "teacher"


def test_a_mixacm_model_file_needs_no_arch_and_keeps_its_meta(tmp_path, net):
    src = save_model_file(net, model_spec("tiny"), tmp_path / "student.pt", {"method": "at"})
    out = acquire_teacher({"path": str(src)}, tmp_path / "teacher.pt")
    assert torch.allclose(outputs(out), expected(net), atol=1e-6)
    assert load_model_file(out)[1]["meta"]["original_meta"] == {"method": "at"}
    with pytest.raises(TeacherError, match="has 10 classes, the dataset has 100"):
        acquire_teacher({"path": str(src)}, tmp_path / "t100.pt", num_classes=100)
    assert not (tmp_path / "t100.pt").exists()


def test_a_foreign_file_without_arch_is_an_error(tmp_path, foreign_file):
    with pytest.raises(TeacherError, match="`arch` is needed"):
        acquire_teacher({"path": str(foreign_file)}, tmp_path / "t.pt")
    assert not (tmp_path / "t.pt").exists()


def test_wrong_local_checksum_names_both_hashes_and_writes_nothing(tmp_path, foreign_file):
    wrong = "0" * 64
    with pytest.raises(TeacherError) as err:
        acquire_teacher({"path": str(foreign_file), "arch": "tiny", "sha256": wrong}, tmp_path / "t.pt")
    assert wrong in str(err.value) and sha256_file(foreign_file) in str(err.value)
    assert not (tmp_path / "t.pt").exists()


def test_unreadable_and_mismatched_files_are_errors_that_write_nothing(tmp_path, foreign_file):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a torch file" * 100)
    out_dir = tmp_path / "out"
    with pytest.raises(TeacherError, match="not a readable torch file"):
        acquire_teacher({"path": str(garbage), "arch": "tiny"}, out_dir / "t.pt")
    # tiny's weights do not fit resnet2b: a strict key mismatch.
    with pytest.raises(TeacherError, match="missing keys"):
        acquire_teacher({"path": str(foreign_file), "arch": "resnet2b"}, out_dir / "t.pt")
    with pytest.raises(TeacherError, match="does not exist"):
        acquire_teacher({"path": str(tmp_path / "absent.pth"), "arch": "tiny"}, out_dir / "t.pt")
    assert not out_dir.exists()  # not even the output's folder


@pytest.mark.parametrize("source, message", [
    ({"path": "x", "url": "http://y", "sha256": "0" * 64}, "exactly one"),
    ({"arch": "tiny"}, "exactly one"),
    ({"path": "x", "arch": "tiny", "checksum": "0"}, r"unknown key\(s\) \['checksum'\]"),
    ({"url": "http://127.0.0.1:9/t.pth", "arch": "tiny"}, "sha256` is required"),
    ({"path": "x", "sha256": "abc"}, "not 64 hex digits"),
    ({"robustbench": "Carmon2019Unlabeled"}, "`arch` is required"),
])
def test_bad_sources_are_rejected_before_anything_is_read(tmp_path, source, message):
    with pytest.raises(TeacherError, match=message):
        acquire_teacher(source, tmp_path / "t.pt")


# ----------------------------------------------------------------------------- URLs


def test_url_download_from_a_local_http_server(tmp_path, net, foreign_file, server):
    out = acquire_teacher({"url": f"{server}/teacher.pth", "sha256": sha256_file(foreign_file), "arch": "tiny"},
                          tmp_path / "out" / "teacher.pt")
    assert torch.allclose(outputs(out), expected(net), atol=1e-6)
    assert [p.name for p in out.parent.iterdir()] == ["teacher.pt"]  # the download was removed


def test_url_checksum_mismatch_leaves_no_file_behind(tmp_path, foreign_file, server):
    wrong = "f" * 64
    out_dir = tmp_path / "out"
    with pytest.raises(TeacherError) as err:
        acquire_teacher({"url": f"{server}/teacher.pth", "sha256": wrong, "arch": "tiny"}, out_dir / "t.pt")
    assert wrong in str(err.value) and sha256_file(foreign_file) in str(err.value)
    assert not out_dir.exists()  # not even the output's folder


def test_url_errors_are_clear_and_leave_no_file(tmp_path, foreign_file, server):
    out_dir = tmp_path / "out"
    with pytest.raises(TeacherError, match="404.*internet access.*local copy"):
        acquire_teacher({"url": f"{server}/missing.pth", "sha256": "0" * 64, "arch": "tiny"}, out_dir / "t.pt")
    assert not out_dir.exists()  # not even the output's folder


def test_file_url(tmp_path, net, foreign_file):
    out = acquire_teacher({"url": foreign_file.as_uri(), "sha256": sha256_file(foreign_file), "arch": "tiny",
                           "key": "state_dict"}, tmp_path / "t.pt")
    assert torch.allclose(outputs(out), expected(net), atol=1e-6)


# ----------------------------------------------------------------------------- RobustBench


def hide_robustbench(monkeypatch, **modules):
    """Make ``import robustbench...`` fail (or return ``modules``) in this test, also where an
    earlier test left the real package's submodules in ``sys.modules`` (a cached submodule is
    returned without its parent being imported)."""
    for name in [m for m in sys.modules if m == "robustbench" or m.startswith("robustbench.")]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("robustbench", "robustbench.utils", "robustbench.model_zoo", "robustbench.model_zoo.enums"):
        monkeypatch.setitem(sys.modules, name, modules.get(name))


def test_missing_robustbench_says_how_to_install_and_what_works_instead(tmp_path, monkeypatch):
    hide_robustbench(monkeypatch)  # any import of it raises ImportError
    with pytest.raises(TeacherError) as err:
        acquire_teacher({"robustbench": "Carmon2019Unlabeled", "arch": "wrn-28-10"}, tmp_path / "t.pt")
    msg = str(err.value)
    for needle in ("pip install", "internet", "path: FILE", "url: URL, sha256"):
        assert needle in msg
    assert list(tmp_path.iterdir()) == []


def test_robustbench_model_is_read_through_its_normalizer_wrapper(tmp_path, monkeypatch, net):
    """RobustBench returns Sequential(normalize=ImageNormalizer, model=net); its mean/std must be kept."""
    class ImageNormalizer(nn.Module):
        def __init__(self, mean, std):
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    calls = []

    def load_model(model_name, model_dir, dataset, threat_model):
        calls.append((model_name, dataset, threat_model))
        return nn.Sequential(OrderedDict(normalize=ImageNormalizer([0.5] * 3, [0.25] * 3), model=net))

    utils = types.ModuleType("robustbench.utils")
    utils.load_model = load_model
    package = types.ModuleType("robustbench")
    package.utils = utils
    hide_robustbench(monkeypatch, **{"robustbench": package, "robustbench.utils": utils})

    out = acquire_teacher({"robustbench": "Some2020Name", "dataset": "cifar10", "threat_model": "Linf",
                           "arch": "tiny"}, tmp_path / "t.pt")
    assert calls == [("Some2020Name", "cifar10", "Linf")]
    net.mean.fill_(0.5)
    net.std.fill_(0.25)
    assert torch.allclose(outputs(out), expected(net), atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["t.pt"]  # RobustBench's download folder is gone


# ----------------------------------------------------------------------------- the config's shape


def test_config_shaped_sources_are_read_like_the_native_ones(tmp_path, net, foreign_file, server, monkeypatch):
    """teachers.<dataset> blocks as the workflow schema fills them in (defaults included),
    translated by mixacm.config.teacher_source; acquire_teacher itself refuses that shape."""
    defaults = {"threat_model": "Linf", "fraction": 1.0, "seed": 0, "arch": "tiny"}
    file_src = teacher_source({"source": "file", "path": str(foreign_file), **defaults}, "cifar10")
    assert file_src == {"path": str(foreign_file), "arch": "tiny", "dataset": "cifar10"}
    url_src = teacher_source({"source": "url", "url": f"{server}/teacher.pth", "sha256": sha256_file(foreign_file),
                              **defaults}, "cifar10")
    for src, name in ((file_src, "file.pt"), (url_src, "url.pt")):
        assert torch.allclose(outputs(acquire_teacher(src, tmp_path / name)), expected(net), atol=1e-6)
    rb = teacher_source({"source": "robustbench", "name": "Carmon2019Unlabeled", **defaults, "arch": "wrn-28-10"},
                        "cifar10")
    assert rb == {"robustbench": "Carmon2019Unlabeled", "dataset": "cifar10", "threat_model": "Linf",
                  "arch": "wrn-28-10"}
    hide_robustbench(monkeypatch)
    with pytest.raises(TeacherError, match="'Carmon2019Unlabeled'.*pip install"):
        acquire_teacher(rb, tmp_path / "rb.pt")
    with pytest.raises(ConfigError, match=r"teachers\.cifar10\.source: 'train'"):
        teacher_source({"source": "train", "recipe": "at", "arch": "tiny"}, "cifar10")
    with pytest.raises(TeacherError, match=r"unknown key\(s\) \['source'\]"):
        acquire_teacher({"source": "file", "path": str(foreign_file), "arch": "tiny"}, tmp_path / "t.pt")


def test_num_classes_follows_the_dataset(tmp_path, foreign_file):
    # tiny's 10-class weights cannot be read as a CIFAR-100 model: the dataset sets num_classes.
    with pytest.raises(TeacherError, match="fc.weight"):
        acquire_teacher({"path": str(foreign_file), "arch": "tiny", "dataset": "cifar100"}, tmp_path / "t.pt")
    assert not (tmp_path / "t.pt").exists()
