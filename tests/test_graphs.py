"""``train.cuda_graphs`` (mixacm.graphs): refused where capture cannot be right, checked before any
job; on a GPU (``-m gpu``) a MixACM run with graphs equals the eager run step by step."""
from __future__ import annotations

import copy

import pytest
import torch

from mixacm.config import ConfigError, check_pipeline_recipe, load_run_config, run_config_hash
from mixacm.distributed import DistContext
from mixacm.graphs import FeatureCall, GraphedCalls
from mixacm.methods import build_method
from mixacm.models import build_model
from mixacm.train import training_step, use_cuda_graphs


def test_a_method_without_support_is_refused_before_any_job():
    with pytest.raises(ConfigError, match=r"^train\.cuda_graphs: method 'at' does not support"):
        load_run_config({"method": {"name": "at"}, "train": {"cuda_graphs": True}})
    with pytest.raises(ConfigError, match=r"^train\.cuda_graphs: method 'trades' does not support"):
        load_run_config({"method": {"name": "trades"}, "train": {"cuda_graphs": "auto"}})
    cfg = load_run_config({"teacher": "t.pt", "train": {"cuda_graphs": True}})
    assert cfg["train"]["cuda_graphs"] is True
    assert load_run_config({"teacher": "t.pt"})["train"]["cuda_graphs"] is False  # the default


def test_graphs_do_not_change_the_config_hash():
    # A run resumes with or without graphs: they replay the eager step's kernels.
    hashes = {run_config_hash(load_run_config({"teacher": "t.pt", "train": {"cuda_graphs": v}}))
              for v in (False, True, "auto")}
    assert len(hashes) == 1


def test_auto_trains_eagerly_off_cuda_and_says_so(tmp_path):
    # `auto` (the paper config's MixACM setting) keeps the eager step on a CPU and records it;
    # `true` on a CPU stops before the first step.
    from mixacm.train import train
    from test_train import make_image_folder, make_teacher, run_config

    data, teacher = make_image_folder(tmp_path / "data"), make_teacher(tmp_path / "teacher.pt")
    cfg = run_config(data, {"name": "mixacm"}, teacher, epochs=1)
    cfg["train"].update(cuda_graphs="auto", max_steps_per_epoch=2)
    assert train(cfg, tmp_path / "auto")["cuda_graphs"] is False
    cfg["train"]["cuda_graphs"] = True
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train(cfg, tmp_path / "true")
    assert not (tmp_path / "true" / "state.pt").exists()


def test_a_student_with_dropout_is_refused():
    with pytest.raises(ConfigError, match="dropout"):
        load_run_config({"teacher": "t.pt", "model": {"name": "wrn-10-1", "kwargs": {"dropout": 0.3}},
                         "train": {"cuda_graphs": True}})


def test_a_multi_gpu_training_job_is_refused_under_the_pipeline_key():
    from test_pipeline_config import pipeline  # snakemake's validate (not on GPU machines)

    cfg = copy.deepcopy(pipeline())
    cfg["recipes"]["mixacm"].setdefault("train", {})["cuda_graphs"] = True
    check_pipeline_recipe(cfg, "mixacm", dataset="cifar10", arch="tiny", teacher="t.pt")  # one GPU: fine
    cfg["resources"].setdefault("cifar10", {}).setdefault("train", {})["gpu"] = 2
    with pytest.raises(ConfigError, match=r"^recipes\.mixacm\.train\.cuda_graphs: one process only"):
        check_pipeline_recipe(cfg, "mixacm", dataset="cifar10", arch="tiny", teacher="t.pt")


def _mixacm(device="cpu", seed=0, student="wrn-10-1", teacher_width=1):
    # teacher_width 2: the teacher's groups are twice as wide, so MixACM trains linear maps
    # between the channel maps (its extra modules, outside the graphs).
    torch.manual_seed(seed)
    s = build_model(student).to(device)
    t = build_model("wide_resnet", 10, depth=10, widen_factor=teacher_width).to(device)
    return build_method("mixacm", s, t.eval().requires_grad_(False))


def test_runtime_refusals_off_cuda_and_under_ddp():
    method = _mixacm()
    with pytest.raises(ConfigError, match="needs a CUDA device, this run is on cpu"):
        use_cuda_graphs(method, DistContext())
    with pytest.raises(ConfigError, match="one process only"):
        use_cuda_graphs(method, DistContext(world_size=2, device=torch.device("cuda", 0)))
    at = build_method("at", build_model("wrn-10-1"))
    with pytest.raises(ConfigError, match="method 'at' does not support CUDA graphs"):
        use_cuda_graphs(at, DistContext(device=torch.device("cuda", 0)))
    assert method.graphs is None and at.graphs is None


def test_capture_refuses_dropout_and_a_cpu_batch():
    with pytest.raises(ValueError, match="dropout"):
        GraphedCalls({"student": (build_model("wrn-10-1", dropout=0.1), ("layer1",), True)})
    calls = GraphedCalls({"student": (build_model("wrn-10-1"), ("layer1",), True)})
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        calls("student", torch.rand(2, 3, 32, 32))


def test_feature_call_is_the_network_call_as_a_flat_tuple():
    net = build_model("wrn-10-1").eval()
    x = torch.rand(2, 3, 32, 32)
    logits, feats = net(x, features=("layer1", "layer3"), activated=True)
    out = FeatureCall(net, ("layer1", "layer3"), True)(x)
    for a, b in zip(out, (logits, feats["layer1"], feats["layer3"])):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(FeatureCall(net, (), True)(x)[0], net(x))


def _run(method, x, y, steps, amp, graphs):
    """``steps`` loop steps (SGD with momentum and weight decay); per-step loss and metrics."""
    if graphs:
        method.use_cuda_graphs()
    params = [*method.model.parameters(), *method.extra_modules().parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    torch.manual_seed(123)  # the same mixup draws in both runs
    out = []
    for i in range(steps):
        xb = x[i % 2]  # two batches, so a stale static input would show
        loss, metrics = training_step(method, opt, scaler, xb, y[i % 2], amp=amp)
        out.append({"loss": loss.clone(), **{k: v.clone() for k, v in metrics.items()}})
    torch.cuda.synchronize()
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_graphed_mixacm_equals_the_eager_run_step_by_step(amp):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as mixacm.train.setup on CUDA: both runs use the algorithms it picks
    try:
        _check_graphed_equals_eager(device, amp)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def _worst(run_a, run_b) -> tuple[float, str]:
    """Largest difference between two runs (per-step metrics, then every weight and BatchNorm
    statistic), relative to the largest magnitude of that tensor in ``run_a``."""
    (steps_a, m_a), (steps_b, m_b) = run_a, run_b
    pairs = [(f"step {i} {k}", a[k], b[k]) for i, (a, b) in enumerate(zip(steps_a, steps_b)) for k in a]
    for part in ("model", "extra"):
        sd_a, sd_b = ((m.model if part == "model" else m.extra_modules()).state_dict() for m in (m_a, m_b))
        pairs += [(f"{part} {name}", p_a, sd_b[name]) for name, p_a in sd_a.items()]
    return max(((float((b.double() - a.double()).abs().max() / (a.double().abs().max() + 1e-6)), name)
                for name, a, b in pairs), key=lambda t: t[0])


def _check_graphed_equals_eager(device: torch.device, amp: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = [torch.rand(16, 3, 32, 32, generator=g).to(device).contiguous(memory_format=torch.channels_last)
         for _ in range(2)]
    y = [torch.randint(0, 10, (16,), generator=g).to(device) for _ in range(2)]
    runs = {}
    for name, graphs in (("eager", False), ("eager again", False), ("graphed", True)):
        method = _mixacm(device, teacher_width=2)
        method.model.to(memory_format=torch.channels_last).train()
        runs[name] = (_run(method, x, y, 6, amp, graphs), method)
    m_g = runs["graphed"][1]
    assert len(m_g.transforms) == 3  # linear maps to the wider teacher, trained outside the graphs
    assert m_g.graphs.replays == 6 * 2  # every student and teacher call of the six steps replayed
    # weights after six updates, and the BatchNorm statistics (the warm-up passes undone)
    noise, worst = _worst(runs["eager"], runs["eager again"]), _worst(runs["eager"], runs["graphed"])
    first = [float(r[0][0]["loss"]) for r in runs.values()]
    print(f"amp {amp}: largest relative difference eager vs eager {noise[0]:.2e} ({noise[1]}), "
          f"graphed vs eager {worst[0]:.2e} ({worst[1]}); first losses {first}")
    # The graph replays the eager run's kernels (cuDNN's autotuned algorithms are cached per
    # shape, so the capture picks the eager run's); two eager runs differ where a kernel sums
    # with atomics (some cuDNN weight-gradient algorithms), and the graphed run may differ as much.
    assert worst[0] <= max(1e-5, 3 * noise[0]), (worst, noise)
    # Another batch size runs eagerly instead of replaying the graph of 16, and so does a
    # student in eval mode.
    opt0, scaler = torch.optim.SGD(m_g.model.parameters(), lr=0.0), torch.amp.GradScaler("cuda", enabled=False)
    loss, _ = training_step(m_g, opt0, scaler, x[0][:8], y[0][:8], amp=amp)
    assert torch.isfinite(loss) and m_g.graphs.replays == 12
    m_g.model.eval()
    logits, _ = m_g._features("student", x[0])
    torch.testing.assert_close(logits, m_g.model(x[0]))
    assert m_g.graphs.replays == 12


@pytest.mark.gpu
def test_a_graphed_run_resumes_to_the_uninterrupted_run_and_equals_the_eager_one(tmp_path):
    # The whole loop on a GPU in bf16: graphs captured by setup's method at the first step, again
    # at the first step after a resume; the BatchNorm statistics the capture's warm-up passes
    # touched are restored each time, so the weights end bit-equal.
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from mixacm.train import train
    from test_train import make_image_folder, make_teacher, metric_lines, run_config, weights

    data, teacher = make_image_folder(tmp_path / "data"), make_teacher(tmp_path / "teacher.pt")
    cfg = run_config(data, {"name": "mixacm"}, teacher)
    cfg.update(device="cuda", model={"name": "wrn-10-1"})
    cfg["train"].update(amp="bf16", channels_last=True, cuda_graphs=True)
    full = train(cfg, tmp_path / "full")
    assert full["cuda_graphs"] is True and full["steps"] == 15
    partial = train(cfg, tmp_path / "killed", stop_after_steps=7)
    assert partial["completed"] is False and [line["epoch"] for line in metric_lines(tmp_path / "killed")] == [1]
    resumed = train(cfg, tmp_path / "killed")
    assert resumed["resumed_from_epoch"] == 1 and resumed["cuda_graphs"] is True
    eager = train({**cfg, "train": {**cfg["train"], "cuda_graphs": False}}, tmp_path / "eager")
    assert eager["cuda_graphs"] is False
    a, b, c = (weights(tmp_path / d / "model.pt") for d in ("full", "killed", "eager"))
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed: {k}"
        assert torch.equal(a[k], c[k]), f"eager: {k}"


@pytest.mark.gpu
def test_pooled_power_reads_a_bf16_map_without_a_float32_copy_on_cuda():
    # On CUDA the float32 reduction reads bf16 directly: no cast of the map's size, forward or
    # backward (the CPU reduction casts; tests/test_losses.py checks the backward there).
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from mixacm.losses import pooled_power
    from test_losses import _map_sized_casts

    feat = torch.randn(4, 8, 6, 6, device="cuda").to(torch.bfloat16).requires_grad_(True)
    for p in (1, 2):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                a = pooled_power(feat, p, "mean")
            a.square().sum().backward()
        assert _map_sized_casts(step, feat) == [], p


@pytest.mark.gpu
def test_a_student_with_unused_parameters_is_graphed():
    # WideResNet's sub_block1 (carried by some RobustBench checkpoints) is never used in the
    # forward: the capture leaves its parameters without a gradient, as the eager step does.
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    student = build_model("wrn-10-1", sub_block1=True).cuda().train()
    method = build_method("mixacm", student, build_model("wrn-10-1").cuda().eval().requires_grad_(False))
    method.use_cuda_graphs()
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    x, y = torch.rand(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    for _ in range(2):
        loss, _ = training_step(method, opt, torch.amp.GradScaler("cuda", enabled=False), x, y, amp="bf16")
    assert torch.isfinite(loss) and method.graphs.replays == 4
    assert all(p.grad is None for n, p in student.named_parameters() if n.startswith("sub_block1."))
    assert student.conv1.weight.grad is not None
