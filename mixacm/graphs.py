"""CUDA graphs for the fixed-shape network calls of a training step (``train.cuda_graphs``).

A step whose convolutions run fast can be bound by the host: on one H200 the eager MixACM step
(WRN-34-10 student, WRN-28-10 teacher, batch 128, bf16) issued about 1,000 kernels at ~30 us of
host time each, so the GPU idled for a quarter of the step although its kernels took only 4 %
longer than a bare student step plus the teacher's forward (``benchmarks/profile_step.py``,
``docs/benchmarks.md``). ``GraphedCalls`` captures each network call of the step,
``net(x, features=names, activated=...)``, with ``torch.cuda.make_graphed_callables`` on the first
batch and replays it (forward, and backward where the network trains) with one launch; the loss
terms stay eager and their host work overlaps the replayed kernels.

What capture needs, and how it is met:

* the same shapes every step: the training loader drops the last partial batch; a call with other
  shapes, or with the network in another train/eval mode than at capture, runs eagerly;
* no host reads inside the calls (the networks have none; ``tests/test_method_activity.py``);
* autocast without its weight-cast cache (``mixacm.train.training_step`` turns it off when the
  method uses graphs): the casts are then part of the graph and see every optimiser update;
* no randomness inside the networks: a dropout > 0 is refused (the graph would replay one mask);
* the warm-up passes ``make_graphed_callables`` runs must not change the run: the networks'
  buffers (BatchNorm running statistics) are restored afterwards, so a run with graphs keeps the
  state of a run without them (and resume stays exact);
* one process: DDP's gradient hooks are not captured (refused in ``mixacm.train.setup``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class FeatureCall(nn.Module):
    """``net(x, features=names, activated=activated)`` as a module returning the flat tuple
    ``(logits, *features)`` (the form ``make_graphed_callables`` takes); ``net``'s parameters are
    this module's, so their gradients flow through the graphed backward."""

    def __init__(self, net: nn.Module, names: Sequence[str], activated: bool) -> None:
        super().__init__()
        self.net, self.names, self.activated = net, tuple(names), activated

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if not self.names:
            return (self.net(x),)
        logits, feats = self.net(x, features=self.names, activated=self.activated)
        return (logits, *(feats[n] for n in self.names))


def _dropout(net: nn.Module) -> float:
    return max([float(getattr(m, "dropout", 0.0) or 0.0) for m in net.modules()]
               + [m.p for m in net.modules() if isinstance(m, nn.Dropout)], default=0.0)


class GraphedCalls:
    """Network calls of a step, replayed from CUDA graphs captured on the first call's input.

    ``calls``: role -> ``(net, feature names, activated)``, in the order the step makes the calls
    (``make_graphed_callables`` needs that order). ``calls[role](x)`` returns ``(logits, {name:
    feature})`` as the network would; the returned tensors are the graph's static outputs,
    overwritten by the next replay (a step uses them before the next one starts). Raises
    ValueError for a network with dropout > 0 and RuntimeError when ``x`` is not on a CUDA device.
    """

    def __init__(self, calls: dict[str, tuple[nn.Module, Sequence[str], bool]]) -> None:
        for role, (net, _, _) in calls.items():
            if net.training and _dropout(net) > 0:  # an eval-mode network (the teacher) applies none
                raise ValueError(f"train.cuda_graphs: the {role} network uses dropout (p={_dropout(net)}); "
                                 "a CUDA graph would replay one dropout mask every step")
        self.calls = {role: FeatureCall(net, names, act) for role, (net, names, act) in calls.items()}
        self.graphed: dict[str, nn.Module] | None = None
        self.shape: torch.Size | None = None
        self.autocast: tuple[bool, torch.dtype] | None = None
        self.modes: dict[str, bool] = {}
        self.replays = 0  # calls answered from a graph (the tests count them)

    def __call__(self, role: str, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        call = self.calls[role]
        if self.graphed is None and torch.is_grad_enabled():  # the student's backward is captured too
            self._capture(x)
        use_graph = (self.graphed is not None and x.shape == self.shape and call.net.training == self.modes[role]
                     and _autocast_state() == self.autocast)
        # The graphed module's own forward falls back to the eager one on a mode change only.
        out = self.graphed[role](x) if use_graph else FeatureCall.forward(call, x)
        self.replays += use_graph
        return out[0], dict(zip(call.names, out[1:]))

    def _capture(self, x: Tensor) -> None:
        if x.device.type != "cuda":
            raise RuntimeError(f"train.cuda_graphs needs a CUDA device; the batch is on {x.device}")
        nets = [c.net for c in self.calls.values()]
        buffers = [b for net in nets for b in net.buffers()]
        saved = [b.detach().clone() for b in buffers]
        sample = x.detach().clone()
        for call in self.calls.values():  # the wrapper follows its network's mode
            call.train(call.net.training)
        self.modes = {role: c.net.training for role, c in self.calls.items()}
        try:  # unused parameters (e.g. a checkpoint's idle group) get no gradient, as in the eager step
            graphed = torch.cuda.make_graphed_callables(tuple(self.calls.values()),
                                                        tuple((sample,) for _ in self.calls), allow_unused_input=True)
        finally:
            with torch.no_grad():  # undo the warm-up passes' BatchNorm updates
                for b, v in zip(buffers, saved):
                    b.copy_(v)
        self.graphed = dict(zip(self.calls, graphed))
        self.shape, self.autocast = x.shape, _autocast_state()


def _autocast_state() -> tuple[bool, torch.dtype]:
    """CUDA autocast on or off, and its dtype: a graph replays the casts of its capture."""
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
